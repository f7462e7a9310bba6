//! Relaying an instance this node forwarded to another node: the other node's notifications go
//! to this node's subscribers until the instance ends, and a loss of that node is settled here
//! (docs/design/014-fenced-instance-records.md, docs/design/023-node-loss-recovery.md).
//!
//! When the other node is lost, an instance with restarts left of its `recover_retry_times`
//! is re-created by the master on an alive node under the same id. Its subscribers here are
//! told FAILED at once (so that their calls in flight wait for it instead of failing), then
//! this node follows the instance's record in the meta store (one key watch per moved
//! instance): RUNNING on the new node is relayed with the new runtime's address (the callers
//! replay their calls there), later failures and restarts likewise, and the end of the
//! instance ends the relay. Without restarts left, the callers get the master's FATAL (1007).
//!
//! A broken stream alone ends nothing: the other node may live on behind a cut between it and
//! this node, which the master does not see. Until the master declares that node lost, this
//! node follows the instance's record instead of its stream (its end, restarts and moves are
//! relayed as above), and the callers, who cannot reach the runtime either, get 3001 and
//! connect again at their next call. An instance with restarts left is first told FAILED, as
//! for a loss; if no verdict comes within [`LOSS_WAIT`], its callers are told it runs where it
//! ran, and they too get 3001 until the link is back.

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio_stream::{Stream, StreamExt};
use yr_common::backoff::Backoff;
use yr_common::{Error, ErrorCode};
use yr_meta::WatchEvent;
use yr_proto::error_from_proto;
use yr_proto::v1 as pb;
use yr_proto::v1::InstanceState as S;

use super::{error_notify, Node};
use crate::error::ProxyError;
use crate::node_losses::LossVerdict;
use crate::record_writer::instance_key;

/// How long after its stream broke the callers of a forwarded instance with restarts left
/// wait for the master to say what became of it (the master's node timeout, a liveness pass
/// and the settling of its records fit well within it) before they are told it runs where it
/// ran.
const LOSS_WAIT: Duration = Duration::from_secs(30);

/// What the relay of a moved instance last told the subscribers.
#[derive(Clone, Debug, PartialEq)]
struct Told {
    state: i32,
    runtime_address: String,
}

impl Node {
    /// Relay `notifications` of `instance_id` from node `node_id` to this node's subscribers
    /// until the instance ends; `lost` resolves when the master declares that node lost.
    pub(super) async fn relay_forwarded(
        self: Arc<Self>,
        instance_id: String,
        node_id: String,
        notifications: impl Stream<Item = Result<pb::InstanceNotify, tonic::Status>> + Unpin,
        lost: impl std::future::Future<Output = LossVerdict>,
    ) {
        let mut notifications = notifications;
        tokio::pin!(lost);
        // What the other node said last: the record's state that is news from here on.
        let mut told: Option<Told> = None;
        loop {
            let next = tokio::select! {
                next = notifications.next() => next,
                verdict = &mut lost => {
                    // A stopped node keeps its connections open: its loss comes from the meta
                    // store.
                    self.settle_loss(&instance_id, verdict).await;
                    return;
                }
            };
            match next {
                Some(Ok(notify)) => {
                    let state = S::try_from(notify.state).unwrap_or(S::Fatal);
                    told = Some(Told {
                        state: notify.state,
                        runtime_address: notify.runtime_address.clone(),
                    });
                    self.instances.with_mut(&instance_id, |i| i.mirror(&notify));
                    self.notify(&instance_id, notify.clone());
                    if matches!(state, S::Exited | S::Fatal) {
                        self.forget_forwarded(&instance_id);
                        return;
                    }
                }
                Some(Err(_)) | None => break,
            }
        }
        // The stream broke: the node died, or the link between it and this node did.
        tracing::info!(instance = %instance_id, node = %node_id, "the stream of a forwarded instance broke; following its record until the master's verdict on the node");
        if self.may_be_rescheduled(&instance_id) {
            let unreachable: Error = ProxyError::NodeUnreachable {
                instance: instance_id.clone(),
                node: node_id.clone(),
            }
            .into();
            self.tell_failed(&instance_id, &unreachable);
            tokio::select! {
                verdict = &mut lost => {
                    self.settle_loss(&instance_id, verdict).await;
                    return;
                }
                () = self.follow_record(&instance_id, told.clone()) => return,
                () = tokio::time::sleep(LOSS_WAIT) => {}
            }
            // No verdict: the master still sees the node; only the link from here broke.
            if let Some(running) = told.as_ref().filter(|t| t.state == S::Running as i32) {
                self.tell_running(&instance_id, &running.runtime_address);
            }
        }
        tokio::select! {
            verdict = lost => self.settle_loss(&instance_id, verdict).await,
            () = self.follow_record(&instance_id, told) => {}
        }
    }

    /// Whether the master may re-create `instance_id` after a loss of its node: it is
    /// stateful, not being killed, and has restarts left as far as this node knows (the
    /// master decides).
    fn may_be_rescheduled(&self, instance_id: &str) -> bool {
        self.instances
            .with(instance_id, |instance| {
                !instance.killing
                    && !instance.record().stateless
                    && instance.record().restarts < instance.options.recover_retry_times
            })
            .unwrap_or(false)
    }

    /// Tell the subscribers the instance runs at `runtime_address`.
    fn tell_running(&self, instance_id: &str, runtime_address: &str) {
        let running = pb::InstanceNotify {
            instance_id: instance_id.to_string(),
            state: S::Running as i32,
            runtime_address: runtime_address.to_string(),
            error: None,
        };
        self.instances.with_mut(instance_id, |i| i.mirror(&running));
        self.notify(instance_id, running);
    }

    /// Tell the subscribers the instance FAILED with `error`: their calls wait for it to run
    /// again.
    fn tell_failed(&self, instance_id: &str, error: &Error) {
        let failed = error_notify(instance_id, S::Failed, error);
        self.instances.with_mut(instance_id, |i| i.mirror(&failed));
        self.notify(instance_id, failed);
    }

    /// The master declared the node of a forwarded instance lost: fail the instance, or follow
    /// it to the node the master re-creates it on.
    async fn settle_loss(self: &Arc<Self>, instance_id: &str, verdict: LossVerdict) {
        match verdict {
            LossVerdict::Failed(error) => {
                self.notify(instance_id, error_notify(instance_id, S::Fatal, &error));
                self.forget_forwarded(instance_id);
            }
            LossVerdict::Rescheduled => {
                tracing::info!(instance = %instance_id, "the master re-creates a forwarded instance on another node; following its record");
                self.follow_record(instance_id, None).await;
            }
        }
    }

    /// Follow the record of a forwarded instance (rescheduled, or whose stream broke) and
    /// relay what it says to the subscribers until the instance ends (or leaves this node's
    /// table: killed, or its job ended); `told` is what they know already.
    async fn follow_record(self: &Arc<Self>, instance_id: &str, told: Option<Told>) {
        let key = instance_key(instance_id);
        let mut told = told;
        let mut backoff = Backoff::reconnect();
        loop {
            // Read the record, then watch from that revision, so no change is missed.
            let revision = match self.meta.current_revision().await {
                Ok(revision) => revision,
                Err(error) => {
                    tracing::debug!(instance = %instance_id, %error, "cannot read the meta store's revision");
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            };
            let record = match self.meta.get(&key).await {
                Ok(kv) => kv.and_then(|kv| pb::InstanceRecord::decode(kv.value).ok()),
                Err(error) => {
                    tracing::debug!(instance = %instance_id, %error, "cannot read a moved instance's record");
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            };
            if self.relay_record(instance_id, record, &mut told).await {
                return;
            }
            match self.meta.watch_prefix(&key, revision).await {
                Ok(mut events) => {
                    backoff.reset();
                    while let Some(event) = events.recv().await {
                        let record = match event {
                            WatchEvent::Put(kv) if kv.key == key => {
                                pb::InstanceRecord::decode(kv.value).ok()
                            }
                            WatchEvent::Delete { key: deleted, .. } if deleted == key => None,
                            _ => continue,
                        };
                        if self.relay_record(instance_id, record, &mut told).await {
                            return;
                        }
                    }
                }
                Err(error) => {
                    tracing::debug!(instance = %instance_id, %error, "cannot watch a moved instance's record");
                }
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// Relay one version of a moved instance's record (`None`: deleted). True when the relay
    /// is over.
    async fn relay_record(
        self: &Arc<Self>,
        instance_id: &str,
        record: Option<pb::InstanceRecord>,
        told: &mut Option<Told>,
    ) -> bool {
        if self.instances.with(instance_id, |_| ()).is_none() {
            return true;
        }
        let Some(record) = record else {
            let error = super::stop::exited_error(instance_id);
            self.notify(instance_id, error_notify(instance_id, S::Exited, &error));
            self.forget_forwarded(instance_id);
            return true;
        };
        let state = S::try_from(record.state).unwrap_or(S::Fatal);
        let error = record
            .error
            .as_ref()
            .map(error_from_proto)
            .unwrap_or_else(|| {
                Error::new(
                    ErrorCode::InstanceExited,
                    format!("instance {instance_id} ended on node {}", record.node_id),
                )
            });
        match state {
            S::Running => {
                let now = Told {
                    state: record.state,
                    runtime_address: record.runtime_address.clone(),
                };
                if told.as_ref() == Some(&now) || record.runtime_address.is_empty() {
                    return false;
                }
                let address = self.node_address(&record.node_id).await;
                let notify = pb::InstanceNotify {
                    instance_id: instance_id.to_string(),
                    state: S::Running as i32,
                    runtime_address: record.runtime_address.clone(),
                    error: None,
                };
                self.instances.with_mut(instance_id, |i| {
                    if let Some(address) = &address {
                        i.forward_to(&record.node_id, address);
                    }
                    i.mirror(&notify);
                });
                tracing::info!(instance = %instance_id, node = %record.node_id, "a moved instance runs again");
                self.notify(instance_id, notify);
                *told = Some(now);
                false
            }
            S::Failed | S::Scheduling if state == S::Failed || record.written_by_master => {
                let now = Told {
                    state: S::Failed as i32,
                    runtime_address: String::new(),
                };
                if told.as_ref() != Some(&now) {
                    self.tell_failed(instance_id, &error);
                    *told = Some(now);
                }
                false
            }
            S::Fatal | S::ScheduleFailed | S::Exited | S::Evicted => {
                self.notify(instance_id, error_notify(instance_id, state, &error));
                self.forget_forwarded(instance_id);
                true
            }
            _ => false,
        }
    }

    /// The Node service address of `node_id`, from its record in the meta store.
    async fn node_address(&self, node_id: &str) -> Option<String> {
        let kv = self
            .meta
            .get(&format!("/yr/node/{node_id}"))
            .await
            .ok()
            .flatten()?;
        pb::NodeInfo::decode(kv.value).ok().map(|info| info.address)
    }
}
