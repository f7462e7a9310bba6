//! Large call arguments and results on a real cluster: they do not travel inside the call.
//! A value above 100 KB passed directly to a task or method goes as a reference to an object of
//! the caller, which the callee reads in place on the same node (or its node pulls once from
//! the caller's); a large result is handed over in shared memory to a caller on the same node,
//! which reads it in place, and it is freed with the caller's last reference.

use std::time::Duration;

use serde_bytes::ByteBuf;
use yr_tests::{
    exclusive, pattern, wait_until, weighted_sum as sum, NodeSpec, TestCluster, TIMEOUT,
};

const MIB: usize = 1 << 20;

/// The checksum of `bytes`, computed in a runtime.
#[yr::invoke]
fn checksum(bytes: ByteBuf) -> u64 {
    sum(&bytes)
}

/// `len` bytes of pattern `seed`, made in a runtime.
#[yr::invoke]
fn make(seed: usize, len: usize) -> ByteBuf {
    pattern(seed, len)
}

#[yr::instance]
pub struct Echo {
    calls: u64,
}

#[yr::instance]
impl Echo {
    pub fn new() -> Self {
        Echo { calls: 0 }
    }

    /// The bytes back, and the checksum the instance saw.
    pub fn echo(&mut self, bytes: ByteBuf) -> (u64, ByteBuf) {
        self.calls += 1;
        (sum(&bytes), bytes)
    }
}

fn metric(cluster: &TestCluster, node: usize, name: &str) -> f64 {
    cluster.wait_metric(node, name)
}

fn memory_empty_within(cluster: &TestCluster, node: usize, timeout: Duration) -> bool {
    wait_until(timeout, || {
        metric(cluster, node, "yr_shared_memory_objects") == 0.0
            && metric(cluster, node, "yr_shared_memory_used_bytes") == 0.0
    })
}

#[test]
fn a_large_result_is_handed_over_in_shared_memory_and_freed_with_the_callers_reference() {
    let _lock = exclusive();
    let cluster = TestCluster::with_node(NodeSpec {
        shared_memory_mb: Some(64),
        ..NodeSpec::default()
    });
    yr::init(cluster.config()).unwrap();
    let made = yr::function(make).invoke((7usize, 8 * MIB)).unwrap();
    assert_eq!(
        sum(&yr::get(&made, TIMEOUT).unwrap()),
        sum(&pattern(7, 8 * MIB))
    );
    // The result lives in the node's shared memory, held by this driver, not in its heap: the
    // runtime that made it already dropped its own reference.
    assert!(wait_until(TIMEOUT, || metric(
        &cluster,
        0,
        "yr_shared_memory_objects"
    ) == 1.0));
    assert!(metric(&cluster, 0, "yr_shared_memory_used_bytes") >= (8 * MIB) as f64);
    let buffer = yr::get_buffer(&made, TIMEOUT).unwrap();
    assert_eq!(buffer.decode::<ByteBuf>().unwrap(), pattern(7, 8 * MIB));
    drop(buffer);
    drop(made);
    assert!(
        memory_empty_within(&cluster, 0, Duration::from_secs(10)),
        "a result handed over is still held after the caller dropped it"
    );

    // The same for an instance's method, many times over: nothing piles up.
    let echo = yr::instance(Echo::new).invoke(()).unwrap();
    for seed in 0..20 {
        let reply = echo
            .method(Echo::echo)
            .invoke((pattern(seed, 2 * MIB),))
            .unwrap();
        let (seen, back) = yr::get(&reply, TIMEOUT).unwrap();
        assert_eq!(seen, sum(&pattern(seed, 2 * MIB)));
        assert_eq!(back, pattern(seed, 2 * MIB));
    }
    assert!(
        memory_empty_within(&cluster, 0, Duration::from_secs(10)),
        "arguments or results of finished calls are still held"
    );
    yr::finalize().unwrap();
}

#[test]
fn a_large_value_passed_directly_is_sent_by_reference_and_pulled_once_by_another_node() {
    let _lock = exclusive();
    let cluster = yr_tests::two_nodes_with_shared_memory(64);
    yr::init(cluster.config()).unwrap();
    let value = pattern(3, 8 * MIB);
    // On the driver's node: read in place, nothing is pulled.
    let here = yr::function(checksum).invoke((value.clone(),)).unwrap();
    assert_eq!(yr::get(&here, TIMEOUT).unwrap(), sum(&value));
    assert_eq!(metric(&cluster, 1, "yr_object_pulled_bytes_total"), 0.0);
    // Too big for the driver's node: the task runs on the other node, which pulls the value
    // from this node's shared memory instead of receiving it inside the call.
    let there = yr::function(checksum)
        .options(yr::InvokeOptions {
            cpu: 2_000,
            ..yr::InvokeOptions::default()
        })
        .invoke((value.clone(),))
        .unwrap();
    assert_eq!(yr::get(&there, TIMEOUT).unwrap(), sum(&value));
    assert!(
        metric(&cluster, 1, "yr_object_pulled_bytes_total") >= (8 * MIB) as f64,
        "the other node did not pull the argument"
    );
    assert!(metric(&cluster, 0, "yr_object_served_bytes_total") >= (8 * MIB) as f64);
    for node in 0..2 {
        assert!(
            memory_empty_within(&cluster, node, Duration::from_secs(10)),
            "node {node} still holds an argument of a finished call"
        );
    }
    yr::finalize().unwrap();
}
