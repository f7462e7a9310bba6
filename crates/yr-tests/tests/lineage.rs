//! Lineage reconstruction on a real three-node cluster with the default node timeout (3 s)
//! (docs/design/026-results-by-location-and-lineage.md). A stateless call placed on node 1
//! returns a large result, which node 1 keeps for the driver on node 0 until it is read; node 1
//! is killed (SIGKILL of its node process, which takes its runtimes with it), and once the
//! master has declared it lost:
//!
//! - the get recomputes the result on node 2 from its lineage and returns the right value;
//! - a chain of two lost results (the second computed from the first) is recomputed, the first
//!   before the second;
//! - a call whose argument is gone too (an instance method's result, also lost with node 1)
//!   fails with 4005, saying which argument and why;
//! - an instance method's lost result fails with 4005, as before: it is not recomputed.

use std::time::{Duration, Instant};

use serde_bytes::ByteBuf;
use yr::{ErrorCode, InvokeOptions, ObjectRef};
use yr_tests::{
    assert_error, exclusive, record, unwrap_err, wait_until, Marker, NodeSpec, TestCluster, TIMEOUT,
};

/// The master's node timeout in these tests, in seconds: the default, so that a loaded machine
/// does not lose a node by itself.
const NODE_TIMEOUT: f64 = 3.0;

/// How long a recompute may take after the loss, at most: new instances start on node 2 and
/// run the calls again, with room for a loaded machine.
const RECOMPUTE_BOUND: Duration = Duration::from_secs(60);

/// Bytes of each result: above the inline threshold, so it stays on the node that made it.
const LEN: usize = 1 << 20;

fn pattern(seed: u8, len: usize) -> ByteBuf {
    ByteBuf::from(
        (0..len)
            .map(|i| (i % 251) as u8 ^ seed)
            .collect::<Vec<u8>>(),
    )
}

/// The runtime's id (which starts with its node's id).
fn here() -> String {
    std::env::var("YR_RUNTIME_ID").unwrap_or_default()
}

/// A large result, and where it was made; writes `made` to `marker` each time it runs.
#[yr::invoke]
fn make(marker: String, seed: u8) -> (String, ByteBuf) {
    record(&marker, "made");
    (here(), pattern(seed, LEN))
}

/// A large result computed from another: each byte of `input`'s bytes plus one.
#[yr::invoke]
fn derive(marker: String, input: (String, ByteBuf)) -> (String, ByteBuf) {
    record(&marker, "derived");
    let bytes = input
        .1
        .iter()
        .map(|b| b.wrapping_add(1))
        .collect::<Vec<u8>>();
    (here(), ByteBuf::from(bytes))
}

/// Holds nothing; its method results are not recomputed.
#[yr::instance]
pub struct Keeper {}

#[yr::instance]
impl Keeper {
    pub fn new() -> Self {
        Keeper {}
    }

    pub fn make(&self, seed: u8) -> (String, ByteBuf) {
        (here(), pattern(seed, LEN))
    }
}

/// Node 0 (the driver's) has no room for a call asking for 2 CPUs; node 1 has the most room,
/// even with four such instances, so they all go there; node 2 has room once node 1 is gone.
fn three_nodes() -> TestCluster {
    let shared_memory_mb = Some(256);
    TestCluster::builder()
        .node_timeout(NODE_TIMEOUT)
        .node(NodeSpec {
            cpu: 1_000,
            shared_memory_mb,
            ..NodeSpec::default()
        })
        .node(NodeSpec {
            cpu: 16_000,
            shared_memory_mb,
            ..NodeSpec::default()
        })
        .node(NodeSpec {
            cpu: 4_000,
            shared_memory_mb,
            ..NodeSpec::default()
        })
        .start()
}

fn two_cpus() -> InvokeOptions {
    InvokeOptions {
        cpu: 2_000,
        ..Default::default()
    }
}

/// Wait until `object` is finished, without reading it (a read would pull it here).
fn finished<T>(object: &ObjectRef<T>) {
    let (ready, _) = yr::wait(std::slice::from_ref(object), 1, TIMEOUT).unwrap();
    assert_eq!(ready.len(), 1, "the call did not finish");
}

/// Kill node 1 and wait until the master declares it lost.
fn lose_node_1(cluster: &mut TestCluster) {
    let lost_before = cluster
        .master_metric("yr_master_nodes_lost_total")
        .unwrap_or_default();
    cluster.kill_node(1);
    assert!(
        wait_until(RECOMPUTE_BOUND, || cluster
            .master_metric("yr_master_nodes_lost_total")
            .unwrap_or_default()
            > lost_before),
        "the master never declared node 1 lost"
    );
}

#[test]
fn lost_stateless_results_are_recomputed_from_their_lineage_and_others_fail_with_4005() {
    let _exclusive = exclusive();
    let mut cluster = three_nodes();
    let spare = cluster.node_id(2).to_string();
    yr::init(cluster.config()).unwrap();
    let marker = Marker::new("lineage");

    // One result, and a chain of two, all made on node 1 and kept there for this driver.
    let single: ObjectRef<(String, ByteBuf)> = yr::function(make)
        .options(two_cpus())
        .invoke((marker.path(), 1u8))
        .unwrap();
    let first: ObjectRef<(String, ByteBuf)> = yr::function(make)
        .options(two_cpus())
        .invoke((marker.path(), 2u8))
        .unwrap();
    let second: ObjectRef<(String, ByteBuf)> = yr::function(derive)
        .options(two_cpus())
        .invoke((marker.path(), &first))
        .unwrap();
    // An instance method's result, and a call that takes it, both on node 1.
    let keeper = yr::instance(Keeper::new)
        .options(two_cpus())
        .invoke(())
        .unwrap();
    let stateful: ObjectRef<(String, ByteBuf)> =
        keeper.method(Keeper::make).invoke((3u8,)).unwrap();
    let orphan: ObjectRef<(String, ByteBuf)> = yr::function(derive)
        .options(two_cpus())
        .invoke((marker.path(), &stateful))
        .unwrap();
    for object in [&single, &first, &second, &stateful, &orphan] {
        finished(object);
    }
    assert_eq!(marker.count("made"), 2);
    assert_eq!(marker.count("derived"), 2);
    // Node 1 keeps the five results for this driver; none of them is on node 0.
    assert_eq!(cluster.wait_metric(1, "yr_object_remote_holds"), 5.0);
    assert_eq!(cluster.wait_metric(0, "yr_shared_memory_objects"), 0.0);

    lose_node_1(&mut cluster);
    let lost_at = Instant::now();

    // The single result is recomputed on node 2.
    let (made_on, bytes) = yr::get(&single, RECOMPUTE_BOUND).unwrap();
    assert!(made_on.starts_with(&spare), "recomputed in {made_on}");
    assert!(bytes == pattern(1, LEN), "the recomputed value differs");
    assert_eq!(marker.count("made"), 3, "made once more");

    // The chain: the first result is recomputed before the second, which is computed from it.
    let (derived_on, bytes) = yr::get(&second, RECOMPUTE_BOUND).unwrap();
    assert!(derived_on.starts_with(&spare), "recomputed in {derived_on}");
    let expected: Vec<u8> = pattern(2, LEN).iter().map(|b| b.wrapping_add(1)).collect();
    assert!(
        bytes.as_slice() == expected.as_slice(),
        "the recomputed chain differs"
    );
    assert_eq!(
        marker.count("made"),
        4,
        "the first of the chain made once more"
    );
    assert_eq!(
        marker.count("derived"),
        3,
        "the second of the chain derived once more"
    );
    // The first result is here now: read without another run.
    let (first_on, bytes) = yr::get(&first, TIMEOUT).unwrap();
    assert!(first_on.starts_with(&spare));
    assert!(bytes == pattern(2, LEN));
    assert_eq!(marker.count("made"), 4);

    // An instance method's result is not recomputed: 4005, as before.
    let error = unwrap_err(yr::get(&stateful, TIMEOUT));
    assert_error(
        &error,
        &[ErrorCode::GetOperationFailed],
        &["instance method", "not recomputed"],
    );
    // A call whose argument is gone too is not recomputed: 4005, naming the argument.
    let error = unwrap_err(yr::get(&orphan, TIMEOUT));
    assert_error(
        &error,
        &[ErrorCode::GetOperationFailed],
        &["cannot be recomputed", "argument", "gone too"],
    );
    assert_eq!(marker.count("derived"), 3, "the orphan never ran again");
    assert!(
        lost_at.elapsed() < RECOMPUTE_BOUND,
        "recovered after {:?}",
        lost_at.elapsed()
    );
    yr::finalize().unwrap();
}
