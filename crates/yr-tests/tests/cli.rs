//! The `yr` command against real clusters: `yr status` (tables and `--json`) shows nodes with
//! capacity and allocatable, instances and registered functions; `yr stop` runs shutdown hooks
//! and `yr stop --force` kills without them, leaving no process behind either way.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use yr_common::session::SessionInfo;
use yr_tests::{
    alive, children_of, exclusive, processes_mentioning, record, run_yr, wait_until, KillOnDrop,
    Marker, NodeSpec, TempDir, TestCluster, TIMEOUT,
};

#[yr::instance]
pub struct Graceful {
    marker: String,
}

#[yr::instance]
impl Graceful {
    pub fn new(marker: String) -> Self {
        Graceful { marker }
    }

    pub fn ping(&self) -> bool {
        true
    }

    #[yr::shutdown]
    fn on_shutdown(&mut self, _grace_period: Duration) {
        record(&self.marker, "hook");
    }
}

#[yr::invoke]
fn square(n: i64) -> i64 {
    n * n
}

/// `YR_TOKEN` for `yr` commands that talk to a cluster by its address, not its session.
fn token_env(cluster: &TestCluster) -> [(&'static str, &Path); 1] {
    [(
        yr_common::auth::TOKEN_ENV,
        Path::new(cluster.token().as_str()),
    )]
}

fn status_json(cluster: &TestCluster, master_address: &str) -> serde_json::Value {
    let output = run_yr(
        &["status", "--json", "--master-address", master_address],
        &token_env(cluster),
        TIMEOUT,
    );
    assert!(
        output.status.success(),
        "yr status --json failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "yr status --json printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

#[test]
fn status_json_shows_nodes_capacity_allocatable_and_registered_functions() {
    let _exclusive = exclusive();
    let cluster = TestCluster::with_node(NodeSpec {
        cpu: 3_000,
        memory: 6_000,
        ..Default::default()
    });
    yr::init(cluster.config()).unwrap();
    let marker = Marker::new("status");
    let graceful = yr::instance(Graceful::new)
        .invoke((marker.path(),))
        .unwrap();
    assert!(yr::get(
        &graceful.method(Graceful::ping).invoke(()).unwrap(),
        TIMEOUT
    )
    .unwrap());
    assert_eq!(
        yr::get(&yr::function(square).invoke((4,)).unwrap(), TIMEOUT).unwrap(),
        16
    );

    let master = cluster.master_address();
    let node_id = cluster.node_id(0).to_string();
    let instance_id = graceful.id().to_string();
    let mut last = serde_json::Value::Null;
    let complete = wait_until(TIMEOUT, || {
        last = status_json(&cluster, &master);
        let functions: Vec<&str> = last["functions"]
            .as_array()
            .map(|a| a.iter().filter_map(|f| f.as_str()).collect())
            .unwrap_or_default();
        let has_instance = last["instances"]
            .as_array()
            .is_some_and(|a| a.iter().any(|i| i["id"] == instance_id.as_str()));
        // The graceful instance holds the default 500 millicores and 500 MB at least.
        let allocatable_cpu = last["nodes"][0]["allocatable"]["cpu_millicores"]
            .as_u64()
            .unwrap_or(u64::MAX);
        functions.contains(&"cli::Graceful::ping")
            && functions.contains(&"cli::square")
            && has_instance
            && allocatable_cpu <= 2_500
    });
    assert!(complete, "yr status --json is incomplete: {last:#}");
    let node = &last["nodes"][0];
    assert_eq!(node["id"], node_id.as_str());
    assert_eq!(node["state"], "alive");
    assert_eq!(node["address"], cluster.node_address(0).as_str());
    assert_eq!(node["capacity"]["cpu_millicores"], 3_000);
    assert_eq!(node["capacity"]["memory_mb"], 6_000);
    assert!(node["allocatable"]["memory_mb"].as_u64().unwrap() <= 5_500);
    let instance = last["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == instance_id.as_str())
        .unwrap();
    assert_eq!(instance["node"], node_id.as_str());
    assert_eq!(instance["function"], "cli::Graceful::new");

    // The tables show the same.
    let output = run_yr(
        &["status", "--master-address", &master],
        &token_env(&cluster),
        TIMEOUT,
    );
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    for needle in [
        "Nodes",
        node_id.as_str(),
        "3000m/6000MB",
        "Instances by state",
        "Registered functions",
        "cli::Graceful::ping",
    ] {
        assert!(text.contains(needle), "yr status lacks {needle:?}:\n{text}");
    }
    yr::finalize().unwrap();
}

/// `yr start --master` under the sessions root `root`; returns the session.
fn yr_start(root: &Path) -> SessionInfo {
    let output = run_yr(
        &[
            "start",
            "--master",
            "--cpu",
            "4000",
            "--memory",
            "8192",
            "--warm-pool",
            "1",
        ],
        &[("YR_SESSION_ROOT", root)],
        Duration::from_secs(60),
    );
    assert!(
        output.status.success(),
        "yr start failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let session = SessionInfo::read(&root.join("latest")).expect("the session file");
    assert!(String::from_utf8_lossy(&output.stdout).contains(&session.bus_address));
    session
}

/// Start a cluster with `yr start`, run an instance with a shutdown hook on it, stop the
/// cluster with `yr stop` and `stop_flags`; returns the marker's lines.
fn stop_with(stop_flags: &[&str]) -> Vec<String> {
    let root = TempDir::new("sessions");
    let _cleanup = KillOnDrop::new(root.display());
    let session = yr_start(root.path());
    let session_dir = session.session_dir.display().to_string();
    let node_pid = session
        .processes
        .iter()
        .find(|(role, _)| role == "node")
        .map(|(_, pid)| *pid)
        .unwrap();
    yr::init(yr_tests::driver_config(&session.bus_address)).unwrap();
    let marker = Marker::new("stop");
    let graceful = yr::instance(Graceful::new)
        .invoke((marker.path(),))
        .unwrap();
    assert!(yr::get(
        &graceful.method(Graceful::ping).invoke(()).unwrap(),
        TIMEOUT
    )
    .unwrap());
    // The runtimes' logs, created by the node under the umask `yr` set, are private too.
    let runtime_logs: Vec<_> = std::fs::read_dir(session.session_dir.join("logs"))
        .expect("the session's logs")
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("runtime-"))
        .collect();
    assert!(!runtime_logs.is_empty(), "no runtime log");
    for entry in runtime_logs {
        let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", entry.path().display());
    }
    let mut everything = children_of(node_pid);
    everything.extend(session.processes.iter().map(|(_, pid)| *pid));

    let mut args = vec!["stop"];
    args.extend_from_slice(stop_flags);
    let output = run_yr(
        &args,
        &[("YR_SESSION_ROOT", root.path())],
        Duration::from_secs(90),
    );
    assert!(
        output.status.success(),
        "yr {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        wait_until(Duration::from_secs(10), || everything
            .iter()
            .all(|pid| !alive(*pid))
            && processes_mentioning(&session_dir).is_empty()),
        "processes remain after yr {args:?}: {:?}",
        processes_mentioning(&session_dir)
    );
    // Every process of the session is gone, the runtime that ran (or skipped) the hook with
    // them, so nothing is left that could still write the marker: it is final now.
    let lines = marker.lines();
    yr::finalize().unwrap();
    lines
}

#[test]
fn yr_stop_runs_shutdown_hooks() {
    let _exclusive = exclusive();
    let lines = stop_with(&[]);
    assert_eq!(lines, vec!["hook".to_string()], "the hook ran once");
}

#[test]
fn yr_stop_force_kills_without_shutdown_hooks() {
    let _exclusive = exclusive();
    let lines = stop_with(&["--force"]);
    assert!(lines.is_empty(), "no hook ran: {lines:?}");
}
