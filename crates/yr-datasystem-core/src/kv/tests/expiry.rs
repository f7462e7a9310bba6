//! TTL expiry, lazily on read and by the sweeper.

use super::*;

#[test]
fn keys_expire_after_their_ttl() {
    let clock = yr_common::ManualClock::new();
    let store = KvStore::with_clock(clock.clone());
    store.set("short", bytes("v"), &ttl(1)).unwrap();
    store
        .set("forever", bytes("v"), &SetParam::default())
        .unwrap();
    assert_eq!(
        store.exist(&["short", "forever"]).unwrap(),
        vec![true, true]
    );
    // Alive up to its last instant…
    clock.advance(Duration::from_millis(999));
    assert_eq!(
        store.exist(&["short", "forever"]).unwrap(),
        vec![true, true]
    );
    clock.advance(Duration::from_millis(1));
    // …gone at its TTL, lazily on read…
    assert_eq!(
        store.exist(&["short", "forever"]).unwrap(),
        vec![false, true]
    );
    assert_eq!(
        store.get(&["short"], SHORT).unwrap_err().code(),
        ErrorCode::GetOperationFailed
    );
    // …and an expired key may be written again with NX.
    store.set("short", bytes("again"), &nx()).unwrap();
}

#[test]
fn the_sweeper_removes_expired_keys_nobody_reads() {
    let clock = yr_common::ManualClock::new();
    let store = KvStore::with_clock(clock.clone());
    for i in 0..10 {
        store.set(&format!("k{i}"), bytes("v"), &ttl(1)).unwrap();
    }
    store.set("kept", bytes("v"), &ttl(2)).unwrap();
    store.handle.shared.sweep();
    assert_eq!(store.len(), 11, "nothing has expired yet");
    clock.advance(Duration::from_secs(1));
    store.handle.shared.sweep();
    assert_eq!(store.len(), 1, "the sweep removed the expired keys unread");
    clock.advance(Duration::from_secs(1));
    store.handle.shared.sweep();
    assert_eq!(store.len(), 0);
}

#[test]
fn the_real_sweeper_thread_runs() {
    let store = KvStore::new();
    store.set("k", bytes("v"), &ttl(1)).unwrap();
    // A bound on a hang, not a guess: the sweeper runs every SWEEP_PERIOD.
    let deadline = Instant::now() + SWEEP_PERIOD + Duration::from_secs(5);
    while !store.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(store.len(), 0);
}

#[test]
fn the_quota_evicts_expired_keys_first() {
    let clock = yr_common::ManualClock::new();
    let store = KvStore::with_clock(clock.clone());
    let size = entry_size("a", 100);
    store.set_quota(Some(2 * size));
    store
        .set("a", Bytes::from(vec![0u8; 100]), &ttl(1))
        .unwrap();
    store
        .set("b", Bytes::from(vec![0u8; 100]), &SetParam::default())
        .unwrap();
    let refused = store
        .set("c", Bytes::from(vec![0u8; 100]), &SetParam::default())
        .unwrap_err();
    assert_eq!(refused.code(), ErrorCode::SharedMemoryLimited);
    clock.advance(Duration::from_secs(1));
    store
        .set("c", Bytes::from(vec![0u8; 100]), &SetParam::default())
        .unwrap();
    assert_eq!(
        store.exist(&["a", "b", "c"]).unwrap(),
        vec![false, true, true]
    );
}
