//! A small in-memory `MetaStore` for this crate's unit tests only. Integration tests use the real
//! `yr_meta::EmbeddedStore`.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use yr_meta::{Compare, KeyValue, LeaseId, MetaError, MetaStore, TxnOp, TxnResponse, WatchEvent};

#[derive(Default)]
struct Inner {
    revision: u64,
    data: BTreeMap<String, KeyValue>,
    history: Vec<WatchEvent>,
    watchers: Vec<(String, mpsc::Sender<WatchEvent>)>,
}

impl Inner {
    fn put(&mut self, key: &str, value: Bytes, lease: Option<LeaseId>) -> KeyValue {
        self.revision += 1;
        let version = self.data.get(key).map_or(0, |kv| kv.version) + 1;
        let kv = KeyValue {
            key: key.to_string(),
            value,
            version,
            mod_revision: self.revision,
            lease,
        };
        self.data.insert(key.to_string(), kv.clone());
        self.emit(key, WatchEvent::Put(kv.clone()));
        kv
    }

    fn delete(&mut self, key: &str) -> bool {
        if self.data.remove(key).is_none() {
            return false;
        }
        self.revision += 1;
        let revision = self.revision;
        self.emit(
            key,
            WatchEvent::Delete {
                key: key.to_string(),
                revision,
            },
        );
        true
    }

    fn emit(&mut self, key: &str, event: WatchEvent) {
        self.history.push(event.clone());
        self.watchers.retain(|(prefix, tx)| {
            !key.starts_with(prefix.as_str()) || tx.try_send(event.clone()).is_ok()
        });
    }
}

/// An in-memory store with versions, revisions, transactions and prefix watches.
#[derive(Default)]
pub struct FakeStore {
    inner: Mutex<Inner>,
}

#[async_trait]
impl MetaStore for FakeStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, MetaError> {
        Ok(self.inner.lock().data.get(key).cloned())
    }

    async fn range(&self, prefix: &str) -> Result<Vec<KeyValue>, MetaError> {
        Ok(self
            .inner
            .lock()
            .data
            .values()
            .filter(|kv| kv.key.starts_with(prefix))
            .cloned()
            .collect())
    }

    async fn put(
        &self,
        key: &str,
        value: Bytes,
        lease: Option<LeaseId>,
    ) -> Result<KeyValue, MetaError> {
        Ok(self.inner.lock().put(key, value, lease))
    }

    async fn delete(&self, key: &str) -> Result<bool, MetaError> {
        Ok(self.inner.lock().delete(key))
    }

    async fn txn(
        &self,
        compares: Vec<Compare>,
        success: Vec<TxnOp>,
        failure: Vec<TxnOp>,
    ) -> Result<TxnResponse, MetaError> {
        let mut inner = self.inner.lock();
        let succeeded = compares.iter().all(|compare| match compare {
            Compare::Version { key, version } => {
                inner.data.get(key).map_or(0, |kv| kv.version) == *version
            }
            Compare::ModRevision { key, mod_revision } => {
                inner.data.get(key).map_or(0, |kv| kv.mod_revision) == *mod_revision
            }
            Compare::ValueEquals { key, value } => {
                inner.data.get(key).is_some_and(|kv| kv.value == *value)
            }
        });
        let mut results = Vec::new();
        for op in if succeeded { success } else { failure } {
            results.push(match op {
                TxnOp::Put { key, value, lease } => Some(inner.put(&key, value, lease)),
                TxnOp::Delete { key } => {
                    inner.delete(&key);
                    None
                }
                TxnOp::Get { key } => inner.data.get(&key).cloned(),
            });
        }
        Ok(TxnResponse {
            succeeded,
            revision: inner.revision,
            results,
        })
    }

    async fn watch_prefix(
        &self,
        prefix: &str,
        after_revision: u64,
    ) -> Result<mpsc::Receiver<WatchEvent>, MetaError> {
        let (tx, rx) = mpsc::channel(1024);
        let mut inner = self.inner.lock();
        for event in &inner.history {
            let (key, revision) = match event {
                WatchEvent::Put(kv) => (&kv.key, kv.mod_revision),
                WatchEvent::Delete { key, revision } => (key, *revision),
            };
            if revision > after_revision && key.starts_with(prefix) {
                let _ = tx.try_send(event.clone());
            }
        }
        inner.watchers.push((prefix.to_string(), tx));
        Ok(rx)
    }

    async fn grant_lease(&self, _ttl: Duration) -> Result<LeaseId, MetaError> {
        Ok(1)
    }

    async fn keep_alive(&self, _lease: LeaseId) -> Result<(), MetaError> {
        Ok(())
    }

    async fn revoke_lease(&self, _lease: LeaseId) -> Result<(), MetaError> {
        Ok(())
    }

    async fn current_revision(&self) -> Result<u64, MetaError> {
        Ok(self.inner.lock().revision)
    }
}
