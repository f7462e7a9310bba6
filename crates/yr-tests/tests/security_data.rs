//! The data port and the object store against a process that tries what it should not (issue
//! #9), on a real two-node cluster: guessing another node's objects by allocation id reads
//! nothing and learns no size; a pull from an address outside the cluster is refused before any
//! connection; the object store is not served on the node's TCP port; and a `pid` in a request
//! does not let one process free another's objects.

use serde_bytes::ByteBuf;
use yr::{ErrorCode, InvokeOptions, ObjectRef};
use yr_proto::ds as pb;
use yr_proto::ds::object_store_client::ObjectStoreClient;
use yr_tests::{exclusive, TestCluster, TIMEOUT};

/// Large enough for shared memory (over 100 KiB).
const LEN: usize = 1 << 20;

fn pattern(len: usize) -> ByteBuf {
    ByteBuf::from((0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>())
}

/// Makes large objects on its node and keeps them.
#[yr::instance]
pub struct Maker {
    kept: Vec<ObjectRef<ByteBuf>>,
}

#[yr::instance]
impl Maker {
    pub fn new() -> Self {
        Maker { kept: Vec::new() }
    }

    pub fn make(&mut self, len: u64) -> ObjectRef<ByteBuf> {
        let object = yr::put(pattern(len as usize)).expect("put");
        self.kept.push(object.clone());
        object
    }

    pub fn node(&self) -> String {
        std::env::var("YR_RUNTIME_ID").unwrap_or_default()
    }
}

/// The object store of the node whose bus is at `bus` (`unix:/path`), as this process.
async fn object_store(bus: &str) -> ObjectStoreClient<tonic::transport::Channel> {
    if yr_transport::current().token.is_none() {
        // A child process: the cluster's token comes in YR_TOKEN.
        let token = yr_common::auth::ClusterToken::resolve(None, None)
            .expect("a valid token")
            .expect("YR_TOKEN");
        yr_transport::install(yr_transport::Credentials::with_token(token));
    }
    let channel = yr_transport::connect(bus, ErrorCode::ConnectionFailed)
        .await
        .expect("the node's socket");
    ObjectStoreClient::new(channel)
}

/// An object made by an instance on node 1, which this driver (on node 0) holds a reference
/// to.
fn object_on_node_1(cluster: &TestCluster) -> ObjectRef<ByteBuf> {
    let maker = yr::instance(Maker::new)
        .options(InvokeOptions {
            cpu: 2_000,
            ..Default::default()
        })
        .invoke(())
        .unwrap();
    let node = yr::get(&maker.method(Maker::node).invoke(()).unwrap(), TIMEOUT).unwrap();
    assert!(
        node.starts_with(cluster.node_id(1)),
        "the maker runs in {node}"
    );
    let inner: ObjectRef<ObjectRef<ByteBuf>> =
        maker.method(Maker::make).invoke((LEN as u64,)).unwrap();
    let object = yr::get(&inner, TIMEOUT).unwrap();
    std::mem::forget(maker);
    object
}

#[test]
fn a_process_cannot_read_another_nodes_object_by_guessing_its_allocation_id() {
    let _lock = exclusive();
    let cluster = yr_tests::two_nodes_with_shared_memory(64);
    yr::init(cluster.config()).unwrap();
    let object = object_on_node_1(&cluster);
    assert!(cluster.wait_metric(1, "yr_shared_memory_objects") >= 1.0);
    // The owner's location carries the capability: the real read works (and leaves node 0
    // its copy, which a driver's reference may have it pull on its own too).
    let value = yr::get(&object, TIMEOUT).unwrap();
    assert!(value == pattern(LEN), "the pulled object differs");
    let before = cluster.wait_metric(0, "yr_shared_memory_objects");
    let (answers, data_port) = yr_tests::block_on(async {
        let node_1 = object_store(&cluster.node_bus_address(1)).await;
        let data_port = node_1
            .clone()
            .pool_info(pb::PoolInfoRequest {})
            .await
            .expect("pool info")
            .into_inner()
            .node_address;
        let mut node_0 = object_store(&cluster.node_bus_address(0)).await;
        let mut answers = Vec::new();
        // Ids are sequential: every small one, with the right size and no capability, a
        // made-up one, or one of the wrong length.
        for allocation in 1..=16u64 {
            for capability in [vec![0u8; 16], vec![0x5a; 16], vec![1u8; 4]] {
                let reply = node_0
                    .pull_object(pb::PullObjectRequest {
                        node_address: data_port.clone(),
                        pool_id: cluster.node_id(1).to_string(),
                        allocation,
                        size: (LEN + 16) as u64,
                        pid: 0,
                        capability: capability.into(),
                        release_source: false,
                    })
                    .await
                    .expect("an answer")
                    .into_inner();
                answers.push(reply);
            }
        }
        (answers, data_port)
    });
    assert!(!data_port.is_empty());
    for reply in &answers {
        let error = reply.error.as_ref().expect("a guess reads nothing");
        assert!(
            error.code == ErrorCode::GetOperationFailed as u32
                || error.code == ErrorCode::ParamInvalid as u32,
            "{error:?}"
        );
        // The answer may repeat what the caller asked, never the object's real size.
        assert!(
            !error.message.contains(&LEN.to_string()),
            "an answer leaks the object's size: {}",
            error.message
        );
        assert_eq!(reply.size, 0);
    }
    // The guesses with a capability of the right length all got the same answer.
    let refused: Vec<&str> = answers
        .iter()
        .filter_map(|reply| reply.error.as_ref())
        .filter(|error| error.code == ErrorCode::GetOperationFailed as u32)
        .map(|error| error.message.as_str())
        .collect();
    assert_eq!(refused.len(), 32);
    assert!(refused
        .iter()
        .all(|message| message.contains("no object that matches this read")));
    // Nothing was left behind on node 0 by the failed pulls.
    assert_eq!(cluster.wait_metric(0, "yr_shared_memory_objects"), before);
    drop((value, object));
    yr::finalize().unwrap();
}

#[test]
fn a_pull_from_an_address_outside_the_cluster_is_refused_without_connecting() {
    let _lock = exclusive();
    let cluster = yr_tests::two_nodes_with_shared_memory(64);
    // A listener that is not a member: the node must never connect to it.
    let outsider = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    outsider.set_nonblocking(true).unwrap();
    let outsider_address = outsider.local_addr().unwrap().to_string();
    let replies = yr_tests::block_on(async {
        let mut node_0 = object_store(&cluster.node_bus_address(0)).await;
        let mut replies = Vec::new();
        // An outsider, and a member's gRPC port (not its data port).
        for address in [outsider_address.clone(), cluster.node_address(1)] {
            let reply = node_0
                .pull_object(pb::PullObjectRequest {
                    node_address: address.clone(),
                    pool_id: "elsewhere".into(),
                    allocation: 1,
                    size: 1 << 20,
                    pid: 0,
                    capability: vec![0u8; 16].into(),
                    release_source: false,
                })
                .await
                .expect("an answer")
                .into_inner();
            replies.push((address, reply));
        }
        replies
    });
    for (address, reply) in replies {
        let error = reply.error.expect("refused");
        assert_eq!(error.code, ErrorCode::ParamInvalid as u32, "{error:?}");
        assert!(
            error.message.contains(&address) && error.message.contains("not the data port"),
            "{}",
            error.message
        );
    }
    // The node answered every pull. A pull connects before it answers, and the kernel completes
    // a connect into the outsider's backlog before the node's connect returns: had the node
    // connected, the connection would be waiting to be accepted now.
    assert!(
        matches!(outsider.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the node connected to an address outside its cluster"
    );
}

#[test]
fn the_object_store_is_not_served_on_the_nodes_tcp_port() {
    let _lock = exclusive();
    let cluster = TestCluster::with_node(yr_tests::NodeSpec {
        shared_memory_mb: Some(16),
        ..yr_tests::NodeSpec::default()
    });
    let status = yr_tests::block_on(async {
        // With the token, so that the request reaches the gRPC server.
        let channel = yr_transport::connect(&cluster.node_address(0), ErrorCode::ConnectionFailed)
            .await
            .expect("the node's TCP port");
        let mut client = ObjectStoreClient::new(channel);
        client
            .create(pb::CreateObjectRequest {
                size: 1 << 20,
                pid: 1,
            })
            .await
            .expect_err("the object store answered on TCP")
    });
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
    assert_eq!(cluster.wait_metric(0, "yr_shared_memory_objects"), 0.0);
}

#[test]
fn a_pid_in_a_request_does_not_release_another_processs_objects() {
    let _lock = exclusive();
    let cluster = TestCluster::with_node(yr_tests::NodeSpec {
        shared_memory_mb: Some(64),
        ..yr_tests::NodeSpec::default()
    });
    yr::init(cluster.config()).unwrap();
    let kept = yr::put(pattern(LEN)).unwrap();
    assert_eq!(cluster.wait_metric(0, "yr_shared_memory_objects"), 1.0);
    let output = yr_tests::output_within(
        {
            let mut child =
                yr_tests::helper_process(env!("CARGO_BIN_EXE_releasing_for_another_process"));
            child
                .env("YR_TESTS_BUS", cluster.node_bus_address(0))
                .env("YR_TESTS_VICTIM", std::process::id().to_string())
                .env(yr_common::auth::TOKEN_ENV, cluster.token().as_str());
            child
        },
        TIMEOUT,
    );
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("DONE"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(cluster.wait_metric(0, "yr_shared_memory_objects"), 1.0);
    assert!(yr::get(&kept, TIMEOUT).unwrap() == pattern(LEN));
    yr::finalize().unwrap();
}
