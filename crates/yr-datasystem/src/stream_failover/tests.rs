use super::*;
use prost::Message;
use yr_datasystem_core::kv::KvStore;
use yr_datasystem_core::stream::{SubscriptionConfig, SubscriptionType};
use yr_meta::EmbeddedStore;

async fn record_node(meta: &dyn MetaStore, id: &str, address: &str, state: &str) {
    let info = yr_proto::v1::NodeInfo {
        node_id: id.into(),
        address: address.into(),
        state: state.into(),
        ..Default::default()
    };
    meta.put(
        &format!("/yr/node/{id}"),
        Bytes::from(info.encode_to_vec()),
        None,
    )
    .await
    .unwrap();
}

fn update_from(home: &str, first_id: u64, values: &[&str]) -> pb::StreamReplicateRequest {
    let update = ReplicaUpdate {
        low: 1,
        first_id,
        elements: values.iter().map(|v| Bytes::from(v.to_string())).collect(),
        subscriptions: vec![("s".into(), SubscriptionType::Stream, 1)],
        ..ReplicaUpdate::default()
    };
    replica_update_to_proto("x", home, update)
}

/// The failover of node `node` at `address` over `store`, once its cluster has read the
/// node records in `meta`.
async fn failover_on(
    meta: &Arc<dyn MetaStore>,
    node: &str,
    address: &str,
    store: &StreamStore,
) -> Arc<Failover> {
    let cluster = KvCluster::new(KvStore::new(), node.into(), meta.clone());
    cluster.start(&tokio::runtime::Handle::current());
    let mut changes = cluster.watch();
    changes.wait_for(|view| view.epoch > 0).await.unwrap();
    Failover::new(cluster, meta.clone(), store.clone(), address.into())
}

/// Node a, the only node, with its stream service: the meta store, the streams, the failover
/// and the service.
async fn node_a_alone() -> (
    Arc<dyn MetaStore>,
    StreamStore,
    Arc<Failover>,
    crate::stream_service::StreamService,
) {
    use crate::stream_service::{Placement, StreamService};

    let meta: Arc<dyn MetaStore> = Arc::new(EmbeddedStore::in_memory());
    record_node(meta.as_ref(), "a", "a:1", "ready").await;
    let store = StreamStore::new();
    let failover = failover_on(&meta, "a", "a:1", &store).await;
    let placement = Placement::new(meta.clone(), "a:1".into(), Some(failover.clone()));
    let service = StreamService::new(store.clone(), Some(Arc::new(placement)));
    (meta, store, failover, service)
}

/// Node b backs up stream x of node a; a is lost: b takes the home over with a
/// compare-and-swap, refuses a's later updates (fenced), and a stale take-over with the
/// old record's revision does not win the record back.
#[tokio::test]
async fn the_backup_takes_a_lost_home_over_and_fences_the_old_one() {
    let meta: Arc<dyn MetaStore> = Arc::new(EmbeddedStore::in_memory());
    record_node(meta.as_ref(), "a", "a:1", "lost").await;
    record_node(meta.as_ref(), "b", "b:1", "ready").await;
    let store = StreamStore::new();
    let failover = failover_on(&meta, "b", "b:1", &store).await;
    assert!(failover.is_lost("a:1"));
    assert_eq!(failover.successor("x").unwrap().address, "b:1");

    assert_eq!(
        failover.receive(update_from("a:1", 1, &["e1", "e2"])),
        Ok(None)
    );
    let record = meta
        .put(&home_key("x"), Bytes::from_static(b"a:1"), None)
        .await
        .unwrap();
    assert_eq!(failover.take_over("x", &record).await.unwrap(), "b:1");
    let current = meta.get(&home_key("x")).await.unwrap().unwrap();
    assert_eq!(current.value, Bytes::from_static(b"b:1"));

    // The consumer resumes here and gets what the lost home acknowledged.
    let subscription = SubscriptionConfig::new("s", SubscriptionType::Stream);
    store.resume_consumer("x", 42, &subscription, 0).unwrap();
    let got = store.receive("x", 42, 0, Duration::ZERO).unwrap();
    assert_eq!(got.iter().map(|e| e.id).collect::<Vec<_>>(), [1, 2]);

    // The old home comes back: its update is refused with the new home's address.
    assert_eq!(
        failover.receive(update_from("a:1", 3, &["e3"])),
        Ok(Some("b:1".into()))
    );
    // A take-over from the stale record loses the compare-and-swap.
    assert_eq!(failover.take_over("x", &record).await.unwrap(), "b:1");
}

/// Node a was stream x's home and was taken over by b while it was cut off: at the ring
/// change it forgets x and remembers that x went to b, so a client that still calls a is
/// sent to b without a meta store read; once a is x's home again, that is forgotten.
#[tokio::test]
async fn an_old_home_remembers_where_its_taken_over_stream_went() {
    let meta: Arc<dyn MetaStore> = Arc::new(EmbeddedStore::in_memory());
    record_node(meta.as_ref(), "a", "a:1", "ready").await;
    record_node(meta.as_ref(), "b", "b:1", "ready").await;
    let store = StreamStore::new();
    let subscription = SubscriptionConfig::new("s", SubscriptionType::Stream);
    store.create_consumer("x", &subscription).unwrap();
    let failover = failover_on(&meta, "a", "a:1", &store).await;
    meta.put(&home_key("x"), Bytes::from_static(b"b:1"), None)
        .await
        .unwrap();
    assert_eq!(failover.moved_home("x"), None);
    failover.ring_changed().await;
    assert!(!store.contains("x"), "the old home forgot the stream");
    assert_eq!(failover.moved_home("x").as_deref(), Some("b:1"));
    failover.homed_here("x");
    assert_eq!(failover.moved_home("x"), None);
}

/// Node a is stream x's home, and a consumer resumes there. At that moment a concurrent
/// update learns from the backup that b took x over (fail point `datasystem::stream_claimed`
/// starts it and gives it time to finish). The forget waits for the resume, which runs on the
/// stream a still holds; the stream is then forgotten, not brought back empty, and the
/// consumer's next receive is sent to b.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_at_an_old_home_that_learns_it_was_taken_over_meanwhile_sends_the_client_on() {
    let (meta, store, failover, service) = node_a_alone().await;
    let subscription = SubscriptionConfig::new("s", SubscriptionType::Stream);
    let (consumer, home) = service
        .create_consumer("x".into(), subscription.clone(), 0, 0)
        .await
        .unwrap();
    assert_eq!(home, None, "a claimed x");

    // b took x over while a was cut off.
    meta.put(&home_key("x"), Bytes::from_static(b"b:1"), None)
        .await
        .unwrap();
    let learnt: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>> = Arc::default();
    let once = std::sync::atomic::AtomicBool::new(false);
    let (runtime, concurrent, started) = (
        tokio::runtime::Handle::current(),
        failover.clone(),
        learnt.clone(),
    );
    fail::cfg_callback("datasystem::stream_claimed", move || {
        if once.swap(true, Ordering::SeqCst) {
            return;
        }
        let (done, finished) = std::sync::mpsc::channel();
        let failover = concurrent.clone();
        *started.lock() = Some(runtime.spawn(async move {
            failover.learnt_taken_over("x", "b:1").await;
            let _ = done.send(());
        }));
        // Room for the forget to run first, if nothing held it back.
        let _ = finished.recv_timeout(Duration::from_millis(500));
    })
    .unwrap();
    let resumed = service
        .create_consumer("x".into(), subscription.clone(), consumer, 0)
        .await;
    fail::remove("datasystem::stream_claimed");
    let forget = learnt.lock().take().expect("the fail point ran");
    forget.await.unwrap();

    // The resume ran on the stream a held (or was sent to b), and a no longer has x.
    match resumed {
        Ok((id, None)) => assert_eq!(id, consumer),
        Ok((_, Some(home))) => assert_eq!(home, "b:1"),
        Err(error) => panic!("the resume failed: {error}"),
    }
    assert!(!store.contains("x"), "a brought the taken-over stream back");
    let (elements, home) = service
        .receive("x".into(), consumer, 1, Duration::ZERO)
        .await
        .unwrap();
    assert!(elements.is_empty());
    assert_eq!(home.as_deref(), Some("b:1"), "the consumer is sent to b");
    let (_, home) = service
        .create_producer("x".into(), Default::default(), 0)
        .await
        .unwrap();
    assert_eq!(home.as_deref(), Some("b:1"), "a new producer is sent to b");
}

/// Node a was stream x's home and forgot it when it learnt that b took it over. A producer
/// and a consumer that still close at a are sent to b (where they resume and close), not told
/// 4298: the chaos soak found a consumer whose elements all arrived failing its close.
#[tokio::test]
async fn a_close_at_an_old_home_that_forgot_the_stream_sends_the_client_to_the_new_home() {
    let (meta, _, failover, service) = node_a_alone().await;
    let subscription = SubscriptionConfig::new("s", SubscriptionType::Stream);
    let (consumer, _) = service
        .create_consumer("x".into(), subscription, 0, 0)
        .await
        .unwrap();
    let (producer, _) = service
        .create_producer("x".into(), Default::default(), 0)
        .await
        .unwrap();
    meta.put(&home_key("x"), Bytes::from_static(b"b:1"), None)
        .await
        .unwrap();
    failover.learnt_taken_over("x", "b:1").await;

    for (id, is_consumer) in [(consumer, true), (producer, false)] {
        assert_eq!(
            service.close("x".into(), id, is_consumer).await.unwrap(),
            Some("b:1".to_string()),
            "the close of {id} is sent to b"
        );
    }
}
