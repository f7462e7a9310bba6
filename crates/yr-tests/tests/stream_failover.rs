//! A stream outlives its home node (docs/design/025-stream-home-failover.md), on three real
//! nodes with a fast node timeout: the stream's home is node 2, its producer runs in a runtime
//! on node 1 and its consumer is the driver on node 0.
//!
//! - SIGKILL of node 2: every element acknowledged to the producer before the kill reaches the
//!   consumer, once and in order, and sends after it arrive too, with no call of the user's
//!   failing or hanging (the producer and consumer resume on the new home by themselves).
//! - SIGSTOP of node 2 past the node timeout, then SIGCONT: the stream goes on at the node that
//!   took it over, and the old home, running again, does not serve it any more (it answers
//!   with the new home's address).
//! - With the master gone too, no node can take the home over: the consumer's receive fails
//!   with a code and a message that says so, within its resume budget, never hangs.
//! - SIGKILL of the stream's backup: a subscription created next waits until the master
//!   declares the backup lost and the ring names another, instead of failing with 3002; the
//!   new backup then keeps the elements through a kill of the home.

use std::time::{Duration, Instant};

use yr::{InvokeOptions, ProducerConfig, SubscriptionConfig, SubscriptionType};
use yr_proto::ds as pb;
use yr_proto::ds::data_worker_client::DataWorkerClient;
use yr_tests::{
    assert_error, exclusive, on_label, signal, unique, wait_until, NodeSpec, TestCluster, TIMEOUT,
};

/// The master's node timeout in these tests, in seconds.
const NODE_TIMEOUT: f64 = 1.5;
/// How long the elements may take to arrive after the home's loss: the node timeout, a
/// liveness pass, the take-over and the clients' resumes, with room for a loaded machine.
const RECOVERY_BOUND: Duration = Duration::from_secs(90);

/// The stream's producer, in a runtime on node 1.
#[yr::instance]
pub struct Sender {
    producer: Option<yr::Producer>,
}

#[yr::instance]
impl Sender {
    pub fn new() -> Self {
        Sender { producer: None }
    }

    /// The runtime id, which starts with the node id.
    pub fn runtime(&mut self) -> String {
        std::env::var("YR_RUNTIME_ID").unwrap_or_default()
    }

    /// A producer of `stream` that flushes every element at once: a send that returns was
    /// acknowledged by the stream's home.
    pub fn open(&mut self, stream: String) -> String {
        let config = ProducerConfig {
            delay_flush_time: Duration::ZERO,
            ..ProducerConfig::default()
        };
        match yr::create_stream_producer(&stream, config) {
            Ok(producer) => {
                self.producer = Some(producer);
                String::new()
            }
            Err(error) => error.to_string(),
        }
    }

    /// Send the numbers `from..to`; the first error, if any.
    pub fn send(&mut self, from: u32, to: u32) -> String {
        let Some(producer) = &self.producer else {
            return "no producer".into();
        };
        for i in from..to {
            if let Err(error) = producer.send(&i.to_le_bytes(), TIMEOUT) {
                return format!("element {i}: {error}");
            }
        }
        String::new()
    }
}

/// Three nodes, labelled `n0`, `n1` and `n2`; the driver is on node 0.
fn three_nodes() -> TestCluster {
    three_nodes_with(Vec::new())
}

/// [`three_nodes`], node 2 with the environment `node_2_env`.
fn three_nodes_with(node_2_env: Vec<(String, String)>) -> TestCluster {
    let node = |name: &str| NodeSpec {
        labels: vec![("host".into(), name.into())],
        ..NodeSpec::default()
    };
    TestCluster::builder()
        .node_timeout(NODE_TIMEOUT)
        .node(node("n0"))
        .node(node("n1"))
        .node(NodeSpec {
            env: node_2_env,
            ..node("n2")
        })
        .start()
}

/// A DataWorker client of one node, on its bus socket, with its own runtime.
struct NodeStreams {
    runtime: tokio::runtime::Runtime,
    client: DataWorkerClient<tonic::transport::Channel>,
}

impl NodeStreams {
    fn of(cluster: &TestCluster, index: usize) -> NodeStreams {
        let (runtime, client) = yr_tests::data_worker_client(cluster, index);
        NodeStreams { runtime, client }
    }

    /// Make this node the home of `stream` (a producer that stays open).
    fn claim(&mut self, stream: &str) {
        let request = pb::StreamCreateProducerRequest {
            stream: stream.into(),
            config: Some(pb::ProducerConfig {
                page_size: 1 << 20,
                max_stream_size: 100 << 20,
                ..Default::default()
            }),
            resume_id: 0,
        };
        let reply = self
            .runtime
            .block_on(self.client.stream_create_producer(request))
            .expect("the node answers")
            .into_inner();
        assert_eq!(reply.error, None);
        assert_eq!(reply.home, "", "the stream is new: this node is its home");
    }

    /// Where this node says `stream` lives ("" here), within 5 s.
    fn home_of(&mut self, stream: &str) -> Option<String> {
        let request = pb::StreamNameRequest {
            stream: stream.into(),
        };
        let call = self.client.stream_query(request);
        let reply = self
            .runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(5), call).await })
            .ok()?
            .ok()?
            .into_inner();
        Some(reply.home)
    }
}

/// The sender on node 1, with its producer of `stream` open.
fn sender_on_node_1(cluster: &TestCluster, stream: &str) -> yr::InstanceHandle<Sender> {
    let sender = yr::instance(Sender::new)
        .options(InvokeOptions {
            cpu: 1_000,
            ..on_label("host", "n1")
        })
        .invoke(())
        .unwrap();
    let runtime = yr::get(&sender.method(Sender::runtime).invoke(()).unwrap(), TIMEOUT).unwrap();
    assert!(runtime.starts_with(cluster.node_id(1)), "{runtime}");
    let opened = sender
        .method(Sender::open)
        .invoke((stream.to_string(),))
        .unwrap();
    assert_eq!(yr::get(&opened, TIMEOUT).unwrap(), "");
    sender
}

fn send(sender: &yr::InstanceHandle<Sender>, from: u32, to: u32) -> yr::ObjectRef<String> {
    sender.method(Sender::send).invoke((from, to)).unwrap()
}

/// Receive (and ack) until `count` elements in all arrived, within `bound`, adding their
/// numbers to `seen` in the order they came.
fn receive_all(
    cluster: &TestCluster,
    consumer: &yr::Consumer,
    seen: &mut Vec<u32>,
    count: usize,
    bound: Duration,
) {
    let deadline = Instant::now() + bound;
    while seen.len() < count {
        if Instant::now() >= deadline {
            for node in 0..3 {
                eprintln!("--- node {node}:\n{}", cluster.node_log_tail(node, 40));
            }
            panic!(
                "only {} of {count} elements arrived within {bound:?}",
                seen.len()
            );
        }
        let elements = consumer
            .receive(Duration::from_secs(1), count - seen.len())
            .expect("a receive never fails: the consumer resumes on the new home");
        for element in &elements {
            seen.push(u32::from_le_bytes(
                element.value[..4].try_into().expect("4 bytes"),
            ));
        }
        if let Some(last) = elements.last() {
            consumer.ack(last.id).expect("an ack never fails");
        }
    }
}

/// The home on node 2; 100 elements acknowledged, 40 of them received and acked; the rest in
/// the home's memory (and its backup's).
fn stream_homed_on_node_2(
    cluster: &TestCluster,
    label: &str,
) -> (String, yr::Consumer, yr::InstanceHandle<Sender>, Vec<u32>) {
    let stream = unique(label);
    let (consumer, sender, seen) = homed_on_node_2(cluster, &stream);
    (stream, consumer, sender, seen)
}

/// [`stream_homed_on_node_2`] for `stream`.
fn homed_on_node_2(
    cluster: &TestCluster,
    stream: &str,
) -> (yr::Consumer, yr::InstanceHandle<Sender>, Vec<u32>) {
    NodeStreams::of(cluster, 2).claim(stream);
    let consumer = yr::create_stream_consumer(
        stream,
        SubscriptionConfig::new("driver", SubscriptionType::Stream),
    )
    .unwrap();
    let sender = sender_on_node_1(cluster, stream);
    assert_eq!(yr::get(&send(&sender, 0, 100), TIMEOUT).unwrap(), "");
    let mut seen = Vec::new();
    receive_all(cluster, &consumer, &mut seen, 40, TIMEOUT);
    (consumer, sender, seen)
}

#[test]
fn acknowledged_elements_survive_a_sigkill_of_the_streams_home() {
    let _exclusive = exclusive();
    let mut cluster = three_nodes();
    yr::init(cluster.config()).unwrap();
    let (_stream, consumer, sender, mut seen) = stream_homed_on_node_2(&cluster, "killed-home");
    let killed = Instant::now();
    cluster.kill_node(2);
    // Sends after the kill wait for the take-over, then go on.
    let later = send(&sender, 100, 200);
    receive_all(&cluster, &consumer, &mut seen, 200, RECOVERY_BOUND);
    assert_eq!(yr::get(&later, RECOVERY_BOUND).unwrap(), "");
    eprintln!(
        "all 200 elements arrived {:?} after the kill",
        killed.elapsed()
    );
    assert_eq!(
        seen,
        (0..200).collect::<Vec<_>>(),
        "each element once, in order"
    );
    let takeovers: f64 = (0..2)
        .map(|node| {
            cluster
                .node_metric(node, "yr_stream_takeovers_total")
                .unwrap_or(0.0)
        })
        .sum();
    assert_eq!(takeovers, 1.0, "one node took the stream over");
    // Nothing more comes (no element twice).
    assert!(consumer
        .receive(Duration::from_millis(500), 0)
        .unwrap()
        .is_empty());
    yr::finalize().unwrap();
}

#[test]
fn a_stopped_home_that_comes_back_is_fenced_and_the_stream_goes_on_at_its_successor() {
    let _exclusive = exclusive();
    let cluster = three_nodes();
    yr::init(cluster.config()).unwrap();
    let (stream, consumer, sender, mut seen) = stream_homed_on_node_2(&cluster, "stopped-home");
    let old_home = cluster.node_address(2);
    let incarnation = cluster.node_incarnation(2);
    let pid = cluster.node_pid(2).expect("node 2 runs");
    assert!(signal(pid, libc::SIGSTOP));
    let later = send(&sender, 100, 150);
    receive_all(&cluster, &consumer, &mut seen, 150, RECOVERY_BOUND);
    assert_eq!(yr::get(&later, RECOVERY_BOUND).unwrap(), "");
    let mut node_0 = NodeStreams::of(&cluster, 0);
    let new_home = node_0.home_of(&stream).expect("node 0 answers");
    let new_home = if new_home.is_empty() {
        cluster.node_address(0)
    } else {
        new_home
    };
    assert_ne!(new_home, old_home, "another node took the stream over");
    // The old home registers again as a new incarnation, and learns it lost the stream.
    continue_old_home(&cluster, pid, incarnation, &stream, &new_home);
    // The stream goes on at the new home.
    let last = send(&sender, 150, 200);
    receive_all(&cluster, &consumer, &mut seen, 200, RECOVERY_BOUND);
    assert_eq!(yr::get(&last, RECOVERY_BOUND).unwrap(), "");
    assert_eq!(
        seen,
        (0..200).collect::<Vec<_>>(),
        "each element once, in order"
    );
    assert_eq!(
        node_0
            .home_of(&stream)
            .as_deref()
            .map(|h| h.is_empty() || h == new_home),
        Some(true)
    );
    yr::finalize().unwrap();
}

/// SIGCONT the stopped node 2 (process `pid`, incarnation `incarnation` before its loss), wait
/// until it registers again as a new incarnation, then until it answers that `stream` lives at
/// `new_home`: it forgot the stream.
fn continue_old_home(
    cluster: &TestCluster,
    pid: u32,
    incarnation: u64,
    stream: &str,
    new_home: &str,
) {
    assert!(signal(pid, libc::SIGCONT));
    cluster.wait_for_status(RECOVERY_BOUND, "node 2 registering again", |status| {
        yr_tests::node_incarnation(status, cluster.node_id(2)).is_some_and(|i| i != incarnation)
    });
    let mut node_2 = NodeStreams::of(cluster, 2);
    assert!(
        wait_until(RECOVERY_BOUND, || node_2.home_of(stream).as_deref()
            == Some(new_home)),
        "the old home still answers for the stream: {:?}",
        node_2.home_of(stream)
    );
}

#[test]
fn a_receive_whose_home_no_node_can_take_over_fails_with_a_code_and_never_hangs() {
    let _exclusive = exclusive();
    let mut cluster = three_nodes();
    yr::init(cluster.config()).unwrap();
    let (_stream, consumer, _sender, mut seen) = stream_homed_on_node_2(&cluster, "orphan");
    receive_all(&cluster, &consumer, &mut seen, 100, TIMEOUT);
    // No master declares node 2 lost, and the meta store is gone with it.
    cluster.kill_master();
    cluster.kill_node(2);
    let started = Instant::now();
    let error = consumer
        .receive(Duration::from_secs(600), 1)
        .expect_err("no node can serve the stream");
    assert!(
        started.elapsed() < RECOVERY_BOUND,
        "the receive failed only after {:?}",
        started.elapsed()
    );
    assert_error(
        &error,
        &[
            yr::ErrorCode::ConnectionFailed,
            yr::ErrorCode::InnerCommunication,
            yr::ErrorCode::EtcdOperationError,
        ],
        &["orphan"],
    );
    eprintln!("failed after {:?}: {error}", started.elapsed());
    let _ = yr::finalize();
    drop(consumer);
}

/// A name for a stream homed on node 2 whose backup is node 1: the owner of the name on the
/// ring of the other nodes (ring positions depend only on node ids).
fn stream_backed_up_on_node_1(cluster: &TestCluster, label: &str) -> String {
    stream_backed_up_by(cluster, label, &[(2, 1)])
}

/// A name whose backup, for each `(home, backup)` of `pairs`, is node `backup` while node
/// `home` is its home: the owner of the name on the ring of the nodes other than `home`.
fn stream_backed_up_by(cluster: &TestCluster, label: &str, pairs: &[(usize, usize)]) -> String {
    use yr_datasystem::kv_ring::{HashRing, Member};
    let member = |index: usize| Member {
        node_id: cluster.node_id(index).to_string(),
        address: String::new(),
    };
    let backup = |name: &str, home: usize| {
        let others = HashRing::new((0..3).filter(|&i| i != home).map(member));
        others.owner(name).map(|m| m.node_id.clone())
    };
    (0..)
        .map(|n| unique(&format!("{label}-{n}")))
        .find(|name| {
            pairs
                .iter()
                .all(|&(home, by)| backup(name, home).as_deref() == Some(cluster.node_id(by)))
        })
        .expect("some name has those backups")
}

/// Node 2, the stream's home, is stopped past the node timeout: node 1, its backup, takes
/// the stream over, and acknowledges 50 elements the consumer has not read yet. When node 2
/// runs again, the ring makes it node 1's backup for the stream while node 2 still holds the
/// stream (fail point `datasystem::stream_forget_stale` makes it learn 4 s late), so node 2
/// refuses node 1's update as the stream's home. The record names node 1: node 1 keeps the
/// stream and waits for node 2 to forget it, and every element arrives once, in order.
#[test]
fn a_new_home_refused_by_an_old_home_that_has_not_learnt_yet_keeps_the_stream() {
    let _exclusive = exclusive();
    let cluster = three_nodes_with(vec![(
        "FAILPOINTS".into(),
        "datasystem::stream_forget_stale=return(4000)".into(),
    )]);
    yr::init(cluster.config()).unwrap();
    // Backed up on node 1 while node 2 is its home; on node 2 once node 1 is.
    let stream = stream_backed_up_by(&cluster, "refused-new-home", &[(2, 1), (1, 2)]);
    let (consumer, sender, mut seen) = homed_on_node_2(&cluster, &stream);
    let incarnation = cluster.node_incarnation(2);
    let pid = cluster.node_pid(2).expect("node 2 runs");
    assert!(signal(pid, libc::SIGSTOP));
    let later = send(&sender, 100, 150);
    receive_all(&cluster, &consumer, &mut seen, 150, RECOVERY_BOUND);
    assert_eq!(yr::get(&later, RECOVERY_BOUND).unwrap(), "");
    let new_home = cluster.node_address(1);
    assert_eq!(
        NodeStreams::of(&cluster, 1).home_of(&stream).as_deref(),
        Some(""),
        "node 1 took the stream over"
    );
    // Acknowledged by node 1, not read yet.
    assert_eq!(
        yr::get(&send(&sender, 150, 200), RECOVERY_BOUND).unwrap(),
        ""
    );

    // Node 1 gives the stream to its new backup, node 2, which refuses it until it forgets it.
    continue_old_home(&cluster, pid, incarnation, &stream, &new_home);
    receive_all(&cluster, &consumer, &mut seen, 200, RECOVERY_BOUND);
    let last = send(&sender, 200, 220);
    receive_all(&cluster, &consumer, &mut seen, 220, RECOVERY_BOUND);
    assert_eq!(yr::get(&last, RECOVERY_BOUND).unwrap(), "");
    assert_eq!(
        seen,
        (0..220).collect::<Vec<_>>(),
        "each element once, in order"
    );
    assert_eq!(
        NodeStreams::of(&cluster, 1).home_of(&stream).as_deref(),
        Some(""),
        "node 1 is still the stream's home"
    );
    yr::finalize().unwrap();
}

#[test]
fn a_subscription_created_while_the_backup_is_down_waits_for_a_new_backup_and_works() {
    let _exclusive = exclusive();
    let mut cluster = three_nodes();
    yr::init(cluster.config()).unwrap();
    let stream = stream_backed_up_on_node_1(&cluster, "lost-backup");
    NodeStreams::of(&cluster, 2).claim(&stream);
    // The backup dies; the home learns it only when the master declares node 1 lost.
    cluster.kill_node(1);
    let started = Instant::now();
    let consumer = yr::create_stream_consumer(
        &stream,
        SubscriptionConfig::new("driver", SubscriptionType::Stream),
    )
    .expect("the create waits for a backup instead of failing");
    eprintln!(
        "the subscription was created {:?} after the backup's kill",
        started.elapsed()
    );
    let producer = yr::create_stream_producer(
        &stream,
        ProducerConfig {
            delay_flush_time: Duration::ZERO,
            ..ProducerConfig::default()
        },
    )
    .unwrap();
    for i in 0..10u32 {
        producer.send(&i.to_le_bytes(), TIMEOUT).unwrap();
    }
    let mut seen = Vec::new();
    receive_all(&cluster, &consumer, &mut seen, 10, TIMEOUT);
    assert_eq!(seen, (0..10).collect::<Vec<_>>());
    // The new backup holds the stream: the home's loss now keeps every element.
    cluster.kill_node(2);
    producer
        .send(&10u32.to_le_bytes(), RECOVERY_BOUND)
        .expect("the producer resumes on the backup that took the stream over");
    receive_all(&cluster, &consumer, &mut seen, 11, RECOVERY_BOUND);
    assert_eq!(
        seen,
        (0..11).collect::<Vec<_>>(),
        "each element once, in order"
    );
    yr::finalize().unwrap();
}
