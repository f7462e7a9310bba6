//! KV: `kv_write`/`kv_set` (4206 for NX on an existing key, TTL expiry, every write mode),
//! `kv_read`/`kv_get` (waits for keys written later; 4005 naming the missing keys),
//! `kv_get_with_param` (ranged reads; 1001 outside the value), `kv_del`, `kv_exist`, the limits
//! on keys and values (1001), user code on either side, and calls outside a session (4001,
//! 9000). Keys are unique per test: a cluster's node keeps its KV store across sessions.

use std::time::{Duration, Instant};

use yr::{ErrorCode, Existence, SetParam, WriteMode};

use crate::support::{self, assert_error, unwrap_err, TIMEOUT};

/// The largest value, the largest KV message: 64 MiB.
const MAX_VALUE: usize = 64 * 1024 * 1024;

fn key(label: &str) -> String {
    support::unique(&format!("kv-{label}"))
}

fn nx() -> SetParam {
    SetParam {
        existence: Existence::NX,
        ..SetParam::default()
    }
}

#[yr::invoke]
fn write_key(key: String, value: String) -> bool {
    yr::kv_write(&key, value.as_bytes(), SetParam::default()).is_ok()
}

/// Marks `marker`, then reads `key` (waiting for it).
#[yr::invoke]
fn read_key(key: String, marker: String) -> String {
    support::hit(&marker);
    let values = yr::kv_read(&[&key], Duration::from_secs(10)).expect("the key is written");
    String::from_utf8_lossy(&values[0]).into_owned()
}

#[test]
fn written_values_read_back_in_order_under_both_names() {
    let _session = support::session();
    let (a, b) = (key("a"), key("b"));
    yr::kv_write(&a, b"first", SetParam::default()).unwrap();
    yr::kv_set(&b, &[0, 255, 10, 13], SetParam::default()).unwrap();
    assert_eq!(
        yr::kv_read(&[&a, &b, &a], TIMEOUT).unwrap(),
        vec![b"first".to_vec(), vec![0, 255, 10, 13], b"first".to_vec()]
    );
    yr::kv_write(&a, b"", SetParam::default()).unwrap();
    assert_eq!(yr::kv_get(&[&a], TIMEOUT).unwrap(), vec![Vec::<u8>::new()]);
}

#[test]
fn nx_write_of_an_existing_key_is_4206_and_keeps_the_value() {
    let _session = support::session();
    let k = key("nx");
    yr::kv_write(&k, b"first", nx()).unwrap();
    let error = unwrap_err(yr::kv_write(&k, b"second", nx()));
    assert_error(&error, ErrorCode::KeyAlreadyExist, &[&k]);
    assert_eq!(
        yr::kv_read(&[&k], TIMEOUT).unwrap(),
        vec![b"first".to_vec()]
    );
    // Without NX the write replaces it.
    yr::kv_write(&k, b"third", SetParam::default()).unwrap();
    assert_eq!(
        yr::kv_read(&[&k], TIMEOUT).unwrap(),
        vec![b"third".to_vec()]
    );
}

#[test]
fn a_key_expires_after_its_ttl() {
    let _session = support::session();
    let (brief, lasting) = (key("ttl"), key("no-ttl"));
    let one_second = SetParam {
        ttl_second: 1,
        ..SetParam::default()
    };
    yr::kv_write(&brief, b"v", one_second).unwrap();
    yr::kv_write(&lasting, b"v", SetParam::default()).unwrap();
    assert_eq!(yr::kv_exist(&[&brief]).unwrap(), vec![true]);
    // The instant of expiry is proven on a manual clock (yr-datasystem's kv tests); here the
    // key must go, whenever its second is up on this machine, and the other stay.
    let deadline = Instant::now() + support::TIMEOUT;
    while yr::kv_exist(&[&brief]).unwrap() == vec![true] && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        yr::kv_exist(&[&brief, &lasting]).unwrap(),
        vec![false, true]
    );
    let error = unwrap_err(yr::kv_read(&[&brief], Duration::from_millis(100)));
    assert_error(&error, ErrorCode::GetOperationFailed, &[&brief]);
    // An expired key is free for an NX write.
    yr::kv_write(&brief, b"again", nx()).unwrap();
}

#[test]
fn a_read_waits_for_a_key_written_later_by_another_thread() {
    let _session = support::session();
    let k = key("later");
    let reader_key = k.clone();
    let started = Instant::now();
    // Returns once the reader waits for its answer (on a cluster: once the node parks it).
    let reader = support::spawn_until_parked(support::Parked::KvRead, move || {
        yr::kv_read(&[&reader_key], TIMEOUT)
    });
    // The write comes after the read waits.
    yr::kv_write(&k, b"arrived", SetParam::default()).unwrap();
    let values = reader.join().unwrap().unwrap();
    assert_eq!(values, vec![b"arrived".to_vec()]);
    assert!(started.elapsed() < TIMEOUT);
}

#[test]
fn a_read_that_times_out_is_4005_naming_the_missing_keys() {
    let _session = support::session();
    let (here, missing) = (key("here"), key("missing"));
    yr::kv_write(&here, b"v", SetParam::default()).unwrap();
    let started = Instant::now();
    let error = unwrap_err(yr::kv_read(&[&here, &missing], Duration::from_millis(300)));
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_error(&error, ErrorCode::GetOperationFailed, &[&missing]);
    assert!(
        !error.message().contains(&here),
        "only missing keys are named: {}",
        error.message()
    );
    // A ranged read waits the same way.
    let error = unwrap_err(yr::kv_get_with_param(
        &missing,
        0,
        1,
        Duration::from_millis(100),
    ));
    assert_error(&error, ErrorCode::GetOperationFailed, &[&missing]);
}

#[test]
fn ranged_reads_return_part_of_the_value() {
    let _session = support::session();
    let k = key("range");
    yr::kv_write(&k, b"0123456789", SetParam::default()).unwrap();
    assert_eq!(yr::kv_get_with_param(&k, 0, 4, TIMEOUT).unwrap(), b"0123");
    assert_eq!(yr::kv_get_with_param(&k, 4, 3, TIMEOUT).unwrap(), b"456");
    assert_eq!(
        yr::kv_get_with_param(&k, 6, 0, TIMEOUT).unwrap(),
        b"6789",
        "size 0 reads to the end"
    );
    assert_eq!(yr::kv_get_with_param(&k, 10, 0, TIMEOUT).unwrap(), b"");
    for (offset, size) in [(11, 0), (8, 3), (0, 11), (usize::MAX, 1)] {
        let error = unwrap_err(yr::kv_get_with_param(&k, offset, size, TIMEOUT));
        assert_error(&error, ErrorCode::ParamInvalid, &["10 bytes"]);
    }
}

#[test]
fn deleted_keys_are_gone_and_deleting_a_missing_key_succeeds() {
    let _session = support::session();
    let (a, b, never) = (key("del-a"), key("del-b"), key("del-never"));
    yr::kv_write(&a, b"1", SetParam::default()).unwrap();
    yr::kv_write(&b, b"2", SetParam::default()).unwrap();
    yr::kv_del(&[&a, &never]).unwrap();
    assert_eq!(
        yr::kv_exist(&[&a, &b, &never]).unwrap(),
        vec![false, true, false]
    );
    let error = unwrap_err(yr::kv_read(&[&a], Duration::from_millis(100)));
    assert_error(&error, ErrorCode::GetOperationFailed, &[&a]);
    assert_eq!(yr::kv_read(&[&b], TIMEOUT).unwrap(), vec![b"2".to_vec()]);
}

#[test]
fn exist_answers_for_each_key_in_order() {
    let _session = support::session();
    let (a, b, c) = (key("ex-a"), key("ex-b"), key("ex-c"));
    yr::kv_write(&b, b"v", SetParam::default()).unwrap();
    assert_eq!(
        yr::kv_exist(&[&a, &b, &c, &b]).unwrap(),
        vec![false, true, false, true]
    );
}

#[test]
fn keys_are_checked_with_1001() {
    let _session = support::session();
    let long = "k".repeat(1025);
    let cases = [
        (
            "an empty key",
            unwrap_err(yr::kv_write("", b"v", SetParam::default())),
        ),
        (
            "a key of 1025 bytes",
            unwrap_err(yr::kv_write(&long, b"v", SetParam::default())),
        ),
        (
            "a read of an empty key",
            unwrap_err(yr::kv_read(&[""], TIMEOUT)),
        ),
        ("a read of no keys", unwrap_err(yr::kv_read(&[], TIMEOUT))),
        (
            "a read of a long key",
            unwrap_err(yr::kv_read(&[&long], TIMEOUT)),
        ),
        (
            "a ranged read of an empty key",
            unwrap_err(yr::kv_get_with_param("", 0, 0, TIMEOUT)),
        ),
        ("a delete of an empty key", unwrap_err(yr::kv_del(&[""]))),
        ("an exist of a long key", unwrap_err(yr::kv_exist(&[&long]))),
    ];
    for (what, error) in cases {
        assert_eq!(error.code(), ErrorCode::ParamInvalid, "{what}: {error}");
    }
    assert!(unwrap_err(yr::kv_write(&long, b"v", SetParam::default()))
        .message()
        .contains("1025"));
    // 1024 bytes is allowed.
    let mut longest = key("max");
    longest.push_str(&"k".repeat(1024 - longest.len()));
    yr::kv_write(&longest, b"v", SetParam::default()).unwrap();
    assert_eq!(
        yr::kv_read(&[&longest], TIMEOUT).unwrap(),
        vec![b"v".to_vec()]
    );
}

#[test]
fn a_value_over_64_mib_is_1001_with_both_sizes() {
    let _session = support::session();
    let (fits, too_big) = (key("max-value"), key("too-big"));
    let value = vec![7u8; MAX_VALUE + 1];
    let error = unwrap_err(yr::kv_write(&too_big, &value, SetParam::default()));
    assert_error(
        &error,
        ErrorCode::ParamInvalid,
        &[&(MAX_VALUE + 1).to_string(), &MAX_VALUE.to_string()],
    );
    assert_eq!(yr::kv_exist(&[&too_big]).unwrap(), vec![false]);
    // Exactly 64 MiB is allowed.
    yr::kv_write(&fits, &value[..MAX_VALUE], SetParam::default()).unwrap();
    assert_eq!(
        yr::kv_get_with_param(&fits, MAX_VALUE - 3, 0, TIMEOUT).unwrap(),
        vec![7u8; 3]
    );
    yr::kv_del(&[&fits]).unwrap();
}

#[test]
fn every_write_mode_is_accepted() {
    let _session = support::session();
    for (i, write_mode) in [
        WriteMode::NoneL2Cache,
        WriteMode::WriteThroughL2Cache,
        WriteMode::WriteBackL2Cache,
        WriteMode::NoneL2CacheEvict,
    ]
    .into_iter()
    .enumerate()
    {
        let k = key(&format!("mode{i}"));
        let param = SetParam {
            write_mode,
            ..SetParam::default()
        };
        yr::kv_write(&k, format!("{write_mode:?}").as_bytes(), param).unwrap();
        assert_eq!(
            yr::kv_read(&[&k], TIMEOUT).unwrap(),
            vec![format!("{write_mode:?}").into_bytes()],
            "{write_mode:?}"
        );
        yr::kv_del(&[&k]).unwrap();
        assert_eq!(yr::kv_exist(&[&k]).unwrap(), vec![false], "{write_mode:?}");
    }
}

#[test]
fn user_code_and_the_driver_share_the_store() {
    let _session = support::session();
    let (from_function, from_driver) = (key("from-function"), key("from-driver"));
    let wrote = yr::function(write_key)
        .invoke((from_function.clone(), "written remotely".to_string()))
        .unwrap();
    assert!(support::get(&wrote));
    assert_eq!(
        yr::kv_read(&[&from_function], TIMEOUT).unwrap(),
        vec![b"written remotely".to_vec()]
    );
    // A function that waits for a key the driver writes once the function is about to read.
    // (That the read waits is `a_read_waits_for_a_key_written_later_by_another_thread`; here
    // the value is the same whether the write or the read reaches the store first.)
    let reading = support::Marker::new("reading");
    let read = yr::function(read_key)
        .invoke((from_driver.clone(), reading.path()))
        .unwrap();
    assert!(reading.wait_for(1, TIMEOUT), "the function never started");
    yr::kv_write(&from_driver, b"written locally", SetParam::default()).unwrap();
    assert_eq!(support::get(&read), "written locally");
}

#[test]
fn kv_calls_after_finalize_fail_with_9000() {
    let _exclusive = support::exclusive();
    yr::init(support::config()).unwrap();
    yr::finalize().unwrap();
    let errors = [
        unwrap_err(yr::kv_write("k", b"v", SetParam::default())),
        unwrap_err(yr::kv_read(&["k"], TIMEOUT)),
        unwrap_err(yr::kv_get_with_param("k", 0, 0, TIMEOUT)),
        unwrap_err(yr::kv_del(&["k"])),
        unwrap_err(yr::kv_exist(&["k"])),
    ];
    for error in errors {
        assert_error(&error, ErrorCode::Finalized, &["init"]);
    }
}

#[test]
fn a_read_waiting_when_finalize_runs_fails_with_9000() {
    let _exclusive = support::exclusive();
    yr::init(support::config()).unwrap();
    let k = key("never-written");
    // Finalize runs once the read is issued and waits for its answer.
    let reader = support::spawn_until_blocked(move || yr::kv_read(&[&k], yr::FOREVER));
    let finalized_at = Instant::now();
    yr::finalize().unwrap();
    let error = unwrap_err(reader.join().unwrap());
    assert_error(&error, ErrorCode::Finalized, &["finalize"]);
    assert!(finalized_at.elapsed() < TIMEOUT);
}

#[test]
fn kv_calls_before_init_fail_with_4001() {
    support::in_fresh_process("kv::kv_calls_before_init_fail_with_4001", || {
        let errors = [
            unwrap_err(yr::kv_write("k", b"v", SetParam::default())),
            unwrap_err(yr::kv_set("k", b"v", SetParam::default())),
            unwrap_err(yr::kv_read(&["k"], TIMEOUT)),
            unwrap_err(yr::kv_get(&["k"], TIMEOUT)),
            unwrap_err(yr::kv_get_with_param("k", 0, 0, TIMEOUT)),
            unwrap_err(yr::kv_del(&["k"])),
            unwrap_err(yr::kv_exist(&["k"])),
        ];
        for error in errors {
            assert_error(&error, ErrorCode::IncorrectInitUsage, &["init"]);
        }
    });
}
