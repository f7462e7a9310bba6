//! Global placement: a pure function from the live nodes' resources and a request to the node
//! that should take it, or the reason none can.
//!
//! The policy is deterministic:
//! 1. No live node: [`PlacementError::NoLiveNodes`] (1002).
//! 2. A request larger than every live node's *capacity* can never run:
//!    [`PlacementError::ExceedsCapacity`] (1006), naming the request and the largest node.
//! 3. Otherwise the candidates are the nodes that are not excluded, carry every required label
//!    (`"k=v"`: label `k` has value `v`; `"k"`: label `k` exists), admit every required
//!    affinity of the instance (`InvokeOptions::schedule_affinities` on node labels) and have
//!    the request *allocatable* now. None: [`PlacementError::NotEnough`] (1002) with a reason
//!    per node.
//! 4. Among candidates, the node with the most free CPU after placement wins (spread); a tie goes
//!    to the lowest node id.
//!
//! [`place`] scores every node it is given. [`first_fit`] is the fast path for the same policy:
//! given the nodes most free CPU first (the order the resource view keeps), the first candidate
//! is the node [`place`] would choose, so it stops there; it says nothing when no node fits,
//! and the caller then asks [`place`] for the error.

use std::collections::HashMap;

use yr_common::{Affinity, AffinityKind, AffinityScope, AffinityType, LabelOp, LabelOperator};
use yr_proto::v1 as pb;

use crate::resource_view::ResourceSet;

/// How many nodes a "not enough" reason describes one by one.
const MAX_NODES_IN_REASON: usize = 8;

/// A live node as placement sees it.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    /// The node's id.
    pub node_id: &'a str,
    /// What the node manages in total.
    pub capacity: &'a ResourceSet,
    /// What is free on the node now.
    pub allocatable: &'a ResourceSet,
    /// The node's labels.
    pub labels: &'a HashMap<String, String>,
}

/// What to place.
#[derive(Clone, Copy, Debug)]
pub struct PlacementRequest<'a> {
    /// The resources the instance needs.
    pub resources: &'a ResourceSet,
    /// Nodes that already refused the request.
    pub exclude_nodes: &'a [String],
    /// Required node labels, `"k=v"` or `"k"`.
    pub labels: &'a [String],
    /// Required affinities on node labels; a node must admit every one.
    pub affinities: &'a [Affinity],
}

/// A required affinity from the wire.
pub fn affinity_from_proto(affinity: &pb::NodeAffinity) -> Affinity {
    Affinity {
        affinity_kind: AffinityKind::Resource,
        affinity_type: if affinity.anti {
            AffinityType::RequiredAnti
        } else {
            AffinityType::Required
        },
        label_operators: affinity
            .conditions
            .iter()
            .map(|condition| LabelOperator {
                op: match pb::label_condition::Op::try_from(condition.op) {
                    Ok(pb::label_condition::Op::In) => LabelOp::In,
                    Ok(pb::label_condition::Op::NotIn) => LabelOp::NotIn,
                    Ok(pb::label_condition::Op::Exists) => LabelOp::Exists,
                    // An operator this master does not know: a condition no node meets.
                    Ok(pb::label_condition::Op::NotExists) | Err(_) => LabelOp::NotExists,
                },
                key: condition.key.clone(),
                values: condition.values.clone(),
            })
            .collect(),
        affinity_scope: AffinityScope::Node,
    }
}

/// Why no node was chosen.
#[derive(Clone, Debug, PartialEq)]
pub enum PlacementError {
    /// The cluster has no live node.
    NoLiveNodes,
    /// The request is larger than every live node's capacity; it can never be placed.
    ExceedsCapacity {
        /// The request.
        request: ResourceSet,
        /// The node with the most capacity.
        largest_node: String,
        /// That node's capacity.
        largest_capacity: ResourceSet,
    },
    /// Some node could take the request in principle, but none can now.
    NotEnough {
        /// Why each node said no.
        reason: String,
    },
}

impl std::fmt::Display for PlacementError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlacementError::NoLiveNodes => write!(
                f,
                "no live node in the cluster to place the request on; start a node or wait for \
                 nodes to register"
            ),
            PlacementError::ExceedsCapacity {
                request,
                largest_node,
                largest_capacity,
            } => write!(
                f,
                "request resource is greater than each node's max resource: request {request}, \
                 largest node {largest_node} has capacity {largest_capacity}; lower the request \
                 or add a larger node"
            ),
            PlacementError::NotEnough { reason } => write!(f, "{reason}"),
        }
    }
}

impl std::error::Error for PlacementError {}

/// Whether a node's labels satisfy one required label, `"k=v"` or `"k"`.
pub fn label_matches(labels: &HashMap<String, String>, required: &str) -> bool {
    match required.split_once('=') {
        Some((key, value)) => labels.get(key.trim()).is_some_and(|v| v == value.trim()),
        None => labels.contains_key(required.trim()),
    }
}

/// Chooses the node for `request` among the live `nodes`. See the module doc for the policy.
pub fn place<'a>(
    nodes: &[Candidate<'a>],
    request: &PlacementRequest<'_>,
) -> Result<&'a str, PlacementError> {
    if nodes.is_empty() {
        return Err(PlacementError::NoLiveNodes);
    }
    let resources = request.resources;
    if !nodes.iter().any(|node| resources.fits_in(node.capacity)) {
        let largest = nodes
            .iter()
            .max_by(|a, b| {
                (a.capacity.cpu_millicores, a.capacity.memory_mb)
                    .cmp(&(b.capacity.cpu_millicores, b.capacity.memory_mb))
                    // On a tie, the lowest id is the "largest", for a stable message.
                    .then_with(|| b.node_id.cmp(a.node_id))
            })
            .expect("nodes is not empty");
        return Err(PlacementError::ExceedsCapacity {
            request: resources.clone(),
            largest_node: largest.node_id.to_string(),
            largest_capacity: largest.capacity.clone(),
        });
    }

    let mut best: Option<(&'a str, i64)> = None;
    // Only the reasons shown are written out; the rest are counted.
    let mut refusals = Vec::new();
    let mut refused = 0usize;
    for node in nodes {
        if !admits(node, request) {
            if refusals.len() < MAX_NODES_IN_REASON {
                let reason = refusal(node, request).unwrap_or_default();
                refusals.push(format!("{}: {reason}", node.node_id));
            }
            refused += 1;
            continue;
        }
        let free_cpu_after = node.allocatable.cpu_millicores - resources.cpu_millicores;
        let better = match best {
            None => true,
            Some((best_id, best_free)) => {
                free_cpu_after > best_free
                    || (free_cpu_after == best_free && node.node_id < best_id)
            }
        };
        if better {
            best = Some((node.node_id, free_cpu_after));
        }
    }
    match best {
        Some((node_id, _)) => Ok(node_id),
        None => {
            let mut reason = format!(
                "no node can take request {resources} now ({} live nodes): {}",
                nodes.len(),
                refusals.join("; ")
            );
            if refused > refusals.len() {
                reason.push_str(&format!("; and {} more", refused - refusals.len()));
            }
            Err(PlacementError::NotEnough { reason })
        }
    }
}

/// The first of `ordered` that can take `request` now. Given the live nodes most free CPU
/// first and the lowest id first on a tie, that is the node [`place`] chooses; `None` when no
/// node can take it (ask [`place`] why).
pub fn first_fit<'a>(
    ordered: impl IntoIterator<Item = Candidate<'a>>,
    request: &PlacementRequest<'_>,
) -> Option<&'a str> {
    ordered
        .into_iter()
        .find(|node| admits(node, request))
        .map(|node| node.node_id)
}

/// Whether `node` can take `request` now: [`refusal`] without the text.
fn admits(node: &Candidate<'_>, request: &PlacementRequest<'_>) -> bool {
    !request.exclude_nodes.iter().any(|id| id == node.node_id)
        && request
            .labels
            .iter()
            .all(|label| label_matches(node.labels, label))
        && request
            .affinities
            .iter()
            .all(|affinity| affinity.admits(node.labels))
        && request.resources.fits_in(node.capacity)
        && request.resources.fits_in(node.allocatable)
}

/// Why `node` cannot take `request` now, or `None` when it can.
fn refusal(node: &Candidate<'_>, request: &PlacementRequest<'_>) -> Option<String> {
    if request.exclude_nodes.iter().any(|id| id == node.node_id) {
        return Some("excluded".to_string());
    }
    let missing: Vec<&str> = request
        .labels
        .iter()
        .filter(|label| !label_matches(node.labels, label))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Some(format!("lacks label {}", missing.join(", ")));
    }
    if let Some(unmet) = yr_common::options::unmet_affinity(request.affinities, node.labels) {
        return Some(format!("does not admit {unmet}"));
    }
    if !request.resources.fits_in(node.capacity) {
        return Some(format!(
            "capacity too small ({})",
            request.resources.shortfalls(node.capacity).join(", ")
        ));
    }
    let lacking = request.resources.shortfalls(node.allocatable);
    if !lacking.is_empty() {
        return Some(format!("not enough free ({})", lacking.join(", ")));
    }
    None
}

#[cfg(test)]
mod tests;
