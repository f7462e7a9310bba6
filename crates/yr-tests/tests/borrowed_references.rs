//! Distributed reference counting on a real cluster: large objects passed between tasks, as
//! arguments, nested in values and forwarded by a borrower to a third process, give their
//! shared memory back seconds after the last reference anywhere is dropped; a borrower still
//! holding a reference keeps the object alive after its owner dropped its own; and a borrower
//! killed with SIGKILL does not pin the object forever (the owner's sweep drops its count).

use std::time::Duration;

use serde_bytes::ByteBuf;
use yr::ObjectRef;
use yr_tests::{exclusive, wait_until, NodeSpec, TestCluster, TIMEOUT};

const MIB: usize = 1 << 20;

fn pattern(len: usize) -> ByteBuf {
    ByteBuf::from((0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>())
}

fn sum(bytes: &[u8]) -> u64 {
    bytes.iter().map(|b| u64::from(*b)).sum()
}

/// The checksum of a value passed as an argument.
#[yr::invoke]
fn checksum(bytes: ByteBuf) -> u64 {
    sum(&bytes)
}

/// The checksums of objects passed nested in the argument (as references).
#[yr::invoke]
fn checksum_nested(objects: Vec<ObjectRef<ByteBuf>>) -> u64 {
    objects
        .iter()
        .map(|object| sum(&yr::get(object, TIMEOUT).expect("get a nested object")))
        .sum()
}

/// Passes the borrowed references it received on to another task, nested, and returns its sum.
#[yr::invoke]
fn forward_nested(objects: Vec<ObjectRef<ByteBuf>>) -> u64 {
    let result = yr::function(checksum_nested)
        .invoke((objects,))
        .expect("invoke");
    yr::get(&result, TIMEOUT).expect("the forwarded call")
}

/// A new large object, owned by the runtime that made it.
#[yr::invoke]
fn make(len: u64) -> ObjectRef<ByteBuf> {
    yr::put(pattern(len as usize)).expect("put")
}

/// Holds references it was given until told to drop them.
#[yr::instance]
pub struct Holder {
    held: Vec<ObjectRef<ByteBuf>>,
}

#[yr::instance]
impl Holder {
    pub fn new() -> Self {
        Holder { held: Vec::new() }
    }

    pub fn hold(&mut self, objects: Vec<ObjectRef<ByteBuf>>) -> usize {
        self.held.extend(objects);
        self.held.len()
    }

    pub fn checksum_held(&self) -> u64 {
        self.held
            .iter()
            .map(|object| sum(&yr::get(object, TIMEOUT).expect("get a held object")))
            .sum()
    }

    pub fn held(&self) -> usize {
        self.held.len()
    }

    pub fn drop_held(&mut self) -> usize {
        std::mem::take(&mut self.held).len()
    }

    /// Sends every held reference on to `other`, then drops its own.
    pub fn hand_to(&mut self, other: yr::InstanceHandle<Holder>) -> usize {
        let held = std::mem::take(&mut self.held);
        let count = other
            .method(Holder::hold)
            .invoke((held,))
            .expect("invoke hold");
        yr::get(&count, TIMEOUT).expect("the other holder took them")
    }

    pub fn pid(&self) -> u32 {
        std::process::id()
    }
}

fn node_with_shared_memory(mb: u64) -> TestCluster {
    TestCluster::with_node(NodeSpec {
        shared_memory_mb: Some(mb),
        ..NodeSpec::default()
    })
}

fn metric(cluster: &TestCluster, name: &str) -> f64 {
    let mut value = None;
    wait_until(TIMEOUT, || {
        value = cluster.node_metric(0, name);
        value.is_some()
    });
    value.unwrap_or_else(|| panic!("node 0 reports no {name}"))
}

/// Put a probe object larger than any other the tests hold, drop it (after `release`, which
/// passes it through whoever must release it), and wait until its memory is given back. A
/// release that this process (or `release`'s holder) sent before the probe's has landed by
/// then: the node frees in the order the releases come.
fn probe_released(cluster: &TestCluster, release: impl FnOnce(ObjectRef<ByteBuf>)) {
    const PROBE: usize = 4 * MIB;
    let probe = yr::put(pattern(PROBE)).unwrap();
    release(probe);
    assert!(
        wait_until(TIMEOUT, || metric(cluster, "yr_shared_memory_used_bytes")
            < PROBE as f64),
        "the probe object was never released: {} bytes used",
        metric(cluster, "yr_shared_memory_used_bytes")
    );
}

/// Whether the node's shared memory holds no object and no byte within `timeout`.
fn shared_memory_empty_within(cluster: &TestCluster, timeout: Duration) -> bool {
    wait_until(timeout, || {
        metric(cluster, "yr_shared_memory_objects") == 0.0
            && metric(cluster, "yr_shared_memory_used_bytes") == 0.0
    })
}

#[test]
fn large_objects_passed_between_tasks_are_freed_seconds_after_the_last_reference_drops() {
    let _lock = exclusive();
    let cluster = node_with_shared_memory(128);
    yr::init(cluster.config()).unwrap();
    let a = yr::put(pattern(2 * MIB)).unwrap();
    let expected_a = sum(&pattern(2 * MIB));
    // As an argument, and nested in an argument.
    let by_value = yr::function(checksum).invoke((&a,)).unwrap();
    assert_eq!(yr::get(&by_value, TIMEOUT).unwrap(), expected_a);
    let nested = yr::function(checksum_nested)
        .invoke((vec![a.clone(), a.clone()],))
        .unwrap();
    assert_eq!(yr::get(&nested, TIMEOUT).unwrap(), 2 * expected_a);
    // Made by a task and returned nested in its result: the runtime owns it, the driver
    // borrows it.
    let made: ObjectRef<ObjectRef<ByteBuf>> =
        yr::function(make).invoke(((3 * MIB) as u64,)).unwrap();
    let b = yr::get(&made, TIMEOUT).unwrap();
    assert_eq!(yr::get(&b, TIMEOUT).unwrap(), pattern(3 * MIB));
    // A borrower forwards both (one owned by the driver, one by a runtime) to a third process.
    let forwarded = yr::function(forward_nested)
        .invoke((vec![a.clone(), b.clone()],))
        .unwrap();
    assert_eq!(
        yr::get(&forwarded, TIMEOUT).unwrap(),
        expected_a + sum(&pattern(3 * MIB))
    );
    assert!(metric(&cluster, "yr_shared_memory_objects") >= 2.0);
    drop((a, b, made, by_value, nested, forwarded));
    assert!(
        shared_memory_empty_within(&cluster, Duration::from_secs(10)),
        "objects are still held after every reference was dropped: {} objects, {} bytes",
        metric(&cluster, "yr_shared_memory_objects"),
        metric(&cluster, "yr_shared_memory_used_bytes")
    );
    yr::finalize().unwrap();
}

#[test]
fn a_borrower_keeps_an_object_alive_after_its_owner_dropped_its_reference() {
    let _lock = exclusive();
    let cluster = node_with_shared_memory(64);
    yr::init(cluster.config()).unwrap();
    let holder = yr::instance(Holder::new).invoke(()).unwrap();
    let object = yr::put(pattern(MIB)).unwrap();
    let held = holder.method(Holder::hold).invoke((vec![object.clone()],));
    assert_eq!(yr::get(&held.unwrap(), TIMEOUT).unwrap(), 1);
    drop(object);
    // The owner's release of its own reference, had it freed the object, came before the
    // probe's; the borrower's reference still counts.
    probe_released(&cluster, drop);
    assert_eq!(metric(&cluster, "yr_shared_memory_objects"), 1.0);
    let checked = holder.method(Holder::checksum_held).invoke(()).unwrap();
    assert_eq!(yr::get(&checked, TIMEOUT).unwrap(), sum(&pattern(MIB)));
    // Once the borrower drops it too, it goes.
    let dropped = holder.method(Holder::drop_held).invoke(()).unwrap();
    assert_eq!(yr::get(&dropped, TIMEOUT).unwrap(), 1);
    assert!(shared_memory_empty_within(
        &cluster,
        Duration::from_secs(10)
    ));
    yr::finalize().unwrap();
}

#[test]
fn a_borrower_killed_with_sigkill_does_not_pin_an_object_forever() {
    let _lock = exclusive();
    let cluster = node_with_shared_memory(64);
    yr::init(cluster.config()).unwrap();
    let holder = yr::instance(Holder::new).invoke(()).unwrap();
    let pid = yr::get(&holder.method(Holder::pid).invoke(()).unwrap(), TIMEOUT).unwrap();
    let object = yr::put(pattern(MIB)).unwrap();
    let held = holder.method(Holder::hold).invoke((vec![object.clone()],));
    assert_eq!(yr::get(&held.unwrap(), TIMEOUT).unwrap(), 1);
    drop(object);
    assert!(yr_tests::signal(pid, 9), "cannot kill the borrower {pid}");
    // The owner's count of the dead borrower's reference goes once it has been unchanged for
    // `borrows::STALE_AFTER` (20 s) and the borrower does not answer.
    assert_eq!(metric(&cluster, "yr_shared_memory_objects"), 1.0);
    assert!(
        shared_memory_empty_within(&cluster, Duration::from_secs(45)),
        "the killed borrower's object is still held"
    );
    yr::finalize().unwrap();
}

#[test]
fn a_reference_forwarded_along_a_chain_lives_while_its_last_holder_keeps_it() {
    let _lock = exclusive();
    let cluster = node_with_shared_memory(64);
    yr::init(cluster.config()).unwrap();
    let first = yr::instance(Holder::new).invoke(()).unwrap();
    let second = yr::instance(Holder::new).invoke(()).unwrap();
    let object = yr::put(pattern(MIB)).unwrap();
    let held = first.method(Holder::hold).invoke((vec![object.clone()],));
    assert_eq!(yr::get(&held.unwrap(), TIMEOUT).unwrap(), 1);
    drop(object);
    // The first borrower sends it on and drops its own reference: the owner now has no
    // reference of its own and the first borrower none either; only the second holds it,
    // through the first (its lender), which keeps its borrow for it.
    let handed = first.method(Holder::hand_to).invoke((second.clone(),));
    assert_eq!(yr::get(&handed.unwrap(), TIMEOUT).unwrap(), 1);
    // The first borrower releases a probe to the owner too, after any release of the object it
    // might (wrongly) have sent: once the probe is freed, that one has landed.
    probe_released(&cluster, |probe| {
        let held = first.method(Holder::hold).invoke((vec![probe],)).unwrap();
        assert_eq!(yr::get(&held, TIMEOUT).unwrap(), 1);
        let dropped = first.method(Holder::drop_held).invoke(()).unwrap();
        assert_eq!(yr::get(&dropped, TIMEOUT).unwrap(), 1);
    });
    assert_eq!(metric(&cluster, "yr_shared_memory_objects"), 1.0);
    let checked = second.method(Holder::checksum_held).invoke(()).unwrap();
    assert_eq!(yr::get(&checked, TIMEOUT).unwrap(), sum(&pattern(MIB)));
    // A third process reads it through the second.
    let passed_on = second.method(Holder::hand_to).invoke((first.clone(),));
    assert_eq!(yr::get(&passed_on.unwrap(), TIMEOUT).unwrap(), 1);
    let checked = first.method(Holder::checksum_held).invoke(()).unwrap();
    assert_eq!(yr::get(&checked, TIMEOUT).unwrap(), sum(&pattern(MIB)));
    let dropped = first.method(Holder::drop_held).invoke(()).unwrap();
    assert_eq!(yr::get(&dropped, TIMEOUT).unwrap(), 1);
    assert!(
        shared_memory_empty_within(&cluster, Duration::from_secs(10)),
        "the chain's last holder dropped it, yet it is still held"
    );
    yr::finalize().unwrap();
}

#[test]
fn a_borrower_whose_lender_died_before_it_fetched_gets_the_value_from_the_owner() {
    let _lock = exclusive();
    // Every fetch from a lender on this node fails as if the lender were gone
    // (`runtime::borrow_fetch`), whenever the borrower fetches: before the lender is killed or
    // after.
    let cluster = TestCluster::with_node(NodeSpec {
        shared_memory_mb: Some(64),
        env: vec![(
            "FAILPOINTS".to_string(),
            "runtime::borrow_fetch=return".to_string(),
        )],
        ..NodeSpec::default()
    });
    yr::init(cluster.config()).unwrap();
    let lender = yr::instance(Holder::new).invoke(()).unwrap();
    let borrower = yr::instance(Holder::new).invoke(()).unwrap();
    let lender_pid = yr::get(&lender.method(Holder::pid).invoke(()).unwrap(), TIMEOUT).unwrap();
    let object = yr::put(pattern(MIB)).unwrap();
    let held = lender.method(Holder::hold).invoke((vec![object.clone()],));
    assert_eq!(yr::get(&held.unwrap(), TIMEOUT).unwrap(), 1);
    // The lender sends the reference on (the borrower now holds it, lent by the lender), then
    // dies without releasing anything.
    let handed = lender.method(Holder::hand_to).invoke((borrower.clone(),));
    assert_eq!(yr::get(&handed.unwrap(), TIMEOUT).unwrap(), 1);
    assert!(yr_tests::signal(lender_pid, libc::SIGKILL));
    assert!(wait_until(TIMEOUT, || !yr_tests::alive(lender_pid)));
    // Its lender is gone: the borrower fetches the value from the owner instead.
    let held = borrower.method(Holder::held).invoke(()).unwrap();
    assert_eq!(yr::get(&held, TIMEOUT).unwrap(), 1);
    let checked = borrower.method(Holder::checksum_held).invoke(()).unwrap();
    assert_eq!(yr::get(&checked, TIMEOUT).unwrap(), sum(&pattern(MIB)));
    drop(object);
    let dropped = borrower.method(Holder::drop_held).invoke(()).unwrap();
    assert_eq!(yr::get(&dropped, TIMEOUT).unwrap(), 1);
    yr::finalize().unwrap();
}
