//! An instance handle passed to code on a third node: the driver's node places the instance on
//! one node and the function that receives the handle on another, which looks the instance up
//! by id in the meta store. The function may run before the instance does (its constructor
//! is slow here), and then waits for it instead of failing with 1003.

use std::time::Duration;

use yr::{
    Affinity, AffinityKind, AffinityType, InstanceHandle, InvokeOptions, LabelOp, LabelOperator,
};
use yr_tests::{exclusive, NodeSpec, TestCluster, TIMEOUT};

#[yr::instance]
pub struct Slow {
    total: i64,
}

#[yr::instance]
impl Slow {
    /// Takes `ms` to start.
    pub fn new(ms: u64) -> Self {
        std::thread::sleep(Duration::from_millis(ms));
        Slow { total: 0 }
    }

    pub fn add(&mut self, n: i64) -> i64 {
        self.total += n;
        self.total
    }
}

/// Calls the instance it is handed.
#[yr::invoke]
fn add_through(slow: InstanceHandle<Slow>, n: i64) -> Result<i64, yr::Error> {
    let total = slow.method(Slow::add).invoke((n,))?;
    yr::get(&total, TIMEOUT)
}

fn in_zone(zone: &str) -> InvokeOptions {
    InvokeOptions {
        schedule_affinities: vec![Affinity {
            affinity_kind: AffinityKind::Resource,
            affinity_type: AffinityType::Required,
            label_operators: vec![LabelOperator {
                op: LabelOp::In,
                key: "zone".into(),
                values: vec![zone.into()],
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[test]
fn a_handle_passed_to_a_third_node_waits_for_an_instance_still_starting() {
    let _lock = exclusive();
    let zone = |name: &str| NodeSpec {
        labels: vec![("zone".to_string(), name.to_string())],
        ..NodeSpec::default()
    };
    let cluster = TestCluster::builder()
        .node(zone("driver"))
        .node(zone("instance"))
        .node(zone("function"))
        .start();
    yr::init(cluster.config()).unwrap();
    let slow = yr::instance(Slow::new)
        .options(in_zone("instance"))
        .invoke((1_500u64,))
        .unwrap();
    let total = yr::function(add_through)
        .options(in_zone("function"))
        .invoke((slow.clone(), 5))
        .unwrap();
    assert_eq!(yr::get(&total, TIMEOUT).unwrap(), 5);
    assert_eq!(
        yr::get(&slow.method(Slow::add).invoke((1,)).unwrap(), TIMEOUT).unwrap(),
        6
    );
    yr::finalize().unwrap();
}
