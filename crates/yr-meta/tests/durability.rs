//! The embedded store keeps what it acknowledged across restarts: reopen, torn final records,
//! corruption, compaction, leases.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use common::*;
use yr_meta::{
    put_if_version, Compare, EmbeddedOptions, EmbeddedStore, KeyValue, MetaError, MetaStore, TxnOp,
    WatchEvent,
};

async fn everything(store: &dyn MetaStore) -> (u64, Vec<KeyValue>) {
    (
        store.current_revision().await.unwrap(),
        store.range("").await.unwrap(),
    )
}

/// A mix of writes: puts, overwrites, deletes, a transaction, a CAS, a leased key.
async fn write_a_history(store: &dyn MetaStore, round: u32) {
    for i in 0..20 {
        store
            .put(&format!("r{round}/k{i:02}"), b(&format!("v{i}")), None)
            .await
            .unwrap();
    }
    for i in 0..5 {
        store
            .put(&format!("r{round}/k{i:02}"), b("again"), None)
            .await
            .unwrap();
    }
    for i in 15..20 {
        assert!(store.delete(&format!("r{round}/k{i:02}")).await.unwrap());
    }
    store
        .put(&format!("r{round}/k17"), b("reborn"), None)
        .await
        .unwrap();
    store
        .txn(
            vec![Compare::Version {
                key: format!("r{round}/k00"),
                version: 2,
            }],
            vec![
                TxnOp::Put {
                    key: format!("r{round}/instance"),
                    value: b("RUNNING"),
                    lease: None,
                },
                TxnOp::Put {
                    key: format!("r{round}/route"),
                    value: b("node-1"),
                    lease: None,
                },
                TxnOp::Delete {
                    key: format!("r{round}/k01"),
                },
            ],
            vec![],
        )
        .await
        .unwrap();
    put_if_version(store, &format!("r{round}/instance"), b("EXITING"), 1)
        .await
        .unwrap()
        .unwrap();
    let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    store
        .put(&format!("r{round}/node"), b("alive"), Some(lease))
        .await
        .unwrap();
}

#[tokio::test]
async fn reopening_a_directory_restores_data_versions_and_revision() {
    let dir = TempDir::new("reopen");
    let before = {
        let store = EmbeddedStore::open(dir.path()).await.unwrap();
        write_a_history(&store, 0).await;
        everything(&store).await
    };
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    assert_eq!(everything(&store).await, before);
    // The next write continues the revision and the key's version.
    let next = store.put("r0/k00", b("after"), None).await.unwrap();
    assert_eq!(next.mod_revision, before.0 + 1);
    assert_eq!(next.version, 3);
    // Lease ids are never reused.
    let leased = store.get("r0/node").await.unwrap().unwrap();
    let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    assert!(lease > leased.lease.unwrap());
}

#[tokio::test]
async fn a_second_store_cannot_open_a_directory_in_use() {
    let dir = TempDir::new("locked");
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    let err = EmbeddedStore::open(dir.path()).await.err().unwrap();
    assert!(
        matches!(err, MetaError::Io(ref m) if m.contains("in use")),
        "{err}"
    );
    drop(store);
    EmbeddedStore::open(dir.path()).await.unwrap();
}

#[tokio::test]
async fn a_torn_final_record_is_cut_off_and_the_rest_recovered() {
    let dir = TempDir::new("torn");
    let (before_last, with_last) = {
        let store = EmbeddedStore::open(dir.path()).await.unwrap();
        for i in 0..10 {
            store.put(&format!("k{i}"), b("v"), None).await.unwrap();
        }
        let before_last = everything(&store).await;
        store.put("last", b("torn"), None).await.unwrap();
        (before_last, everything(&store).await)
    };
    // A crash in the middle of the last write leaves part of its record.
    let log = dir.files(".wal").pop().unwrap();
    let len = std::fs::metadata(&log).unwrap().len();
    for cut in [3, 9, 20] {
        let copy = dir.path().join("copy");
        let _ = std::fs::remove_dir_all(&copy);
        std::fs::create_dir_all(&copy).unwrap();
        let data = std::fs::read(&log).unwrap();
        std::fs::write(
            copy.join(log.file_name().unwrap()),
            &data[..(len - cut) as usize],
        )
        .unwrap();
        let store = EmbeddedStore::open(&copy).await.unwrap();
        assert_eq!(everything(&store).await, before_last, "cut {cut} bytes");
        // The store writes on after the repair, and the repair itself is durable.
        let again = store.put("last", b("again"), None).await.unwrap();
        assert_eq!(again.mod_revision, before_last.0 + 1);
        drop(store);
        let store = EmbeddedStore::open(&copy).await.unwrap();
        assert_eq!(store.get("last").await.unwrap(), Some(again));
    }
    // Zeros after the last record (a file system that extended the file) are a torn write too.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .unwrap()
        .write_all(&[0; 64])
        .unwrap();
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    assert_eq!(everything(&store).await, with_last);
}

#[tokio::test]
async fn a_damaged_record_in_the_middle_is_corruption_with_its_offset() {
    let dir = TempDir::new("corrupt");
    {
        let store = EmbeddedStore::open(dir.path()).await.unwrap();
        for i in 0..10 {
            store
                .put(&format!("key-{i}"), b("value-value-value"), None)
                .await
                .unwrap();
        }
    }
    let log = dir.files(".wal").pop().unwrap();
    let mut data = std::fs::read(&log).unwrap();
    // Damage the payload of the fifth record: records are all the same size here.
    let record = (data.len() - 8) / 10;
    let offset = 8 + 4 * record;
    data[offset + 20] ^= 0x55;
    std::fs::write(&log, &data).unwrap();
    let err = EmbeddedStore::open(dir.path()).await.err().unwrap();
    match err {
        MetaError::Corrupt(message) => {
            assert!(
                message.contains(&format!("offset {offset}")),
                "message names the offset {offset}: {message}"
            );
            assert!(message.contains(&log.display().to_string()), "{message}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

fn small_log() -> EmbeddedOptions {
    EmbeddedOptions {
        max_log_records: 10,
        ..EmbeddedOptions::default()
    }
}

#[tokio::test]
async fn compaction_snapshots_the_state_and_reopening_restores_it() {
    let dir = TempDir::new("compact");
    let (before, mid_revision) = {
        let store = EmbeddedStore::open_with(dir.path(), small_log())
            .await
            .unwrap();
        write_a_history(&store, 0).await;
        let mid_revision = store.current_revision().await.unwrap();
        write_a_history(&store, 1).await;
        (everything(&store).await, mid_revision)
    };
    // The logs were cut short: a snapshot and at most a couple of short logs remain.
    assert!(!dir.files(".snap").is_empty(), "a snapshot was written");
    assert!(dir.files(".snap").len() <= 2);
    assert!(dir.files(".wal").len() <= 2, "{:?}", dir.files(".wal"));
    assert!(dir.files(".tmp").is_empty());

    let store = EmbeddedStore::open_with(dir.path(), small_log())
        .await
        .unwrap();
    assert_eq!(everything(&store).await, before);
    // History before the snapshot is gone: a watch from there must re-read.
    assert!(matches!(
        store.watch_prefix("r0/", mid_revision).await,
        Err(MetaError::Compacted { .. })
    ));
    write_a_history(&store, 2).await;
    let after = everything(&store).await;
    drop(store);
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    assert_eq!(everything(&store).await, after);
}

#[tokio::test]
async fn a_watch_resumes_after_a_restart_from_the_replayed_log() {
    let dir = TempDir::new("resume-after-restart");
    let seen = {
        let store = EmbeddedStore::open(dir.path()).await.unwrap();
        let seen = store.put("w/a", b("1"), None).await.unwrap();
        store.put("w/b", b("2"), None).await.unwrap();
        store.delete("w/a").await.unwrap();
        seen.mod_revision
    };
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    let mut rx = store.watch_prefix("w/", seen).await.unwrap();
    assert_eq!(put_event(&next_event(&mut rx).await).key, "w/b");
    assert_eq!(
        next_event(&mut rx).await,
        WatchEvent::Delete {
            key: "w/a".into(),
            revision: seen + 2
        }
    );
    let c = store.put("w/c", b("3"), None).await.unwrap();
    assert_eq!(next_event(&mut rx).await, WatchEvent::Put(c));
}

#[tokio::test]
async fn leases_survive_a_restart_with_a_fresh_ttl_and_revokes_stay_revoked() {
    let dir = TempDir::new("lease-restart");
    let (live, revoked) = {
        let store = EmbeddedStore::open(dir.path()).await.unwrap();
        let live = store.grant_lease(Duration::from_millis(800)).await.unwrap();
        let revoked = store.grant_lease(Duration::from_secs(60)).await.unwrap();
        store.put("l/live", b("x"), Some(live)).await.unwrap();
        store.put("l/revoked", b("x"), Some(revoked)).await.unwrap();
        store.revoke_lease(revoked).await.unwrap();
        (live, revoked)
    };
    // Down for longer than the TTL: the lease would have expired, but its owner had no store to
    // renew it with, so it gets a full TTL from the restart.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    assert_eq!(
        store.get("l/live").await.unwrap().unwrap().lease,
        Some(live)
    );
    assert_eq!(store.get("l/revoked").await.unwrap(), None);
    assert_eq!(
        store.keep_alive(revoked).await,
        Err(MetaError::LeaseNotFound(revoked))
    );
    // Nobody renews it now: it ends one TTL after the restart and its key goes.
    let mut rx = store.watch_prefix("l/", 0).await.unwrap();
    let took = wait_gone(&store, "l/live", Duration::from_secs(10)).await;
    assert!(took >= Duration::from_millis(500), "ended after {took:?}");
    assert!(matches!(
        next_event(&mut rx).await,
        WatchEvent::Delete { .. }
    ));
    drop(store);
    // ... and the expiry itself was durable.
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    assert_eq!(store.get("l/live").await.unwrap(), None);
    assert_eq!(
        store.keep_alive(live).await,
        Err(MetaError::LeaseNotFound(live))
    );
}

#[tokio::test]
async fn many_concurrent_writers_share_syncs_and_all_survive_a_reopen() {
    let dir = TempDir::new("group-commit");
    let expected = {
        let store = std::sync::Arc::new(
            EmbeddedStore::open_with(
                dir.path(),
                EmbeddedOptions {
                    max_log_records: 150,
                    ..EmbeddedOptions::default()
                },
            )
            .await
            .unwrap(),
        );
        let mut tasks = Vec::new();
        for t in 0..8 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut written = BTreeMap::new();
                for i in 0..100 {
                    let kv = store
                        .put(&format!("g/{t}/{i}"), b(&format!("{t}-{i}")), None)
                        .await
                        .unwrap();
                    written.insert(kv.key.clone(), kv);
                }
                written
            }));
        }
        let mut expected = BTreeMap::new();
        for task in tasks {
            expected.extend(task.await.unwrap());
        }
        expected
    };
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    let found: BTreeMap<String, KeyValue> = store
        .range("g/")
        .await
        .unwrap()
        .into_iter()
        .map(|kv| (kv.key.clone(), kv))
        .collect();
    assert_eq!(found, expected);
}
