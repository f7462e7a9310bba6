//! What the cluster reports: its status (nodes, instances, registered functions), node infos,
//! node counts by state, and the alive nodes' resource totals.

use yr_meta::MetaStore;
use yr_proto::v1::{ClusterStatusResponse, NodeInfo};

use super::{Cluster, FUNCTION_PREFIX};
use crate::registry::NodeState;
use crate::resource_view::ResourceSet;

impl Cluster {
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
            meta_store: String::new(),
            leader: String::new(),
            masters: Vec::new(),
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
}
