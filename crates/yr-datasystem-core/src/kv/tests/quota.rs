//! The per-job quota: accounting, refusals, eviction.

use super::*;

// ----- the per-job quota -----

/// The bytes each job holds match its entries exactly, and the total matches their sum.
fn assert_accounting_exact(store: &KvStore) {
    let map = store.handle.shared.map.lock();
    let mut by_job: HashMap<&str, u64> = HashMap::new();
    for (key, entry) in &map.entries {
        assert_eq!(entry.size, entry_size(key, entry.value.len()));
        *by_job.entry(&entry.job).or_default() += entry.size;
    }
    let held: HashMap<&str, u64> = map.held.iter().map(|(j, b)| (&**j, *b)).collect();
    assert_eq!(held, by_job, "held bytes per job");
    assert_eq!(map.total, by_job.values().sum::<u64>(), "total bytes");
}

fn value(len: usize) -> Bytes {
    Bytes::from(vec![b'v'; len])
}

fn write(store: &KvStore, job: &str, key: &str, len: usize) -> Result<()> {
    store.set_for_job(job, key, value(len), &SetParam::default())
}

#[test]
fn kv_bytes_follow_sets_overwrites_and_deletes_back_to_zero() {
    let store = KvStore::new();
    store.set_quota(Some(1 << 20));
    write(&store, "job-a", "k", 10).unwrap();
    assert_eq!(store.job_bytes("job-a"), 11);
    write(&store, "job-a", "k", 100).unwrap(); // bigger
    assert_eq!(store.job_bytes("job-a"), 101);
    write(&store, "job-a", "k", 4).unwrap(); // smaller
    assert_eq!(store.job_bytes("job-a"), 5);
    write(&store, "job-a", "kk", 8).unwrap();
    write(&store, "job-b", "other", 5).unwrap();
    store
        .set("anonymous", value(1), &SetParam::default())
        .unwrap();
    assert_eq!(store.job_bytes("job-a"), 5 + 10);
    assert_eq!(store.job_bytes("job-b"), 10);
    assert_eq!(store.job_bytes(UNKNOWN_JOB), 10);
    assert_eq!(store.memory_bytes(), 35);
    assert_accounting_exact(&store);
    // Another job overwriting a key takes it over: the bytes move.
    write(&store, "job-b", "k", 4).unwrap();
    assert_eq!(store.job_bytes("job-a"), 10);
    assert_eq!(store.job_bytes("job-b"), 15);
    assert_accounting_exact(&store);
    store
        .del(&["k", "kk", "other", "anonymous", "missing"])
        .unwrap();
    assert_eq!(store.memory_bytes(), 0);
    assert!(store.handle.shared.map.lock().held.is_empty());
}

#[test]
fn a_write_over_the_quota_is_4202_naming_job_bytes_and_quota_and_changes_nothing() {
    let store = KvStore::new();
    store.set_quota(Some(100));
    write(&store, "job-a", "k", 49).unwrap(); // 50 bytes
    let error = write(&store, "job-a", "k2", 59).unwrap_err(); // 61 more
    assert_eq!(error.code(), ErrorCode::SharedMemoryLimited);
    for needle in ["job-a", "holds 50 bytes", "61 bytes", "\"k2\"", "100 bytes"] {
        assert!(error.message().contains(needle), "{needle}: {error}");
    }
    assert!(error.message().contains("kv_del"), "{error}");
    assert!(error.message().contains("--kv-quota-mb"), "{error}");
    assert_eq!(store.exist(&["k2"]).unwrap(), vec![false]);
    // A refused overwrite keeps the old value.
    let error = write(&store, "job-a", "k", 120).unwrap_err();
    assert_eq!(error.code(), ErrorCode::SharedMemoryLimited);
    assert_eq!(store.try_get(&["k"]).unwrap(), vec![Some(value(49))]);
    assert_eq!(store.job_bytes("job-a"), 50);
    // An overwrite counts the difference: exactly the quota fits.
    write(&store, "job-a", "k", 99).unwrap();
    assert_eq!(store.job_bytes("job-a"), 100);
    // Shrinking always fits, even over a quota lowered since.
    store.set_quota(Some(10));
    write(&store, "job-a", "k", 50).unwrap();
    assert_eq!(store.job_bytes("job-a"), 51);
    assert_accounting_exact(&store);
}

#[test]
fn each_job_has_a_quota_of_its_own_and_no_job_shares_one() {
    let store = KvStore::new();
    store.set_quota(Some(100));
    write(&store, "job-a", "a", 99).unwrap();
    assert_eq!(
        write(&store, "job-a", "a2", 1).unwrap_err().code(),
        ErrorCode::SharedMemoryLimited
    );
    write(&store, "job-b", "b", 99).unwrap();
    store.set("u1", value(60), &SetParam::default()).unwrap();
    let error = store
        .set("u2", value(60), &SetParam::default())
        .unwrap_err();
    assert_eq!(error.code(), ErrorCode::SharedMemoryLimited);
    assert!(error.message().contains("unknown job"), "{error}");
    assert_eq!(store.memory_bytes(), 100 + 100 + 62);
    assert_accounting_exact(&store);
}

#[test]
fn expiry_gives_the_bytes_back() {
    let store = KvStore::new();
    store.set_quota(Some(100));
    for i in 0..4 {
        store
            .set_for_job("job-a", &format!("t{i}"), value(16), &ttl(1))
            .unwrap();
    }
    write(&store, "job-a", "forever", 8).unwrap();
    assert_eq!(store.job_bytes("job-a"), 4 * 18 + 15);
    std::thread::sleep(Duration::from_millis(1100));
    // Expired keys not swept yet do not stand in the way of a write.
    write(&store, "job-a", "new", 80).unwrap();
    assert_accounting_exact(&store);
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.len() > 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(store.job_bytes("job-a"), 15 + 83);
    store.del(&["forever", "new"]).unwrap();
    assert_eq!(store.memory_bytes(), 0);
    // The sweeper gives back what nobody reads.
    store.set_for_job("job-a", "t", value(20), &ttl(1)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.memory_bytes() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(store.memory_bytes(), 0);
    assert!(store.handle.shared.map.lock().held.is_empty());
}

#[test]
fn a_refused_write_through_does_not_reach_the_second_level_store() {
    let (store, fake) = with_fake();
    store.set_quota(Some(100));
    let through = param(WriteMode::WriteThroughL2Cache);
    store
        .set_for_job("job-a", "mem", value(90), &SetParam::default())
        .unwrap();
    let error = store
        .set_for_job("job-a", "wt", value(20), &through)
        .unwrap_err();
    assert_eq!(error.code(), ErrorCode::SharedMemoryLimited);
    assert!(!fake.has("wt"));
    // A write-through that fails gives its reserved room back.
    store.del(&["mem"]).unwrap();
    fake.failing.store(true, Ordering::SeqCst);
    let error = store
        .set_for_job("job-a", "wt", value(20), &through)
        .unwrap_err();
    assert_eq!(error.code(), ErrorCode::OperateDiskFailed);
    assert_eq!(store.memory_bytes(), 0);
    assert_accounting_exact(&store);
}

#[test]
fn values_the_second_level_store_holds_are_evicted_to_make_room() {
    let (store, fake) = with_fake();
    store.set_quota(Some(50));
    let through = param(WriteMode::WriteThroughL2Cache);
    store
        .set_for_job("job-a", "old", value(17), &through)
        .unwrap(); // 20
    store
        .set_for_job("job-a", "mid", value(17), &through)
        .unwrap(); // 20
    store
        .set_for_job("job-a", "new", value(17), &through)
        .unwrap(); // evicts "old"
    assert_eq!(store.job_bytes("job-a"), 40);
    assert!(fake.has("old"));
    assert_accounting_exact(&store);
    // The evicted value is read through again, counted under no job.
    assert_eq!(store.get(&["old"], SHORT).unwrap(), vec![value(17)]);
    assert_eq!(store.job_bytes(UNKNOWN_JOB), 20);
    // Memory-only values are never evicted.
    let error = store
        .set_for_job("job-a", "mem", value(60), &SetParam::default())
        .unwrap_err();
    assert_eq!(error.code(), ErrorCode::SharedMemoryLimited);
    // A write that would not fit even after evicting changes nothing: nothing is evicted.
    assert_eq!(store.job_bytes("job-a"), 40);
    assert_eq!(
        store.try_get(&["mid", "new"]).unwrap(),
        vec![Some(value(17)), Some(value(17))]
    );
    store.del(&["old", "mid", "new"]).unwrap();
    assert_eq!(store.memory_bytes(), 0);
}

#[test]
fn a_read_through_that_does_not_fit_is_served_without_being_kept() {
    let (store, fake) = with_fake();
    store.set_quota(Some(50));
    fake.put("big", &[b'v'; 60], None).unwrap();
    assert_eq!(store.get(&["big"], SHORT).unwrap(), vec![value(60)]);
    assert_eq!(store.len(), 0);
    assert_eq!(store.memory_bytes(), 0);
}

#[test]
fn concurrent_writers_of_one_job_never_pass_its_quota() {
    let store = KvStore::new();
    let quota = 10_000;
    store.set_quota(Some(quota));
    std::thread::scope(|scope| {
        for thread in 0..4 {
            let store = store.clone();
            scope.spawn(move || {
                for i in 0..200 {
                    let key = format!("t{thread}-{}", i % 50);
                    let _ = write(&store, "job-a", &key, 50 + (i * 7) % 100);
                }
            });
        }
    });
    assert!(store.job_bytes("job-a") <= quota);
    assert_accounting_exact(&store);
    let keys: Vec<String> = store
        .handle
        .shared
        .map
        .lock()
        .entries
        .keys()
        .cloned()
        .collect();
    store.del(&keys).unwrap();
    assert_eq!(store.memory_bytes(), 0);
}
