//! An etcd outage under a running cluster (docs/design/024-partitions-and-etcd-outage.md): a
//! master on a real single-member etcd, a node, and a driver with a stateful instance. etcd is
//! killed and, later, started again on the same data dir.
//!
//! - Calls to the running instance keep working throughout: they go from the driver to the
//!   node to the runtime, and none of them needs the meta store.
//! - A control operation (a create) fails with 3005 within a bound, never a hang.
//! - When etcd returns, creates succeed again, and nothing is lost: the instance created
//!   before the outage keeps its record (RUNNING, same node and incarnation) and its state,
//!   and the node is still registered as the same incarnation, never declared lost.
//! - An instance the master could re-create elsewhere (stateful, a restart left, detached)
//!   keeps serving too: no master acknowledges the node's beats, but every master answers that
//!   it does not lead, so no one can move the instance and the node does not fence itself.

#[path = "../../yr-meta/tests/common/etcd.rs"]
mod etcd;

use std::time::{Duration, Instant};

use etcd::Etcd;
use yr::{ErrorCode, InstanceHandle, InvokeOptions};
use yr_proto::v1::InstanceState;
use yr_tests::{exclusive, stopped, unique, wait_until, Tally, TestCluster, TIMEOUT};

/// How long a control operation may take to fail while etcd is down: the meta store's retry
/// budget (4 s) for each of the few store calls a create makes, with room for a loaded machine.
const CONTROL_BOUND: Duration = Duration::from_secs(30);

/// How long etcd stays down while the instance is called: past the leader lease (2 s) and the
/// node timeout (3 s), so that any path that needs etcd to keep a node or a master alive shows.
const OUTAGE: Duration = Duration::from_secs(8);

fn add(tally: &InstanceHandle<Tally>, n: i64) -> yr::Result<i64> {
    yr::get(&tally.method(Tally::add).invoke((n,))?, TIMEOUT)
}

/// More than the driver's node has: the master places it (on the second node).
fn placed_by_the_master() -> InvokeOptions {
    InvokeOptions {
        cpu: 2_000,
        ..Default::default()
    }
}

/// A create that the master places, and its first call: the error of whichever fails.
fn create_and_call(start: i64) -> yr::Result<(InstanceHandle<Tally>, i64)> {
    let tally = yr::instance(Tally::new)
        .options(placed_by_the_master())
        .invoke((start,))?;
    let value = add(&tally, 1)?;
    Ok((tally, value))
}

#[test]
fn calls_keep_working_while_etcd_is_down_and_control_operations_fail_with_3005_until_it_returns() {
    let _exclusive = exclusive();
    let mut etcd = Etcd::single("outage");
    let prefix = format!("/yr/{}", unique("outage"));
    let cluster = TestCluster::builder()
        .master_args(["--etcd", &etcd.endpoint(), "--etcd-prefix", &prefix])
        .node_timeout(3.0)
        .small_and_large_node()
        .start();
    let node_id = cluster.node_id(1).to_string();
    let incarnation = cluster.node_incarnation(1);
    yr::init(cluster.config()).unwrap();

    let tally = yr::instance(Tally::new)
        .options(placed_by_the_master())
        .invoke((0,))
        .unwrap();
    let id = tally.id().to_string();
    assert_eq!(add(&tally, 1).unwrap(), 1);
    assert!(
        wait_until(TIMEOUT, || cluster.stored_instance(&id).is_ok_and(
            |r| r.is_some_and(|r| r.state() == InstanceState::Running)
        )),
        "the instance is recorded RUNNING: {:?}",
        cluster.stored_instance(&id)
    );
    let before = cluster.stored_instance(&id).unwrap().unwrap();

    // The outage.
    etcd.members[0].kill();
    let down = Instant::now();
    let mut expected = 1;
    let mut calls = 0;
    let mut slowest = Duration::ZERO;
    while down.elapsed() < OUTAGE {
        let call = Instant::now();
        expected += 1;
        assert_eq!(
            add(&tally, 1).unwrap_or_else(|e| panic!(
                "a call {:?} into the outage failed: {e}; master log:\n{}",
                down.elapsed(),
                cluster.master_log_tail(20)
            )),
            expected
        );
        slowest = slowest.max(call.elapsed());
        calls += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("etcd-outage: {calls} calls in {OUTAGE:?} with etcd down, the slowest {slowest:?}");

    // A control operation fails with 3005, within a bound.
    let started = Instant::now();
    let error = match create_and_call(100) {
        Ok((_, value)) => panic!("a create succeeded with etcd down ({value})"),
        Err(error) => error,
    };
    let took = started.elapsed();
    eprintln!("etcd-outage: the create failed after {took:?}: {error}");
    assert_eq!(
        error.code(),
        ErrorCode::EtcdOperationError,
        "the create fails with 3005: {error}; master log:\n{}",
        cluster.master_log_tail(20)
    );
    assert!(took < CONTROL_BOUND, "the create failed after {took:?}");
    expected += 1;
    assert_eq!(add(&tally, 1).unwrap(), expected, "calls still work");

    // etcd returns on the same data dir: creates succeed again.
    etcd.members[0].restart();
    let back = Instant::now();
    let mut created = None;
    let mut last = None;
    let recovered = wait_until(Duration::from_secs(60), || match create_and_call(200) {
        Ok(done) => {
            created = Some(done);
            true
        }
        Err(error) => {
            last = Some(error);
            false
        }
    });
    assert!(
        recovered,
        "no create succeeded within 60 s of etcd's return: {last:?}; master log:\n{}",
        cluster.master_log_tail(30)
    );
    eprintln!(
        "etcd-outage: creates work again {:?} after etcd's return",
        back.elapsed()
    );
    let (fresh, value) = created.expect("the create");
    assert_eq!(value, 201);
    assert_eq!(add(&fresh, 1).unwrap(), 202);

    // Nothing was lost: the instance's record, its state, and the node's registration.
    expected += 1;
    assert_eq!(add(&tally, 1).unwrap(), expected);
    let after = cluster.stored_instance(&id).unwrap().expect("the record");
    assert_eq!(after.state(), InstanceState::Running, "{after:?}");
    assert_eq!(after.node_id, before.node_id);
    assert_eq!(after.node_incarnation, before.node_incarnation);
    assert!(!after.written_by_master, "{after:?}");
    let status = cluster.wait_for_status(TIMEOUT, "the node alive", |status| {
        status
            .nodes
            .iter()
            .any(|n| n.node_id == node_id && n.state == "alive")
    });
    let node = status
        .nodes
        .iter()
        .find(|n| n.node_id == node_id)
        .expect("the node");
    assert_eq!(
        node.incarnation, incarnation,
        "the node was never declared lost"
    );
    assert!(
        status
            .instances
            .iter()
            .any(|i| i.instance_id == id && i.state == InstanceState::Running as i32),
        "{status:?}"
    );
    assert_eq!(
        cluster
            .master_metric("yr_master_nodes_lost_total")
            .unwrap_or_default(),
        0.0,
        "no node was declared lost"
    );
    yr::finalize().unwrap();
}

#[test]
fn a_movable_instance_keeps_serving_through_an_etcd_outage_since_no_master_can_move_it() {
    let _exclusive = exclusive();
    let mut etcd = Etcd::single("outage-pause");
    let prefix = format!("/yr/{}", unique("outage-pause"));
    let cluster = TestCluster::builder()
        .master_args(["--etcd", &etcd.endpoint(), "--etcd-prefix", &prefix])
        .node_timeout(3.0)
        .start();
    let node_id = cluster.node_id(0).to_string();
    let incarnation = cluster.node_incarnation(0);
    yr::init(cluster.config()).unwrap();
    let keeper = yr_tests::movable_tally(0);
    let id = keeper.id().to_string();
    let add = |n: i64| yr::get(&keeper.method(Tally::add).invoke((n,)).unwrap(), TIMEOUT);
    assert_eq!(add(1).unwrap(), 1);
    let pid = yr::get(&keeper.method(Tally::pid).invoke(()).unwrap(), TIMEOUT).unwrap();

    // The outage: the master steps down and acknowledges no beat. But it answers that it does
    // not lead, and it is every master the node knows: no one can move the instance, so the
    // node does not pause it.
    etcd.members[0].kill();
    assert!(
        wait_until(Duration::from_secs(30), || cluster.status().is_err()),
        "the master stepped down"
    );
    // Well past the moment an unanswered lease would have paused it (2 s after the last
    // acknowledged beat): every call is served at once, by the same runtime.
    let window = Instant::now();
    let mut total = 1;
    while window.elapsed() < Duration::from_secs(6) {
        let started = Instant::now();
        total = add(1).unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a call during the outage took {:?}: the instance was paused",
            started.elapsed()
        );
        assert!(
            !stopped(pid),
            "the node paused the instance during the outage"
        );
    }
    eprintln!("etcd-outage: the movable instance served calls through the outage ({total})");
    assert_eq!(
        cluster.node_metric(0, "yr_node_self_fences_total"),
        Some(0.0),
        "the node never fenced itself"
    );

    // etcd returns: a master leads again, and the node registers as the same incarnation.
    etcd.members[0].restart();
    assert_eq!(add(1).unwrap(), total + 1);
    assert_eq!(
        yr::get(&keeper.method(Tally::pid).invoke(()).unwrap(), TIMEOUT).unwrap(),
        pid,
        "the same runtime"
    );
    let status = cluster.wait_for_status(TIMEOUT, "the node alive", |status| {
        status
            .nodes
            .iter()
            .any(|n| n.node_id == node_id && n.state == "alive")
    });
    let node = status
        .nodes
        .iter()
        .find(|n| n.node_id == node_id)
        .expect("the node");
    assert_eq!(node.incarnation, incarnation, "never declared lost");
    let record = cluster.stored_instance(&id).unwrap().expect("the record");
    assert_eq!(record.state(), InstanceState::Running, "{record:?}");
    assert_eq!(record.restarts, 0, "{record:?}");
    yr::finalize().unwrap();
}
