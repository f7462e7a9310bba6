//! Objects across nodes on a real two-node cluster (two node processes on one machine, talking
//! TCP): a large object held on one node is pulled in chunks by the other node into its own
//! shared memory and read there in place; the copy is reused and freed with its last reference;
//! and if the object's owner dies around the pull, `get` gives the intact value or fails with a
//! clear code (4005 for the object), never hangs. A transfer that breaks (the
//! `datasystem::pull` fail point) is tried again; a get fails with 4005 only when every
//! attempt broke. A call's result above 100 KiB for the driver on the other node stays on the
//! node that made it until the driver reads it, and is pulled then (design 026).

use std::time::Duration;

use serde_bytes::ByteBuf;
use yr::{ErrorCode, InvokeOptions, ObjectRef};
use yr_tests::{exclusive, wait_until, TestCluster, TIMEOUT};

fn pattern(len: usize) -> ByteBuf {
    ByteBuf::from((0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>())
}

/// Makes large objects on its node and keeps them.
#[yr::instance]
pub struct Maker {
    kept: Vec<ObjectRef<ByteBuf>>,
}

#[yr::instance]
impl Maker {
    pub fn new() -> Self {
        Maker { kept: Vec::new() }
    }

    /// A new object of `len` bytes on this node, kept by this instance.
    pub fn make(&mut self, len: u64) -> ObjectRef<ByteBuf> {
        let object = yr::put(pattern(len as usize)).expect("put");
        self.kept.push(object.clone());
        object
    }

    /// Like `make`, then the runtime dies (SIGKILL-like abort) `delay_ms` after returning.
    pub fn make_then_die(&mut self, len: u64, delay_ms: u64) -> ObjectRef<ByteBuf> {
        let object = self.make(len);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(delay_ms));
            std::process::abort();
        });
        object
    }

    pub fn node(&self) -> String {
        std::env::var("YR_RUNTIME_ID").unwrap_or_default()
    }

    /// `len` bytes as the call's result.
    pub fn bytes(&self, len: u64) -> ByteBuf {
        pattern(len as usize)
    }
}

fn two_nodes() -> TestCluster {
    yr_tests::two_nodes_with_shared_memory(256)
}

/// An instance too big for node 0, so it runs on node 1.
fn maker_on_the_other_node(cluster: &TestCluster) -> yr::InstanceHandle<Maker> {
    let maker = yr::instance(Maker::new)
        .options(InvokeOptions {
            cpu: 2_000,
            ..Default::default()
        })
        .invoke(())
        .unwrap();
    let node = yr::get(&maker.method(Maker::node).invoke(()).unwrap(), TIMEOUT).unwrap();
    assert!(
        node.starts_with(cluster.node_id(1)),
        "the maker runs in {node}"
    );
    maker
}

#[test]
fn a_large_object_on_another_node_is_pulled_into_this_node_and_read_in_place() {
    let _lock = exclusive();
    let cluster = two_nodes();
    yr::init(cluster.config()).unwrap();
    let maker = maker_on_the_other_node(&cluster);
    let len = 40 << 20; // several chunks
    let inner: ObjectRef<ObjectRef<ByteBuf>> =
        maker.method(Maker::make).invoke((len as u64,)).unwrap();
    let object = yr::get(&inner, TIMEOUT).unwrap();
    assert_eq!(cluster.wait_metric(0, "yr_shared_memory_objects"), 0.0);

    let value = yr::get(&object, TIMEOUT).unwrap();
    assert_eq!(value.len(), len);
    assert!(
        value == pattern(len),
        "the pulled object differs from the original"
    );
    // The copy lives in this node's shared memory; the original stays on node 1.
    assert_eq!(cluster.wait_metric(0, "yr_shared_memory_objects"), 1.0);
    assert!(cluster.wait_metric(0, "yr_shared_memory_used_bytes") >= len as f64);
    assert!(cluster.wait_metric(1, "yr_shared_memory_objects") >= 1.0);

    // A zero-copy read of the same object reuses the copy: still one object on node 0.
    let buffer = yr::get_buffer(&object, TIMEOUT).unwrap();
    assert_eq!(buffer.decode::<ByteBuf>().unwrap().len(), len);
    assert_eq!(cluster.wait_metric(0, "yr_shared_memory_objects"), 1.0);

    // Dropping every reference here (the outer value holds one too) frees the copy here.
    drop((buffer, value, object, inner));
    assert!(
        wait_until(TIMEOUT, || cluster
            .wait_metric(0, "yr_shared_memory_objects")
            == 0.0),
        "the local copy outlived its last reference"
    );
    yr::finalize().unwrap();
}

#[test]
fn a_get_whose_owner_dies_gives_the_value_or_4005_and_never_hangs() {
    let _lock = exclusive();
    let cluster = two_nodes();
    yr::init(cluster.config()).unwrap();
    let len = 64 << 20;
    // The owner dies right after it sends the reference, before, during or after this node
    // pulls the object: each outcome must be clear.
    for delay_ms in [0u64, 5, 50] {
        let maker = maker_on_the_other_node(&cluster);
        let inner: ObjectRef<ObjectRef<ByteBuf>> = maker
            .method(Maker::make_then_die)
            .invoke((len as u64, delay_ms))
            .unwrap();
        let started = std::time::Instant::now();
        let outcome = yr::get(&inner, TIMEOUT).and_then(|object| yr::get(&object, TIMEOUT));
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the get took {:?}",
            started.elapsed()
        );
        match outcome {
            Ok(value) => assert!(value == pattern(len), "a pulled value differs"),
            Err(error) => assert!(
                // 4005 for the object; 2002 or 1007 if the owner died before it answered.
                matches!(
                    error.code(),
                    ErrorCode::GetOperationFailed
                        | ErrorCode::UserFunctionException
                        | ErrorCode::InstanceExited
                ),
                "{error}"
            ),
        }
    }
    yr::finalize().unwrap();
}

#[test]
fn a_pull_that_breaks_is_retried_and_a_get_fails_with_4005_only_when_every_attempt_breaks() {
    let _lock = exclusive();
    let node = |cpu: u64, env: Vec<(String, String)>| yr_tests::NodeSpec {
        cpu,
        shared_memory_mb: Some(256),
        env,
        ..yr_tests::NodeSpec::default()
    };
    // Node 0's first five pulls break. A get tries three times.
    let cluster = TestCluster::builder()
        .node(node(
            1_000,
            vec![(
                "FAILPOINTS".to_string(),
                "datasystem::pull=5*return".to_string(),
            )],
        ))
        .node(node(4_000, Vec::new()))
        .start();
    yr::init(cluster.config()).unwrap();
    let maker = maker_on_the_other_node(&cluster);
    let len = 40 << 20;
    let make = || -> ObjectRef<ByteBuf> {
        let inner: ObjectRef<ObjectRef<ByteBuf>> =
            maker.method(Maker::make).invoke((len as u64,)).unwrap();
        yr::get(&inner, TIMEOUT).unwrap()
    };

    // Pulls 1 to 3 break: the get fails with 4005, saying what broke.
    let first = make();
    match yr::get(&first, TIMEOUT) {
        Ok(_) => panic!("the get succeeded although every pull broke"),
        Err(error) => {
            assert_eq!(error.code(), ErrorCode::GetOperationFailed, "{error}");
            assert!(error.to_string().contains("cannot pull object"), "{error}");
        }
    }
    // The broken copies' room was given back.
    assert!(
        wait_until(TIMEOUT, || cluster
            .wait_metric(0, "yr_shared_memory_objects")
            == 0.0),
        "a broken pull's allocation is still held"
    );

    // Pulls 4 and 5 break too; the get's third attempt brings the object, intact.
    let second = make();
    let value = yr::get(&second, TIMEOUT).unwrap();
    assert!(value == pattern(len), "the pulled object differs");
    assert_eq!(cluster.wait_metric(0, "yr_shared_memory_objects"), 1.0);
    yr::finalize().unwrap();
}

/// A result of `len` bytes, made where the call runs.
#[yr::invoke]
fn large_result(len: u64) -> ByteBuf {
    pattern(len as usize)
}

/// Room for a call that asks for 2 CPUs only on node 1.
fn on_the_other_node() -> InvokeOptions {
    InvokeOptions {
        cpu: 2_000,
        ..Default::default()
    }
}

#[test]
fn a_large_result_for_a_caller_on_another_node_stays_there_until_read_and_is_pulled_then() {
    // Stateless calls and an instance method on node 1 return 1 MiB to this driver on node 0.
    let _lock = exclusive();
    let cluster = two_nodes();
    yr::init(cluster.config()).unwrap();
    let len = 1 << 20;
    let served = cluster.wait_metric(1, "yr_object_served_bytes_total");
    for round in 0..2 {
        let result: ObjectRef<ByteBuf> = yr::function(large_result)
            .options(on_the_other_node())
            .invoke((len as u64,))
            .unwrap();
        assert_eq!(
            yr::wait(std::slice::from_ref(&result), 1, TIMEOUT)
                .unwrap()
                .0
                .len(),
            1
        );
        // The reply carried its location, not its bytes: node 1 keeps it for this driver,
        // and nothing of it is on node 0 yet.
        assert_eq!(cluster.wait_metric(1, "yr_object_remote_holds"), 1.0);
        assert_eq!(cluster.wait_metric(0, "yr_shared_memory_objects"), 0.0);

        // The get pulls it through node 1's data port; node 1 drops its hold.
        let value = yr::get(&result, TIMEOUT).unwrap();
        assert!(value == pattern(len), "the pulled result differs");
        assert!(
            cluster.wait_metric(1, "yr_object_served_bytes_total")
                >= served + ((round + 1) * len) as f64
        );
        assert_eq!(cluster.wait_metric(0, "yr_shared_memory_objects"), 1.0);
        assert!(
            wait_until(TIMEOUT, || cluster.wait_metric(1, "yr_object_remote_holds")
                == 0.0),
            "node 1 still holds the result after it was pulled"
        );
        drop((value, result));
        assert!(
            wait_until(TIMEOUT, || cluster
                .wait_metric(0, "yr_shared_memory_objects")
                == 0.0),
            "the pulled copy outlived its last reference"
        );
    }

    // An instance method's result goes the same way.
    let maker = maker_on_the_other_node(&cluster);
    let result = maker.method(Maker::bytes).invoke((len as u64,)).unwrap();
    assert_eq!(
        yr::wait(std::slice::from_ref(&result), 1, TIMEOUT)
            .unwrap()
            .0
            .len(),
        1
    );
    assert_eq!(cluster.wait_metric(1, "yr_object_remote_holds"), 1.0);
    assert!(yr::get(&result, TIMEOUT).unwrap() == pattern(len));
    assert!(
        wait_until(TIMEOUT, || cluster.wait_metric(1, "yr_object_remote_holds")
            == 0.0),
        "node 1 still holds the method's result after it was pulled"
    );
    drop(result);

    // A result dropped unread: node 1 drops its hold when told.
    let unread: ObjectRef<ByteBuf> = yr::function(large_result)
        .options(on_the_other_node())
        .invoke((len as u64,))
        .unwrap();
    assert_eq!(
        yr::wait(std::slice::from_ref(&unread), 1, TIMEOUT)
            .unwrap()
            .0
            .len(),
        1
    );
    assert_eq!(cluster.wait_metric(1, "yr_object_remote_holds"), 1.0);
    drop(unread);
    assert!(
        wait_until(TIMEOUT, || cluster.wait_metric(1, "yr_object_remote_holds")
            == 0.0),
        "node 1 still holds a result its owner dropped"
    );
    yr::finalize().unwrap();
}
