//! The instance manager against an in-memory meta store.

use super::*;
use crate::test_store::FakeStore;
use std::time::Duration;

fn record(id: &str, node: &str, state: InstanceState) -> Bytes {
    let mut record = InstanceRecord {
        instance_id: id.to_string(),
        function: "f".to_string(),
        node_id: node.to_string(),
        ..Default::default()
    };
    record.set_state(state);
    Bytes::from(record.encode_to_vec())
}

async fn read(store: &FakeStore, id: &str) -> InstanceRecord {
    let kv = store.get(&instance_key(id)).await.unwrap().unwrap();
    InstanceRecord::decode(kv.value).unwrap()
}

#[tokio::test]
async fn lost_node_instances_go_fatal_and_others_are_untouched() {
    let store = Arc::new(FakeStore::default());
    for (id, node, state) in [
        ("i1", "lost", InstanceState::Running),
        ("i2", "lost", InstanceState::Creating),
        ("i3", "lost", InstanceState::Exited),
        ("i4", "other", InstanceState::Running),
    ] {
        store
            .put(&instance_key(id), record(id, node, state), None)
            .await
            .unwrap();
    }
    let manager = InstanceManager::new(store.clone());
    manager.sync().await.unwrap();
    assert_eq!(
        manager
            .fail_instances_of_lost_node("lost", &|| None)
            .await
            .unwrap(),
        2
    );
    for id in ["i1", "i2"] {
        let record = read(&store, id).await;
        assert_eq!(record.state(), InstanceState::Fatal);
        assert!(record.written_by_master, "the node never writes over it");
        let error = record.error.unwrap();
        assert_eq!(error.code, ErrorCode::InstanceExited.number());
        assert_eq!(error.module, ModuleCode::Core.number());
        assert!(
            error.message.contains("node lost was lost"),
            "{}",
            error.message
        );
    }
    assert_eq!(read(&store, "i3").await.state(), InstanceState::Exited);
    assert_eq!(read(&store, "i4").await.state(), InstanceState::Running);
    let counts = manager.count_by_state();
    assert_eq!(counts[InstanceState::Fatal as usize], 2);
    assert_eq!(manager.marked_fatal_total(), 2);
    // A second pass finds nothing left to do.
    assert_eq!(
        manager
            .fail_instances_of_lost_node("lost", &|| None)
            .await
            .unwrap(),
        0
    );
}

#[tokio::test]
async fn an_undecodable_record_is_skipped_and_the_rest_are_kept() {
    let store = Arc::new(FakeStore::default());
    store
        .put(
            &instance_key("bad"),
            Bytes::from_static(b"\xff\xff\xff"),
            None,
        )
        .await
        .unwrap();
    store
        .put(
            &instance_key("good"),
            record("good", "lost", InstanceState::Running),
            None,
        )
        .await
        .unwrap();
    let manager = InstanceManager::new(store.clone());
    manager.sync().await.unwrap();
    let ids: Vec<String> = manager
        .summaries()
        .into_iter()
        .map(|s| s.instance_id)
        .collect();
    assert_eq!(ids, vec!["good".to_string()]);
    assert_eq!(
        manager
            .fail_instances_of_lost_node("lost", &|| None)
            .await
            .unwrap(),
        1
    );
}

#[tokio::test]
async fn records_of_the_incarnation_that_came_back_are_left_alone() {
    let store = Arc::new(FakeStore::default());
    for (id, incarnation) in [("old", 7), ("new", 8)] {
        let mut record = InstanceRecord {
            instance_id: id.to_string(),
            node_id: "a".to_string(),
            node_incarnation: incarnation,
            ..Default::default()
        };
        record.set_state(InstanceState::Running);
        store
            .put(&instance_key(id), Bytes::from(record.encode_to_vec()), None)
            .await
            .unwrap();
    }
    let manager = InstanceManager::new(store.clone());
    // Node a was lost as incarnation 7 and is alive again as 8.
    assert_eq!(
        manager
            .fail_instances_of_lost_node("a", &|| Some(8))
            .await
            .unwrap(),
        1
    );
    assert_eq!(read(&store, "old").await.state(), InstanceState::Fatal);
    assert_eq!(read(&store, "new").await.state(), InstanceState::Running);
}

#[tokio::test]
async fn a_record_moved_elsewhere_concurrently_is_not_clobbered() {
    let store = Arc::new(FakeStore::default());
    let key = instance_key("i1");
    let first = store
        .put(&key, record("i1", "lost", InstanceState::Running), None)
        .await
        .unwrap();
    let manager = InstanceManager::new(store.clone());
    // The owner moved the instance on between the master's read and its write.
    store
        .put(&key, record("i1", "other", InstanceState::Running), None)
        .await
        .unwrap();
    let decoded = InstanceRecord::decode(first.value.clone()).unwrap();
    let settled = manager
        .settle(&key, decoded, first.version, "lost", &|| None, &|_, _| {
            Err("no node".into())
        })
        .await
        .unwrap();
    assert!(settled.is_none());
    assert_eq!(read(&store, "i1").await.node_id, "other");
}

#[tokio::test]
async fn the_watch_keeps_the_view_current() {
    let store = Arc::new(FakeStore::default());
    let manager = Arc::new(InstanceManager::new(store.clone()));
    let revision = manager.sync().await.unwrap();
    let (stop_tx, stop_rx) = watch::channel(false);
    let follower = tokio::spawn(manager.clone().follow(revision, stop_rx));
    store
        .put(
            &instance_key("a"),
            record("a", "n", InstanceState::Running),
            None,
        )
        .await
        .unwrap();
    store
        .put(
            &instance_key("b"),
            record("b", "n", InstanceState::Creating),
            None,
        )
        .await
        .unwrap();
    store.delete(&instance_key("b")).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let summaries = manager.summaries();
        if summaries.len() == 1 && summaries[0].instance_id == "a" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{summaries:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        manager.function_names().into_iter().collect::<Vec<_>>(),
        vec!["f"]
    );
    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), follower)
        .await
        .unwrap()
        .unwrap();
}

fn recoverable(id: &str, node: &str, retries: u32, restarts: u32, creator: &str) -> Bytes {
    let options = InvokeOptions {
        recover_retry_times: retries,
        ..Default::default()
    };
    let mut record = InstanceRecord {
        instance_id: id.to_string(),
        function: "f".to_string(),
        node_id: node.to_string(),
        node_incarnation: 7,
        runtime_address: "unix:/gone".to_string(),
        restarts,
        creator_node_id: creator.to_string(),
        options: rmp_serde::to_vec_named(&options).unwrap().into(),
        ..Default::default()
    };
    record.set_state(InstanceState::Running);
    Bytes::from(record.encode_to_vec())
}

#[tokio::test]
async fn instances_with_restarts_left_are_rescheduled_and_the_others_go_fatal() {
    let store = Arc::new(FakeStore::default());
    for (id, value) in [
        // Restarts left, created by a node that outlives the lost one.
        ("again", recoverable("again", "lost", 2, 1, "creator")),
        // No restarts left.
        ("spent", recoverable("spent", "lost", 1, 1, "creator")),
        // Attached, created on the lost node itself: its owner went with it.
        ("orphan", recoverable("orphan", "lost", 3, 0, "")),
        // Restarts left, but no node has room.
        ("nowhere", recoverable("nowhere", "lost", 3, 0, "creator")),
    ] {
        store.put(&instance_key(id), value, None).await.unwrap();
    }
    let manager = InstanceManager::new(store.clone());
    manager.sync().await.unwrap();
    let recovered = manager
        .recover_instances_of_lost_node("lost", &|| None, &|record, _| {
            if record.instance_id == "nowhere" {
                Err("no node has room".into())
            } else {
                Ok(("fresh".into(), "127.0.0.1:9".into()))
            }
        })
        .await
        .unwrap();
    assert_eq!(recovered.fatal, 3);
    assert_eq!(recovered.rescheduled.len(), 1);
    let moved = &recovered.rescheduled[0];
    assert_eq!(
        (moved.node_id.as_str(), moved.address.as_str()),
        ("fresh", "127.0.0.1:9")
    );
    let stored = read(&store, "again").await;
    assert_eq!(stored.state(), InstanceState::Scheduling);
    assert!(stored.written_by_master);
    assert_eq!(stored.rescheduled_to, "fresh");
    assert_eq!(stored.node_id, "fresh");
    assert_eq!(stored.node_incarnation, 0);
    assert_eq!(stored.restarts, 2, "the move counts as a restart");
    assert!(stored.runtime_address.is_empty());
    assert_eq!(
        manager.pending_reschedules(),
        vec![("again".to_string(), "fresh".to_string())]
    );
    for (id, why) in [
        ("spent", "no recover_retry_times left"),
        ("orphan", "no recover_retry_times left"),
        ("nowhere", "no node has room"),
    ] {
        let stored = read(&store, id).await;
        assert_eq!(stored.state(), InstanceState::Fatal, "{id}");
        let error = stored.error.unwrap();
        assert_eq!(error.code, ErrorCode::InstanceExited.number());
        assert!(error.message.contains(why), "{id}: {}", error.message);
    }

    // The chosen node refuses the create: the master's SCHEDULING becomes FATAL; a record the
    // node took over is left alone.
    assert!(manager
        .fail_reschedule("again", "fresh", "refused")
        .await
        .unwrap());
    let stored = read(&store, "again").await;
    assert_eq!(stored.state(), InstanceState::Fatal);
    assert!(stored.error.unwrap().message.contains("refused"));
    assert!(!manager
        .fail_reschedule("again", "fresh", "refused")
        .await
        .unwrap());
}
