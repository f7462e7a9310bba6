//! Faults of a runtime process under a running instance: killed (SIGKILL) mid-call, with and
//! without `recover_retry_times`; crashing on a call (the `runtime::crash_on_call` fail point)
//! until the restarts run out; a replay that cannot reach the restarted runtime (the
//! `runtime::call_replay` fail point); exiting by itself; hung (SIGSTOP) and found by the node's
//! heartbeats. Callers must get the right code, never hang. Each fault is reached through an
//! event (a marker line, a fail point), never a sleep that hopes a call is running.

use std::time::{Duration, Instant};

use yr::{ErrorCode, InvokeOptions};
use yr_proto::v1::InstanceState;
use yr_tests::{
    alive, assert_error, call_err, exclusive, record, signal, unwrap_err, Marker, NodeSpec,
    TestCluster, TIMEOUT,
};

/// An instance whose constructor and naps leave lines in a marker file.
#[yr::instance]
pub struct Sleeper {
    marker: String,
}

#[yr::instance]
impl Sleeper {
    pub fn new(marker: String) -> Self {
        record(&marker, "constructed");
        Sleeper { marker }
    }

    /// The pid of the runtime process that runs this instance.
    pub fn pid(&self) -> u32 {
        std::process::id()
    }

    /// Sleeps `ms`, then returns it.
    pub fn nap(&self, ms: u64) -> u64 {
        record(&self.marker, "nap");
        std::thread::sleep(Duration::from_millis(ms));
        ms
    }

    /// In the instance's first incarnation, blocks (until the test kills the runtime); in a
    /// restarted one, returns `value` at once. Either way it marks that it started.
    pub fn hold_until_restarted(&self, value: u64) -> u64 {
        let incarnation = std::fs::read_to_string(&self.marker)
            .map(|text| text.lines().filter(|l| *l == "constructed").count())
            .unwrap_or(0);
        record(&self.marker, "hold");
        if incarnation < 2 {
            std::thread::sleep(Duration::from_secs(600));
        }
        value
    }

    /// A call the `runtime::crash_on_call=return(doomed)` fail point crashes the runtime on.
    pub fn doomed(&self) -> u64 {
        record(&self.marker, "doomed ran");
        0
    }

    /// Ends the runtime process with exit code 0.
    pub fn exit(&self) -> u32 {
        std::process::exit(0)
    }
}

/// Exits its runtime process the first time it runs (as counted in `marker`), then returns
/// `value`.
#[yr::invoke]
fn exit_once(marker: String, value: i64) -> i64 {
    let first = std::fs::read_to_string(&marker)
        .map(|text| text.lines().count() == 0)
        .unwrap_or(false);
    record(&marker, "attempt");
    if first {
        std::process::exit(0);
    }
    value
}

fn instance_state(cluster: &TestCluster, instance_id: &str) -> Option<InstanceState> {
    cluster.status().ok().and_then(|status| {
        status
            .instances
            .iter()
            .find(|i| i.instance_id == instance_id)
            .and_then(|i| InstanceState::try_from(i.state).ok())
    })
}

#[test]
fn runtime_killed_mid_call_fails_callers_with_user_function_exception() {
    let _exclusive = exclusive();
    let cluster = TestCluster::start();
    yr::init(cluster.config()).unwrap();
    let marker = Marker::new("killed");
    let sleeper = yr::instance(Sleeper::new).invoke((marker.path(),)).unwrap();
    let pid = yr::get(&sleeper.method(Sleeper::pid).invoke(()).unwrap(), TIMEOUT).unwrap();
    assert!(
        cluster.runtime_pids(0).contains(&pid),
        "the instance runs in a runtime process of the node"
    );

    let pending = sleeper.method(Sleeper::nap).invoke((60_000,)).unwrap();
    assert!(marker.wait_for("nap", 1, TIMEOUT), "the call started");
    assert!(signal(pid, libc::SIGKILL));
    let killed_at = Instant::now();

    let error = unwrap_err(yr::get(&pending, TIMEOUT));
    assert_error(
        &error,
        &[ErrorCode::UserFunctionException],
        &["crashed", "SIGKILL"],
    );
    assert!(
        killed_at.elapsed() < Duration::from_secs(15),
        "the pending call failed only after {:?}",
        killed_at.elapsed()
    );

    // Later calls fail at once (or on get) instead of hanging.
    let started = Instant::now();
    let later = call_err(sleeper.method(Sleeper::pid).invoke(()), TIMEOUT);
    assert_error(
        &later,
        &[ErrorCode::InstanceExited, ErrorCode::UserFunctionException],
        &[],
    );
    assert!(started.elapsed() < Duration::from_secs(15));

    // Without recover_retry_times the instance is FATAL and is not restarted.
    let id = sleeper.id().to_string();
    cluster.wait_for_status(TIMEOUT, "the instance is FATAL", |_| {
        instance_state(&cluster, &id) == Some(InstanceState::Fatal)
    });
    assert_eq!(marker.count("constructed"), 1);
    yr::finalize().unwrap();
}

#[test]
fn runtime_killed_mid_call_replays_with_recover_retry() {
    let _exclusive = exclusive();
    let cluster = TestCluster::start();
    yr::init(cluster.config()).unwrap();
    let marker = Marker::new("replay");
    let options = InvokeOptions {
        recover_retry_times: 1,
        ..Default::default()
    };
    let sleeper = yr::instance(Sleeper::new)
        .options(options)
        .invoke((marker.path(),))
        .unwrap();
    let first_pid = yr::get(&sleeper.method(Sleeper::pid).invoke(()).unwrap(), TIMEOUT).unwrap();

    // The call blocks in the first runtime until it is killed, whatever the machine's load.
    let pending = sleeper
        .method(Sleeper::hold_until_restarted)
        .invoke((2_000,))
        .unwrap();
    assert!(marker.wait_for("hold", 1, TIMEOUT), "the call started");
    assert!(signal(first_pid, libc::SIGKILL));

    // The instance restarts (its constructor runs again) and the call is replayed on it.
    assert_eq!(yr::get(&pending, TIMEOUT).unwrap(), 2_000);
    assert_eq!(marker.count("constructed"), 2, "{:?}", marker.lines());
    assert_eq!(marker.count("hold"), 2, "{:?}", marker.lines());
    let second_pid = yr::get(&sleeper.method(Sleeper::pid).invoke(()).unwrap(), TIMEOUT).unwrap();
    assert_ne!(first_pid, second_pid, "a new runtime process runs it");
    assert!(!alive(first_pid));
    yr::finalize().unwrap();
}

#[test]
fn instance_restarted_by_recover_retry_is_recorded_running_again() {
    let _exclusive = exclusive();
    let cluster = TestCluster::start();
    yr::init(cluster.config()).unwrap();
    let marker = Marker::new("recorded");
    let options = InvokeOptions {
        recover_retry_times: 1,
        ..Default::default()
    };
    let sleeper = yr::instance(Sleeper::new)
        .options(options)
        .invoke((marker.path(),))
        .unwrap();
    let first_pid = yr::get(&sleeper.method(Sleeper::pid).invoke(()).unwrap(), TIMEOUT).unwrap();
    let id = sleeper.id().to_string();
    assert!(signal(first_pid, libc::SIGKILL));
    let second_pid = yr::get(&sleeper.method(Sleeper::pid).invoke(()).unwrap(), TIMEOUT).unwrap();
    assert_ne!(first_pid, second_pid);

    // The node serves the restarted instance; its stored record, and so what the master shows,
    // must agree.
    let recorded_running = yr_tests::wait_until(TIMEOUT, || {
        instance_state(&cluster, &id) == Some(InstanceState::Running)
    });
    let stored = cluster
        .stored_instance(&id)
        .ok()
        .flatten()
        .map(|record| record.state());
    assert!(
        recorded_running,
        "the instance serves calls but the master shows it {:?} (stored record: {stored:?})",
        instance_state(&cluster, &id)
    );
    yr::finalize().unwrap();
}

#[test]
fn runtime_that_exits_gives_instance_exited() {
    let _exclusive = exclusive();
    let cluster = TestCluster::start();
    yr::init(cluster.config()).unwrap();
    let marker = Marker::new("exits");
    let sleeper = yr::instance(Sleeper::new).invoke((marker.path(),)).unwrap();
    let pid = yr::get(&sleeper.method(Sleeper::pid).invoke(()).unwrap(), TIMEOUT).unwrap();

    let exiting = sleeper.method(Sleeper::exit).invoke(()).unwrap();
    let error = unwrap_err(yr::get(&exiting, TIMEOUT));
    assert_error(&error, &[ErrorCode::InstanceExited], &["exited"]);
    assert!(yr_tests::wait_until(TIMEOUT, || !alive(pid)));

    let later = call_err(sleeper.method(Sleeper::pid).invoke(()), TIMEOUT);
    assert_error(&later, &[ErrorCode::InstanceExited], &[]);
    yr::finalize().unwrap();
}

#[test]
fn stopped_runtime_is_detected_by_heartbeat() {
    let _exclusive = exclusive();
    let cluster = TestCluster::with_node(NodeSpec {
        heartbeat_timeout: 3.0,
        ..Default::default()
    });
    yr::init(cluster.config()).unwrap();
    let marker = Marker::new("stopped");
    let sleeper = yr::instance(Sleeper::new).invoke((marker.path(),)).unwrap();
    let pid = yr::get(&sleeper.method(Sleeper::pid).invoke(()).unwrap(), TIMEOUT).unwrap();

    let pending = sleeper.method(Sleeper::nap).invoke((60_000,)).unwrap();
    assert!(marker.wait_for("nap", 1, TIMEOUT), "the call started");
    assert!(signal(pid, libc::SIGSTOP));
    let stopped_at = Instant::now();

    let error = unwrap_err(yr::get(&pending, TIMEOUT));
    let detected_after = stopped_at.elapsed();
    assert_error(&error, &[ErrorCode::UserFunctionException], &["heartbeat"]);
    assert!(
        detected_after < Duration::from_secs(15),
        "the hang was reported only after {detected_after:?}"
    );
    assert!(
        yr_tests::wait_until(TIMEOUT, || !alive(pid)),
        "the hung runtime was killed"
    );
    let later = call_err(sleeper.method(Sleeper::pid).invoke(()), TIMEOUT);
    assert_error(
        &later,
        &[ErrorCode::UserFunctionException, ErrorCode::InstanceExited],
        &[],
    );
    yr::finalize().unwrap();
}

#[test]
fn stateless_call_whose_runtime_exits_is_retried_automatically() {
    let _exclusive = exclusive();
    let cluster = TestCluster::start();
    yr::init(cluster.config()).unwrap();
    let marker = Marker::new("exit-once");
    let value = yr::function(exit_once).invoke((marker.path(), 42)).unwrap();
    // The first attempt's runtime exits (1007); stateless calls are retried on 1007.
    assert_eq!(yr::get(&value, TIMEOUT).unwrap(), 42);
    assert_eq!(marker.count("attempt"), 2, "{:?}", marker.lines());
    yr::finalize().unwrap();
}

/// A node whose runtimes crash on receiving a call whose function's name contains `doomed`.
fn node_crashing_on_doomed_calls() -> TestCluster {
    TestCluster::with_node(NodeSpec {
        env: vec![(
            "FAILPOINTS".to_string(),
            "runtime::crash_on_call=return(doomed)".to_string(),
        )],
        ..Default::default()
    })
}

#[test]
fn runtime_crashing_on_every_replay_gives_up_after_recover_retry_times_with_2002() {
    let _exclusive = exclusive();
    let cluster = node_crashing_on_doomed_calls();
    yr::init(cluster.config()).unwrap();
    let marker = Marker::new("doomed");
    let options = InvokeOptions {
        recover_retry_times: 2,
        ..Default::default()
    };
    let sleeper = yr::instance(Sleeper::new)
        .options(options)
        .invoke((marker.path(),))
        .unwrap();
    // Calls other than `doomed` run as usual.
    yr::get(&sleeper.method(Sleeper::pid).invoke(()).unwrap(), TIMEOUT).unwrap();

    let started = Instant::now();
    let error = unwrap_err(yr::get(
        &sleeper.method(Sleeper::doomed).invoke(()).unwrap(),
        TIMEOUT,
    ));
    assert_error(&error, &[ErrorCode::UserFunctionException], &["crashed"]);
    assert!(started.elapsed() < Duration::from_secs(25));
    // The call was sent once and replayed on each of the two restarts; every runtime crashed
    // on it before user code ran.
    assert_eq!(marker.count("constructed"), 3, "{:?}", marker.lines());
    assert_eq!(marker.count("doomed ran"), 0, "{:?}", marker.lines());
    let id = sleeper.id().to_string();
    cluster.wait_for_status(TIMEOUT, "the instance is FATAL", |_| {
        instance_state(&cluster, &id) == Some(InstanceState::Fatal)
    });
    yr::finalize().unwrap();
}

#[test]
fn call_replay_that_cannot_reach_the_restarted_runtime_fails_callers_with_3001() {
    let _exclusive = exclusive();
    let cluster = node_crashing_on_doomed_calls();
    yr::init(cluster.config()).unwrap();
    // In this process (the caller): the replay onto the restarted runtime fails.
    let _replay_fails = fail::FailGuard::new("runtime::call_replay", "return").unwrap();
    let marker = Marker::new("replay-fails");
    let options = InvokeOptions {
        recover_retry_times: 1,
        ..Default::default()
    };
    let sleeper = yr::instance(Sleeper::new)
        .options(options)
        .invoke((marker.path(),))
        .unwrap();
    yr::get(&sleeper.method(Sleeper::pid).invoke(()).unwrap(), TIMEOUT).unwrap();

    let started = Instant::now();
    let error = unwrap_err(yr::get(
        &sleeper.method(Sleeper::doomed).invoke(()).unwrap(),
        TIMEOUT,
    ));
    assert_error(
        &error,
        &[ErrorCode::RequestBetweenRuntimeBus],
        &["cannot replay", sleeper.id()],
    );
    assert!(started.elapsed() < Duration::from_secs(25));
    // The node did restart the instance; the caller could not replay onto it.
    assert!(
        marker.wait_for("constructed", 2, TIMEOUT),
        "{:?}",
        marker.lines()
    );
    // The instance stays failed for this caller: later calls fail at once, never hang.
    let later = call_err(sleeper.method(Sleeper::pid).invoke(()), TIMEOUT);
    assert_error(&later, &[ErrorCode::RequestBetweenRuntimeBus], &[]);
    yr::finalize().unwrap();
}

/// A runtime asks the kernel to kill it when its node ends, and checks that the node is still
/// its parent: one whose node ended before that check (here: a "node" pid that is not its
/// parent) exits at once instead of living on unowned.
#[test]
fn a_runtime_whose_node_has_already_ended_exits_at_once() {
    let output = yr_tests::helper_process(env!("CARGO_BIN_EXE_dead_session_driver"))
        .env("YR_RUNTIME_MODE", "1")
        .env("YR_RUNTIME_ID", "orphan-rt1")
        .env("YR_BUS_ADDRESS", "unix:/nonexistent/bus.sock")
        .env("YR_NODE_PID", "1")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("the node (pid 1) that started this runtime has ended"),
        "{stderr}"
    );
}
