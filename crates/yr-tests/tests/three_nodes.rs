//! Three nodes on one machine, the driver on the first, its work placed on the others by node
//! labels. An instance handle passed to code on a third node: the function that receives it
//! looks the instance up by id in the meta store, may run before the instance does (its
//! constructor is slow here), and then waits for it instead of failing with 1003. User code on a
//! node where no driver registered creates an instance there, and on the third node, whose
//! runtimes start as the driver's do.

use std::time::Duration;

use yr::{InstanceHandle, InvokeOptions};
use yr_tests::{exclusive, on_label, NodeSpec, TestCluster, TIMEOUT};

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

    /// Whether its runtime was started to run one test (`--exact`), not the whole binary.
    pub fn runs_one_test(&self) -> bool {
        std::env::args().any(|arg| arg == "--exact")
    }
}

/// From user code: an instance here and one in `zone`, each called once; returns whether
/// both runtimes were started to run one test, as the driver's are.
#[yr::invoke]
fn create_here_and_in(zone: String) -> Result<(i64, i64, bool), yr::Error> {
    let here = yr::instance(Slow::new).invoke((0u64,))?;
    let there = yr::instance(Slow::new)
        .options(in_zone(&zone))
        .invoke((0u64,))?;
    let alone = [&here, &there]
        .iter()
        .map(|instance| yr::get(&instance.method(Slow::runs_one_test).invoke(())?, TIMEOUT))
        .collect::<Result<Vec<bool>, yr::Error>>()?;
    Ok((
        yr::get(&here.method(Slow::add).invoke((2,))?, TIMEOUT)?,
        yr::get(&there.method(Slow::add).invoke((3,))?, TIMEOUT)?,
        alone.iter().all(|alone| *alone),
    ))
}

/// Calls the instance it is handed.
#[yr::invoke]
fn add_through(slow: InstanceHandle<Slow>, n: i64) -> Result<i64, yr::Error> {
    let total = slow.method(Slow::add).invoke((n,))?;
    yr::get(&total, TIMEOUT)
}

fn in_zone(zone: &str) -> InvokeOptions {
    on_label("zone", zone)
}

/// Three nodes labelled `zone=driver`, `zone=instance` and `zone=function`; the driver
/// connects to the first.
fn three_zones() -> TestCluster {
    let zone = |name: &str| NodeSpec {
        labels: vec![("zone".to_string(), name.to_string())],
        ..NodeSpec::default()
    };
    TestCluster::builder()
        .node(zone("driver"))
        .node(zone("instance"))
        .node(zone("function"))
        .start()
}

#[test]
fn a_handle_passed_to_a_third_node_waits_for_an_instance_still_starting() {
    let _lock = exclusive();
    let cluster = three_zones();
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

#[test]
fn user_code_on_a_node_without_a_driver_creates_instances_there_and_on_a_third_node() {
    let _lock = exclusive();
    let cluster = three_zones();
    yr::init(cluster.config()).unwrap();
    // The function is the first work of the "function" node, and the instance in the
    // "instance" zone the first of that node: no driver registered there.
    let created = yr::function(create_here_and_in)
        .options(in_zone("function"))
        .invoke(("instance".to_string(),))
        .unwrap();
    assert_eq!(yr::get(&created, TIMEOUT).unwrap(), (2, 3, true));
    yr::finalize().unwrap();
}

#[test]
fn a_kill_from_another_node_is_never_sent_on() {
    let _lock = exclusive();
    let cluster = three_zones();
    yr::init(cluster.config()).unwrap();
    // Created through the driver's node (node 0), which forwards it; it runs on node 1.
    let slow = yr::instance(Slow::new)
        .options(in_zone("instance"))
        .invoke((0u64,))
        .unwrap();
    assert_eq!(
        yr::get(&slow.method(Slow::add).invoke((1,)).unwrap(), TIMEOUT).unwrap(),
        1
    );
    // A node's kill reaches the node that runs the instance; one that reaches the forwarding
    // node instead is refused there, not sent on (two nodes' stale views could otherwise send
    // it back and forth).
    let refused = cluster
        .kill_through_node(0, slow.id())
        .expect_err("node 0 only forwards the instance");
    assert!(refused.contains("is not on this node"), "{refused}");
    assert_eq!(
        yr::get(&slow.method(Slow::add).invoke((1,)).unwrap(), TIMEOUT).unwrap(),
        2,
        "the instance runs on"
    );
    cluster
        .kill_through_node(1, slow.id())
        .expect("node 1 runs it and kills it");
    let error = yr::get(&slow.method(Slow::add).invoke((1,)).unwrap(), TIMEOUT).unwrap_err();
    assert_eq!(error.code(), yr::ErrorCode::InstanceExited, "{error}");
    yr::finalize().unwrap();
}
