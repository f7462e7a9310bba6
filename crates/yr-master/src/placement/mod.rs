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
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use yr_common::{ErrorCode, ModuleCode};

    struct TestNode {
        id: &'static str,
        capacity: ResourceSet,
        allocatable: ResourceSet,
        labels: HashMap<String, String>,
    }

    fn res(cpu: i64, memory: i64) -> ResourceSet {
        ResourceSet {
            cpu_millicores: cpu,
            memory_mb: memory,
            custom: BTreeMap::new(),
        }
    }

    fn with_custom(mut set: ResourceSet, name: &str, amount: f64) -> ResourceSet {
        set.custom.insert(name.to_string(), amount);
        set
    }

    fn node(id: &'static str, capacity: ResourceSet, allocatable: ResourceSet) -> TestNode {
        TestNode {
            id,
            capacity,
            allocatable,
            labels: HashMap::new(),
        }
    }

    fn labelled(mut n: TestNode, labels: &[(&str, &str)]) -> TestNode {
        n.labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        n
    }

    fn candidates(nodes: &[TestNode]) -> Vec<Candidate<'_>> {
        nodes
            .iter()
            .map(|n| Candidate {
                node_id: n.id,
                capacity: &n.capacity,
                allocatable: &n.allocatable,
                labels: &n.labels,
            })
            .collect()
    }

    fn place_simple<'a>(
        nodes: &'a [TestNode],
        resources: &ResourceSet,
        exclude: &[&str],
        labels: &[&str],
    ) -> Result<&'a str, PlacementError> {
        let exclude: Vec<String> = exclude.iter().map(|s| s.to_string()).collect();
        let labels: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
        let request = PlacementRequest {
            resources,
            exclude_nodes: &exclude,
            labels: &labels,
            affinities: &[],
        };
        let found = candidates(nodes);
        place(&found, &request).map(|id| {
            // Map the borrowed id back to the node slice's lifetime.
            nodes.iter().find(|n| n.id == id).unwrap().id
        })
    }

    #[test]
    fn no_live_nodes_is_resource_not_enough() {
        let err = place_simple(&[], &res(100, 100), &[], &[]).unwrap_err();
        assert_eq!(err, PlacementError::NoLiveNodes);
        assert_eq!(err.code(), ErrorCode::ResourceNotEnough);
        assert_eq!(err.to_error().module_code(), ModuleCode::Core);
    }

    #[test]
    fn spread_prefers_most_free_cpu_after_placement() {
        let nodes = [
            node("a", res(4000, 4000), res(1000, 4000)),
            node("b", res(4000, 4000), res(3000, 1000)),
            node("c", res(4000, 4000), res(2000, 4000)),
        ];
        assert_eq!(place_simple(&nodes, &res(500, 500), &[], &[]).unwrap(), "b");
    }

    #[test]
    fn tie_goes_to_the_lowest_node_id() {
        let nodes = [
            node("node-b", res(4000, 4000), res(2000, 4000)),
            node("node-a", res(4000, 4000), res(2000, 4000)),
            node("node-c", res(4000, 4000), res(2000, 4000)),
        ];
        assert_eq!(
            place_simple(&nodes, &res(500, 0), &[], &[]).unwrap(),
            "node-a"
        );
    }

    #[test]
    fn roomier_node_that_lacks_memory_is_skipped() {
        let nodes = [
            node("a", res(4000, 4000), res(1000, 4000)),
            node("b", res(4000, 4000), res(3000, 100)),
        ];
        assert_eq!(place_simple(&nodes, &res(500, 500), &[], &[]).unwrap(), "a");
    }

    #[test]
    fn excluded_nodes_are_skipped() {
        let nodes = [
            node("a", res(4000, 4000), res(1000, 4000)),
            node("b", res(4000, 4000), res(3000, 4000)),
        ];
        assert_eq!(
            place_simple(&nodes, &res(500, 500), &["b"], &[]).unwrap(),
            "a"
        );
        let err = place_simple(&nodes, &res(500, 500), &["a", "b"], &[]).unwrap_err();
        assert_eq!(err.code(), ErrorCode::ResourceNotEnough);
        let text = err.to_string();
        assert!(
            text.contains("a: excluded") && text.contains("b: excluded"),
            "{text}"
        );
    }

    #[test]
    fn labels_require_key_value_or_key() {
        let nodes = [
            labelled(
                node("a", res(4000, 4000), res(1000, 4000)),
                &[("zone", "east"), ("gpu", "")],
            ),
            labelled(
                node("b", res(4000, 4000), res(3000, 4000)),
                &[("zone", "west")],
            ),
        ];
        let request = res(100, 100);
        assert_eq!(
            place_simple(&nodes, &request, &[], &["zone=east"]).unwrap(),
            "a"
        );
        assert_eq!(
            place_simple(&nodes, &request, &[], &["zone=west"]).unwrap(),
            "b"
        );
        assert_eq!(place_simple(&nodes, &request, &[], &["gpu"]).unwrap(), "a");
        assert_eq!(place_simple(&nodes, &request, &[], &["zone"]).unwrap(), "b");
        assert_eq!(
            place_simple(&nodes, &request, &[], &["zone=east", "gpu"]).unwrap(),
            "a"
        );
        let err = place_simple(&nodes, &request, &[], &["zone=north"]).unwrap_err();
        assert_eq!(err.code(), ErrorCode::ResourceNotEnough);
        assert!(err.to_string().contains("lacks label zone=north"), "{err}");
    }

    #[test]
    fn required_affinities_from_the_wire_filter_nodes_by_label() {
        let nodes = [
            labelled(
                node("a", res(4000, 4000), res(1000, 4000)),
                &[("zone", "east"), ("gpu", "")],
            ),
            labelled(
                node("b", res(4000, 4000), res(3000, 4000)),
                &[("zone", "west")],
            ),
        ];
        let condition =
            |op: pb::label_condition::Op, key: &str, values: &[&str]| pb::LabelCondition {
                op: op as i32,
                key: key.into(),
                values: values.iter().map(|v| v.to_string()).collect(),
            };
        let place_with = |affinities: Vec<pb::NodeAffinity>| {
            let affinities: Vec<Affinity> = affinities.iter().map(affinity_from_proto).collect();
            let request = PlacementRequest {
                resources: &res(100, 100),
                exclude_nodes: &[],
                labels: &[],
                affinities: &affinities,
            };
            place(&candidates(&nodes), &request).map(str::to_string)
        };
        use pb::label_condition::Op;
        // b has more free CPU; affinities move the instance to a.
        let in_east = pb::NodeAffinity {
            anti: false,
            conditions: vec![condition(Op::In, "zone", &["east", "north"])],
        };
        assert_eq!(place_with(vec![in_east]).unwrap(), "a");
        let not_west = pb::NodeAffinity {
            anti: true,
            conditions: vec![condition(Op::In, "zone", &["west"])],
        };
        assert_eq!(place_with(vec![not_west]).unwrap(), "a");
        let gpu = pb::NodeAffinity {
            anti: false,
            conditions: vec![condition(Op::Exists, "gpu", &[])],
        };
        assert_eq!(place_with(vec![gpu.clone()]).unwrap(), "a");
        let no_gpu = pb::NodeAffinity {
            anti: false,
            conditions: vec![condition(Op::NotExists, "gpu", &[])],
        };
        assert_eq!(place_with(vec![no_gpu.clone()]).unwrap(), "b");
        let error = place_with(vec![gpu, no_gpu]).unwrap_err();
        assert_eq!(error.code(), ErrorCode::ResourceNotEnough);
        let message = error.to_string();
        assert!(
            message.contains("a: does not admit required gpu does not exist")
                && message.contains("b: does not admit required gpu exists"),
            "{message}"
        );
    }

    #[test]
    fn larger_than_every_capacity_is_resource_config_error_naming_the_largest_node() {
        let nodes = [
            node("small", res(1000, 1000), res(1000, 1000)),
            node("big", res(4000, 8000), res(4000, 8000)),
        ];
        let err = place_simple(&nodes, &res(8000, 100), &[], &[]).unwrap_err();
        assert_eq!(err.code(), ErrorCode::ResourceConfigError);
        assert_eq!(
            err,
            PlacementError::ExceedsCapacity {
                request: res(8000, 100),
                largest_node: "big".into(),
                largest_capacity: res(4000, 8000),
            }
        );
        let text = err.to_string();
        assert!(
            text.starts_with("request resource is greater than each node's max resource"),
            "{text}"
        );
        assert!(
            text.contains("cpu: 8000m") && text.contains("big"),
            "{text}"
        );
        // Memory alone, too.
        let err = place_simple(&nodes, &res(100, 9000), &[], &[]).unwrap_err();
        assert_eq!(err.code(), ErrorCode::ResourceConfigError);
    }

    #[test]
    fn custom_resource_beyond_every_capacity_is_resource_config_error() {
        let nodes = [
            node(
                "a",
                with_custom(res(4000, 4000), "gpu", 1.0),
                res(4000, 4000),
            ),
            node("b", res(4000, 4000), res(4000, 4000)),
        ];
        let err =
            place_simple(&nodes, &with_custom(res(100, 100), "gpu", 2.0), &[], &[]).unwrap_err();
        assert_eq!(err.code(), ErrorCode::ResourceConfigError);
        let err =
            place_simple(&nodes, &with_custom(res(100, 100), "tpu", 1.0), &[], &[]).unwrap_err();
        assert_eq!(err.code(), ErrorCode::ResourceConfigError);
    }

    #[test]
    fn custom_resource_places_on_the_node_that_has_it() {
        let nodes = [
            node(
                "a",
                with_custom(res(4000, 4000), "gpu", 2.0),
                with_custom(res(500, 4000), "gpu", 2.0),
            ),
            node("b", res(4000, 4000), res(4000, 4000)),
        ];
        assert_eq!(
            place_simple(&nodes, &with_custom(res(100, 100), "gpu", 1.0), &[], &[]).unwrap(),
            "a"
        );
    }

    #[test]
    fn fits_capacity_but_not_allocatable_is_resource_not_enough_with_reasons() {
        let nodes = [
            node("a", res(4000, 4000), res(500, 4000)),
            node("b", res(2000, 4000), res(1000, 100)),
        ];
        let err = place_simple(&nodes, &res(1500, 500), &[], &[]).unwrap_err();
        assert_eq!(err.code(), ErrorCode::ResourceNotEnough);
        let text = err.to_string();
        assert!(
            text.contains("a: not enough free (cpu 500m of 1500m)"),
            "{text}"
        );
        assert!(
            text.contains("b: not enough free (cpu 1000m of 1500m, memory 100MB of 500MB)"),
            "{text}"
        );
    }

    #[test]
    fn node_whose_capacity_is_too_small_says_so() {
        let nodes = [
            node("a", res(4000, 4000), res(0, 4000)),
            node("b", res(1000, 4000), res(1000, 4000)),
        ];
        let err = place_simple(&nodes, &res(2000, 0), &[], &[]).unwrap_err();
        assert!(
            err.to_string()
                .contains("b: capacity too small (cpu 1000m of 2000m)"),
            "{err}"
        );
    }

    #[test]
    fn a_zero_request_fits_any_node() {
        let nodes = [node("a", res(0, 0), res(0, 0))];
        assert_eq!(place_simple(&nodes, &res(0, 0), &[], &[]).unwrap(), "a");
    }

    #[test]
    fn overcommitted_view_still_fits_only_what_is_free() {
        // A reservation can drive allocatable below zero for a moment.
        let nodes = [node("a", res(4000, 4000), res(-500, 4000))];
        let err = place_simple(&nodes, &res(100, 0), &[], &[]).unwrap_err();
        assert_eq!(err.code(), ErrorCode::ResourceNotEnough);
        assert!(err.to_string().contains("cpu 0m of 100m"), "{err}");
    }

    /// A small deterministic generator (an LCG), so the test needs no crate and repeats.
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    #[test]
    fn first_fit_in_free_cpu_order_chooses_what_place_chooses() {
        let mut rng = Lcg(7);
        let ids: Vec<&'static str> = (0..40)
            .map(|i| &*Box::leak(format!("n{i:02}").into_boxed_str()))
            .collect();
        let zones = ["east", "west", "north"];
        for round in 0..2000 {
            let count = 1 + rng.below(40) as usize;
            let nodes: Vec<TestNode> = ids[..count]
                .iter()
                .map(|id| {
                    // Coarse amounts, so ties and near misses are common.
                    let mut capacity = res(4000, 4000);
                    let mut allocatable =
                        res(rng.below(9) as i64 * 500 - 500, rng.below(5) as i64 * 1000);
                    if rng.below(4) == 0 {
                        capacity.custom.insert("gpu".into(), 2.0);
                        allocatable.custom.insert("gpu".into(), rng.below(3) as f64);
                    }
                    let zone = zones[rng.below(3) as usize];
                    let mut labels = vec![("zone", zone)];
                    if rng.below(3) == 0 {
                        labels.push(("ssd", ""));
                    }
                    labelled(node(id, capacity, allocatable), &labels)
                })
                .collect();
            let mut resources = res(rng.below(6) as i64 * 500, rng.below(4) as i64 * 1000);
            if rng.below(4) == 0 {
                resources.custom.insert("gpu".into(), 1.0);
            }
            let exclude: Vec<String> = (0..rng.below(3))
                .map(|_| ids[rng.below(count as u64) as usize].to_string())
                .collect();
            let labels: Vec<String> = match rng.below(4) {
                0 => vec![format!("zone={}", zones[rng.below(3) as usize])],
                1 => vec!["ssd".into()],
                _ => Vec::new(),
            };
            let affinities: Vec<Affinity> = if rng.below(4) == 0 {
                vec![affinity_from_proto(&pb::NodeAffinity {
                    anti: rng.below(2) == 0,
                    conditions: vec![pb::LabelCondition {
                        op: pb::label_condition::Op::In as i32,
                        key: "zone".into(),
                        values: vec![zones[rng.below(3) as usize].into()],
                    }],
                })]
            } else {
                Vec::new()
            };
            let request = PlacementRequest {
                resources: &resources,
                exclude_nodes: &exclude,
                labels: &labels,
                affinities: &affinities,
            };
            let all = candidates(&nodes);
            let mut ordered = all.clone();
            ordered.sort_by(|a, b| {
                b.allocatable
                    .cpu_millicores
                    .cmp(&a.allocatable.cpu_millicores)
                    .then_with(|| a.node_id.cmp(b.node_id))
            });
            let fast = first_fit(ordered, &request);
            let full = place(&all, &request).ok();
            assert_eq!(fast, full, "round {round}");
        }
    }

    #[test]
    fn long_reasons_are_cut() {
        let ids: Vec<&'static str> = (0..12)
            .map(|i| &*Box::leak(format!("n{i:02}").into_boxed_str()))
            .collect();
        let nodes: Vec<TestNode> = ids
            .iter()
            .map(|id| node(id, res(1000, 1000), res(0, 1000)))
            .collect();
        let err = place_simple(&nodes, &res(100, 0), &[], &[]).unwrap_err();
        assert!(err.to_string().ends_with("and 4 more"), "{err}");
    }
}
