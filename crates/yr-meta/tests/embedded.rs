//! The `MetaStore` behaviours on the embedded store, in memory and durable in a directory.

mod common;

use common::*;
use yr_meta::{EmbeddedStore, MetaStore};

async fn durable(name: &str) -> (TempDir, EmbeddedStore) {
    let dir = TempDir::new(name);
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    (dir, store)
}

#[tokio::test]
async fn versions_and_revisions_follow_etcd() {
    versions_and_revisions(&EmbeddedStore::in_memory()).await;
    let (_dir, store) = durable("versions").await;
    versions_and_revisions(&store).await;
}

#[tokio::test]
async fn put_if_version_wins_once_and_losers_see_the_current_record() {
    compare_and_swap(&EmbeddedStore::in_memory()).await;
    let (_dir, store) = durable("cas").await;
    compare_and_swap(&store).await;
}

#[tokio::test]
async fn a_stale_mod_revision_loses_the_compare_and_swap() {
    compare_and_swap_on_mod_revision(&EmbeddedStore::in_memory()).await;
    let (_dir, store) = durable("modrev").await;
    compare_and_swap_on_mod_revision(&store).await;
}

#[tokio::test]
async fn a_failed_compare_applies_only_the_failure_branch() {
    transactions_are_atomic(&EmbeddedStore::in_memory()).await;
    let (_dir, store) = durable("txn").await;
    transactions_are_atomic(&store).await;
}

#[tokio::test]
async fn watch_delivers_puts_and_deletes_in_order_and_resumes_from_a_revision() {
    watch_in_order_and_resume(&EmbeddedStore::in_memory()).await;
    let (_dir, store) = durable("watch").await;
    watch_in_order_and_resume(&store).await;
}

#[tokio::test]
async fn an_expired_lease_deletes_its_keys_and_watchers_see_it() {
    lease_expiry_deletes_keys(&EmbeddedStore::in_memory()).await;
    let (_dir, store) = durable("lease-expiry").await;
    lease_expiry_deletes_keys(&store).await;
}

#[tokio::test]
async fn keep_alive_extends_a_lease_until_the_owner_stops() {
    keep_alive_extends_a_lease(&EmbeddedStore::in_memory()).await;
}

#[tokio::test]
async fn revoking_a_lease_deletes_its_keys_in_one_revision() {
    revoke_deletes_keys(&EmbeddedStore::in_memory()).await;
    let (_dir, store) = durable("revoke").await;
    revoke_deletes_keys(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cas_writers_never_both_win() {
    let (_dir, store) = durable("cas-race").await;
    let store = std::sync::Arc::new(store);
    store.put("race/counter", b("0"), None).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut wins = 0u64;
            for _ in 0..50 {
                loop {
                    let current = store.get("race/counter").await.unwrap().unwrap();
                    let n: u64 = std::str::from_utf8(&current.value)
                        .unwrap()
                        .parse()
                        .unwrap();
                    let next = b(&(n + 1).to_string());
                    if yr_meta::put_if_version(&*store, "race/counter", next, current.version)
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
    assert_eq!(total, 200);
    assert_eq!(counter.value, "200");
    assert_eq!(counter.version, 201);
}
