//! The in-memory map of the KV store: its entries (value, expiry, version, where the
//! second-level copy stands), the readers watching keys, and the bytes each job holds. Inserting
//! and removing an entry charge and credit its job here, so the accounting follows the entries.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

/// Where a value's copy in the second-level store stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum L2State {
    /// No copy (or an old one that a queued delete removes).
    Absent,
    /// A write-back is queued.
    Pending,
    /// The second-level store holds this value.
    Stored,
}

pub(super) struct Entry {
    pub(super) value: Bytes,
    pub(super) expires_at: Option<Instant>,
    pub(super) version: u64,
    /// When the value was written, on its writer's hybrid clock ([`super::Shared::stamp`]):
    /// of two values of a key, the greater stamp is the newer (0: read from the second-level
    /// store, older than any write).
    pub(super) stamp: u64,
    pub(super) l2: L2State,
    /// The quota bucket the entry counts under.
    pub(super) job: Arc<str>,
    /// What it counts: the key's and the value's bytes.
    pub(super) size: u64,
}

impl Entry {
    pub(super) fn live(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|t| t > now)
    }
}

pub(super) type Waker = Arc<dyn Fn() + Send + Sync>;

#[derive(Default)]
pub(super) struct Map {
    pub(super) entries: HashMap<String, Entry>,
    pub(super) watchers: HashMap<String, Vec<(u64, Waker)>>,
    /// The bytes each job holds in memory: its entries' sizes, and room reserved by its writes
    /// in progress. A job holding nothing has no row.
    pub(super) held: HashMap<Arc<str>, u64>,
    /// The sum of `held`.
    pub(super) total: u64,
}

impl Map {
    pub(super) fn held(&self, job: &str) -> u64 {
        self.held.get(job).copied().unwrap_or(0)
    }

    pub(super) fn charge(&mut self, job: &Arc<str>, bytes: u64) {
        if bytes == 0 {
            return;
        }
        *self.held.entry(job.clone()).or_insert(0) += bytes;
        self.total += bytes;
    }

    pub(super) fn credit(&mut self, job: &str, bytes: u64) {
        let Some(held) = self.held.get_mut(job) else {
            debug_assert!(
                bytes == 0,
                "KV job {job:?} gives back bytes it does not hold"
            );
            return;
        };
        debug_assert!(
            *held >= bytes,
            "KV job {job:?} gives back more than it holds"
        );
        *held = held.saturating_sub(bytes);
        if *held == 0 {
            self.held.remove(job);
        }
        self.total = self.total.saturating_sub(bytes);
    }

    /// Remove the entry of `key`, giving its bytes back to its job.
    pub(super) fn remove(&mut self, key: &str) -> Option<Entry> {
        let entry = self.entries.remove(key)?;
        self.credit(&entry.job, entry.size);
        Some(entry)
    }

    /// Insert `entry` (replacing and crediting the old one), whose job already reserved
    /// `reserved` of its size.
    pub(super) fn put(&mut self, key: &str, entry: Entry, reserved: u64) {
        self.remove(key);
        self.charge(&entry.job, entry.size.saturating_sub(reserved));
        self.entries.insert(key.to_string(), entry);
    }
}

/// What a key and value count against the quota.
pub(super) fn entry_size(key: &str, value_len: usize) -> u64 {
    (key.len() + value_len) as u64
}
