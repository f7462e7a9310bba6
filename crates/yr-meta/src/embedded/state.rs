//! The state of an [`EmbeddedStore`](super::EmbeddedStore) under its lock: the keys, leases,
//! watchers, event history and log positions, the checks every call makes, and the changes to
//! keys that live writes and replay share.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::error::MetaError;
use crate::store::{KeyValue, LeaseId, WatchEvent};
use crate::wal;

use super::leases::Lease;
use super::watchers::Watcher;
use super::EmbeddedOptions;

#[derive(Clone, Debug)]
pub(super) struct Entry {
    pub(super) value: Bytes,
    pub(super) version: u64,
    pub(super) mod_revision: u64,
    pub(super) lease: Option<LeaseId>,
}

pub(super) struct State {
    pub(super) options: EmbeddedOptions,
    pub(super) kvs: BTreeMap<String, Entry>,
    pub(super) revision: u64,
    pub(super) leases: HashMap<LeaseId, Lease>,
    pub(super) next_lease_id: LeaseId,
    pub(super) watchers: Vec<Watcher>,
    /// Published events, one entry per revision, oldest first.
    pub(super) history: VecDeque<(u64, Vec<WatchEvent>)>,
    /// The history holds every event with a revision above this.
    pub(super) compacted_revision: u64,
    /// Events of appended records not yet synced: (lsn, revision, events).
    pub(super) pending: VecDeque<(u64, u64, Vec<WatchEvent>)>,
    /// None for an in-memory store.
    pub(super) log: Option<wal::Log>,
    pub(super) appended_lsn: u64,
    pub(super) synced_lsn: u64,
    /// Do not try compacting again before this lsn (after a failed attempt).
    pub(super) compaction_retry_lsn: u64,
    pub(super) failure: Option<Arc<str>>,
    pub(super) closed: bool,
}

/// The revision of a store that was never written, as in etcd.
const INITIAL_REVISION: u64 = 1;

pub(super) fn check_key(key: &str) -> Result<(), MetaError> {
    if key.is_empty() {
        return Err(MetaError::InvalidArgument("the key is empty".to_string()));
    }
    Ok(())
}

pub(super) fn lease_or_none(id: i64) -> Option<LeaseId> {
    (id != 0).then_some(id)
}

impl State {
    pub(super) fn new(options: EmbeddedOptions) -> State {
        State {
            options,
            kvs: BTreeMap::new(),
            revision: INITIAL_REVISION,
            leases: HashMap::new(),
            next_lease_id: 1,
            watchers: Vec::new(),
            history: VecDeque::new(),
            compacted_revision: INITIAL_REVISION,
            pending: VecDeque::new(),
            log: None,
            appended_lsn: 0,
            synced_lsn: 0,
            compaction_retry_lsn: 0,
            failure: None,
            closed: false,
        }
    }

    pub(super) fn usable(&self) -> Result<(), MetaError> {
        if let Some(failure) = &self.failure {
            return Err(MetaError::Io(format!(
                "the meta store failed earlier and refuses further calls until it restarts: {failure}"
            )));
        }
        if self.closed {
            return Err(MetaError::Unavailable(
                "the meta store is closed".to_string(),
            ));
        }
        Ok(())
    }

    pub(super) fn kv(&self, key: &str) -> Option<KeyValue> {
        self.kvs.get(key).map(|e| KeyValue {
            key: key.to_string(),
            value: e.value.clone(),
            version: e.version,
            mod_revision: e.mod_revision,
            lease: e.lease,
        })
    }

    pub(super) fn range(&self, prefix: &str) -> Vec<KeyValue> {
        self.kvs
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| KeyValue {
                key: k.clone(),
                value: e.value.clone(),
                version: e.version,
                mod_revision: e.mod_revision,
                lease: e.lease,
            })
            .collect()
    }

    pub(super) fn lease_alive(&self, id: LeaseId, now: Instant) -> bool {
        self.leases.get(&id).is_some_and(|l| l.deadline > now)
    }

    // ---- changing keys (shared by live writes and replay) ----

    pub(super) fn put_entry(
        &mut self,
        key: &str,
        value: Bytes,
        lease: Option<LeaseId>,
        revision: u64,
    ) -> KeyValue {
        let old = self.kvs.get(key);
        let version = old.map_or(1, |e| e.version + 1);
        let old_lease = old.and_then(|e| e.lease);
        if old_lease != lease {
            if let Some(old_lease) = old_lease.and_then(|id| self.leases.get_mut(&id)) {
                old_lease.keys.remove(key);
            }
            if let Some(new_lease) = lease.and_then(|id| self.leases.get_mut(&id)) {
                new_lease.keys.insert(key.to_string());
            }
        }
        self.kvs.insert(
            key.to_string(),
            Entry {
                value: value.clone(),
                version,
                mod_revision: revision,
                lease,
            },
        );
        KeyValue {
            key: key.to_string(),
            value,
            version,
            mod_revision: revision,
            lease,
        }
    }

    pub(super) fn remove_entry(&mut self, key: &str) -> Option<KeyValue> {
        let old = self.kvs.remove(key)?;
        if let Some(lease) = old.lease.and_then(|id| self.leases.get_mut(&id)) {
            lease.keys.remove(key);
        }
        Some(KeyValue {
            key: key.to_string(),
            value: old.value,
            version: old.version,
            mod_revision: old.mod_revision,
            lease: old.lease,
        })
    }

    /// Ends a lease: deletes its keys at `revision` and forgets it.
    pub(super) fn end_lease(&mut self, id: LeaseId, revision: u64) -> Vec<WatchEvent> {
        let Some(lease) = self.leases.remove(&id) else {
            return Vec::new();
        };
        let mut events = Vec::with_capacity(lease.keys.len());
        for key in lease.keys {
            if self.kvs.remove(&key).is_some() {
                events.push(WatchEvent::Delete { key, revision });
            }
        }
        events
    }
}
