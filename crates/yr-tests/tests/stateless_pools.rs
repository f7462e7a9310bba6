//! How stateless calls share their pool on a real cluster: a burst larger than the node runs on
//! the instances that are running (it does not wait for instances that cannot be placed), and a
//! call waiting for its arguments does not hold up ready calls behind it (the argument is
//! held until the test releases it, so no machine is too slow for the ready calls). Idle
//! instances are released after the recycle time, again and again.

use std::time::{Duration, Instant};

use yr::ObjectRef;
use yr_proto::v1::InstanceState;
use yr_tests::{exclusive, NodeSpec, TestCluster, TIMEOUT};

#[yr::invoke]
fn noop() -> u32 {
    1
}

/// Returns `value` once the test writes `release` to `marker` (at most [`TIMEOUT`]).
#[yr::invoke]
fn hold(marker: String, value: u64) -> u64 {
    let released =
        || std::fs::read_to_string(&marker).is_ok_and(|text| text.lines().any(|l| l == "release"));
    yr_tests::wait_until(TIMEOUT, released);
    value
}

#[yr::invoke]
fn plus_one(value: u64) -> u64 {
    value + 1
}

/// A node with room for two stateless instances of the default shape (500 millicores each).
fn small_node() -> TestCluster {
    TestCluster::with_node(NodeSpec {
        cpu: 1_000,
        warm_pool: 2,
        ..NodeSpec::default()
    })
}

#[test]
fn a_burst_larger_than_the_node_runs_on_the_instances_that_fit_without_waiting_for_the_others() {
    let _lock = exclusive();
    let cluster = small_node();
    yr::init(cluster.config()).unwrap();
    const CALLS: usize = 1_000;
    // Warm up: the pool's first instance is running.
    assert_eq!(
        yr::get(&yr::function(noop).invoke(()).unwrap(), TIMEOUT).unwrap(),
        1
    );
    // The burst asks for more instances than fit on the node. The ones that do not fit wait
    // for their schedule timeout (30 s by default); the calls must run on the instances that
    // are running instead of waiting for them. The bound is generous: the calls take well
    // under a second on any machine, and waiting for an unplaced instance takes 30 s.
    let started = Instant::now();
    let refs: Vec<ObjectRef<u32>> = (0..CALLS)
        .map(|_| yr::function(noop).invoke(()).unwrap())
        .collect();
    let values = yr::get_all(&refs, TIMEOUT).unwrap();
    let burst = started.elapsed();
    assert_eq!(values.iter().sum::<u32>(), CALLS as u32);
    assert!(
        burst < Duration::from_secs(15),
        "{CALLS} calls at once took {burst:?}: they waited for instances that do not fit"
    );
    yr::finalize().unwrap();
}

#[test]
fn a_call_waiting_for_its_argument_does_not_hold_up_ready_calls() {
    let _lock = exclusive();
    let cluster = small_node();
    yr::init(cluster.config()).unwrap();
    // The argument is computed until the test says so, however long the ready calls take.
    let release = yr_tests::Marker::new("release");
    let slow = yr::function(hold).invoke((release.path(), 3_000)).unwrap();
    let waiting = yr::function(plus_one).invoke((&slow,)).unwrap();
    let ready: Vec<ObjectRef<u32>> = (0..50)
        .map(|_| yr::function(noop).invoke(()).unwrap())
        .collect();
    assert_eq!(yr::get_all(&ready, TIMEOUT).unwrap(), vec![1; 50]);
    // The ready calls finished while the argument of `waiting` was still being computed.
    assert!(!slow.is_ready(), "the argument was released by nobody");
    assert!(!waiting.is_ready());
    yr_tests::record(&release.path(), "release");
    assert_eq!(yr::get(&waiting, TIMEOUT).unwrap(), 3_001);
    yr::finalize().unwrap();
}

#[test]
fn idle_stateless_instances_are_released_after_the_recycle_time_each_time_the_pool_empties() {
    let _lock = exclusive();
    let cluster = small_node();
    let mut config = cluster.config();
    config.recycle_time = Duration::from_secs(1);
    yr::init(config).unwrap();
    let running = |status: &yr_proto::v1::ClusterStatusResponse| {
        status
            .instances
            .iter()
            .filter(|i| i.state == InstanceState::Running as i32)
            .count()
    };
    // Twice: the driver's recycle loop sleeps while its pools are empty, and must wake for
    // the instance the second call starts.
    for round in 0..2 {
        assert_eq!(
            yr::get(&yr::function(noop).invoke(()).unwrap(), TIMEOUT).unwrap(),
            1
        );
        cluster.wait_for_status(
            TIMEOUT,
            &format!("round {round}: the idle instance is released"),
            |status| running(status) == 0,
        );
    }
    yr::finalize().unwrap();
}
