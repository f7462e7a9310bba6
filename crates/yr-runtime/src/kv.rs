//! Where this process's KV calls go: an in-process [`KvStore`] in local mode, or the node's
//! data worker (the DataWorker service on the node's Unix socket) in a cluster. Both check
//! keys and values the same way and fail with the same codes, so the `yr::kv_*` API behaves
//! the same on either.

use std::time::Duration;

use bytes::Bytes;
use yr_common::{Error, Result};
use yr_datasystem_core::kv::KvStore;
pub use yr_datasystem_core::kv::{
    CacheType, Existence, SetParam, WriteMode, MAX_KEY_SIZE, MAX_VALUE_SIZE,
};

use crate::blocking;

/// The KV calls of the client core.
pub trait KvClient: Send + Sync {
    /// Write `value` under `key`.
    fn set(&self, key: &str, value: &[u8], param: &SetParam) -> Result<()>;
    /// The values of `keys`, in order, waiting up to `timeout` for keys not written yet.
    fn get(&self, keys: &[&str], timeout: Duration) -> Result<Vec<Bytes>>;
    /// `size` bytes of `key`'s value from `offset` (`size` 0: to the end).
    fn get_range(&self, key: &str, offset: u64, size: u64, timeout: Duration) -> Result<Bytes>;
    /// Delete `keys`.
    fn del(&self, keys: &[&str]) -> Result<()>;
    /// Whether each of `keys` has a value.
    fn exist(&self, keys: &[&str]) -> Result<Vec<bool>>;
    /// `finalize` runs: end the reads that wait for keys with `error`.
    fn shutdown(&self, _error: &Error) {}
}

/// Local mode: a store in this process, memory only. In a cluster, a read waiting on the node
/// ends when `finalize` stops the backend's IO runtime.
#[derive(Debug, Default)]
pub struct LocalKv {
    store: KvStore,
}

impl LocalKv {
    /// An empty store.
    pub fn new() -> LocalKv {
        LocalKv::default()
    }
}

impl KvClient for LocalKv {
    fn set(&self, key: &str, value: &[u8], param: &SetParam) -> Result<()> {
        // Check before copying a value that is too large.
        yr_datasystem_core::kv::validate_set(key, value.len(), param)?;
        self.store.set(key, Bytes::copy_from_slice(value), param)
    }

    fn get(&self, keys: &[&str], timeout: Duration) -> Result<Vec<Bytes>> {
        blocking::blocking(|| self.store.get(keys, timeout))
    }

    fn get_range(&self, key: &str, offset: u64, size: u64, timeout: Duration) -> Result<Bytes> {
        blocking::blocking(|| self.store.get_with_param(key, offset, size, timeout))
    }

    fn del(&self, keys: &[&str]) -> Result<()> {
        self.store.del(keys)
    }

    fn exist(&self, keys: &[&str]) -> Result<Vec<bool>> {
        self.store.exist(keys)
    }

    fn shutdown(&self, error: &Error) {
        self.store.close(error.clone());
    }
}
