//! Live writes: a transaction (compares, then puts and deletes in one revision) checked
//! against the state, logged, applied and its events queued for publishing.

use std::collections::BTreeSet;
use std::time::Instant;

use bytes::Bytes;

use crate::error::MetaError;
use crate::store::{Compare, TxnOp, TxnResponse, WatchEvent};
use crate::wal::{WalOp, WalRecord};

use super::state::{check_key, State};

impl State {
    pub(super) fn txn(
        &mut self,
        compares: &[Compare],
        success: Vec<TxnOp>,
        failure: Vec<TxnOp>,
        now: Instant,
    ) -> Result<TxnResponse, MetaError> {
        let mut succeeded = true;
        for compare in compares {
            let holds = match compare {
                Compare::Version { key, version } => {
                    check_key(key)?;
                    self.kvs.get(key).map_or(0, |e| e.version) == *version
                }
                Compare::ModRevision { key, mod_revision } => {
                    check_key(key)?;
                    self.kvs.get(key).map_or(0, |e| e.mod_revision) == *mod_revision
                }
                Compare::ValueEquals { key, value } => {
                    check_key(key)?;
                    self.kvs.get(key).is_some_and(|e| e.value == *value)
                }
            };
            succeeded &= holds;
        }
        let ops = if succeeded { success } else { failure };

        // Check the whole branch before changing anything.
        let mut written = BTreeSet::new();
        let mut mutates = false;
        for op in &ops {
            match op {
                TxnOp::Get { key } => check_key(key)?,
                TxnOp::Put { key, lease, .. } => {
                    check_key(key)?;
                    if let Some(lease) = lease {
                        if !self.lease_alive(*lease, now) {
                            return Err(MetaError::LeaseNotFound(*lease));
                        }
                    }
                    if !written.insert(key.as_str()) {
                        return Err(MetaError::InvalidArgument(format!(
                            "key {key:?} is written twice in one transaction branch"
                        )));
                    }
                    mutates = true;
                }
                TxnOp::Delete { key } => {
                    check_key(key)?;
                    if !written.insert(key.as_str()) {
                        return Err(MetaError::InvalidArgument(format!(
                            "key {key:?} is written twice in one transaction branch"
                        )));
                    }
                    mutates |= self.kvs.contains_key(key);
                }
            }
        }

        if !mutates {
            let results = ops
                .iter()
                .map(|op| match op {
                    TxnOp::Get { key } => self.kv(key),
                    _ => None,
                })
                .collect();
            return Ok(TxnResponse {
                succeeded,
                revision: self.revision,
                results,
            });
        }

        let revision = self.revision + 1;
        let record = WalRecord {
            revision,
            ops: ops
                .iter()
                .filter_map(|op| match op {
                    TxnOp::Put { key, value, lease } => Some(WalOp {
                        key: key.clone(),
                        delete: false,
                        value: value.clone(),
                        lease: lease.unwrap_or(0),
                    }),
                    TxnOp::Delete { key } if self.kvs.contains_key(key) => Some(WalOp {
                        key: key.clone(),
                        delete: true,
                        value: Bytes::new(),
                        lease: 0,
                    }),
                    _ => None,
                })
                .collect(),
            ..Default::default()
        };
        let lsn = self.log_record(&record)?;
        self.revision = revision;
        let mut results = Vec::with_capacity(ops.len());
        let mut events = Vec::new();
        for op in ops {
            match op {
                TxnOp::Get { key } => results.push(self.kv(&key)),
                TxnOp::Put { key, value, lease } => {
                    let kv = self.put_entry(&key, value, lease, revision);
                    events.push(WatchEvent::Put(kv.clone()));
                    results.push(Some(kv));
                }
                TxnOp::Delete { key } => {
                    let old = self.remove_entry(&key);
                    if old.is_some() {
                        events.push(WatchEvent::Delete { key, revision });
                    }
                    results.push(old);
                }
            }
        }
        self.emit(lsn, revision, events);
        Ok(TxnResponse {
            succeeded,
            revision,
            results,
        })
    }
}
