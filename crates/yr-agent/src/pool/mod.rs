//! The runtime pool: every runtime process the node started, whom it serves, and the warm pool
//! of idle runtimes per driver binary.
//!
//! It is the only owner of that bookkeeping. Taking a warm runtime and counting idle ones are
//! constant-time (an index of idle runtimes per binary), so creating an instance costs the same
//! whether ten or ten thousand instances live. It starts and signals processes through a
//! [`Spawner`], so it is tested without processes.
//!
//! Heartbeats go round the runtimes in turn, at most a fixed number per round, so the node and
//! its idle runtimes spend the same on them whether ten or ten thousand runtimes live; with
//! many runtimes each is asked less often (see [`RuntimePool::heartbeat_round`]).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::oneshot;
use yr_proto::v1 as pb;

use crate::manager::{AgentError, RuntimeSpec};

/// Starts and signals runtime processes. [`crate::RuntimeManager`] does it with real processes.
pub trait Spawner: Send + Sync {
    /// Start a runtime; returns its id and pid.
    fn spawn(&self, spec: &RuntimeSpec) -> Result<(String, u32), AgentError>;
    /// Send `signal`; false if the runtime is not running.
    fn signal(&self, runtime_id: &str, signal: i32) -> bool;
    /// The pid of a running runtime.
    fn pid(&self, runtime_id: &str) -> Option<u32>;
}

/// Why a runtime could not be used: it ended before it connected (with its stderr's tail).
pub type Unregistered = String;

/// Resolves when a runtime connected to the bus, or failed to.
pub type Registration = oneshot::Receiver<Result<(), Unregistered>>;

struct Slot {
    binary_hash: String,
    /// The bus client it registered as.
    client_id: Option<u64>,
    /// Where it listens for calls.
    address: String,
    /// The instance it serves; `None` while it is warm.
    instance_id: Option<String>,
    /// When the heartbeat it has not answered yet was sent.
    unanswered_since: Option<Instant>,
    hung: bool,
    /// Stopped (SIGSTOP) by [`RuntimePool::pause`]: it gets no heartbeats and is not hung.
    paused: bool,
    registered: Vec<oneshot::Sender<Result<(), Unregistered>>>,
    init: Option<oneshot::Sender<pb::InitResult>>,
}

/// Idle runtimes of one binary: connected ones are taken first.
#[derive(Default)]
struct Idle {
    connected: BTreeSet<String>,
    starting: BTreeSet<String>,
}

impl Idle {
    fn len(&self) -> usize {
        self.connected.len() + self.starting.len()
    }

    fn remove(&mut self, runtime_id: &str) {
        self.connected.remove(runtime_id);
        self.starting.remove(runtime_id);
    }

    fn pop(&mut self) -> Option<String> {
        self.connected
            .pop_first()
            .or_else(|| self.starting.pop_first())
    }
}

#[derive(Default)]
struct PoolState {
    slots: HashMap<String, Slot>,
    idle: HashMap<String, Idle>,
    /// Runtimes in the order their next heartbeat turn comes. Ended runtimes leave it when
    /// their turn comes.
    beat_order: VecDeque<String>,
}

impl PoolState {
    fn remove_idle(&mut self, binary_hash: &str, runtime_id: &str) {
        if let Some(idle) = self.idle.get_mut(binary_hash) {
            idle.remove(runtime_id);
            if idle.len() == 0 {
                self.idle.remove(binary_hash);
            }
        }
    }
}

/// A runtime taken for an instance.
pub struct Taken {
    /// Its id.
    pub runtime_id: String,
    /// Set when it has not connected yet: resolves when it does (or ends).
    pub registration: Option<Registration>,
}

/// What the pool knew about a runtime that ended.
#[derive(Debug, PartialEq)]
pub struct Ended {
    /// The instance it served, if any.
    pub instance_id: Option<String>,
    /// Whether it had stopped answering heartbeats.
    pub hung: bool,
    /// Whether it had connected to the bus.
    pub registered: bool,
}

/// Heartbeats to send and runtimes found hung, from one heartbeat round.
#[derive(Debug, Default, PartialEq)]
pub struct HeartbeatRound {
    /// Bus clients to send a heartbeat.
    pub beat: Vec<u64>,
    /// Runtimes that missed their heartbeats (now marked hung).
    pub hung: Vec<String>,
}

/// Every runtime the node started, and the warm pool.
pub struct RuntimePool {
    spawner: Arc<dyn Spawner>,
    warm_size: usize,
    state: Mutex<PoolState>,
    /// Held through a fill, so two fills at once do not both count the same gap and start
    /// twice the runtimes missing.
    filling: Mutex<()>,
}

impl RuntimePool {
    /// A pool keeping `warm_size` idle runtimes per binary, started by `spawner`.
    pub fn new(spawner: Arc<dyn Spawner>, warm_size: usize) -> RuntimePool {
        RuntimePool {
            spawner,
            warm_size,
            state: Mutex::new(PoolState::default()),
            filling: Mutex::new(()),
        }
    }

    /// Start a runtime of `binary_hash`; it is idle until taken.
    pub fn start(&self, binary_hash: &str, spec: &RuntimeSpec) -> Result<String, AgentError> {
        self.spawn(binary_hash, spec, None)
    }

    /// Start a runtime of `binary_hash`: for `instance_id`, or idle until taken.
    fn spawn(
        &self,
        binary_hash: &str,
        spec: &RuntimeSpec,
        instance_id: Option<&str>,
    ) -> Result<String, AgentError> {
        let (runtime_id, _pid) = self.spawner.spawn(spec)?;
        let mut state = self.state.lock();
        state.slots.insert(
            runtime_id.clone(),
            Slot {
                binary_hash: binary_hash.to_string(),
                client_id: None,
                address: String::new(),
                instance_id: instance_id.map(str::to_string),
                unanswered_since: None,
                hung: false,
                paused: false,
                registered: Vec::new(),
                init: None,
            },
        );
        state.beat_order.push_back(runtime_id.clone());
        if instance_id.is_none() {
            state
                .idle
                .entry(binary_hash.to_string())
                .or_default()
                .starting
                .insert(runtime_id.clone());
        }
        Ok(runtime_id)
    }

    /// Start idle runtimes of `binary_hash` until the warm pool is full.
    pub fn fill(&self, binary_hash: &str, spec: &RuntimeSpec) -> Result<(), AgentError> {
        let _filling = self.filling.lock();
        let idle = self
            .state
            .lock()
            .idle
            .get(binary_hash)
            .map(Idle::len)
            .unwrap_or(0);
        for _ in idle..self.warm_size {
            self.start(binary_hash, spec)?;
        }
        Ok(())
    }

    /// Take a runtime of `binary_hash` for `instance_id`: an idle one (connected ones first),
    /// or a new one started from `spec`.
    pub fn take(
        &self,
        binary_hash: &str,
        spec: &RuntimeSpec,
        instance_id: &str,
    ) -> Result<Taken, AgentError> {
        let warm = {
            let mut state = self.state.lock();
            let warm = state.idle.get_mut(binary_hash).and_then(Idle::pop);
            if let Some(id) = &warm {
                state.remove_idle(binary_hash, id);
            }
            warm
        };
        let runtime_id = match warm {
            Some(id) => id,
            None => self.spawn(binary_hash, spec, Some(instance_id))?,
        };
        Ok(self.claim(runtime_id, instance_id))
    }

    /// Take a new runtime of `binary_hash`, started from `spec` for `instance_id` alone, never
    /// an idle one (for an instance whose runtime has its own environment).
    pub fn take_new(
        &self,
        binary_hash: &str,
        spec: &RuntimeSpec,
        instance_id: &str,
    ) -> Result<Taken, AgentError> {
        let runtime_id = self.spawn(binary_hash, spec, Some(instance_id))?;
        Ok(self.claim(runtime_id, instance_id))
    }

    /// Give `runtime_id` to `instance_id`, with the wait for its registration if it has not
    /// connected yet.
    fn claim(&self, runtime_id: String, instance_id: &str) -> Taken {
        let mut state = self.state.lock();
        let Some(slot) = state.slots.get_mut(&runtime_id) else {
            // It ended between start and take; the caller starts over.
            let (sender, registration) = oneshot::channel();
            let _ = sender.send(Err("it ended before it was used".to_string()));
            return Taken {
                runtime_id,
                registration: Some(registration),
            };
        };
        slot.instance_id = Some(instance_id.to_string());
        let registration = if slot.client_id.is_some() {
            None
        } else {
            let (sender, receiver) = oneshot::channel();
            slot.registered.push(sender);
            Some(receiver)
        };
        Taken {
            runtime_id,
            registration,
        }
    }

    /// Runtime `runtime_id` connected as bus client `client_id`, listening at `address`. False
    /// if the pool does not know it.
    pub fn registered(&self, runtime_id: &str, client_id: u64, address: &str) -> bool {
        let mut state = self.state.lock();
        let Some(slot) = state.slots.get_mut(runtime_id) else {
            return false;
        };
        slot.client_id = Some(client_id);
        slot.address = address.to_string();
        for waiter in slot.registered.drain(..) {
            let _ = waiter.send(Ok(()));
        }
        let idle = slot.instance_id.is_none() && !slot.hung;
        let hash = slot.binary_hash.clone();
        if idle {
            if let Some(set) = state.idle.get_mut(&hash) {
                if set.starting.remove(runtime_id) {
                    set.connected.insert(runtime_id.to_string());
                }
            }
        }
        true
    }

    /// Expect the init call's answer from `runtime_id`: its bus client, its call address and
    /// where the answer arrives. `None` if it ended.
    pub fn expect_init(
        &self,
        runtime_id: &str,
    ) -> Option<(u64, String, oneshot::Receiver<pb::InitResult>)> {
        let mut state = self.state.lock();
        let slot = state.slots.get_mut(runtime_id)?;
        let (sender, receiver) = oneshot::channel();
        slot.init = Some(sender);
        Some((slot.client_id.unwrap_or(0), slot.address.clone(), receiver))
    }

    /// The init call's answer from `runtime_id`.
    pub fn init_result(&self, runtime_id: &str, result: pb::InitResult) {
        let waiter = self
            .state
            .lock()
            .slots
            .get_mut(runtime_id)
            .and_then(|slot| slot.init.take());
        if let Some(waiter) = waiter {
            let _ = waiter.send(result);
        }
    }

    /// `runtime_id` answered a heartbeat.
    pub fn heartbeat_ack(&self, runtime_id: &str) {
        if let Some(slot) = self.state.lock().slots.get_mut(runtime_id) {
            slot.unanswered_since = None;
        }
    }

    /// One heartbeat round, at `now`: the next `max_turns` runtimes in turn get a heartbeat,
    /// unless they have not answered the previous one yet; one that has not answered for
    /// longer than `timeout` is marked hung and leaves the warm pool (the caller kills it).
    ///
    /// A round costs `max_turns` at most, however many runtimes live. With more than
    /// `max_turns` runtimes, each gets its turn every `runtimes / max_turns` rounds, so a hung
    /// runtime is found within that many rounds plus `timeout`.
    pub fn heartbeat_round(
        &self,
        now: Instant,
        timeout: Duration,
        max_turns: usize,
    ) -> HeartbeatRound {
        let mut round = HeartbeatRound::default();
        let mut state = self.state.lock();
        let mut newly_hung = Vec::new();
        let turns = max_turns.min(state.beat_order.len());
        for _ in 0..turns {
            let Some(runtime_id) = state.beat_order.pop_front() else {
                break;
            };
            let Some(slot) = state.slots.get_mut(&runtime_id) else {
                continue;
            };
            if slot.hung {
                continue;
            }
            if slot.paused {
                state.beat_order.push_back(runtime_id);
                continue;
            }
            match (slot.client_id, slot.unanswered_since) {
                (None, _) => {}
                (Some(_), Some(sent)) if now.saturating_duration_since(sent) > timeout => {
                    slot.hung = true;
                    newly_hung.push((slot.binary_hash.clone(), runtime_id));
                    continue;
                }
                (Some(_), Some(_)) => {}
                (Some(client_id), None) => {
                    slot.unanswered_since = Some(now);
                    round.beat.push(client_id);
                }
            }
            state.beat_order.push_back(runtime_id);
        }
        for (hash, runtime_id) in newly_hung {
            state.remove_idle(&hash, &runtime_id);
            round.hung.push(runtime_id);
        }
        round
    }

    /// Count every runtime as having answered. For a node that was itself stopped (for
    /// example SIGSTOP) longer than the heartbeat timeout: its runtimes' silence is its own.
    pub fn forgive_silence(&self) {
        for slot in self.state.lock().slots.values_mut() {
            slot.unanswered_since = None;
        }
    }

    /// The bus client of `runtime_id`, if it connected.
    pub fn client_of(&self, runtime_id: &str) -> Option<u64> {
        self.state
            .lock()
            .slots
            .get(runtime_id)
            .and_then(|slot| slot.client_id)
    }

    /// The instance `runtime_id` serves.
    pub fn instance_of(&self, runtime_id: &str) -> Option<String> {
        self.state
            .lock()
            .slots
            .get(runtime_id)
            .and_then(|slot| slot.instance_id.clone())
    }

    /// Runtime `runtime_id` ended: forget it and tell whoever waits for it to connect.
    pub fn ended(&self, runtime_id: &str, stderr_tail: &str) -> Option<Ended> {
        let mut state = self.state.lock();
        let slot = state.slots.remove(runtime_id)?;
        state.remove_idle(&slot.binary_hash, runtime_id);
        for waiter in slot.registered {
            let _ = waiter.send(Err(stderr_tail.to_string()));
        }
        Some(Ended {
            instance_id: slot.instance_id,
            hung: slot.hung,
            registered: slot.client_id.is_some(),
        })
    }

    /// Send `signal` to `runtime_id`.
    pub fn signal(&self, runtime_id: &str, signal: i32) -> bool {
        self.spawner.signal(runtime_id, signal)
    }

    /// Stop `runtime_id` (SIGSTOP) until [`RuntimePool::resume_all`]: it serves nothing, keeps
    /// its memory, gets no heartbeats and does not count as hung. False if it is not running
    /// (or was paused already).
    pub fn pause(&self, runtime_id: &str) -> bool {
        let mut state = self.state.lock();
        let Some(slot) = state.slots.get_mut(runtime_id) else {
            return false;
        };
        if slot.paused || !self.spawner.signal(runtime_id, libc::SIGSTOP) {
            return false;
        }
        slot.paused = true;
        true
    }

    /// Continue (SIGCONT) every paused runtime, with a fresh heartbeat timeout; returns them.
    pub fn resume_all(&self) -> Vec<String> {
        let mut state = self.state.lock();
        let mut resumed = Vec::new();
        for (runtime_id, slot) in state.slots.iter_mut() {
            if slot.paused {
                slot.paused = false;
                slot.unanswered_since = None;
                self.spawner.signal(runtime_id, libc::SIGCONT);
                resumed.push(runtime_id.clone());
            }
        }
        resumed
    }

    /// Whether `runtime_id` is paused.
    pub fn is_paused(&self, runtime_id: &str) -> bool {
        self.state
            .lock()
            .slots
            .get(runtime_id)
            .is_some_and(|slot| slot.paused)
    }

    /// How many runtimes are paused.
    pub fn paused(&self) -> usize {
        self.state
            .lock()
            .slots
            .values()
            .filter(|slot| slot.paused)
            .count()
    }

    /// The pid of `runtime_id`.
    pub fn pid(&self, runtime_id: &str) -> Option<u32> {
        self.spawner.pid(runtime_id)
    }

    /// Idle runtimes of `binary_hash`.
    pub fn idle(&self, binary_hash: &str) -> usize {
        self.state
            .lock()
            .idle
            .get(binary_hash)
            .map(Idle::len)
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests;
