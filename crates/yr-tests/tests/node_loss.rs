//! A node lost for good (SIGKILL of its node process, which takes its runtimes with it), on a
//! real three-node cluster with a fast node timeout (docs/design/023-node-loss-recovery.md).
//!
//! - A stateful instance with `recover_retry_times = 1`, created by a driver on the first node
//!   and running on the second, runs again on the third under the same id: the calls in flight
//!   and queued when the node died complete there (replayed; the state is the constructor's, as
//!   after any restart), later calls work, and a lookup by its name finds it.
//! - A caller that looked the instance up by its name, from another node (so no node tells it
//!   of the instance's moves), follows it too: its call in flight is replayed on the new node
//!   and its later calls go there. Without restarts, it gets 1007 as the creator does.
//! - Without `recover_retry_times`, its callers get 1007, never a hang.
//! - An object held only on the lost node (its owner ran there, and it was still being
//!   computed) fails its get with 4005, within a bound.

use std::time::{Duration, Instant};

use serde_bytes::ByteBuf;
use yr::{ErrorCode, InstanceHandle, InvokeOptions, ObjectRef};
use yr_proto::v1::InstanceState;
use yr_tests::{
    assert_error, call_err, exclusive, on_label, record, unwrap_err, wait_until, Marker, NodeSpec,
    TestCluster, TIMEOUT,
};

/// The master's node timeout in these tests, in seconds.
const NODE_TIMEOUT: f64 = 1.5;

/// How long after the node's death the callers hear the outcome, at most: the node timeout, a
/// liveness pass, the re-create (a runtime start and the constructor) and the replay, with
/// room for a loaded machine.
const RECOVERY_BOUND: Duration = Duration::from_secs(30);

#[yr::instance]
pub struct Survivor {
    value: i64,
    kept: Vec<ObjectRef<ByteBuf>>,
}

#[yr::instance]
impl Survivor {
    pub fn new() -> Self {
        Survivor {
            value: 0,
            kept: Vec::new(),
        }
    }

    pub fn add(&mut self, n: i64) -> i64 {
        self.value += n;
        self.value
    }

    /// The runtime's id (which starts with its node's id).
    pub fn node(&self) -> String {
        std::env::var("YR_RUNTIME_ID").unwrap_or_default()
    }

    /// Writes `napping` to `marker`, then sleeps.
    pub fn nap(&self, marker: String, ms: u64) -> u64 {
        record(&marker, "napping");
        std::thread::sleep(Duration::from_millis(ms));
        ms
    }

    /// An object this instance owns (so held only on its node) that is still being computed:
    /// the result of a task that takes `ms`.
    pub fn pending(&mut self, ms: u64) -> ObjectRef<ByteBuf> {
        let object = yr::function(slow_bytes).invoke((ms,)).expect("submit");
        self.kept.push(object.clone());
        object
    }
}

/// A caller on the spare node that finds the survivor by its name, as a process that did not
/// create it would.
#[yr::instance]
pub struct Lookup {
    name: String,
}

#[yr::instance]
impl Lookup {
    pub fn new(name: String) -> Self {
        Lookup { name }
    }

    fn survivor(&self) -> Result<InstanceHandle<Survivor>, yr::Error> {
        yr::get_instance::<Survivor>(&self.name, "", TIMEOUT)
    }

    /// The survivor's nap, called through a lookup (`asked` goes to `marker` once it is
    /// submitted) and waited for.
    pub fn nap(&self, marker: String, ms: u64) -> Result<u64, yr::Error> {
        let napping = self
            .survivor()?
            .method(Survivor::nap)
            .invoke((marker.clone(), ms))?;
        record(&marker, "asked");
        yr::get(&napping, RECOVERY_BOUND)
    }

    /// The code the survivor's nap, called through a lookup, fails with (0: it did not fail).
    pub fn nap_code(&self, marker: String, ms: u64) -> u32 {
        match self.nap(marker, ms) {
            Ok(_) => 0,
            Err(error) => error.code().number(),
        }
    }

    /// The survivor's add, called through a lookup.
    pub fn add(&self, n: i64) -> Result<i64, yr::Error> {
        let total = self.survivor()?.method(Survivor::add).invoke((n,))?;
        yr::get(&total, TIMEOUT)
    }
}

/// The lookup caller, on node 2 (labelled `role=spare`).
fn lookup_caller(name: &str) -> InstanceHandle<Lookup> {
    yr::instance(Lookup::new)
        .options(InvokeOptions {
            cpu: 500,
            ..on_label("role", "spare")
        })
        .invoke((name.to_string(),))
        .unwrap()
}

#[yr::invoke]
fn slow_bytes(ms: u64) -> ByteBuf {
    std::thread::sleep(Duration::from_millis(ms));
    ByteBuf::from(vec![7u8; 1024])
}

/// Node 0 (the driver's) is too small for the instance; node 1 has the most room, so the
/// master places it there first; node 2 has room for it after node 1 is gone.
fn three_nodes() -> TestCluster {
    TestCluster::builder()
        .node_timeout(NODE_TIMEOUT)
        .node(NodeSpec {
            cpu: 1_000,
            ..NodeSpec::default()
        })
        .node(NodeSpec {
            cpu: 8_000,
            ..NodeSpec::default()
        })
        .node(NodeSpec {
            cpu: 4_000,
            labels: vec![("role".to_string(), "spare".to_string())],
            ..NodeSpec::default()
        })
        .start()
}

fn survivor(recover_retry_times: u32, name: &str) -> InstanceHandle<Survivor> {
    yr::instance(Survivor::new)
        .options(InvokeOptions {
            cpu: 2_000,
            recover_retry_times,
            name: Some(name.to_string()),
            ..Default::default()
        })
        .invoke(())
        .unwrap()
}

fn node_of(instance: &InstanceHandle<Survivor>) -> String {
    yr::get(
        &instance.method(Survivor::node).invoke(()).unwrap(),
        TIMEOUT,
    )
    .unwrap()
}

#[test]
fn an_instance_with_restarts_left_runs_again_on_another_node_and_its_calls_complete() {
    let _exclusive = exclusive();
    let mut cluster = three_nodes();
    let (lost, spare) = (
        cluster.node_id(1).to_string(),
        cluster.node_id(2).to_string(),
    );
    yr::init(cluster.config()).unwrap();

    let keeper = survivor(1, "survivor");
    let id = keeper.id().to_string();
    assert_eq!(
        yr::get(&keeper.method(Survivor::add).invoke((1,)).unwrap(), TIMEOUT).unwrap(),
        1
    );
    assert!(node_of(&keeper).starts_with(&lost), "it runs on node 1");
    // An object only node 1 holds, still pending there: this driver's fetch of it waits on
    // its owner, the instance's runtime on node 1.
    let stranded = yr::get(
        &keeper.method(Survivor::pending).invoke((120_000,)).unwrap(),
        TIMEOUT,
    )
    .unwrap();

    // A call in flight when the node dies, and one queued behind it.
    let marker = Marker::new("node-loss-nap");
    let napping = keeper
        .method(Survivor::nap)
        .invoke((marker.path(), 1_000))
        .unwrap();
    let behind = keeper.method(Survivor::add).invoke((10,)).unwrap();
    assert!(marker.wait_for("napping", 1, TIMEOUT), "the nap started");

    cluster.kill_node(1);
    let killed = Instant::now();

    // The calls complete on the instance re-created on node 2: the nap ran again there, and
    // the add ran on the constructor's state.
    assert_eq!(yr::get(&napping, RECOVERY_BOUND).unwrap(), 1_000);
    assert_eq!(yr::get(&behind, RECOVERY_BOUND).unwrap(), 10);
    assert!(
        killed.elapsed() < RECOVERY_BOUND,
        "recovered after {:?}",
        killed.elapsed()
    );
    assert_eq!(marker.count("napping"), 2, "the nap was replayed once");
    assert!(
        node_of(&keeper).starts_with(&spare),
        "it runs on node 2 now"
    );
    assert_eq!(
        yr::get(&keeper.method(Survivor::add).invoke((5,)).unwrap(), TIMEOUT).unwrap(),
        15
    );
    let stored = cluster.stored_instance(&id).unwrap().expect("the record");
    assert_eq!(stored.state(), InstanceState::Running);
    assert_eq!(stored.node_id, spare);
    assert_eq!(stored.restarts, 1, "the move counts as the one restart");
    assert!(!stored.written_by_master, "node 2 took the record over");

    // The name still finds it.
    let found = yr::get_instance::<Survivor>("survivor", "", TIMEOUT).unwrap();
    assert_eq!(found.id(), id);
    assert_eq!(
        yr::get(&found.method(Survivor::add).invoke((1,)).unwrap(), TIMEOUT).unwrap(),
        16
    );

    // The object lived only on the lost node: its get fails with 4005, within a bound.
    let started = Instant::now();
    let error = unwrap_err(yr::get(&stranded, TIMEOUT));
    assert_error(&error, &[ErrorCode::GetOperationFailed], &[]);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the get failed after {:?}",
        started.elapsed()
    );

    let counted = cluster
        .master_metric("yr_master_instances_rescheduled_total")
        .unwrap_or_default();
    assert_eq!(counted, 1.0, "the master counts the reschedule");
    yr::finalize().unwrap();
}

/// A node process that dies and is started again before its node timeout registers as a new
/// incarnation: the master settles the old one's instances at once, so a caller's call is
/// replayed on the instance re-created elsewhere, never left to fail after a 30 s wait.
#[test]
fn a_node_restarted_within_its_timeout_gives_its_instances_restarts_not_1007() {
    let _exclusive = exclusive();
    // A node timeout far longer than the restart: only the registration can settle the old
    // incarnation's instances in time.
    let mut cluster = TestCluster::builder()
        .node_timeout(60.0)
        .node(NodeSpec {
            cpu: 1_000,
            ..NodeSpec::default()
        })
        .node(NodeSpec {
            cpu: 8_000,
            ..NodeSpec::default()
        })
        .start();
    yr::init(cluster.config()).unwrap();
    let keeper = survivor(1, "quick-restart");
    assert_eq!(
        yr::get(&keeper.method(Survivor::add).invoke((1,)).unwrap(), TIMEOUT).unwrap(),
        1
    );
    assert!(
        node_of(&keeper).starts_with(cluster.node_id(1)),
        "it runs on node 1"
    );
    let old_incarnation = cluster.node_incarnation(1);

    cluster.kill_node(1);
    cluster.restart_node(1);
    let restarted = Instant::now();
    assert_ne!(
        cluster.node_incarnation(1),
        old_incarnation,
        "a new incarnation"
    );
    // The call is replayed on the instance re-created from its constructor.
    let after = keeper.method(Survivor::add).invoke((10,)).unwrap();
    assert_eq!(yr::get(&after, RECOVERY_BOUND).unwrap(), 10);
    assert!(
        restarted.elapsed() < Duration::from_secs(25),
        "the call waited {:?}: the old incarnation was not settled at the registration",
        restarted.elapsed()
    );
    let replaced = cluster
        .master_metric("yr_master_incarnations_replaced_total")
        .unwrap_or_default();
    assert_eq!(replaced, 1.0, "the master counts the replaced incarnation");
    yr::finalize().unwrap();
}

#[test]
fn a_caller_that_looked_the_instance_up_on_another_node_follows_it_to_its_new_node() {
    let _exclusive = exclusive();
    let mut cluster = three_nodes();
    let (lost, spare) = (
        cluster.node_id(1).to_string(),
        cluster.node_id(2).to_string(),
    );
    yr::init(cluster.config()).unwrap();
    let keeper = survivor(1, "followed");
    assert!(node_of(&keeper).starts_with(&lost), "it runs on node 1");
    let caller = lookup_caller("followed");
    assert_eq!(
        yr::get(&caller.method(Lookup::add).invoke((1,)).unwrap(), TIMEOUT).unwrap(),
        1
    );

    // The lookup caller's call is in flight when the node dies.
    let marker = Marker::new("node-loss-followed");
    let napping = caller
        .method(Lookup::nap)
        .invoke((marker.path(), 1_000))
        .unwrap();
    assert!(marker.wait_for("napping", 1, TIMEOUT), "the nap started");
    cluster.kill_node(1);
    let killed = Instant::now();

    // Replayed on the instance re-created on node 2, where the caller's later calls go too.
    assert_eq!(yr::get(&napping, RECOVERY_BOUND).unwrap(), 1_000);
    assert!(
        killed.elapsed() < RECOVERY_BOUND,
        "the lookup caller's call completed after {:?}",
        killed.elapsed()
    );
    assert_eq!(marker.count("napping"), 2, "the nap was replayed once");
    assert_eq!(
        yr::get(&caller.method(Lookup::add).invoke((5,)).unwrap(), TIMEOUT).unwrap(),
        5,
        "the re-created instance starts from the constructor's state"
    );
    assert!(
        node_of(&keeper).starts_with(&spare),
        "it runs on node 2 now"
    );
    yr::finalize().unwrap();
}

#[test]
fn an_instance_without_restarts_fails_its_callers_with_1007_when_its_node_is_lost() {
    let _exclusive = exclusive();
    let mut cluster = three_nodes();
    yr::init(cluster.config()).unwrap();
    let keeper = survivor(0, "mortal");
    let id = keeper.id().to_string();
    assert!(node_of(&keeper).starts_with(cluster.node_id(1)));
    let caller = lookup_caller("mortal");
    let marker = Marker::new("node-loss-mortal");
    let napping = keeper
        .method(Survivor::nap)
        .invoke((marker.path(), 60_000))
        .unwrap();
    let looked_up_nap = caller
        .method(Lookup::nap_code)
        .invoke((marker.path(), 60_000))
        .unwrap();
    // The lookup caller's nap waits behind the creator's.
    assert!(marker.wait_for("napping", 1, TIMEOUT), "the nap started");
    assert!(
        marker.wait_for("asked", 1, TIMEOUT),
        "the lookup caller called"
    );

    cluster.kill_node(1);
    let killed = Instant::now();
    let error = unwrap_err(yr::get(&napping, RECOVERY_BOUND));
    assert_error(&error, &[ErrorCode::InstanceExited], &[]);
    // The caller that looked it up on another node hears the master's verdict too.
    assert_eq!(
        yr::get(&looked_up_nap, RECOVERY_BOUND).unwrap(),
        ErrorCode::InstanceExited.number()
    );
    let error = call_err(keeper.method(Survivor::add).invoke((1,)), TIMEOUT);
    assert_error(&error, &[ErrorCode::InstanceExited], &[]);
    assert!(
        killed.elapsed() < RECOVERY_BOUND,
        "the callers heard after {:?}",
        killed.elapsed()
    );
    // The master's verdict: FATAL, never re-created.
    assert!(
        wait_until(TIMEOUT, || cluster
            .stored_instance(&id)
            .is_ok_and(|r| r.is_some_and(|r| r.state()
                == InstanceState::Fatal
                && r.written_by_master))),
        "the master marks it FATAL: {:?}",
        cluster.stored_instance(&id)
    );
    assert_eq!(marker.count("napping"), 1, "never run again");
    yr::finalize().unwrap();
}
