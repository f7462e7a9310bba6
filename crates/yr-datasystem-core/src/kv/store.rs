//! Reads and writes of the KV store: a write with its existence check, quota reservation and
//! second-level write mode; reads from memory with read-through from the second-level store;
//! deletes and existence checks. Each write to a key holds the key's write lock.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use yr_common::{Error, ErrorCode, Result};

use super::expiry::instant_of;
use super::map::{entry_size, Entry, L2State, Waker};
use super::write_back::Job;
use super::{
    validate_keys, validate_set, Existence, KvStore, SetParam, Shared, WriteMode, UNKNOWN_JOB,
};

impl Shared {
    /// The live value of `key` in memory; removes it if it has expired.
    fn memory_get(&self, key: &str) -> Option<Bytes> {
        let mut map = self.map.lock();
        let now = self.clock.now();
        match map.entries.get(key) {
            Some(entry) if entry.live(now) => Some(entry.value.clone()),
            Some(_) => {
                map.remove(key);
                None
            }
            None => None,
        }
    }

    /// Insert an entry, whose job reserved `reserved` of its size, and wake the readers
    /// waiting for its key.
    pub(super) fn insert(&self, key: &str, entry: Entry, reserved: u64) {
        let wakers: Vec<Waker> = {
            let mut map = self.map.lock();
            map.put(key, entry, reserved);
            map.watchers
                .get(key)
                .map(|list| list.iter().map(|(_, w)| w.clone()).collect())
                .unwrap_or_default()
        };
        for waker in wakers {
            waker();
        }
    }

    /// Read `key` from the second-level store into memory. The caller found it missing.
    fn read_through(&self, key: &str) -> Result<Option<Bytes>> {
        let Some(l2) = &self.l2 else {
            return Ok(None);
        };
        let _lock = self.write_lock(key);
        if let Some(value) = self.memory_get(key) {
            return Ok(Some(value));
        }
        let Some(record) = l2.get(key)? else {
            return Ok(None);
        };
        let value = record.value.clone();
        let job: Arc<str> = Arc::from(UNKNOWN_JOB);
        let size = entry_size(key, value.len());
        // A value that does not fit is served without being kept.
        if let Ok(reserved) = self.reserve(&job, key, size) {
            self.insert(
                key,
                Entry {
                    value: record.value,
                    expires_at: instant_of(record.expires_at, self.clock.now()),
                    version: self.version(),
                    stamp: 0,
                    l2: L2State::Stored,
                    job,
                    size,
                },
                reserved,
            );
        }
        Ok(Some(value))
    }

    pub(super) fn exists(&self, key: &str) -> Result<bool> {
        if self.memory_get(key).is_some() {
            return Ok(true);
        }
        match &self.l2 {
            Some(l2) => l2.exists(key),
            None => Ok(false),
        }
    }
}

impl KvStore {
    /// Write `value` under `key`, counted under no job ([`UNKNOWN_JOB`]); see
    /// [`KvStore::set_for_job`].
    pub fn set(&self, key: &str, value: Bytes, param: &SetParam) -> Result<()> {
        self.set_for_job(UNKNOWN_JOB, key, value, param)
    }

    /// Write `value` under `key` for `job_id`. 1001 for a bad key, value or TTL; 4206 for an
    /// existing key with `Existence::NX`; 4202 if it would take the job over its quota; the
    /// second-level store's code (4203, 4204, 3007) if a write-through fails. A failed write
    /// changes nothing.
    pub fn set_for_job(
        &self,
        job_id: &str,
        key: &str,
        value: Bytes,
        param: &SetParam,
    ) -> Result<()> {
        validate_set(key, value.len(), param)?;
        let shared = self.shared();
        let l2 = match param.write_mode {
            WriteMode::WriteThroughL2Cache | WriteMode::WriteBackL2Cache => shared.l2.clone(),
            WriteMode::NoneL2Cache | WriteMode::NoneL2CacheEvict => None,
        };
        if l2.is_some() && param.write_mode == WriteMode::WriteBackL2Cache {
            self.wait_for_queue_room(key)?;
        }
        let _lock = shared.write_lock(key);
        if param.existence == Existence::NX && shared.exists(key)? {
            return Err(Error::new(
                ErrorCode::KeyAlreadyExist,
                format!(
                    "KV key {key:?} already exists and the write was NX (only if absent); use \
                     another key, or write without NX to replace it"
                ),
            ));
        }
        let job: Arc<str> = Arc::from(job_id);
        let size = entry_size(key, value.len());
        let reserved = shared.reserve(&job, key, size)?;
        let ttl = (param.ttl_second > 0).then(|| Duration::from_secs(param.ttl_second));
        let expires_at = ttl.and_then(|t| shared.clock.now().checked_add(t));
        let expires_at_wall = ttl.and_then(|t| SystemTime::now().checked_add(t));
        let version = shared.version();
        let previous = shared.map.lock().entries.get(key).map(|e| e.l2);
        let state = match (&l2, param.write_mode) {
            (Some(l2), WriteMode::WriteThroughL2Cache) => l2
                .put(key, &value, expires_at_wall)
                .map(|()| L2State::Stored),
            (Some(_), _) => self
                .enqueue(Job::Put {
                    key: key.to_string(),
                    version,
                    value: value.clone(),
                    expires_at: expires_at_wall,
                })
                .map(|()| L2State::Pending),
            (None, _) => {
                if previous.is_some_and(|p| p != L2State::Absent) {
                    // The second-level store holds an older value: remove it in the background.
                    self.enqueue(Job::Delete {
                        key: key.to_string(),
                        version,
                    })
                    .map(|()| L2State::Absent)
                } else {
                    Ok(L2State::Absent)
                }
            }
        };
        let state = match state {
            Ok(state) => state,
            Err(error) => {
                shared.release(&job, reserved);
                return Err(error);
            }
        };
        shared.insert(
            key,
            Entry {
                value,
                expires_at,
                version,
                stamp: shared.stamp(),
                l2: state,
                job,
                size,
            },
            reserved,
        );
        Ok(())
    }

    /// The values of `keys` now, read through from the second-level store; `None` for a key
    /// that has no value.
    pub fn try_get<S: AsRef<str>>(&self, keys: &[S]) -> Result<Vec<Option<Bytes>>> {
        let shared = self.shared();
        let mut values: Vec<Option<Bytes>> =
            keys.iter().map(|k| shared.memory_get(k.as_ref())).collect();
        if shared.l2.is_some() {
            for (value, key) in values.iter_mut().zip(keys) {
                if value.is_none() {
                    *value = shared.read_through(key.as_ref())?;
                }
            }
        }
        Ok(values)
    }

    /// Delete `keys` from memory and from the second-level store. Deleting a missing key
    /// succeeds.
    pub fn del<S: AsRef<str>>(&self, keys: &[S]) -> Result<()> {
        validate_keys(keys)?;
        let shared = self.shared();
        for key in keys {
            let key = key.as_ref();
            let _lock = shared.write_lock(key);
            shared.map.lock().remove(key);
            if let Some(l2) = &shared.l2 {
                l2.delete(key)?;
            }
        }
        Ok(())
    }

    /// Whether each of `keys` has a value (in memory or in the second-level store).
    pub fn exist<S: AsRef<str>>(&self, keys: &[S]) -> Result<Vec<bool>> {
        validate_keys(keys)?;
        keys.iter()
            .map(|k| self.shared().exists(k.as_ref()))
            .collect()
    }
}
