//! The election and its fencing on a real etcd (a single member started by the test): a
//! standby takes over when the leader stops renewing, and the deposed leader's cluster state
//! (which still believes it leads, as a leader paused past its lease does when it resumes)
//! writes nothing: its liveness pass would declare the node lost, and etcd refuses the write.

#[path = "../../yr-meta/tests/common/etcd.rs"]
mod etcd;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use yr_common::ManualClock;
use yr_master::election::{Election, TermEnd, LEADER_KEY};
use yr_master::fenced::FencedStore;
use yr_master::Cluster;
use yr_meta::{EtcdOptions, EtcdStore, MetaStore};
use yr_proto::v1::NodeInfo;

async fn store(etcd: &etcd::Etcd, prefix: &str) -> Arc<dyn MetaStore> {
    let options = EtcdOptions::new(etcd.endpoints()).with_prefix(prefix.to_string());
    Arc::new(EtcdStore::connect(options).await.expect("the test's etcd"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_and_the_deposed_leaders_writes_are_fenced() {
    let etcd = etcd::Etcd::single("election");
    let prefix = format!("/yr/election-{}", std::process::id());
    let ttl = Duration::from_secs(2);
    let a_store = store(&etcd, &prefix).await;
    let b_store = store(&etcd, &prefix).await;
    let a = Election::new(a_store.clone(), "127.0.0.1:1".into(), ttl);
    let b = Arc::new(Election::new(b_store.clone(), "127.0.0.1:2".into(), ttl));

    let term_a = a.try_acquire().await.unwrap().expect("a leads");
    let clock = ManualClock::new();
    let fenced_a = Arc::new(FencedStore::new(a_store.clone(), term_a));
    let (cluster_a, _) =
        Cluster::open_with_clock(fenced_a.clone(), Duration::from_secs(2), clock.clone())
            .await
            .unwrap();
    let node = NodeInfo {
        node_id: "n1".into(),
        address: "127.0.0.1:9".into(),
        incarnation: 7,
        ..Default::default()
    };
    cluster_a.register(Some(node.clone())).await.unwrap();

    // a stops renewing (it is paused); b campaigns and wins once a's lease ends.
    let (_stop_tx, stop) = watch::channel(false);
    let campaigner = b.clone();
    let paused_at = Instant::now();
    let campaign = tokio::spawn(async move {
        let mut stop = stop;
        campaigner.campaign(&mut stop).await
    });
    let term_b = tokio::time::timeout(Duration::from_secs(15), campaign)
        .await
        .expect("b leads within 15 s of a's last renewal")
        .unwrap()
        .expect("b leads");
    let takeover = paused_at.elapsed();
    eprintln!("takeover after the leader stopped renewing: {takeover:?}");
    assert!(term_b.mod_revision > term_a.mod_revision);
    let leader = b_store.get(LEADER_KEY).await.unwrap().unwrap();
    assert_eq!(leader.value, "127.0.0.1:2");

    // b rebuilds the view from etcd: the node is there, recovering until it registers again.
    let fenced_b = Arc::new(FencedStore::new(b_store.clone(), term_b));
    let (cluster_b, _) = Cluster::open(fenced_b.clone(), Duration::from_secs(2))
        .await
        .unwrap();
    assert!(cluster_b.node_infos().iter().any(|n| n.node_id == "n1"));
    cluster_b.register(Some(node.clone())).await.unwrap();

    // a resumes, still believing it leads: its liveness pass declares the silent node lost, but
    // the write is fenced, so etcd still has the node alive with its incarnation.
    clock.advance(Duration::from_secs(10));
    let lost = cluster_a.check_liveness().await;
    assert_eq!(lost, vec!["n1".to_string()], "a's memory says lost");
    assert!(fenced_a.refused() >= 1, "a's write was refused");
    let incarnation = b_store.get("/yr/incarnation/n1").await.unwrap();
    assert_eq!(
        incarnation.map(|kv| kv.value),
        Some("7".into()),
        "the live incarnation is untouched"
    );
    let record = b_store.get("/yr/node/n1").await.unwrap().unwrap();
    let record = <NodeInfo as prost::Message>::decode(record.value).unwrap();
    assert_eq!(record.state, "alive");
    // a's registration path is fenced too.
    let other = NodeInfo {
        node_id: "n2".into(),
        incarnation: 1,
        ..node
    };
    assert!(cluster_a.register(Some(other)).await.is_err());
    assert_eq!(b_store.get("/yr/node/n2").await.unwrap(), None);

    // a's holder learns it at once (the fenced writes woke it) and ends its term.
    let (_stop_a, mut stop_a) = watch::channel(false);
    let end = tokio::time::timeout(
        Duration::from_secs(5),
        a.hold(term_a, &fenced_a.fenced(), &mut stop_a),
    )
    .await
    .expect("a's term ends");
    assert!(matches!(end, TermEnd::Lost(_)), "{end:?}");

    // b's term holds, and its writes go through.
    let (_stop_b, mut stop_b) = watch::channel(false);
    let still = tokio::time::timeout(
        Duration::from_millis(1500),
        b.hold(term_b, &Notify::new(), &mut stop_b),
    )
    .await;
    assert!(still.is_err(), "b keeps leading: {still:?}");
    assert_eq!(fenced_b.refused(), 0);
}
