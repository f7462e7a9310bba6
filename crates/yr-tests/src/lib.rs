//! yr-tests: whole-cluster integration and fault tests. This crate owns the [`TestCluster`]
//! harness, which starts a real master and real nodes as processes through the `yr` CLI (on free
//! ports and temporary directories) and kills everything it started when dropped, and the
//! helpers the tests in `tests/` share: one yr session at a time per test binary, marker files
//! that user code writes to, process scans that prove nothing leaked, and user code several
//! tests run (the [`Tally`] instance class); and [`hosts`], which
//! makes "machines" out of network namespaces for tests across hosts. It owns no yr
//! behaviour: every test drives the real binaries the way users do.
//!
//! A node runs instances in runtime processes that re-execute the driver's binary. In a test
//! the driver is the test binary: drivers set `YR_RUNTIME_ARGS` ([`runtime_args`]) so that a
//! runtime runs only the test that is running now, and that test's first act, [`exclusive`],
//! sees `YR_RUNTIME_MODE=1` and serves the node instead ([`serve_if_runtime`]). So no test
//! file needs a `#[test]` that is only an entry point. Drivers that must be processes of their
//! own are helper binaries of this crate (`src/bin/`), found with `env!("CARGO_BIN_EXE_…")`.
//!
//! The `yr` binary is `$YR_BIN`, or `yr` in the profile directory the test was built into (`target/debug/yr`). Fault tests give the
//! master and nodes fail points (`NodeSpec::env` with `FAILPOINTS`), so build it with them:
//! `cargo build -p yr-cli --features failpoints` (docs/design/013-fail-points-and-clock.md).

use std::fs::OpenOptions;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use yr_proto::v1 as pb;

pub mod chaos;
pub mod hosts;

/// How long a test waits for something that should happen (generous: it only bounds a hang).
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// How long a component may take to come up.
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How often a component is started again when a port it was given was taken meanwhile.
const START_ATTEMPTS: usize = 5;

/// What a component logs when its port is taken.
const ADDRESS_IN_USE: &str = "Address already in use";

/// The arguments runtimes re-execute a test binary with: run only the test running on this
/// thread (libtest names each test's thread after the test), which serves as a runtime from its
/// first line ([`exclusive`]). `None` outside a test's thread (a helper binary's `main`, whose
/// runtimes need no arguments: `yr::init` comes first there).
pub fn runtime_args() -> Option<String> {
    let thread = std::thread::current();
    let test = thread.name().filter(|name| *name != "main")?;
    Some(format!("{test} --exact --nocapture --test-threads 1"))
}

// ----- the yr binary -----------------------------------------------------------------------

/// The `yr` executable: `$YR_BIN`, or `yr` in the profile directory this test binary was built
/// into (`<target>/debug/deps/<test>` → `<target>/debug/yr`, whatever `CARGO_TARGET_DIR` is).
pub fn yr_binary() -> PathBuf {
    let path = std::env::var_os("YR_BIN")
        .map(PathBuf::from)
        .or_else(|| {
            let exe = std::env::current_exe().ok()?;
            let profile_dir = exe.parent()?.parent()?;
            Some(profile_dir.join("yr"))
        })
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/yr"));
    assert!(
        path.is_file(),
        "the yr binary is not at {}; run `cargo build -p yr-cli` first or set YR_BIN",
        path.display()
    );
    path
}

/// This workspace's `target/debug` directory (where the examples are built).
pub fn target_debug_dir() -> PathBuf {
    yr_binary()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Run `yr` with `args` and `envs`, waiting at most `timeout`. Panics if it does not end.
pub fn run_yr(args: &[&str], envs: &[(&str, &Path)], timeout: Duration) -> Output {
    let mut command = Command::new(yr_binary());
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in envs {
        command.env(key, value);
    }
    output_within(command, timeout)
}

/// Run `command` to its end, at most `timeout`; panics (after killing it) if it takes longer.
pub fn output_within(command: Command, timeout: Duration) -> Output {
    yr_netns::output_within(command, timeout).unwrap_or_else(|e| panic!("{e}"))
}

// ----- temporary directories and unique names ----------------------------------------------

/// A name no other test uses: `label`, the process id, a counter and the clock.
pub fn unique(label: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{label}-{}-{}-{nanos:x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A temporary directory, removed on drop unless the test is panicking (then its path is
/// printed, so that its logs can be read).
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// A new, empty directory under `/tmp` (short paths: Unix socket paths are limited),
    /// private to this user (mode 0700), as yr wants a sessions root to be.
    pub fn new(label: &str) -> TempDir {
        use std::os::unix::fs::DirBuilderExt;
        let path = PathBuf::from("/tmp").join(unique(&format!("yrt-{label}")));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory as a string.
    pub fn display(&self) -> String {
        self.path.display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("YR_TESTS_KEEP").is_some() {
            eprintln!("yr-tests: kept {} for inspection", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

// ----- waiting -------------------------------------------------------------------------------

/// Poll `condition` every 50 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Run `future` to completion on a small tokio runtime of its own.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(future)
}

// ----- processes -----------------------------------------------------------------------------

/// Send `signal` to `pid`; returns whether it was delivered.
pub fn signal(pid: u32, signal: i32) -> bool {
    // SAFETY: kill has no memory-safety preconditions; the tests only signal processes they
    // started (or found by their session directory).
    unsafe { libc::kill(pid as libc::pid_t, signal) == 0 }
}

/// `(state, parent pid)` of `pid` from `/proc/<pid>/stat`.
fn stat(pid: u32) -> Option<(char, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: parse after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let parent = fields.next()?.parse().ok()?;
    Some((state, parent))
}

/// Whether `pid` is a live process (not a zombie waiting to be reaped).
pub fn alive(pid: u32) -> bool {
    matches!(stat(pid), Some((state, _)) if state != 'Z' && state != 'X')
}

/// Whether `pid` is stopped (SIGSTOP).
pub fn stopped(pid: u32) -> bool {
    matches!(stat(pid), Some(('T', _)))
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// The live children of `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(
            |child| matches!(stat(*child), Some((state, parent)) if parent == pid && state != 'Z'),
        )
        .collect()
}

/// Live processes (other than this one) whose command line or environment contains `needle`,
/// for example a session directory: the master and node name it on their command line, and
/// runtimes carry it in `YR_BUS_ADDRESS`.
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    all_pids()
        .into_iter()
        .filter(|pid| *pid != me && alive(*pid))
        .filter(|pid| {
            ["cmdline", "environ"].iter().any(|file| {
                std::fs::read(format!("/proc/{pid}/{file}"))
                    .map(|bytes| {
                        bytes
                            .windows(needle.len().max(1))
                            .any(|w| w == needle.as_bytes())
                    })
                    .unwrap_or(false)
            })
        })
        .collect()
}

/// The command line of `pid`, for messages.
pub fn command_line(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|bytes| String::from_utf8_lossy(&bytes).replace('\0', " "))
        .unwrap_or_default()
}

/// SIGKILL every live process mentioning `needle` (cleanup after a failed test).
pub fn kill_mentioning(needle: &str) {
    for pid in processes_mentioning(needle) {
        signal(pid, libc::SIGKILL);
    }
}

/// Kills every process mentioning a string (a session or temporary directory) when dropped, so
/// that processes started outside a [`TestCluster`] (`yr start`, a driver's temporary cluster)
/// do not outlive a test that fails half-way.
pub struct KillOnDrop {
    needle: String,
}

impl KillOnDrop {
    /// Guard the processes that mention `needle`.
    pub fn new(needle: impl Into<String>) -> KillOnDrop {
        KillOnDrop {
            needle: needle.into(),
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        kill_mentioning(&self.needle);
    }
}

/// One of this crate's helper binaries (`src/bin/<name>.rs`), given its path (tests pass
/// `env!("CARGO_BIN_EXE_<name>")`), with stdin closed.
pub fn helper_process(path: &str) -> Command {
    let mut command = Command::new(path);
    command.stdin(Stdio::null());
    command
}

// ----- one yr session at a time ----------------------------------------------------------------

static LOCK: Mutex<()> = Mutex::new(());

/// Exclusive use of yr's process-wide state (and of the machine's two cores) for one test.
/// yr is not initialized when this is taken, and is finalized when it is dropped, so a test
/// that fails half-way leaves nothing behind.
pub struct Exclusive {
    _guard: MutexGuard<'static, ()>,
}

impl Drop for Exclusive {
    fn drop(&mut self) {
        let _ = yr::finalize();
    }
}

/// Take the lock. Tests in one binary run one at a time whatever `--test-threads` says. In a
/// runtime process, this is where the test binary becomes the runtime: it never returns.
pub fn exclusive() -> Exclusive {
    serve_if_runtime();
    let guard = LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let _ = yr::finalize();
    Exclusive { _guard: guard }
}

/// Make runtimes that re-execute this test binary run only the test running on this thread
/// ([`runtime_args`]).
pub fn use_this_binary_as_runtime() {
    match runtime_args() {
        Some(args) => std::env::set_var("YR_RUNTIME_ARGS", args),
        None => std::env::remove_var("YR_RUNTIME_ARGS"),
    }
}

/// In a runtime process (started by a node with `YR_RUNTIME_MODE=1`), serve the node:
/// `yr::init` never returns there, and a failed start ends the process. Otherwise nothing.
pub fn serve_if_runtime() {
    if std::env::var("YR_RUNTIME_MODE").as_deref() == Ok("1") {
        let result = yr::init(yr::Config::default());
        eprintln!("yr-tests: the runtime could not start: {result:?}");
        std::process::exit(3);
    }
}

/// `len` bytes of pattern `seed` (a different pattern for each seed), for large-value tests.
pub fn pattern(seed: usize, len: usize) -> serde_bytes::ByteBuf {
    serde_bytes::ByteBuf::from(
        (0..len)
            .map(|i| ((i + seed * 31) % 251) as u8)
            .collect::<Vec<u8>>(),
    )
}

/// A checksum of `bytes` that also changes when bytes move, not only when they change.
pub fn weighted_sum(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .enumerate()
        .map(|(i, b)| u64::from(*b) * (i as u64 % 7 + 1))
        .sum()
}

/// Placement only on nodes whose label `key` (`yr start --labels`) is `value`.
pub fn on_label(key: &str, value: &str) -> yr::InvokeOptions {
    yr::InvokeOptions {
        schedule_affinities: vec![yr::Affinity {
            affinity_kind: yr::AffinityKind::Resource,
            affinity_type: yr::AffinityType::Required,
            label_operators: vec![yr::LabelOperator {
                op: yr::LabelOp::In,
                key: key.into(),
                values: vec![value.into()],
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// In a driver process that a test steers through its stdin: call `per_line` once for each
/// line read, until stdin closes (or cannot be read).
pub fn for_each_stdin_line(mut per_line: impl FnMut()) {
    let mut line = String::new();
    while std::io::stdin()
        .read_line(&mut line)
        .map(|n| n > 0)
        .unwrap_or(false)
    {
        line.clear();
        per_line();
    }
}

/// A stateful instance class the tests share: a running total, starting where its creator
/// says.
#[yr::instance]
pub struct Tally {
    value: i64,
}

#[yr::instance]
impl Tally {
    /// A total of `start`.
    pub fn new(start: i64) -> Self {
        Tally { value: start }
    }

    /// Add `n`; the new total.
    pub fn add(&mut self, n: i64) -> i64 {
        self.value += n;
        self.value
    }

    /// The process id of the runtime that holds the total.
    pub fn pid(&self) -> u32 {
        std::process::id()
    }
}

/// A [`Tally`] the master re-creates elsewhere if its node is lost, and that a node cut off
/// from the master pauses (design 024): stateful, one restart, detached (it outlives its
/// creator's node). Call it after `yr::init`.
pub fn movable_tally(start: i64) -> yr::InstanceHandle<Tally> {
    let mut options = yr::InvokeOptions {
        recover_retry_times: 1,
        ..Default::default()
    };
    options
        .custom_extensions
        .insert("lifecycle".into(), "detached".into());
    yr::instance(Tally::new)
        .options(options)
        .invoke((start,))
        .expect("create a movable tally")
}

/// Two nodes with `shared_memory_mb` of shared memory each: node 0 with 1 CPU, where the
/// driver connects, and node 1 with 4, where a call asking for 2 CPUs runs.
pub fn two_nodes_with_shared_memory(shared_memory_mb: u64) -> TestCluster {
    TestCluster::builder()
        .node(NodeSpec {
            cpu: 1_000,
            shared_memory_mb: Some(shared_memory_mb),
            ..NodeSpec::default()
        })
        .node(NodeSpec {
            cpu: 4_000,
            shared_memory_mb: Some(shared_memory_mb),
            ..NodeSpec::default()
        })
        .start()
}

/// A driver configuration for the node at `bus_address`.
pub fn driver_config(bus_address: &str) -> yr::Config {
    use_this_binary_as_runtime();
    let mut config = yr::Config::default();
    config.local_mode = false;
    config.server_address = Some(bus_address.to_string());
    config
}

// ----- marker files ----------------------------------------------------------------------------

/// A file that user code appends lines to, wherever it runs on this host, so that a test can
/// see what happened inside a runtime (a constructor ran, a hook ran). Removed on drop.
pub struct Marker {
    path: PathBuf,
}

impl Marker {
    /// A new, empty marker.
    pub fn new(label: &str) -> Marker {
        let path = PathBuf::from("/tmp").join(unique(&format!("yrt-marker-{label}")));
        std::fs::write(&path, b"").expect("create a marker file");
        Marker { path }
    }

    /// The path to give user code.
    pub fn path(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }

    /// The lines written so far.
    pub fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.path)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// How many lines equal `line`.
    pub fn count(&self, line: &str) -> usize {
        self.lines().iter().filter(|l| l.as_str() == line).count()
    }

    /// Wait until `line` was written at least `count` times, at most `timeout`.
    pub fn wait_for(&self, line: &str, count: usize, timeout: Duration) -> bool {
        wait_until(timeout, || self.count(line) >= count)
    }
}

impl Drop for Marker {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// From user code: append `line` to the marker at `path` (which must exist).
pub fn record(path: &str, line: &str) {
    if let Ok(mut file) = OpenOptions::new().append(true).open(path) {
        let _ = writeln!(file, "{line}");
    }
}

// ----- errors ------------------------------------------------------------------------------------

/// Assert that `error` has one of `codes` and that its message contains every one of
/// `needles`.
#[track_caller]
pub fn assert_error(error: &yr::Error, codes: &[yr::ErrorCode], needles: &[&str]) {
    assert!(
        codes.contains(&error.code()),
        "expected one of {codes:?}, got {}: {}",
        error.code(),
        error.message()
    );
    for needle in needles {
        assert!(
            error.message().contains(needle),
            "the message of {} should contain {needle:?}: {:?}",
            error.code(),
            error.message()
        );
    }
}

/// The error of `result`, which must have failed.
#[track_caller]
pub fn unwrap_err<T: std::fmt::Debug>(result: yr::Result<T>) -> yr::Error {
    match result {
        Ok(value) => panic!("expected an error, got {value:?}"),
        Err(error) => error,
    }
}

/// The error of a call: refused at submission, or reported by `get` within `timeout`.
#[track_caller]
pub fn call_err<T: serde::de::DeserializeOwned + std::fmt::Debug>(
    submitted: yr::Result<yr::ObjectRef<T>>,
    timeout: Duration,
) -> yr::Error {
    match submitted {
        Err(error) => error,
        Ok(object) => unwrap_err(yr::get(&object, timeout)),
    }
}

// ----- redis ---------------------------------------------------------------------------------------

/// A real `redis-server` on a free port, without persistence, killed when dropped. Debian's
/// package provides it (`apt-get install -y redis-server`); `.ci/run` installs it.
pub struct RedisServer {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl RedisServer {
    /// Start one and wait until it answers PING. Panics, saying how to install it, if
    /// `redis-server` is not on PATH.
    pub fn start() -> RedisServer {
        let dir = TempDir::new("redis");
        let mut attempt = 0;
        loop {
            let port = free_port();
            let mut child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot run redis-server ({e}); the KV tests need a real Redis: \
                         apt-get install -y redis-server"
                    )
                });
            let client = yr_datasystem::redis::RedisClient::new(format!("127.0.0.1:{port}"));
            let up = wait_until(Duration::from_secs(10), || {
                client.ping().is_ok() || matches!(child.try_wait(), Ok(Some(_)))
            });
            if up && client.ping().is_ok() {
                return RedisServer {
                    child,
                    port,
                    _dir: dir,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
            // The port was taken meanwhile: try another.
            attempt += 1;
            assert!(
                attempt < START_ATTEMPTS,
                "redis-server did not start on a free port"
            );
        }
    }

    /// Its address, `127.0.0.1:port`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A client for it.
    pub fn client(&self) -> yr_datasystem::redis::RedisClient {
        yr_datasystem::redis::RedisClient::new(self.address())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ----- the cluster ---------------------------------------------------------------------------------

/// How one node of a [`TestCluster`] is started.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// CPU in millicores.
    pub cpu: u64,
    /// Memory in MB.
    pub memory: u64,
    /// `--heartbeat-timeout` in seconds.
    pub heartbeat_timeout: f64,
    /// `--create-rate` and `--create-burst`.
    pub create_rate: Option<(f64, f64)>,
    /// `--warm-pool`.
    pub warm_pool: usize,
    /// `--fetch-binaries`: fetch drivers' binaries from the creating node even when the path
    /// exists here (code distribution between the nodes of one machine).
    pub fetch_binaries: bool,
    /// Extra environment variables of the node process (its runtimes inherit them).
    pub env: Vec<(String, String)>,
    /// `--data-dir`: a data directory that outlives the cluster (for restart tests); `None`
    /// keeps the node's default, inside the cluster's temporary directory.
    pub data_dir: Option<PathBuf>,
    /// `--l2-redis host:port`: keep the KV second-level store in this Redis server.
    pub l2_redis: Option<String>,
    /// `--shared-memory-mb`; `None` keeps the node's default (a third of `memory`).
    pub shared_memory_mb: Option<u64>,
    /// `--spill-dir`; `None` keeps the node's default (`<data dir>/spill`).
    pub spill_dir: Option<PathBuf>,
    /// `--spill-limit-mb`; `None` keeps the node's default (95% of the free disk).
    pub spill_limit_mb: Option<u64>,
    /// `--kv-quota-mb`; `None` keeps the node's default (a quarter of `memory`, at most 4096).
    pub kv_quota_mb: Option<u64>,
    /// `--labels k=v` of the node.
    pub labels: Vec<(String, String)>,
}

impl Default for NodeSpec {
    fn default() -> Self {
        NodeSpec {
            cpu: 4_000,
            memory: 8_192,
            heartbeat_timeout: 3.0,
            create_rate: None,
            warm_pool: 1,
            fetch_binaries: false,
            env: Vec::new(),
            data_dir: None,
            l2_redis: None,
            shared_memory_mb: None,
            spill_dir: None,
            spill_limit_mb: None,
            kv_quota_mb: None,
            labels: Vec::new(),
        }
    }
}

/// Prepares a [`TestCluster`].
#[derive(Clone, Debug)]
pub struct ClusterBuilder {
    nodes: Vec<NodeSpec>,
    node_timeout: f64,
    tls: bool,
    master_args: Vec<String>,
    standby_masters: usize,
}

impl ClusterBuilder {
    /// Add a node.
    pub fn node(mut self, spec: NodeSpec) -> Self {
        self.nodes.push(spec);
        self
    }

    /// Add two nodes: one with 1 CPU, where the driver connects (the first added), and one with
    /// 4, where the master places what asks for more than 1 CPU.
    pub fn small_and_large_node(self) -> Self {
        self.node(NodeSpec {
            cpu: 1_000,
            ..NodeSpec::default()
        })
        .node(NodeSpec {
            cpu: 4_000,
            ..NodeSpec::default()
        })
    }

    /// The master's `--node-timeout` in seconds.
    pub fn node_timeout(mut self, seconds: f64) -> Self {
        self.node_timeout = seconds;
        self
    }

    /// More flags for `yr master` (for example `--etcd` and `--etcd-prefix`), also when it is
    /// restarted.
    pub fn master_args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.master_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Start `count` more masters with the same flags (give `--etcd`: they stand by while the
    /// first leads). Nodes are given every master's address.
    pub fn standby_masters(mut self, count: usize) -> Self {
        self.standby_masters = count;
        self
    }

    /// Run every TCP connection of the cluster (and of this test process) in mutual TLS, with
    /// certificates made for the test: the master with one, the nodes with another, from one CA.
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// Start the master and the nodes (one default node if none was added) and wait until the
    /// master lists every node as alive.
    pub fn start(self) -> TestCluster {
        let dir = TempDir::new("cluster");
        let tls = self.tls.then(|| {
            let certificates = dir.path().join("tls");
            std::fs::create_dir_all(&certificates).expect("a directory for certificates");
            let (ca, [master, node]) =
                yr_transport::tls::test_certificates::<2>(&certificates).expect("certificates");
            TlsFiles { ca, master, node }
        });
        let master_port = free_port();
        let metrics_port = free_port();
        let token = yr_common::auth::ClusterToken::generate().expect("a cluster token");
        // This process talks to the master and nodes directly (status, records) with it.
        let mut credentials = yr_transport::Credentials::with_token(token.clone());
        if let Some(files) = &tls {
            let tls = yr_transport::Tls::load(&files.node.0, &files.node.1, &files.ca)
                .expect("the test certificates load");
            credentials.tls = Some(std::sync::Arc::new(tls));
        }
        yr_transport::install(credentials);
        let mut cluster = TestCluster {
            master: None,
            standbys: Vec::new(),
            master_args: self.master_args,
            master_port,
            metrics_port,
            node_timeout: self.node_timeout,
            nodes: Vec::new(),
            dir,
            token,
            tls,
        };
        // A port free a moment ago may have been taken since (by any process's outgoing
        // connection): then start again on other ports.
        let mut attempt = 0;
        while let Err(error) = cluster.spawn_master() {
            attempt += 1;
            assert!(
                error.contains(ADDRESS_IN_USE) && attempt < START_ATTEMPTS,
                "{error}"
            );
            cluster.master_port = free_port();
            cluster.metrics_port = free_port();
        }
        for index in 0..self.standby_masters {
            cluster.standbys.push(StandbyMaster {
                child: None,
                port: free_port(),
                metrics_port: free_port(),
            });
            let mut attempt = 0;
            while let Err(error) = cluster.spawn_standby(index) {
                attempt += 1;
                assert!(
                    error.contains(ADDRESS_IN_USE) && attempt < START_ATTEMPTS,
                    "{error}"
                );
                cluster.standbys[index].port = free_port();
                cluster.standbys[index].metrics_port = free_port();
            }
        }
        let specs = if self.nodes.is_empty() {
            vec![NodeSpec::default()]
        } else {
            self.nodes
        };
        for spec in specs {
            cluster.add_node(spec);
        }
        cluster
    }
}

impl TestCluster {
    /// Start one more node made from `spec` and wait until the master lists it as alive;
    /// returns its index.
    pub fn add_node(&mut self, spec: NodeSpec) -> usize {
        let cluster = self;
        let index = cluster.nodes.len();
        {
            let session = cluster.dir.path().join(format!("node{index}"));
            // Private, as `yr node` requires of the directory it writes the token into.
            std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
                .create(&session)
                .expect("create the node's session directory");
            cluster.nodes.push(NodeProcess {
                child: None,
                node_id: format!("node{index}-{}", unique("t").replace('-', "")),
                port: free_port(),
                metrics_port: free_port(),
                bus_socket: session.join("bus.sock"),
                session,
                spec,
            });
            let mut attempt = 0;
            while let Err(error) = cluster.spawn_node(index) {
                attempt += 1;
                assert!(
                    error.contains(ADDRESS_IN_USE) && attempt < START_ATTEMPTS,
                    "{error}"
                );
                cluster.nodes[index].port = free_port();
            }
        }
        index
    }
}

struct NodeProcess {
    child: Option<Child>,
    node_id: String,
    port: u16,
    metrics_port: u16,
    bus_socket: PathBuf,
    session: PathBuf,
    spec: NodeSpec,
}

/// A master started next to the first one ([`ClusterBuilder::standby_masters`]).
struct StandbyMaster {
    child: Option<Child>,
    port: u16,
    metrics_port: u16,
}

/// A master and nodes running as real processes (`yr master`, `yr node`) on free ports, with
/// their state and logs in a temporary directory. Everything is killed when it is dropped, also
/// when the test panics; then the directory is kept and its path printed.
pub struct TestCluster {
    master: Option<Child>,
    standbys: Vec<StandbyMaster>,
    master_args: Vec<String>,
    master_port: u16,
    metrics_port: u16,
    node_timeout: f64,
    nodes: Vec<NodeProcess>,
    dir: TempDir,
    /// The cluster token every component and this test process present.
    token: yr_common::auth::ClusterToken,
    /// The TLS files, when the cluster runs TLS.
    tls: Option<TlsFiles>,
}

/// A test cluster's certificates: the CA, and (certificate, key) of the master and the nodes.
struct TlsFiles {
    ca: PathBuf,
    master: (PathBuf, PathBuf),
    node: (PathBuf, PathBuf),
}

impl TlsFiles {
    fn args(&self, (cert, key): &(PathBuf, PathBuf)) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            cert.display().to_string(),
            "--tls-key".into(),
            key.display().to_string(),
            "--tls-ca".into(),
            self.ca.display().to_string(),
        ]
    }
}

fn spawn_component(role: &str, args: &[String], log: &Path, env: &[(String, String)]) -> Child {
    // Appending keeps the log of a component that was killed and started again.
    let log_file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
    let mut command = Command::new(yr_binary());
    command
        .arg(role)
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("a log file handle"))
        .stderr(log_file);
    // SAFETY: prctl is async-signal-safe. The component dies with the test thread that started
    // it, so a test killed half-way leaves no cluster behind.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start yr {role}: {e}"))
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn connects(address: &str) -> bool {
    address
        .parse::<SocketAddr>()
        .map(|a| TcpStream::connect_timeout(&a, Duration::from_millis(200)).is_ok())
        .unwrap_or(false)
}

impl TestCluster {
    /// A cluster to prepare: add nodes, set the node timeout, then `start`.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder {
            nodes: Vec::new(),
            node_timeout: 5.0,
            tls: false,
            master_args: Vec::new(),
            standby_masters: 0,
        }
    }

    /// A master and one default node.
    pub fn start() -> TestCluster {
        Self::builder().start()
    }

    /// A master and one node made from `spec`.
    pub fn with_node(spec: NodeSpec) -> TestCluster {
        Self::builder().node(spec).start()
    }

    /// The cluster's directory (master data, node sessions and logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn master_log(&self) -> PathBuf {
        self.dir.path().join("master.log")
    }

    fn node_log(&self, index: usize) -> PathBuf {
        self.dir.path().join(format!("node{index}.log"))
    }

    /// Start the master; the error (with its log's end) if it exits during start.
    fn spawn_master(&mut self) -> Result<(), String> {
        let child = self.spawn_master_process(0, self.master_port, self.metrics_port)?;
        self.master = Some(child);
        Ok(())
    }

    /// Start standby master `index`; the error (with its log's end) if it exits during start.
    fn spawn_standby(&mut self, index: usize) -> Result<(), String> {
        let (port, metrics_port) = (self.standbys[index].port, self.standbys[index].metrics_port);
        let child = self.spawn_master_process(index + 1, port, metrics_port)?;
        self.standbys[index].child = Some(child);
        Ok(())
    }

    /// The log of master `index` (0: the first, then the standbys).
    pub fn master_log_at(&self, index: usize) -> PathBuf {
        match index {
            0 => self.master_log(),
            _ => self.dir.path().join(format!("master{index}.log")),
        }
    }

    /// Start master process `index` on `port`, waiting until it listens.
    fn spawn_master_process(
        &self,
        index: usize,
        port: u16,
        metrics_port: u16,
    ) -> Result<Child, String> {
        let data_dir = match index {
            0 => "master".to_string(),
            _ => format!("master{index}"),
        };
        let mut args = vec![
            "--listen".to_string(),
            format!("127.0.0.1:{port}"),
            "--data-dir".to_string(),
            self.dir.path().join(data_dir).display().to_string(),
            "--metrics-listen".to_string(),
            format!("127.0.0.1:{metrics_port}"),
            "--node-timeout".to_string(),
            self.node_timeout.to_string(),
        ];
        args.extend(self.master_args.iter().cloned());
        let log = self.master_log_at(index);
        if let Some(tls) = &self.tls {
            args.extend(tls.args(&tls.master));
        }
        let env = [(
            yr_common::auth::TOKEN_ENV.to_string(),
            self.token.as_str().to_string(),
        )];
        let mut child = spawn_component("master", &args, &log, &env);
        let address = format!("127.0.0.1:{port}");
        let ready = wait_until(START_TIMEOUT, || {
            connects(&address) || matches!(child.try_wait(), Ok(Some(_)))
        });
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "yr master exited during start ({status}); its log ends with:\n{}",
                log_tail(&log, 30)
            ));
        }
        assert!(
            ready,
            "yr master did not listen on {address} within {START_TIMEOUT:?}; log: {}",
            log.display()
        );
        Ok(child)
    }

    /// Start node `index`; the error (with its log's end) if it exits during start.
    fn spawn_node(&mut self, index: usize) -> Result<(), String> {
        let master_address = self.master_addresses().join(",");
        let node = &self.nodes[index];
        let mut args = vec![
            "--master-address".to_string(),
            master_address,
            "--listen".to_string(),
            format!("127.0.0.1:{}", node.port),
            "--bus-socket".to_string(),
            node.bus_socket.display().to_string(),
            "--session-dir".to_string(),
            node.session.display().to_string(),
            "--node-id".to_string(),
            node.node_id.clone(),
            "--cpu".to_string(),
            node.spec.cpu.to_string(),
            "--memory".to_string(),
            node.spec.memory.to_string(),
            "--heartbeat-timeout".to_string(),
            node.spec.heartbeat_timeout.to_string(),
            "--warm-pool".to_string(),
            node.spec.warm_pool.to_string(),
            "--metrics-listen".to_string(),
            format!("127.0.0.1:{}", node.metrics_port),
        ];
        if node.spec.fetch_binaries {
            args.push("--fetch-binaries".to_string());
        }
        if let Some(tls) = &self.tls {
            args.extend(tls.args(&tls.node));
        }
        if let Some(dir) = &node.spec.data_dir {
            args.extend(["--data-dir".to_string(), dir.display().to_string()]);
        }
        if let Some(mb) = node.spec.shared_memory_mb {
            args.extend(["--shared-memory-mb".to_string(), mb.to_string()]);
        }
        if let Some(dir) = &node.spec.spill_dir {
            args.extend(["--spill-dir".to_string(), dir.display().to_string()]);
        }
        if let Some(mb) = node.spec.spill_limit_mb {
            args.extend(["--spill-limit-mb".to_string(), mb.to_string()]);
        }
        if let Some(mb) = node.spec.kv_quota_mb {
            args.extend(["--kv-quota-mb".to_string(), mb.to_string()]);
        }
        for (key, value) in &node.spec.labels {
            args.extend(["--labels".to_string(), format!("{key}={value}")]);
        }
        if let Some(redis) = &node.spec.l2_redis {
            args.extend(["--l2-redis".to_string(), redis.clone()]);
        }
        if let Some((rate, burst)) = node.spec.create_rate {
            args.extend([
                "--create-rate".to_string(),
                rate.to_string(),
                "--create-burst".to_string(),
                burst.to_string(),
            ]);
        }
        let log = self.node_log(index);
        let mut env = node.spec.env.clone();
        env.push((
            yr_common::auth::TOKEN_ENV.to_string(),
            self.token.as_str().to_string(),
        ));
        let mut child = spawn_component("node", &args, &log, &env);
        let socket = node.bus_socket.clone();
        let node_id = node.node_id.clone();
        let ready = wait_until(START_TIMEOUT, || {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return true;
            }
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
                && self
                    .status()
                    .map(|s| {
                        s.nodes
                            .iter()
                            .any(|n| n.node_id == node_id && n.state == "alive")
                    })
                    .unwrap_or(false)
        });
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "yr node exited during start ({status}); its log ends with:\n{}",
                log_tail(&log, 30)
            ));
        }
        assert!(
            ready,
            "yr node {node_id} was not ready (bus socket and listed alive by the master) within \
             {START_TIMEOUT:?}; log: {}",
            log.display()
        );
        self.nodes[index].child = Some(child);
        Ok(())
    }

    /// The cluster token.
    pub fn token(&self) -> &yr_common::auth::ClusterToken {
        &self.token
    }

    /// The CA of a TLS cluster.
    pub fn tls_ca(&self) -> Option<&Path> {
        self.tls.as_ref().map(|tls| tls.ca.as_path())
    }

    /// A client's TLS files for a TLS cluster (a certificate its CA signed, naming
    /// `127.0.0.1` and `localhost`), for [`yr::Config::tls`].
    pub fn client_tls(&self) -> Option<yr::TlsFiles> {
        self.tls
            .as_ref()
            .map(|tls| yr::TlsFiles::new(&tls.node.0, &tls.node.1, &tls.ca))
    }

    /// The master's gRPC address.
    pub fn master_address(&self) -> String {
        format!("127.0.0.1:{}", self.master_port)
    }

    /// Every master's address: the first, then the standbys ([`ClusterBuilder::standby_masters`]).
    pub fn master_addresses(&self) -> Vec<String> {
        std::iter::once(self.master_address())
            .chain(
                self.standbys
                    .iter()
                    .map(|standby| format!("127.0.0.1:{}", standby.port)),
            )
            .collect()
    }

    /// The pid of master `index` (0: the first, then the standbys), if it runs.
    pub fn master_pid_at(&self, index: usize) -> Option<u32> {
        match index {
            0 => self.master_pid(),
            _ => self.standbys[index - 1].child.as_ref().map(Child::id),
        }
    }

    /// SIGKILL master `index` (0: the first, then the standbys) and reap it.
    pub fn kill_master_at(&mut self, index: usize) {
        let child = match index {
            0 => self.master.take(),
            _ => self.standbys[index - 1].child.take(),
        };
        if let Some(mut child) = child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The value of the Prometheus gauge or counter `name` (without labels) that node `index`
    /// reports on its /metrics endpoint.
    pub fn node_metric(&self, index: usize, name: &str) -> Option<f64> {
        let address = format!("127.0.0.1:{}", self.nodes[index].metrics_port);
        metric_at(&address, name)
    }

    /// The value of the Prometheus gauge or counter `name` (without labels) that the master
    /// reports on its /metrics endpoint.
    pub fn master_metric(&self, name: &str) -> Option<f64> {
        metric_at(&self.master_metrics_address(), name)
    }

    /// [`TestCluster::node_metric`], waiting up to [`TIMEOUT`] for the node to report it;
    /// panics if it never does.
    pub fn wait_metric(&self, index: usize, name: &str) -> f64 {
        let mut value = None;
        wait_until(TIMEOUT, || {
            value = self.node_metric(index, name);
            value.is_some()
        });
        value.unwrap_or_else(|| panic!("node {index} reports no {name}"))
    }

    /// Node `index`'s health and metrics address.
    pub fn node_metrics_address(&self, index: usize) -> String {
        format!("127.0.0.1:{}", self.nodes[index].metrics_port)
    }

    /// The master's health and metrics address.
    pub fn master_metrics_address(&self) -> String {
        format!("127.0.0.1:{}", self.metrics_port)
    }

    /// The bus address of the first node, for `Config::server_address`.
    pub fn bus_address(&self) -> String {
        self.node_bus_address(0)
    }

    /// The bus address (`unix:/path`) of node `index`.
    pub fn node_bus_address(&self, index: usize) -> String {
        format!("unix:{}", self.nodes[index].bus_socket.display())
    }

    /// The bus socket of node `index`.
    pub fn node_bus_socket(&self, index: usize) -> &Path {
        &self.nodes[index].bus_socket
    }

    /// The TCP address of node `index`'s bus.
    pub fn node_address(&self, index: usize) -> String {
        format!("127.0.0.1:{}", self.nodes[index].port)
    }

    /// The id of node `index`.
    pub fn node_id(&self, index: usize) -> &str {
        &self.nodes[index].node_id
    }

    /// The session directory of node `index`.
    pub fn node_session(&self, index: usize) -> &Path {
        &self.nodes[index].session
    }

    /// The pid of node `index`, if it runs.
    pub fn node_pid(&self, index: usize) -> Option<u32> {
        self.nodes[index].child.as_ref().map(Child::id)
    }

    /// The pid of the master, if it runs.
    pub fn master_pid(&self) -> Option<u32> {
        self.master.as_ref().map(Child::id)
    }

    /// A driver configuration for node 0.
    pub fn config(&self) -> yr::Config {
        driver_config(&self.bus_address())
    }

    /// The incarnation under which the leading master lists node `index` now.
    pub fn node_incarnation(&self, index: usize) -> u64 {
        node_incarnation(&self.status().unwrap(), self.node_id(index))
            .expect("the master lists the node")
    }

    /// What the master says about the cluster: the first master that answers (with standbys,
    /// the leader; a standby answers every call with "not the leader").
    pub fn status(&self) -> Result<pb::ClusterStatusResponse, String> {
        let mut errors = Vec::new();
        for address in self.master_addresses() {
            match self.status_at(&address) {
                Ok(status) => return Ok(status),
                Err(error) => errors.push(format!("{address}: {error}")),
            }
        }
        Err(errors.join("; "))
    }

    /// What the master at `address` says about the cluster.
    pub fn status_at(&self, address: &str) -> Result<pb::ClusterStatusResponse, String> {
        master_status(address)
    }

    /// The record of `instance_id` as its node stored it in the master's meta store
    /// (`/yr/instance/<id>`); `None` if there is none.
    /// Send node `index` a `Node.Kill` of `instance_id` (waiting for the exit), as another node
    /// of the cluster sends it; the node's answer, or its refusal's message.
    pub fn kill_through_node(&self, index: usize, instance_id: &str) -> Result<(), String> {
        let address = self.node_address(index);
        let request = pb::KillRequest {
            instance_id: instance_id.to_string(),
            wait: true,
            job_id: String::new(),
            force: false,
        };
        block_on(async move {
            let channel = connect_within(&address, "node").await?;
            tokio::time::timeout(
                Duration::from_secs(30),
                pb::node_client::NodeClient::new(channel).kill(request),
            )
            .await
            .map_err(|_| format!("the node at {address} did not answer a kill within 30 s"))?
            .map(|_| ())
            .map_err(|status| status.message().to_string())
        })
    }

    pub fn stored_instance(&self, instance_id: &str) -> Result<Option<pb::InstanceRecord>, String> {
        stored_record(&self.master_address(), instance_id)
    }

    /// Poll the master's status until `condition` holds; returns the status that satisfied it,
    /// or panics after `timeout` with the last status seen.
    #[track_caller]
    pub fn wait_for_status(
        &self,
        timeout: Duration,
        what: &str,
        mut condition: impl FnMut(&pb::ClusterStatusResponse) -> bool,
    ) -> pb::ClusterStatusResponse {
        let mut last = None;
        let held = wait_until(timeout, || match self.status() {
            Ok(status) => {
                let held = condition(&status);
                last = Some(Ok(status));
                held
            }
            Err(error) => {
                last = Some(Err(error));
                false
            }
        });
        match (held, last) {
            (true, Some(Ok(status))) => status,
            (_, last) => panic!("{what} did not happen within {timeout:?}; last status: {last:?}"),
        }
    }

    /// The runtime processes of node `index`: its live children.
    pub fn runtime_pids(&self, index: usize) -> Vec<u32> {
        self.node_pid(index).map(children_of).unwrap_or_default()
    }

    /// SIGKILL the master and reap it.
    pub fn kill_master(&mut self) {
        if let Some(mut child) = self.master.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start the master again on the same port and data directory.
    pub fn restart_master(&mut self) {
        self.kill_master();
        let mut attempt = 0;
        while let Err(error) = self.spawn_master() {
            attempt += 1;
            assert!(
                error.contains(ADDRESS_IN_USE) && attempt < START_ATTEMPTS,
                "{error}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// SIGTERM node `index` (it runs its instances' shutdown hooks) and wait up to `timeout`
    /// for it to exit. Returns whether it exited.
    pub fn stop_node(&mut self, index: usize, timeout: Duration) -> bool {
        let Some(child) = self.nodes[index].child.as_mut() else {
            return true;
        };
        signal(child.id(), libc::SIGTERM);
        let exited = wait_until(timeout, || matches!(child.try_wait(), Ok(Some(_))));
        if exited {
            self.nodes[index].child = None;
        }
        exited
    }

    /// SIGKILL node `index` and reap it.
    pub fn kill_node(&mut self, index: usize) {
        if let Some(mut child) = self.nodes[index].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start node `index` again (after [`TestCluster::kill_node`] or
    /// [`TestCluster::stop_node`]): the same node id, ports and session directory, a new
    /// process (so a new incarnation). Waits until it is started, as [`TestCluster::add_node`].
    pub fn restart_node(&mut self, index: usize) {
        assert!(
            self.nodes[index].child.is_none(),
            "node {index} is still running"
        );
        if let Err(error) = self.spawn_node(index) {
            panic!("node {index} did not start again: {error}");
        }
    }

    /// The last `lines` lines of node `index`'s log.
    pub fn node_log_tail(&self, index: usize, lines: usize) -> String {
        log_tail(&self.node_log(index), lines)
    }

    /// The last `lines` lines of the master's log.
    pub fn master_log_tail(&self, lines: usize) -> String {
        log_tail(&self.master_log(), lines)
    }

    /// Every live process that belongs to this cluster (master, nodes, runtimes).
    pub fn processes(&self) -> Vec<u32> {
        processes_mentioning(&self.dir.display())
    }
}

/// The value of the Prometheus gauge or counter `name` (without labels) on the /metrics
/// endpoint at `address`; `None` if it does not answer or does not report it.
pub fn metric_at(address: &str, name: &str) -> Option<f64> {
    let (status, text) = block_on(yr_transport::http::fetch(
        address,
        "/metrics",
        Duration::from_secs(5),
    ))
    .ok()?;
    if !status.is_success() {
        return None;
    }
    text.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// A channel to the `what` at `address`, connected within 5 s.
async fn connect_within(address: &str, what: &str) -> Result<tonic::transport::Channel, String> {
    tokio::time::timeout(
        Duration::from_secs(5),
        yr_transport::connect(address, yr::ErrorCode::InnerCommunication),
    )
    .await
    .map_err(|_| format!("connecting to the {what} at {address} timed out"))?
    .map_err(|e| e.to_string())
}

/// What the master at `address` says about the cluster (a standby answers "not the leader",
/// naming it). The connection is made from the calling thread's network namespace.
pub fn master_status(address: &str) -> Result<pb::ClusterStatusResponse, String> {
    let address = address.to_string();
    block_on(async move {
        let channel = connect_within(&address, "master").await?;
        tokio::time::timeout(
            Duration::from_secs(5),
            pb::master_client::MasterClient::new(channel)
                .cluster_status(pb::ClusterStatusRequest {}),
        )
        .await
        .map_err(|_| format!("the master at {address} did not answer within 5 s"))?
        .map(|r| r.into_inner())
        .map_err(|s| s.message().to_string())
    })
}

/// The incarnation under which `status` lists node `node_id`; `None` if it does not list it.
pub fn node_incarnation(status: &pb::ClusterStatusResponse, node_id: &str) -> Option<u64> {
    status
        .nodes
        .iter()
        .find(|n| n.node_id == node_id)
        .map(|n| n.incarnation)
}

impl TestCluster {
    /// Follow the record of `instance_id` in the master's meta store from now on: every version
    /// written (`None`: deleted), in order, as a watch delivers them. Returns once the watch is
    /// open; it ends when the history is dropped.
    pub fn watch_instance(&self, instance_id: &str) -> RecordHistory {
        watch_record(&self.master_address(), instance_id)
    }
}

/// Follow the record of `instance_id` in the meta store of the master at `address` from now on:
/// every version written (`None`: deleted), in order, as a watch delivers them. Returns once the
/// watch is open; it ends when the history is dropped. The connection is made from the calling
/// thread's network namespace.
pub fn watch_record(address: &str, instance_id: &str) -> RecordHistory {
    use prost::Message;
    use yr_proto::meta::meta_service_client::MetaServiceClient;
    use yr_proto::meta::{watch_event, CurrentRevisionRequest, WatchRequest};
    let address = address.to_string();
    let key = format!("/yr/instance/{instance_id}");
    let records = std::sync::Arc::new(Mutex::new(Vec::new()));
    let seen = records.clone();
    let (ready, opened) = std::sync::mpsc::channel::<Result<(), String>>();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        block_on(async move {
            let opening = async {
                let channel = yr_transport::connect(&address, yr::ErrorCode::InnerCommunication)
                    .await
                    .map_err(|e| e.to_string())?;
                let mut client = MetaServiceClient::new(channel);
                let revision = client
                    .current_revision(CurrentRevisionRequest {})
                    .await
                    .map_err(|s| s.message().to_string())?
                    .into_inner()
                    .revision;
                client
                    .watch(WatchRequest {
                        prefix: key,
                        after_revision: revision,
                    })
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(|s| s.message().to_string())
            };
            let mut stream = match tokio::time::timeout(Duration::from_secs(10), opening).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    let _ = ready.send(Err(error));
                    return;
                }
                Err(_) => {
                    let _ = ready.send(Err("opening the watch timed out".into()));
                    return;
                }
            };
            let _ = ready.send(Ok(()));
            tokio::pin!(stopped);
            loop {
                let message = tokio::select! {
                    _ = &mut stopped => return,
                    message = stream.message() => message,
                };
                let Ok(Some(message)) = message else { return };
                for event in message.events {
                    let record = match event.event {
                        Some(watch_event::Event::Put(kv)) => {
                            pb::InstanceRecord::decode(kv.value).ok()
                        }
                        _ => None,
                    };
                    seen.lock().unwrap_or_else(|e| e.into_inner()).push(record);
                }
            }
        });
    });
    match opened.recv_timeout(Duration::from_secs(15)) {
        Ok(Ok(())) => {}
        Ok(Err(error)) => panic!("cannot watch the record of {instance_id}: {error}"),
        Err(_) => panic!("the watch of the record of {instance_id} did not open"),
    }
    RecordHistory {
        records,
        stop: Some(stop),
        thread: Some(thread),
    }
}

/// The record of `instance_id` in the meta store of the master at `address`
/// (`/yr/instance/<id>`); `None` if there is none. The connection is made from the calling
/// thread's network namespace.
pub fn stored_record(
    address: &str,
    instance_id: &str,
) -> Result<Option<pb::InstanceRecord>, String> {
    use prost::Message;
    let address = address.to_string();
    let key = format!("/yr/instance/{instance_id}");
    block_on(async move {
        let channel = connect_within(&address, "meta store").await?;
        let reply = tokio::time::timeout(
            Duration::from_secs(5),
            yr_proto::meta::meta_service_client::MetaServiceClient::new(channel)
                .get(yr_proto::meta::GetRequest { key }),
        )
        .await
        .map_err(|_| format!("the meta store at {address} did not answer within 5 s"))?
        .map_err(|s| s.message().to_string())?
        .into_inner();
        reply
            .kv
            .map(|kv| pb::InstanceRecord::decode(kv.value).map_err(|e| e.to_string()))
            .transpose()
    })
}

/// The versions of one instance's record that a watch delivered (see
/// [`TestCluster::watch_instance`]).
pub struct RecordHistory {
    records: std::sync::Arc<Mutex<Vec<Option<pb::InstanceRecord>>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RecordHistory {
    /// Every version written so far, in order (`None`: the record was deleted).
    pub fn records(&self) -> Vec<Option<pb::InstanceRecord>> {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Assert that the watch saw a FATAL version and that nothing was written after the first
    /// one: the master's FATAL stands. Returns the FATAL version's index.
    #[track_caller]
    pub fn assert_fatal_is_last(&self) -> usize {
        let versions = self.records();
        let first_fatal = versions
            .iter()
            .position(|r| {
                r.as_ref()
                    .is_some_and(|r| r.state() == pb::InstanceState::Fatal)
            })
            .unwrap_or_else(|| panic!("the watch saw the FATAL record: {versions:?}"));
        assert_eq!(
            versions.len(),
            first_fatal + 1,
            "nothing was written after the master's FATAL: {versions:?}"
        );
        first_fatal
    }
}

impl Drop for RecordHistory {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                if let Ok(Some(status)) = child.try_wait() {
                    eprintln!("node {} had already exited: {status}", node.node_id);
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        self.kill_master();
        for standby in &mut self.standbys {
            if let Some(mut child) = standby.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // Runtimes die with their node (parent-death signal); make sure of it.
        let dir = self.dir.display();
        wait_until(Duration::from_secs(5), || {
            processes_mentioning(&dir).is_empty()
        });
        kill_mentioning(&dir);
    }
}

// ----- speaking the wire protocol directly -------------------------------------------------------

/// A DataWorker client of node `index`'s bus socket (with the cluster's token), and the
/// runtime to drive it on, for tests that play a node's client.
pub fn data_worker_client(
    cluster: &TestCluster,
    index: usize,
) -> (
    tokio::runtime::Runtime,
    yr_proto::ds::data_worker_client::DataWorkerClient<tonic::transport::Channel>,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let channel = runtime
        .block_on(raw_channel(
            &cluster.node_bus_address(index),
            Some(cluster.token().clone()),
        ))
        .expect("a channel to the node");
    (
        runtime,
        yr_proto::ds::data_worker_client::DataWorkerClient::new(channel),
    )
}

/// A gRPC channel to `address` (`host:port` or `unix:/path`) as an outsider would open it: with
/// `token`'s hello first, or with no hello at all (`None`), so that tests can play a client that
/// lacks the token or has a wrong one. Fails as the connection fails.
pub async fn raw_channel(
    address: &str,
    token: Option<yr_common::auth::ClusterToken>,
) -> Result<tonic::transport::Channel, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = yr_transport::Address::parse(address).map_err(|e| e.to_string())?;
    let endpoint = tonic::transport::Endpoint::from_static("http://[::1]:1")
        .connect_timeout(Duration::from_secs(5));
    endpoint
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let address = address.clone();
            let token = token.clone();
            async move {
                let mut stream: Box<dyn RawStream> = match &address {
                    yr_transport::Address::Tcp(host_port) => {
                        Box::new(tokio::net::TcpStream::connect(host_port.as_str()).await?)
                    }
                    yr_transport::Address::Unix(path) => {
                        Box::new(tokio::net::UnixStream::connect(path).await?)
                    }
                };
                if let Some(token) = token {
                    stream.write_all(&token.hello()).await?;
                    let mut answer = [0u8; 1];
                    stream.read_exact(&mut answer).await?;
                    if answer[0] != yr_common::auth::HELLO_ACCEPTED {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::PermissionDenied,
                            "the token was refused",
                        ));
                    }
                }
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e)))
}

/// A byte stream a raw channel runs over.
pub trait RawStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> RawStream for T {}

/// Open a Bus session on `address` as an outsider with `token`, send `register`, and return the
/// node's first answer, or the error that ended the attempt.
pub fn bus_register(
    address: &str,
    token: Option<yr_common::auth::ClusterToken>,
    register: pb::RegisterClient,
) -> Result<pb::bus_response::Body, String> {
    block_on(async move {
        let channel = raw_channel(address, token).await?;
        // One message; the sender stays alive so the session stays open until the answer.
        let (outbound, receiver) = tokio::sync::mpsc::channel(1);
        outbound
            .send(pb::BusRequest {
                message_id: 1,
                body: Some(pb::bus_request::Body::Register(register)),
            })
            .await
            .map_err(|e| e.to_string())?;
        let mut inbound = tokio::time::timeout(
            TIMEOUT,
            pb::bus_client::BusClient::new(channel)
                .session(tokio_stream::wrappers::ReceiverStream::new(receiver)),
        )
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|s| s.to_string())?
        .into_inner();
        use tokio_stream::StreamExt;
        let answer = tokio::time::timeout(TIMEOUT, inbound.next())
            .await
            .map_err(|_| "no answer".to_string())?
            .ok_or("the stream ended")?
            .map_err(|s| s.to_string())?;
        drop(outbound);
        answer
            .body
            .ok_or_else(|| "an answer without a body".to_string())
    })
}
