//! Behaviours every `MetaStore` must show, run against the embedded store directly and through
//! `RemoteStore` against a real server, plus helpers for temp dirs and servers.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
pub mod etcd;

use yr_meta::{
    create_if_absent, delete_if_version, put_if_mod_revision, put_if_version, serve, Compare,
    KeyValue, MetaError, MetaStore, TxnOp, WatchEvent,
};

/// Shows the crate's logs in a test's output (run with `--nocapture` to see them live).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_max_level(tracing::Level::INFO)
        .try_init();
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let path = std::env::temp_dir().join(format!(
            "yr-meta-test-{name}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }

    /// The log files in the directory, oldest first.
    pub fn files(&self, suffix: &str) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(suffix))
            .collect();
        files.sort();
        files
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A meta service serving `store` on 127.0.0.1, stopped on `stop`.
pub struct Server {
    pub address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), MetaError>>>,
}

impl Server {
    pub async fn start(store: Arc<dyn MetaStore>) -> Server {
        Server::start_on(store, "127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(store: Arc<dyn MetaStore>, address: SocketAddr) -> Server {
        install_test_token();
        let listener = tokio::net::TcpListener::bind(address).await.unwrap();
        let address = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(serve(store, listener, async {
            let _ = stopped.await;
        }));
        Server {
            address,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Stops the server and waits until it has let go of the store.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the server stops within 10 s")
            .unwrap()
            .unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// The next event, or a panic after 10 s.
pub async fn next_event(rx: &mut mpsc::Receiver<WatchEvent>) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a watch event within 10 s")
        .expect("the watch is still open")
}

/// Asserts no event arrives within `wait`.
pub async fn no_event(rx: &mut mpsc::Receiver<WatchEvent>, wait: Duration) {
    if let Ok(Some(event)) = tokio::time::timeout(wait, rx.recv()).await {
        panic!("unexpected watch event {event:?}");
    }
}

pub fn put_event(event: &WatchEvent) -> &KeyValue {
    match event {
        WatchEvent::Put(kv) => kv,
        other => panic!("expected a put, got {other:?}"),
    }
}

// ---- behaviours ----

pub async fn versions_and_revisions(store: &dyn MetaStore) {
    let start = store.current_revision().await.unwrap();
    assert!(start >= 1, "a store starts at revision 1");
    assert_eq!(store.get("v/a").await.unwrap(), None);

    let a1 = store.put("v/a", b("1"), None).await.unwrap();
    assert_eq!((a1.version, a1.mod_revision), (1, start + 1));
    let a2 = store.put("v/a", b("2"), None).await.unwrap();
    assert_eq!((a2.version, a2.mod_revision), (2, start + 2));
    let b1 = store.put("v/b", b("x"), None).await.unwrap();
    assert_eq!((b1.version, b1.mod_revision), (1, start + 3));
    assert_eq!(store.get("v/a").await.unwrap(), Some(a2.clone()));
    assert_eq!(store.current_revision().await.unwrap(), start + 3);

    // Deleting a missing key changes nothing.
    assert!(store.delete("v/a").await.unwrap());
    assert!(!store.delete("v/a").await.unwrap());
    assert_eq!(store.current_revision().await.unwrap(), start + 4);
    assert_eq!(store.get("v/a").await.unwrap(), None);

    // A re-created key starts again at version 1.
    let a3 = store.put("v/a", b("3"), None).await.unwrap();
    assert_eq!((a3.version, a3.mod_revision), (1, start + 5));

    store.put("v/c/1", b("c"), None).await.unwrap();
    store.put("w/other", b("o"), None).await.unwrap();
    let keys: Vec<String> = store
        .range("v/")
        .await
        .unwrap()
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(keys, ["v/a", "v/b", "v/c/1"]);
    assert_eq!(store.range("v/c/").await.unwrap().len(), 1);
    assert!(store.range("nothing/").await.unwrap().is_empty());

    assert!(matches!(
        store.put("", b("x"), None).await,
        Err(MetaError::InvalidArgument(_))
    ));
}

pub async fn compare_and_swap(store: &dyn MetaStore) {
    let created = create_if_absent(store, "cas/i", b("SCHEDULING"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(created.version, 1);
    let exists = create_if_absent(store, "cas/i", b("other"))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(exists, Some(created.clone()));

    let running = put_if_version(store, "cas/i", b("RUNNING"), 1)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(running.version, 2);
    assert_eq!(running.value, "RUNNING");

    // A writer with a stale version loses and learns the current record.
    let lost = put_if_version(store, "cas/i", b("FAILED"), 1)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(lost, Some(running.clone()));
    assert_eq!(store.get("cas/i").await.unwrap(), Some(running.clone()));

    // Expecting a version of a key that does not exist.
    let missing = put_if_version(store, "cas/missing", b("x"), 3)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(missing, None);
    assert_eq!(store.get("cas/missing").await.unwrap(), None);

    // Guarded delete.
    let stale = delete_if_version(store, "cas/i", 1).await.unwrap();
    assert_eq!(stale, Err(Some(running)));
    delete_if_version(store, "cas/i", 2).await.unwrap().unwrap();
    assert_eq!(store.get("cas/i").await.unwrap(), None);
    // Created again after the delete: version 1 again.
    let again = create_if_absent(store, "cas/i", b("NEW"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.version, 1);
}

pub async fn compare_and_swap_on_mod_revision(store: &dyn MetaStore) {
    // Absent: mod revision 0.
    let created = put_if_mod_revision(store, "modrev/n", b("ALIVE"), 0)
        .await
        .unwrap()
        .unwrap();
    let lost = put_if_mod_revision(store, "modrev/n", b("again"), 0)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(lost, Some(created.clone()));

    // A writer that read the record at its mod revision wins once.
    let draining = put_if_mod_revision(store, "modrev/n", b("DRAINING"), created.mod_revision)
        .await
        .unwrap()
        .unwrap();
    assert!(draining.mod_revision > created.mod_revision);
    assert_eq!(draining.version, 2);
    // A write elsewhere moves the store's revision, not this key's mod revision.
    store.put("modrev/other", b("x"), None).await.unwrap();
    // The stale mod revision is refused, and the loser learns the current record.
    let stale = put_if_mod_revision(store, "modrev/n", b("LOST"), created.mod_revision)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(stale, Some(draining.clone()));
    assert_eq!(store.get("modrev/n").await.unwrap(), Some(draining.clone()));
    // The current one still wins.
    let lost = put_if_mod_revision(store, "modrev/n", b("LOST"), draining.mod_revision)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lost.version, 3);
}

pub async fn transactions_are_atomic(store: &dyn MetaStore) {
    store.put("txn/instance", b("RUNNING"), None).await.unwrap();
    let before = store.current_revision().await.unwrap();

    // A failing compare runs the failure branch only.
    let response = store
        .txn(
            vec![
                Compare::Version {
                    key: "txn/instance".into(),
                    version: 1,
                },
                Compare::ValueEquals {
                    key: "txn/instance".into(),
                    value: b("CREATING"),
                },
            ],
            vec![
                TxnOp::Put {
                    key: "txn/instance".into(),
                    value: b("EXITING"),
                    lease: None,
                },
                TxnOp::Put {
                    key: "txn/route".into(),
                    value: b("r"),
                    lease: None,
                },
            ],
            vec![
                TxnOp::Get {
                    key: "txn/instance".into(),
                },
                TxnOp::Put {
                    key: "txn/conflicts".into(),
                    value: b("1"),
                    lease: None,
                },
                TxnOp::Delete {
                    key: "txn/absent".into(),
                },
            ],
        )
        .await
        .unwrap();
    assert!(!response.succeeded);
    assert_eq!(response.revision, before + 1);
    assert_eq!(response.results.len(), 3);
    assert_eq!(response.results[0].as_ref().unwrap().value, "RUNNING");
    assert_eq!(response.results[1].as_ref().unwrap().version, 1);
    assert_eq!(response.results[2], None);
    assert_eq!(
        store.get("txn/instance").await.unwrap().unwrap().value,
        "RUNNING"
    );
    assert_eq!(store.get("txn/route").await.unwrap(), None);
    assert!(store.get("txn/conflicts").await.unwrap().is_some());

    // All compares hold: instance and route written together, in one revision.
    let response = store
        .txn(
            vec![
                Compare::Version {
                    key: "txn/instance".into(),
                    version: 1,
                },
                Compare::ValueEquals {
                    key: "txn/instance".into(),
                    value: b("RUNNING"),
                },
                Compare::Version {
                    key: "txn/route".into(),
                    version: 0,
                },
            ],
            vec![
                TxnOp::Put {
                    key: "txn/instance".into(),
                    value: b("EXITING"),
                    lease: None,
                },
                TxnOp::Put {
                    key: "txn/route".into(),
                    value: b("r"),
                    lease: None,
                },
                TxnOp::Delete {
                    key: "txn/conflicts".into(),
                },
                TxnOp::Get {
                    key: "txn/instance".into(),
                },
            ],
            vec![],
        )
        .await
        .unwrap();
    assert!(response.succeeded);
    assert_eq!(response.revision, before + 2);
    let instance = response.results[0].clone().unwrap();
    let route = response.results[1].clone().unwrap();
    assert_eq!((instance.version, instance.mod_revision), (2, before + 2));
    assert_eq!((route.version, route.mod_revision), (1, before + 2));
    assert_eq!(response.results[2].as_ref().unwrap().key, "txn/conflicts");
    assert_eq!(response.results[3], Some(instance));
    assert_eq!(store.get("txn/conflicts").await.unwrap(), None);

    // A read-only transaction does not move the revision.
    let response = store
        .txn(
            vec![],
            vec![TxnOp::Get {
                key: "txn/route".into(),
            }],
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(response.revision, before + 2);
    assert_eq!(response.results[0], Some(route));

    // A branch that cannot run changes nothing at all.
    let err = store
        .txn(
            vec![],
            vec![
                TxnOp::Put {
                    key: "txn/partial".into(),
                    value: b("x"),
                    lease: None,
                },
                TxnOp::Put {
                    key: "txn/leased".into(),
                    value: b("x"),
                    lease: Some(987_654),
                },
            ],
            vec![],
        )
        .await
        .unwrap_err();
    assert_eq!(err, MetaError::LeaseNotFound(987_654));
    let err = store
        .txn(
            vec![],
            vec![
                TxnOp::Put {
                    key: "txn/partial".into(),
                    value: b("x"),
                    lease: None,
                },
                TxnOp::Delete {
                    key: "txn/partial".into(),
                },
            ],
            vec![],
        )
        .await
        .unwrap_err();
    assert!(matches!(err, MetaError::InvalidArgument(_)), "{err:?}");
    assert_eq!(store.get("txn/partial").await.unwrap(), None);
    assert_eq!(store.current_revision().await.unwrap(), before + 2);
}

pub async fn watch_in_order_and_resume(store: &dyn MetaStore) {
    store.put("watch/old", b("before"), None).await.unwrap();
    let mut rx = store.watch_prefix("watch/", 0).await.unwrap();

    let a = store.put("watch/a", b("1"), None).await.unwrap();
    store.put("elsewhere/x", b("ignored"), None).await.unwrap();
    let a2 = store.put("watch/a", b("2"), None).await.unwrap();
    assert!(store.delete("watch/old").await.unwrap());
    let deleted_at = store.current_revision().await.unwrap();
    let txn = store
        .txn(
            vec![],
            vec![
                TxnOp::Put {
                    key: "watch/b".into(),
                    value: b("b"),
                    lease: None,
                },
                TxnOp::Put {
                    key: "watch/c".into(),
                    value: b("c"),
                    lease: None,
                },
            ],
            vec![],
        )
        .await
        .unwrap();

    assert_eq!(next_event(&mut rx).await, WatchEvent::Put(a.clone()));
    assert_eq!(next_event(&mut rx).await, WatchEvent::Put(a2.clone()));
    assert_eq!(
        next_event(&mut rx).await,
        WatchEvent::Delete {
            key: "watch/old".into(),
            revision: deleted_at
        }
    );
    let b_event = next_event(&mut rx).await;
    let c_event = next_event(&mut rx).await;
    assert_eq!(put_event(&b_event).key, "watch/b");
    assert_eq!(put_event(&c_event).key, "watch/c");
    assert_eq!(b_event.revision(), txn.revision);
    assert_eq!(c_event.revision(), txn.revision);
    no_event(&mut rx, Duration::from_millis(100)).await;

    // A watcher that saw up to a2 resumes from there and misses nothing.
    let mut resumed = store.watch_prefix("watch/", a2.mod_revision).await.unwrap();
    assert_eq!(
        next_event(&mut resumed).await,
        WatchEvent::Delete {
            key: "watch/old".into(),
            revision: deleted_at
        }
    );
    assert_eq!(next_event(&mut resumed).await, b_event);
    assert_eq!(next_event(&mut resumed).await, c_event);
    // ... and then follows live writes.
    let d = store.put("watch/d", b("d"), None).await.unwrap();
    assert_eq!(next_event(&mut resumed).await, WatchEvent::Put(d.clone()));
    assert_eq!(next_event(&mut rx).await, WatchEvent::Put(d));

    // Resuming from the very first revision replays everything under the prefix.
    let mut all = store
        .watch_prefix("watch/a", a.mod_revision - 1)
        .await
        .unwrap();
    assert_eq!(next_event(&mut all).await, WatchEvent::Put(a));
    assert_eq!(next_event(&mut all).await, WatchEvent::Put(a2));
}

/// Waits until `key` is gone, for at most `limit`.
pub async fn wait_gone(store: &dyn MetaStore, key: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    while store.get(key).await.unwrap().is_some() {
        assert!(
            start.elapsed() < limit,
            "{key} still present after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

pub async fn lease_expiry_deletes_keys(store: &dyn MetaStore) {
    let mut rx = store.watch_prefix("lease/expiry/", 0).await.unwrap();
    let lease = store.grant_lease(Duration::from_millis(300)).await.unwrap();
    let kv = store
        .put("lease/expiry/node", b("alive"), Some(lease))
        .await
        .unwrap();
    assert_eq!(kv.lease, Some(lease));
    // Re-put without the lease: this key no longer belongs to it.
    store
        .put("lease/expiry/kept", b("x"), Some(lease))
        .await
        .unwrap();
    let kept = store.put("lease/expiry/kept", b("y"), None).await.unwrap();
    assert_eq!(kept.lease, None);
    for _ in 0..3 {
        next_event(&mut rx).await;
    }

    wait_gone(store, "lease/expiry/node", Duration::from_secs(10)).await;
    match next_event(&mut rx).await {
        WatchEvent::Delete { key, revision } => {
            assert_eq!(key, "lease/expiry/node");
            assert!(revision > kept.mod_revision);
        }
        other => panic!("expected the lease's delete, got {other:?}"),
    }
    assert!(store.get("lease/expiry/kept").await.unwrap().is_some());
    assert_eq!(
        store.keep_alive(lease).await,
        Err(MetaError::LeaseNotFound(lease))
    );
    assert_eq!(
        store.put("lease/expiry/late", b("x"), Some(lease)).await,
        Err(MetaError::LeaseNotFound(lease))
    );
}

pub async fn keep_alive_extends_a_lease(store: &dyn MetaStore) {
    let lease = store.grant_lease(Duration::from_millis(800)).await.unwrap();
    store
        .put("lease/kept/node", b("alive"), Some(lease))
        .await
        .unwrap();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(2000) {
        store.keep_alive(lease).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        store.get("lease/kept/node").await.unwrap().is_some(),
        "a lease kept alive for more than two TTLs is still there"
    );
    // Once the owner stops renewing, the lease ends about one TTL later.
    let took = wait_gone(store, "lease/kept/node", Duration::from_secs(10)).await;
    assert!(took >= Duration::from_millis(500), "ended after {took:?}");
}

pub async fn revoke_deletes_keys(store: &dyn MetaStore) {
    let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    let other = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    assert_ne!(lease, other);
    store
        .put("lease/revoke/a", b("a"), Some(lease))
        .await
        .unwrap();
    store
        .put("lease/revoke/b", b("b"), Some(lease))
        .await
        .unwrap();
    store
        .put("lease/revoke/c", b("c"), Some(other))
        .await
        .unwrap();
    let before = store.current_revision().await.unwrap();
    let mut rx = store.watch_prefix("lease/revoke/", 0).await.unwrap();

    store.revoke_lease(lease).await.unwrap();
    // Both keys go in one revision.
    assert_eq!(store.current_revision().await.unwrap(), before + 1);
    let mut deleted = vec![next_event(&mut rx).await, next_event(&mut rx).await];
    deleted.sort_by(|x, y| x.key().cmp(y.key()));
    assert_eq!(
        deleted,
        [
            WatchEvent::Delete {
                key: "lease/revoke/a".into(),
                revision: before + 1
            },
            WatchEvent::Delete {
                key: "lease/revoke/b".into(),
                revision: before + 1
            },
        ]
    );
    let left: Vec<String> = store
        .range("lease/revoke/")
        .await
        .unwrap()
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(left, ["lease/revoke/c"]);
    assert_eq!(
        store.revoke_lease(lease).await,
        Err(MetaError::LeaseNotFound(lease))
    );
    assert_eq!(
        store.keep_alive(lease).await,
        Err(MetaError::LeaseNotFound(lease))
    );
    store.keep_alive(other).await.unwrap();
    assert!(matches!(
        store.grant_lease(Duration::ZERO).await,
        Err(MetaError::InvalidArgument(_))
    ));
}

/// Install one token for every server and client of this test process.
pub fn install_test_token() {
    static TOKEN: std::sync::OnceLock<yr_common::auth::ClusterToken> = std::sync::OnceLock::new();
    let token = TOKEN
        .get_or_init(|| yr_common::auth::ClusterToken::generate().expect("a token"))
        .clone();
    yr_transport::install(yr_transport::Credentials::with_token(token));
}
