//! KV durability on real processes: a value written through to the second-level store survives
//! killing (SIGKILL) and restarting the whole cluster, with the default directory store (a
//! node data directory that outlives the cluster) and with a real Redis server; a write-back
//! value lands in Redis soon after the write returns; memory-only values do not survive; a node
//! whose second-level store is unusable refuses to start and says why.

use std::time::Duration;

use yr::{ErrorCode, SetParam, WriteMode};
use yr_tests::{
    assert_error, exclusive, free_port, run_yr, unique, unwrap_err, wait_until, NodeSpec,
    RedisServer, TempDir, TestCluster, TIMEOUT,
};

fn mode(write_mode: WriteMode) -> SetParam {
    SetParam {
        write_mode,
        ..SetParam::default()
    }
}

/// A value that is not text, large enough to need more than one read.
fn payload(seed: u8) -> Vec<u8> {
    (0..3 * 1024 * 1024 + 17)
        .map(|i: usize| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Write a write-through and a memory-only key on a cluster made from `spec`, kill the whole
/// cluster, start a new one from `spec` and check that only the write-through value survived;
/// then delete it and check that it stays deleted over another restart.
fn write_kill_restart_read(spec: impl Fn() -> NodeSpec) {
    let durable = unique("kv-durable");
    let volatile = unique("kv-volatile");
    let value = payload(1);
    {
        let cluster = TestCluster::with_node(spec());
        yr::init(cluster.config()).unwrap();
        yr::kv_write(&durable, &value, mode(WriteMode::WriteThroughL2Cache)).unwrap();
        yr::kv_write(&volatile, b"memory only", mode(WriteMode::NoneL2Cache)).unwrap();
        assert_eq!(
            yr::kv_exist(&[&durable, &volatile]).unwrap(),
            vec![true, true]
        );
        yr::finalize().unwrap();
        // Dropping the cluster SIGKILLs the master and the node.
    }
    let cluster = TestCluster::with_node(spec());
    yr::init(cluster.config()).unwrap();
    let read = yr::kv_read(&[&durable], TIMEOUT).unwrap();
    assert!(
        read[0] == value,
        "the write-through value came back changed ({} bytes, expected {})",
        read[0].len(),
        value.len()
    );
    assert_eq!(
        yr::kv_exist(&[&durable, &volatile]).unwrap(),
        vec![true, false],
        "only the write-through value survives"
    );
    let error = unwrap_err(yr::kv_read(&[&volatile], Duration::from_millis(200)));
    assert_error(&error, &[ErrorCode::GetOperationFailed], &[&volatile]);
    // NX sees the surviving key.
    let nx = SetParam {
        existence: yr::Existence::NX,
        ..SetParam::default()
    };
    let error = unwrap_err(yr::kv_write(&durable, b"other", nx));
    assert_error(&error, &[ErrorCode::KeyAlreadyExist], &[&durable]);
    // A delete removes it from the second-level store too: gone after another restart.
    yr::kv_del(&[&durable]).unwrap();
    yr::finalize().unwrap();
    drop(cluster);
    let cluster = TestCluster::with_node(spec());
    yr::init(cluster.config()).unwrap();
    assert_eq!(yr::kv_exist(&[&durable]).unwrap(), vec![false]);
    yr::finalize().unwrap();
}

#[test]
fn a_write_through_value_survives_killing_and_restarting_the_whole_cluster() {
    let _exclusive = exclusive();
    let data = TempDir::new("kv-data");
    write_kill_restart_read(|| NodeSpec {
        data_dir: Some(data.path().to_path_buf()),
        ..NodeSpec::default()
    });
    // The values lived in the data directory's kv-l2 folder, one file per key.
    assert!(data.path().join("kv-l2").is_dir());
}

#[test]
fn a_write_through_value_in_redis_survives_killing_and_restarting_the_whole_cluster() {
    let _exclusive = exclusive();
    let redis = RedisServer::start();
    let address = redis.address();
    write_kill_restart_read(|| NodeSpec {
        l2_redis: Some(address.clone()),
        ..NodeSpec::default()
    });
}

#[test]
fn a_write_through_value_is_in_redis_when_the_write_returns() {
    let _exclusive = exclusive();
    let redis = RedisServer::start();
    let cluster = TestCluster::with_node(NodeSpec {
        l2_redis: Some(redis.address()),
        ..NodeSpec::default()
    });
    yr::init(cluster.config()).unwrap();
    let key = unique("kv-wt-redis");
    let value = payload(2);
    yr::kv_write(&key, &value, mode(WriteMode::WriteThroughL2Cache)).unwrap();
    let redis_key = format!("{}{key}", yr_datasystem::l2::REDIS_KEY_PREFIX);
    let stored = redis.client().get(redis_key.as_bytes()).unwrap();
    assert!(stored.is_some_and(|v| v == value));
    // A TTL becomes a Redis TTL.
    let brief = unique("kv-ttl-redis");
    let with_ttl = SetParam {
        write_mode: WriteMode::WriteThroughL2Cache,
        ttl_second: 100,
        ..SetParam::default()
    };
    yr::kv_write(&brief, b"v", with_ttl).unwrap();
    let redis_key = format!("{}{brief}", yr_datasystem::l2::REDIS_KEY_PREFIX);
    let (_, ttl_ms) = redis
        .client()
        .get_with_ttl(redis_key.as_bytes())
        .unwrap()
        .unwrap();
    assert!(
        ttl_ms.is_some_and(|ms| ms > 90_000 && ms <= 100_000),
        "{ttl_ms:?}"
    );
    yr::finalize().unwrap();
}

#[test]
fn a_write_back_value_lands_in_redis_and_a_delete_removes_it() {
    let _exclusive = exclusive();
    let redis = RedisServer::start();
    let cluster = TestCluster::with_node(NodeSpec {
        l2_redis: Some(redis.address()),
        ..NodeSpec::default()
    });
    yr::init(cluster.config()).unwrap();
    let key = unique("kv-wb-redis");
    let value = payload(3);
    yr::kv_write(&key, &value, mode(WriteMode::WriteBackL2Cache)).unwrap();
    assert_eq!(yr::kv_read(&[&key], TIMEOUT).unwrap(), vec![value.clone()]);
    let client = redis.client();
    let redis_key = format!("{}{key}", yr_datasystem::l2::REDIS_KEY_PREFIX);
    assert!(
        wait_until(TIMEOUT, || client
            .get(redis_key.as_bytes())
            .ok()
            .flatten()
            .is_some_and(|v| v == value)),
        "the write-back value did not reach Redis within {TIMEOUT:?}"
    );
    yr::kv_del(&[&key]).unwrap();
    assert_eq!(client.get(redis_key.as_bytes()).unwrap(), None);
    // A memory-only value never goes there.
    let volatile = unique("kv-mem-redis");
    yr::kv_write(&volatile, b"v", mode(WriteMode::NoneL2Cache)).unwrap();
    let redis_key = format!("{}{volatile}", yr_datasystem::l2::REDIS_KEY_PREFIX);
    assert!(!client.exists(redis_key.as_bytes()).unwrap());
    yr::finalize().unwrap();
}

/// `yr node` with `extra` flags, against a master that does not exist: it must fail while
/// opening its data worker, before it looks for the master.
fn node_refuses_to_start(extra: &[&str]) -> String {
    let dir = TempDir::new("kv-node");
    let socket = dir.path().join("bus.sock");
    let session = dir.path().join("session");
    let master = format!("127.0.0.1:{}", free_port());
    let listen = format!("127.0.0.1:{}", free_port());
    let mut args = vec![
        "node",
        "--master-address",
        &master,
        "--listen",
        &listen,
        "--bus-socket",
        socket.to_str().unwrap(),
        "--session-dir",
        session.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let token = yr_common::auth::ClusterToken::generate().unwrap();
    let output = run_yr(
        &args,
        &[(
            yr_common::auth::TOKEN_ENV,
            std::path::Path::new(token.as_str()),
        )],
        TIMEOUT,
    );
    assert!(!output.status.success(), "yr node started");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_node_whose_redis_does_not_answer_refuses_to_start_with_3007() {
    let address = format!("127.0.0.1:{}", free_port());
    let stderr = node_refuses_to_start(&["--l2-redis", &address]);
    assert!(
        stderr.contains("ErrCode: 3007") && stderr.contains(&address),
        "{stderr}"
    );
}

#[test]
fn a_node_whose_data_dir_is_not_a_directory_refuses_to_start_with_4203() {
    let dir = TempDir::new("kv-blocked");
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let stderr = node_refuses_to_start(&["--data-dir", file.to_str().unwrap()]);
    assert!(
        stderr.contains("ErrCode: 4203") && stderr.contains("kv-l2"),
        "{stderr}"
    );
}
