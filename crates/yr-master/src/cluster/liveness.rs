//! Node liveness: a pass that marks nodes not seen for the node timeout as lost, removes them
//! from the resource view, persists them as lost (fencing their incarnation) and fails their
//! instances; and the task that runs those passes until the master stops.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tokio::sync::watch;
use yr_common::Error;
use yr_meta::{Compare, MetaError, MetaStore, TxnOp};

use super::Cluster;
use crate::registry::{incarnation_key, node_key, NodeState};

impl Cluster {
    /// One liveness pass: nodes not seen for `node_timeout` become lost, leave the resource
    /// view, are persisted as lost, and their instances are failed. Returns the lost node ids.
    pub async fn check_liveness(&self) -> Vec<String> {
        let lost = {
            let mut nodes = self.nodes.lock();
            let now = self.clock.now();
            nodes.view.expire_reservations(now, self.node_timeout);
            let lost = nodes.registry.expire(now, self.node_timeout);
            for node_id in &lost {
                nodes.view.remove_node(node_id);
            }
            lost
        };
        for node_id in &lost {
            self.counters.nodes_lost.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                node_id,
                timeout = ?self.node_timeout,
                "node lost: no heartbeat within the node timeout"
            );
            if let Err(err) = self.persist_lost(node_id).await {
                tracing::warn!(node_id, error = %err, "cannot persist that the node was lost");
            }
            self.fail_instances(node_id).await;
        }
        lost
    }

    /// Fails the instances of every node the registry holds as lost (after a restart, a master
    /// may have died half-way through).
    pub async fn fail_instances_of_lost_nodes(&self) {
        let lost = self.nodes.lock().registry.ids_in(NodeState::Lost);
        for node_id in lost {
            self.fail_instances(&node_id).await;
        }
    }

    async fn fail_instances(&self, node_id: &str) {
        // A node that came back as a new incarnation meanwhile keeps that incarnation's records.
        let live = || self.nodes.lock().registry.live_incarnation(node_id);
        if let Err(err) = self
            .instances
            .fail_instances_of_lost_node(node_id, &live)
            .await
        {
            let error = Error::from(err);
            tracing::error!(node_id, %error, "cannot mark the instances of a lost node FATAL; will retry after a restart");
        }
    }

    /// Writes the node's record as lost and deletes its live incarnation, so that none of that
    /// incarnation's record writes lands from now on (fencing); unless a registration got there
    /// first.
    async fn persist_lost(&self, node_id: &str) -> Result<(), MetaError> {
        let key = node_key(node_id);
        let Some(current) = self.store.get(&key).await? else {
            return Ok(());
        };
        let info = {
            let nodes = self.nodes.lock();
            match nodes.registry.get(node_id) {
                Some(entry) if entry.state == NodeState::Lost => entry.info.clone(),
                _ => return Ok(()),
            }
        };
        let value = Bytes::from(info.encode_to_vec());
        let response = self
            .store
            .txn(
                vec![Compare::Version {
                    key: key.clone(),
                    version: current.version,
                }],
                vec![
                    TxnOp::Put {
                        key,
                        value,
                        lease: None,
                    },
                    TxnOp::Delete {
                        key: incarnation_key(node_id),
                    },
                ],
                Vec::new(),
            )
            .await?;
        if !response.succeeded {
            tracing::debug!(node_id, "node re-registered while it was being marked lost");
        }
        Ok(())
    }

    /// Runs liveness passes until `stop` turns true.
    pub async fn watch_liveness(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let period =
            (self.node_timeout / 5).clamp(Duration::from_millis(20), Duration::from_secs(1));
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = crate::stopped(&mut stop) => return,
                _ = ticker.tick() => {}
            }
            tokio::select! {
                _ = crate::stopped(&mut stop) => return,
                _ = self.check_liveness() => {}
            }
        }
    }
}
