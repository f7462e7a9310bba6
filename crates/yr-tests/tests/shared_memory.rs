//! Large objects in the node's shared memory, on a real cluster: values above 100 KB are written
//! once into the node's region and read in place by the node's processes, an object larger than
//! the region is 4202 with both sizes, and dropping the last reference gives the memory back.

use std::time::Duration;

use serde_bytes::ByteBuf;
use yr::{ErrorCode, ObjectRef};
use yr_tests::{exclusive, wait_until, NodeSpec, TestCluster, TIMEOUT};

/// A sum of the bytes, so both sides can check a value without sending it back.
#[yr::invoke]
fn checksum(bytes: ByteBuf) -> u64 {
    bytes.iter().map(|b| u64::from(*b)).sum()
}

fn pattern(len: usize) -> ByteBuf {
    ByteBuf::from((0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>())
}

fn node_with_shared_memory(mb: u64) -> TestCluster {
    TestCluster::with_node(NodeSpec {
        shared_memory_mb: Some(mb),
        ..NodeSpec::default()
    })
}

#[test]
fn a_large_value_lives_in_shared_memory_and_a_runtime_reads_it_in_place() {
    let _lock = exclusive();
    let cluster = node_with_shared_memory(64);
    yr::init(cluster.config()).unwrap();
    let value = pattern(1 << 20);
    let expected: u64 = value.iter().map(|b| u64::from(*b)).sum();
    let object = yr::put(value.clone()).unwrap();
    assert_eq!(cluster.wait_metric(0, "yr_shared_memory_objects"), 1.0);
    assert!(cluster.wait_metric(0, "yr_shared_memory_used_bytes") >= (1 << 20) as f64);
    // The driver reads its own object back; a runtime of the node reads it in place (the node
    // still holds one object: no copy was made for the reader).
    assert_eq!(yr::get(&object, TIMEOUT).unwrap(), value);
    let sum = yr::function(checksum).invoke((&object,)).unwrap();
    assert_eq!(yr::get(&sum, TIMEOUT).unwrap(), expected);
    assert_eq!(cluster.wait_metric(0, "yr_shared_memory_objects"), 1.0);
    // A small value stays in the process.
    let small = yr::put(pattern(1000)).unwrap();
    assert_eq!(yr::get(&small, TIMEOUT).unwrap(), pattern(1000));
    assert_eq!(cluster.wait_metric(0, "yr_shared_memory_objects"), 1.0);
    yr::finalize().unwrap();
}

#[test]
fn an_object_larger_than_the_shared_memory_is_4202_with_both_sizes() {
    let _lock = exclusive();
    let cluster = node_with_shared_memory(1024);
    yr::init(cluster.config()).unwrap();
    // Two GiB of zeroes: the pages are never touched, so this costs no memory.
    let huge = ByteBuf::from(vec![0u8; 2 << 30]);
    let error = yr::put(huge).unwrap_err();
    assert_eq!(error.code(), ErrorCode::SharedMemoryLimited, "{error}");
    let message = error.to_string();
    assert!(message.contains(&(1u64 << 30).to_string()), "{message}");
    assert!(
        message.contains(&((2u64 << 30) + 5).to_string()),
        "{message}"
    );
    // The node is fine afterwards.
    let object = yr::put(pattern(1 << 20)).unwrap();
    assert_eq!(yr::get(&object, TIMEOUT).unwrap(), pattern(1 << 20));
    yr::finalize().unwrap();
}

#[test]
fn a_full_shared_memory_without_spilling_is_4202_until_objects_are_dropped() {
    let _lock = exclusive();
    // `--spill-limit-mb 0`: nothing goes to disk (tests/spill.rs covers spilling).
    let cluster = TestCluster::with_node(NodeSpec {
        shared_memory_mb: Some(4),
        spill_limit_mb: Some(0),
        ..NodeSpec::default()
    });
    yr::init(cluster.config()).unwrap();
    let kept: Vec<ObjectRef<ByteBuf>> =
        (0..3).map(|_| yr::put(pattern(1 << 20)).unwrap()).collect();
    let error = yr::put(pattern(2 << 20)).unwrap_err();
    assert_eq!(error.code(), ErrorCode::SharedMemoryLimited, "{error}");
    assert!(error.to_string().contains("full"), "{error}");
    drop(kept);
    assert!(wait_until(TIMEOUT, || cluster
        .wait_metric(0, "yr_shared_memory_objects")
        == 0.0));
    let object = yr::put(pattern(2 << 20)).unwrap();
    assert_eq!(yr::get(&object, TIMEOUT).unwrap(), pattern(2 << 20));
    yr::finalize().unwrap();
}

#[test]
fn memory_returns_to_its_baseline_after_10000_put_drop_cycles_of_1_mb() {
    let _lock = exclusive();
    let cluster = node_with_shared_memory(256);
    yr::init(cluster.config()).unwrap();
    let value = pattern(1 << 20);
    for _ in 0..10_000 {
        let object = yr::put(value.clone()).unwrap();
        drop(object);
    }
    let back = wait_until(Duration::from_secs(30), || {
        cluster.wait_metric(0, "yr_shared_memory_objects") == 0.0
            && cluster.wait_metric(0, "yr_shared_memory_used_bytes") == 0.0
    });
    assert!(
        back,
        "objects are still held after every reference was dropped"
    );
    // The pages of freed objects go back to the kernel once frees stop.
    assert!(wait_until(TIMEOUT, || {
        cluster.wait_metric(0, "yr_shared_memory_resident_bytes") == 0.0
    }));
    yr::finalize().unwrap();
}

#[test]
fn a_driver_killed_with_its_objects_gives_their_memory_back() {
    let _lock = exclusive();
    let cluster = node_with_shared_memory(64);
    let mut child = yr_tests::helper_process(env!("CARGO_BIN_EXE_driver_holding_large_objects"))
        .env("YR_TESTS_BUS", cluster.node_bus_address(0))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let put = lines.find(|line| line.as_ref().is_ok_and(|l| l.contains("PUT 2")));
    assert!(put.is_some(), "the driver did not put its objects");
    assert_eq!(cluster.wait_metric(0, "yr_shared_memory_objects"), 2.0);
    // SIGKILL: the driver drops nothing; the node sees its bus connection end.
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        wait_until(TIMEOUT, || cluster
            .wait_metric(0, "yr_shared_memory_objects")
            == 0.0),
        "the killed driver's objects are still held"
    );
    assert!(wait_until(TIMEOUT, || {
        cluster.wait_metric(0, "yr_shared_memory_resident_bytes") == 0.0
    }));
}

/// The node it ran on (its runtime id starts with the node id) and the checksum of `bytes`.
#[yr::invoke]
fn where_and_checksum(bytes: ByteBuf) -> (String, u64) {
    (
        std::env::var("YR_RUNTIME_ID").unwrap_or_default(),
        bytes.iter().map(|b| u64::from(*b)).sum(),
    )
}

#[test]
fn a_large_object_is_read_on_another_node() {
    let _lock = exclusive();
    let cluster = yr_tests::two_nodes_with_shared_memory(64);
    yr::init(cluster.config()).unwrap();
    let value = pattern(8 << 20);
    let expected: u64 = value.iter().map(|b| u64::from(*b)).sum();
    let object = yr::put(value).unwrap();
    // Too big for the driver's node: it runs on the other one, which fetches the object.
    let result = yr::function(where_and_checksum)
        .options(yr::InvokeOptions {
            cpu: 2_000,
            ..Default::default()
        })
        .invoke((&object,))
        .unwrap();
    let (runtime, sum) = yr::get(&result, TIMEOUT).unwrap();
    assert!(runtime.starts_with(cluster.node_id(1)), "{runtime}");
    assert_eq!(sum, expected);
    yr::finalize().unwrap();
}

#[test]
fn a_node_without_shared_memory_keeps_large_values_in_their_process() {
    let _lock = exclusive();
    let cluster = node_with_shared_memory(0);
    yr::init(cluster.config()).unwrap();
    let object = yr::put(pattern(1 << 20)).unwrap();
    assert_eq!(yr::get(&object, TIMEOUT).unwrap(), pattern(1 << 20));
    let sum = yr::function(checksum).invoke((&object,)).unwrap();
    let expected: u64 = pattern(1 << 20).iter().map(|b| u64::from(*b)).sum();
    assert_eq!(yr::get(&sum, TIMEOUT).unwrap(), expected);
    assert_eq!(cluster.wait_metric(0, "yr_shared_memory_objects"), 0.0);
    yr::finalize().unwrap();
}

/// This process's private (heap) memory and its touched shared memory, in bytes, from
/// `/proc/self/status`.
fn resident_anon_and_shared() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map(|kib| kib * 1024)
            .unwrap_or_else(|| panic!("no {name} in /proc/self/status"))
    };
    (field("RssAnon:"), field("RssShmem:"))
}

/// Encodes like the bytes it shares, so the test keeps its own handle to them while it puts.
struct SharedBytes(std::sync::Arc<ByteBuf>);

impl serde::Serialize for SharedBytes {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

#[test]
fn a_1_gb_value_is_put_and_read_without_a_second_copy_in_the_driver() {
    let _lock = exclusive();
    const GB: u64 = 1 << 30;
    // Room for the copies this test says are never made.
    const SLACK: u64 = 128 << 20;
    let cluster = node_with_shared_memory(1200);
    yr::init(cluster.config()).unwrap();
    let value = std::sync::Arc::new(ByteBuf::from(vec![7u8; GB as usize]));
    let (with_value, _) = resident_anon_and_shared();
    // Put: the encoding is written once, straight into shared memory; no buffer of it is made
    // in this process.
    let object = yr::put(SharedBytes(value.clone())).unwrap();
    let (after_put, shared_after_put) = resident_anon_and_shared();
    assert!(
        after_put < with_value + SLACK,
        "put grew this process's heap by {} bytes",
        after_put.saturating_sub(with_value)
    );
    assert!(shared_after_put >= GB, "the object is not in shared memory");
    drop(value);
    let (without_value, _) = resident_anon_and_shared();
    // Get in place: a view of the shared memory, no copy.
    let buffer = yr::get_buffer(&object, TIMEOUT).unwrap();
    let bytes = buffer.bytes().expect("a byte string");
    assert_eq!(bytes.len() as u64, GB);
    assert!(bytes.iter().step_by(4096).all(|b| *b == 7));
    let (after_view, _) = resident_anon_and_shared();
    assert!(
        after_view < without_value + SLACK,
        "reading in place grew this process's heap by {} bytes",
        after_view.saturating_sub(without_value)
    );
    // Decoding an owned value makes one copy: the only one in this process's heap.
    let owned: ByteBuf = buffer.decode().unwrap();
    drop(buffer);
    let (after_get, _) = resident_anon_and_shared();
    assert!(
        after_get < without_value + GB + SLACK,
        "decoding made more than the one copy it returns: heap grew by {} bytes",
        after_get.saturating_sub(without_value)
    );
    assert_eq!(owned.len() as u64, GB);
    drop(owned);
    drop(object);
    yr::finalize().unwrap();
}
