//! The [`MetaStore`] trait every backend implements (the embedded store, its remote client, and
//! etcd), its data types, and the compare-and-swap helpers built on [`MetaStore::txn`].
//!
//! The model is etcd's. Each key has a `version`: 1 when created, +1 per write, and 1 again when
//! a deleted key is created anew. Every write moves one store-wide `revision` forward by one and
//! stamps it on the keys it touched (`mod_revision`). A store that has never been written is at
//! revision 1, so the first write is revision 2. Watches deliver events in revision order and
//! can resume after any revision the store still remembers.
//!
//! Proxies persist instance-state transitions with [`put_if_version`]: the write succeeds only
//! if nobody wrote the record since it was read.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use yr_meta::{create_if_absent, put_if_version, EmbeddedStore, MetaStore};
//! let store = EmbeddedStore::in_memory();
//! let created = create_if_absent(&store, "/yr/instance/a", "SCHEDULING".into()).await?.unwrap();
//! assert_eq!(created.version, 1);
//! // A writer that read version 1 moves the instance on.
//! let running = put_if_version(&store, "/yr/instance/a", "RUNNING".into(), 1).await?.unwrap();
//! assert_eq!(running.version, 2);
//! // A writer that still believes version 1 loses, and learns the current record.
//! let lost = put_if_version(&store, "/yr/instance/a", "FAILED".into(), 1).await?;
//! assert_eq!(lost.unwrap_err().unwrap().value, "RUNNING");
//! # Ok::<(), yr_meta::MetaError>(())
//! # }).unwrap();
//! ```

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

pub use crate::error::MetaError;

/// A lease's id. Ids are positive and never reused by a store.
pub type LeaseId = i64;

/// One key and its value as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Bytes,
    /// 1 on create, +1 per write; starts again at 1 when a deleted key is re-created.
    pub version: u64,
    /// The store-wide revision of the key's last write.
    pub mod_revision: u64,
    /// The lease the key is attached to: the key is deleted when the lease ends.
    pub lease: Option<LeaseId>,
}

/// One condition of a transaction.
#[derive(Clone, Debug)]
pub enum Compare {
    /// The key's version equals `version`; 0 means "the key is absent".
    Version {
        /// The key to check.
        key: String,
        /// The expected version.
        version: u64,
    },
    /// The key's `mod_revision` (the store revision of its last write) equals `mod_revision`;
    /// 0 means "the key is absent". This is etcd's compare-and-swap: a writer that read the key
    /// at `mod_revision` wins only if nobody wrote it since.
    ModRevision {
        /// The key to check.
        key: String,
        /// The expected mod revision.
        mod_revision: u64,
    },
    /// The key exists and its value equals `value`.
    ValueEquals {
        /// The key to check.
        key: String,
        /// The expected value.
        value: Bytes,
    },
}

/// One operation of a transaction branch. The write operations of one branch must touch
/// distinct keys.
#[derive(Clone, Debug)]
pub enum TxnOp {
    /// Write `key`, attached to `lease` (or to no lease).
    Put {
        /// The key.
        key: String,
        /// The value.
        value: Bytes,
        /// The lease to attach the key to; `None` detaches it from any lease.
        lease: Option<LeaseId>,
    },
    /// Delete `key` if it exists.
    Delete {
        /// The key.
        key: String,
    },
    /// Read `key`, seeing the branch's earlier writes.
    Get {
        /// The key.
        key: String,
    },
}

/// What a transaction did.
#[derive(Clone, Debug)]
pub struct TxnResponse {
    /// Whether every compare held, so the success branch ran.
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: u64,
    /// One per operation of the branch that ran, in order: `Some(kv)` for a Get of an existing
    /// key, the new kv for a Put, the deleted kv for a Delete of an existing key; `None` for a
    /// missing Get or Delete.
    pub results: Vec<Option<KeyValue>>,
}

/// A change to a watched key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    /// The key was written; the key as written (its `mod_revision` is the event's revision).
    Put(KeyValue),
    /// The key was deleted at `revision` (by a delete, a transaction, or its lease ending).
    Delete {
        /// The key.
        key: String,
        /// The revision of the delete.
        revision: u64,
    },
}

impl WatchEvent {
    /// The key the event is about.
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }

    /// The revision of the write that caused the event.
    pub fn revision(&self) -> u64 {
        match self {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { revision, .. } => *revision,
        }
    }
}

/// yr's durable control state: a key-value store with per-key versions, a store-wide revision,
/// atomic transactions, prefix watches and leases. Implemented by
/// [`EmbeddedStore`](crate::EmbeddedStore) (in the master) and [`RemoteStore`](crate::RemoteStore)
/// (its client) and [`EtcdStore`](crate::EtcdStore) (etcd).
///
/// Every write is durable when its call returns.
#[async_trait]
pub trait MetaStore: Send + Sync {
    /// Reads one key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, MetaError>;
    /// Reads every key under `prefix`, sorted by key.
    async fn range(&self, prefix: &str) -> Result<Vec<KeyValue>, MetaError>;
    /// Writes one key (attached to `lease`, or to none) and returns it as written.
    async fn put(
        &self,
        key: &str,
        value: Bytes,
        lease: Option<LeaseId>,
    ) -> Result<KeyValue, MetaError>;
    /// Deletes one key; returns whether it existed.
    async fn delete(&self, key: &str) -> Result<bool, MetaError>;
    /// If every compare holds, runs `success`, else `failure`, atomically.
    async fn txn(
        &self,
        compares: Vec<Compare>,
        success: Vec<TxnOp>,
        failure: Vec<TxnOp>,
    ) -> Result<TxnResponse, MetaError>;
    /// Events for keys under `prefix` with revision > `after_revision` (0 = only future events;
    /// to resume after a reconnect pass the last revision seen), in revision order.
    ///
    /// The channel closes when the store shuts down or the watcher falls too far behind; watch
    /// again from the last revision seen. All events of one revision are delivered before the
    /// channel closes, so that resume loses nothing. If the store no longer remembers
    /// `after_revision`, this fails with [`MetaError::Compacted`].
    async fn watch_prefix(
        &self,
        prefix: &str,
        after_revision: u64,
    ) -> Result<mpsc::Receiver<WatchEvent>, MetaError>;
    /// Grants a lease that ends `ttl` from now unless kept alive.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, MetaError>;
    /// Renews a lease for another full TTL; [`MetaError::LeaseNotFound`] if it already ended.
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), MetaError>;
    /// Ends a lease now and deletes its keys.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), MetaError>;
    /// The store's current revision.
    async fn current_revision(&self) -> Result<u64, MetaError>;
}

#[async_trait]
impl<T: MetaStore + ?Sized> MetaStore for Arc<T> {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, MetaError> {
        (**self).get(key).await
    }
    async fn range(&self, prefix: &str) -> Result<Vec<KeyValue>, MetaError> {
        (**self).range(prefix).await
    }
    async fn put(
        &self,
        key: &str,
        value: Bytes,
        lease: Option<LeaseId>,
    ) -> Result<KeyValue, MetaError> {
        (**self).put(key, value, lease).await
    }
    async fn delete(&self, key: &str) -> Result<bool, MetaError> {
        (**self).delete(key).await
    }
    async fn txn(
        &self,
        compares: Vec<Compare>,
        success: Vec<TxnOp>,
        failure: Vec<TxnOp>,
    ) -> Result<TxnResponse, MetaError> {
        (**self).txn(compares, success, failure).await
    }
    async fn watch_prefix(
        &self,
        prefix: &str,
        after_revision: u64,
    ) -> Result<mpsc::Receiver<WatchEvent>, MetaError> {
        (**self).watch_prefix(prefix, after_revision).await
    }
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, MetaError> {
        (**self).grant_lease(ttl).await
    }
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), MetaError> {
        (**self).keep_alive(lease).await
    }
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), MetaError> {
        (**self).revoke_lease(lease).await
    }
    async fn current_revision(&self) -> Result<u64, MetaError> {
        (**self).current_revision().await
    }
}

/// Creates `key` only if it does not exist. `Ok(Ok(kv))`: created (version 1). `Ok(Err(current))`:
/// the key already exists (`current` is `None` only if it vanished between the compare and the
/// read, which cannot happen within one transaction).
pub async fn create_if_absent<S: MetaStore + ?Sized>(
    store: &S,
    key: &str,
    value: Bytes,
) -> Result<Result<KeyValue, Option<KeyValue>>, MetaError> {
    put_if_version(store, key, value, 0).await
}

/// Writes `key` only if its version is still `expected_version` (0: only if absent), keeping no
/// lease. `Ok(Ok(new))`: written. `Ok(Err(current))`: someone else wrote or deleted it first;
/// `current` is the record as it is now (`None` if absent). This is how a proxy persists an
/// instance-state transition.
pub async fn put_if_version<S: MetaStore + ?Sized>(
    store: &S,
    key: &str,
    value: Bytes,
    expected_version: u64,
) -> Result<Result<KeyValue, Option<KeyValue>>, MetaError> {
    let compare = Compare::Version {
        key: key.to_string(),
        version: expected_version,
    };
    put_if(store, compare, key, value).await
}

/// Writes `key` only if its `mod_revision` is still `expected_mod_revision` (0: only if absent),
/// keeping no lease: the compare-and-swap etcd users know. `Ok(Ok(new))`: written.
/// `Ok(Err(current))`: someone else wrote or deleted it first; `current` is the record now.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use yr_meta::{put_if_mod_revision, EmbeddedStore, MetaStore};
/// let store = EmbeddedStore::in_memory();
/// let read = store.put("/yr/node/n1", "ALIVE".into(), None).await?;
/// let won = put_if_mod_revision(&store, "/yr/node/n1", "DRAINING".into(), read.mod_revision).await?;
/// assert!(won.is_ok());
/// // The same stale read loses the second time.
/// let lost = put_if_mod_revision(&store, "/yr/node/n1", "LOST".into(), read.mod_revision).await?;
/// assert_eq!(lost.unwrap_err().unwrap().value, "DRAINING");
/// # Ok::<(), yr_meta::MetaError>(())
/// # }).unwrap();
/// ```
pub async fn put_if_mod_revision<S: MetaStore + ?Sized>(
    store: &S,
    key: &str,
    value: Bytes,
    expected_mod_revision: u64,
) -> Result<Result<KeyValue, Option<KeyValue>>, MetaError> {
    let compare = Compare::ModRevision {
        key: key.to_string(),
        mod_revision: expected_mod_revision,
    };
    put_if(store, compare, key, value).await
}

/// Writes `key` (keeping no lease) only if `compare` holds: `Ok(Ok(new))` if written,
/// `Ok(Err(current))` with the record as it is now otherwise. The body of [`put_if_version`]
/// and [`put_if_mod_revision`].
async fn put_if<S: MetaStore + ?Sized>(
    store: &S,
    compare: Compare,
    key: &str,
    value: Bytes,
) -> Result<Result<KeyValue, Option<KeyValue>>, MetaError> {
    let response = store
        .txn(
            vec![compare],
            vec![TxnOp::Put {
                key: key.to_string(),
                value,
                lease: None,
            }],
            vec![TxnOp::Get {
                key: key.to_string(),
            }],
        )
        .await?;
    let result = response.results.into_iter().next().flatten();
    if response.succeeded {
        result.map(Ok).ok_or_else(|| {
            MetaError::Unavailable(format!(
                "the store answered a put of {key:?} without the written record"
            ))
        })
    } else {
        Ok(Err(result))
    }
}

/// Deletes `key` only if its version is still `expected_version`. `Ok(Ok(()))`: deleted.
/// `Ok(Err(current))`: someone else wrote or deleted it first; `current` is the record now.
pub async fn delete_if_version<S: MetaStore + ?Sized>(
    store: &S,
    key: &str,
    expected_version: u64,
) -> Result<Result<(), Option<KeyValue>>, MetaError> {
    let response = store
        .txn(
            vec![Compare::Version {
                key: key.to_string(),
                version: expected_version,
            }],
            vec![TxnOp::Delete {
                key: key.to_string(),
            }],
            vec![TxnOp::Get {
                key: key.to_string(),
            }],
        )
        .await?;
    if response.succeeded {
        Ok(Ok(()))
    } else {
        Ok(Err(response.results.into_iter().next().flatten()))
    }
}
