//! Waiting reads: [`KvStore::get`] waits for keys not written yet, woken by a [`Watch`] on
//! those keys, and fails with 4005 naming the missing keys after its timeout; [`KvStore::close`]
//! ends every waiting read with an error.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use yr_common::{Error, Result};

use super::map::Waker;
use super::{slice_range, timeout_error, validate_keys, KvStore, Shared};

/// Stops watching keys when dropped.
pub struct Watch {
    shared: Weak<Shared>,
    id: u64,
    keys: Vec<String>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        shared.reads_waiting.fetch_sub(1, Ordering::Relaxed);
        let mut map = shared.map.lock();
        for key in &self.keys {
            if let Some(list) = map.watchers.get_mut(key) {
                list.retain(|(id, _)| *id != self.id);
                if list.is_empty() {
                    map.watchers.remove(key);
                }
            }
        }
    }
}

/// A read this node forwarded to its keys' owner, where it waits: counted among this node's
/// waiting reads ([`KvStore::waiting_reads`]) until dropped, so the node's metric shows the
/// reads its clients wait on wherever the keys live.
pub struct ForwardedRead {
    shared: Weak<Shared>,
}

impl Drop for ForwardedRead {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.reads_waiting.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl KvStore {
    /// Count a read forwarded to another node, where it waits, until the guard is dropped.
    pub fn forwarded_read(&self) -> ForwardedRead {
        let shared = &self.handle.shared;
        shared.reads_waiting.fetch_add(1, Ordering::Relaxed);
        ForwardedRead {
            shared: Arc::downgrade(shared),
        }
    }

    /// Call `waker` whenever one of `keys` is written, until the returned guard is dropped.
    pub fn watch<S: AsRef<str>>(&self, keys: &[S], waker: Waker) -> Watch {
        let shared = &self.handle.shared;
        let id = shared.next_watch.fetch_add(1, Ordering::Relaxed);
        let keys: Vec<String> = keys.iter().map(|k| k.as_ref().to_string()).collect();
        shared.reads_waiting.fetch_add(1, Ordering::Relaxed);
        {
            let mut map = shared.map.lock();
            for key in &keys {
                map.watchers
                    .entry(key.clone())
                    .or_default()
                    .push((id, waker.clone()));
            }
        }
        Watch {
            shared: Arc::downgrade(shared),
            id,
            keys,
        }
    }

    /// The values of `keys`, in order, waiting up to `timeout` for keys that are not written
    /// yet. 1001 for a bad key; 4005 naming the keys still missing after `timeout`.
    pub fn get<S: AsRef<str>>(&self, keys: &[S], timeout: Duration) -> Result<Vec<Bytes>> {
        validate_keys(keys)?;
        let deadline = Instant::now().checked_add(timeout);
        let signal = Arc::new((Mutex::new(false), Condvar::new()));
        let waker: Waker = {
            let signal = signal.clone();
            Arc::new(move || {
                *signal.0.lock() = true;
                signal.1.notify_all();
            })
        };
        let _watch = self.watch(keys, waker);
        loop {
            let values = self.try_get(keys)?;
            if values.iter().all(Option::is_some) {
                return Ok(values.into_iter().flatten().collect());
            }
            if let Some(error) = self.shared().closed.lock().clone() {
                return Err(error);
            }
            let mut written = signal.0.lock();
            let mut timed_out = false;
            while !*written && !timed_out {
                match deadline {
                    Some(deadline) => {
                        timed_out = signal.1.wait_until(&mut written, deadline).timed_out()
                    }
                    None => signal.1.wait(&mut written),
                }
            }
            *written = false;
            drop(written);
            if timed_out {
                let values = self.try_get(keys)?;
                if values.iter().all(Option::is_some) {
                    return Ok(values.into_iter().flatten().collect());
                }
                let missing: Vec<&str> = keys
                    .iter()
                    .zip(&values)
                    .filter(|(_, v)| v.is_none())
                    .map(|(k, _)| k.as_ref())
                    .collect();
                return Err(timeout_error(&missing, timeout));
            }
        }
    }

    /// How many reads wait for keys to be written: those that watch keys here, and those
    /// forwarded to the keys' owner ([`KvStore::forwarded_read`]) (for metrics, and for tests
    /// that wait until a read waits).
    pub fn waiting_reads(&self) -> usize {
        self.shared().reads_waiting.load(Ordering::Relaxed)
    }

    /// Part of the value of `key`: `size` bytes from `offset` (`size` 0: to the end), waiting
    /// up to `timeout` for the key. 1001 for a range outside the value.
    pub fn get_with_param(
        &self,
        key: &str,
        offset: u64,
        size: u64,
        timeout: Duration,
    ) -> Result<Bytes> {
        let value = self.get(&[key], timeout)?.pop().unwrap_or_default();
        slice_range(key, &value, offset, size)
    }

    /// End every read that waits for a key, now and later, with `error` (the owner of the
    /// store is going away). Reads of written keys and writes still work.
    pub fn close(&self, error: Error) {
        let shared = self.shared();
        *shared.closed.lock() = Some(error);
        let wakers: Vec<Waker> = shared
            .map
            .lock()
            .watchers
            .values()
            .flatten()
            .map(|(_, waker)| waker.clone())
            .collect();
        for waker in wakers {
            waker();
        }
    }
}
