//! The cluster-wide KV store on real processes (docs/design/022-cluster-kv.md): a key written
//! through one node is read through the others, with NX, TTL, ranges, deletes and batches
//! across nodes; a read waiting on one node is woken by a write through another; the quota
//! counts at the key's owner; keys move to a node that joins and stay readable throughout; a
//! write-through key (Redis) outlives its owner's SIGKILL and a memory-only key is reported as
//! lost with it; user code on another node than the driver shares keys and streams with it.

use std::time::{Duration, Instant};

use prost::bytes::Bytes;
use yr::{ProducerConfig, SetParam};
use yr_datasystem::kv_ring::{HashRing, Member};
use yr_proto::ds as pb;
use yr_proto::ds::data_worker_client::DataWorkerClient;
use yr_tests::{exclusive, wait_until, NodeSpec, RedisServer, TestCluster, TIMEOUT};

/// A DataWorker client of one node, on its bus socket, with its own runtime.
struct NodeKv {
    runtime: tokio::runtime::Runtime,
    client: DataWorkerClient<tonic::transport::Channel>,
}

impl NodeKv {
    fn of(cluster: &TestCluster, index: usize) -> NodeKv {
        let (runtime, client) = yr_tests::data_worker_client(cluster, index);
        NodeKv { runtime, client }
    }

    fn set_with(
        &mut self,
        key: &str,
        value: &[u8],
        param: pb::SetParam,
        job: &str,
    ) -> Result<(), yr_proto::v1::ErrorInfo> {
        let request = pb::KvSetRequest {
            key: key.into(),
            value: Bytes::copy_from_slice(value),
            param: Some(param),
            job_id: job.into(),
            ..Default::default()
        };
        let reply = self
            .runtime
            .block_on(self.client.kv_set(request))
            .expect("the node answers")
            .into_inner();
        match reply.error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    fn set(&mut self, key: &str, value: &[u8]) {
        self.set_with(key, value, pb::SetParam::default(), "")
            .unwrap_or_else(|e| panic!("set {key}: {e:?}"));
    }

    fn get(
        &mut self,
        keys: &[String],
        timeout: Duration,
    ) -> Result<Vec<Bytes>, yr_proto::v1::ErrorInfo> {
        let request = pb::KvGetRequest {
            keys: keys.to_vec(),
            timeout_ms: timeout.as_millis() as u64,
            ..Default::default()
        };
        let reply = self
            .runtime
            .block_on(self.client.kv_get(request))
            .expect("the node answers")
            .into_inner();
        match reply.error {
            Some(error) => Err(error),
            None => Ok(reply.values),
        }
    }

    fn get_range(&mut self, key: &str, offset: u64, size: u64) -> Bytes {
        let reply = self
            .runtime
            .block_on(self.client.kv_get_range(pb::KvGetRangeRequest {
                key: key.into(),
                offset,
                size,
                timeout_ms: 1_000,
                ..Default::default()
            }))
            .expect("the node answers")
            .into_inner();
        assert_eq!(reply.error, None);
        reply.value
    }

    fn exist(&mut self, keys: &[String]) -> Vec<bool> {
        let reply = self
            .runtime
            .block_on(self.client.kv_exist(pb::KvExistRequest {
                keys: keys.to_vec(),
                ..Default::default()
            }))
            .expect("the node answers")
            .into_inner();
        assert_eq!(reply.error, None);
        reply.exists
    }

    fn del(&mut self, keys: &[String]) {
        let reply = self
            .runtime
            .block_on(self.client.kv_del(pb::KvDelRequest {
                keys: keys.to_vec(),
                ..Default::default()
            }))
            .expect("the node answers")
            .into_inner();
        assert_eq!(reply.error, None);
    }
}

/// The ring the nodes of `cluster` (the first `count`) form.
fn ring(cluster: &TestCluster, count: usize) -> HashRing {
    HashRing::new((0..count).map(|i| Member {
        node_id: cluster.node_id(i).to_string(),
        address: cluster.node_address(i),
    }))
}

/// `count` keys with prefix `prefix` that node `index` owns on `ring`.
fn keys_owned_by(
    ring: &HashRing,
    cluster: &TestCluster,
    index: usize,
    prefix: &str,
    count: usize,
) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|k| {
            ring.owner(k)
                .is_some_and(|o| o.node_id == cluster.node_id(index))
        })
        .take(count)
        .collect()
}

fn three_nodes(spec: impl Fn() -> NodeSpec) -> TestCluster {
    TestCluster::builder()
        .node(spec())
        .node(spec())
        .node(spec())
        .start()
}

#[test]
fn a_key_written_through_one_node_is_read_through_the_others() {
    let _lock = exclusive();
    let cluster = three_nodes(NodeSpec::default);
    let mut nodes: Vec<NodeKv> = (0..3).map(|i| NodeKv::of(&cluster, i)).collect();
    let ring = ring(&cluster, 3);
    let keys: Vec<String> = (0..60).map(|i| format!("shared-{i}")).collect();
    for key in &keys {
        nodes[0].set(key, key.as_bytes());
    }
    for node in &mut nodes[1..] {
        // One batch over every owner.
        let values = node.get(&keys, Duration::from_secs(5)).unwrap();
        assert_eq!(
            values,
            keys.iter()
                .map(|k| Bytes::from(k.clone()))
                .collect::<Vec<_>>()
        );
    }
    // Node 1 reads keys owned by node 2 that node 0 wrote.
    let far = keys_owned_by(&ring, &cluster, 2, "far", 3);
    for key in &far {
        nodes[0].set(key, b"0123456789");
        assert_eq!(nodes[1].get_range(key, 3, 4), Bytes::from_static(b"3456"));
    }
    // NX through another node sees the key.
    let nx = pb::SetParam {
        existence: pb::Existence::Nx as i32,
        ..Default::default()
    };
    let error = nodes[1].set_with(&far[0], b"other", nx, "").unwrap_err();
    assert_eq!(error.code, 4206, "{error:?}");
    assert!(nodes[2].set_with("fresh-nx", b"new", nx, "").is_ok());
    assert_eq!(nodes[0].exist(&["fresh-nx".to_string()]), vec![true]);
    // TTL: gone on every node after it expires.
    let brief = pb::SetParam {
        ttl_second: 1,
        ..Default::default()
    };
    nodes[0].set_with(&far[1], b"brief", brief, "").unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        nodes[1].exist(&[far[1].clone()]) == vec![false]
    }));
    // A delete through one node is seen through the others.
    nodes[2].del(&keys[..10]);
    assert_eq!(nodes[1].exist(&keys[..10]), vec![false; 10]);
    assert_eq!(nodes[0].exist(&keys[10..12]), vec![true; 2]);
    // A read of keys never written fails naming them, across owners.
    let error = nodes[1]
        .get(
            &[keys[10].clone(), "never-a".into(), "never-b".into()],
            Duration::from_millis(300),
        )
        .unwrap_err();
    assert_eq!(error.code, 4005);
    assert!(
        error.message.contains("never-a") && error.message.contains("never-b"),
        "{}",
        error.message
    );
    assert!(!error.message.contains(&keys[10]), "{}", error.message);
    // Each node holds its share.
    for node in 0..3 {
        assert!(
            cluster.wait_metric(node, "yr_kv_memory_bytes") > 0.0,
            "node {node} holds no key"
        );
    }
}

#[test]
fn a_read_waiting_on_one_node_is_woken_by_a_write_through_another() {
    let _lock = exclusive();
    let cluster = three_nodes(NodeSpec::default);
    let ring = ring(&cluster, 3);
    let key = keys_owned_by(&ring, &cluster, 2, "woken", 1).remove(0);
    let reader_key = key.clone();
    let mut reader = NodeKv::of(&cluster, 1);
    let started = Instant::now();
    let waiting = std::thread::spawn(move || reader.get(&[reader_key], TIMEOUT));
    // The read waits at the owner (node 2) until the write arrives.
    assert!(wait_until(TIMEOUT, || {
        cluster
            .node_metric(2, "yr_node_waiting_requests{kind=\"kv_read\"}")
            .unwrap_or(0.0)
            >= 1.0
    }));
    NodeKv::of(&cluster, 0).set(&key, b"late");
    let values = waiting.join().unwrap().unwrap();
    assert_eq!(values, vec![Bytes::from_static(b"late")]);
    assert!(started.elapsed() < TIMEOUT);
}

#[test]
fn the_quota_counts_at_the_keys_owner() {
    let _lock = exclusive();
    let cluster = three_nodes(|| NodeSpec {
        kv_quota_mb: Some(1),
        ..NodeSpec::default()
    });
    let ring = ring(&cluster, 3);
    let on_two = keys_owned_by(&ring, &cluster, 2, "quota", 2);
    let on_one = keys_owned_by(&ring, &cluster, 1, "quota", 1);
    let value = vec![7u8; 600 * 1024];
    let plain = pb::SetParam::default();
    NodeKv::of(&cluster, 0)
        .set_with(&on_two[0], &value, plain, "job-q")
        .unwrap();
    // The second write of the job to the same owner, through another node, goes over.
    let error = NodeKv::of(&cluster, 1)
        .set_with(&on_two[1], &value, plain, "job-q")
        .unwrap_err();
    assert_eq!(error.code, 4202, "{error:?}");
    // Another owner has room of its own for the job.
    NodeKv::of(&cluster, 0)
        .set_with(&on_one[0], &value, plain, "job-q")
        .unwrap();
}

#[test]
fn keys_move_to_a_node_that_joins_and_stay_readable_throughout() {
    let _lock = exclusive();
    let mut cluster = TestCluster::builder()
        .node(NodeSpec::default())
        .node(NodeSpec::default())
        .start();
    let keys: Vec<String> = (0..3_000).map(|i| format!("moving-{i}")).collect();
    {
        let mut writer = NodeKv::of(&cluster, 0);
        for chunk in keys.chunks(1) {
            writer.set(&chunk[0], chunk[0].as_bytes());
        }
    }
    // Readers through both nodes read every key, in batches, with no wait, until told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|index| {
            let mut node = NodeKv::of(&cluster, index);
            let keys = keys.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut rounds = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) || rounds == 0 {
                    for batch in keys.chunks(250) {
                        if let Err(error) = node.get(batch, Duration::ZERO) {
                            return Err(format!("round {rounds}: {error:?}"));
                        }
                    }
                    rounds += 1;
                }
                Ok(rounds)
            })
        })
        .collect();
    let joined = cluster.add_node(NodeSpec::default());
    let ring = ring(&cluster, 3);
    let theirs: Vec<String> = keys
        .iter()
        .filter(|k| {
            ring.owner(k)
                .is_some_and(|o| o.node_id == cluster.node_id(joined))
        })
        .cloned()
        .collect();
    assert!(
        theirs.len() > 500,
        "the new node owns {} keys",
        theirs.len()
    );
    // The keys it owns arrive in its memory.
    let bytes: u64 = theirs.iter().map(|k| 2 * k.len() as u64).sum();
    assert!(
        wait_until(TIMEOUT, || cluster
            .node_metric(joined, "yr_kv_memory_bytes")
            .unwrap_or(0.0) as u64
            >= bytes),
        "the new node holds {:?} bytes, expected {bytes}",
        cluster.node_metric(joined, "yr_kv_memory_bytes")
    );
    // One more full round after the move.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for reader in readers {
        let rounds = reader.join().unwrap().unwrap();
        assert!(rounds >= 1);
    }
    let mut newcomer = NodeKv::of(&cluster, joined);
    for batch in keys.chunks(500) {
        assert_eq!(
            newcomer.get(batch, Duration::ZERO).unwrap().len(),
            batch.len()
        );
    }
}

#[test]
fn write_through_keys_outlive_their_owners_sigkill_and_memory_only_keys_are_reported_lost() {
    let _lock = exclusive();
    let redis = RedisServer::start();
    let spec = || NodeSpec {
        l2_redis: Some(redis.address()),
        ..NodeSpec::default()
    };
    let mut cluster = three_nodes(spec);
    let ring = ring(&cluster, 3);
    let on_two = keys_owned_by(&ring, &cluster, 2, "doomed", 20);
    let (durable, volatile) = on_two.split_at(10);
    let through = pb::SetParam {
        write_mode: pb::WriteMode::WriteThroughL2Cache as i32,
        ..Default::default()
    };
    {
        let mut writer = NodeKv::of(&cluster, 0);
        for key in durable {
            writer.set_with(key, key.as_bytes(), through, "").unwrap();
        }
        for key in volatile {
            writer.set(key, b"memory only");
        }
        assert_eq!(writer.exist(&on_two), vec![true; 20]);
    }
    cluster.kill_node(2);
    let mut reader = NodeKv::of(&cluster, 1);
    let started = Instant::now();
    // Waits through the loss (the master's node timeout) and reads from Redis at the new owner.
    let values = reader.get(durable, TIMEOUT).unwrap();
    assert_eq!(
        values,
        durable
            .iter()
            .map(|k| Bytes::from(k.clone()))
            .collect::<Vec<_>>()
    );
    eprintln!(
        "write-through keys read back {:?} after the kill",
        started.elapsed()
    );
    let error = reader
        .get(&volatile[..1], Duration::from_secs(2))
        .unwrap_err();
    assert_eq!(error.code, 4005, "{error:?}");
    assert!(
        error.message.contains("declared lost") && error.message.contains(cluster.node_id(2)),
        "{}",
        error.message
    );
    // Writes to the lost node's keys go to the new owner.
    reader.set(&volatile[0], b"again");
    assert_eq!(
        NodeKv::of(&cluster, 0)
            .get(&volatile[..1], Duration::ZERO)
            .unwrap(),
        vec![Bytes::from_static(b"again")]
    );
}

/// Found by the chaos soak (seed 2): a node cut off past the node timeout still held the keys
/// it owned; meanwhile they were written again at their new owner. When it came back as a new
/// incarnation the keys moved back to it, and it kept its stale values over the pushed newer
/// ones, so reads returned a value older than an acknowledged write. A node the master
/// declared lost forgets its memory-only keys: after the heal every read returns the newer
/// value.
#[test]
fn a_node_declared_lost_forgets_its_keys_and_reads_after_the_heal_return_the_newer_writes() {
    let _lock = exclusive();
    let cluster = TestCluster::builder()
        .node_timeout(2.0)
        .node(NodeSpec::default())
        .node(NodeSpec::default())
        .node(NodeSpec::default())
        .start();
    let ring = ring(&cluster, 3);
    let keys = keys_owned_by(&ring, &cluster, 2, "partitioned", 10);
    let mut writer = NodeKv::of(&cluster, 0);
    for key in &keys {
        writer.set(key, b"old");
    }
    let far = cluster.node_id(2).to_string();
    let old_incarnation = cluster.node_incarnation(2);
    let pid = cluster.node_pid(2).expect("node 2 runs");

    // A partition: node 2 stops past the node timeout and is declared lost; the keys are
    // written again at their new owners.
    assert!(yr_tests::signal(pid, libc::SIGSTOP));
    let resumed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        cluster.wait_for_status(TIMEOUT, "node 2 declared lost", |status| {
            status
                .nodes
                .iter()
                .any(|n| n.node_id == far && n.state == "lost")
        });
        for key in &keys {
            writer.set(key, b"new");
        }
    }));
    assert!(yr_tests::signal(pid, libc::SIGCONT));
    if let Err(panic) = resumed {
        std::panic::resume_unwind(panic);
    }

    // The heal: node 2 registers as a new incarnation, the keys move back to it, and the nodes
    // that held them meanwhile forget them once it took them.
    cluster.wait_for_status(
        TIMEOUT,
        "node 2 registered as a new incarnation",
        |status| {
            status
                .nodes
                .iter()
                .any(|n| n.node_id == far && n.state == "alive" && n.incarnation != old_incarnation)
        },
    );
    assert!(
        wait_until(TIMEOUT, || (0..2).all(|node| cluster
            .node_metric(node, "yr_kv_memory_bytes")
            == Some(0.0))),
        "the keys moved back to node 2"
    );
    for node in 0..3 {
        let values = NodeKv::of(&cluster, node)
            .get(&keys, Duration::ZERO)
            .unwrap_or_else(|e| panic!("read through node {node}: {e:?}"));
        assert_eq!(
            values,
            vec![Bytes::from_static(b"new"); keys.len()],
            "read through node {node}"
        );
    }
}

// ----- user code on another node ----------------------------------------------------------------

#[yr::invoke]
fn write_key(key: String, value: String) -> Result<bool, yr::Error> {
    yr::kv_write(&key, value.as_bytes(), SetParam::default())?;
    Ok(true)
}

#[yr::invoke]
fn read_key(key: String) -> Result<String, yr::Error> {
    let values = yr::kv_read(&[&key], TIMEOUT)?;
    Ok(String::from_utf8_lossy(&values[0]).into_owned())
}

#[yr::invoke]
fn consume(stream: String, ready: String, count: usize) -> Result<Vec<Vec<u8>>, yr::Error> {
    let consumer = yr::create_stream_consumer(
        &stream,
        yr::SubscriptionConfig::new("function", yr::SubscriptionType::Stream),
    )?;
    yr::kv_write(&ready, b"1", SetParam::default())?;
    let mut out = Vec::new();
    while out.len() < count {
        for element in consumer.receive(TIMEOUT, 1)? {
            out.push(element.value.to_vec());
        }
    }
    Ok(out)
}

/// The driver on node 0, which has no CPU to spare, so its functions run on node 1.
fn driver_and_worker() -> TestCluster {
    TestCluster::builder()
        .node(NodeSpec {
            cpu: 1,
            ..NodeSpec::default()
        })
        .node(NodeSpec::default())
        .start()
}

#[test]
fn user_code_on_another_node_shares_the_store_and_streams_with_the_driver() {
    let _lock = exclusive();
    let cluster = driver_and_worker();
    yr::init(cluster.config()).unwrap();
    let from_function = yr_tests::unique("from-function");
    let wrote = yr::function(write_key)
        .invoke((from_function.clone(), "written remotely".to_string()))
        .unwrap();
    assert!(yr::get(&wrote, TIMEOUT).unwrap());
    assert_eq!(
        yr::kv_read(&[&from_function], TIMEOUT).unwrap(),
        vec![b"written remotely".to_vec()]
    );
    let from_driver = yr_tests::unique("from-driver");
    let read = yr::function(read_key)
        .invoke((from_driver.clone(),))
        .unwrap();
    yr::kv_write(&from_driver, b"written locally", SetParam::default()).unwrap();
    assert_eq!(yr::get(&read, TIMEOUT).unwrap(), "written locally");
    // Streams, with a KV key saying the consumer is ready.
    let stream = yr_tests::unique("to-function");
    let ready = format!("{stream}-ready");
    let received = yr::function(consume)
        .invoke((stream.clone(), ready.clone(), 3usize))
        .unwrap();
    yr::kv_read(&[&ready], TIMEOUT).unwrap();
    let producer = yr::create_stream_producer(&stream, ProducerConfig::default()).unwrap();
    for element in [b"a", b"b", b"c"] {
        producer.send(element, TIMEOUT).unwrap();
    }
    assert_eq!(
        yr::get(&received, TIMEOUT).unwrap(),
        vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]
    );
    producer.close().unwrap();
    yr::finalize().unwrap();
}
