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

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use prost::Message;
use yr_common::{Error, ErrorCode};
use yr_meta::{Compare, KeyValue, MetaError, MetaStore, TxnOp};
use yr_proto::v1 as pb;

use crate::fencing::{incarnation_key, incarnation_value, Fencing};

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

/// What one write did.
enum Written {
    /// Written; the record's new version (0: deleted).
    Done(u64),
    /// The node's live incarnation in the store is not the record's: not registered (yet, or
    /// again after the master declared it lost).
    NotLive,
    /// The record changed since this writer's last write; it is now `current`.
    Conflict(Option<KeyValue>),
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

/// What to do about a version conflict.
enum Resolution {
    /// This node's own earlier write, or the handing node's: write again over `version`.
    Adopt(u64),
    /// Someone else owns the record now (the master, or another incarnation of this node): fail
    /// the instance with this error.
    Fenced(Error),
    /// Another node runs the instance now (this node forwarded it): stop writing, quietly.
    Moved(String),
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

    /// Write `record` (`None`: delete it) if the stored record is still at `version` and the
    /// node's live incarnation is `incarnation`.
    async fn write_once(
        &self,
        key: &str,
        record: Option<&pb::InstanceRecord>,
        version: u64,
        incarnation: u64,
    ) -> Result<Written, MetaError> {
        // Fault tests: the meta store does not answer this write (it is retried with backoff).
        fail::fail_point!("proxy::record_write", |_| Err(MetaError::Unavailable(
            "the meta store did not answer (a fail point)".to_string()
        )));
        let fence_key = incarnation_key(self.fencing.node_id());
        let live = incarnation_value(incarnation);
        let operation = match record {
            Some(record) => TxnOp::Put {
                key: key.to_string(),
                value: Bytes::from(record.encode_to_vec()),
                lease: None,
            },
            None => TxnOp::Delete {
                key: key.to_string(),
            },
        };
        let response = self
            .meta
            .txn(
                vec![
                    Compare::Version {
                        key: key.to_string(),
                        version,
                    },
                    Compare::ValueEquals {
                        key: fence_key.clone(),
                        value: live.clone(),
                    },
                ],
                vec![operation],
                vec![
                    TxnOp::Get {
                        key: key.to_string(),
                    },
                    TxnOp::Get { key: fence_key },
                ],
            )
            .await?;
        let mut results = response.results.into_iter();
        if response.succeeded {
            let written = results.next().flatten();
            return Ok(Written::Done(match record {
                Some(_) => written.map(|kv| kv.version).ok_or_else(|| {
                    MetaError::Unavailable(format!(
                        "the store answered a put of {key:?} without the written record"
                    ))
                })?,
                None => 0,
            }));
        }
        let current = results.next().flatten();
        let fence = results.next().flatten();
        if fence.is_none_or(|kv| kv.value != live) {
            return Ok(Written::NotLive);
        }
        Ok(Written::Conflict(current))
    }

    /// Stop writing `instance_id`'s record; with `error`, tell the node to fail the instance.
    fn fence(&self, instance_id: &str, error: Option<Error>) {
        if let Some(writes) = self.pending.lock().get_mut(instance_id) {
            writes.fenced = true;
            writes.latest = None;
            writes.writing = false;
        }
        if let Some(error) = error {
            tracing::warn!(instance = %instance_id, %error, "instance fenced: its record is not this node's to write any more");
            self.fencing.instance_fenced(instance_id, error);
        }
    }
}

/// What to do about a version conflict on `instance_id`'s record, which is now `current`, for
/// incarnation `incarnation` of node `node_id` (handed the instance by `creator`, if any).
fn resolve(
    current: Option<&KeyValue>,
    instance_id: &str,
    node_id: &str,
    incarnation: u64,
    creator: &str,
) -> Resolution {
    let Some(current) = current else {
        // Deleted meanwhile (nobody else deletes records): write it again.
        return Resolution::Adopt(0);
    };
    let Ok(stored) = pb::InstanceRecord::decode(current.value.clone()) else {
        return Resolution::Adopt(current.version);
    };
    if stored.written_by_master {
        let reason = stored
            .error
            .map(|error| error.message)
            .unwrap_or_else(|| "the master marked it FATAL".to_string());
        return Resolution::Fenced(Error::new(
            ErrorCode::InstanceExited,
            format!("instance {instance_id} was fenced: {reason}"),
        ));
    }
    if stored.node_id == node_id {
        if stored.node_incarnation == incarnation {
            // This writer's own write, whose acknowledgement was lost.
            return Resolution::Adopt(current.version);
        }
        return Resolution::Fenced(Error::new(
            ErrorCode::InstanceExited,
            format!(
                "instance {instance_id} was fenced: its record was written by incarnation {} of node {node_id}, and this node is incarnation {incarnation}; create the instance again",
                stored.node_incarnation
            ),
        ));
    }
    if !creator.is_empty() && stored.node_id == creator {
        // The node that forwarded the instance here wrote it first.
        return Resolution::Adopt(current.version);
    }
    Resolution::Moved(stored.node_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;
    use yr_meta::{EmbeddedStore, WatchEvent};
    use yr_proto::v1::InstanceState as S;

    const NODE: &str = "b";
    const WAIT: Duration = Duration::from_secs(10);

    /// A writer of node `b` against a real in-memory meta store, with what it fences.
    struct Setup {
        store: Arc<EmbeddedStore>,
        fencing: Arc<Fencing>,
        writer: Arc<RecordWriter>,
        fenced: mpsc::UnboundedReceiver<(String, Error)>,
        nodes_fenced: mpsc::UnboundedReceiver<Error>,
    }

    fn setup(incarnation: u64) -> Setup {
        let store = Arc::new(EmbeddedStore::in_memory());
        let fencing = Fencing::with_incarnation(NODE.into(), store.clone(), incarnation);
        let (instance_sender, fenced) = mpsc::unbounded_channel();
        let (node_sender, nodes_fenced) = mpsc::unbounded_channel();
        fencing.set_handlers(crate::fencing::FenceHandlers {
            node: Box::new(move |error| {
                let _ = node_sender.send(error.clone());
            }),
            instance: Box::new(move |instance_id, error| {
                let _ = instance_sender.send((instance_id.to_string(), error));
            }),
        });
        let writer = RecordWriter::new(store.clone(), fencing.clone());
        Setup {
            store,
            fencing,
            writer,
            fenced,
            nodes_fenced,
        }
    }

    impl Setup {
        /// The master accepts a registration of `incarnation`.
        async fn register(&self, incarnation: u64) {
            self.store
                .put(&incarnation_key(NODE), incarnation_value(incarnation), None)
                .await
                .unwrap();
            self.fencing.registered(incarnation);
        }

        /// Someone other than the writer stores `record`.
        async fn put(&self, record: &pb::InstanceRecord) -> KeyValue {
            self.store
                .put(
                    &instance_key(&record.instance_id),
                    Bytes::from(record.encode_to_vec()),
                    None,
                )
                .await
                .unwrap()
        }

        async fn stored(&self, instance_id: &str) -> Option<KeyValue> {
            self.store.get(&instance_key(instance_id)).await.unwrap()
        }

        /// Waits (on a watch of the key, up to [`WAIT`]) until `holds` accepts the stored
        /// record of `instance_id`.
        async fn wait_for(
            &self,
            instance_id: &str,
            holds: impl Fn(Option<&pb::InstanceRecord>) -> bool,
        ) -> Option<pb::InstanceRecord> {
            let key = instance_key(instance_id);
            let revision = self.store.current_revision().await.unwrap();
            let mut events = self.store.watch_prefix(&key, revision).await.unwrap();
            let decode = |kv: &KeyValue| pb::InstanceRecord::decode(kv.value.clone()).unwrap();
            let mut current = self.stored(instance_id).await.map(|kv| decode(&kv));
            tokio::time::timeout(WAIT, async {
                while !holds(current.as_ref()) {
                    current = match events.recv().await.expect("the watch stays open") {
                        WatchEvent::Put(kv) => Some(decode(&kv)),
                        WatchEvent::Delete { .. } => None,
                    };
                }
            })
            .await
            .unwrap_or_else(|_| panic!("the record never held; it is {current:?}"));
            current
        }

        /// Whether a writer task still runs for `instance_id`.
        fn writing(&self, instance_id: &str) -> bool {
            self.writer
                .pending
                .lock()
                .get(instance_id)
                .is_some_and(|writes| writes.writing)
        }
    }

    fn record(instance_id: &str, state: S) -> pb::InstanceRecord {
        pb::InstanceRecord {
            instance_id: instance_id.into(),
            node_id: NODE.into(),
            state: state as i32,
            ..Default::default()
        }
    }

    fn in_state(state: S) -> impl Fn(Option<&pb::InstanceRecord>) -> bool {
        move |record| record.is_some_and(|record| record.state == state as i32)
    }

    async fn fenced(setup: &mut Setup) -> (String, Error) {
        tokio::time::timeout(WAIT, setup.fenced.recv())
            .await
            .expect("the writer reports the fenced instance")
            .unwrap()
    }

    #[tokio::test]
    async fn records_carry_the_incarnation_and_wait_until_it_is_registered() {
        let setup = setup(5);
        setup.writer.write(record("i", S::Running));
        // The master has no live incarnation for the node yet: the compare refuses the write.
        assert!(setup.stored("i").await.is_none());
        setup.register(5).await;
        let stored = setup.wait_for("i", in_state(S::Running)).await.unwrap();
        assert_eq!(stored.node_incarnation, 5);
        assert!(!stored.written_by_master);
    }

    #[tokio::test]
    async fn a_lost_acknowledgement_is_written_again_over_the_adopted_version() {
        let mut setup = setup(5);
        setup.register(5).await;
        // The writer's own earlier write landed, but it never learnt its version.
        let mut earlier = record("i", S::Creating);
        earlier.node_incarnation = 5;
        setup.put(&earlier).await;
        setup.writer.write(record("i", S::Running));
        setup.wait_for("i", in_state(S::Running)).await;
        assert_eq!(setup.stored("i").await.unwrap().version, 2);
        assert!(setup.fenced.try_recv().is_err(), "nothing is fenced");
    }

    #[tokio::test]
    async fn a_record_the_master_wrote_is_never_written_over() {
        let mut setup = setup(5);
        setup.register(5).await;
        setup.writer.write(record("i", S::Running));
        let running = setup.wait_for("i", in_state(S::Running)).await.unwrap();
        // The master marks it FATAL (its live-incarnation delete is checked elsewhere: this is
        // the second line, the version compare).
        let mut fatal = running;
        fatal.state = S::Fatal as i32;
        fatal.written_by_master = true;
        fatal.error = Some(pb::ErrorInfo {
            code: ErrorCode::InstanceExited.number(),
            module: 0,
            message: "instance i exited: node b was lost".into(),
        });
        let master_write = setup.put(&fatal).await;

        let mut later = record("i", S::Running);
        later.restarts = 1;
        setup.writer.write(later.clone());
        let (instance_id, error) = fenced(&mut setup).await;
        assert_eq!(instance_id, "i");
        assert_eq!(error.code(), ErrorCode::InstanceExited);
        assert!(
            error.message().contains("node b was lost"),
            "{}",
            error.message()
        );
        assert_eq!(setup.stored("i").await.unwrap(), master_write);
        assert_eq!(setup.fencing.instances_fenced(), 1);

        // Later changes, and the deletion when the instance leaves the node, are dropped.
        setup.writer.write(later);
        assert!(!setup.writing("i"));
        setup.writer.delete("i");
        assert!(setup.writer.pending.lock().get("i").is_none());
        assert_eq!(setup.stored("i").await.unwrap(), master_write);
    }

    #[tokio::test]
    async fn a_record_of_another_incarnation_of_this_node_is_never_written_over() {
        let mut setup = setup(5);
        setup.register(5).await;
        let mut other = record("i", S::Running);
        other.node_incarnation = 4;
        let stored = setup.put(&other).await;
        setup.writer.write(record("i", S::Running));
        let (_, error) = fenced(&mut setup).await;
        assert_eq!(error.code(), ErrorCode::InstanceExited);
        assert!(
            error.message().contains("incarnation 4"),
            "{}",
            error.message()
        );
        assert_eq!(setup.stored("i").await.unwrap(), stored);
    }

    #[tokio::test]
    async fn a_node_declared_lost_writes_nothing_and_comes_back_as_a_new_incarnation() {
        let mut setup = setup(5);
        setup.register(5).await;
        setup.writer.write(record("old", S::Running));
        let running = setup.wait_for("old", in_state(S::Running)).await;
        // The master declares incarnation 5 lost: its live incarnation goes.
        setup.store.delete(&incarnation_key(NODE)).await.unwrap();
        setup.writer.write(record("old", S::SubHealth));
        // The node learns it (its registration is refused), fails its instances and becomes a
        // new incarnation; the queued change never lands, and the instance is fenced.
        let next = setup.fencing.declared_lost(5);
        let error = setup.nodes_fenced.recv().await.unwrap();
        assert_eq!(error.code(), ErrorCode::InstanceExited);
        let (instance_id, _) = fenced(&mut setup).await;
        assert_eq!(instance_id, "old");
        assert_eq!(
            setup
                .stored("old")
                .await
                .map(|kv| pb::InstanceRecord::decode(kv.value).unwrap()),
            running
        );
        // As the new incarnation, its new instances are recorded again.
        setup.register(next).await;
        setup.writer.write(record("new", S::Running));
        let new = setup.wait_for("new", in_state(S::Running)).await.unwrap();
        assert_eq!(new.node_incarnation, next);
        setup.writer.write(record("old", S::Fatal));
        assert!(!setup.writing("old"), "the old instance stays fenced");
    }

    #[tokio::test]
    async fn the_record_of_the_node_that_forwarded_the_instance_is_written_over() {
        let mut setup = setup(5);
        setup.register(5).await;
        let mut creators = record("i", S::Scheduling);
        creators.node_id = "a".into();
        creators.node_incarnation = 9;
        setup.put(&creators).await;
        let mut here = record("i", S::Running);
        here.creator_node_id = "a".into();
        setup.writer.write(here);
        let stored = setup.wait_for("i", in_state(S::Running)).await.unwrap();
        assert_eq!(stored.node_id, NODE);
        assert!(setup.fenced.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_record_another_node_took_over_is_left_to_it_quietly() {
        let mut setup = setup(5);
        setup.register(5).await;
        setup.writer.write(record("i", S::Scheduling));
        setup.wait_for("i", in_state(S::Scheduling)).await;
        // This node forwarded the instance to node c, which writes it now.
        let mut theirs = record("i", S::Running);
        theirs.node_id = "c".into();
        theirs.creator_node_id = NODE.into();
        let stored = setup.put(&theirs).await;
        setup.writer.write(record("i", S::Scheduling));
        tokio::time::timeout(WAIT, async {
            while setup.writing("i") {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the writer stops");
        assert_eq!(setup.stored("i").await.unwrap(), stored);
        assert!(
            setup.fenced.try_recv().is_err(),
            "the node is not told to fail it"
        );
    }
}
