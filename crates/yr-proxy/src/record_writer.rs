//! The record writer: the only code on a node that persists instance records (and the keys of
//! named instances and registered functions) to the meta store.
//!
//! Each instance has at most one write in flight. Changes queue behind it and only the newest
//! is written next, so an older state never lands over a newer one, and a meta-store outage
//! delays records (with backoff) without losing them. Writes are compare-and-swaps on the
//! record's version.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prost::Message;
use yr_meta::MetaStore;
use yr_proto::v1 as pb;

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
/// the stored version, and whether its writer runs.
#[derive(Default)]
struct PendingWrites {
    latest: Option<Option<pb::InstanceRecord>>,
    version: u64,
    writing: bool,
}

/// Persists instance records, one writer task per instance with writes pending.
pub struct RecordWriter {
    meta: Arc<dyn MetaStore>,
    pending: Mutex<HashMap<String, PendingWrites>>,
}

impl RecordWriter {
    /// A writer into `meta`.
    pub fn new(meta: Arc<dyn MetaStore>) -> Arc<RecordWriter> {
        Arc::new(RecordWriter {
            meta,
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
            let writes = pending.entry(instance_id.clone()).or_default();
            writes.latest = Some(record);
            !std::mem::replace(&mut writes.writing, true)
        };
        if start_writer {
            let writer = self.clone();
            tokio::spawn(async move { writer.run(instance_id).await });
        }
    }

    /// Write `instance_id`'s queued changes until none is left.
    async fn run(self: Arc<Self>, instance_id: String) {
        let key = instance_key(&instance_id);
        let mut backoff = Duration::from_millis(50);
        loop {
            let (next, version) = {
                let mut pending = self.pending.lock();
                let Some(writes) = pending.get_mut(&instance_id) else {
                    return;
                };
                match writes.latest.take() {
                    Some(next) => (next, writes.version),
                    None => {
                        writes.writing = false;
                        return;
                    }
                }
            };
            let result = match &next {
                Some(record) => yr_meta::put_if_version(
                    self.meta.as_ref(),
                    &key,
                    bytes::Bytes::from(record.encode_to_vec()),
                    version,
                )
                .await
                .map(|outcome| {
                    outcome
                        .map(|kv| kv.version)
                        .map_err(|current| current.map(|kv| kv.version))
                }),
                None => self.meta.delete(&key).await.map(|_| Ok(0)),
            };
            let retry_later = {
                let mut pending = self.pending.lock();
                let Some(writes) = pending.get_mut(&instance_id) else {
                    return;
                };
                match result {
                    Ok(Ok(new_version)) => {
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
                        false
                    }
                    Ok(Err(current)) => {
                        // This node is the record's only writer: adopt the stored version and
                        // write the newest record again, unless a newer one is already queued.
                        writes.version = current.unwrap_or(0);
                        writes.latest.get_or_insert(next);
                        false
                    }
                    Err(error) => {
                        tracing::warn!(instance = %instance_id, %error, "could not persist an instance record; retrying");
                        writes.latest.get_or_insert(next);
                        true
                    }
                }
            };
            if retry_later {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}
