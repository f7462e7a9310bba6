//! Attacks on a running cluster, played over the wire the way an outsider on the same machine
//! would: each speaks the protocol directly (`yr_tests::raw_channel`) without the cluster token,
//! with a wrong one, or with the right one but lying about who it is, and checks that nothing
//! happened (no command ran, no node registered, no key written, no object freed) and that the
//! cluster still serves.

use std::io::{Read, Write};
use std::time::Duration;

use yr::ErrorCode;
use yr_common::auth::ClusterToken;
use yr_proto::v1 as pb;
use yr_tests::{block_on, exclusive, unique, wait_until, TestCluster, TIMEOUT};

#[yr::instance]
pub struct Counter {
    value: i64,
}

#[yr::instance]
impl Counter {
    pub fn new(start: i64) -> Self {
        Counter { value: start }
    }

    pub fn add(&mut self, n: i64) -> i64 {
        self.value += n;
        self.value
    }
}

fn wrong_token() -> ClusterToken {
    ClusterToken::generate().expect("a token")
}

fn shell_registration(proof: &std::path::Path) -> pb::RegisterClient {
    pb::RegisterClient {
        kind: pb::ClientKind::Driver as i32,
        job_id: unique("attacker"),
        binary_path: "/bin/sh".into(),
        binary_hash: yr_common::binary_hash(std::path::Path::new("/bin/sh")),
        pid: 1,
        runtime_args: vec!["-c".into(), format!("touch {}", proof.display())],
        ..Default::default()
    }
}

#[test]
fn a_client_cannot_make_a_node_run_a_command_with_or_without_the_token() {
    let _exclusive = exclusive();
    let cluster = TestCluster::start();
    let proof = std::env::temp_dir().join(unique("yr-rce-proof"));
    for address in [cluster.node_address(0), cluster.bus_address()] {
        for token in [None, Some(wrong_token())] {
            let answer =
                yr_tests::bus_register(&address, token.clone(), shell_registration(&proof));
            assert!(
                answer.is_err(),
                "a session on {address} without the right token was let in: {answer:?}"
            );
        }
        // With the token, the node still runs only what a driver runs itself.
        let answer = yr_tests::bus_register(
            &address,
            Some(cluster.token().clone()),
            shell_registration(&proof),
        )
        .expect("a token holder gets an answer");
        match answer {
            pb::bus_response::Body::Error(error) => {
                assert_eq!(error.code, ErrorCode::AuthorizeFailed as u32, "{error:?}")
            }
            other => panic!("the node accepted /bin/sh as a driver binary: {other:?}"),
        }
    }
    // A warm pool would have started the command within this time; it never does.
    assert!(
        !wait_until(Duration::from_secs(3), || proof.exists()),
        "the command ran: {} exists",
        proof.display()
    );
    // And the cluster serves its real users.
    yr::init(cluster.config()).unwrap();
    let counter = yr::instance(Counter::new).invoke((1,)).unwrap();
    let one = counter.method(Counter::add).invoke((1,)).unwrap();
    assert_eq!(yr::get(&one, TIMEOUT).unwrap(), 2);
    yr::finalize().unwrap();
}

fn rogue_node(id: &str) -> pb::RegisterNodeRequest {
    pb::RegisterNodeRequest {
        node: Some(pb::NodeInfo {
            node_id: id.to_string(),
            address: "127.0.0.1:1".into(),
            capacity: Some(pb::Resources {
                cpu_millicores: 1_000_000_000,
                memory_mb: 1_000_000_000,
                ..Default::default()
            }),
            state: "ready".into(),
            ..Default::default()
        }),
    }
}

#[test]
fn register_node_and_meta_store_writes_without_the_token_are_refused() {
    let _exclusive = exclusive();
    let cluster = TestCluster::start();
    let master = cluster.master_address();
    let rogue = unique("rogue");
    let key = format!("/yr/{}", unique("planted"));
    for token in [None, Some(wrong_token())] {
        let registered = block_on(async {
            let channel = yr_tests::raw_channel(&master, token.clone()).await?;
            pb::master_client::MasterClient::new(channel)
                .register_node(rogue_node(&rogue))
                .await
                .map_err(|s| s.to_string())
        });
        assert!(
            registered.is_err(),
            "a rogue node registered: {registered:?}"
        );
        let written = block_on(async {
            let channel = yr_tests::raw_channel(&master, token.clone()).await?;
            yr_proto::meta::meta_service_client::MetaServiceClient::new(channel)
                .put(yr_proto::meta::PutRequest {
                    key: key.clone(),
                    value: b"owned".to_vec().into(),
                    ..Default::default()
                })
                .await
                .map_err(|s| s.to_string())
        });
        assert!(written.is_err(), "a key was written: {written:?}");
    }
    let status = cluster.status().expect("the master answers its cluster");
    assert!(
        status.nodes.iter().all(|n| n.node_id != rogue),
        "the rogue node is listed: {:?}",
        status.nodes
    );
    assert_eq!(cluster.stored_instance("x").ok(), Some(None));
    let stored = block_on(async {
        let channel = yr_transport::connect(&master, ErrorCode::InnerCommunication)
            .await
            .map_err(|e| e.to_string())?;
        yr_proto::meta::meta_service_client::MetaServiceClient::new(channel)
            .get(yr_proto::meta::GetRequest { key: key.clone() })
            .await
            .map(|r| r.into_inner().kv)
            .map_err(|s| s.to_string())
    });
    assert_eq!(stored, Ok(None), "nothing was stored under {key}");
}

#[test]
fn an_oversize_message_is_refused_and_the_node_stays_up() {
    let _exclusive = exclusive();
    let cluster = TestCluster::start();
    let bus = cluster.bus_address();
    let token = cluster.token().clone();
    let result = block_on(async {
        let channel = yr_tests::raw_channel(&bus, Some(token)).await?;
        // The attacker skips the client-side limit, so that the server's own limit is what
        // refuses the message.
        let mut client = yr_proto::ds::data_worker_client::DataWorkerClient::new(channel)
            .max_encoding_message_size(usize::MAX);
        let huge = client
            .kv_set(yr_proto::ds::KvSetRequest {
                key: "huge".into(),
                value: vec![7u8; 65 << 20].into(),
                ..Default::default()
            })
            .await;
        let small = client
            .kv_set(yr_proto::ds::KvSetRequest {
                key: "small".into(),
                value: b"fine".to_vec().into(),
                ..Default::default()
            })
            .await;
        Ok::<_, String>((huge, small))
    })
    .expect("the node accepts the connection");
    let (huge, small) = result;
    let status = huge.expect_err("a 65 MiB message is refused");
    assert!(
        status.message().contains("message length too large")
            || status.code() == tonic::Code::OutOfRange
            || status.code() == tonic::Code::ResourceExhausted,
        "a clear error: {status:?}"
    );
    let small = small.expect("the node still serves the same connection");
    assert!(small.into_inner().error.is_none());
    assert!(yr_tests::alive(cluster.node_pid(0).expect("node pid")));
}

fn http_get(address: &str, path: &str, token: Option<&ClusterToken>) -> String {
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let authorization = token
        .map(|t| format!("Authorization: {}\r\n", t.header_value()))
        .unwrap_or_default();
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n{authorization}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).expect("write");
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}

#[test]
fn metrics_need_the_token_and_healthz_is_open() {
    let _exclusive = exclusive();
    let cluster = TestCluster::start();
    let node_metrics = cluster.node_metrics_address(0);
    for address in [cluster.master_metrics_address(), node_metrics] {
        assert!(http_get(&address, "/healthz", None).starts_with("HTTP/1.1 200"));
        for token in [None, Some(&wrong_token())] {
            let answer = http_get(&address, "/metrics", token);
            assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
            assert!(!answer.contains("yr_"), "no figures leak: {answer}");
        }
        let answer = http_get(&address, "/metrics", Some(cluster.token()));
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
}

#[test]
fn a_runtime_call_socket_refuses_callers_without_the_token() {
    let _exclusive = exclusive();
    let cluster = TestCluster::start();
    yr::init(cluster.config()).unwrap();
    let counter = yr::instance(Counter::new).invoke((0,)).unwrap();
    let first = counter.method(Counter::add).invoke((1,)).unwrap();
    assert_eq!(yr::get(&first, TIMEOUT).unwrap(), 1);
    let record = cluster
        .stored_instance(counter.id())
        .expect("the meta store answers")
        .expect("the instance is recorded");
    let calls = yr_common::sockets::call_socket(std::path::Path::new(
        record
            .runtime_address
            .strip_prefix("unix:")
            .expect("a unix address"),
    ));
    let call = pb::CallRequest {
        call_id: 1,
        instance_id: counter.id().to_string(),
        kind: pb::CallKind::Method as i32,
        function: record.function.replace("::new", "::add"),
        return_nums: 1,
        ..Default::default()
    };
    let mut frame = Vec::new();
    use prost::Message;
    frame.extend_from_slice(&(call.encoded_len() as u64).to_le_bytes());
    call.encode(&mut frame).expect("encode");
    for hello in [Vec::new(), wrong_token().hello()] {
        let mut stream = std::os::unix::net::UnixStream::connect(&calls).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        stream.write_all(&hello).expect("write the hello");
        let _ = stream.write_all(&frame);
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        assert_eq!(
            answer,
            vec![yr_common::auth::HELLO_REFUSED],
            "the runtime answers a refusal and closes, with no result"
        );
    }
    // The refused calls never ran: the counter moved only by the real call.
    let second = counter.method(Counter::add).invoke((1,)).unwrap();
    assert_eq!(yr::get(&second, TIMEOUT).unwrap(), 2);
    yr::finalize().unwrap();
}

#[test]
fn a_bus_session_claiming_another_process_cannot_free_its_objects() {
    let _exclusive = exclusive();
    let cluster = TestCluster::start();
    yr::init(cluster.config()).unwrap();
    // Above 100 KiB: the value lives in the node's shared memory, held for this process.
    let value: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
    let object = yr::put(value.clone()).unwrap();
    let output = yr_tests::helper_process(env!("CARGO_BIN_EXE_claimant"))
        .env("CLAIMANT_BUS", cluster.bus_address())
        .env("CLAIMANT_VICTIM", std::process::id().to_string())
        .env("CLAIMANT_TOKEN", cluster.token().as_str())
        .output()
        .expect("run the claimant");
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(printed.contains("CLAIMANT Ok("), "{printed}");
    // The claimant's session ended; had the node believed its pid, this process's objects
    // would be gone now.
    // A new object takes the first free range: the old one's, had it been freed.
    let other = vec![1u8; 1 << 20];
    let again = yr::put(other.clone()).unwrap();
    let read: Vec<u8> = yr::get(&object, TIMEOUT).unwrap();
    assert!(read == value, "the object is intact");
    assert!(yr::get(&again, TIMEOUT).unwrap() == other);
    yr::finalize().unwrap();
}

#[yr::instance]
pub struct Summer {}

#[yr::instance]
impl Summer {
    pub fn new() -> Self {
        Summer {}
    }

    /// The sum of the bytes and the node this runs on.
    pub fn sum(&self, bytes: Vec<u8>) -> (u64, String) {
        (
            bytes.iter().map(|b| u64::from(*b)).sum(),
            std::env::var("YR_RUNTIME_ID").unwrap_or_default(),
        )
    }
}

#[test]
fn a_tls_cluster_serves_calls_across_nodes_and_refuses_peers_without_its_certificates() {
    let _exclusive = exclusive();
    let cluster = TestCluster::builder()
        .tls()
        .node(yr_tests::NodeSpec {
            cpu: 1_000,
            ..Default::default()
        })
        .node(yr_tests::NodeSpec {
            cpu: 4_000,
            ..Default::default()
        })
        .start();
    yr::init(cluster.config()).unwrap();
    // Too big for node 0: placed on node 1 through the master, over mutual TLS.
    let summer = yr::instance(Summer::new)
        .options(yr::InvokeOptions {
            cpu: 2_000,
            ..Default::default()
        })
        .invoke(())
        .unwrap();
    // Above 100 KiB: the argument travels by reference, and node 1 pulls it from node 0's
    // data port, in TLS.
    let bytes: Vec<u8> = (0..(512 << 10)).map(|i| (i % 251) as u8).collect();
    let expected: u64 = bytes.iter().map(|b| u64::from(*b)).sum();
    let (sum, runtime) = yr::get(
        &summer.method(Summer::sum).invoke((bytes,)).unwrap(),
        TIMEOUT,
    )
    .unwrap();
    assert_eq!(sum, expected);
    assert!(runtime.starts_with(cluster.node_id(1)), "ran on {runtime}");
    yr::finalize().unwrap();

    // The token alone is not enough: without a certificate of the cluster's CA, nothing.
    let master = cluster.master_address();
    let plain = block_on(yr_tests::raw_channel(
        &master,
        Some(cluster.token().clone()),
    ));
    assert!(
        plain.is_err(),
        "a plain connection with the token got through"
    );
    let other = yr_tests::TempDir::new("other-ca");
    let (other_ca, [(cert, key)]) =
        yr_transport::tls::test_certificates::<1>(other.path()).expect("certificates");
    let stranger = yr_transport::Credentials {
        tls: Some(std::sync::Arc::new(
            yr_transport::Tls::load(&cert, &key, &other_ca).expect("load"),
        )),
        ..yr_transport::Credentials::with_token(cluster.token().clone())
    };
    let refused = std::sync::atomic::AtomicBool::new(false);
    let opened = block_on(yr_transport::open(
        &yr_transport::Address::Tcp(master.clone()),
        &stranger,
        &refused,
    ));
    assert!(opened.is_err(), "a certificate of another CA got through");
    cluster
        .status()
        .expect("the master still serves its members");
}

#[test]
fn a_driver_with_a_wrong_token_gets_1014_at_init_and_nothing_starts() {
    let _exclusive = exclusive();
    let cluster = TestCluster::start();
    let mut config = cluster.config();
    config.token = Some(wrong_token());
    let error = yr::init(config).expect_err("a wrong token is refused");
    assert_eq!(error.code(), ErrorCode::AuthorizeFailed, "{error}");
    assert!(error.message().contains("token"), "{error}");
    // The right token still works.
    yr::init(cluster.config()).unwrap();
    let counter = yr::instance(Counter::new).invoke((0,)).unwrap();
    let one = counter.method(Counter::add).invoke((1,)).unwrap();
    assert_eq!(yr::get(&one, TIMEOUT).unwrap(), 1);
    yr::finalize().unwrap();
}

#[test]
fn a_driver_elsewhere_joins_a_tls_cluster_through_config_tls() {
    let _exclusive = exclusive();
    let cluster = TestCluster::builder().tls().start();
    // A node runs only binaries a driver on its machine registered: this process, through the
    // node's socket, first.
    yr::init(cluster.config()).unwrap();
    yr::finalize().unwrap();
    // This process as a machine of its own: the token, and no TLS until the config gives it.
    yr_transport::install(yr_transport::Credentials::with_token(
        cluster.token().clone(),
    ));
    let remote = || {
        let mut config = cluster.config();
        config.server_address = Some(cluster.node_address(0));
        config.token = Some(cluster.token().clone());
        config
    };

    let error = yr::init(remote()).expect_err("a plain connection to a TLS node is refused");
    assert_eq!(error.code(), ErrorCode::InitConnectionFailed, "{error}");
    assert!(error.message().contains("serves TLS"), "{error}");

    let mut missing = remote();
    missing.tls = Some(yr::TlsFiles::new(
        "/nonexistent/driver.pem",
        "/nonexistent/driver.key",
        "/nonexistent/ca.pem",
    ));
    let error = yr::init(missing).expect_err("unreadable TLS files are refused");
    assert_eq!(error.code(), ErrorCode::ParamInvalid, "{error}");
    assert!(
        error.message().contains("/nonexistent/driver.pem"),
        "{error}"
    );

    let files = cluster.client_tls().expect("a TLS cluster");
    let mut misnamed = remote();
    misnamed.tls = Some(yr::TlsFiles {
        server_name: Some("not-the-node.example".into()),
        ..files.clone()
    });
    let error = yr::init(misnamed).expect_err("a certificate of another name is refused");
    assert_eq!(error.code(), ErrorCode::InitConnectionFailed, "{error}");

    let mut config = remote();
    config.tls = Some(yr::TlsFiles {
        server_name: Some("localhost".into()),
        ..files
    });
    yr::init(config).unwrap();
    let counter = yr::instance(Counter::new).invoke((40,)).unwrap();
    let sum = counter.method(Counter::add).invoke((2,)).unwrap();
    assert_eq!(yr::get(&sum, TIMEOUT).unwrap(), 42);
    yr::finalize().unwrap();
}
