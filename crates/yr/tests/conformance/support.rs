//! What the conformance tests share: the backend under test, one yr session per test under a
//! process-wide lock, error assertions, marker files that user code writes to, a tiny
//! `block_on`, and a way to run a test in a fresh process.

use std::fmt::Debug;
use std::fs::OpenOptions;
use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use yr::{Error, ErrorCode, ObjectRef};

/// Selects the backend: `local` (default) or `cluster`.
pub const BACKEND_VAR: &str = "YR_CONFORMANCE_BACKEND";
/// Set in a child process started by [`in_fresh_process`] to the test it must run.
const FRESH_VAR: &str = "YR_CONFORMANCE_FRESH_PROCESS";

/// How long a test waits for a result that should come (generous: it only bounds a hang).
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Where the calls of the tests run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Everything in this process (`Config::local()`).
    Local,
    /// A cluster (`Config::default()` with `local_mode = false`; `YR_SERVER_ADDRESS`, … from
    /// the environment).
    Cluster,
}

/// The backend named by `YR_CONFORMANCE_BACKEND`.
pub fn backend() -> Backend {
    match std::env::var(BACKEND_VAR) {
        Err(_) => Backend::Local,
        Ok(value) => match value.trim() {
            "" | "local" => Backend::Local,
            "cluster" => Backend::Cluster,
            other => panic!("{BACKEND_VAR}={other:?} is not a backend; use local or cluster"),
        },
    }
}

/// The configuration of a session on the backend under test.
pub fn config() -> yr::Config {
    match backend() {
        Backend::Local => yr::Config::local(),
        Backend::Cluster => {
            // Runtimes re-execute this test binary running only this test, which serves as a
            // runtime from its first act, `exclusive`.
            let thread = std::thread::current();
            let test = thread
                .name()
                .filter(|name| *name != "main")
                .expect("a cluster session is opened on a test's own thread");
            std::env::set_var(
                "YR_RUNTIME_ARGS",
                format!("{test} --exact --nocapture --test-threads 1"),
            );
            let mut config = yr::Config::default();
            config.local_mode = false;
            config
        }
    }
}

static LOCK: Mutex<()> = Mutex::new(());

/// Exclusive use of yr's process-wide state, with yr not initialized. Finalizes on drop, so a
/// test that fails half-way leaves nothing behind.
pub struct Exclusive {
    _guard: MutexGuard<'static, ()>,
}

impl Drop for Exclusive {
    fn drop(&mut self) {
        let _ = yr::finalize();
    }
}

/// Take the lock; yr is finalized (not initialized) when this returns. In a runtime process
/// (a node re-executed this binary with `YR_RUNTIME_MODE=1`), `yr::init` serves the node
/// instead, and this never returns.
pub fn exclusive() -> Exclusive {
    if std::env::var("YR_RUNTIME_MODE").as_deref() == Ok("1") {
        let result = yr::init(yr::Config::default());
        eprintln!("conformance: the runtime could not start: {result:?}");
        std::process::exit(3);
    }
    let guard = LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    yr::finalize().expect("finalize a session left behind");
    Exclusive { _guard: guard }
}

/// An initialized yr, exclusive to one test; finalized on drop.
pub struct Session {
    _exclusive: Exclusive,
}

/// A session with the backend's configuration.
pub fn session() -> Session {
    session_with(|_| {})
}

/// A session whose configuration `adjust` changes first.
pub fn session_with(adjust: impl FnOnce(&mut yr::Config)) -> Session {
    let exclusive = exclusive();
    let mut config = config();
    adjust(&mut config);
    if let Err(error) = yr::init(config) {
        panic!("yr::init failed on the {:?} backend: {error}", backend());
    }
    Session {
        _exclusive: exclusive,
    }
}

/// Give local mode's stateless pool a single thread, so that a second call queues behind a
/// busy one. Other backends have no such setting and keep their configuration.
pub fn one_pool_thread(config: &mut yr::Config) {
    if backend() == Backend::Local {
        config.local_thread_pool_size = 1;
    }
}

/// A name no other test uses: `label` plus the process id and a counter.
pub fn unique(label: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{label}-{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The value of `object`, which must arrive within [`TIMEOUT`].
#[track_caller]
pub fn get<T: DeserializeOwned>(object: &ObjectRef<T>) -> T {
    match yr::get(object, TIMEOUT) {
        Ok(value) => value,
        Err(error) => panic!("get of {object:?} failed: {error}"),
    }
}

/// The error `object` ends with; it must end with one within [`TIMEOUT`].
#[track_caller]
pub fn get_err<T: DeserializeOwned + Debug>(object: &ObjectRef<T>) -> Error {
    match yr::get(object, TIMEOUT) {
        Ok(value) => panic!("get of {object:?} gave {value:?}, expected an error"),
        Err(error) => error,
    }
}

/// The error of a call: refused at submission, or reported by `get` of its result.
#[track_caller]
pub fn call_err<T: DeserializeOwned + Debug>(submitted: yr::Result<ObjectRef<T>>) -> Error {
    match submitted {
        Err(error) => error,
        Ok(object) => get_err(&object),
    }
}

/// The error of `result`, which must have failed.
#[track_caller]
pub fn unwrap_err<T: Debug>(result: yr::Result<T>) -> Error {
    match result {
        Ok(value) => panic!("expected an error, got {value:?}"),
        Err(error) => error,
    }
}

/// Assert that `error` has `code` and that its message contains every one of `needles`.
#[track_caller]
pub fn assert_error(error: &Error, code: ErrorCode, needles: &[&str]) {
    assert_eq!(
        error.code(),
        code,
        "expected {code}, got {}: {}",
        error.code(),
        error.message()
    );
    for needle in needles {
        assert!(
            error.message().contains(needle),
            "the message of {code} should contain {needle:?}: {:?}",
            error.message()
        );
    }
}

/// A file that user code appends lines to, wherever it runs, so that a test can see what
/// happened inside a call (how many attempts ran, whether a hook ran). It lives in the
/// temporary directory, or in `YR_TEST_SHARED_DIR` when the hosts of a multi-host run share
/// one for the tests' instrumentation (`scripts/netns`). Removed on drop; user code never
/// creates it, so a late write after the test is dropped.
pub struct Marker {
    path: PathBuf,
}

impl Marker {
    /// A new, empty marker.
    pub fn new(label: &str) -> Marker {
        let dir = std::env::var_os("YR_TEST_SHARED_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let path = dir.join(format!("yr-conformance-{}", unique(label)));
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

    /// How many lines were written so far.
    pub fn count(&self) -> usize {
        self.lines().len()
    }

    /// Wait until at least `count` lines are written, at most `timeout`.
    pub fn wait_for(&self, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.count() < count {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }
}

impl Drop for Marker {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// From user code: append `line` to the marker at `path`. Returns how many lines it now has.
pub fn record(path: &str, line: &str) -> usize {
    if let Ok(mut file) = OpenOptions::new().append(true).open(path) {
        let _ = writeln!(file, "{line}");
    }
    std::fs::read_to_string(path)
        .map(|text| text.lines().count())
        .unwrap_or(0)
}

/// From user code: count one event at the marker at `path`. Returns the count so far.
pub fn hit(path: &str) -> usize {
    record(path, "hit")
}

/// Tells the test when its thread blocks in a yr call.
struct BlockedSignal(Mutex<Option<std::sync::mpsc::Sender<()>>>);

impl yr_runtime::blocking::BlockingObserver for BlockedSignal {
    fn enter(&self) {
        if let Some(sender) = self.0.lock().unwrap().take() {
            let _ = sender.send(());
        }
    }

    fn exit(&self) {}
}

/// Run `body` on a new thread and return once that thread blocks in a yr call: its backend
/// issued the call (a `get`, a KV read, a stream receive, a send waiting for room) and waits
/// for the answer. Panics if it does not block within [`TIMEOUT`].
pub fn spawn_until_blocked<T: Send + 'static>(
    body: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let (sender, blocked) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        yr_runtime::blocking::set_observer(Arc::new(BlockedSignal(Mutex::new(Some(sender)))));
        body()
    });
    blocked
        .recv_timeout(TIMEOUT)
        .expect("the thread did not block in a yr call");
    thread
}

/// What the node parks until something happens, as its `yr_node_waiting_requests` metric
/// counts them.
#[derive(Clone, Copy, Debug)]
pub enum Parked {
    /// A named-instance lookup for a name not created yet.
    NamedLookup,
    /// A KV read for a key not written yet.
    KvRead,
    /// A stream receive waiting for elements.
    StreamReceive,
    /// A stream send waiting for room.
    StreamSend,
}

impl Parked {
    fn label(self) -> &'static str {
        match self {
            Parked::NamedLookup => "named_lookup",
            Parked::KvRead => "kv_read",
            Parked::StreamReceive => "stream_receive",
            Parked::StreamSend => "stream_send",
        }
    }
}

/// [`spawn_until_blocked`], and on a cluster also until the node has taken the call in and
/// parks it (its `yr_node_waiting_requests{kind}` metric counts it): the event after which
/// whatever the call waits for may happen. Local mode has no node: blocking is that event.
pub fn spawn_until_parked<T: Send + 'static>(
    what: Parked,
    body: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let thread = spawn_until_blocked(body);
    if backend() == Backend::Cluster {
        wait_until_node_parks(what);
    }
    thread
}

/// Wait until the node of this session reports at least one parked call of `what`. Panics
/// after [`TIMEOUT`].
fn wait_until_node_parks(what: Parked) {
    let dir = yr_runtime::cluster::session_dir().expect("a cluster session on this machine");
    let session = yr_common::session::SessionInfo::read(&dir).expect("the session's file");
    let (_, address) = session
        .metrics
        .iter()
        .find(|(role, _)| role == "node")
        .expect("the node serves metrics");
    let needle = format!("yr_node_waiting_requests{{kind=\"{}\"}} ", what.label());
    let io = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime for the metrics requests");
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let (status, text) = io
            .block_on(yr_transport::http::fetch(address, "/metrics", TIMEOUT))
            .expect("the node's metrics");
        assert!(status.is_success(), "the node's metrics: {status}: {text}");
        let parked = text
            .lines()
            .find_map(|line| {
                line.strip_prefix(needle.as_str())?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0);
        if parked > 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the node never parked a {what:?}"
        );
        // Polls for the event; how long it takes does not change what the test sees.
        std::thread::sleep(Duration::from_millis(5));
    }
}

struct ThreadWaker(Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Run `future` on this thread: poll it, and park until its waker is called. Panics after
/// [`TIMEOUT`], so a future that never wakes its waker fails the test instead of hanging it.
#[track_caller]
pub fn block_on<F: Future>(future: F) -> F::Output {
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "the future was not woken within {TIMEOUT:?}"
        );
        std::thread::park_timeout(left);
    }
}

/// Run `body` in a new process that runs nothing else, for behaviour that needs yr never to
/// have been initialized. `test_path` is the test's path in this binary (`module::name`); the
/// test calls this with its own path, and the child runs that test alone.
pub fn in_fresh_process(test_path: &str, body: impl FnOnce()) {
    if std::env::var(FRESH_VAR).as_deref() == Ok(test_path) {
        body();
        return;
    }
    let _exclusive = exclusive();
    let binary = std::env::current_exe().expect("the test binary's path");
    let output = Command::new(binary)
        .args([test_path, "--exact", "--test-threads=1"])
        .env(FRESH_VAR, test_path)
        .output()
        .expect("start the test binary again");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "{test_path} failed in a fresh process ({}):\n{stdout}\n{stderr}",
        output.status
    );
}

/// Returns `value` after sleeping `ms` milliseconds.
#[yr::invoke]
pub fn slow(value: i64, ms: u64) -> i64 {
    std::thread::sleep(Duration::from_millis(ms));
    value
}

/// Fails with `text`.
#[yr::invoke]
pub fn fail_with(text: String) -> Result<i64, String> {
    Err(text)
}

/// `a + b`.
#[yr::invoke]
pub fn add(a: i64, b: i64) -> i64 {
    a + b
}
