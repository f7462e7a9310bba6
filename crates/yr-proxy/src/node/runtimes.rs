//! What runtimes tell the node: heartbeats and their answers, init results, that an instance
//! blocked in `get`/`wait` (its CPU is lent back) or resumed, and that a runtime process ended.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use yr_agent::RuntimeEvent;
use yr_common::Clock;
use yr_proto::v1 as pb;
use yr_proto::v1::InstanceState as S;

use super::stop::exited_error;
use super::Node;
use crate::error::ProxyError;

/// When the node's heartbeat rounds ran, on a [`Clock`]: a round that comes more than a
/// runtime heartbeat timeout after the previous one shows that the node itself did not run.
pub(super) struct HeartbeatRounds {
    clock: Arc<dyn Clock>,
    last: Mutex<Instant>,
}

impl HeartbeatRounds {
    /// Rounds timed by `clock`, the first counted from now.
    pub(super) fn new(clock: Arc<dyn Clock>) -> HeartbeatRounds {
        let last = Mutex::new(clock.now());
        HeartbeatRounds { clock, last }
    }

    /// A round runs now: the gap since the previous round if it is longer than `timeout`
    /// (the node did not run for that long), else `None`.
    pub(super) fn round(&self, timeout: Duration) -> Option<Duration> {
        let now = self.clock.now();
        let previous = std::mem::replace(&mut *self.last.lock(), now);
        let gap = now.saturating_duration_since(previous);
        (gap > timeout).then_some(gap)
    }

    /// The time on the rounds' clock.
    pub(super) fn now(&self) -> Instant {
        self.clock.now()
    }
}

impl Node {
    /// A runtime answered a heartbeat.
    pub fn heartbeat_ack(&self, client_id: u64) {
        if let Some(runtime_id) = self.bus.runtime_id(client_id) {
            self.runtimes.heartbeat_ack(&runtime_id);
        }
    }

    /// A runtime answered its init call.
    pub fn init_result(&self, client_id: u64, result: pb::InitResult) {
        if let Some(runtime_id) = self.bus.runtime_id(client_id) {
            self.runtimes.init_result(&runtime_id, result);
        }
    }

    /// The instance that the runtime on bus session `client_id` serves.
    fn instance_of_client(&self, client_id: u64) -> Option<String> {
        self.bus
            .runtime_id(client_id)
            .and_then(|runtime_id| self.runtimes.instance_of(&runtime_id))
    }

    /// The instance of runtime `client_id` blocked in `get`/`wait` (`blocked`), or resumed.
    /// While blocked, the CPU it holds goes back to the scheduler, so the tasks it waits for
    /// can run; on resuming it takes the CPU again.
    pub fn wait_state(&self, client_id: u64, blocked: bool) {
        let Some(instance_id) = self.instance_of_client(client_id) else {
            return;
        };
        let change = self
            .instances
            .with_mut(&instance_id, |instance| {
                let held = instance.allocated.as_ref().map(|a| a.cpu).unwrap_or(0);
                match (blocked, instance.lent_cpu) {
                    (true, 0) if held > 0 => {
                        instance.lent_cpu = held;
                        Some((true, held))
                    }
                    (false, lent) if lent > 0 => {
                        instance.lent_cpu = 0;
                        Some((false, lent))
                    }
                    _ => None,
                }
            })
            .flatten();
        match change {
            Some((true, cpu)) => self.scheduler.lend_cpu(cpu),
            Some((false, cpu)) => self.scheduler.reclaim_cpu(cpu),
            None => {}
        }
    }

    /// The runtime of `client_id` evicted its instance, idle for its `idle_timeout_s`:
    /// EVICTING → EVICTED with `reason` (1013) told to its callers, then killed as usual.
    pub fn evict(self: &Arc<Self>, client_id: u64, reason: yr_common::Error) {
        let Some(instance_id) = self.instance_of_client(client_id) else {
            return;
        };
        // Only a running instance is evicted (one being killed meanwhile just ends).
        let running = self.instances.with(&instance_id, |i| i.state()) == Some(S::Running);
        if !running
            || self
                .instances
                .transition(&instance_id, S::Evicting, None)
                .is_err()
        {
            return;
        }
        tracing::info!(instance = %instance_id, %reason, "instance evicted");
        let _ = self
            .instances
            .transition(&instance_id, S::Evicted, Some(&reason));
        self.notify(
            &instance_id,
            super::error_notify(&instance_id, S::Evicted, &reason),
        );
        let node = self.clone();
        tokio::spawn(async move {
            let _ = node.kill(&instance_id, false).await;
        });
    }

    /// Send heartbeats; kill runtimes that stopped answering. A round that comes more than a
    /// heartbeat timeout after the previous one means the node itself did not run (stopped, or
    /// starved): its runtimes' silence is then not theirs, and they get a fresh timeout.
    pub fn heartbeat_round(&self) {
        if let Some(gap) = self.heartbeat_rounds.round(self.settings.heartbeat_timeout) {
            tracing::warn!(
                ?gap,
                "the node did not run for longer than the runtime heartbeat timeout; restarting every runtime's timeout"
            );
            self.runtimes.forgive_silence();
        }
        let round = self.runtimes.heartbeat_round(
            self.heartbeat_rounds.now(),
            self.settings.heartbeat_timeout,
            heartbeat_turns(self.settings.heartbeat_interval),
        );
        for client_id in round.beat {
            self.bus.send(
                client_id,
                0,
                pb::bus_response::Body::Heartbeat(pb::Heartbeat {}),
            );
        }
        for runtime_id in round.hung {
            tracing::warn!(runtime = %runtime_id, "runtime missed its heartbeats; killing it");
            self.runtimes.signal(&runtime_id, libc::SIGCONT);
            self.runtimes.signal(&runtime_id, libc::SIGKILL);
        }
    }

    /// A runtime process ended.
    pub async fn on_runtime_exit(self: &Arc<Self>, event: RuntimeEvent) {
        let Some(ended) = self.runtimes.ended(&event.runtime_id, &event.stderr_tail) else {
            return;
        };
        let Some(instance_id) = ended.instance_id else {
            if !event.cause.is_clean_exit() {
                tracing::warn!(runtime = %event.runtime_id, cause = %event.cause, stderr = %event.stderr_tail, "a warm runtime ended");
            }
            return;
        };
        let speaks = self.instances.with(&instance_id, |instance| {
            // Only the instance's current runtime speaks for it: a runtime the node killed
            // itself (a failed constructor, a restart) or that never connected (its start
            // failure is reported where it was awaited) is not news.
            let current = instance.runtime_id.as_deref() == Some(event.runtime_id.as_str());
            let killed_before_start = instance.killing && instance.runtime_id.is_none();
            (current || killed_before_start).then_some((instance.killing, instance.state()))
        });
        let Some(Some((killing, state_now))) = speaks else {
            return;
        };
        if killing {
            self.release(&instance_id);
            self.finish_exit(&instance_id, &exited_error(&instance_id));
            return;
        }
        if state_now == S::Fatal {
            // The instance already failed (for example its constructor), and this is the node
            // killing its runtime: callers keep the first error.
            return;
        }
        let error = if ended.hung {
            ProxyError::RuntimeHung {
                instance: instance_id.clone(),
                timeout: self.settings.heartbeat_timeout,
            }
        } else if event.cause.is_clean_exit() && state_now == S::Running {
            ProxyError::RuntimeExited {
                instance: instance_id.clone(),
                cause: event.cause.to_string(),
            }
        } else if !ended.registered {
            ProxyError::RuntimeStart {
                runtime: event.runtime_id.clone(),
                instance: instance_id.clone(),
                why: format!(
                    "{}; its stderr ends with:\n{}",
                    event.cause, event.stderr_tail
                ),
            }
        } else {
            ProxyError::RuntimeCrashed {
                instance: instance_id.clone(),
                cause: event.cause.to_string(),
                stderr: event.stderr_tail.clone(),
            }
        };
        self.fail_instance(&instance_id, error.into()).await;
    }
}

/// How many heartbeats the node sends in a second at most, to all its runtimes together. Each
/// costs the node a message and the runtime a wakeup, so with more runtimes than this each is
/// asked less often than every round, and bursts of creates are not slowed by the runtimes
/// already living.
pub const HEARTBEATS_PER_SECOND: f64 = 500.0;

/// Heartbeats in one round every `interval`.
fn heartbeat_turns(interval: Duration) -> usize {
    (HEARTBEATS_PER_SECOND * interval.as_secs_f64())
        .ceil()
        .max(1.0) as usize
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use yr_common::clock::ManualClock;

    use super::HeartbeatRounds;

    const TIMEOUT: Duration = Duration::from_secs(5);

    #[test]
    fn rounds_within_the_timeout_of_each_other_show_no_gap() {
        let clock = ManualClock::new();
        let rounds = HeartbeatRounds::new(clock.clone());
        for _ in 0..10 {
            clock.advance(Duration::from_secs(1));
            assert_eq!(rounds.round(TIMEOUT), None);
        }
        // Exactly the timeout is not yet a gap.
        clock.advance(TIMEOUT);
        assert_eq!(rounds.round(TIMEOUT), None);
    }

    #[test]
    fn a_round_later_than_the_timeout_shows_the_node_did_not_run_once() {
        let clock = ManualClock::new();
        let rounds = HeartbeatRounds::new(clock.clone());
        clock.advance(TIMEOUT + Duration::from_millis(1));
        assert_eq!(
            rounds.round(TIMEOUT),
            Some(TIMEOUT + Duration::from_millis(1))
        );
        // The next round is timed from that one.
        clock.advance(Duration::from_secs(1));
        assert_eq!(rounds.round(TIMEOUT), None);
    }
}
