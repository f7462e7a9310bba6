//! The master as nodes and operators use it: a real master on 127.0.0.1 with a temp data dir,
//! driven through the generated `MasterClient`, the meta store service on the same port
//! (`yr_meta::RemoteStore`) and raw HTTP for `/healthz` and `/metrics`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use yr_common::{ErrorCode, ModuleCode};
use yr_master::{MasterHandle, MasterOptions};
use yr_meta::{MetaStore, RemoteStore};
use yr_proto::v1::master_client::MasterClient;
use yr_proto::v1::{
    ClusterStatusRequest, ClusterStatusResponse, InstanceRecord, InstanceState, MasterCommand,
    NodeInfo, NodeUpdate, RegisterNodeRequest, ResourceDelta, Resources, ScheduleRequest,
    ScheduleResponse,
};

/// Every wait in these tests ends by this deadline.
const DEADLINE: Duration = Duration::from_secs(10);

/// The token every test master and client here shares.
fn token() -> yr_common::auth::ClusterToken {
    static TOKEN: std::sync::OnceLock<yr_common::auth::ClusterToken> = std::sync::OnceLock::new();
    TOKEN
        .get_or_init(|| yr_common::auth::ClusterToken::generate().expect("a token"))
        .clone()
}

async fn start_master(dir: &Path, node_timeout: Duration) -> MasterHandle {
    yr_transport::install(yr_transport::Credentials::with_token(token()));
    let mut options = MasterOptions::new("127.0.0.1:0".parse().unwrap(), dir.to_path_buf());
    options.node_timeout = node_timeout;
    options.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    yr_master::start(options).await.expect("master starts")
}

async fn connect(master: &MasterHandle) -> MasterClient<Channel> {
    let channel = yr_transport::connect(
        &master.address().to_string(),
        yr_common::ErrorCode::InnerCommunication,
    )
    .await
    .expect("connect to the master");
    MasterClient::new(channel)
}

async fn meta(master: &MasterHandle) -> RemoteStore {
    RemoteStore::connect(&format!("http://{}", master.address()))
        .await
        .expect("connect to the meta store service")
}

fn resources(cpu: u64, memory: u64) -> Resources {
    Resources {
        cpu_millicores: cpu,
        memory_mb: memory,
        custom: HashMap::new(),
    }
}

fn node(id: &str, cpu: u64, memory: u64, labels: &[(&str, &str)]) -> NodeInfo {
    NodeInfo {
        node_id: id.to_string(),
        address: format!("127.0.0.1:{}", 20000 + id.len()),
        bus_address: format!("unix:/tmp/{id}.sock"),
        capacity: Some(resources(cpu, memory)),
        allocatable: Some(resources(cpu, memory)),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        state: String::new(),
        incarnation: 0,
    }
}

async fn register(client: &mut MasterClient<Channel>, info: NodeInfo) -> String {
    client
        .register_node(RegisterNodeRequest { node: Some(info) })
        .await
        .expect("register node")
        .into_inner()
        .cluster_id
}

/// A node's heartbeat stream: send deltas with [`Heartbeat::delta`]; empty beats go out every
/// 100 ms until the value is dropped or [`Heartbeat::stop`] is called.
struct Heartbeat {
    updates: mpsc::Sender<NodeUpdate>,
    commands: tonic::Streaming<MasterCommand>,
    beater: tokio::task::JoinHandle<()>,
}

impl Heartbeat {
    async fn open(client: &mut MasterClient<Channel>, node_id: &str) -> Heartbeat {
        let (updates, receiver) = mpsc::channel(16);
        let commands = client
            .node_heartbeat(ReceiverStream::new(receiver))
            .await
            .expect("open heartbeat stream")
            .into_inner();
        let beats = updates.clone();
        let id = node_id.to_string();
        let beater = tokio::spawn(async move {
            loop {
                let beat = NodeUpdate {
                    node_id: id.clone(),
                    delta: None,
                    beat: 0,
                };
                if beats.send(beat).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Heartbeat {
            updates,
            commands,
            beater,
        }
    }

    async fn delta(&self, node_id: &str, cpu: i64, memory: i64) {
        self.updates
            .send(NodeUpdate {
                node_id: node_id.to_string(),
                delta: Some(ResourceDelta {
                    cpu_millicores: cpu,
                    memory_mb: memory,
                    custom: HashMap::new(),
                }),
                beat: 0,
            })
            .await
            .expect("send delta");
    }

    async fn next_command(&mut self) -> MasterCommand {
        tokio::time::timeout(DEADLINE, self.commands.message())
            .await
            .expect("a command within the deadline")
            .expect("heartbeat stream healthy")
            .expect("heartbeat stream open")
    }

    /// Stops beating (the node goes silent) without closing the stream.
    fn stop(&self) {
        self.beater.abort();
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.beater.abort();
    }
}

fn schedule_request(cpu: u64, memory: u64) -> ScheduleRequest {
    ScheduleRequest {
        request: Some(resources(cpu, memory)),
        exclude_nodes: Vec::new(),
        labels: Vec::new(),
        required_affinities: Vec::new(),
    }
}

async fn schedule(
    client: &mut MasterClient<Channel>,
    request: ScheduleRequest,
) -> ScheduleResponse {
    client
        .schedule(request)
        .await
        .expect("schedule rpc")
        .into_inner()
}

async fn status(client: &mut MasterClient<Channel>) -> ClusterStatusResponse {
    client
        .cluster_status(ClusterStatusRequest {})
        .await
        .expect("cluster status rpc")
        .into_inner()
}

/// Polls the cluster status until `check` holds, or panics with the last status at the deadline.
async fn wait_for_status(
    client: &mut MasterClient<Channel>,
    what: &str,
    check: impl Fn(&ClusterStatusResponse) -> bool,
) -> ClusterStatusResponse {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let current = status(client).await;
        if check(&current) {
            return current;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; last status: {current:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn node_state<'a>(status: &'a ClusterStatusResponse, node_id: &str) -> Option<&'a NodeInfo> {
    status.nodes.iter().find(|n| n.node_id == node_id)
}

fn allocatable_cpu(status: &ClusterStatusResponse, node_id: &str) -> Option<u64> {
    node_state(status, node_id)
        .and_then(|n| n.allocatable.as_ref())
        .map(|r| r.cpu_millicores)
}

async fn put_instance(
    store: &RemoteStore,
    id: &str,
    function: &str,
    node: &str,
    state: InstanceState,
) {
    let mut record = InstanceRecord {
        instance_id: id.to_string(),
        function: function.to_string(),
        node_id: node.to_string(),
        job_id: "job-1".to_string(),
        ..Default::default()
    };
    record.set_state(state);
    store
        .put(
            &format!("/yr/instance/{id}"),
            Bytes::from(record.encode_to_vec()),
            None,
        )
        .await
        .expect("write instance record");
}

async fn read_instance(store: &RemoteStore, id: &str) -> InstanceRecord {
    let kv = store
        .get(&format!("/yr/instance/{id}"))
        .await
        .expect("read instance record")
        .expect("instance record exists");
    InstanceRecord::decode(kv.value).expect("decode instance record")
}

fn error_code(response: &ScheduleResponse) -> Option<u32> {
    response.error.as_ref().map(|e| e.code)
}

#[tokio::test]
async fn schedule_prefers_the_roomier_node_and_honours_exclude_and_labels() {
    let dir = tempfile::tempdir().unwrap();
    let master = start_master(dir.path(), Duration::from_secs(5)).await;
    let mut client = connect(&master).await;
    register(&mut client, node("node-a", 2000, 4096, &[("zone", "east")])).await;
    register(
        &mut client,
        node("node-b", 4000, 4096, &[("zone", "west"), ("ssd", "")]),
    )
    .await;

    let placed = schedule(&mut client, schedule_request(500, 100)).await;
    assert_eq!(placed.error, None);
    assert_eq!(
        placed.node_id, "node-b",
        "most free CPU after placement wins"
    );
    assert_eq!(placed.node_address, "127.0.0.1:20006");

    let mut excluding_b = schedule_request(500, 100);
    excluding_b.exclude_nodes = vec!["node-b".into()];
    assert_eq!(schedule(&mut client, excluding_b).await.node_id, "node-a");

    let mut east = schedule_request(500, 100);
    east.labels = vec!["zone=east".into()];
    assert_eq!(schedule(&mut client, east).await.node_id, "node-a");

    let mut ssd = schedule_request(500, 100);
    ssd.labels = vec!["ssd".into()];
    assert_eq!(schedule(&mut client, ssd).await.node_id, "node-b");

    let mut nowhere = schedule_request(500, 100);
    nowhere.labels = vec!["zone=north".into()];
    let refused = schedule(&mut client, nowhere).await;
    assert_eq!(
        error_code(&refused),
        Some(ErrorCode::ResourceNotEnough.number())
    );
    let error = refused.error.unwrap();
    assert_eq!(error.module, ModuleCode::Core.number());
    assert!(
        error.message.contains("lacks label zone=north"),
        "{}",
        error.message
    );
    assert!(refused.node_id.is_empty());

    master.shutdown().await.unwrap();
}

#[tokio::test]
async fn heartbeat_deltas_and_tentative_reservations_steer_placement() {
    let dir = tempfile::tempdir().unwrap();
    let master = start_master(dir.path(), Duration::from_secs(5)).await;
    let mut client = connect(&master).await;
    register(&mut client, node("node-a", 4000, 8192, &[])).await;
    register(&mut client, node("node-b", 4000, 8192, &[])).await;
    let beat_a = Heartbeat::open(&mut client, "node-a").await;
    let beat_b = Heartbeat::open(&mut client, "node-b").await;

    // node-a's local scheduler took 3000m for instances it placed itself.
    beat_a.delta("node-a", -3000, -1024).await;
    wait_for_status(&mut client, "node-a's delta", |s| {
        allocatable_cpu(s, "node-a") == Some(1000)
    })
    .await;

    // Two schedules in a row: the first is reserved on node-b at once (4000 → 2500), and the
    // second is placed against that figure (node-b still has the most room: 2500 → 1000).
    let first = schedule(&mut client, schedule_request(1500, 0)).await;
    assert_eq!(first.node_id, "node-b");
    let current = status(&mut client).await;
    assert_eq!(
        allocatable_cpu(&current, "node-b"),
        Some(2500),
        "reserved at once"
    );
    let second = schedule(&mut client, schedule_request(1500, 0)).await;
    assert_eq!(second.node_id, "node-b");
    // A third does not fit anywhere now: node-b has 1000m left in the view, node-a 1000m.
    let third = schedule(&mut client, schedule_request(1500, 0)).await;
    assert_eq!(
        error_code(&third),
        Some(ErrorCode::ResourceNotEnough.number())
    );
    let message = &third.error.as_ref().unwrap().message;
    assert!(
        message.contains("node-a: not enough free (cpu 1000m of 1500m)"),
        "{message}"
    );

    // node-b accepted only one of them and reports it: its delta replaces the reservations.
    beat_b.delta("node-b", -1500, 0).await;
    let current = wait_for_status(&mut client, "node-b's delta", |s| {
        allocatable_cpu(s, "node-b") == Some(2500)
    })
    .await;
    let b = node_state(&current, "node-b").unwrap();
    assert_eq!(b.capacity.as_ref().unwrap().cpu_millicores, 4000);
    assert_eq!(b.state, "alive");
    assert_eq!(
        schedule(&mut client, schedule_request(1500, 0))
            .await
            .node_id,
        "node-b"
    );

    drop((beat_a, beat_b));
    master.shutdown().await.unwrap();
}

#[tokio::test]
async fn too_large_for_every_node_is_1006_and_busy_cluster_is_1002() {
    let dir = tempfile::tempdir().unwrap();
    let master = start_master(dir.path(), Duration::from_secs(5)).await;
    let mut client = connect(&master).await;

    // No node yet.
    let empty = schedule(&mut client, schedule_request(100, 100)).await;
    assert_eq!(
        error_code(&empty),
        Some(ErrorCode::ResourceNotEnough.number())
    );

    register(&mut client, node("small", 1000, 1024, &[])).await;
    register(&mut client, node("large", 2000, 4096, &[])).await;

    let too_big = schedule(&mut client, schedule_request(3000, 100)).await;
    assert_eq!(
        error_code(&too_big),
        Some(ErrorCode::ResourceConfigError.number())
    );
    let message = &too_big.error.as_ref().unwrap().message;
    assert!(
        message.starts_with("request resource is greater than each node's max resource"),
        "{message}"
    );
    assert!(
        message.contains("cpu: 3000m") && message.contains("large"),
        "{message}"
    );

    let mut custom = schedule_request(100, 100);
    custom
        .request
        .as_mut()
        .unwrap()
        .custom
        .insert("gpu".into(), 1.0);
    assert_eq!(
        error_code(&schedule(&mut client, custom).await),
        Some(ErrorCode::ResourceConfigError.number())
    );

    // Fits large's capacity, but large is busy.
    let beat = Heartbeat::open(&mut client, "large").await;
    beat.delta("large", -1500, 0).await;
    wait_for_status(&mut client, "large's delta", |s| {
        allocatable_cpu(s, "large") == Some(500)
    })
    .await;
    let busy = schedule(&mut client, schedule_request(1500, 100)).await;
    assert_eq!(
        error_code(&busy),
        Some(ErrorCode::ResourceNotEnough.number())
    );
    let message = &busy.error.as_ref().unwrap().message;
    assert!(message.contains("small: capacity too small"), "{message}");
    assert!(message.contains("large: not enough free"), "{message}");

    drop(beat);
    master.shutdown().await.unwrap();
}

#[tokio::test]
async fn heartbeat_from_an_unknown_node_is_told_to_reregister() {
    let dir = tempfile::tempdir().unwrap();
    let master = start_master(dir.path(), Duration::from_secs(5)).await;
    let mut client = connect(&master).await;
    let mut stranger = Heartbeat::open(&mut client, "stranger").await;
    assert!(stranger.next_command().await.reregister);
    // Once registered, its beats are accepted and it shows as alive.
    register(&mut client, node("stranger", 1000, 1024, &[])).await;
    stranger.delta("stranger", -250, 0).await;
    wait_for_status(&mut client, "the stranger's delta", |s| {
        allocatable_cpu(s, "stranger") == Some(750)
    })
    .await;
    drop(stranger);
    master.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_leader_tells_its_node_timeout_and_acknowledges_each_numbered_beat_of_an_alive_node() {
    let dir = tempfile::tempdir().unwrap();
    let master = start_master(dir.path(), Duration::from_millis(1500)).await;
    let mut client = connect(&master).await;
    let reply = client
        .register_node(RegisterNodeRequest {
            node: Some(node("beating", 1000, 1024, &[])),
        })
        .await
        .expect("register node")
        .into_inner();
    assert_eq!(reply.node_timeout_ms, 1500, "the node fences itself by it");
    // A stream of its own, so that the only beats are numbered ones.
    let (updates, receiver) = mpsc::channel(16);
    let mut commands = client
        .node_heartbeat(ReceiverStream::new(receiver))
        .await
        .expect("open heartbeat stream")
        .into_inner();
    for beat in [1, 2, 7] {
        updates
            .send(NodeUpdate {
                node_id: "beating".into(),
                delta: None,
                beat,
            })
            .await
            .unwrap();
        let command = tokio::time::timeout(DEADLINE, commands.message())
            .await
            .expect("an answer within the deadline")
            .expect("heartbeat stream healthy")
            .expect("heartbeat stream open");
        assert_eq!(
            command,
            MasterCommand {
                reregister: false,
                beat
            }
        );
    }
    // An unknown node's numbered beat is not acknowledged: it is told to register.
    updates
        .send(NodeUpdate {
            node_id: "stranger".into(),
            delta: None,
            beat: 8,
        })
        .await
        .unwrap();
    let command = tokio::time::timeout(DEADLINE, commands.message())
        .await
        .expect("an answer within the deadline")
        .expect("heartbeat stream healthy")
        .expect("heartbeat stream open");
    assert_eq!(
        command,
        MasterCommand {
            reregister: true,
            beat: 0
        }
    );
    drop(updates);
    master.shutdown().await.unwrap();
}

#[tokio::test]
async fn silent_node_is_lost_and_its_instances_become_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let master = start_master(dir.path(), Duration::from_millis(500)).await;
    let mut client = connect(&master).await;
    let store = meta(&master).await;
    register(&mut client, node("steady", 2000, 2048, &[])).await;
    register(&mut client, node("silent", 8000, 2048, &[])).await;
    let _steady = Heartbeat::open(&mut client, "steady").await;
    let silent = Heartbeat::open(&mut client, "silent").await;

    put_instance(&store, "on-silent", "f", "silent", InstanceState::Running).await;
    put_instance(
        &store,
        "creating-on-silent",
        "f",
        "silent",
        InstanceState::Creating,
    )
    .await;
    put_instance(
        &store,
        "exited-on-silent",
        "f",
        "silent",
        InstanceState::Exited,
    )
    .await;
    put_instance(&store, "on-steady", "g", "steady", InstanceState::Running).await;
    assert_eq!(
        schedule(&mut client, schedule_request(100, 0))
            .await
            .node_id,
        "silent"
    );

    silent.stop();
    let started = tokio::time::Instant::now();
    let current = wait_for_status(
        &mut client,
        "silent to be lost and its instances FATAL",
        |s| {
            node_state(s, "silent").is_some_and(|n| n.state == "lost")
                && s.instances
                    .iter()
                    .filter(|i| i.state() == InstanceState::Fatal)
                    .count()
                    == 2
        },
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "lost within a few timeouts, took {:?}",
        started.elapsed()
    );
    assert_eq!(node_state(&current, "steady").unwrap().state, "alive");

    for id in ["on-silent", "creating-on-silent"] {
        let record = read_instance(&store, id).await;
        assert_eq!(record.state(), InstanceState::Fatal, "{id}");
        let error = record.error.expect("a FATAL record carries its error");
        assert_eq!(error.code, ErrorCode::InstanceExited.number());
        assert_eq!(error.module, ModuleCode::Core.number());
        assert!(
            error.message.contains("node silent was lost"),
            "{}",
            error.message
        );
    }
    assert_eq!(
        read_instance(&store, "exited-on-silent").await.state(),
        InstanceState::Exited
    );
    assert_eq!(
        read_instance(&store, "on-steady").await.state(),
        InstanceState::Running
    );

    // Placement no longer uses the lost node, although it had more room.
    assert_eq!(
        schedule(&mut client, schedule_request(100, 0))
            .await
            .node_id,
        "steady"
    );
    let too_big_now = schedule(&mut client, schedule_request(4000, 0)).await;
    assert_eq!(
        error_code(&too_big_now),
        Some(ErrorCode::ResourceConfigError.number()),
        "capacity is counted over live nodes only"
    );

    drop(silent);
    master.shutdown().await.unwrap();
}

#[tokio::test]
async fn restarted_master_recovers_nodes_and_instances_and_accepts_reregistration() {
    let dir = tempfile::tempdir().unwrap();
    let node_timeout = Duration::from_millis(1500);
    let master = start_master(dir.path(), node_timeout).await;
    let mut client = connect(&master).await;
    let store = meta(&master).await;
    let cluster_id = register(
        &mut client,
        node("returning", 2000, 2048, &[("zone", "east")]),
    )
    .await;
    register(&mut client, node("gone", 2000, 2048, &[])).await;
    let beats = [
        Heartbeat::open(&mut client, "returning").await,
        Heartbeat::open(&mut client, "gone").await,
    ];
    put_instance(
        &store,
        "i-returning",
        "counter",
        "returning",
        InstanceState::Running,
    )
    .await;
    put_instance(&store, "i-gone", "counter", "gone", InstanceState::Running).await;
    drop(store);
    drop(client);
    master.shutdown().await.unwrap();
    drop(beats);

    let master = start_master(dir.path(), node_timeout).await;
    let mut client = connect(&master).await;
    let recovered = status(&mut client).await;
    assert_eq!(recovered.nodes.len(), 2, "{recovered:#?}");
    for n in &recovered.nodes {
        assert_eq!(n.state, "recovering", "{n:?}");
    }
    assert_eq!(
        node_state(&recovered, "returning")
            .unwrap()
            .labels
            .get("zone")
            .map(String::as_str),
        Some("east")
    );
    assert_eq!(recovered.instances.len(), 2);
    assert!(recovered
        .instances
        .iter()
        .all(|i| i.state() == InstanceState::Running));
    // A recovering node is not placed on until it registers again.
    let before = schedule(&mut client, schedule_request(100, 0)).await;
    assert_eq!(
        error_code(&before),
        Some(ErrorCode::ResourceNotEnough.number())
    );

    // The returning node's stream tells it to register again; it does, and is accepted.
    let mut beat = Heartbeat::open(&mut client, "returning").await;
    assert!(beat.next_command().await.reregister);
    assert_eq!(
        register(
            &mut client,
            node("returning", 2000, 2048, &[("zone", "east")])
        )
        .await,
        cluster_id,
        "the cluster id survives the restart"
    );
    assert_eq!(
        schedule(&mut client, schedule_request(100, 0))
            .await
            .node_id,
        "returning"
    );

    // The node that never came back is lost after the timeout, and its instance fails.
    let store = meta(&master).await;
    let current = wait_for_status(&mut client, "gone to be lost", |s| {
        node_state(s, "gone").is_some_and(|n| n.state == "lost")
            && s.instances
                .iter()
                .any(|i| i.instance_id == "i-gone" && i.state() == InstanceState::Fatal)
    })
    .await;
    assert_eq!(node_state(&current, "returning").unwrap().state, "alive");
    assert_eq!(
        read_instance(&store, "i-returning").await.state(),
        InstanceState::Running
    );
    assert_eq!(
        read_instance(&store, "i-gone").await.error.unwrap().code,
        ErrorCode::InstanceExited.number()
    );

    drop(beat);
    master.shutdown().await.unwrap();
}

#[tokio::test]
async fn cluster_status_lists_nodes_instances_and_functions() {
    let dir = tempfile::tempdir().unwrap();
    let master = start_master(dir.path(), Duration::from_secs(5)).await;
    let mut client = connect(&master).await;
    let store = meta(&master).await;
    let mut info = node("node-a", 3000, 6144, &[("zone", "east")]);
    info.allocatable = Some(resources(2500, 6000));
    register(&mut client, info).await;
    put_instance(&store, "i-1", "counter", "node-a", InstanceState::Running).await;
    put_instance(&store, "i-2", "adder", "node-a", InstanceState::Creating).await;
    store
        .put(
            "/yr/function/registered_only",
            Bytes::from_static(b"{}"),
            None,
        )
        .await
        .unwrap();

    let current = wait_for_status(&mut client, "both instances", |s| s.instances.len() == 2).await;
    let a = node_state(&current, "node-a").unwrap();
    assert_eq!(a.address, "127.0.0.1:20006");
    assert_eq!(a.bus_address, "unix:/tmp/node-a.sock");
    assert_eq!(a.state, "alive");
    assert_eq!(a.capacity, Some(resources(3000, 6144)));
    assert_eq!(a.allocatable, Some(resources(2500, 6000)));
    assert_eq!(a.labels.get("zone").map(String::as_str), Some("east"));
    let one = current
        .instances
        .iter()
        .find(|i| i.instance_id == "i-1")
        .unwrap();
    assert_eq!(one.function, "counter");
    assert_eq!(one.node_id, "node-a");
    assert_eq!(one.job_id, "job-1");
    assert_eq!(one.state(), InstanceState::Running);
    assert_eq!(
        current.functions,
        vec!["adder", "counter", "registered_only"]
    );

    // A deleted record leaves the view.
    store.delete("/yr/instance/i-2").await.unwrap();
    wait_for_status(&mut client, "i-2 to leave", |s| s.instances.len() == 1).await;

    master.shutdown().await.unwrap();
}

async fn http_get(address: SocketAddr, path: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream
        .write_all(
            format!(
                "GET {path} HTTP/1.1\r\nHost: master\r\nAuthorization: Bearer {}\r\n\r\n",
                token().as_str()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(DEADLINE, stream.read_to_string(&mut response))
        .await
        .expect("response within the deadline")
        .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a response head");
    (head.to_string(), body.to_string())
}

#[tokio::test]
async fn healthz_and_metrics_respond() {
    let dir = tempfile::tempdir().unwrap();
    let master = start_master(dir.path(), Duration::from_secs(5)).await;
    let metrics = master.metrics_address().expect("metrics listener");
    let (head, body) = http_get(metrics, "/healthz").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "ok\n");

    let mut client = connect(&master).await;
    let store = meta(&master).await;
    register(&mut client, node("node-a", 3000, 4096, &[])).await;
    schedule(&mut client, schedule_request(100, 0)).await;
    schedule(&mut client, schedule_request(100_000, 0)).await;
    put_instance(&store, "i-1", "f", "node-a", InstanceState::Running).await;
    wait_for_status(&mut client, "the instance", |s| s.instances.len() == 1).await;

    let (head, body) = http_get(metrics, "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    for line in [
        "yr_master_nodes{state=\"alive\"} 1",
        "yr_master_nodes{state=\"lost\"} 0",
        "yr_master_schedule_requests_total 2",
        "yr_master_schedule_failures_total{code=\"1006\"} 1",
        "yr_master_schedule_failures_total{code=\"1002\"} 0",
        "yr_master_instances{state=\"RUNNING\"} 1",
        "yr_master_instances{state=\"FATAL\"} 0",
        "yr_cluster_cpu_capacity_millicores 3000",
        "# TYPE yr_master_schedule_requests_total counter",
    ] {
        assert!(
            body.lines().any(|l| l == line),
            "missing {line:?} in:\n{body}"
        );
    }

    let (head, _) = http_get(metrics, "/nope").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    master.shutdown().await.unwrap();
}
