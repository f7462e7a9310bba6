//! The master's cluster state and its operations: registration, heartbeats, placement,
//! liveness and status. It owns the node registry and the resource view (under one lock that
//! is never held across an `.await`), and the instance manager. The tonic service and the
//! metrics endpoint are thin layers over it.

mod liveness;
mod scheduling;
mod status;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use prost::Message;
use yr_common::backoff::Backoff;
use yr_common::Clock;
use yr_meta::{MetaError, MetaStore, TxnOp};
use yr_proto::v1::{NodeInfo, NodeUpdate, RegisterNodeResponse};

use crate::instance_manager::InstanceManager;
use crate::registry::{
    incarnation_key, node_key, HeartbeatOutcome, NodeState, Registry, NODE_PREFIX,
};
use crate::resource_view::{delta_is_empty, ResourceSet, ResourceView};

/// The meta store key of the cluster's id, made by the first master that opens the store.
pub const CLUSTER_ID_KEY: &str = "/yr/cluster/id";

/// The meta store prefix of registered functions (`/yr/function/{name}`); `ClusterStatus` lists
/// their names along with the functions of known instances.
pub const FUNCTION_PREFIX: &str = "/yr/function/";

/// How much longer than `node_timeout` a node recovered after a master restart has to register
/// again: the longest delay between a node's reconnect attempts, so that a node whose master was
/// down for a while is not declared lost (and fenced) only because its next attempt came late.
pub const RECOVERY_GRACE: Duration = Backoff::MAX;

/// Why a registration was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The registration could not be persisted.
    #[error("cannot persist the registration of node {node_id}: {source}")]
    Meta {
        /// The node.
        node_id: String,
        /// The store's error.
        source: MetaError,
    },
}

/// Counters of the master's own events, for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Schedule requests answered.
    pub schedule_requests: AtomicU64,
    /// Schedule requests answered with 1002 ResourceNotEnough.
    pub schedule_not_enough: AtomicU64,
    /// Schedule requests answered with 1006 ResourceConfigError.
    pub schedule_config_error: AtomicU64,
    /// Registrations accepted.
    pub registrations: AtomicU64,
    /// Nodes declared lost.
    pub nodes_lost: AtomicU64,
    /// Instances of lost nodes re-created on other nodes (design 023).
    pub instances_rescheduled: AtomicU64,
    /// Registrations refused because their incarnation was declared lost.
    pub lost_incarnations_refused: AtomicU64,
    /// Registrations of a new incarnation of a node whose previous one the master still held
    /// as alive (a node process restarted within the node timeout): the previous one is lost.
    pub incarnations_replaced: AtomicU64,
}

struct Nodes {
    registry: Registry,
    view: ResourceView,
}

/// The master's state: registry, resource view and instance manager.
pub struct Cluster {
    nodes: Mutex<Nodes>,
    store: Arc<dyn MetaStore>,
    instances: Arc<InstanceManager>,
    node_timeout: Duration,
    cluster_id: String,
    counters: Counters,
    /// The clock heartbeats, the node timeout and reservations are measured on.
    clock: Arc<dyn Clock>,
}

impl Cluster {
    /// Opens the cluster state on `store`: reads (or makes) the cluster id, recovers the node
    /// registry (every node recovering, with [`RECOVERY_GRACE`] more to register again; lost
    /// ones stay lost) and syncs the instance view.
    /// Returns the state and the revision to follow instance records after.
    pub async fn open(
        store: Arc<dyn MetaStore>,
        node_timeout: Duration,
    ) -> Result<(Arc<Cluster>, u64), MetaError> {
        Self::open_with_clock(store, node_timeout, yr_common::clock::system()).await
    }

    /// [`Cluster::open`], measuring heartbeats and the node timeout on `clock` (tests move a
    /// [`yr_common::ManualClock`]).
    pub async fn open_with_clock(
        store: Arc<dyn MetaStore>,
        node_timeout: Duration,
        clock: Arc<dyn Clock>,
    ) -> Result<(Arc<Cluster>, u64), MetaError> {
        let cluster_id = match store.get(CLUSTER_ID_KEY).await? {
            Some(kv) => String::from_utf8_lossy(&kv.value).into_owned(),
            None => {
                let id = format!("yr-{}", yr_common::ObjectId::generate());
                store
                    .put(CLUSTER_ID_KEY, Bytes::from(id.clone()), None)
                    .await?;
                id
            }
        };
        let mut registry = Registry::new();
        let recovered_at = clock.now() + RECOVERY_GRACE;
        for kv in store.range(NODE_PREFIX).await? {
            match NodeInfo::decode(kv.value.clone()) {
                Ok(info) => {
                    let node_id = info.node_id.clone();
                    let state = registry.recover(info, recovered_at);
                    tracing::info!(node_id, %state, "recovered node from the meta store");
                }
                Err(err) => {
                    tracing::warn!(key = %kv.key, error = %err, "skipping an undecodable node record")
                }
            }
        }
        let instances = Arc::new(InstanceManager::new(store.clone()));
        let revision = instances.sync().await?;
        let cluster = Cluster {
            nodes: Mutex::new(Nodes {
                registry,
                view: ResourceView::new(),
            }),
            store,
            instances,
            node_timeout,
            cluster_id,
            counters: Counters::default(),
            clock,
        };
        Ok((Arc::new(cluster), revision))
    }

    /// The cluster's id.
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// The instance manager.
    pub fn instances(&self) -> &Arc<InstanceManager> {
        &self.instances
    }

    /// The master's event counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// How long a node may go without heartbeating before it is lost.
    pub fn node_timeout(&self) -> Duration {
        self.node_timeout
    }

    /// [`Cluster::node_timeout`] in whole milliseconds, as registrations tell nodes (at least
    /// 1: 0 would tell a node that this master does not acknowledge beats).
    fn node_timeout_ms(&self) -> u64 {
        u64::try_from(self.node_timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Registers (or re-registers) a node: it is alive from now, its resource view is reset to
    /// what it reports, and its record and live incarnation are persisted together. An
    /// incarnation this master declared lost is refused (`incarnation_lost`, nothing changes):
    /// the node fails its instances and registers again under a new incarnation.
    pub async fn register(
        &self,
        info: Option<NodeInfo>,
    ) -> Result<RegisterNodeResponse, RegisterError> {
        let Some(mut info) = info else {
            return Err(RegisterError::Invalid(
                "RegisterNode without a node; send the node's id, address and resources".into(),
            ));
        };
        if info.node_id.is_empty() {
            return Err(RegisterError::Invalid(
                "RegisterNode with an empty node id; give the node an id".into(),
            ));
        }
        if info.address.is_empty() {
            return Err(RegisterError::Invalid(format!(
                "node {} registered without an address; send its node service address",
                info.node_id
            )));
        }
        let capacity = ResourceSet::from_proto(&info.capacity.clone().unwrap_or_default());
        let allocatable = match &info.allocatable {
            Some(allocatable) => ResourceSet::from_proto(allocatable),
            None => capacity.clone(),
        };
        info.capacity = Some(capacity.to_proto());
        info.allocatable = Some(allocatable.to_proto());
        info.state = NodeState::Alive.as_str().to_string();
        let node_id = info.node_id.clone();
        let incarnation = info.incarnation;
        // Memory first, then the store: a liveness pass that races with this registration then
        // sees the node alive, or its compare-and-swap loses to the write below.
        let (previous, replaced) = {
            let mut nodes = self.nodes.lock();
            if nodes.registry.is_lost_incarnation(&node_id, incarnation) {
                drop(nodes);
                self.counters
                    .lost_incarnations_refused
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    node_id,
                    incarnation,
                    "refused a registration: this incarnation of the node was declared lost; \
                     the node fails its instances and registers as a new incarnation"
                );
                return Ok(RegisterNodeResponse {
                    cluster_id: self.cluster_id.clone(),
                    incarnation_lost: true,
                    node_timeout_ms: self.node_timeout_ms(),
                });
            }
            // A node process that restarted before its node timeout registers as a new
            // incarnation while the old one is still held alive (or recovering, after a
            // master's restart): the old one is lost, as if it had missed its heartbeats.
            let replaced = nodes
                .registry
                .get(&node_id)
                .filter(|entry| {
                    entry.state != NodeState::Lost
                        && entry.info.incarnation != 0
                        && entry.info.incarnation != incarnation
                })
                .map(|entry| entry.info.clone());
            let previous = nodes.registry.register(info.clone(), self.clock.now());
            nodes.view.set_node(&node_id, capacity.clone(), allocatable);
            (previous, replaced)
        };
        if let Some(old) = &replaced {
            self.counters
                .incarnations_replaced
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                node_id,
                old = old.incarnation,
                new = incarnation,
                "a node registered as a new incarnation before its old one timed out: the old \
                 one is lost, and its instances are settled"
            );
            // Nodes that forwarded instances to the old incarnation learn of its loss from its
            // record written as lost (they follow the node records), before the new one.
            let mut lost = old.clone();
            lost.state = NodeState::Lost.as_str().to_string();
            if let Err(error) = self
                .store
                .put(&node_key(&node_id), Bytes::from(lost.encode_to_vec()), None)
                .await
            {
                tracing::warn!(node_id, %error, "cannot record that the old incarnation was lost");
            }
        }
        self.counters.registrations.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            node_id,
            incarnation,
            address = %info.address,
            capacity = %capacity,
            previous = ?previous,
            "node registered"
        );
        // The node's record and its live incarnation, which its record writes compare, change
        // together.
        self.store
            .txn(
                Vec::new(),
                vec![
                    TxnOp::Put {
                        key: node_key(&node_id),
                        value: Bytes::from(info.encode_to_vec()),
                        lease: None,
                    },
                    TxnOp::Put {
                        key: incarnation_key(&node_id),
                        value: Bytes::from(incarnation.to_string()),
                        lease: None,
                    },
                ],
                Vec::new(),
            )
            .await
            .map_err(|source| RegisterError::Meta {
                node_id: node_id.clone(),
                source,
            })?;
        if replaced.is_some() {
            // The new incarnation is live now: the records of the old one are settled
            // (re-created elsewhere with restarts left, FATAL otherwise).
            self.fail_instances(&node_id).await;
        }
        Ok(RegisterNodeResponse {
            cluster_id: self.cluster_id.clone(),
            incarnation_lost: false,
            node_timeout_ms: self.node_timeout_ms(),
        })
    }

    /// Records a heartbeat and applies its delta. A node the master does not know as alive is
    /// told to register again.
    pub fn heartbeat(&self, update: &NodeUpdate) -> HeartbeatOutcome {
        let mut nodes = self.nodes.lock();
        let outcome = nodes.registry.heartbeat(&update.node_id, self.clock.now());
        if outcome == HeartbeatOutcome::Accepted && !delta_is_empty(update.delta.as_ref()) {
            if let Some(delta) = &update.delta {
                nodes.view.apply_delta(&update.node_id, delta);
            }
        }
        outcome
    }
}

#[cfg(test)]
mod tests;
