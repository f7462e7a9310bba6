//! Unit tests of placement.

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
    let condition = |op: pb::label_condition::Op, key: &str, values: &[&str]| pb::LabelCondition {
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
    let err = place_simple(&nodes, &with_custom(res(100, 100), "gpu", 2.0), &[], &[]).unwrap_err();
    assert_eq!(err.code(), ErrorCode::ResourceConfigError);
    let err = place_simple(&nodes, &with_custom(res(100, 100), "tpu", 1.0), &[], &[]).unwrap_err();
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
