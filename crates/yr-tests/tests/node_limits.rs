//! What a node refuses and why: invokes while memory is critically low (1005), and runtimes that
//! cannot start (3012, with the end of their stderr).

use yr::{ErrorCode, InvokeOptions};
use yr_tests::{assert_error, call_err, exclusive, NodeSpec, TestCluster, TIMEOUT};

#[yr::instance]
pub struct Echo {
    value: u32,
}

#[yr::instance]
impl Echo {
    pub fn new(value: u32) -> Self {
        Echo { value }
    }

    pub fn value(&self) -> u32 {
        self.value
    }
}

#[test]
fn invokes_are_rejected_with_invoke_rate_limited_while_memory_is_critically_low() {
    let _lock = exclusive();
    // Every byte free still counts as "critically low" with a ratio of 1.0.
    let cluster = TestCluster::with_node(NodeSpec {
        env: vec![("YR_MEMORY_CRITICAL_RATIO".into(), "1.0".into())],
        ..NodeSpec::default()
    });
    yr::init(cluster.config()).unwrap();
    let echo = yr::instance(Echo::new).invoke((7,)).unwrap();
    let error = call_err(echo.method(Echo::value).invoke(()), TIMEOUT);
    assert_error(
        &error,
        &[ErrorCode::InvokeRateLimited],
        &["memory", "retry later"],
    );
    yr::finalize().unwrap();
}

#[test]
fn invokes_pass_when_memory_is_not_low() {
    let _lock = exclusive();
    let cluster = TestCluster::with_node(NodeSpec {
        env: vec![("YR_MEMORY_CRITICAL_RATIO".into(), "0.0".into())],
        ..NodeSpec::default()
    });
    yr::init(cluster.config()).unwrap();
    let echo = yr::instance(Echo::new).invoke((7,)).unwrap();
    assert_eq!(
        yr::get(&echo.method(Echo::value).invoke(()).unwrap(), TIMEOUT).unwrap(),
        7
    );
    yr::finalize().unwrap();
}

#[test]
fn a_runtime_that_cannot_start_is_runtime_manager_operation_error_with_its_stderr() {
    let _lock = exclusive();
    let cluster = TestCluster::with_node(NodeSpec {
        warm_pool: 0,
        ..NodeSpec::default()
    });
    let config = cluster.config();
    // The test harness refuses this flag, prints why on stderr and exits before it connects.
    std::env::set_var("YR_RUNTIME_ARGS", "--no-such-flag-for-the-harness");
    yr::init(config).unwrap();
    let options = InvokeOptions {
        name: Some("never-starts".into()),
        ..Default::default()
    };
    let echo = yr::instance(Echo::new)
        .options(options)
        .invoke((1,))
        .unwrap();
    let error = call_err(echo.method(Echo::value).invoke(()), TIMEOUT);
    yr_tests::use_this_binary_as_runtime();
    assert_error(
        &error,
        &[ErrorCode::RuntimeManagerOperationError],
        &["failed to start", "no-such-flag-for-the-harness"],
    );
    yr::finalize().unwrap();
}
