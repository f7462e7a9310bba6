//! The per-job KV quota: reserving room for a write (evicting the job's expired entries and
//! its values the second-level store also holds, oldest first, when that makes the write fit),
//! giving room back, the 4202 of a write that does not fit, and the quota's settings and
//! figures on [`KvStore`].

use std::sync::atomic::Ordering;
use std::sync::Arc;

use yr_common::{Error, ErrorCode, Result};

use super::map::{L2State, Map};
use super::{KvStore, Shared, UNKNOWN_JOB};

/// The bucket name in messages.
fn job_name(job: &str) -> String {
    if job == UNKNOWN_JOB {
        "an unknown job (the writes named no job)".to_string()
    } else {
        format!("job {job}")
    }
}

impl Shared {
    /// Reserve room in memory for `job`'s write of `size` bytes under `key` (the caller holds
    /// the key's write lock): the bytes it adds beyond the entry of `key` that the job already
    /// holds. If that takes the job over the quota, its expired entries are dropped and its
    /// values that the second-level store also holds are evicted (oldest first) until the write
    /// fits; if it still does not, 4202 and nothing changed. Returns the bytes reserved, which
    /// [`Shared::insert`] or [`Shared::release`] settle.
    pub(super) fn reserve(&self, job: &Arc<str>, key: &str, size: u64) -> Result<u64> {
        let quota = self.quota.load(Ordering::Relaxed);
        let mut map = self.map.lock();
        let replaced = match map.entries.get(key) {
            Some(entry) if entry.job == *job => entry.size,
            _ => 0,
        };
        let extra = size.saturating_sub(replaced);
        let fits = |map: &Map| extra == 0 || map.held(job).saturating_add(extra) <= quota;
        if !fits(&map) {
            let now = self.clock.now();
            let mut candidates: Vec<(bool, u64, String, u64)> = map
                .entries
                .iter()
                .filter(|(k, e)| {
                    e.job == *job && k.as_str() != key && (!e.live(now) || e.l2 == L2State::Stored)
                })
                .map(|(k, e)| (e.live(now), e.version, k.clone(), e.size))
                .collect();
            // Evict only if that makes the write fit: a refused write changes nothing.
            let freeable: u64 = candidates.iter().map(|c| c.3).sum();
            let enough = map.held(job).saturating_sub(freeable).saturating_add(extra) <= quota;
            if enough {
                // Expired entries first, then the oldest.
                candidates.sort_unstable();
                for (_, _, victim, _) in candidates {
                    if fits(&map) {
                        break;
                    }
                    map.remove(&victim);
                }
            }
        }
        if !fits(&map) {
            let held = map.held(job);
            return Err(Error::new(
                ErrorCode::SharedMemoryLimited,
                format!(
                    "KV quota exceeded: {} holds {held} bytes of KV memory on this node, and \
                     writing {size} bytes (key and value) under key {key:?} would take it over \
                     its quota of {quota} bytes, so nothing was written; delete keys the job no \
                     longer needs (kv_del), or start the node with a larger --kv-quota-mb",
                    job_name(job)
                ),
            ));
        }
        map.charge(job, extra);
        Ok(extra)
    }

    /// Give back room reserved for a write that failed.
    pub(super) fn release(&self, job: &str, reserved: u64) {
        self.map.lock().credit(job, reserved);
    }
}

impl KvStore {
    /// Limit the bytes (keys and values) each job may hold in memory to `quota_bytes`
    /// (`None`: no limit, the default). Writes already stored stay.
    ///
    /// ```
    /// use yr_datasystem_core::kv::{KvStore, SetParam};
    /// let store = KvStore::new();
    /// store.set_quota(Some(10));
    /// store.set_for_job("job-a", "k", "12345".into(), &SetParam::default()).unwrap();
    /// let error = store
    ///     .set_for_job("job-a", "k2", "123456".into(), &SetParam::default())
    ///     .unwrap_err();
    /// assert_eq!(error.code().number(), 4202);
    /// // Another job has a quota of its own.
    /// store.set_for_job("job-b", "k2", "123456".into(), &SetParam::default()).unwrap();
    /// assert_eq!(store.job_bytes("job-a"), 6);
    /// assert_eq!(store.memory_bytes(), 14);
    /// ```
    pub fn set_quota(&self, quota_bytes: Option<u64>) {
        self.shared()
            .quota
            .store(quota_bytes.unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The per-job quota, in bytes (`None`: no limit).
    pub fn quota(&self) -> Option<u64> {
        let quota = self.shared().quota.load(Ordering::Relaxed);
        (quota != u64::MAX).then_some(quota)
    }

    /// The bytes (keys and values) every job holds in memory together.
    pub fn memory_bytes(&self) -> u64 {
        self.shared().map.lock().total
    }

    /// The bytes `job_id` holds in memory ([`UNKNOWN_JOB`]: writes that named no job).
    pub fn job_bytes(&self, job_id: &str) -> u64 {
        self.shared().map.lock().held(job_id)
    }
}
