//! Bad input and admission: invalid options, unknown functions and malformed messages on the
//! node's Bus get clear codes and the node keeps serving; garbage on its TCP port does not crash
//! it; requests that can never fit, cannot fit in time, or come too fast are refused with 1006,
//! 1017 (naming the last reason) and 1012; executables named for calls across languages that
//! name no file are 1001, and ones other users could change, or that a client over TCP names
//! without a local client having registered them, are 1014.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use yr::{ErrorCode, InvokeOptions};
use yr_proto::v1 as pb;
use yr_proto::v1::bus_request::Body;
use yr_tests::{
    alive, assert_error, call_err, exclusive, unique, unwrap_err, NodeSpec, TestCluster, TIMEOUT,
};

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

#[yr::invoke]
fn double(n: i64) -> i64 {
    n * 2
}

/// A Bus session spoken by hand, over the node's Unix socket or TCP port.
struct RawBus {
    runtime: tokio::runtime::Runtime,
    outbound: mpsc::UnboundedSender<pb::BusRequest>,
    inbound: tonic::Streaming<pb::BusResponse>,
}

impl RawBus {
    fn connect(address: &str) -> RawBus {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (outbound, receiver) = mpsc::unbounded_channel();
        let inbound = runtime.block_on(async {
            let channel = yr_transport::connect(address, ErrorCode::InnerCommunication)
                .await
                .unwrap();
            pb::bus_client::BusClient::new(channel)
                .session(UnboundedReceiverStream::new(receiver))
                .await
                .unwrap()
                .into_inner()
        });
        RawBus {
            runtime,
            outbound,
            inbound,
        }
    }

    /// Send `body` (or nothing) as message `message_id` and return the node's answer to it,
    /// skipping pushes.
    fn request(&mut self, message_id: u64, body: Option<Body>) -> pb::bus_response::Body {
        self.outbound
            .send(pb::BusRequest { message_id, body })
            .expect("the bus stream is open");
        let inbound = &mut self.inbound;
        self.runtime.block_on(async {
            tokio::time::timeout(TIMEOUT, async {
                loop {
                    let message = inbound
                        .next()
                        .await
                        .expect("the node keeps the stream open")
                        .expect("the stream does not fail");
                    if message.message_id == message_id {
                        return message.body.expect("an answer has a body");
                    }
                }
            })
            .await
            .expect("the node answers")
        })
    }

    fn register_driver(&mut self) -> pb::RegisterReply {
        let register = pb::RegisterClient {
            kind: pb::ClientKind::Driver as i32,
            job_id: unique("raw-job"),
            runtime_id: String::new(),
            listen_address: String::new(),
            binary_path: std::env::current_exe().unwrap().display().to_string(),
            binary_hash: yr_common::binary_hash(&std::env::current_exe().unwrap()),
            pid: std::process::id(),
            instance_id: String::new(),
            runtime_args: yr_tests::runtime_args()
                .unwrap_or_default()
                .split_whitespace()
                .map(String::from)
                .collect(),
            functions: Vec::new(),
        };
        match self.request(1, Some(Body::Register(register))) {
            pb::bus_response::Body::Registered(reply) => reply,
            other => panic!("the node answered a registration with {other:?}"),
        }
    }
}

fn create_request(function: &str, options: Vec<u8>) -> Body {
    Body::Create(pb::CreateRequest {
        function: function.to_string(),
        stateless: false,
        args: Vec::new(),
        options: options.into(),
        job_id: "raw-job".into(),
        class_name: "Nothing".into(),
        ..Default::default()
    })
}

fn encoded(options: &InvokeOptions) -> Vec<u8> {
    rmp_serde::to_vec_named(options).unwrap()
}

#[track_caller]
fn expect_error(answer: pb::bus_response::Body, code: ErrorCode, needles: &[&str]) {
    let pb::bus_response::Body::Error(info) = answer else {
        panic!("expected an error {code}, got {answer:?}");
    };
    assert_eq!(
        info.code,
        code.number(),
        "expected {code}, got {}: {}",
        info.code,
        info.message
    );
    for needle in needles {
        assert!(
            info.message.contains(needle),
            "the message of {code} should contain {needle:?}: {:?}",
            info.message
        );
    }
}

/// The node still serves a driver: an instance is created and called.
#[track_caller]
fn node_still_serves(cluster: &TestCluster) {
    let counter = yr::instance(Counter::new).invoke((1,)).unwrap();
    assert_eq!(
        yr::get(&counter.method(Counter::add).invoke((1,)).unwrap(), TIMEOUT).unwrap(),
        2
    );
    counter.terminate_sync().unwrap();
    assert!(alive(cluster.node_pid(0).unwrap()), "the node is alive");
}

#[test]
fn invalid_options_are_resource_config_error_and_the_node_keeps_serving() {
    let _exclusive = exclusive();
    let cluster = TestCluster::start();
    yr::init(cluster.config()).unwrap();

    let too_little_cpu = InvokeOptions {
        cpu: 100,
        ..Default::default()
    };
    let error = unwrap_err(
        yr::instance(Counter::new)
            .options(too_little_cpu.clone())
            .invoke((0,)),
    );
    assert_error(&error, &[ErrorCode::ResourceConfigError], &["100", "cpu"]);
    let error = call_err(
        yr::function(double)
            .options(too_little_cpu.clone())
            .invoke((1,)),
        TIMEOUT,
    );
    assert_error(&error, &[ErrorCode::ResourceConfigError], &["100"]);

    // The node checks options too, for clients that do not.
    let mut bus = RawBus::connect(&cluster.bus_address());
    bus.register_driver();
    let answer = bus.request(
        2,
        Some(create_request(
            "bad_input::Counter::new",
            encoded(&too_little_cpu),
        )),
    );
    expect_error(answer, ErrorCode::ResourceConfigError, &["100"]);
    let too_much_memory = InvokeOptions {
        memory: 10,
        ..Default::default()
    };
    let answer = bus.request(
        3,
        Some(create_request(
            "bad_input::Counter::new",
            encoded(&too_much_memory),
        )),
    );
    expect_error(answer, ErrorCode::ResourceConfigError, &["memory"]);

    node_still_serves(&cluster);
    yr::finalize().unwrap();
}

#[test]
fn unknown_constructor_on_the_raw_bus_is_function_meta_not_found() {
    let _exclusive = exclusive();
    let cluster = TestCluster::start();
    let mut bus = RawBus::connect(&cluster.bus_address());
    let reply = bus.register_driver();
    assert_eq!(reply.node_id, cluster.node_id(0));

    let answer = bus.request(
        2,
        Some(create_request(
            "no_such_crate::Nothing::new",
            encoded(&InvokeOptions::default()),
        )),
    );
    expect_error(
        answer,
        ErrorCode::FunctionMetaNotFound,
        &["no_such_crate::Nothing::new"],
    );

    yr::init(cluster.config()).unwrap();
    node_still_serves(&cluster);
    yr::finalize().unwrap();
}

#[test]
fn malformed_bus_messages_get_param_invalid_and_the_stream_stays_usable() {
    let _exclusive = exclusive();
    let cluster = TestCluster::start();
    let mut bus = RawBus::connect(&cluster.bus_address());
    bus.register_driver();

    // A message without a body.
    expect_error(bus.request(7, None), ErrorCode::ParamInvalid, &["body"]);
    // A create whose options are not MessagePack.
    expect_error(
        bus.request(8, Some(create_request("x::Y::new", vec![0xc1, 0xff, 0x00]))),
        ErrorCode::ParamInvalid,
        &["options"],
    );
    // A kill without an instance id.
    expect_error(
        bus.request(
            9,
            Some(Body::Kill(pb::KillRequest {
                instance_id: String::new(),
                wait: false,
                job_id: String::new(),
                force: false,
            })),
        ),
        ErrorCode::InstanceIdEmpty,
        &[],
    );
    // A lookup of an instance that does not exist.
    expect_error(
        bus.request(
            10,
            Some(Body::GetNamed(pb::GetNamedRequest {
                name: String::new(),
                namespace: String::new(),
                timeout_ms: 0,
                instance_id: "no-such-instance".into(),
                moved_from: String::new(),
            })),
        ),
        ErrorCode::InstanceNotFound,
        &["no-such-instance"],
    );
    // A caller that says it lost an instance that has no record: it ended (1007), at once.
    expect_error(
        bus.request(
            12,
            Some(Body::GetNamed(pb::GetNamedRequest {
                name: String::new(),
                namespace: String::new(),
                timeout_ms: 60_000,
                instance_id: "no-such-instance".into(),
                moved_from: "unix:/nowhere".into(),
            })),
        ),
        ErrorCode::InstanceExited,
        &["no-such-instance"],
    );

    // The same stream still serves well-formed requests.
    let answer = bus.request(11, Some(Body::ListNamed(pb::ListNamedRequest {})));
    assert!(
        matches!(answer, pb::bus_response::Body::ListNamed(_)),
        "{answer:?}"
    );
    yr::init(cluster.config()).unwrap();
    node_still_serves(&cluster);
    yr::finalize().unwrap();
}

/// Bytes that look random, the same every run.
fn register_executable(bus: &mut RawBus, id: u64, path: &str) -> pb::bus_response::Body {
    bus.request(
        id,
        Some(Body::RegisterExecutable(pb::RegisterExecutable {
            path: path.to_string(),
            language: pb::Language::Rust as i32,
        })),
    )
}

#[test]
fn executables_named_for_calls_across_languages_are_checked_before_the_node_runs_them() {
    use std::os::unix::fs::PermissionsExt;
    let _exclusive = exclusive();
    let cluster = TestCluster::start();
    let me = std::env::current_exe().unwrap();
    let mut local = RawBus::connect(&cluster.bus_address());
    expect_error(
        register_executable(&mut local, 1, "/bin/true"),
        ErrorCode::ParamInvalid,
        &["register as a driver or runtime first"],
    );
    local.register_driver();
    expect_error(
        register_executable(&mut local, 2, "relative/worker"),
        ErrorCode::ParamInvalid,
        &["relative/worker", "absolute"],
    );
    let dir = yr_tests::TempDir::new("writable-executable");
    let script = dir.path().join("worker");
    std::fs::write(&script, "#!/bin/sh\ntouch \"$0.ran\"\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o775)).unwrap();
    expect_error(
        register_executable(&mut local, 3, &script.display().to_string()),
        ErrorCode::AuthorizeFailed,
        &["its group", "worker"],
    );
    // A binary a driver registered keeps how it starts (the driver's arguments).
    let known = register_executable(&mut local, 4, &me.display().to_string());
    let pb::bus_response::Body::Executable(registered) = known else {
        panic!("the node refused the driver's own binary: {known:?}");
    };
    assert_eq!(registered.binary_hash, yr_common::binary_hash(&me));
    assert_eq!(
        registered.runtime_args.join(" "),
        yr_tests::runtime_args().unwrap_or_default()
    );

    // Over TCP the node cannot tell the client's user: only what a local client registered.
    let mut remote = RawBus::connect(&cluster.node_address(0));
    remote.register_driver();
    expect_error(
        register_executable(&mut remote, 2, "/bin/true"),
        ErrorCode::AuthorizeFailed,
        &["/bin/true", "TCP"],
    );
    let answer = register_executable(&mut remote, 3, &me.display().to_string());
    assert!(
        matches!(answer, pb::bus_response::Body::Executable(ref r) if r.binary_hash == registered.binary_hash),
        "{answer:?}"
    );
    assert!(
        !dir.path().join("worker.ran").exists(),
        "the refused script ran"
    );
    yr::init(cluster.config()).unwrap();
    node_still_serves(&cluster);
    yr::finalize().unwrap();
}

fn garbage(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u8
        })
        .collect()
}

fn send_garbage(address: &str, bytes: &[u8]) {
    let Ok(mut stream) = TcpStream::connect(address) else {
        panic!("cannot connect to {address}");
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.write_all(bytes);
    let mut answer = [0u8; 4096];
    // Read until the server closes the connection or stops talking.
    while matches!(stream.read(&mut answer), Ok(n) if n > 0) {}
}

#[test]
fn random_bytes_on_the_node_port_do_not_crash_it() {
    let _exclusive = exclusive();
    let cluster = TestCluster::start();
    let node = cluster.node_address(0);
    for seed in 0..4 {
        send_garbage(&node, &garbage(64 * 1024, seed));
    }
    // An HTTP/2 preface followed by nonsense frames.
    let mut h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2.extend(garbage(4096, 99));
    send_garbage(&node, &h2);
    // A plain HTTP/1 request.
    send_garbage(&node, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    // Garbage on the master's port too.
    send_garbage(&cluster.master_address(), &garbage(16 * 1024, 7));

    assert!(alive(cluster.node_pid(0).unwrap()), "the node survived");
    assert!(alive(cluster.master_pid().unwrap()), "the master survived");
    // The node still answers on the same TCP port and on its socket, and the master too. (A
    // driver over TCP uses a binary a local driver registered: this process, once it inits.)
    yr::init(cluster.config()).unwrap();
    let mut bus = RawBus::connect(&node);
    bus.register_driver();
    let answer = bus.request(2, Some(Body::ListNamed(pb::ListNamedRequest {})));
    assert!(
        matches!(answer, pb::bus_response::Body::ListNamed(_)),
        "{answer:?}"
    );
    cluster.status().expect("the master answers");
    node_still_serves(&cluster);
    yr::finalize().unwrap();
}

#[test]
fn instance_larger_than_any_node_fails_at_once_with_resource_config_error() {
    let _exclusive = exclusive();
    let cluster = TestCluster::with_node(NodeSpec {
        cpu: 2_000,
        ..Default::default()
    });
    yr::init(cluster.config()).unwrap();
    let huge = InvokeOptions {
        cpu: 4_000,
        ..Default::default()
    };
    let started = Instant::now();
    let error = match yr::instance(Counter::new).options(huge).invoke((0,)) {
        Err(error) => error,
        Ok(counter) => call_err(counter.method(Counter::add).invoke((1,)), TIMEOUT),
    };
    assert_error(&error, &[ErrorCode::ResourceConfigError], &[]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "it fails at once, not after a schedule timeout: {:?}",
        started.elapsed()
    );
    node_still_serves(&cluster);
    yr::finalize().unwrap();
}

#[test]
fn instance_that_cannot_be_placed_in_time_is_schedule_canceled_with_the_last_reason() {
    let _exclusive = exclusive();
    let cluster = TestCluster::with_node(NodeSpec {
        cpu: 1_000,
        ..Default::default()
    });
    yr::init(cluster.config()).unwrap();
    let whole_node = InvokeOptions {
        cpu: 1_000,
        ..Default::default()
    };
    let holder = yr::instance(Counter::new)
        .options(whole_node.clone())
        .invoke((0,))
        .unwrap();
    assert_eq!(
        yr::get(&holder.method(Counter::add).invoke((1,)).unwrap(), TIMEOUT).unwrap(),
        1
    );

    let impatient = InvokeOptions {
        schedule_timeout_ms: 1_500,
        ..whole_node.clone()
    };
    let started = Instant::now();
    let waiting = yr::instance(Counter::new)
        .options(impatient)
        .invoke((0,))
        .unwrap();
    let error = call_err(waiting.method(Counter::add).invoke((1,)), TIMEOUT);
    let waited = started.elapsed();
    assert_error(&error, &[ErrorCode::ScheduleCanceled], &["1002", "1500"]);
    assert!(
        waited >= Duration::from_millis(1_400) && waited < Duration::from_secs(15),
        "it waited the schedule timeout, then failed: {waited:?}"
    );

    // Once the holder is gone, the same request fits.
    holder.terminate_sync().unwrap();
    let fits = yr::instance(Counter::new)
        .options(whole_node)
        .invoke((5,))
        .unwrap();
    assert_eq!(
        yr::get(&fits.method(Counter::add).invoke((1,)).unwrap(), TIMEOUT).unwrap(),
        6
    );
    yr::finalize().unwrap();
}

#[test]
fn creates_beyond_the_node_rate_limit_are_create_rate_limited() {
    let _exclusive = exclusive();
    let cluster = TestCluster::with_node(NodeSpec {
        create_rate: Some((1.0, 1.0)),
        ..Default::default()
    });
    yr::init(cluster.config()).unwrap();
    let mut created = Vec::new();
    let mut limited = Vec::new();
    for start in 0..5 {
        match yr::instance(Counter::new).invoke((start,)) {
            Ok(counter) => created.push(counter),
            Err(error) => limited.push(error),
        }
    }
    assert!(!created.is_empty(), "the burst admits one create");
    assert!(
        !limited.is_empty(),
        "a burst of 5 creates exceeds a limit of 1 per second"
    );
    for error in &limited {
        assert_error(error, &[ErrorCode::CreateRateLimited], &["rate"]);
    }
    // The admitted instance works, and after a second the bucket admits a create again.
    assert_eq!(
        yr::get(
            &created[0].method(Counter::add).invoke((1,)).unwrap(),
            TIMEOUT
        )
        .unwrap(),
        1
    );
    // The bucket refills (its timing is proven on a manual clock in yr-proxy's unit tests):
    // a create is admitted again, whenever that is on this machine.
    let mut later = None;
    let admitted =
        yr_tests::wait_until(TIMEOUT, || match yr::instance(Counter::new).invoke((10,)) {
            Ok(instance) => {
                later = Some(instance);
                true
            }
            Err(error) => {
                assert_error(&error, &[ErrorCode::CreateRateLimited], &["rate"]);
                false
            }
        });
    assert!(admitted, "the bucket never admitted a create again");
    let later = later.expect("an admitted create");
    assert_eq!(
        yr::get(&later.method(Counter::add).invoke((1,)).unwrap(), TIMEOUT).unwrap(),
        11
    );
    yr::finalize().unwrap();
}

#[test]
fn stateless_calls_on_a_cluster_without_cpu_fail_at_once_with_resource_config_error() {
    let _exclusive = exclusive();
    let cluster = TestCluster::with_node(NodeSpec {
        cpu: 0,
        ..Default::default()
    });
    yr::init(cluster.config()).unwrap();
    let started = Instant::now();
    // Several calls at once: the pool creates several instances, and none can ever be placed.
    let refs: Vec<_> = (0..4)
        .map(|n| yr::function(double).invoke((n,)).unwrap())
        .collect();
    for r in &refs {
        let error = yr::get(r, TIMEOUT).expect_err("no node has CPU for the call");
        assert_eq!(error.code(), ErrorCode::ResourceConfigError, "{error}");
    }
    // A generous bound: before, the calls waited for the get's whole timeout.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the calls took {:?}",
        started.elapsed()
    );
    yr::finalize().unwrap();
}
