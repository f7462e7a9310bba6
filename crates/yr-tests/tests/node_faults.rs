//! The node's recovery paths, reached through its fail points (`FAILPOINTS` of the node
//! process, design 013): a record write the meta store does not answer, a forward to a node that
//! cannot be reached, and an init call that is lost. Each asserts what users see: the instance
//! still runs and is recorded, or its creator gets the code, never a hang.

use yr::{ErrorCode, InvokeOptions};
use yr_proto::v1::InstanceState;
use yr_tests::{assert_error, call_err, exclusive, wait_until, NodeSpec, TestCluster, TIMEOUT};

#[yr::instance]
pub struct Tally {
    total: i64,
}

#[yr::instance]
impl Tally {
    pub fn new() -> Self {
        Tally { total: 0 }
    }

    pub fn add(&mut self, n: i64) -> i64 {
        self.total += n;
        self.total
    }
}

fn failing(fail_points: &str, cpu: u64) -> NodeSpec {
    NodeSpec {
        cpu,
        env: vec![("FAILPOINTS".to_string(), fail_points.to_string())],
        ..NodeSpec::default()
    }
}

/// The state the master's view gives `instance_id`.
fn recorded_state(cluster: &TestCluster, instance_id: &str) -> Option<InstanceState> {
    let status = cluster.status().ok()?;
    status
        .instances
        .iter()
        .find(|summary| summary.instance_id == instance_id)
        .map(|summary| summary.state())
}

#[test]
fn record_writes_the_store_does_not_answer_are_retried_until_the_instance_is_recorded_running() {
    let _lock = exclusive();
    // The node's first five record writes get no answer.
    let cluster = TestCluster::builder()
        .node(failing("proxy::record_write=5*return", 4_000))
        .start();
    yr::init(cluster.config()).unwrap();
    let tally = yr::instance(Tally::new).invoke(()).unwrap();
    // Calls do not wait for the record.
    let sum = tally.method(Tally::add).invoke((2,)).unwrap();
    assert_eq!(yr::get(&sum, TIMEOUT).unwrap(), 2);
    assert!(
        wait_until(TIMEOUT, || recorded_state(&cluster, tally.id())
            == Some(InstanceState::Running)),
        "the instance was not recorded RUNNING after the store answered: {:?}",
        recorded_state(&cluster, tally.id())
    );
    yr::finalize().unwrap();
}

#[test]
fn a_forward_to_a_node_that_cannot_be_reached_fails_the_create_with_3002() {
    let _lock = exclusive();
    // The driver's node is too small for the instance, and cannot reach the other node.
    let cluster = TestCluster::builder()
        .node(failing("proxy::forward=return", 1_000))
        .node(NodeSpec {
            cpu: 4_000,
            ..NodeSpec::default()
        })
        .start();
    yr::init(cluster.config()).unwrap();
    let tally = yr::instance(Tally::new)
        .options(InvokeOptions {
            cpu: 2_000,
            ..Default::default()
        })
        .invoke(())
        .unwrap();
    let error = call_err(tally.method(Tally::add).invoke((1,)), TIMEOUT);
    assert_error(
        &error,
        &[ErrorCode::InnerCommunication],
        &["cannot be reached"],
    );
    yr::finalize().unwrap();
}

#[test]
fn a_lost_init_call_fails_the_instance_and_its_callers_get_2002() {
    let _lock = exclusive();
    let cluster = TestCluster::builder()
        .node(failing("proxy::init_call=return", 4_000))
        .start();
    yr::init(cluster.config()).unwrap();
    let tally = yr::instance(Tally::new).invoke(()).unwrap();
    let error = call_err(tally.method(Tally::add).invoke((1,)), TIMEOUT);
    assert_error(
        &error,
        &[ErrorCode::UserFunctionException],
        &["exited while its constructor ran"],
    );
    assert!(
        wait_until(TIMEOUT, || recorded_state(&cluster, tally.id())
            == Some(InstanceState::Fatal)),
        "the instance was not recorded FATAL: {:?}",
        recorded_state(&cluster, tally.id())
    );
    yr::finalize().unwrap();
}
