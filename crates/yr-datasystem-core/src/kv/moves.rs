//! Entries moving between stores: in a cluster a key lives on its owner node, and when the
//! ring of owners changes the previous owner hands the key to the new one
//! ([`KvStore::moving_entries`] to list them, [`KvStore::adopt`] on the new owner,
//! [`KvStore::forget_moved`] on the previous one once the new one took it). A move never
//! replaces a value the new owner already holds (a write that reached it first is newer), and
//! the new owner's own check refuses keys it deleted during the move. A node the master declared
//! lost forgets its memory-only values ([`KvStore::forget_memory_only`]) before it joins the ring
//! again, since the keys may have been written again at their owners meanwhile.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use yr_common::Result;

use super::map::{entry_size, Entry, L2State};
use super::write_back::Job;
use super::{validate_key, KvStore};

/// One entry on its way to another store.
///
/// ```
/// use yr_datasystem_core::kv::{KvStore, SetParam};
/// let (old, new) = (KvStore::new(), KvStore::new());
/// old.set_for_job("job", "k", "v".into(), &SetParam::default()).unwrap();
/// for entry in old.moving_entries(|_| true, usize::MAX) {
///     assert!(new.adopt(&entry, |_| false).unwrap());
///     old.forget_moved(&entry.key, entry.version).unwrap();
/// }
/// assert_eq!(new.try_get(&["k"]).unwrap(), vec![Some("v".into())]);
/// assert!(old.is_empty());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MovingEntry {
    /// The key.
    pub key: String,
    /// Its value.
    pub value: Bytes,
    /// Time left to live (`None`: it does not expire).
    pub ttl: Option<Duration>,
    /// The quota bucket it counts under.
    pub job: String,
    /// Whether the second-level store holds it (written through, or written back).
    pub in_l2: bool,
    /// Its version in the store it leaves (for [`KvStore::forget_moved`]).
    pub version: u64,
    /// When it was written, on its writer's hybrid clock: a store that holds a value of the
    /// key with a greater stamp keeps its own.
    pub stamp: u64,
}

impl KvStore {
    /// The live entries whose key `moves` selects, up to about `max_bytes` of keys and values
    /// (at least one entry when any is selected).
    pub fn moving_entries(
        &self,
        moves: impl Fn(&str) -> bool,
        max_bytes: usize,
    ) -> Vec<MovingEntry> {
        let shared = self.shared();
        let now = shared.clock.now();
        let map = shared.map.lock();
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for (key, entry) in &map.entries {
            if !entry.live(now) || !moves(key) {
                continue;
            }
            if !out.is_empty() && bytes.saturating_add(entry.size as usize) > max_bytes {
                break;
            }
            bytes = bytes.saturating_add(entry.size as usize);
            out.push(MovingEntry {
                key: key.clone(),
                value: entry.value.clone(),
                ttl: entry.expires_at.map(|at| at.saturating_duration_since(now)),
                job: entry.job.to_string(),
                in_l2: entry.l2 != L2State::Absent,
                version: entry.version,
                stamp: entry.stamp,
            });
        }
        out
    }

    /// Keep `entry`, moved here from its previous owner: `Ok(true)` if this store holds the
    /// key now (this value, which replaces an older one held here, or a value held here whose
    /// stamp is not older), or if `refuse` says it was deleted here during the move (checked
    /// under the key's write lock, so a delete that records its key before deleting is never
    /// undone by a move); `Ok(false)` if it does not fit the job's quota and no second-level
    /// store here holds it. A value in the second-level store is written into this one's too
    /// when this one is not shared.
    ///
    /// ```
    /// use yr_datasystem_core::kv::{KvStore, MovingEntry, SetParam};
    /// let owner = KvStore::new();
    /// let moved = |value: &str, stamp| MovingEntry {
    ///     key: "k".into(),
    ///     value: value.to_string().into(),
    ///     ttl: None,
    ///     job: "job".into(),
    ///     in_l2: false,
    ///     version: 1,
    ///     stamp,
    /// };
    /// assert!(owner.adopt(&moved("old", 10), |_| false).unwrap());
    /// // A newer value moved here replaces it; an older one is dropped (the sender forgets it).
    /// assert!(owner.adopt(&moved("new", 20), |_| false).unwrap());
    /// assert!(owner.adopt(&moved("older", 15), |_| false).unwrap());
    /// assert_eq!(owner.try_get(&["k"]).unwrap(), vec![Some("new".into())]);
    /// // A write here is newer than every stamp seen here.
    /// owner.set_for_job("job", "k", "latest".into(), &SetParam::default()).unwrap();
    /// assert!(owner.adopt(&moved("moved", 20), |_| false).unwrap());
    /// assert_eq!(owner.try_get(&["k"]).unwrap(), vec![Some("latest".into())]);
    /// ```
    pub fn adopt(&self, entry: &MovingEntry, refuse: impl Fn(&str) -> bool) -> Result<bool> {
        validate_key(&entry.key)?;
        let shared = self.shared();
        let key = entry.key.as_str();
        let _lock = shared.write_lock(key);
        if refuse(key) {
            return Ok(true);
        }
        let now = shared.clock.now();
        shared.observe(entry.stamp);
        let held = {
            let map = shared.map.lock();
            map.entries
                .get(key)
                .filter(|e| e.live(now))
                .map(|e| (e.stamp, e.l2))
        };
        if held.is_some_and(|(stamp, _)| stamp >= entry.stamp) {
            // The value held here is newer: the sender forgets its copy.
            return Ok(true);
        }
        let version = shared.version();
        let mut l2_state = L2State::Absent;
        if entry.in_l2 {
            if let Some(l2) = &shared.l2 {
                if !l2.shared() {
                    let wall = entry.ttl.and_then(|t| SystemTime::now().checked_add(t));
                    l2.put(key, &entry.value, wall)?;
                }
                l2_state = L2State::Stored;
            }
        }
        let job: Arc<str> = Arc::from(entry.job.as_str());
        let size = entry_size(key, entry.value.len());
        let reserved = match shared.reserve(&job, key, size) {
            Ok(reserved) => reserved,
            // Read through from the second-level store when asked (not the older value).
            Err(_) if l2_state == L2State::Stored => {
                shared.map.lock().remove(key);
                return Ok(true);
            }
            Err(_) => return Ok(false),
        };
        if !entry.in_l2 && held.is_some_and(|(_, l2)| l2 != L2State::Absent) {
            // The second-level store holds the older value: remove it, as a write here would.
            if let Err(error) = self.enqueue(Job::Delete {
                key: key.to_string(),
                version,
            }) {
                shared.release(&job, reserved);
                return Err(error);
            }
        }
        shared.insert(
            key,
            Entry {
                value: entry.value.clone(),
                expires_at: entry.ttl.and_then(|t| now.checked_add(t)),
                version,
                stamp: entry.stamp,
                l2: l2_state,
                job,
                size,
            },
            reserved,
        );
        Ok(true)
    }

    /// Forget every value held only in memory here, and return how many: the node was declared
    /// lost, so its keys were owned elsewhere meanwhile and may have been written again there.
    /// Values the second-level store holds stay. Called before the node is back on the ring,
    /// so the newer values its successors push are adopted, not refused in favour of these.
    ///
    /// ```
    /// use yr_datasystem_core::kv::{KvStore, SetParam};
    /// let store = KvStore::new();
    /// store.set_for_job("job", "k", "stale".into(), &SetParam::default()).unwrap();
    /// assert_eq!(store.forget_memory_only(), 1);
    /// assert_eq!(store.try_get(&["k"]).unwrap(), vec![None]);
    /// ```
    pub fn forget_memory_only(&self) -> usize {
        let shared = self.shared();
        let keys: Vec<String> = {
            let map = shared.map.lock();
            map.entries
                .iter()
                .filter(|(_, entry)| entry.l2 == L2State::Absent)
                .map(|(key, _)| key.clone())
                .collect()
        };
        let mut forgotten = 0;
        for key in keys {
            let _lock = shared.write_lock(&key);
            let mut map = shared.map.lock();
            if map
                .entries
                .get(&key)
                .is_some_and(|entry| entry.l2 == L2State::Absent)
            {
                map.remove(&key);
                forgotten += 1;
            }
        }
        forgotten
    }

    /// Forget `key` after its new owner took it: remove it from memory if it still has
    /// `version` (a later write here stays), and from the second-level store when that is this
    /// store's own (a shared one holds the new owner's copy).
    pub fn forget_moved(&self, key: &str, version: u64) -> Result<()> {
        let shared = self.shared();
        let _lock = shared.write_lock(key);
        let removed = {
            let mut map = shared.map.lock();
            match map.entries.get(key) {
                Some(entry) if entry.version == version => map.remove(key),
                _ => None,
            }
        };
        if let (Some(entry), Some(l2)) = (removed, &shared.l2) {
            if entry.l2 != L2State::Absent && !l2.shared() {
                l2.delete(key)?;
            }
        }
        Ok(())
    }
}
