//! Write modes against the second-level store: write-through, write-back, read-through.

use super::*;

#[test]
fn without_a_second_level_store_every_mode_keeps_values_in_memory() {
    let store = KvStore::new();
    for (i, mode) in [
        WriteMode::NoneL2Cache,
        WriteMode::WriteThroughL2Cache,
        WriteMode::WriteBackL2Cache,
        WriteMode::NoneL2CacheEvict,
    ]
    .into_iter()
    .enumerate()
    {
        let key = format!("m{i}");
        store.set(&key, bytes("v"), &param(mode)).unwrap();
        assert_eq!(store.get(&[key], SHORT).unwrap(), vec![bytes("v")]);
    }
    assert!(store.flush(SHORT));
}

#[test]
fn write_through_is_in_the_second_level_store_before_set_returns() {
    let (store, fake) = with_fake();
    store
        .set("wt", bytes("v"), &param(WriteMode::WriteThroughL2Cache))
        .unwrap();
    assert_eq!(fake.values.lock()["wt"].value, bytes("v"));
    store
        .set("mem", bytes("v"), &param(WriteMode::NoneL2Cache))
        .unwrap();
    store
        .set("evict", bytes("v"), &param(WriteMode::NoneL2CacheEvict))
        .unwrap();
    assert!(store.flush(Duration::from_secs(5)));
    assert!(!fake.has("mem") && !fake.has("evict"));
}

#[test]
fn a_failed_write_through_fails_the_set_and_leaves_memory_alone() {
    let (store, fake) = with_fake();
    store
        .set("k", bytes("old"), &param(WriteMode::WriteThroughL2Cache))
        .unwrap();
    fake.failing.store(true, Ordering::SeqCst);
    let error = store
        .set("k", bytes("new"), &param(WriteMode::WriteThroughL2Cache))
        .unwrap_err();
    assert_eq!(error.code(), ErrorCode::OperateDiskFailed);
    assert_eq!(store.try_get(&["k"]).unwrap(), vec![Some(bytes("old"))]);
}

#[test]
fn write_back_lands_later_without_blocking_the_writer() {
    let (store, fake) = with_fake();
    *fake.delay.lock() = Duration::from_millis(300);
    let started = Instant::now();
    store
        .set("wb", bytes("v"), &param(WriteMode::WriteBackL2Cache))
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "set waited for the store"
    );
    assert_eq!(store.try_get(&["wb"]).unwrap(), vec![Some(bytes("v"))]);
    assert!(store.flush(Duration::from_secs(5)));
    assert_eq!(fake.values.lock()["wb"].value, bytes("v"));
}

#[test]
fn a_write_back_queued_before_a_delete_does_not_resurrect_the_key() {
    let (store, fake) = with_fake();
    *fake.delay.lock() = Duration::from_millis(100);
    store
        .set("blocker", bytes("v"), &param(WriteMode::WriteBackL2Cache))
        .unwrap();
    store
        .set("gone", bytes("v"), &param(WriteMode::WriteBackL2Cache))
        .unwrap();
    store.del(&["gone"]).unwrap();
    assert!(store.flush(Duration::from_secs(5)));
    assert!(!fake.has("gone"));
    assert!(fake.has("blocker"));
}

#[test]
fn only_the_latest_of_several_write_backs_is_written() {
    let (store, fake) = with_fake();
    *fake.delay.lock() = Duration::from_millis(50);
    for i in 0..5 {
        store
            .set(
                "k",
                bytes(&i.to_string()),
                &param(WriteMode::WriteBackL2Cache),
            )
            .unwrap();
    }
    assert!(store.flush(Duration::from_secs(5)));
    assert_eq!(fake.values.lock()["k"].value, bytes("4"));
    assert!(
        fake.puts.load(Ordering::SeqCst) <= 2,
        "stale write-backs are skipped"
    );
}

#[test]
fn a_memory_only_write_over_a_stored_key_removes_the_old_copy() {
    let (store, fake) = with_fake();
    store
        .set(
            "k",
            bytes("durable"),
            &param(WriteMode::WriteThroughL2Cache),
        )
        .unwrap();
    store
        .set("k", bytes("volatile"), &param(WriteMode::NoneL2Cache))
        .unwrap();
    assert!(store.flush(Duration::from_secs(5)));
    assert!(!fake.has("k"));
    assert_eq!(
        store.try_get(&["k"]).unwrap(),
        vec![Some(bytes("volatile"))]
    );
}

#[test]
fn a_miss_in_memory_reads_through_and_keeps_the_ttl() {
    let (store, fake) = with_fake();
    fake.put("old", b"v", None).unwrap();
    fake.put(
        "brief",
        b"v",
        Some(SystemTime::now() + Duration::from_millis(600)),
    )
    .unwrap();
    assert_eq!(
        store.get(&["old", "brief"], SHORT).unwrap(),
        vec![bytes("v"), bytes("v")]
    );
    assert_eq!(store.len(), 2, "read-through values are cached in memory");
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(store.exist(&["old", "brief"]).unwrap(), vec![true, false]);
}

#[test]
fn del_removes_the_second_level_copy() {
    let (store, fake) = with_fake();
    store
        .set("k", bytes("v"), &param(WriteMode::WriteThroughL2Cache))
        .unwrap();
    fake.put("only-l2", b"v", None).unwrap();
    store.del(&["k", "only-l2"]).unwrap();
    assert!(!fake.has("k") && !fake.has("only-l2"));
    assert_eq!(store.exist(&["k", "only-l2"]).unwrap(), vec![false, false]);
}

#[test]
fn a_get_waiting_on_a_key_is_woken_by_a_write_through() {
    let (store, _fake) = with_fake();
    let writer = store.clone();
    let thread = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        writer
            .set("late", bytes("v"), &param(WriteMode::WriteThroughL2Cache))
            .unwrap();
    });
    assert_eq!(
        store.get(&["late"], Duration::from_secs(10)).unwrap(),
        vec![bytes("v")]
    );
    thread.join().unwrap();
}

#[test]
fn the_sweeper_removes_expired_second_level_copies() {
    let (store, fake) = with_fake();
    store
        .set(
            "k",
            bytes("v"),
            &SetParam {
                write_mode: WriteMode::WriteThroughL2Cache,
                ttl_second: 1,
                ..SetParam::default()
            },
        )
        .unwrap();
    // The fake keeps expired records until deleted; the sweeper deletes them.
    let deadline = Instant::now() + Duration::from_secs(5);
    while fake.has("k") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!fake.has("k"));
}
