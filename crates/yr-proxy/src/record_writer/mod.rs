//! The record writer: the only code on a node that persists instance records (and the keys of
//! named instances and registered functions) to the meta store.
//!
//! Each instance has at most one write in flight. Changes queue behind it and only the newest
//! is written next, so an older state never lands over a newer one, and a meta-store outage
//! delays records (with backoff) without losing them.
//!
//! Writes are fenced (docs/design/014-fenced-instance-records.md). Each record carries the
//! incarnation the node had when the instance's first record was queued, and each write is a
//! transaction that holds only if the record is still at the version this writer last wrote
//! *and* the node's live incarnation in the meta store (`/yr/incarnation/<node_id>`, kept by the
//! master) is the record's. So a node the master declared lost writes nothing: its writes wait
//! until it registers again, and by then it is a new incarnation and its old instances are
//! fenced. On a version conflict the writer reads the stored record: its own incarnation's
//! earlier write (a lost acknowledgement) or the record of the node that handed the instance
//! over is written over with the adopted version; a record the master wrote (FATAL) or another
//! incarnation of this node wrote is never written over: the instance is fenced, and the node
//! fails it (1007).

mod fenced_write;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use yr_common::{Error, ErrorCode};
use yr_meta::MetaStore;
use yr_proto::v1 as pb;

use crate::fencing::Fencing;

use fenced_write::{resolve, Resolution, Written};

/// Meta store key of an instance's record.
pub fn instance_key(instance_id: &str) -> String {
    format!("/yr/instance/{instance_id}")
}

/// Meta store key of a named instance.
pub fn named_key(namespace: &str, name: &str) -> String {
    format!("/yr/named/{namespace}/{name}")
}

/// Meta store key of a registered function.
pub fn function_key(name: &str) -> String {
    format!("/yr/function/{name}")
}

/// An instance's record writes: the newest record not yet written (`Some(None)`: delete it),
/// the stored version, whether its writer runs, and whose the record is.
#[derive(Default)]
struct PendingWrites {
    latest: Option<Option<pb::InstanceRecord>>,
    version: u64,
    writing: bool,
    /// The node's incarnation when the instance's first record was queued; its records carry it.
    incarnation: u64,
    /// The node that handed the instance to this one (`creator_node_id`): where this node writes
    /// first, that node's record may stand, and is written over.
    creator: String,
    /// The record is not this node's to write any more: changes are dropped.
    fenced: bool,
}

/// What the writer does after a write.
enum Then {
    /// Write what is queued next.
    Continue,
    /// Wait for a registration (or a new incarnation), then write again.
    Wait,
    /// Back off, then write again (the store is unavailable).
    RetryLater,
    /// Stop writing the record; with an error, the node fails the instance.
    Fence(Option<Error>),
}

/// Persists instance records, one writer task per instance with writes pending.
pub struct RecordWriter {
    meta: Arc<dyn MetaStore>,
    fencing: Arc<Fencing>,
    pending: Mutex<HashMap<String, PendingWrites>>,
}

impl RecordWriter {
    /// A writer into `meta`, fenced by `fencing`'s incarnation.
    pub fn new(meta: Arc<dyn MetaStore>, fencing: Arc<Fencing>) -> Arc<RecordWriter> {
        Arc::new(RecordWriter {
            meta,
            fencing,
            pending: Mutex::new(HashMap::new()),
        })
    }

    /// Queue `record` of its instance for writing.
    pub fn write(self: &Arc<Self>, record: pb::InstanceRecord) {
        self.queue(record.instance_id.clone(), Some(record));
    }

    /// Queue the deletion of `instance_id`'s record.
    pub fn delete(self: &Arc<Self>, instance_id: &str) {
        self.queue(instance_id.to_string(), None);
    }
    /// Record that the named instance `(namespace, name)` is `instance_id`.
    pub fn write_name(&self, namespace: &str, name: &str, instance_id: &str) {
        let meta = self.meta.clone();
        let key = named_key(namespace, name);
        let value = bytes::Bytes::from(instance_id.as_bytes().to_vec());
        tokio::spawn(async move {
            if let Err(error) = meta.put(&key, value, None).await {
                tracing::warn!(%key, %error, "could not record a named instance");
            }
        });
    }

    /// Forget the named instance `(namespace, name)`.
    pub fn delete_name(&self, namespace: &str, name: &str) {
        let meta = self.meta.clone();
        let key = named_key(namespace, name);
        tokio::spawn(async move {
            if let Err(error) = meta.delete(&key).await {
                tracing::warn!(%key, %error, "could not delete a named instance");
            }
        });
    }

    /// Record that `functions` are registered.
    pub fn write_functions(&self, functions: Vec<String>) {
        let meta = self.meta.clone();
        tokio::spawn(async move {
            for name in functions {
                let key = function_key(&name);
                if let Err(error) = meta.put(&key, bytes::Bytes::new(), None).await {
                    tracing::warn!(%key, %error, "could not record a registered function");
                }
            }
        });
    }

    fn queue(self: &Arc<Self>, instance_id: String, record: Option<pb::InstanceRecord>) {
        let start_writer = {
            let mut pending = self.pending.lock();
            let writes = pending
                .entry(instance_id.clone())
                .or_insert_with(|| PendingWrites {
                    incarnation: self.fencing.incarnation(),
                    ..PendingWrites::default()
                });
            if writes.fenced {
                if record.is_none() {
                    // The instance is gone here: forget it; the record stays as its owner wrote it.
                    pending.remove(&instance_id);
                }
                return;
            }
            let record = record.map(|mut record| {
                record.node_incarnation = writes.incarnation;
                if writes.creator.is_empty() {
                    writes.creator.clone_from(&record.creator_node_id);
                }
                record
            });
            writes.latest = Some(record);
            !std::mem::replace(&mut writes.writing, true)
        };
        if start_writer {
            let writer = self.clone();
            tokio::spawn(async move { writer.run(instance_id).await });
        }
    }

    /// Write `instance_id`'s queued changes until none is left, or the record is fenced.
    async fn run(self: Arc<Self>, instance_id: String) {
        let key = instance_key(&instance_id);
        let mut backoff = Duration::from_millis(50);
        loop {
            // Seen now, so that a registration or a new incarnation after this write wakes the
            // wait below.
            let mut incarnations = self.fencing.subscribe();
            let (next, version, incarnation, creator) = {
                let mut pending = self.pending.lock();
                let Some(writes) = pending.get_mut(&instance_id) else {
                    return;
                };
                match writes.latest.take() {
                    Some(next) => (
                        next,
                        writes.version,
                        writes.incarnation,
                        writes.creator.clone(),
                    ),
                    None => {
                        writes.writing = false;
                        return;
                    }
                }
            };
            if incarnation != incarnations.borrow().current {
                // The node was declared lost and is a new incarnation now: this instance's record
                // is the master's.
                let error = Error::new(
                    ErrorCode::InstanceExited,
                    format!(
                        "instance {instance_id} exited: it belonged to incarnation {incarnation} of node {}, which the master declared lost; its record stays as the master wrote it; create the instance again",
                        self.fencing.node_id()
                    ),
                );
                self.fence(&instance_id, Some(error));
                return;
            }
            let result = self
                .write_once(&key, next.as_ref(), version, incarnation)
                .await;
            let then = {
                let mut pending = self.pending.lock();
                let Some(writes) = pending.get_mut(&instance_id) else {
                    return;
                };
                match result {
                    Ok(Written::Done(new_version)) => {
                        backoff = Duration::from_millis(50);
                        if next.is_none() {
                            if writes.latest.is_none() {
                                pending.remove(&instance_id);
                                return;
                            }
                            writes.version = 0;
                        } else {
                            writes.version = new_version;
                        }
                        Then::Continue
                    }
                    Ok(Written::NotLive) => {
                        writes.latest.get_or_insert(next);
                        Then::Wait
                    }
                    Ok(Written::Conflict(current)) => {
                        match resolve(
                            current.as_ref(),
                            &instance_id,
                            self.fencing.node_id(),
                            incarnation,
                            &creator,
                        ) {
                            Resolution::Adopt(version) => {
                                // Write the newest record again over the adopted version, unless
                                // a newer one is already queued.
                                writes.version = version;
                                writes.latest.get_or_insert(next);
                                Then::Continue
                            }
                            Resolution::Fenced(error) => Then::Fence(Some(error)),
                            Resolution::Moved(owner) => {
                                tracing::debug!(instance = %instance_id, %owner, "another node owns the instance's record now; this node stops writing it");
                                Then::Fence(None)
                            }
                        }
                    }
                    Err(error) => {
                        tracing::warn!(instance = %instance_id, %error, "could not persist an instance record; retrying");
                        writes.latest.get_or_insert(next);
                        Then::RetryLater
                    }
                }
            };
            match then {
                Then::Continue => {}
                Then::Fence(error) => {
                    self.fence(&instance_id, error);
                    return;
                }
                Then::Wait => {
                    // Until the node registers (again) or becomes a new incarnation; the backoff
                    // bounds the wait in case the master forgot the live incarnation meanwhile.
                    let _ = tokio::time::timeout(backoff, incarnations.changed()).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Then::RetryLater => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
