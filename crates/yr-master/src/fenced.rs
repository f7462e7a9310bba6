//! [`FencedStore`]: the leader's view of the meta store, whose every write holds only while the
//! leader's term does.
//!
//! Each write (put, delete, transaction) becomes one transaction whose compares include "the
//! leader key's mod revision is still the term's" ([`Term::mod_revision`]). A new leader's win
//! rewrites the key, so a deposed leader's writes fail in etcd itself, atomically, whatever the
//! deposed leader still believes (for example after it was paused past its lease). A fenced
//! write fails with [`MetaError::Unavailable`] naming the fencing, is counted, and wakes the
//! term's holder ([`Election::hold`](crate::election::Election::hold)), which steps down.
//! Reads, leases and watches pass through.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use yr_master::election::Election;
//! use yr_master::fenced::FencedStore;
//! use yr_meta::MetaStore;
//! let store: Arc<dyn MetaStore> = Arc::new(yr_meta::EmbeddedStore::in_memory());
//! let election = Election::new(store.clone(), "127.0.0.1:1".into(), Duration::from_secs(2));
//! let term = election.try_acquire().await?.unwrap();
//! let fenced = FencedStore::new(store.clone(), term);
//! fenced.put("/yr/x", "1".into(), None).await?;
//! // Another master takes the key: this term's writes are refused.
//! election.resign(term).await;
//! let other = Election::new(store, "127.0.0.1:2".into(), Duration::from_secs(2));
//! other.try_acquire().await?.unwrap();
//! assert!(fenced.put("/yr/x", "2".into(), None).await.is_err());
//! assert_eq!(fenced.get("/yr/x").await?.unwrap().value, "1");
//! # Ok::<(), yr_meta::MetaError>(())
//! # }).unwrap();
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{mpsc, Notify};
use yr_meta::{Compare, KeyValue, LeaseId, MetaError, MetaStore, TxnOp, TxnResponse, WatchEvent};

use crate::election::{Term, LEADER_KEY};

/// A meta store whose writes are fenced by a leader's term.
pub struct FencedStore {
    inner: Arc<dyn MetaStore>,
    term: Term,
    fenced: Arc<Notify>,
    refused: AtomicU64,
}

impl FencedStore {
    /// `inner`, with every write conditional on `term`.
    pub fn new(inner: Arc<dyn MetaStore>, term: Term) -> FencedStore {
        FencedStore {
            inner,
            term,
            fenced: Arc::new(Notify::new()),
            refused: AtomicU64::new(0),
        }
    }

    /// Notified when a write was refused because the term is over.
    pub fn fenced(&self) -> Arc<Notify> {
        self.fenced.clone()
    }

    /// How many writes were refused because the term is over.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    fn leader_compare(&self) -> Compare {
        Compare::ModRevision {
            key: LEADER_KEY.to_string(),
            mod_revision: self.term.mod_revision,
        }
    }

    fn refuse(&self, what: &str, current: Option<&KeyValue>) -> MetaError {
        self.refused.fetch_add(1, Ordering::Relaxed);
        self.fenced.notify_one();
        let holder = current
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
            .unwrap_or_else(|| "nobody".into());
        tracing::warn!(
            what,
            term = self.term.mod_revision,
            leader = holder,
            "write fenced: this master's term is over"
        );
        MetaError::Unavailable(format!(
            "{what} fenced: this master no longer leads (its term began at revision {}; the \
             leader key now names {holder}); the write was not applied",
            self.term.mod_revision
        ))
    }

    /// Runs `compares`/`success`/`failure` with the term's compare added; a failure caused by
    /// the term (not by the caller's own compares) is an error.
    async fn fenced_txn(
        &self,
        what: &str,
        mut compares: Vec<Compare>,
        success: Vec<TxnOp>,
        mut failure: Vec<TxnOp>,
    ) -> Result<TxnResponse, MetaError> {
        compares.push(self.leader_compare());
        failure.push(TxnOp::Get {
            key: LEADER_KEY.to_string(),
        });
        let mut response = self.inner.txn(compares, success, failure).await?;
        if !response.succeeded {
            let leader = response.results.pop().flatten();
            if leader.as_ref().map(|kv| kv.mod_revision) != Some(self.term.mod_revision) {
                return Err(self.refuse(what, leader.as_ref()));
            }
        }
        Ok(response)
    }
}

#[async_trait]
impl MetaStore for FencedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, MetaError> {
        self.inner.get(key).await
    }

    async fn range(&self, prefix: &str) -> Result<Vec<KeyValue>, MetaError> {
        self.inner.range(prefix).await
    }

    async fn put(
        &self,
        key: &str,
        value: Bytes,
        lease: Option<LeaseId>,
    ) -> Result<KeyValue, MetaError> {
        let op = TxnOp::Put {
            key: key.to_string(),
            value,
            lease,
        };
        let response = self
            .fenced_txn("put", Vec::new(), vec![op], Vec::new())
            .await?;
        response
            .results
            .into_iter()
            .next()
            .flatten()
            .ok_or_else(|| {
                MetaError::Unavailable(format!(
                    "the store answered a put of {key:?} without the written record"
                ))
            })
    }

    async fn delete(&self, key: &str) -> Result<bool, MetaError> {
        let op = TxnOp::Delete {
            key: key.to_string(),
        };
        let response = self
            .fenced_txn("delete", Vec::new(), vec![op], Vec::new())
            .await?;
        Ok(matches!(response.results.first(), Some(Some(_))))
    }

    async fn txn(
        &self,
        compares: Vec<Compare>,
        success: Vec<TxnOp>,
        failure: Vec<TxnOp>,
    ) -> Result<TxnResponse, MetaError> {
        self.fenced_txn("transaction", compares, success, failure)
            .await
    }

    async fn watch_prefix(
        &self,
        prefix: &str,
        after_revision: u64,
    ) -> Result<mpsc::Receiver<WatchEvent>, MetaError> {
        self.inner.watch_prefix(prefix, after_revision).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, MetaError> {
        self.inner.grant_lease(ttl).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), MetaError> {
        self.inner.keep_alive(lease).await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), MetaError> {
        self.inner.revoke_lease(lease).await
    }

    async fn current_revision(&self) -> Result<u64, MetaError> {
        self.inner.current_revision().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::election::Election;

    #[tokio::test]
    async fn a_deposed_terms_writes_are_refused_and_its_callers_compares_still_answer() {
        let store: Arc<dyn MetaStore> = Arc::new(yr_meta::EmbeddedStore::in_memory());
        let a = Election::new(store.clone(), "a:1".into(), Duration::from_secs(2));
        let term = a.try_acquire().await.unwrap().unwrap();
        let fenced = FencedStore::new(store.clone(), term);
        let written = fenced.put("/k", "1".into(), None).await.unwrap();
        // The caller's own compare failing is an answer, not fencing.
        let lost = yr_meta::put_if_version(&fenced, "/k", "2".into(), written.version + 7)
            .await
            .unwrap();
        assert_eq!(lost.unwrap_err().unwrap().value, "1");
        assert_eq!(fenced.refused(), 0);
        assert!(fenced.delete("/k").await.unwrap());

        a.resign(term).await;
        let b = Election::new(store.clone(), "b:1".into(), Duration::from_secs(2));
        b.try_acquire().await.unwrap().unwrap();
        let notified = fenced.fenced();
        let err = fenced.put("/k", "3".into(), None).await.unwrap_err();
        assert!(err.to_string().contains("b:1"), "{err}");
        assert!(err.to_string().contains("fenced"), "{err}");
        tokio::time::timeout(Duration::from_secs(1), notified.notified())
            .await
            .expect("the holder is told");
        assert!(fenced.delete("/k").await.is_err());
        assert!(yr_meta::put_if_version(&fenced, "/k", "4".into(), 0)
            .await
            .is_err());
        assert_eq!(fenced.refused(), 3);
        assert_eq!(store.get("/k").await.unwrap(), None);
    }
}
