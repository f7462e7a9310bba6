//! Streams across two nodes: a stream lives on the node that first used it, and producers and
//! consumers attached to the other node reach it there. Elements keep their order and none is
//! lost, and the global counts see both nodes.

use std::time::Duration;

use yr::{InvokeOptions, ProducerConfig, SubscriptionConfig, SubscriptionType};
use yr_tests::{exclusive, unique, NodeSpec, TestCluster, TIMEOUT};

/// A stream user that runs in a runtime on the other node.
#[yr::instance]
pub struct StreamPeer {
    consumer: Option<yr::Consumer>,
}

#[yr::instance]
impl StreamPeer {
    pub fn new() -> Self {
        StreamPeer { consumer: None }
    }

    /// The runtime id, which starts with the node id.
    pub fn runtime(&mut self) -> String {
        std::env::var("YR_RUNTIME_ID").unwrap_or_default()
    }

    /// Subscribe to `stream` (creating it on this node if it is new).
    pub fn subscribe(&mut self, stream: String) -> bool {
        let subscription = SubscriptionConfig::new("peer", SubscriptionType::Stream);
        self.consumer = yr::create_stream_consumer(&stream, subscription).ok();
        self.consumer.is_some()
    }

    /// Receive `count` elements (numbers), acking as it goes.
    pub fn take(&mut self, count: usize) -> Vec<u32> {
        let Some(consumer) = &self.consumer else {
            return Vec::new();
        };
        let mut numbers = Vec::with_capacity(count);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while numbers.len() < count && std::time::Instant::now() < deadline {
            let Ok(elements) = consumer.receive(Duration::from_secs(1), 0) else {
                break;
            };
            for element in &elements {
                numbers.push(u32::from_le_bytes(
                    element.value[..4].try_into().unwrap_or_default(),
                ));
            }
            if let Some(last) = elements.last() {
                let _ = consumer.ack(last.id);
            }
        }
        numbers
    }

    /// Send the numbers `0..count` to `stream`, then close the producer.
    pub fn produce(&mut self, stream: String, count: u32) -> String {
        let result = (|| {
            let producer = yr::create_stream_producer(&stream, small())?;
            for i in 0..count {
                producer.send(&element(i), Duration::from_secs(10))?;
            }
            producer.close()
        })();
        match result {
            Ok(()) => String::new(),
            Err(error) => error.to_string(),
        }
    }
}

/// A small stream (16 KiB), so that back-pressure crosses the nodes too.
fn small() -> ProducerConfig {
    ProducerConfig {
        page_size: 4096,
        max_stream_size: 16 * 1024,
        ..ProducerConfig::default()
    }
}

/// Number `i` padded to 100 bytes.
fn element(i: u32) -> Vec<u8> {
    let mut element = vec![0u8; 100];
    element[..4].copy_from_slice(&i.to_le_bytes());
    element
}

const COUNT: u32 = 1000;

/// Node 0 (the driver's) is too small for the peer, which runs on node 1.
fn two_nodes() -> TestCluster {
    TestCluster::builder()
        .node(NodeSpec {
            cpu: 1_000,
            ..NodeSpec::default()
        })
        .node(NodeSpec {
            cpu: 4_000,
            ..NodeSpec::default()
        })
        .start()
}

fn peer_on_node_1(cluster: &TestCluster) -> yr::InstanceHandle<StreamPeer> {
    let peer = yr::instance(StreamPeer::new)
        .options(InvokeOptions {
            cpu: 2_000,
            ..Default::default()
        })
        .invoke(())
        .unwrap();
    let runtime = yr::get(
        &peer.method(StreamPeer::runtime).invoke(()).unwrap(),
        TIMEOUT,
    )
    .unwrap();
    assert!(
        runtime.starts_with(cluster.node_id(1)),
        "the peer runs in {runtime}, not on {}",
        cluster.node_id(1)
    );
    peer
}

#[test]
fn a_driver_on_one_node_produces_to_a_consumer_on_the_other_node() {
    let _lock = exclusive();
    let cluster = two_nodes();
    yr::init(cluster.config()).unwrap();
    let peer = peer_on_node_1(&cluster);
    let stream = unique("to-node-1");
    // The consumer on node 1 makes node 1 the stream's home.
    let subscribed = peer
        .method(StreamPeer::subscribe)
        .invoke((stream.clone(),))
        .unwrap();
    assert!(yr::get(&subscribed, TIMEOUT).unwrap());
    let taken = peer
        .method(StreamPeer::take)
        .invoke((COUNT as usize,))
        .unwrap();
    // The driver's producer on node 0 is sent to node 1.
    let producer = yr::create_stream_producer(&stream, small()).unwrap();
    assert_eq!(yr::query_global_producers_num(&stream).unwrap(), 1);
    assert_eq!(yr::query_global_consumers_num(&stream).unwrap(), 1);
    for i in 0..COUNT {
        producer.send(&element(i), TIMEOUT).unwrap();
    }
    producer.close().unwrap();
    let numbers = yr::get(&taken, Duration::from_secs(60)).unwrap();
    assert_eq!(numbers, (0..COUNT).collect::<Vec<_>>());
    // Deleting from node 0 reaches the home on node 1, which refuses while the consumer lives.
    let error = yr::delete_stream(&stream).unwrap_err();
    assert_eq!(error.code(), yr::ErrorCode::DatasystemFailed, "{error}");
    yr::finalize().unwrap();
}

#[test]
fn a_runtime_on_one_node_produces_to_a_driver_on_the_other_node() {
    let _lock = exclusive();
    let cluster = two_nodes();
    yr::init(cluster.config()).unwrap();
    let peer = peer_on_node_1(&cluster);
    let stream = unique("to-node-0");
    // The driver's consumer makes node 0 the stream's home.
    let consumer = yr::create_stream_consumer(
        &stream,
        SubscriptionConfig::new("driver", SubscriptionType::Stream),
    )
    .unwrap();
    let produced = peer
        .method(StreamPeer::produce)
        .invoke((stream.clone(), COUNT))
        .unwrap();
    let mut next = 0u32;
    while next < COUNT {
        let elements = consumer.receive(TIMEOUT, 0).unwrap();
        assert!(!elements.is_empty(), "nothing arrived after {next}");
        for element in &elements {
            let i = u32::from_le_bytes(element.value[..4].try_into().unwrap());
            assert_eq!(i, next, "out of order");
            next += 1;
        }
        consumer.ack(elements.last().unwrap().id).unwrap();
    }
    assert_eq!(yr::get(&produced, TIMEOUT).unwrap(), "");
    consumer.close().unwrap();
    assert_eq!(yr::query_global_consumers_num(&stream).unwrap(), 0);
    yr::delete_stream(&stream).unwrap();
    yr::finalize().unwrap();
}
