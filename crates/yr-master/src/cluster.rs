//! The master's cluster state and its operations: registration, heartbeats, placement,
//! liveness and status. It owns the node registry and the resource view (under one lock that
//! is never held across an `.await`), and the instance manager. The tonic service and the
//! metrics endpoint are thin layers over it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::watch;
use yr_common::backoff::Backoff;
use yr_common::{Clock, Error, ErrorCode};
use yr_meta::{Compare, MetaError, MetaStore, TxnOp};
use yr_proto::error_to_proto;
use yr_proto::v1::{
    ClusterStatusResponse, NodeInfo, NodeUpdate, RegisterNodeResponse, ScheduleRequest,
    ScheduleResponse,
};

use crate::instance_manager::InstanceManager;
use crate::placement::{self, Candidate, PlacementError, PlacementRequest};
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
    /// Registrations refused because their incarnation was declared lost.
    pub lost_incarnations_refused: AtomicU64,
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
        let previous = {
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
                });
            }
            let previous = nodes.registry.register(info.clone(), self.clock.now());
            nodes.view.set_node(&node_id, capacity.clone(), allocatable);
            previous
        };
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
        Ok(RegisterNodeResponse {
            cluster_id: self.cluster_id.clone(),
            incarnation_lost: false,
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

    /// Places a request on a live node and reserves it there tentatively.
    pub fn schedule(&self, request: &ScheduleRequest) -> ScheduleResponse {
        self.counters
            .schedule_requests
            .fetch_add(1, Ordering::Relaxed);
        match self.place(request) {
            Ok((node_id, node_address)) => ScheduleResponse {
                node_id,
                node_address,
                error: None,
            },
            Err(err) => {
                let counter = match err.code() {
                    ErrorCode::ResourceConfigError => &self.counters.schedule_config_error,
                    _ => &self.counters.schedule_not_enough,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %err, "schedule request not placed");
                let error = err.to_error();
                ScheduleResponse {
                    node_id: String::new(),
                    node_address: String::new(),
                    error: Some(error_to_proto(&error)),
                }
            }
        }
    }

    fn place(&self, request: &ScheduleRequest) -> Result<(String, String), PlacementError> {
        let resources = ResourceSet::from_proto(&request.request.clone().unwrap_or_default());
        let affinities: Vec<yr_common::Affinity> = request
            .required_affinities
            .iter()
            .map(placement::affinity_from_proto)
            .collect();
        let now = self.clock.now();
        let mut nodes = self.nodes.lock();
        nodes.view.expire_reservations(now, self.node_timeout);
        let Nodes { registry, view } = &mut *nodes;
        let chosen = {
            let candidates: Vec<Candidate<'_>> = registry
                .iter()
                .filter(|entry| entry.state == NodeState::Alive)
                .filter_map(|entry| {
                    view.node(&entry.info.node_id).map(|resources| Candidate {
                        node_id: &entry.info.node_id,
                        capacity: resources.capacity(),
                        allocatable: resources.allocatable(),
                        labels: &entry.info.labels,
                    })
                })
                .collect();
            placement::place(
                &candidates,
                &PlacementRequest {
                    resources: &resources,
                    exclude_nodes: &request.exclude_nodes,
                    labels: &request.labels,
                    affinities: &affinities,
                },
            )?
            .to_string()
        };
        view.reserve(&chosen, &resources, now);
        let address = registry
            .get(&chosen)
            .map(|entry| entry.info.address.clone())
            .unwrap_or_default();
        Ok((chosen, address))
    }

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

    /// Nodes, instances and registered functions.
    pub async fn status(&self) -> ClusterStatusResponse {
        let nodes = self.node_infos();
        let instances = self.instances.summaries();
        let mut functions = self.instances.function_names();
        match self.store.range(FUNCTION_PREFIX).await {
            Ok(records) => {
                for kv in records {
                    let name = kv.key.trim_start_matches(FUNCTION_PREFIX);
                    if !name.is_empty() {
                        functions.insert(name.to_string());
                    }
                }
            }
            Err(err) => tracing::warn!(error = %err, "cannot list registered functions"),
        }
        ClusterStatusResponse {
            nodes,
            instances,
            functions: functions.into_iter().collect(),
        }
    }

    /// Every node with its state, capacity and (for live nodes, current) allocatable.
    pub fn node_infos(&self) -> Vec<NodeInfo> {
        let nodes = self.nodes.lock();
        nodes
            .registry
            .iter()
            .map(|entry| {
                let mut info = entry.info.clone();
                info.state = entry.state.as_str().to_string();
                if let Some(resources) = nodes.view.node(&info.node_id) {
                    info.capacity = Some(resources.capacity().to_proto());
                    info.allocatable = Some(resources.allocatable().to_proto());
                }
                info
            })
            .collect()
    }

    /// How many nodes are in each state, in [`NodeState::ALL`] order.
    pub fn node_counts(&self) -> [usize; 3] {
        let nodes = self.nodes.lock();
        NodeState::ALL.map(|state| nodes.registry.count(state))
    }

    /// Total capacity and allocatable over the alive nodes.
    pub fn alive_totals(&self) -> (ResourceSet, ResourceSet) {
        let nodes = self.nodes.lock();
        let mut capacity = ResourceSet::default();
        let mut allocatable = ResourceSet::default();
        for entry in nodes.registry.iter() {
            if entry.state != NodeState::Alive {
                continue;
            }
            if let Some(resources) = nodes.view.node(&entry.info.node_id) {
                capacity.add(resources.capacity());
                let mut free = resources.allocatable().clone();
                free.cpu_millicores = free.cpu_millicores.max(0);
                free.memory_mb = free.memory_mb.max(0);
                allocatable.add(&free);
            }
        }
        (capacity, allocatable)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_store::FakeStore;
    use yr_common::ManualClock;
    use yr_common::ModuleCode;
    use yr_proto::v1::{InstanceRecord, InstanceState, ResourceDelta, Resources};

    fn heartbeat(cluster: &Cluster, id: &str) {
        cluster.heartbeat(&NodeUpdate {
            node_id: id.into(),
            delta: None,
        });
    }

    #[tokio::test]
    async fn a_node_is_lost_exactly_when_its_heartbeats_stop_for_the_node_timeout() {
        let store = Arc::new(FakeStore::default());
        let clock = ManualClock::new();
        let timeout = Duration::from_secs(5);
        let (cluster, _) = Cluster::open_with_clock(store, timeout, clock.clone())
            .await
            .unwrap();
        cluster.register(Some(node("a", 1000))).await.unwrap();
        cluster.register(Some(node("b", 1000))).await.unwrap();
        // Heartbeats within the timeout keep a node alive however long it lives; b, which
        // never heartbeats, is lost on the first pass past its timeout.
        let mut lost = Vec::new();
        for _ in 0..10 {
            clock.advance(timeout - Duration::from_millis(1));
            heartbeat(&cluster, "a");
            lost.push(cluster.check_liveness().await);
        }
        assert!(lost[0].is_empty());
        assert_eq!(lost[1], vec!["b".to_string()]);
        assert!(lost[2..].iter().all(Vec::is_empty), "{lost:?}");
        assert_eq!(cluster.node_counts(), [1, 0, 1]);
        // a stops now: alive until the last instant of its timeout, lost at it.
        clock.advance(timeout - Duration::from_millis(1));
        assert!(cluster.check_liveness().await.is_empty());
        clock.advance(Duration::from_millis(1));
        assert_eq!(cluster.check_liveness().await, vec!["a".to_string()]);
        assert_eq!(cluster.node_counts(), [0, 0, 2]);
    }

    fn node(id: &str, cpu: u64) -> NodeInfo {
        NodeInfo {
            node_id: id.to_string(),
            address: format!("127.0.0.1:{}", 1000 + cpu / 1000),
            capacity: Some(Resources {
                cpu_millicores: cpu,
                memory_mb: 1024,
                custom: Default::default(),
            }),
            ..Default::default()
        }
    }

    fn request(cpu: u64) -> ScheduleRequest {
        ScheduleRequest {
            request: Some(Resources {
                cpu_millicores: cpu,
                memory_mb: 0,
                custom: Default::default(),
            }),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn tentative_reservations_spread_concurrent_schedules() {
        let store = Arc::new(FakeStore::default());
        let (cluster, _) = Cluster::open(store, Duration::from_secs(5)).await.unwrap();
        cluster.register(Some(node("a", 4000))).await.unwrap();
        cluster.register(Some(node("b", 3000))).await.unwrap();
        let picks: Vec<String> = (0..4)
            .map(|_| cluster.schedule(&request(1000)).node_id)
            .collect();
        // a: 4000 → 3000 (tie with b, a is lower) → ... spread over both.
        assert_eq!(picks, vec!["a", "a", "b", "a"]);
        // The nodes report what they took; the reservations are replaced.
        for (id, taken) in [("a", 3000), ("b", 1000)] {
            cluster.heartbeat(&NodeUpdate {
                node_id: id.into(),
                delta: Some(ResourceDelta {
                    cpu_millicores: -taken,
                    memory_mb: 0,
                    custom: Default::default(),
                }),
            });
        }
        let infos = cluster.node_infos();
        assert_eq!(infos[0].allocatable.as_ref().unwrap().cpu_millicores, 1000);
        assert_eq!(infos[1].allocatable.as_ref().unwrap().cpu_millicores, 2000);
    }

    #[tokio::test]
    async fn invalid_registrations_are_refused() {
        let store = Arc::new(FakeStore::default());
        let (cluster, _) = Cluster::open(store, Duration::from_secs(5)).await.unwrap();
        let err: Error = cluster.register(None).await.unwrap_err().into();
        assert_eq!(err.code(), ErrorCode::ParamInvalid);
        let mut no_address = node("a", 1000);
        no_address.address.clear();
        let err: Error = cluster.register(Some(no_address)).await.unwrap_err().into();
        assert_eq!(err.code(), ErrorCode::ParamInvalid);
        assert_eq!(err.module_code(), ModuleCode::Core);
    }

    #[tokio::test]
    async fn lost_node_is_persisted_and_its_instances_fail() {
        let store = Arc::new(FakeStore::default());
        let clock = ManualClock::new();
        let (cluster, _) =
            Cluster::open_with_clock(store.clone(), Duration::from_millis(50), clock.clone())
                .await
                .unwrap();
        cluster.register(Some(node("a", 1000))).await.unwrap();
        let mut record = InstanceRecord {
            instance_id: "i".into(),
            node_id: "a".into(),
            ..Default::default()
        };
        record.set_state(InstanceState::Running);
        store
            .put("/yr/instance/i", Bytes::from(record.encode_to_vec()), None)
            .await
            .unwrap();
        clock.advance(Duration::from_millis(50));
        assert_eq!(cluster.check_liveness().await, vec!["a".to_string()]);
        let kv = store.get(&node_key("a")).await.unwrap().unwrap();
        assert_eq!(NodeInfo::decode(kv.value).unwrap().state, "lost");
        let kv = store.get("/yr/instance/i").await.unwrap().unwrap();
        assert_eq!(
            InstanceRecord::decode(kv.value).unwrap().state(),
            InstanceState::Fatal
        );
        let response = cluster.schedule(&request(100));
        assert_eq!(
            response.error.unwrap().code,
            ErrorCode::ResourceNotEnough.number()
        );
        // Reopening keeps the node lost and the cluster id.
        let id = cluster.cluster_id().to_string();
        let (reopened, _) = Cluster::open(store, Duration::from_millis(50))
            .await
            .unwrap();
        assert_eq!(reopened.cluster_id(), id);
        assert_eq!(reopened.node_counts(), [0, 0, 1]);
    }

    /// A record write as a node makes it: only while the record is still at `version` and
    /// the node's live incarnation is `incarnation`.
    async fn node_write(
        store: &FakeStore,
        record: &InstanceRecord,
        version: u64,
        incarnation: u64,
    ) -> bool {
        store
            .txn(
                vec![
                    Compare::Version {
                        key: "/yr/instance/i".into(),
                        version,
                    },
                    Compare::ValueEquals {
                        key: incarnation_key(&record.node_id),
                        value: Bytes::from(incarnation.to_string()),
                    },
                ],
                vec![TxnOp::Put {
                    key: "/yr/instance/i".into(),
                    value: Bytes::from(record.encode_to_vec()),
                    lease: None,
                }],
                Vec::new(),
            )
            .await
            .unwrap()
            .succeeded
    }

    #[tokio::test]
    async fn a_lost_incarnation_is_fenced_and_comes_back_only_as_a_new_one() {
        let store = Arc::new(FakeStore::default());
        let (cluster, _) = Cluster::open(store.clone(), Duration::from_millis(50))
            .await
            .unwrap();
        let mut first = node("a", 1000);
        first.incarnation = 7;
        let response = cluster.register(Some(first.clone())).await.unwrap();
        assert!(!response.incarnation_lost);
        let live = store.get(&incarnation_key("a")).await.unwrap().unwrap();
        assert_eq!(live.value, Bytes::from("7"));

        // Incarnation 7 writes its instance's record while it is alive.
        let mut record = InstanceRecord {
            instance_id: "i".into(),
            node_id: "a".into(),
            node_incarnation: 7,
            ..Default::default()
        };
        record.set_state(InstanceState::Running);
        assert!(node_write(&store, &record, 0, 7).await);

        // It stops heartbeating: lost, its live incarnation is gone, its record FATAL.
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(cluster.check_liveness().await, vec!["a".to_string()]);
        assert!(store.get(&incarnation_key("a")).await.unwrap().is_none());
        let fatal = store.get("/yr/instance/i").await.unwrap().unwrap();
        let stored = InstanceRecord::decode(fatal.value.clone()).unwrap();
        assert_eq!(stored.state(), InstanceState::Fatal);
        assert!(stored.written_by_master);

        // Its writes are refused by the store's compare, even at the current version.
        assert!(!node_write(&store, &record, fatal.version, 7).await);
        // It comes back: its heartbeat is told to register again, and the registration of the
        // lost incarnation is refused without changing anything.
        assert_eq!(
            cluster.heartbeat(&NodeUpdate {
                node_id: "a".into(),
                delta: None,
            }),
            HeartbeatOutcome::Reregister
        );
        let refused = cluster.register(Some(first.clone())).await.unwrap();
        assert!(refused.incarnation_lost);
        assert_eq!(cluster.node_counts(), [0, 0, 1]);
        assert!(store.get(&incarnation_key("a")).await.unwrap().is_none());
        assert_eq!(
            cluster
                .counters()
                .lost_incarnations_refused
                .load(Ordering::Relaxed),
            1
        );

        // As a new incarnation it is alive again; the master's FATAL stands.
        let mut second = first;
        second.incarnation = 8;
        assert!(
            !cluster
                .register(Some(second))
                .await
                .unwrap()
                .incarnation_lost
        );
        assert_eq!(cluster.node_counts(), [1, 0, 0]);
        assert_eq!(cluster.node_infos()[0].incarnation, 8);
        let live = store.get(&incarnation_key("a")).await.unwrap().unwrap();
        assert_eq!(live.value, Bytes::from("8"));
        let after = store.get("/yr/instance/i").await.unwrap().unwrap();
        assert_eq!(after, fatal, "the FATAL record is untouched");
        // The old incarnation still cannot write.
        assert!(!node_write(&store, &record, fatal.version, 7).await);
    }
}
