//! An instance as its callers see it: calls queue until it runs, then stream straight to its
//! runtime (direct routing), in submission order. If the connection breaks, calls in flight wait
//! for the node's verdict: replayed on the restarted instance (`recover_retry_times`; FAILED,
//! then RUNNING at a new address, also on another node after a node loss), or failed with the
//! code the node gives (2002 crash, 1007 exit). Only the node's word ends an instance. If the
//! node says nothing (the runtime cannot be reached from here, as across a cut between two
//! hosts), the calls waiting fail with 3001 and the instance is *unreachable*: the next call
//! connects again, to the same runtime, and is served once the link is back. A connection to
//! the runtime it already had is a reconnect, not a restart: calls that were in flight on the
//! broken one fail with 3001 rather than run twice. An instance this process looked up on
//! another node has no node to tell it: when its connection breaks, its [`Relocate`] asks the
//! node where it runs again.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use yr_common::{Error, ErrorCode};
use yr_proto::v1 as pb;

use super::call_channel::{self, FrameWriter};
use super::convert::{args_to_proto, discard_result, finish_returns, unsend_args};
use crate::dependencies;
use crate::function::Arg;
use crate::object_store::{Cancel, ObjectHandle};

/// How long calls whose connection broke wait for the node to say what happened: a node
/// learns that another node died from the master, within its node timeout (3 s by default).
const VERDICT_WAIT: Duration = Duration::from_secs(8);

/// How long calls wait for an instance the node says is being restarted (FAILED: restarted on
/// its node within `recover_retry_times`, or re-created on another node after its node was
/// lost) to run again; the node says FATAL when it gives up, so this only bounds a silent node.
const RESTART_WAIT: Duration = Duration::from_secs(90);

/// What a caller that pools instances (the stateless submitter) hears about one of them.
/// Observers are called with no lock of the instance held.
pub trait InstanceObserver: Send + Sync {
    /// A call's result, before its objects are finished. Returns true if the observer took the
    /// result over (for example to retry the call elsewhere).
    fn on_result(&self, call: &OutCall, result: &pb::CallResult) -> bool;
    /// The instance can take calls now, or has finished one.
    fn on_ready(&self);
    /// The instance is gone for good with `error`.
    fn on_gone(&self, error: &Error);
}

/// Finds an instance again for a caller that no node tells of its restarts and moves (one it
/// looked up on another node), when the caller's connection to its runtime breaks.
pub trait Relocate: Send + Sync {
    /// Find where `instance`, whose runtime at `moved_from` is gone, runs now, and answer with
    /// [`RemoteInstance::relocated`] or [`RemoteInstance::on_failed`].
    fn relocate(&self, instance: Arc<RemoteInstance>, moved_from: String);
}

/// A call on its way to an instance.
pub struct OutCall {
    /// The call's id on this caller.
    pub call_id: u64,
    /// What to call.
    pub kind: pb::CallKind,
    /// The function's or method's name.
    pub function: &'static str,
    /// The arguments, kept for replays.
    pub args: Arc<Vec<Arg>>,
    /// The call's results.
    pub returns: Vec<ObjectHandle>,
    /// Whether its dependencies are finished.
    ready: bool,
    /// When it was sent to the runtime.
    sent_at: Option<Instant>,
    /// Calls of its function have been short, so other calls may queue behind it.
    pub expected_short: bool,
}

impl OutCall {
    /// A call of `function` with `args`, finishing `returns`.
    pub fn new(
        kind: pb::CallKind,
        function: &'static str,
        args: Vec<Arg>,
        returns: Vec<ObjectHandle>,
    ) -> OutCall {
        Self::with_shared_args(kind, function, Arc::new(args), returns)
    }

    /// A call whose arguments are shared with earlier attempts (retries).
    pub fn with_shared_args(
        kind: pb::CallKind,
        function: &'static str,
        args: Arc<Vec<Arg>>,
        returns: Vec<ObjectHandle>,
    ) -> OutCall {
        static NEXT_CALL: AtomicU64 = AtomicU64::new(1);
        OutCall {
            call_id: NEXT_CALL.fetch_add(1, Ordering::Relaxed),
            kind,
            function,
            args,
            returns,
            ready: false,
            sent_at: None,
            expected_short: false,
        }
    }

    /// How long ago it was sent to the runtime, if it was.
    pub fn sent_ago(&self) -> Option<Duration> {
        self.sent_at.map(|sent| sent.elapsed())
    }

    fn fail(&self, error: &Error) {
        for handle in &self.returns {
            handle.fail(error.clone());
        }
    }
}

fn fail_all(calls: Vec<(OutCall, Error)>) {
    for (call, error) in calls {
        call.fail(&error);
    }
}

enum Connection {
    /// Not running yet, or reconnecting.
    Waiting,
    /// Streaming calls to the runtime at `address`.
    Open { sender: Arc<FrameWriter> },
    /// Not reachable from here, and no node said it ended: the calls that waited failed with
    /// 3001, and the next call connects again.
    Unreachable,
    /// Gone for good; calls fail with this error.
    Failed(Error),
}

struct State {
    connection: Connection,
    /// Calls not sent yet, in submission order.
    queued: VecDeque<OutCall>,
    /// Calls sent and not answered, by call id.
    in_flight: HashMap<u64, OutCall>,
    generation: u64,
    /// The instance was told to stop by this process.
    terminating: bool,
    /// This process is finalizing: nothing more is sent.
    stopped_sending: bool,
    /// The node said FAILED: the instance is being restarted (here or on another node), so
    /// calls wait up to [`RESTART_WAIT`] for it to run again.
    restarting: bool,
    /// Calls keep submission order; else each is sent once its own arguments are ready
    /// (`need_order = Some(false)`).
    ordered: bool,
    /// The runtime address of the latest connection.
    address: Option<String>,
    /// Finds the instance again when no node tells this caller what became of it.
    relocator: Option<Arc<dyn Relocate>>,
    /// The relocator is asking where the instance runs.
    relocating: bool,
}

/// A remote instance, as seen by this caller.
pub struct RemoteInstance {
    /// The instance id.
    pub id: String,
    io: tokio::runtime::Handle,
    state: Mutex<State>,
    observer: Option<Arc<dyn InstanceObserver>>,
}

impl RemoteInstance {
    /// An instance that is not running yet.
    pub fn new(
        id: String,
        io: tokio::runtime::Handle,
        observer: Option<Arc<dyn InstanceObserver>>,
    ) -> Arc<RemoteInstance> {
        Arc::new(RemoteInstance {
            id,
            io,
            state: Mutex::new(State {
                connection: Connection::Waiting,
                queued: VecDeque::new(),
                in_flight: HashMap::new(),
                generation: 0,
                terminating: false,
                stopped_sending: false,
                restarting: false,
                ordered: true,
                address: None,
                relocator: None,
                relocating: false,
            }),
            observer,
        })
    }

    /// Send each call once its own arguments are ready, even before earlier calls
    /// (`need_order = Some(false)`).
    pub fn set_unordered(&self) {
        self.state.lock().ordered = false;
    }

    /// No node tells this caller of the instance's restarts and moves: `relocator` finds it
    /// again when the connection breaks (`None`: a node tells it now).
    pub fn set_relocator(&self, relocator: Option<Arc<dyn Relocate>>) {
        self.state.lock().relocator = relocator;
    }

    /// The relocator's answer: the instance runs at `address` now (or, when `notifies`, the
    /// node tells this caller about it from now on).
    pub fn relocated(self: &Arc<Self>, address: String, notifies: bool) {
        {
            let mut state = self.state.lock();
            state.relocating = false;
            if notifies {
                state.relocator = None;
            }
        }
        self.on_running(address);
    }

    /// Submit a call. It is sent once its dependencies and every earlier call are ready (once
    /// its own dependencies are, for an unordered instance). On an
    /// instance that failed, the call fails with the instance's error (seen on `get`, like
    /// any other failure of the call); on one this process terminates, it is refused (1007).
    pub fn submit(self: &Arc<Self>, call: OutCall) -> Result<(), Error> {
        match self.try_submit(call) {
            Ok(()) => Ok(()),
            Err((call, error)) if !self.is_terminating() => {
                call.fail(&error);
                Ok(())
            }
            Err((_, error)) => Err(error),
        }
    }

    /// Submit a call, or give it back with the reason if the instance cannot take it. A call
    /// to an unreachable instance connects again.
    pub fn try_submit(self: &Arc<Self>, call: OutCall) -> Result<(), (OutCall, Error)> {
        let args = call.args.clone();
        let call_id = call.call_id;
        let reconnect = {
            let mut state = self.state.lock();
            if let Connection::Failed(error) = &state.connection {
                let error = error.clone();
                return Err((call, error));
            }
            if state.terminating {
                return Err((call, self.exited_error()));
            }
            state.queued.push_back(call);
            let address = match (&state.connection, &state.address) {
                (Connection::Unreachable, Some(address)) => Some(address.clone()),
                _ => None,
            };
            if address.is_some() {
                state.connection = Connection::Waiting;
            }
            address
        };
        if let Some(address) = reconnect {
            tracing::debug!(instance = %self.id, %address, "connecting again to an unreachable instance");
            self.on_running(address);
        }
        let instance = Arc::downgrade(self);
        dependencies::when_ready(&args, move || {
            if let Some(instance) = instance.upgrade() {
                instance.mark_ready(call_id);
            }
        });
        Ok(())
    }

    fn exited_error(&self) -> Error {
        crate::function::instance_exited(&self.id)
    }

    fn mark_ready(&self, call_id: u64) {
        let failed = {
            let mut state = self.state.lock();
            if let Some(call) = state.queued.iter_mut().find(|c| c.call_id == call_id) {
                call.ready = true;
            }
            Self::pump(&mut state)
        };
        fail_all(failed);
    }

    /// Send queued calls from the head while they are ready and a connection is open. Returns
    /// the calls that cannot be sent (a failed dependency, arguments that do not encode), for
    /// the caller to fail once the state is unlocked: failing a call runs the callbacks of
    /// calls that depend on it, which may submit to this instance again.
    #[must_use]
    fn pump(state: &mut State) -> Vec<(OutCall, Error)> {
        let mut failed = Vec::new();
        if state.stopped_sending {
            return failed;
        }
        let Connection::Open { sender, .. } = &state.connection else {
            return failed;
        };
        let sender = sender.clone();
        // Ordered: from the head while calls are ready. Unordered: every ready call.
        let mut next = 0;
        loop {
            match state.queued.get(next) {
                None => break,
                Some(call) if !call.ready => {
                    if state.ordered {
                        break;
                    }
                    next += 1;
                    continue;
                }
                Some(_) => {}
            }
            let Some(mut call) = state.queued.remove(next) else {
                break;
            };
            match dependencies::first_failure(&call.args).and_then(|()| args_to_proto(&call.args)) {
                Err(error) => failed.push((call, error)),
                Ok(args) => {
                    let request = pb::CallRequest {
                        call_id: call.call_id,
                        instance_id: String::new(),
                        kind: call.kind as i32,
                        function: call.function.to_string(),
                        args,
                        return_nums: call.returns.len() as u32,
                        reply_pool_id: super::shared_memory::pool_id(),
                        reply_pid: std::process::id(),
                        force: false,
                        recursive: false,
                    };
                    tracing::debug!(
                        call_id = call.call_id,
                        function = call.function,
                        "call sent"
                    );
                    // Nagle's rule: a call to an idle instance is written now; calls behind
                    // others in flight go out together on the poller's next turn.
                    let sent = if state.in_flight.is_empty() {
                        sender.send(&request)
                    } else {
                        sender.send_soon(&request)
                    };
                    if sent.is_err() {
                        // Sent again later, and counted again then.
                        unsend_args(&request.args);
                        state.queued.insert(next, call);
                        return failed;
                    }
                    call.sent_at = Some(Instant::now());
                    state.in_flight.insert(call.call_id, call);
                }
            }
        }
        failed
    }

    /// The node says the instance runs at `address`: connect and send what waits, replaying
    /// calls that were in flight on a previous connection. A runtime on another host is
    /// connected to from a thread of its own: a TCP connection (and TLS) may take a network
    /// round trip, which must not hold the IO thread that delivered the news.
    pub fn on_running(self: &Arc<Self>, address: String) {
        tracing::debug!(instance = %self.id, %address, "instance running");
        let remote = super::endpoints::call_route(&address).is_ok_and(|route| route.is_remote());
        if remote {
            let instance = self.clone();
            let spawned = std::thread::Builder::new()
                .name("yr-call-connect".to_string())
                .spawn(move || instance.connect_to(address));
            if let Err(error) = spawned {
                self.on_failed(Error::new(
                    ErrorCode::RequestBetweenRuntimeBus,
                    format!(
                        "cannot start a thread to connect to instance {}: {error}",
                        self.id
                    ),
                ));
            }
            return;
        }
        self.connect_to(address);
    }

    fn connect_to(self: &Arc<Self>, address: String) {
        let (generation, same_runtime) = {
            let mut state = self.state.lock();
            let same_runtime = state.address.as_deref() == Some(address.as_str());
            match state.connection {
                Connection::Failed(_) => return,
                // Told again where it already streams to: nothing changed.
                Connection::Open { .. } if same_runtime => return,
                _ => {}
            }
            state.generation += 1;
            state.connection = Connection::Waiting;
            state.restarting = false;
            state.address = Some(address.clone());
            (state.generation, same_runtime)
        };
        let (sender, results) = match call_channel::connect(&address) {
            Ok(halves) => halves,
            Err(error) => {
                // The node, not this caller, says whether the instance ended.
                self.on_unreachable(generation, error);
                return;
            }
        };
        // Fault tests: the restarted runtime cannot be reached for the replay (`return`), or
        // the replay waits (`pause`, no lock held) until the test lets it go.
        fail::fail_point!(
            "runtime::call_replay",
            !self.state.lock().in_flight.is_empty(),
            |_| {
                sender.close();
                self.on_failed(Error::new(
                    ErrorCode::RequestBetweenRuntimeBus,
                    format!(
                        "cannot replay the calls in flight on the restarted instance {} (a fail \
                     point); please retry",
                        self.id
                    ),
                ));
            }
        );
        {
            let mut state = self.state.lock();
            if state.generation != generation || matches!(state.connection, Connection::Failed(_)) {
                return;
            }
            // Calls in flight on a previous connection are replayed first, in call order, on
            // a restarted instance (a new runtime). The same runtime may have run them: they
            // fail with 3001 instead of running twice.
            let mut replay: Vec<OutCall> = state.in_flight.drain().map(|(_, c)| c).collect();
            replay.sort_by_key(|c| c.call_id);
            let mut failed = Vec::new();
            if same_runtime {
                let error = self.interrupted_error("its connection broke while they ran");
                failed.extend(replay.into_iter().map(|call| (call, error.clone())));
            } else {
                for call in replay.into_iter().rev() {
                    state.queued.push_front(call);
                }
            }
            state.connection = Connection::Open {
                sender: sender.clone(),
            };
            failed.extend(Self::pump(&mut state));
            drop(state);
            fail_all(failed);
        }
        if let Some(observer) = &self.observer {
            observer.on_ready();
        }
        let receiving = self.clone();
        let closing = self.clone();
        let watched = call_channel::watch(
            results,
            move |result: pb::CallResult| receiving.on_call_result(result),
            move |reason| {
                sender.close();
                closing.on_disconnected(generation, reason);
            },
        );
        if let Err(error) = watched {
            self.on_failed(error);
        }
    }

    fn on_call_result(&self, result: pb::CallResult) {
        tracing::debug!(instance = %self.id, call_id = result.call_id, "call result");
        let call = self.state.lock().in_flight.remove(&result.call_id);
        let Some(call) = call else {
            discard_result(result);
            return;
        };
        let Some(observer) = &self.observer else {
            finish_returns(&call.returns, result);
            return;
        };
        if !observer.on_result(&call, &result) {
            finish_returns(&call.returns, result);
        }
        observer.on_ready();
    }

    fn on_disconnected(self: &Arc<Self>, generation: u64, reason: String) {
        {
            let mut state = self.state.lock();
            if state.generation != generation {
                return;
            }
            if let Connection::Open { .. } = state.connection {
                state.connection = Connection::Waiting;
            }
            // No node tells this caller what became of the instance: ask where it runs now,
            // whether or not calls wait (later calls need the answer too).
            let relocate = match (&state.relocator, &state.address) {
                (Some(relocator), Some(address))
                    if !state.relocating && !state.terminating && !state.stopped_sending =>
                {
                    Some((relocator.clone(), address.clone()))
                }
                _ => None,
            };
            if relocate.is_some() {
                state.relocating = true;
                state.restarting = true;
            }
            let idle = state.in_flight.is_empty() && state.queued.is_empty();
            drop(state);
            if let Some((relocator, address)) = relocate {
                relocator.relocate(self.clone(), address);
            }
            if idle {
                return;
            }
        }
        // Wait for the node's verdict; without one, the calls fail with 3001. A restart the
        // node announced (FAILED) is waited for longer.
        let instance = Arc::downgrade(self);
        let id = self.id.clone();
        self.io.spawn(async move {
            tokio::time::sleep(VERDICT_WAIT).await;
            let mut waited = VERDICT_WAIT;
            loop {
                let Some(instance) = Weak::upgrade(&instance) else {
                    return;
                };
                let (still_waiting, restarting) = {
                    let state = instance.state.lock();
                    (
                        state.generation == generation
                            && matches!(state.connection, Connection::Waiting),
                        state.restarting,
                    )
                };
                if !still_waiting {
                    return;
                }
                if restarting && waited < RESTART_WAIT {
                    drop(instance);
                    tokio::time::sleep(VERDICT_WAIT).await;
                    waited += VERDICT_WAIT;
                    continue;
                }
                let error = if restarting {
                    Error::new(
                        ErrorCode::RequestBetweenRuntimeBus,
                        format!(
                            "instance {id} was being restarted and did not run again within \
                             {RESTART_WAIT:?} ({reason}); please retry"
                        ),
                    )
                } else {
                    instance.interrupted_error(&reason)
                };
                instance.on_unreachable(generation, error);
                return;
            }
        });
    }

    /// The node says the instance FAILED and is being restarted (on its node, or on another
    /// after its node was lost): calls in flight and queued wait for it to run again, and are
    /// replayed there.
    pub fn on_restarting(&self) {
        let mut state = self.state.lock();
        if !matches!(state.connection, Connection::Failed(_)) {
            state.restarting = true;
        }
    }

    /// 3001 for calls whose connection with the runtime broke for `reason`.
    fn interrupted_error(&self, reason: &str) -> Error {
        Error::new(
            ErrorCode::RequestBetweenRuntimeBus,
            format!(
                "connection with the runtime of instance {} was interrupted ({reason}); please \
                 retry",
                self.id
            ),
        )
    }

    /// The node says the instance is gone: fail everything with `error`.
    pub fn on_failed(&self, error: Error) {
        let (queued, in_flight, first) = {
            let mut state = self.state.lock();
            // The first failure is the cause; later ones (the runtime being reaped) keep it.
            let first = !matches!(state.connection, Connection::Failed(_));
            let gone_before = matches!(state.connection, Connection::Unreachable);
            if first {
                state.connection = Connection::Failed(error.clone());
            }
            (
                std::mem::take(&mut state.queued),
                std::mem::take(&mut state.in_flight),
                first && !gone_before,
            )
        };
        self.fail_calls(first, queued, in_flight, &error);
    }

    /// No node said what became of the instance, and the connection of `generation` cannot
    /// reach its runtime: the calls waiting fail with `error` (3001), and the next call
    /// connects again. Observers (a stateless pool) count it as gone.
    fn on_unreachable(&self, generation: u64, error: Error) {
        let (queued, in_flight) = {
            let mut state = self.state.lock();
            if state.generation != generation || !matches!(state.connection, Connection::Waiting) {
                return;
            }
            tracing::info!(instance = %self.id, %error, "instance unreachable; the next call connects again");
            state.connection = Connection::Unreachable;
            state.restarting = false;
            (
                std::mem::take(&mut state.queued),
                std::mem::take(&mut state.in_flight),
            )
        };
        self.fail_calls(true, queued, in_flight, &error);
    }

    /// Fail `queued` and `in_flight` calls with `error`, telling the observer the instance is
    /// gone first when `gone`.
    fn fail_calls(
        &self,
        gone: bool,
        queued: VecDeque<OutCall>,
        in_flight: HashMap<u64, OutCall>,
        error: &Error,
    ) {
        if gone {
            if let Some(observer) = &self.observer {
                observer.on_gone(error);
            }
        }
        for call in queued.iter().chain(in_flight.values()) {
            if let Some(observer) = &self.observer {
                let result = pb::CallResult {
                    call_id: call.call_id,
                    values: Vec::new(),
                    error: Some(yr_proto::error_to_proto(error)),
                };
                if observer.on_result(call, &result) {
                    continue;
                }
            }
            call.fail(error);
        }
    }

    /// `yr::cancel` of the call `call_id`, whose results are failed already: a call not sent
    /// yet is never sent; one in flight is cancelled in the runtime as `how` says (dropped
    /// there if it has not started; its children cancelled with `recursive`), and its result
    /// still comes back when it ends.
    pub fn cancel_call(&self, call_id: u64, how: Cancel) {
        let mut state = self.state.lock();
        if let Some(position) = state.queued.iter().position(|c| c.call_id == call_id) {
            let unsent = state.queued.remove(position);
            drop(state);
            drop(unsent);
            return;
        }
        if !state.in_flight.contains_key(&call_id) {
            return;
        }
        let Connection::Open { sender } = &state.connection else {
            // Replayed on a new connection, if any, and then cancelled no more.
            return;
        };
        let request = pb::CallRequest {
            call_id,
            kind: pb::CallKind::Cancel as i32,
            force: how.force,
            recursive: how.recursive,
            ..Default::default()
        };
        if let Err(error) = sender.send(&request) {
            tracing::debug!(instance = %self.id, call_id, %error, "the cancel of a call was not sent");
        }
    }

    /// This process is finalizing: send nothing more; what is queued stays queued (and is
    /// failed by `finalize`).
    pub fn stop_sending(&self) {
        self.state.lock().stopped_sending = true;
    }

    /// This process is terminating the instance: refuse new calls.
    pub fn mark_terminating(&self) {
        self.state.lock().terminating = true;
    }

    /// Whether this process already asked the instance to stop.
    pub fn is_terminating(&self) -> bool {
        self.state.lock().terminating
    }

    /// Calls queued or in flight.
    pub fn load(&self) -> usize {
        let state = self.state.lock();
        state.queued.len() + state.in_flight.len()
    }

    /// Calls queued or in flight, and whether other calls may queue behind them: every call
    /// in flight is expected to be short and was sent less than `short` ago.
    pub fn load_and_pipelinable(&self, short: Duration) -> (usize, bool) {
        let state = self.state.lock();
        let now = Instant::now();
        let pipelinable = state.in_flight.values().all(|call| {
            call.expected_short
                && call
                    .sent_at
                    .is_some_and(|sent| now.saturating_duration_since(sent) < short)
        });
        (state.queued.len() + state.in_flight.len(), pipelinable)
    }

    /// Whether calls can be sent now.
    pub fn is_open(&self) -> bool {
        matches!(self.state.lock().connection, Connection::Open { .. })
    }

    /// Whether the instance is gone, or unreachable from here (a pool no longer uses it).
    pub fn is_failed(&self) -> bool {
        matches!(
            self.state.lock().connection,
            Connection::Failed(_) | Connection::Unreachable
        )
    }
}
