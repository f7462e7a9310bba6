//! Unit tests of the record writer against an embedded meta store: incarnations, lost
//! acknowledgements, and which stored records are written over.

use super::*;
use bytes::Bytes;
use prost::Message;
use yr_meta::KeyValue;

use crate::fencing::{incarnation_key, incarnation_value};
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
    // The fencing handlers are synchronous callbacks; a test sees at most a few fence events,
    // so these test-only channels need no bound.
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
        ..Default::default()
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
