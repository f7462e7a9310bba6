//! A cluster whose master keeps its state in etcd (`--etcd`): a stateful instance and a task
//! run, their records are in etcd under the prefix, a master restarted on the same etcd sees the
//! previous instance records, and `yr start --master --etcd` shows the store in `session.json`
//! and `yr status`. A master reaches an etcd that speaks TLS and authenticates clients by
//! certificate with `--etcd-ca`, `--etcd-cert` and `--etcd-key`. Each test starts its own etcd
//! (Debian's `etcd-server`) on loopback ports.

#[path = "../../yr-meta/tests/common/etcd.rs"]
mod etcd;

use std::time::Duration;

use etcd::{Etcd, ServerTls};
use yr_common::session::SessionInfo;
use yr_tests::{exclusive, run_yr, unique, Tally, TempDir, TestCluster, TIMEOUT};

#[yr::invoke]
fn square(n: i64) -> i64 {
    n * n
}

/// The keys etcd holds under `prefix`.
fn etcd_keys(etcd: &Etcd, prefix: &str) -> Vec<String> {
    yr_tests::block_on(async {
        let mut client = etcd_client::Client::connect(etcd.endpoints(), None)
            .await
            .expect("the test's etcd answers");
        let response = client
            .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
            .await
            .expect("a range read of the prefix");
        response
            .kvs()
            .iter()
            .filter_map(|kv| kv.key_str().ok().map(str::to_string))
            .collect()
    })
}

#[test]
fn a_cluster_on_etcd_keeps_its_records_there_and_a_restarted_master_sees_them() {
    let _exclusive = exclusive();
    let etcd = Etcd::single("cluster");
    let prefix = format!("/yr/{}", unique("etcd-cluster"));
    let mut cluster = TestCluster::builder()
        .master_args(["--etcd", &etcd.endpoint(), "--etcd-prefix", &prefix])
        .start();
    yr::init(cluster.config()).unwrap();

    let tally = yr::instance(Tally::new).invoke((40,)).unwrap();
    let add = |n: i64| yr::get(&tally.method(Tally::add).invoke((n,)).unwrap(), TIMEOUT);
    assert_eq!(add(2).unwrap(), 42);
    assert_eq!(
        yr::get(&yr::function(square).invoke((7,)).unwrap(), TIMEOUT).unwrap(),
        49
    );
    let id = tally.id().to_string();
    let status = cluster.wait_for_status(TIMEOUT, "the master records the instance", |status| {
        status.instances.iter().any(|i| i.instance_id == id)
    });
    assert_eq!(
        status.meta_store,
        format!("etcd {} prefix {prefix}", etcd.endpoint())
    );

    // The records are in etcd, under the prefix: the cluster id, the node, the instance.
    let keys = etcd_keys(&etcd, &format!("{prefix}/"));
    let node_id = cluster.node_id(0).to_string();
    for needle in [
        "/yr/cluster/id".to_string(),
        format!("/yr/node/{node_id}"),
        format!("/yr/instance/{id}"),
    ] {
        assert!(
            keys.iter()
                .any(|k| k.starts_with(&format!("{prefix}/")) && k.ends_with(&needle)),
            "no etcd key ending with {needle} under {prefix}: {keys:?}"
        );
    }
    assert!(
        etcd_keys(&etcd, "/").iter().all(|k| k.starts_with(&prefix)),
        "every key is under the prefix"
    );

    // A master restarted on the same etcd and prefix (its data directory does not matter)
    // sees the previous instance records.
    cluster.kill_master();
    cluster.restart_master();
    cluster.wait_for_status(
        TIMEOUT,
        "the restarted master lists the node alive and the previous instance",
        |status| {
            status
                .nodes
                .iter()
                .any(|n| n.node_id == node_id && n.state == "alive")
                && status.instances.iter().any(|i| i.instance_id == id)
        },
    );
    assert_eq!(add(1).unwrap(), 43);
    yr::finalize().unwrap();
}

#[test]
fn a_master_reaches_an_etcd_that_wants_tls_and_client_certificates() {
    let _exclusive = exclusive();
    let dir = TempDir::new("etcd-tls");
    let (ca, [(server_cert, server_key), (client_cert, client_key)]) =
        yr_transport::tls::test_certificates::<2>(dir.path()).expect("certificates");
    let etcd = Etcd::single_tls(
        "cluster-tls",
        &ServerTls {
            certificate: server_cert,
            key: server_key,
            ca: ca.clone(),
        },
    );
    let prefix = format!("/yr/{}", unique("etcd-tls"));
    let path = |p: &std::path::Path| p.display().to_string();
    let cluster = TestCluster::builder()
        .master_args([
            "--etcd",
            &etcd.endpoint(),
            "--etcd-prefix",
            &prefix,
            "--etcd-ca",
            &path(&ca),
            "--etcd-cert",
            &path(&client_cert),
            "--etcd-key",
            &path(&client_key),
        ])
        .start();
    yr::init(cluster.config()).unwrap();
    let tally = yr::instance(Tally::new).invoke((1,)).unwrap();
    assert_eq!(
        yr::get(&tally.method(Tally::add).invoke((1,)).unwrap(), TIMEOUT).unwrap(),
        2
    );
    let id = tally.id().to_string();
    cluster.wait_for_status(TIMEOUT, "the master records the instance", |status| {
        status.instances.iter().any(|i| i.instance_id == id)
    });
    yr::finalize().unwrap();

    // Without its certificate, the master cannot start on that etcd, and says why.
    let token = dir.path().join("token");
    std::fs::write(&token, "etcd-tls-test-token").expect("a token file");
    let refused = run_yr(
        &[
            "master",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &path(&dir.path().join("refused")),
            "--etcd",
            &etcd.endpoint(),
            "--etcd-ca",
            &path(&ca),
            "--token-file",
            &path(&token),
        ],
        &[],
        Duration::from_secs(60),
    );
    assert!(
        !refused.status.success(),
        "a master without a certificate started"
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("etcd"), "{stderr}");
}

#[test]
fn yr_start_with_etcd_shows_the_store_in_the_session_and_status() {
    let _exclusive = exclusive();
    let etcd = Etcd::single("start");
    let root = TempDir::new("etcd-start");
    let prefix = format!("/yr/{}", unique("start"));
    let output = run_yr(
        &[
            "start",
            "--master",
            "--etcd",
            &etcd.endpoint(),
            "--etcd-prefix",
            &prefix,
            "--warm-pool",
            "0",
        ],
        &[("YR_SESSION_ROOT", root.path())],
        Duration::from_secs(60),
    );
    assert!(
        output.status.success(),
        "yr start --etcd failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let session = SessionInfo::read(&root.path().join("latest")).expect("the session file");
    let expected = format!("etcd {} prefix {prefix}", etcd.endpoint());
    assert_eq!(session.meta_store, expected);
    let status = run_yr(
        &["status"],
        &[("YR_SESSION_ROOT", root.path())],
        Duration::from_secs(30),
    );
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains(&format!("Meta store: {expected}")),
        "yr status: {text}\n{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(!etcd_keys(&etcd, &format!("{prefix}/")).is_empty());
    let stopped = run_yr(
        &["stop"],
        &[("YR_SESSION_ROOT", root.path())],
        Duration::from_secs(90),
    );
    assert!(
        stopped.status.success(),
        "yr stop: {}",
        String::from_utf8_lossy(&stopped.stderr)
    );
}
