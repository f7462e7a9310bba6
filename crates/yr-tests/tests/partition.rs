//! A real partition: a node stopped (SIGSTOP) past the master's node timeout is declared lost
//! and its instance FATAL. The callers of that instance, on another node, get 1007 while the
//! node is still stopped (its connections stay open, so nothing breaks to tell them). When the
//! node resumes (SIGCONT) it learns that it was declared lost, fails its instance, kills its
//! runtime and registers as a new incarnation; the master's FATAL stands: the instance is never
//! seen RUNNING again.

use std::time::{Duration, Instant};

use yr::{ErrorCode, InvokeOptions};
use yr_proto::v1::InstanceState;
use yr_tests::{
    alive, assert_error, call_err, exclusive, record, signal, stopped, unwrap_err, wait_until,
    Marker, TestCluster, TIMEOUT,
};

#[yr::instance]
pub struct Keeper {
    value: i64,
}

#[yr::instance]
impl Keeper {
    pub fn new() -> Self {
        Keeper { value: 0 }
    }

    pub fn add(&mut self, n: i64) -> i64 {
        self.value += n;
        self.value
    }

    /// The runtime's process id and id (which starts with its node's id).
    pub fn whereabouts(&self) -> (u32, String) {
        (
            std::process::id(),
            std::env::var("YR_RUNTIME_ID").unwrap_or_default(),
        )
    }

    /// Writes `napping` to `marker`, then sleeps.
    pub fn nap(&self, marker: String, ms: u64) -> u64 {
        record(&marker, "napping");
        std::thread::sleep(Duration::from_millis(ms));
        ms
    }
}

/// More than the first node has, so that the instance runs on the second.
fn too_big_for_the_first_node() -> InvokeOptions {
    InvokeOptions {
        cpu: 2_000,
        ..Default::default()
    }
}

#[test]
fn node_partitioned_past_the_node_timeout_is_fenced_and_its_instance_stays_fatal() {
    let _exclusive = exclusive();
    let cluster = TestCluster::builder()
        .node_timeout(3.0)
        // The default runtime heartbeat timeout on the second node: a node that was stopped
        // does not take its runtimes' silence for a hang, so the path taken is fencing.
        .small_and_large_node()
        .start();
    let far = cluster.node_id(1).to_string();
    let far_pid = cluster.node_pid(1).unwrap();
    let old_incarnation = cluster.node_incarnation(1);
    assert_ne!(old_incarnation, 0, "a node registers with an incarnation");
    yr::init(cluster.config()).unwrap();

    // A stateful instance created by a driver on the first node runs on the second.
    let keeper = yr::instance(Keeper::new)
        .options(too_big_for_the_first_node())
        .invoke(())
        .unwrap();
    let add = |n: i64| keeper.method(Keeper::add).invoke((n,));
    assert_eq!(yr::get(&add(1).unwrap(), TIMEOUT).unwrap(), 1);
    let (runtime_pid, runtime_id) = yr::get(
        &keeper.method(Keeper::whereabouts).invoke(()).unwrap(),
        TIMEOUT,
    )
    .unwrap();
    assert!(runtime_id.starts_with(&far), "it runs in {runtime_id}");
    assert!(cluster.runtime_pids(1).contains(&runtime_pid));
    let id = keeper.id().to_string();
    assert!(
        wait_until(TIMEOUT, || cluster.stored_instance(&id).is_ok_and(
            |r| r.is_some_and(|r| r.state() == InstanceState::Running)
        )),
        "the instance is recorded RUNNING: {:?}",
        cluster.stored_instance(&id)
    );
    let stored = cluster.stored_instance(&id).unwrap().unwrap();
    assert_eq!(stored.node_id, far);
    assert_eq!(stored.node_incarnation, old_incarnation);
    let history = cluster.watch_instance(&id);

    // A call that is running when the partition starts.
    let marker = Marker::new("partition-nap");
    let pending = keeper
        .method(Keeper::nap)
        .invoke((marker.path(), 120_000))
        .unwrap();
    assert!(marker.wait_for("napping", 1, TIMEOUT), "the nap started");

    // The partition: the node's process stops; its runtime keeps running.
    assert!(signal(far_pid, libc::SIGSTOP));
    assert!(wait_until(TIMEOUT, || stopped(far_pid)));
    let fatal = wait_until(TIMEOUT, || {
        cluster.stored_instance(&id).is_ok_and(|r| {
            r.is_some_and(|r| r.state() == InstanceState::Fatal && r.written_by_master)
        })
    });
    assert!(
        fatal,
        "the master marks the instance FATAL once the node is lost: {:?}; master log:\n{}",
        cluster.stored_instance(&id),
        cluster.master_log_tail(20)
    );
    let declared = Instant::now();

    // The caller gets the code, not a hang, while the node is still stopped.
    let error = unwrap_err(yr::get(&pending, TIMEOUT));
    assert_error(&error, &[ErrorCode::InstanceExited], &["lost"]);
    let error = call_err(add(1), TIMEOUT);
    assert_error(&error, &[ErrorCode::InstanceExited], &["lost"]);
    assert!(
        declared.elapsed() < Duration::from_secs(10),
        "the calls failed {:?} after the node was declared lost",
        declared.elapsed()
    );
    assert!(stopped(far_pid), "the node was stopped all along");
    assert!(alive(runtime_pid), "its runtime ran on meanwhile");

    // The partition heals.
    assert!(signal(far_pid, libc::SIGCONT));
    let status = cluster.wait_for_status(
        TIMEOUT,
        "the node registers again as a new incarnation",
        |status| {
            status.nodes.iter().any(|n| {
                n.node_id == far
                    && n.state == "alive"
                    && n.incarnation != old_incarnation
                    && n.incarnation != 0
            })
        },
    );
    let new_incarnation = status
        .nodes
        .iter()
        .find(|n| n.node_id == far)
        .unwrap()
        .incarnation;
    assert!(
        wait_until(TIMEOUT, || !alive(runtime_pid)),
        "the node kills the runtime of its fenced instance; its log ends with:\n{}",
        cluster.node_log_tail(1, 20)
    );
    // The node tried to record the instance's failure, and its write was refused.
    assert!(
        wait_until(TIMEOUT, || {
            cluster.node_metric(1, "yr_node_declared_lost_total") == Some(1.0)
                && cluster
                    .node_metric(1, "yr_node_instances_fenced_total")
                    .is_some_and(|fenced| fenced >= 1.0)
        }),
        "the node reports that it was declared lost and fenced the instance; its log ends \
         with:\n{}",
        cluster.node_log_tail(1, 20)
    );

    // The master's FATAL stands: the record was never written RUNNING (or anything) again.
    let first_fatal = history.assert_fatal_is_last();
    let stored = cluster.stored_instance(&id).unwrap().expect("the record");
    assert_eq!(stored.state(), InstanceState::Fatal);
    assert!(stored.written_by_master);
    assert_eq!(stored.node_incarnation, old_incarnation);
    let stored_error = stored.error.unwrap_or_default();
    assert_eq!(stored_error.code, ErrorCode::InstanceExited.number());
    assert!(stored_error.message.contains(&far), "{stored_error:?}");
    let listed = cluster.status().unwrap();
    assert!(listed
        .instances
        .iter()
        .any(|i| i.instance_id == id && i.state == InstanceState::Fatal as i32));
    let error = call_err(add(1), TIMEOUT);
    assert_error(&error, &[ErrorCode::InstanceExited], &[]);

    // The new incarnation serves new instances, and records them as its own.
    let fresh = yr::instance(Keeper::new)
        .options(too_big_for_the_first_node())
        .invoke(())
        .unwrap();
    assert_eq!(
        yr::get(&fresh.method(Keeper::add).invoke((5,)).unwrap(), TIMEOUT).unwrap(),
        5
    );
    let fresh_id = fresh.id().to_string();
    assert!(
        wait_until(TIMEOUT, || cluster.stored_instance(&fresh_id).is_ok_and(
            |r| r.is_some_and(|r| r.state() == InstanceState::Running
                && r.node_id == far
                && r.node_incarnation == new_incarnation)
        )),
        "the new instance is recorded by the new incarnation: {:?}",
        cluster.stored_instance(&fresh_id)
    );
    assert_eq!(history.records().len(), first_fatal + 1);
    yr::finalize().unwrap();
}
