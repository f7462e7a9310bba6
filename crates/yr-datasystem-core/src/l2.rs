//! The KV store's second-level store (openYuanrong's "L2 cache"), as the store sees it: where
//! write-through and write-back values are kept so that they outlive the node's memory. The
//! backends (a directory, Redis) belong to the data worker (`yr_datasystem::l2`).

use std::time::SystemTime;

use bytes::Bytes;
use yr_common::Result;

/// A value read from the second-level store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct L2Record {
    /// The value.
    pub value: Bytes,
    /// When it expires (`None`: never).
    pub expires_at: Option<SystemTime>,
}

/// A second-level store. Calls block (disk or network IO); async callers run them on a
/// blocking thread.
pub trait L2Store: Send + Sync {
    /// What and where it is, for messages: `directory /x/kv-l2`, `redis 127.0.0.1:6379`.
    fn describe(&self) -> String;
    /// Store `value` under `key`, replacing any previous value, durably before returning.
    fn put(&self, key: &str, value: &[u8], expires_at: Option<SystemTime>) -> Result<()>;
    /// The value of `key`, unless it is missing or expired.
    fn get(&self, key: &str) -> Result<Option<L2Record>>;
    /// Remove `key`; removing a missing key succeeds.
    fn delete(&self, key: &str) -> Result<()>;
    /// Whether `key` holds a value that has not expired.
    fn exists(&self, key: &str) -> Result<bool>;
    /// Whether every node of a cluster reaches this same store (Redis), so that a value one
    /// node wrote through is read through by another; a directory is one node's own.
    fn shared(&self) -> bool {
        false
    }
}
