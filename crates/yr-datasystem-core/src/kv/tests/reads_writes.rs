//! Writes, waiting reads, key and value checks, ranges, deletes.

use super::*;

#[test]
fn set_then_get_returns_the_value() {
    let store = KvStore::new();
    store.set("a", bytes("1"), &SetParam::default()).unwrap();
    store.set("b", bytes("2"), &SetParam::default()).unwrap();
    assert_eq!(
        store.get(&["a", "b", "a"], SHORT).unwrap(),
        vec![bytes("1"), bytes("2"), bytes("1")]
    );
    store.set("a", bytes("3"), &SetParam::default()).unwrap();
    assert_eq!(store.get(&["a"], SHORT).unwrap(), vec![bytes("3")]);
}

#[test]
fn nx_on_an_existing_key_is_4206_and_keeps_the_value() {
    let store = KvStore::new();
    store.set("k", bytes("first"), &nx()).unwrap();
    let error = store.set("k", bytes("second"), &nx()).unwrap_err();
    assert_eq!(error.code(), ErrorCode::KeyAlreadyExist);
    assert!(error.message().contains("\"k\""), "{}", error.message());
    assert_eq!(store.get(&["k"], SHORT).unwrap(), vec![bytes("first")]);
    store.del(&["k"]).unwrap();
    store.set("k", bytes("third"), &nx()).unwrap();
}

#[test]
fn nx_sees_keys_that_only_the_second_level_store_holds() {
    let (store, fake) = with_fake();
    fake.put("old", b"v", None).unwrap();
    let error = store.set("old", bytes("new"), &nx()).unwrap_err();
    assert_eq!(error.code(), ErrorCode::KeyAlreadyExist);
}

#[test]
fn concurrent_nx_writes_let_exactly_one_win() {
    let store = KvStore::new();
    let wins: usize = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let store = store.clone();
                scope.spawn(move || store.set("race", bytes(&i.to_string()), &nx()).is_ok())
            })
            .collect();
        handles
            .into_iter()
            .map(|h| usize::from(h.join().unwrap()))
            .sum()
    });
    assert_eq!(wins, 1);
}

#[test]
fn keys_are_checked() {
    let store = KvStore::new();
    let empty = store.set("", bytes("v"), &SetParam::default()).unwrap_err();
    assert_eq!(empty.code(), ErrorCode::ParamInvalid);
    let long = "x".repeat(MAX_KEY_SIZE + 1);
    let error = store
        .set(&long, bytes("v"), &SetParam::default())
        .unwrap_err();
    assert_eq!(error.code(), ErrorCode::ParamInvalid);
    assert!(error.message().contains("1025"), "{}", error.message());
    store
        .set(&"x".repeat(MAX_KEY_SIZE), bytes("v"), &SetParam::default())
        .unwrap();
    for result in [
        store.get(&[""], SHORT).map(|_| ()),
        store.get::<&str>(&[], SHORT).map(|_| ()),
        store.del(&[long.as_str()]),
        store.exist(&[""]).map(|_| ()),
    ] {
        assert_eq!(result.unwrap_err().code(), ErrorCode::ParamInvalid);
    }
}

#[test]
fn values_over_the_message_size_are_1001_with_both_sizes() {
    let error = validate_set("big", MAX_VALUE_SIZE + 1, &SetParam::default()).unwrap_err();
    assert_eq!(error.code(), ErrorCode::ParamInvalid);
    assert!(error.message().contains(&(MAX_VALUE_SIZE + 1).to_string()));
    assert!(error.message().contains(&MAX_VALUE_SIZE.to_string()));
    validate_set("big", MAX_VALUE_SIZE, &SetParam::default()).unwrap();
    let store = KvStore::new();
    let error = store
        .set(
            "big",
            Bytes::from(vec![0u8; MAX_VALUE_SIZE + 1]),
            &SetParam::default(),
        )
        .unwrap_err();
    assert_eq!(error.code(), ErrorCode::ParamInvalid);
    assert!(store.is_empty());
}

#[test]
fn a_ttl_beyond_the_limit_is_1001() {
    let store = KvStore::new();
    let error = store
        .set("k", bytes("v"), &ttl(MAX_TTL_SECOND + 1))
        .unwrap_err();
    assert_eq!(error.code(), ErrorCode::ParamInvalid);
    store.set("k", bytes("v"), &ttl(MAX_TTL_SECOND)).unwrap();
    assert_eq!(store.get(&["k"], SHORT).unwrap(), vec![bytes("v")]);
}

#[test]
fn get_times_out_with_4005_naming_only_the_missing_keys() {
    let store = KvStore::new();
    store.set("here", bytes("v"), &SetParam::default()).unwrap();
    let started = Instant::now();
    let error = store
        .get(&["here", "gone-1", "gone-2"], Duration::from_millis(200))
        .unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(error.code(), ErrorCode::GetOperationFailed);
    assert!(
        error.message().contains("[gone-1, gone-2]"),
        "{}",
        error.message()
    );
    assert!(!error.message().contains("here,"), "{}", error.message());
    let error = store.get(&["gone-1"], Duration::ZERO).unwrap_err();
    assert_eq!(error.code(), ErrorCode::GetOperationFailed);
}

#[test]
fn get_waits_for_keys_written_later() {
    let store = KvStore::new();
    let writer = store.clone();
    let started = Instant::now();
    let thread = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        writer
            .set("late-1", bytes("1"), &SetParam::default())
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        writer
            .set("late-2", bytes("2"), &SetParam::default())
            .unwrap();
    });
    let values = store
        .get(&["late-1", "late-2"], Duration::from_secs(10))
        .unwrap();
    assert_eq!(values, vec![bytes("1"), bytes("2")]);
    assert!(started.elapsed() < Duration::from_secs(5));
    thread.join().unwrap();
    // The waiter unregistered itself.
    assert!(store.handle.shared.map.lock().watchers.is_empty());
}

#[test]
fn close_ends_waiting_reads_with_its_error() {
    let store = KvStore::new();
    let closer = store.clone();
    let thread = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        closer.close(Error::new(ErrorCode::Finalized, "going away"));
    });
    let error = store.get(&["never"], Duration::MAX).unwrap_err();
    assert_eq!(error.code(), ErrorCode::Finalized);
    thread.join().unwrap();
    let error = store.get(&["never"], Duration::MAX).unwrap_err();
    assert_eq!(error.code(), ErrorCode::Finalized);
    store.set("k", bytes("v"), &SetParam::default()).unwrap();
    assert_eq!(store.get(&["k"], Duration::MAX).unwrap(), vec![bytes("v")]);
}

#[test]
fn get_waits_forever_with_duration_max() {
    let store = KvStore::new();
    let writer = store.clone();
    let thread = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        writer.set("k", bytes("v"), &SetParam::default()).unwrap();
    });
    assert_eq!(store.get(&["k"], Duration::MAX).unwrap(), vec![bytes("v")]);
    thread.join().unwrap();
}

#[test]
fn ranged_reads_and_bad_ranges() {
    let store = KvStore::new();
    store
        .set("r", bytes("0123456789"), &SetParam::default())
        .unwrap();
    assert_eq!(
        store.get_with_param("r", 2, 3, SHORT).unwrap(),
        bytes("234")
    );
    assert_eq!(
        store.get_with_param("r", 7, 0, SHORT).unwrap(),
        bytes("789")
    );
    assert_eq!(store.get_with_param("r", 10, 0, SHORT).unwrap(), bytes(""));
    assert_eq!(
        store.get_with_param("r", 0, 10, SHORT).unwrap(),
        bytes("0123456789")
    );
    for (offset, size) in [(11, 0), (5, 6), (u64::MAX, 2), (1, u64::MAX)] {
        let error = store.get_with_param("r", offset, size, SHORT).unwrap_err();
        assert_eq!(error.code(), ErrorCode::ParamInvalid, "{offset} {size}");
        assert!(error.message().contains("10 bytes"), "{}", error.message());
    }
    assert_eq!(
        store
            .get_with_param("missing", 0, 1, SHORT)
            .unwrap_err()
            .code(),
        ErrorCode::GetOperationFailed
    );
}

#[test]
fn del_and_exist() {
    let store = KvStore::new();
    store.set("a", bytes("1"), &SetParam::default()).unwrap();
    store.set("b", bytes("2"), &SetParam::default()).unwrap();
    assert_eq!(
        store.exist(&["a", "b", "c"]).unwrap(),
        vec![true, true, false]
    );
    store.del(&["a", "c"]).unwrap();
    assert_eq!(
        store.exist(&["a", "b", "c"]).unwrap(),
        vec![false, true, false]
    );
}

#[test]
fn a_read_waiting_for_a_key_is_counted_until_the_key_arrives() {
    let store = KvStore::new();
    assert_eq!(store.waiting_reads(), 0);
    let reader = {
        let store = store.clone();
        std::thread::spawn(move || store.get(&["later"], Duration::from_secs(10)))
    };
    // The event the node's metric reports: the read is parked on its key.
    while store.waiting_reads() == 0 {
        std::thread::yield_now();
    }
    store
        .set("later", bytes("here"), &SetParam::default())
        .unwrap();
    assert_eq!(reader.join().unwrap().unwrap(), vec![bytes("here")]);
    assert_eq!(store.waiting_reads(), 0);
}
