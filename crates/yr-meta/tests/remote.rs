//! The `MetaStore` behaviours through `RemoteStore` against a real `MetaService` on 127.0.0.1,
//! errors across the wire, timeouts, and watches that survive a server restart.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use yr_meta::{EmbeddedOptions, EmbeddedStore, MetaError, MetaStore, RemoteStore, WatchEvent};

async fn remote_over(store: Arc<dyn MetaStore>) -> (Server, RemoteStore) {
    let server = Server::start(store).await;
    let remote = RemoteStore::connect(&server.url()).await.unwrap();
    (server, remote)
}

async fn remote_in_memory() -> (Server, RemoteStore) {
    remote_over(Arc::new(EmbeddedStore::in_memory())).await
}

#[tokio::test]
async fn versions_and_revisions_through_the_service() {
    let (_server, remote) = remote_in_memory().await;
    versions_and_revisions(&remote).await;
}

#[tokio::test]
async fn compare_and_swap_through_the_service() {
    let (_server, remote) = remote_in_memory().await;
    compare_and_swap(&remote).await;
    compare_and_swap_on_mod_revision(&remote).await;
}

#[tokio::test]
async fn transactions_through_the_service_are_atomic() {
    let (_server, remote) = remote_in_memory().await;
    transactions_are_atomic(&remote).await;
}

#[tokio::test]
async fn watches_through_the_service_are_ordered_and_resume() {
    let (_server, remote) = remote_in_memory().await;
    watch_in_order_and_resume(&remote).await;
}

#[tokio::test]
async fn leases_through_the_service_expire_renew_and_revoke() {
    let (_server, remote) = remote_in_memory().await;
    lease_expiry_deletes_keys(&remote).await;
    keep_alive_extends_a_lease(&remote).await;
    revoke_deletes_keys(&remote).await;
}

#[tokio::test]
async fn a_durable_store_behind_the_service_behaves_the_same() {
    let dir = TempDir::new("remote-durable");
    let store = Arc::new(EmbeddedStore::open(dir.path()).await.unwrap());
    let (_server, remote) = remote_over(store).await;
    versions_and_revisions(&remote).await;
    compare_and_swap(&remote).await;
    transactions_are_atomic(&remote).await;
    watch_in_order_and_resume(&remote).await;
}

#[tokio::test]
async fn store_errors_cross_the_wire_unchanged() {
    let store = Arc::new(EmbeddedStore::in_memory_with(EmbeddedOptions {
        history_limit: 3,
        ..EmbeddedOptions::default()
    }));
    let (_server, remote) = remote_over(store).await;
    assert_eq!(
        remote.keep_alive(42).await,
        Err(MetaError::LeaseNotFound(42))
    );
    assert_eq!(
        remote.put("k", b("v"), Some(42)).await,
        Err(MetaError::LeaseNotFound(42))
    );
    match remote.get("").await {
        Err(MetaError::InvalidArgument(message)) => {
            assert_eq!(message, "the key is empty")
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    for i in 0..10 {
        remote.put(&format!("k/{i}"), b("v"), None).await.unwrap();
    }
    assert_eq!(
        remote.watch_prefix("k/", 2).await.err(),
        Some(MetaError::Compacted {
            revision: 2,
            compacted_revision: 8
        })
    );
    let err: yr_common::Error = MetaError::LeaseNotFound(42).into();
    assert_eq!(err.code(), yr_common::ErrorCode::EtcdOperationError);
}

#[tokio::test]
async fn an_unreachable_store_is_unavailable_within_the_timeout() {
    // Nothing listens on this port once the listener is dropped.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let err = RemoteStore::connect(&format!("http://127.0.0.1:{port}"))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, MetaError::Unavailable(_)), "{err:?}");
    assert!(matches!(
        RemoteStore::connect("not a uri").await.err(),
        Some(MetaError::InvalidArgument(_))
    ));

    // A peer that accepts connections but never answers: calls time out.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = silent.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let remote = RemoteStore::connect_lazy(&format!("http://{address}"))
        .unwrap()
        .with_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let err = remote.put("k", b("v"), None).await.unwrap_err();
    assert!(
        matches!(err, MetaError::Unavailable(ref m) if m.contains("no answer")),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    let err: yr_common::Error = err.into();
    assert_eq!(err.code(), yr_common::ErrorCode::EtcdOperationError);
    holder.abort();
}

#[tokio::test]
async fn a_watch_resumes_across_a_server_restart_without_losing_events() {
    init_logs();
    let dir = TempDir::new("remote-restart");
    let store = Arc::new(EmbeddedStore::open(dir.path()).await.unwrap());
    let server = Server::start(store.clone()).await;
    let address = server.address;
    let remote = RemoteStore::connect(&server.url()).await.unwrap();
    let mut rx = remote.watch_prefix("routes/", 0).await.unwrap();
    let first = remote.put("routes/a", b("node-1"), None).await.unwrap();
    assert_eq!(next_event(&mut rx).await, WatchEvent::Put(first));

    // The master goes down...
    server.stop().await;
    assert_eq!(
        Arc::strong_count(&store),
        1,
        "the server let go of the store"
    );
    drop(store);
    // ... comes back from its directory, and writes happen before it serves again.
    let store = Arc::new(EmbeddedStore::open(dir.path()).await.unwrap());
    let during = store.put("routes/b", b("node-2"), None).await.unwrap();
    assert!(store.delete("routes/a").await.unwrap());
    store.put("other/x", b("x"), None).await.unwrap();
    let server = Server::start_on(store.clone(), address).await;

    // The watch resumes after the last revision it saw and misses nothing.
    assert_eq!(next_event(&mut rx).await, WatchEvent::Put(during.clone()));
    assert_eq!(
        next_event(&mut rx).await,
        WatchEvent::Delete {
            key: "routes/a".into(),
            revision: during.mod_revision + 1
        }
    );
    // The same client's calls work again, and live events keep flowing.
    let after = remote.put("routes/c", b("node-3"), None).await.unwrap();
    assert_eq!(next_event(&mut rx).await, WatchEvent::Put(after));
    no_event(&mut rx, Duration::from_millis(200)).await;
    server.stop().await;
}

#[tokio::test]
async fn a_slow_remote_watcher_is_dropped_by_the_server_and_resumes_without_gaps() {
    init_logs();
    let store = Arc::new(EmbeddedStore::in_memory_with(EmbeddedOptions {
        watch_buffer: 4,
        ..EmbeddedOptions::default()
    }));
    let (_server, remote) = remote_over(store).await;
    let mut rx = remote.watch_prefix("slow/", 0).await.unwrap();
    // Nobody reads while the writes happen: the client's buffer (1024 events), the stream's
    // flow-control window (2 MiB) and the server's buffer fill, and the server drops the
    // watcher (a warning in the log); the client resumes once its receiver drains.
    let value = b(&"x".repeat(1000));
    let writes = 4000;
    for i in 0..writes {
        remote
            .put(&format!("slow/{i:05}"), value.clone(), None)
            .await
            .unwrap();
    }
    let mut revision = 0;
    for i in 0..writes {
        let event = next_event(&mut rx).await;
        assert_eq!(event.key(), format!("slow/{i:05}"));
        assert!(event.revision() > revision);
        revision = event.revision();
    }
    no_event(&mut rx, Duration::from_millis(200)).await;
}
