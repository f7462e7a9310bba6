//! Two nodes on one machine form a real two-node cluster: an instance that does not fit on the
//! caller's node runs on the other, calls and results cross nodes, named lookups and kills work
//! across nodes, and the driver's binary reaches the other node.

use std::time::Duration;

use yr::{Affinity, AffinityKind, AffinityType, ErrorCode, InvokeOptions, LabelOp, LabelOperator};
use yr_tests::{assert_error, call_err, exclusive, NodeSpec, TestCluster, TIMEOUT};

/// Reports which node's runtime it runs in.
#[yr::instance]
pub struct Where {
    calls: u64,
}

#[yr::instance]
impl Where {
    pub fn new() -> Self {
        Where { calls: 0 }
    }

    /// The runtime id, which starts with the node id.
    pub fn runtime(&mut self) -> String {
        self.calls += 1;
        std::env::var("YR_RUNTIME_ID").unwrap_or_default()
    }

    /// Echoes a value back, with the number of calls so far.
    pub fn echo(&mut self, value: Vec<u8>) -> (Vec<u8>, u64) {
        self.calls += 1;
        (value, self.calls)
    }
}

/// The runtime id of the stateless instance that ran it.
#[yr::invoke]
fn runtime_of_function() -> String {
    std::env::var("YR_RUNTIME_ID").unwrap_or_default()
}

fn big(cpu: u32) -> InvokeOptions {
    InvokeOptions {
        cpu,
        ..Default::default()
    }
}

fn two_nodes(second: NodeSpec) -> TestCluster {
    TestCluster::builder()
        .node(NodeSpec {
            cpu: 1_000,
            ..NodeSpec::default()
        })
        .node(second)
        .start()
}

#[test]
fn an_instance_too_big_for_the_callers_node_runs_on_the_other_node() {
    let _lock = exclusive();
    let cluster = two_nodes(NodeSpec {
        cpu: 4_000,
        ..NodeSpec::default()
    });
    yr::init(cluster.config()).unwrap();
    let there = yr::instance(Where::new)
        .options(big(2_000))
        .invoke(())
        .unwrap();
    let runtime = yr::get(&there.method(Where::runtime).invoke(()).unwrap(), TIMEOUT).unwrap();
    assert!(
        runtime.starts_with(cluster.node_id(1)),
        "the instance ran in {runtime}, not on {}",
        cluster.node_id(1)
    );
    // Calls and results cross nodes, in order, with large values too.
    let payload = vec![7u8; 300_000];
    let refs: Vec<_> = (0..20)
        .map(|_| {
            there
                .method(Where::echo)
                .invoke((payload.clone(),))
                .unwrap()
        })
        .collect();
    let results = yr::get_all(&refs, TIMEOUT).unwrap();
    for (i, (value, calls)) in results.iter().enumerate() {
        assert_eq!(value, &payload);
        assert_eq!(*calls, i as u64 + 2);
    }
    // A small instance stays on the caller's node.
    let here = yr::instance(Where::new).invoke(()).unwrap();
    let runtime = yr::get(&here.method(Where::runtime).invoke(()).unwrap(), TIMEOUT).unwrap();
    assert!(runtime.starts_with(cluster.node_id(0)), "{runtime}");
    yr::finalize().unwrap();
}

#[test]
fn a_stateless_call_too_big_for_the_callers_node_runs_on_the_other_node() {
    let _lock = exclusive();
    let cluster = two_nodes(NodeSpec {
        cpu: 4_000,
        ..NodeSpec::default()
    });
    yr::init(cluster.config()).unwrap();
    let runtime = yr::function(runtime_of_function)
        .options(big(2_000))
        .invoke(())
        .unwrap();
    let runtime = yr::get(&runtime, TIMEOUT).unwrap();
    assert!(runtime.starts_with(cluster.node_id(1)), "{runtime}");
    yr::finalize().unwrap();
}

#[test]
fn named_instances_on_the_other_node_can_be_found_and_killed() {
    let _lock = exclusive();
    let cluster = two_nodes(NodeSpec {
        cpu: 4_000,
        ..NodeSpec::default()
    });
    yr::init(cluster.config()).unwrap();
    let mut options = big(2_000);
    options.name = Some("far-away".into());
    let created = yr::instance(Where::new)
        .options(options)
        .invoke(())
        .unwrap();
    yr::get(&created.method(Where::runtime).invoke(()).unwrap(), TIMEOUT).unwrap();
    let found = yr::get_instance::<Where>("far-away", "", Duration::from_secs(5)).unwrap();
    assert_eq!(found.id(), created.id());
    yr::kill_instance(found.id()).unwrap();
    let error = call_err(created.method(Where::runtime).invoke(()), TIMEOUT);
    assert_error(&error, &[ErrorCode::InstanceExited], &[]);
    yr::finalize().unwrap();
}

#[test]
fn the_drivers_binary_is_fetched_by_a_node_that_does_not_share_it() {
    let _lock = exclusive();
    let cluster = two_nodes(NodeSpec {
        cpu: 4_000,
        fetch_binaries: true,
        ..NodeSpec::default()
    });
    yr::init(cluster.config()).unwrap();
    let there = yr::instance(Where::new)
        .options(big(2_000))
        .invoke(())
        .unwrap();
    let runtime = yr::get(&there.method(Where::runtime).invoke(()).unwrap(), TIMEOUT).unwrap();
    assert!(runtime.starts_with(cluster.node_id(1)), "{runtime}");
    let fetched: Vec<_> = std::fs::read_dir(cluster.node_session(1).join("binaries"))
        .map(|entries| entries.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert_eq!(fetched.len(), 1, "one fetched binary in {:?}", fetched);
    let size = std::fs::metadata(&fetched[0]).unwrap().len();
    let own = std::fs::metadata(std::env::current_exe().unwrap())
        .unwrap()
        .len();
    assert_eq!(size, own, "the fetched binary is the driver's");
    yr::finalize().unwrap();
}

fn zone(affinity_type: AffinityType, zone: &str) -> InvokeOptions {
    InvokeOptions {
        schedule_affinities: vec![Affinity {
            affinity_kind: AffinityKind::Resource,
            affinity_type,
            label_operators: vec![LabelOperator {
                op: LabelOp::In,
                key: "zone".into(),
                values: vec![zone.into()],
            }],
            ..Default::default()
        }],
        schedule_timeout_ms: 2_000,
        ..Default::default()
    }
}

#[test]
fn required_affinities_place_instances_and_calls_on_the_nodes_whose_labels_admit_them() {
    let _lock = exclusive();
    let labelled = |zone: &str| NodeSpec {
        labels: vec![("zone".to_string(), zone.to_string())],
        ..NodeSpec::default()
    };
    let cluster = TestCluster::builder()
        .node(labelled("east"))
        .node(labelled("west"))
        .start();
    yr::init(cluster.config()).unwrap();
    // The driver is on the east node; the instance needs the west one.
    let west = yr::instance(Where::new)
        .options(zone(AffinityType::Required, "west"))
        .invoke(())
        .unwrap();
    let runtime = yr::get(&west.method(Where::runtime).invoke(()).unwrap(), TIMEOUT).unwrap();
    assert!(runtime.starts_with(cluster.node_id(1)), "{runtime}");
    // Not on east: the west node again.
    let not_east = yr::instance(Where::new)
        .options(zone(AffinityType::RequiredAnti, "east"))
        .invoke(())
        .unwrap();
    let runtime = yr::get(
        &not_east.method(Where::runtime).invoke(()).unwrap(),
        TIMEOUT,
    )
    .unwrap();
    assert!(runtime.starts_with(cluster.node_id(1)), "{runtime}");
    // An east instance stays on the driver's node.
    let east = yr::instance(Where::new)
        .options(zone(AffinityType::Required, "east"))
        .invoke(())
        .unwrap();
    let runtime = yr::get(&east.method(Where::runtime).invoke(()).unwrap(), TIMEOUT).unwrap();
    assert!(runtime.starts_with(cluster.node_id(0)), "{runtime}");
    // Stateless calls too.
    let runtime = yr::function(runtime_of_function)
        .options(zone(AffinityType::Required, "west"))
        .invoke(())
        .unwrap();
    let runtime = yr::get(&runtime, TIMEOUT).unwrap();
    assert!(runtime.starts_with(cluster.node_id(1)), "{runtime}");
    // No node in the north: the create is cancelled after its schedule timeout, with the
    // reason.
    let nowhere = yr::instance(Where::new)
        .options(zone(AffinityType::Required, "north"))
        .invoke(())
        .unwrap();
    let error = call_err(nowhere.method(Where::runtime).invoke(()), TIMEOUT);
    assert_error(
        &error,
        &[ErrorCode::ScheduleCanceled],
        &["2000 ms", "does not admit required zone in [north]"],
    );
    yr::finalize().unwrap();
}
