//! The `MetaStore` behaviours on `EtcdStore` against real etcd processes (Debian's
//! `etcd-server`, started by each test on free loopback ports): the same shared behaviours as the
//! embedded store, directly and through the meta service, plus what is etcd's own: keys under a
//! prefix, compaction, an unreachable etcd, losing a member of a 3-member cluster, and an etcd
//! that speaks TLS and authenticates its clients by certificate.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::etcd::{Etcd, ServerTls};
use common::*;
use yr_meta::{EtcdOptions, EtcdStore, EtcdTls, MetaError, MetaStore, RemoteStore, WatchEvent};

/// A single-member etcd and a store on it, under `prefix`.
async fn etcd_store(name: &str, prefix: &str) -> (Etcd, EtcdStore) {
    init_logs();
    let etcd = Etcd::single(name);
    let store = EtcdStore::connect(EtcdOptions::new(etcd.endpoints()).with_prefix(prefix))
        .await
        .expect("a store on the test's etcd");
    (etcd, store)
}

#[tokio::test]
async fn versions_and_revisions_are_etcds() {
    let (_etcd, store) = etcd_store("versions", "/yr/test").await;
    versions_and_revisions(&store).await;
}

#[tokio::test]
async fn put_if_version_wins_once_and_losers_see_the_current_record() {
    let (_etcd, store) = etcd_store("cas", "/yr/test").await;
    compare_and_swap(&store).await;
}

#[tokio::test]
async fn a_stale_mod_revision_loses_the_compare_and_swap() {
    let (_etcd, store) = etcd_store("modrev", "/yr/test").await;
    compare_and_swap_on_mod_revision(&store).await;
}

#[tokio::test]
async fn a_failed_compare_applies_only_the_failure_branch() {
    let (_etcd, store) = etcd_store("txn", "/yr/test").await;
    transactions_are_atomic(&store).await;
}

#[tokio::test]
async fn watch_delivers_puts_and_deletes_in_order_and_resumes_from_a_revision() {
    let (_etcd, store) = etcd_store("watch", "/yr/test").await;
    watch_in_order_and_resume(&store).await;
}

#[tokio::test]
async fn an_expired_lease_deletes_its_keys_and_watchers_see_it() {
    let (_etcd, store) = etcd_store("lease-expiry", "/yr/test").await;
    lease_expiry_deletes_keys(&store).await;
}

#[tokio::test]
async fn keep_alive_extends_a_lease_until_the_owner_stops() {
    let (_etcd, store) = etcd_store("keep-alive", "/yr/test").await;
    keep_alive_extends_a_lease(&store).await;
}

#[tokio::test]
async fn revoking_a_lease_deletes_its_keys_in_one_revision() {
    let (_etcd, store) = etcd_store("revoke", "/yr/test").await;
    revoke_deletes_keys(&store).await;
}

#[tokio::test]
async fn the_meta_service_over_etcd_behaves_the_same() {
    let (_etcd, store) = etcd_store("service", "/yr/test").await;
    let server = Server::start(Arc::new(store)).await;
    let remote = RemoteStore::connect(&server.url()).await.unwrap();
    versions_and_revisions(&remote).await;
    compare_and_swap(&remote).await;
    compare_and_swap_on_mod_revision(&remote).await;
    transactions_are_atomic(&remote).await;
    watch_in_order_and_resume(&remote).await;
    revoke_deletes_keys(&remote).await;
    // etcd's own errors cross the wire as themselves.
    assert_eq!(
        remote.keep_alive(4242).await,
        Err(MetaError::LeaseNotFound(4242))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cas_writers_never_both_win() {
    let (_etcd, store) = etcd_store("cas-race", "/yr/test").await;
    let store = Arc::new(store);
    store.put("race/counter", b("0"), None).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut wins = 0u64;
            for _ in 0..25 {
                loop {
                    let current = store.get("race/counter").await.unwrap().unwrap();
                    let n: u64 = std::str::from_utf8(&current.value)
                        .unwrap()
                        .parse()
                        .unwrap();
                    let next = b(&(n + 1).to_string());
                    if yr_meta::put_if_mod_revision(
                        &*store,
                        "race/counter",
                        next,
                        current.mod_revision,
                    )
                    .await
                    .unwrap()
                    .is_ok()
                    {
                        wins += 1;
                        break;
                    }
                }
            }
            wins
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    let counter = store.get("race/counter").await.unwrap().unwrap();
    assert_eq!(total, 100);
    assert_eq!(counter.value, "100");
    assert_eq!(counter.version, 101);
}

#[tokio::test]
async fn keys_live_under_the_prefix_and_clusters_do_not_see_each_other() {
    let (etcd, store) = etcd_store("prefix", "/yr/c1/").await;
    assert_eq!(store.prefix(), "/yr/c1");
    let other = EtcdStore::connect(EtcdOptions::new(etcd.endpoints()).with_prefix("/yr/c10"))
        .await
        .unwrap();
    let written = store
        .put("/yr/instance/a", b("RUNNING"), None)
        .await
        .unwrap();
    other
        .put("/yr/instance/b", b("other cluster"), None)
        .await
        .unwrap();

    // In etcd the key is under the prefix...
    let mut raw = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .unwrap();
    let response = raw.get("/yr/c1//yr/instance/a", None).await.unwrap();
    let kv = &response.kvs()[0];
    assert_eq!(kv.value(), b"RUNNING");
    assert_eq!(kv.mod_revision() as u64, written.mod_revision);
    assert_eq!(kv.version() as u64, written.version);
    // ... and nothing is outside it.
    let all = raw
        .get("", Some(etcd_client::GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    let keys: Vec<&str> = all.kvs().iter().map(|kv| kv.key_str().unwrap()).collect();
    assert_eq!(keys, ["/yr/c1//yr/instance/a", "/yr/c10//yr/instance/b"]);

    // Callers see their own keys only, without the prefix.
    let mine: Vec<String> = store
        .range("")
        .await
        .unwrap()
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(mine, ["/yr/instance/a"]);
    let mut rx = store.watch_prefix("/yr/", 0).await.unwrap();
    other.put("/yr/instance/c", b("x"), None).await.unwrap();
    let mine = store.put("/yr/instance/d", b("y"), None).await.unwrap();
    assert_eq!(next_event(&mut rx).await, WatchEvent::Put(mine));
    no_event(&mut rx, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn a_watch_from_a_compacted_revision_fails_with_compacted() {
    let (etcd, store) = etcd_store("compact", "/yr/test").await;
    let first = store.put("c/a", b("1"), None).await.unwrap();
    for i in 0..5 {
        store.put("c/a", b(&i.to_string()), None).await.unwrap();
    }
    let at = store.current_revision().await.unwrap();
    let mut raw = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .unwrap();
    raw.compact(at as i64, None).await.unwrap();
    match store.watch_prefix("c/", first.mod_revision).await {
        Err(MetaError::Compacted {
            revision,
            compacted_revision,
        }) => {
            assert_eq!(revision, first.mod_revision);
            assert_eq!(compacted_revision, at);
        }
        other => panic!("expected Compacted, got {:?}", other.map(|_| ())),
    }
    // From the compacted revision on, the watch works.
    let mut rx = store.watch_prefix("c/", at).await.unwrap();
    let next = store.put("c/a", b("after"), None).await.unwrap();
    assert_eq!(next_event(&mut rx).await, WatchEvent::Put(next));
    let err: yr_common::Error = MetaError::Compacted {
        revision: 1,
        compacted_revision: at,
    }
    .into();
    assert_eq!(err.code(), yr_common::ErrorCode::EtcdOperationError);
}

#[tokio::test]
async fn an_unreachable_etcd_fails_with_3005_after_a_bounded_retry() {
    init_logs();
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let started = Instant::now();
    let mut options = EtcdOptions::new([format!("127.0.0.1:{port}")]);
    options.attempt_timeout = Duration::from_millis(500);
    options.retry_budget = Duration::from_secs(1);
    let err = EtcdStore::connect(options).await.err().unwrap();
    let took = started.elapsed();
    assert!(matches!(err, MetaError::Etcd(_)), "{err:?}");
    assert!(err.to_string().contains("etcd-server"), "{err}");
    assert!(took < Duration::from_secs(5), "gave up after {took:?}");
    let err: yr_common::Error = err.into();
    assert_eq!(err.code(), yr_common::ErrorCode::EtcdOperationError);
    assert!(matches!(
        EtcdStore::connect(EtcdOptions::new(Vec::<String>::new())).await,
        Err(MetaError::InvalidArgument(_))
    ));
}

#[tokio::test]
async fn an_etcd_with_client_certificates_admits_only_a_store_with_its_cas_certificate() {
    init_logs();
    let dir = std::env::temp_dir().join(format!("yr-etcd-tls-{}", std::process::id()));
    let (ca, [(server_cert, server_key), (client_cert, client_key)]) =
        yr_transport::tls::test_certificates::<2>(&dir.join("cluster")).unwrap();
    let (_, [(stranger_cert, stranger_key)]) =
        yr_transport::tls::test_certificates::<1>(&dir.join("stranger")).unwrap();
    let etcd = Etcd::single_tls(
        "tls",
        &ServerTls {
            certificate: server_cert,
            key: server_key,
            ca: ca.clone(),
        },
    );
    let fast = |options: EtcdOptions| EtcdOptions {
        attempt_timeout: Duration::from_millis(500),
        retry_budget: Duration::from_secs(1),
        ..options
    };
    let tls = |client: Option<(std::path::PathBuf, std::path::PathBuf)>| EtcdTls {
        ca: ca.clone(),
        client,
        server_name: None,
    };

    // The CA's client certificate: the store works over TLS.
    let store = EtcdStore::connect(
        EtcdOptions::new(etcd.endpoints()).with_tls(tls(Some((client_cert, client_key)))),
    )
    .await
    .expect("a store with the CA's client certificate");
    store.put("/tls/key", "value".into(), None).await.unwrap();
    let read = store.get("/tls/key").await.unwrap().expect("the key");
    assert_eq!(&read.value[..], b"value");

    // No client certificate, one from another CA, or plain HTTP/2: refused with 3005.
    for (what, options) in [
        (
            "no client certificate",
            fast(EtcdOptions::new(etcd.endpoints()).with_tls(tls(None))),
        ),
        (
            "another CA's certificate",
            fast(
                EtcdOptions::new(etcd.endpoints())
                    .with_tls(tls(Some((stranger_cert.clone(), stranger_key.clone())))),
            ),
        ),
        ("plain HTTP/2", fast(EtcdOptions::new(etcd.endpoints()))),
    ] {
        let error = EtcdStore::connect(options)
            .await
            .err()
            .unwrap_or_else(|| panic!("{what}: etcd admitted the store"));
        assert!(matches!(error, MetaError::Etcd(_)), "{what}: {error:?}");
        let error: yr_common::Error = error.into();
        assert_eq!(
            error.code(),
            yr_common::ErrorCode::EtcdOperationError,
            "{what}"
        );
    }

    // A file that cannot be read is named.
    let missing = dir.join("no-such-ca.pem");
    let error = EtcdStore::connect(EtcdOptions::new(etcd.endpoints()).with_tls(EtcdTls {
        ca: missing.clone(),
        client: None,
        server_name: None,
    }))
    .await
    .err()
    .expect("a missing CA file fails");
    assert!(matches!(error, MetaError::InvalidArgument(_)), "{error:?}");
    assert!(
        error.to_string().contains(&missing.display().to_string()),
        "{error}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_one_member_of_three_loses_no_write_and_no_event() {
    init_logs();
    let mut etcd = Etcd::cluster("three", 3);
    let store = EtcdStore::connect(EtcdOptions::new(etcd.endpoints()).with_prefix("/yr/ha"))
        .await
        .unwrap();
    let mut rx = store.watch_prefix("ha/", 0).await.unwrap();
    let mut written = Vec::new();
    for i in 0..5 {
        written.push(
            store
                .put(&format!("ha/{i}"), b("before"), None)
                .await
                .unwrap(),
        );
    }
    let lease = store.grant_lease(Duration::from_secs(30)).await.unwrap();
    store.put("ha/leased", b("l"), Some(lease)).await.unwrap();

    // Kill the leader. A write already on its way may end with 3005 (its outcome unknown:
    // etcd drops a proposal that was sent to a dead leader, and says so only at its own
    // timeout), within the bounded retry; the cluster elects a new leader, and from then on
    // the store's calls and its watch go on through the other members.
    let leader = leader_index(&etcd).await;
    tracing::info!(member = %etcd.members[leader].name, "killing the etcd leader");
    etcd.members[leader].kill();
    let started = Instant::now();
    let during = store.put("ha/during", b("during"), None).await;
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "a write during the election ends within the retry budget"
    );
    match &during {
        Ok(_) => {}
        Err(err) => {
            assert!(matches!(err, MetaError::Etcd(_)), "{err:?}");
            let code = yr_common::Error::from(err.clone()).code();
            assert_eq!(code, yr_common::ErrorCode::EtcdOperationError);
        }
    }
    let elected = wait_for_a_new_leader(&etcd).await;
    tracing::info!(took = ?started.elapsed(), leader = %etcd.members[elected].name, "new etcd leader");
    for i in 5..10 {
        written.push(
            store
                .put(&format!("ha/{i}"), b("after"), None)
                .await
                .unwrap_or_else(|err| panic!("write {i} with one member lost: {err}")),
        );
    }
    store.keep_alive(lease).await.unwrap();
    let cas = yr_meta::put_if_mod_revision(&store, "ha/0", b("cas"), written[0].mod_revision)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cas.version, 2);

    // The watch saw every acknowledged write once and in order (and the write during the
    // election at most once, whatever its outcome).
    let mut seen = Vec::new();
    loop {
        let event = next_event(&mut rx).await;
        let done = event == WatchEvent::Put(cas.clone());
        seen.push(event);
        if done {
            break;
        }
    }
    let during_events = seen.iter().filter(|e| e.key() == "ha/during").count();
    assert!(during_events <= 1, "{seen:?}");
    if during.is_ok() {
        assert_eq!(during_events, 1);
    }
    seen.retain(|e| e.key() != "ha/during");
    let mut expected: Vec<WatchEvent> = written[..5].iter().cloned().map(WatchEvent::Put).collect();
    assert_eq!(&seen[..5], &expected[..]);
    assert_eq!(seen[5].key(), "ha/leased");
    expected = written[5..].iter().cloned().map(WatchEvent::Put).collect();
    assert_eq!(&seen[6..11], &expected[..]);
    assert_eq!(seen[11], WatchEvent::Put(cas));
    assert!(seen.windows(2).all(|w| w[0].revision() < w[1].revision()));
    no_event(&mut rx, Duration::from_millis(200)).await;
    assert!(store.get("ha/leased").await.unwrap().is_some());
}

/// Polls the surviving members until one of them leads (generous deadline; elections on
/// loopback take about a second).
async fn wait_for_a_new_leader(etcd: &Etcd) -> usize {
    let started = Instant::now();
    loop {
        for (index, member) in etcd.members.iter().enumerate() {
            if !member.is_running() {
                continue;
            }
            let Ok(mut client) = etcd_client::Client::connect([member.endpoint()], None).await
            else {
                continue;
            };
            let Ok(Ok(status)) =
                tokio::time::timeout(Duration::from_secs(1), client.status()).await
            else {
                continue;
            };
            let leader = status.leader();
            if leader != 0 && status.header().map(|h| h.member_id()) == Some(leader) {
                return index;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no new etcd leader within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Which member leads, as the members themselves report it.
async fn leader_index(etcd: &Etcd) -> usize {
    let mut ids = Vec::new();
    let mut leader = 0;
    for member in &etcd.members {
        let mut client = etcd_client::Client::connect([member.endpoint()], None)
            .await
            .unwrap();
        let status = client.status().await.unwrap();
        ids.push(status.header().unwrap().member_id());
        leader = status.leader();
    }
    ids.iter()
        .position(|id| *id == leader)
        .expect("one member leads")
}
