//! Unit tests of the cluster: liveness, scheduling, registration and fencing of lost nodes.

use super::*;
use crate::test_store::FakeStore;
use yr_common::ManualClock;
use yr_common::ModuleCode;
use yr_common::{Error, ErrorCode};
use yr_meta::Compare;
use yr_proto::v1::{InstanceRecord, InstanceState, ResourceDelta, Resources, ScheduleRequest};

fn heartbeat(cluster: &Cluster, id: &str) {
    cluster.heartbeat(&NodeUpdate {
        node_id: id.into(),
        delta: None,
        beat: 0,
    });
}

#[tokio::test]
async fn a_node_is_lost_exactly_when_its_heartbeats_stop_for_the_node_timeout() {
    let store = Arc::new(FakeStore::default());
    let clock = ManualClock::new();
    let timeout = Duration::from_secs(5);
    let (cluster, _) = Cluster::open_with_clock(store, timeout, clock.clone())
        .await
        .unwrap();
    cluster.register(Some(node("a", 1000))).await.unwrap();
    cluster.register(Some(node("b", 1000))).await.unwrap();
    // Heartbeats within the timeout keep a node alive however long it lives; b, which
    // never heartbeats, is lost on the first pass past its timeout.
    let mut lost = Vec::new();
    for _ in 0..10 {
        clock.advance(timeout - Duration::from_millis(1));
        heartbeat(&cluster, "a");
        lost.push(cluster.check_liveness().await);
    }
    assert!(lost[0].is_empty());
    assert_eq!(lost[1], vec!["b".to_string()]);
    assert!(lost[2..].iter().all(Vec::is_empty), "{lost:?}");
    assert_eq!(cluster.node_counts(), [1, 0, 1]);
    // a stops now: alive until the last instant of its timeout, lost at it.
    clock.advance(timeout - Duration::from_millis(1));
    assert!(cluster.check_liveness().await.is_empty());
    clock.advance(Duration::from_millis(1));
    assert_eq!(cluster.check_liveness().await, vec!["a".to_string()]);
    assert_eq!(cluster.node_counts(), [0, 0, 2]);
}

fn node(id: &str, cpu: u64) -> NodeInfo {
    NodeInfo {
        node_id: id.to_string(),
        address: format!("127.0.0.1:{}", 1000 + cpu / 1000),
        capacity: Some(Resources {
            cpu_millicores: cpu,
            memory_mb: 1024,
            custom: Default::default(),
        }),
        ..Default::default()
    }
}

fn request(cpu: u64) -> ScheduleRequest {
    ScheduleRequest {
        request: Some(Resources {
            cpu_millicores: cpu,
            memory_mb: 0,
            custom: Default::default(),
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn tentative_reservations_spread_concurrent_schedules() {
    let store = Arc::new(FakeStore::default());
    let (cluster, _) = Cluster::open(store, Duration::from_secs(5)).await.unwrap();
    cluster.register(Some(node("a", 4000))).await.unwrap();
    cluster.register(Some(node("b", 3000))).await.unwrap();
    let picks: Vec<String> = (0..4)
        .map(|_| cluster.schedule(&request(1000)).node_id)
        .collect();
    // a: 4000 → 3000 (tie with b, a is lower) → ... spread over both.
    assert_eq!(picks, vec!["a", "a", "b", "a"]);
    // The nodes report what they took; the reservations are replaced.
    for (id, taken) in [("a", 3000), ("b", 1000)] {
        cluster.heartbeat(&NodeUpdate {
            node_id: id.into(),
            delta: Some(ResourceDelta {
                cpu_millicores: -taken,
                memory_mb: 0,
                custom: Default::default(),
            }),
            beat: 0,
        });
    }
    let infos = cluster.node_infos();
    assert_eq!(infos[0].allocatable.as_ref().unwrap().cpu_millicores, 1000);
    assert_eq!(infos[1].allocatable.as_ref().unwrap().cpu_millicores, 2000);
}

#[tokio::test]
async fn invalid_registrations_are_refused() {
    let store = Arc::new(FakeStore::default());
    let (cluster, _) = Cluster::open(store, Duration::from_secs(5)).await.unwrap();
    let err: Error = cluster.register(None).await.unwrap_err().into();
    assert_eq!(err.code(), ErrorCode::ParamInvalid);
    let mut no_address = node("a", 1000);
    no_address.address.clear();
    let err: Error = cluster.register(Some(no_address)).await.unwrap_err().into();
    assert_eq!(err.code(), ErrorCode::ParamInvalid);
    assert_eq!(err.module_code(), ModuleCode::Core);
}

#[tokio::test]
async fn lost_node_is_persisted_and_its_instances_fail() {
    let store = Arc::new(FakeStore::default());
    let clock = ManualClock::new();
    let (cluster, _) =
        Cluster::open_with_clock(store.clone(), Duration::from_millis(50), clock.clone())
            .await
            .unwrap();
    cluster.register(Some(node("a", 1000))).await.unwrap();
    let mut record = InstanceRecord {
        instance_id: "i".into(),
        node_id: "a".into(),
        ..Default::default()
    };
    record.set_state(InstanceState::Running);
    store
        .put("/yr/instance/i", Bytes::from(record.encode_to_vec()), None)
        .await
        .unwrap();
    clock.advance(Duration::from_millis(50));
    assert_eq!(cluster.check_liveness().await, vec!["a".to_string()]);
    let kv = store.get(&node_key("a")).await.unwrap().unwrap();
    assert_eq!(NodeInfo::decode(kv.value).unwrap().state, "lost");
    let kv = store.get("/yr/instance/i").await.unwrap().unwrap();
    assert_eq!(
        InstanceRecord::decode(kv.value).unwrap().state(),
        InstanceState::Fatal
    );
    let response = cluster.schedule(&request(100));
    assert_eq!(
        response.error.unwrap().code,
        ErrorCode::ResourceNotEnough.number()
    );
    // Reopening keeps the node lost and the cluster id.
    let id = cluster.cluster_id().to_string();
    let (reopened, _) = Cluster::open(store, Duration::from_millis(50))
        .await
        .unwrap();
    assert_eq!(reopened.cluster_id(), id);
    assert_eq!(reopened.node_counts(), [0, 0, 1]);
}

/// A record write as a node makes it: only while the record is still at `version` and
/// the node's live incarnation is `incarnation`.
async fn node_write(
    store: &FakeStore,
    record: &InstanceRecord,
    version: u64,
    incarnation: u64,
) -> bool {
    store
        .txn(
            vec![
                Compare::Version {
                    key: "/yr/instance/i".into(),
                    version,
                },
                Compare::ValueEquals {
                    key: incarnation_key(&record.node_id),
                    value: Bytes::from(incarnation.to_string()),
                },
            ],
            vec![TxnOp::Put {
                key: "/yr/instance/i".into(),
                value: Bytes::from(record.encode_to_vec()),
                lease: None,
            }],
            Vec::new(),
        )
        .await
        .unwrap()
        .succeeded
}

#[tokio::test]
async fn a_lost_incarnation_is_fenced_and_comes_back_only_as_a_new_one() {
    let store = Arc::new(FakeStore::default());
    let (cluster, _) = Cluster::open(store.clone(), Duration::from_millis(50))
        .await
        .unwrap();
    let mut first = node("a", 1000);
    first.incarnation = 7;
    let response = cluster.register(Some(first.clone())).await.unwrap();
    assert!(!response.incarnation_lost);
    let live = store.get(&incarnation_key("a")).await.unwrap().unwrap();
    assert_eq!(live.value, Bytes::from("7"));

    // Incarnation 7 writes its instance's record while it is alive.
    let mut record = InstanceRecord {
        instance_id: "i".into(),
        node_id: "a".into(),
        node_incarnation: 7,
        ..Default::default()
    };
    record.set_state(InstanceState::Running);
    assert!(node_write(&store, &record, 0, 7).await);

    // It stops heartbeating: lost, its live incarnation is gone, its record FATAL.
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert_eq!(cluster.check_liveness().await, vec!["a".to_string()]);
    assert!(store.get(&incarnation_key("a")).await.unwrap().is_none());
    let fatal = store.get("/yr/instance/i").await.unwrap().unwrap();
    let stored = InstanceRecord::decode(fatal.value.clone()).unwrap();
    assert_eq!(stored.state(), InstanceState::Fatal);
    assert!(stored.written_by_master);

    // Its writes are refused by the store's compare, even at the current version.
    assert!(!node_write(&store, &record, fatal.version, 7).await);
    // It comes back: its heartbeat is told to register again, and the registration of the
    // lost incarnation is refused without changing anything.
    assert_eq!(
        cluster.heartbeat(&NodeUpdate {
            node_id: "a".into(),
            delta: None,
            beat: 0,
        }),
        HeartbeatOutcome::Reregister
    );
    let refused = cluster.register(Some(first.clone())).await.unwrap();
    assert!(refused.incarnation_lost);
    assert_eq!(cluster.node_counts(), [0, 0, 1]);
    assert!(store.get(&incarnation_key("a")).await.unwrap().is_none());
    assert_eq!(
        cluster
            .counters()
            .lost_incarnations_refused
            .load(Ordering::Relaxed),
        1
    );

    // As a new incarnation it is alive again; the master's FATAL stands.
    let mut second = first;
    second.incarnation = 8;
    assert!(
        !cluster
            .register(Some(second))
            .await
            .unwrap()
            .incarnation_lost
    );
    assert_eq!(cluster.node_counts(), [1, 0, 0]);
    assert_eq!(cluster.node_infos()[0].incarnation, 8);
    let live = store.get(&incarnation_key("a")).await.unwrap().unwrap();
    assert_eq!(live.value, Bytes::from("8"));
    let after = store.get("/yr/instance/i").await.unwrap().unwrap();
    assert_eq!(after, fatal, "the FATAL record is untouched");
    // The old incarnation still cannot write.
    assert!(!node_write(&store, &record, fatal.version, 7).await);
}

#[tokio::test]
async fn a_node_restarted_within_its_timeout_settles_its_old_incarnations_instances() {
    let store = Arc::new(FakeStore::default());
    let (cluster, _) = Cluster::open(store.clone(), Duration::from_secs(60))
        .await
        .unwrap();
    let mut first = node("a", 1000);
    first.incarnation = 7;
    cluster.register(Some(first.clone())).await.unwrap();
    let record = |id: &str, incarnation: u64| {
        let mut record = InstanceRecord {
            instance_id: id.into(),
            node_id: "a".into(),
            node_incarnation: incarnation,
            ..Default::default()
        };
        record.set_state(InstanceState::Running);
        record
    };
    let old = record("i", 7);
    store
        .put("/yr/instance/i", Bytes::from(old.encode_to_vec()), None)
        .await
        .unwrap();

    // The node's process restarts at once, as incarnation 8, long before its timeout.
    let mut second = first;
    second.incarnation = 8;
    assert!(
        !cluster
            .register(Some(second))
            .await
            .unwrap()
            .incarnation_lost
    );
    // The old incarnation's instance is settled (no restarts: FATAL, by the master).
    let settled = store.get("/yr/instance/i").await.unwrap().unwrap();
    let settled = InstanceRecord::decode(settled.value).unwrap();
    assert_eq!(settled.state(), InstanceState::Fatal);
    assert!(settled.written_by_master);
    assert_eq!(
        cluster
            .counters()
            .incarnations_replaced
            .load(Ordering::Relaxed),
        1
    );
    // The new incarnation is live and alive, and its own records are not touched.
    assert_eq!(cluster.node_counts(), [1, 0, 0]);
    let live = store.get(&incarnation_key("a")).await.unwrap().unwrap();
    assert_eq!(live.value, Bytes::from("8"));
    let new = record("j", 8);
    store
        .put("/yr/instance/j", Bytes::from(new.encode_to_vec()), None)
        .await
        .unwrap();
    // Registering again as the same incarnation (a master failover) settles nothing.
    let mut again = node("a", 1000);
    again.incarnation = 8;
    cluster.register(Some(again)).await.unwrap();
    let kept = store.get("/yr/instance/j").await.unwrap().unwrap();
    assert_eq!(
        InstanceRecord::decode(kept.value).unwrap().state(),
        InstanceState::Running
    );
    assert_eq!(
        cluster
            .counters()
            .incarnations_replaced
            .load(Ordering::Relaxed),
        1
    );
}

fn labelled_node(id: &str, cpu: u64, memory: u64, labels: &[(&str, &str)]) -> NodeInfo {
    let mut info = node(id, cpu);
    if let Some(capacity) = info.capacity.as_mut() {
        capacity.memory_mb = memory;
    }
    info.labels = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    info
}

fn delta_update(id: &str, cpu: i64) -> NodeUpdate {
    NodeUpdate {
        node_id: id.into(),
        delta: Some(ResourceDelta {
            cpu_millicores: cpu,
            memory_mb: 0,
            custom: Default::default(),
        }),
        beat: 0,
    }
}

#[tokio::test]
async fn placement_finds_the_one_fit_behind_roomier_nodes_that_cannot_take_the_request() {
    let store = Arc::new(FakeStore::default());
    let (cluster, _) = Cluster::open(store, Duration::from_secs(5)).await.unwrap();
    // 40 roomy nodes short of memory, 40 in the wrong zone, one that fits and has the least CPU.
    for i in 0..40 {
        let short = labelled_node(&format!("m{i:02}"), 64_000, 10, &[("zone", "east")]);
        cluster.register(Some(short)).await.unwrap();
        let elsewhere = labelled_node(&format!("w{i:02}"), 64_000, 4096, &[("zone", "west")]);
        cluster.register(Some(elsewhere)).await.unwrap();
    }
    let fit = labelled_node("z", 1000, 4096, &[("zone", "east")]);
    cluster.register(Some(fit)).await.unwrap();
    let ask = |labels: &[&str], exclude: &[&str]| {
        let mut schedule = request(500);
        if let Some(resources) = schedule.request.as_mut() {
            resources.memory_mb = 512;
        }
        schedule.labels = labels.iter().map(|l| l.to_string()).collect();
        schedule.exclude_nodes = exclude.iter().map(|n| n.to_string()).collect();
        cluster.schedule(&schedule)
    };
    assert_eq!(ask(&["zone=east"], &[]).node_id, "z");
    // Without the label, the roomiest node with memory wins, lowest id first.
    assert_eq!(ask(&[], &[]).node_id, "w00");
    assert_eq!(ask(&[], &["w00"]).node_id, "w01");
    // The asking node excluded and nowhere else to go: the full reason, as before.
    let refused = ask(&["zone=east"], &["z"]);
    let error = refused.error.unwrap();
    assert_eq!(error.code, ErrorCode::ResourceNotEnough.number());
    assert!(
        error.message.contains("(81 live nodes)") && error.message.ends_with("and 73 more"),
        "{}",
        error.message
    );
}

#[tokio::test]
async fn heartbeat_deltas_and_registrations_move_nodes_in_placement() {
    let store = Arc::new(FakeStore::default());
    let (cluster, _) = Cluster::open(store, Duration::from_secs(5)).await.unwrap();
    cluster.register(Some(node("a", 4000))).await.unwrap();
    cluster.register(Some(node("b", 3000))).await.unwrap();
    assert_eq!(cluster.schedule(&request(100)).node_id, "a");
    // a reports that it took 2,000m (which replaces the reservation): b is roomier now.
    assert_eq!(
        cluster.heartbeat(&delta_update("a", -2000)),
        HeartbeatOutcome::Accepted
    );
    assert_eq!(cluster.schedule(&request(100)).node_id, "b");
    // a gives it back and more; b registers again, smaller.
    cluster.heartbeat(&delta_update("a", 2000));
    cluster.register(Some(node("b", 1000))).await.unwrap();
    assert_eq!(cluster.schedule(&request(100)).node_id, "a");
    // A request only b's old size could take has nowhere to go.
    cluster.heartbeat(&delta_update("a", -3000));
    let error = cluster.schedule(&request(2000)).error.unwrap();
    assert_eq!(error.code, ErrorCode::ResourceNotEnough.number());
}

#[tokio::test]
async fn lost_and_recovering_nodes_are_never_chosen() {
    let store = Arc::new(FakeStore::default());
    let clock = ManualClock::new();
    let timeout = Duration::from_secs(5);
    let (cluster, _) = Cluster::open_with_clock(store.clone(), timeout, clock.clone())
        .await
        .unwrap();
    cluster.register(Some(node("big", 64_000))).await.unwrap();
    cluster.register(Some(node("small", 1000))).await.unwrap();
    assert_eq!(cluster.schedule(&request(100)).node_id, "big");
    clock.advance(timeout - Duration::from_millis(1));
    heartbeat(&cluster, "small");
    clock.advance(Duration::from_millis(1));
    assert_eq!(cluster.check_liveness().await, vec!["big".to_string()]);
    for _ in 0..3 {
        assert_eq!(cluster.schedule(&request(100)).node_id, "small");
    }
    // After a restart both are recovering, not alive: nothing to place on until they register.
    let (reopened, _) = Cluster::open_with_clock(store, timeout, clock.clone())
        .await
        .unwrap();
    let error = reopened.schedule(&request(100)).error.unwrap();
    assert_eq!(error.code, ErrorCode::ResourceNotEnough.number());
    reopened.register(Some(node("small", 1000))).await.unwrap();
    assert_eq!(reopened.schedule(&request(100)).node_id, "small");
}
