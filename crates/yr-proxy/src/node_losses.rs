//! Which other nodes the master declared lost, as far as this node's forwarded instances care.
//!
//! A node that forwarded an instance to another node relays that node's notifications to its
//! own subscribers over a Node.Create stream. A node whose process is stopped keeps its TCP
//! connections open, so the stream does not break: the callers would wait for a verdict that
//! never comes. So this node also follows the node records in the meta store (`/yr/node/`, one
//! prefix watch per node process); when the master writes a node's record as lost, the
//! instances forwarded there are failed (1007) at once. An event costs one map lookup, and one
//! record read per instance forwarded to the lost node.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prost::Message;
use tokio::sync::watch;
use yr_common::backoff::Backoff;
use yr_common::{Error, ErrorCode};
use yr_meta::{KeyValue, MetaStore, WatchEvent};
use yr_proto::error_from_proto;
use yr_proto::v1 as pb;
use yr_proto::v1::InstanceState as S;

use crate::record_writer::instance_key;

/// The meta store prefix of node records (prost `NodeInfo`, written by the master).
const NODE_PREFIX: &str = "/yr/node/";

/// The node records' state of a node the master declared lost.
const LOST: &str = "lost";

/// Losses of the nodes that instances were forwarded to.
pub struct NodeLosses {
    meta: Arc<dyn MetaStore>,
    /// By node id (of nodes this node forwarded instances to): the last incarnation of the node
    /// that the master declared lost, if any.
    nodes: Mutex<HashMap<String, watch::Sender<Option<u64>>>>,
}

impl NodeLosses {
    /// Losses read from `meta`; call [`NodeLosses::follow`] to learn of them.
    pub fn new(meta: Arc<dyn MetaStore>) -> NodeLosses {
        NodeLosses {
            meta,
            nodes: Mutex::new(HashMap::new()),
        }
    }

    /// Follow the node records from now until the process ends.
    pub async fn follow(self: Arc<Self>) {
        let revision = self.meta.current_revision().await.unwrap_or(0);
        self.follow_after(revision).await;
    }

    /// Follow the node records written after `revision` (0: from whenever the watch opens). A
    /// watch that ends (the store forgot the revision to resume from) is opened again after
    /// the records are read once more.
    async fn follow_after(self: Arc<Self>, mut revision: u64) {
        let mut backoff = Backoff::reconnect();
        let mut failing = false;
        loop {
            match self.meta.watch_prefix(NODE_PREFIX, revision).await {
                Ok(mut events) => {
                    if failing {
                        tracing::info!("following node records again");
                        failing = false;
                    }
                    backoff.reset();
                    while let Some(event) = events.recv().await {
                        revision = revision.max(event.revision());
                        if let WatchEvent::Put(kv) = event {
                            self.apply(&kv);
                        }
                    }
                }
                Err(error) if !failing => {
                    tracing::warn!(%error, "cannot follow node records; callers of instances on a lost node learn of it when its connection breaks; retrying");
                    failing = true;
                }
                Err(error) => tracing::debug!(%error, "cannot follow node records yet"),
            }
            tokio::time::sleep(backoff.next_delay()).await;
            // Events may have been missed: read every node record, then watch from before.
            if let Ok(now) = self.meta.current_revision().await {
                if let Ok(records) = self.meta.range(NODE_PREFIX).await {
                    for kv in &records {
                        self.apply(kv);
                    }
                    revision = now;
                }
            }
        }
    }

    /// One node record as written: a lost node wakes the instances forwarded there.
    fn apply(&self, kv: &KeyValue) {
        let Ok(info) = pb::NodeInfo::decode(kv.value.clone()) else {
            return;
        };
        if info.state != LOST {
            return;
        }
        if let Some(sender) = self.nodes.lock().get(&info.node_id) {
            sender.send_if_modified(|lost| {
                let news = *lost != Some(info.incarnation);
                *lost = Some(info.incarnation);
                news
            });
        }
    }

    /// See [`crate::fencing::Fencing::forwarded_lost`].
    pub fn forwarded_lost(
        &self,
        node_id: &str,
        instance_id: &str,
        restarts: u32,
    ) -> impl Future<Output = LossVerdict> + Send + 'static {
        // Subscribed now, so that a loss from here on is not missed.
        let mut losses = self
            .nodes
            .lock()
            .entry(node_id.to_string())
            .or_insert_with(|| watch::channel(None).0)
            .subscribe();
        let meta = self.meta.clone();
        let node_id = node_id.to_string();
        let instance_id = instance_id.to_string();
        async move {
            loop {
                if losses.changed().await.is_err() {
                    // Senders are never dropped; should one be, nothing more is learnt here.
                    std::future::pending::<()>().await;
                }
                let Some(lost) = *losses.borrow_and_update() else {
                    continue;
                };
                if let Some(verdict) =
                    verdict(meta.as_ref(), &node_id, &instance_id, restarts, lost).await
                {
                    return verdict;
                }
            }
        }
    }
}

/// What a node learns of an instance it forwarded to a node the master declared lost.
#[derive(Debug)]
pub enum LossVerdict {
    /// The instance is gone: its callers get this error (1007).
    Failed(Error),
    /// The master re-creates it on another node (`recover_retry_times`, design 023): its
    /// callers wait for it to run there.
    Rescheduled,
}

/// How long a verdict waits for the master to settle a record that still shows the lost
/// incarnation (the master writes the node lost first, then its instances' records).
const SETTLE_WAIT: Duration = Duration::from_secs(10);

/// How often a verdict reads such a record again.
const SETTLE_POLL: Duration = Duration::from_millis(50);

/// What callers of `instance_id` (forwarded when its record had `restarts` restarts) get now
/// that incarnation `lost` of `node_id` was declared lost: the FATAL error of its record (the
/// master's, usually), [`LossVerdict::Rescheduled`] when the record shows the master
/// re-creating it (elsewhere, or on a newer incarnation of the same node: more restarts than
/// when it was forwarded), 1007 saying the node was lost, or `None` if the record shows the
/// instance, as it was forwarded, on a newer incarnation of the node.
async fn verdict(
    meta: &dyn MetaStore,
    node_id: &str,
    instance_id: &str,
    restarts: u32,
    lost: u64,
) -> Option<LossVerdict> {
    let deadline = tokio::time::Instant::now() + SETTLE_WAIT;
    loop {
        let record =
            tokio::time::timeout(Duration::from_secs(5), meta.get(&instance_key(instance_id)))
                .await
                .ok()
                .and_then(Result::ok)
                .flatten()
                .and_then(|kv| pb::InstanceRecord::decode(kv.value).ok());
        let Some(record) = record else {
            break;
        };
        if record.state == S::Fatal as i32 {
            if let Some(error) = &record.error {
                return Some(LossVerdict::Failed(error_from_proto(error)));
            }
            break;
        }
        if record.node_id != node_id && !record.node_id.is_empty() {
            // The master wrote it SCHEDULING on another node, or that node took it over.
            return Some(LossVerdict::Rescheduled);
        }
        if record.restarts > restarts {
            // Re-created since it was forwarded: on the node's new incarnation (a node that
            // restarted within its timeout), where it runs again under the same id.
            return Some(LossVerdict::Rescheduled);
        }
        if record.node_incarnation != 0 && record.node_incarnation != lost {
            return None;
        }
        if matches!(
            S::try_from(record.state),
            Ok(S::Exited | S::Evicted | S::ScheduleFailed)
        ) || tokio::time::Instant::now() >= deadline
        {
            break;
        }
        // Still the lost incarnation's record: the master settles it right after it writes
        // the node lost.
        tokio::time::sleep(SETTLE_POLL).await;
    }
    Some(LossVerdict::Failed(Error::new(
        ErrorCode::InstanceExited,
        format!(
            "instance {instance_id} exited: it ran on node {node_id}, which the master declared \
             lost (no heartbeat within the master's node timeout); create it again"
        ),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    async fn put_node(
        store: &yr_meta::EmbeddedStore,
        node_id: &str,
        state: &str,
        incarnation: u64,
    ) {
        let info = pb::NodeInfo {
            node_id: node_id.into(),
            state: state.into(),
            incarnation,
            ..Default::default()
        };
        store
            .put(
                &format!("{NODE_PREFIX}{node_id}"),
                Bytes::from(info.encode_to_vec()),
                None,
            )
            .await
            .unwrap();
    }

    async fn put_record(store: &yr_meta::EmbeddedStore, record: &pb::InstanceRecord) {
        store
            .put(
                &instance_key(&record.instance_id),
                Bytes::from(record.encode_to_vec()),
                None,
            )
            .await
            .unwrap();
    }

    fn running(instance_id: &str, node_id: &str, incarnation: u64) -> pb::InstanceRecord {
        pb::InstanceRecord {
            instance_id: instance_id.into(),
            node_id: node_id.into(),
            node_incarnation: incarnation,
            state: S::Running as i32,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn an_instance_forwarded_to_a_lost_node_fails_with_its_fatal_record() {
        let store = Arc::new(yr_meta::EmbeddedStore::in_memory());
        put_node(&store, "b", "alive", 3).await;
        let losses = Arc::new(NodeLosses::new(store.clone()));
        let now = store.current_revision().await.unwrap();
        tokio::spawn(losses.clone().follow_after(now));
        let mut fatal = running("x", "b", 3);
        fatal.state = S::Fatal as i32;
        fatal.written_by_master = true;
        fatal.error = Some(pb::ErrorInfo {
            code: ErrorCode::InstanceExited.number(),
            module: 0,
            message: "instance x exited: node b was lost".into(),
            ..Default::default()
        });
        put_record(&store, &fatal).await;
        // An instance on another node is not affected.
        put_record(&store, &running("y", "c", 1)).await;
        let lost_x = losses.forwarded_lost("b", "x", 0);
        let lost_y = losses.forwarded_lost("c", "y", 0);
        put_node(&store, "b", "lost", 3).await;
        let error = failed(
            tokio::time::timeout(Duration::from_secs(5), lost_x)
                .await
                .expect("the loss is relayed"),
        );
        assert_eq!(error.code(), ErrorCode::InstanceExited);
        assert!(
            error.message().contains("node b was lost"),
            "{}",
            error.message()
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(200), lost_y)
                .await
                .is_err(),
            "node c was not lost"
        );
    }

    fn failed(verdict: LossVerdict) -> Error {
        match verdict {
            LossVerdict::Failed(error) => error,
            LossVerdict::Rescheduled => panic!("not rescheduled"),
        }
    }

    #[tokio::test]
    async fn an_instance_the_master_reschedules_is_not_failed() {
        let store = Arc::new(yr_meta::EmbeddedStore::in_memory());
        let losses = Arc::new(NodeLosses::new(store.clone()));
        put_record(&store, &running("x", "b", 3)).await;
        let lost_x = losses.forwarded_lost("b", "x", 0);
        put_node(&store, "b", "lost", 3).await;
        for kv in store.range(NODE_PREFIX).await.unwrap() {
            losses.apply(&kv);
        }
        // The master settles the record after it wrote the node lost.
        tokio::time::sleep(Duration::from_millis(120)).await;
        let mut rescheduled = running("x", "c", 0);
        rescheduled.state = S::Scheduling as i32;
        rescheduled.written_by_master = true;
        rescheduled.rescheduled_to = "c".into();
        put_record(&store, &rescheduled).await;
        let verdict = tokio::time::timeout(Duration::from_secs(5), lost_x)
            .await
            .expect("the verdict comes");
        assert!(matches!(verdict, LossVerdict::Rescheduled), "{verdict:?}");
    }

    #[tokio::test]
    async fn an_instance_re_created_on_the_same_nodes_new_incarnation_is_rescheduled() {
        let store = Arc::new(yr_meta::EmbeddedStore::in_memory());
        let losses = Arc::new(NodeLosses::new(store.clone()));
        // Forwarded to incarnation 3 of b with no restarts; b restarted as incarnation 4
        // within its timeout, and the master re-created the instance there (restarts 1).
        let mut moved = running("x", "b", 4);
        moved.restarts = 1;
        put_record(&store, &moved).await;
        let lost_x = losses.forwarded_lost("b", "x", 0);
        put_node(&store, "b", "lost", 3).await;
        for kv in store.range(NODE_PREFIX).await.unwrap() {
            losses.apply(&kv);
        }
        let verdict = tokio::time::timeout(Duration::from_secs(5), lost_x)
            .await
            .expect("the verdict comes at once");
        assert!(matches!(verdict, LossVerdict::Rescheduled), "{verdict:?}");
    }

    #[tokio::test]
    async fn an_instance_of_a_newer_incarnation_is_not_failed_by_an_old_loss() {
        let store = Arc::new(yr_meta::EmbeddedStore::in_memory());
        let losses = Arc::new(NodeLosses::new(store.clone()));
        put_record(&store, &running("x", "b", 4)).await;
        put_record(&store, &running("z", "b", 3)).await;
        let lost_x = losses.forwarded_lost("b", "x", 0);
        let lost_z = losses.forwarded_lost("b", "z", 0);
        // The record of a loss of incarnation 3, read back after a watch gap.
        put_node(&store, "b", "lost", 3).await;
        for kv in store.range(NODE_PREFIX).await.unwrap() {
            losses.apply(&kv);
        }
        // The master does not settle z's record here: the verdict gives up waiting for it.
        let error = failed(
            tokio::time::timeout(SETTLE_WAIT + Duration::from_secs(5), lost_z)
                .await
                .expect("the instance of the lost incarnation fails"),
        );
        assert_eq!(error.code(), ErrorCode::InstanceExited);
        assert!(
            error.message().contains("declared lost"),
            "{}",
            error.message()
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(200), lost_x)
                .await
                .is_err(),
            "incarnation 4 was not lost"
        );
    }
}
