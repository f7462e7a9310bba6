//! Recovery and compaction: replaying a snapshot and the log records after it into the state
//! on open, taking a snapshot of the state, and compacting the log (a new log plus a
//! snapshot) once it grows past the limits.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use parking_lot::MutexGuard;

use crate::error::MetaError;
use crate::store::WatchEvent;
use crate::wal::{self, Replay, WalRecord};

use super::leases::Lease;
use super::state::{lease_or_none, Entry, State};

impl State {
    pub(super) fn replay(&mut self, replay: Replay) -> Result<(), MetaError> {
        match replay {
            Replay::Snapshot { lsn, snapshot } => {
                self.appended_lsn = lsn;
                self.revision = snapshot.revision;
                self.compacted_revision = snapshot.revision;
                self.next_lease_id = snapshot.next_lease_id.max(1);
                let now = Instant::now();
                for lease in snapshot.leases {
                    let ttl = Duration::from_millis(lease.ttl_ms);
                    self.leases.insert(
                        lease.id,
                        Lease {
                            ttl,
                            deadline: now + ttl,
                            keys: BTreeSet::new(),
                        },
                    );
                }
                for kv in snapshot.kvs {
                    let lease = lease_or_none(kv.lease);
                    if let Some(id) = lease {
                        let Some(lease) = self.leases.get_mut(&id) else {
                            return Err(MetaError::Corrupt(format!(
                                "snapshot key {:?} is attached to unknown lease {id}",
                                kv.key
                            )));
                        };
                        lease.keys.insert(kv.key.clone());
                    }
                    self.kvs.insert(
                        kv.key,
                        Entry {
                            value: kv.value,
                            version: kv.version,
                            mod_revision: kv.mod_revision,
                            lease,
                        },
                    );
                }
                Ok(())
            }
            Replay::Record(record) => self.replay_record(record),
        }
    }

    fn replay_record(&mut self, record: WalRecord) -> Result<(), MetaError> {
        let mismatch = |expected: u64| {
            MetaError::Corrupt(format!(
                "record at revision {} where revision {expected} was expected",
                record.revision
            ))
        };
        self.appended_lsn += 1;
        if record.grant_lease != 0 {
            if record.revision != self.revision {
                return Err(mismatch(self.revision));
            }
            let ttl = Duration::from_millis(record.grant_ttl_ms);
            self.leases.insert(
                record.grant_lease,
                Lease {
                    ttl,
                    deadline: Instant::now() + ttl,
                    keys: BTreeSet::new(),
                },
            );
            self.next_lease_id = self.next_lease_id.max(record.grant_lease + 1);
            return Ok(());
        }
        if record.end_lease != 0 {
            let has_keys = self
                .leases
                .get(&record.end_lease)
                .is_some_and(|l| !l.keys.is_empty());
            let expected = self.revision + u64::from(has_keys);
            if record.revision != expected {
                return Err(mismatch(expected));
            }
            self.revision = expected;
            let events = self.end_lease(record.end_lease, expected);
            if !events.is_empty() {
                self.remember(expected, events);
            }
            return Ok(());
        }
        let expected = self.revision + 1;
        if record.revision != expected {
            return Err(mismatch(expected));
        }
        self.revision = expected;
        let mut events = Vec::with_capacity(record.ops.len());
        for op in record.ops {
            if op.delete {
                if self.remove_entry(&op.key).is_some() {
                    events.push(WatchEvent::Delete {
                        key: op.key,
                        revision: expected,
                    });
                }
            } else {
                let lease = lease_or_none(op.lease);
                if let Some(id) = lease {
                    if !self.leases.contains_key(&id) {
                        return Err(MetaError::Corrupt(format!(
                            "key {:?} is attached to unknown lease {id}",
                            op.key
                        )));
                    }
                }
                let kv = self.put_entry(&op.key, op.value, lease, expected);
                events.push(WatchEvent::Put(kv));
            }
        }
        self.remember(expected, events);
        Ok(())
    }

    pub(super) fn snapshot(&self) -> wal::Snapshot {
        wal::Snapshot {
            revision: self.revision,
            next_lease_id: self.next_lease_id,
            kvs: self
                .kvs
                .iter()
                .map(|(key, e)| wal::SnapshotKv {
                    key: key.clone(),
                    value: e.value.clone(),
                    version: e.version,
                    mod_revision: e.mod_revision,
                    lease: e.lease.unwrap_or(0),
                })
                .collect(),
            leases: self
                .leases
                .iter()
                .map(|(id, l)| wal::SnapshotLease {
                    id: *id,
                    ttl_ms: u64::try_from(l.ttl.as_millis()).unwrap_or(u64::MAX).max(1),
                })
                .collect(),
        }
    }

    pub(super) fn needs_compaction(&self) -> bool {
        match &self.log {
            Some(log) => {
                self.appended_lsn >= self.compaction_retry_lsn
                    && (log.bytes >= self.options.max_log_bytes
                        || log.records >= self.options.max_log_records)
            }
            None => false,
        }
    }
}

/// Starts a new log and writes a snapshot of the state so far; the old logs are then removed.
pub(super) fn compact(state: &mut MutexGuard<'_, State>) {
    let lsn = state.appended_lsn;
    let snapshot = state.snapshot();
    let rotated = match state.log.as_mut() {
        Some(log) => log.rotate(lsn).map(|()| log.dir().to_path_buf()),
        None => return,
    };
    let dir = match rotated {
        Ok(dir) => dir,
        Err(err) => {
            tracing::warn!(%err, "meta store could not start a new log; compaction postponed");
            state.compaction_retry_lsn = lsn + 1000;
            return;
        }
    };
    let result = MutexGuard::unlocked(state, || wal::write_snapshot(&dir, lsn, &snapshot));
    match result {
        Ok(()) => tracing::info!(
            lsn,
            revision = snapshot.revision,
            keys = snapshot.kvs.len(),
            "meta store compacted its log into a snapshot"
        ),
        Err(err) => {
            tracing::warn!(%err, "meta store could not write a snapshot; the logs are kept");
            state.compaction_retry_lsn = state.appended_lsn + 1000;
        }
    }
}
