//! Ending instances: kills (shutdown hook within the grace period, then the process), the end
//! of a job, failures (FATAL, or FAILED and a restart within `recover_retry_times`), and what
//! an exit leaves: the record deleted, subscribers and waiters told, resources and attached
//! children released.

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::oneshot;
use yr_common::{Error, ErrorCode};
use yr_proto::v1 as pb;
use yr_proto::v1::InstanceState as S;

use super::{error_notify, Node};
use crate::error::ProxyError;
use crate::record_writer::instance_key;

/// How a kill finds the instance's runtime.
struct KillPlan {
    /// The runtime, and its bus client unless a kill already told it.
    runtime: Option<(String, Option<u64>)>,
    grace: Duration,
    exited: oneshot::Receiver<()>,
    terminal: bool,
    /// NEW: created, its start not run yet.
    not_started: bool,
    already: bool,
}

/// How long a waiting kill of a forwarded instance waits, after the other node's answer, for
/// the relay to say the instance exited.
const RELAYED_EXIT_WAIT: Duration = Duration::from_secs(5);

/// Where a kill may go from this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KillReach {
    /// A client's kill: to the node that runs the instance, if another does.
    AnyNode,
    /// A kill that another node sent here: only an instance that runs here. A kill is forwarded
    /// at most once, so stale views of two nodes (each thinking the other runs it) cannot send
    /// it back and forth.
    HereOnly,
}

impl Node {
    /// Kill an instance: shutdown hook within its grace period, then the process.
    pub async fn kill(self: &Arc<Self>, instance_id: &str, wait: bool) -> Result<(), Error> {
        self.kill_within(instance_id, wait, KillReach::AnyNode)
            .await
    }

    /// [`Node::kill`], forwarding it to another node only as `reach` allows.
    pub async fn kill_within(
        self: &Arc<Self>,
        instance_id: &str,
        wait: bool,
        reach: KillReach,
    ) -> Result<(), Error> {
        if instance_id.is_empty() {
            return Err(ProxyError::EmptyId.into());
        }
        let forwarded = self
            .instances
            .with(instance_id, |i| i.forwarded_to.clone())
            .flatten();
        if forwarded.is_some() && reach == KillReach::HereOnly {
            return Err(ProxyError::NotHere(instance_id.to_string()).into());
        }
        if let Some(address) = forwarded {
            // The relay forgets the mirror here when the other node says the instance exited:
            // a kill that waits also waits for that (bounded), so that a lookup or a list on
            // this node right after it does not find the instance.
            let relayed = wait
                .then(|| {
                    self.instances.with_mut(instance_id, |instance| {
                        let (sender, relayed) = oneshot::channel();
                        instance.exit_waiters.push(sender);
                        relayed
                    })
                })
                .flatten();
            self.kill_remote(&address, instance_id, wait).await?;
            if let Some(relayed) = relayed {
                let _ = tokio::time::timeout(RELAYED_EXIT_WAIT, relayed).await;
            }
            return Ok(());
        }
        let plan = self.instances.with_mut(instance_id, |instance| {
            let (sender, exited) = oneshot::channel();
            instance.exit_waiters.push(sender);
            let already = std::mem::replace(&mut instance.killing, true);
            instance.cancel.notify_one();
            KillPlan {
                runtime: instance.runtime_id.clone().map(|id| (id, None)),
                grace: instance.options.graceful_shutdown_time(),
                exited,
                terminal: matches!(instance.state(), S::Fatal | S::ScheduleFailed),
                not_started: instance.state() == S::New,
                already,
            }
        });
        let Some(mut plan) = plan else {
            if reach == KillReach::HereOnly {
                return Err(ProxyError::NotHere(instance_id.to_string()).into());
            }
            return self.kill_elsewhere(instance_id, wait).await;
        };
        if let Some((runtime_id, client)) = &mut plan.runtime {
            if !plan.already {
                *client = self.runtimes.client_of(runtime_id);
            }
        }
        if !plan.already {
            // An instance whose start has not run yet (NEW) has no state to move through: it
            // leaves the table, and its start finds it gone.
            if !plan.not_started {
                if let Err(error) = self.instances.transition(instance_id, S::Exiting, None) {
                    if !plan.terminal && error.code() != ErrorCode::StateMachineError {
                        tracing::warn!(instance = %instance_id, %error, "kill");
                    }
                }
            }
            match plan.runtime {
                // A runtime paused by the self-fence cannot run its shutdown hook, and must not
                // be resumed to (the instance may run elsewhere by now): it is killed at once.
                Some((runtime_id, _)) if self.runtimes.is_paused(&runtime_id) => {
                    tracing::info!(instance = %instance_id, runtime = %runtime_id,
                        "killing a paused runtime (the node is fenced) without its shutdown hook");
                    self.runtimes.signal(&runtime_id, libc::SIGKILL);
                }
                Some((runtime_id, client)) => {
                    if let Some(client_id) = client {
                        self.bus.send(
                            client_id,
                            0,
                            pb::bus_response::Body::Shutdown(pb::Shutdown {
                                grace_period_ms: plan.grace.as_millis() as u64,
                            }),
                        );
                    }
                    let node = self.clone();
                    let instance_id = instance_id.to_string();
                    let grace = plan.grace;
                    tokio::spawn(async move {
                        tokio::time::sleep(grace + Duration::from_secs(1)).await;
                        if node.runtimes.signal(&runtime_id, libc::SIGKILL) {
                            tracing::info!(instance = %instance_id, "runtime outlived its grace period; killed");
                        }
                    });
                }
                None => {
                    self.release(instance_id);
                    self.finish_exit(instance_id, &exited_error(instance_id));
                }
            }
        }
        if wait {
            let _ = tokio::time::timeout(plan.grace + Duration::from_secs(5), plan.exited).await;
        }
        Ok(())
    }

    /// Kill an instance that another node runs, found through the meta store.
    async fn kill_elsewhere(&self, instance_id: &str, wait: bool) -> Result<(), Error> {
        let not_found = || Error::from(ProxyError::NotFound(instance_id.to_string()));
        let bad = |key: String, e: prost::DecodeError| {
            Error::from(ProxyError::BadRecord {
                key,
                reason: e.to_string(),
            })
        };
        let key = instance_key(instance_id);
        let record = match self.meta.get(&key).await {
            Ok(Some(kv)) => pb::InstanceRecord::decode(kv.value).map_err(|e| bad(key, e))?,
            Ok(None) => return Err(not_found()),
            Err(error) => return Err(error.into()),
        };
        if record.node_id == self.settings.node_id {
            return Err(not_found());
        }
        let key = format!("/yr/node/{}", record.node_id);
        let node = match self.meta.get(&key).await {
            Ok(Some(kv)) => pb::NodeInfo::decode(kv.value).map_err(|e| bad(key, e))?,
            Ok(None) => return Err(not_found()),
            Err(error) => return Err(error.into()),
        };
        self.kill_remote(&node.address, instance_id, wait).await
    }

    async fn kill_remote(&self, address: &str, instance_id: &str, wait: bool) -> Result<(), Error> {
        let channel = yr_transport::connect(address, ErrorCode::InnerCommunication).await?;
        pb::node_client::NodeClient::new(channel)
            .kill(pb::KillRequest {
                instance_id: instance_id.to_string(),
                wait,
                job_id: String::new(),
                force: false,
            })
            .await
            .map(|_| ())
            .map_err(|status| {
                ProxyError::RemoteKill {
                    address: address.to_string(),
                    instance: instance_id.to_string(),
                    message: status.message().to_string(),
                    code: yr_transport::status_to_code(&status, ErrorCode::InnerCommunication),
                }
                .into()
            })
    }

    /// Kill every instance of `job_id` that is not detached (`finalize`, or the driver left).
    pub async fn kill_job(self: &Arc<Self>, job_id: &str, wait: bool) {
        let mut waits = Vec::new();
        for id in self.instances.attached_of_job(job_id) {
            let node = self.clone();
            waits.push(tokio::spawn(async move { node.kill(&id, wait).await }));
        }
        for handle in waits {
            let _ = handle.await;
        }
    }

    fn kill_children(self: &Arc<Self>, parent: &str) {
        for child in self.instances.children(parent) {
            let node = self.clone();
            tokio::spawn(async move {
                let _ = node.kill(&child, false).await;
            });
        }
    }

    /// Give back what the instance holds of this node's resources (less the CPU it lent while
    /// blocked, which is back already).
    pub(super) fn release(&self, instance_id: &str) {
        let held = self
            .instances
            .with_mut(instance_id, |i| {
                let lent = std::mem::take(&mut i.lent_cpu);
                i.allocated.take().map(|mut amount| {
                    amount.cpu -= lent.min(amount.cpu);
                    amount
                })
            })
            .flatten();
        if let Some(amount) = held {
            self.scheduler.release(&amount);
        }
    }

    /// The instance failed: FATAL (or FAILED and restarted with `recover_retry_times`).
    pub(super) async fn fail_instance(self: &Arc<Self>, instance_id: &str, error: Error) {
        let Some((runtime_id, can_recover, killing)) =
            self.instances.with_mut(instance_id, |instance| {
                let can_recover = instance.record().restarts < instance.options.recover_retry_times
                    && !instance.killing
                    && instance.state() == S::Running;
                (instance.runtime_id.take(), can_recover, instance.killing)
            })
        else {
            return;
        };
        if let Some(runtime_id) = runtime_id {
            self.runtimes.signal(&runtime_id, libc::SIGKILL);
        }
        self.release(instance_id);
        if killing {
            self.finish_exit(instance_id, &error);
            return;
        }
        if can_recover {
            tracing::info!(instance = %instance_id, %error, "restarting the instance (recover_retry_times)");
            self.instances.with_mut(instance_id, |i| i.count_restart());
            match self
                .instances
                .transition(instance_id, S::Failed, Some(&error))
            {
                Ok(()) => {
                    self.notify(instance_id, error_notify(instance_id, S::Failed, &error));
                    self.spawn_start(instance_id.to_string());
                    return;
                }
                // Callers get the state machine's error with the failure's.
                Err(illegal) => return self.fatal(instance_id, &with_cause(illegal, &error)),
            }
        }
        tracing::info!(instance = %instance_id, %error, "instance failed");
        self.fatal(instance_id, &error);
    }

    /// FATAL with `error`: subscribers are told, attached children killed.
    fn fatal(self: &Arc<Self>, instance_id: &str, error: &Error) {
        let error = match self
            .instances
            .transition(instance_id, S::Fatal, Some(error))
        {
            Ok(()) => error.clone(),
            Err(illegal) => with_cause(illegal, error),
        };
        self.notify(instance_id, error_notify(instance_id, S::Fatal, &error));
        self.kill_children(instance_id);
    }

    /// The master declared this node lost: fail every instance that runs here with `error`
    /// (1007). Instances forwarded to other nodes are theirs and stay.
    pub fn fence_local_instances(self: &Arc<Self>, error: &Error) {
        for id in self.instances.local_ids() {
            self.on_fenced(&id, error);
        }
    }

    /// `instance_id`'s record is not this node's to write any more (the master wrote it FATAL,
    /// or another incarnation of this node owns it): fail the instance with `error` (1007) for
    /// good (no restart), kill its runtime and tell its subscribers FATAL. The instance leaves
    /// the node once its runtime is gone; its record stays as its owner wrote it.
    pub fn on_fenced(self: &Arc<Self>, instance_id: &str, error: &Error) {
        let runtime_id = self
            .instances
            .with_mut(instance_id, |instance| {
                let ended = matches!(
                    instance.state(),
                    S::Fatal | S::Exited | S::Evicted | S::ScheduleFailed
                );
                if instance.forwarded_to.is_some() || instance.killing || ended {
                    return None;
                }
                instance.killing = true;
                instance.cancel.notify_one();
                Some(instance.runtime_id.take())
            })
            .flatten();
        let Some(runtime_id) = runtime_id else {
            return;
        };
        tracing::warn!(instance = %instance_id, %error, "instance fenced: failing it and killing its runtime");
        // The writer does not write it: the record stays as its owner wrote it.
        if let Err(illegal) = self
            .instances
            .transition(instance_id, S::Fatal, Some(error))
        {
            tracing::error!(instance = %instance_id, %illegal, "fencing");
        }
        self.notify(instance_id, error_notify(instance_id, S::Fatal, error));
        // Released now, so that a registration that follows reports the room.
        self.release(instance_id);
        match runtime_id {
            // Its exit ends the instance here (killing, no runtime).
            Some(runtime_id) => {
                self.runtimes.signal(&runtime_id, libc::SIGKILL);
            }
            // Not started yet: it leaves now, as after a kill (a start in progress finds it
            // gone).
            None => self.finish_exit(instance_id, error),
        }
        self.kill_children(instance_id);
    }

    /// EXITING → EXITED: delete the record, tell everyone, wake the waiters.
    pub(super) fn finish_exit(self: &Arc<Self>, instance_id: &str, error: &Error) {
        let Some(mut instance) = self.instances.remove(instance_id) else {
            return;
        };
        let notify = error_notify(instance_id, S::Exited, error);
        for subscriber in &instance.subscribers {
            self.notify_one(subscriber, notify.clone());
        }
        for waiter in instance.exit_waiters.drain(..) {
            let _ = waiter.send(());
        }
        if instance.forwarded_to.is_none() {
            self.records.delete(instance_id);
        }
        self.kill_children(instance_id);
    }
}

/// The error of an instance that was killed or exited.
pub(super) fn exited_error(instance_id: &str) -> Error {
    ProxyError::Exited(instance_id.to_string()).into()
}

/// `illegal` (a refused transition), saying which failure it was refused for.
fn with_cause(illegal: Error, cause: &Error) -> Error {
    Error::new(
        illegal.code(),
        format!(
            "{} (while recording this failure: {cause})",
            illegal.message()
        ),
    )
}
