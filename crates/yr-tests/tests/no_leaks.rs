//! No process leaks: after `yr start --master`, a driver and `yr stop`, nothing of the session
//! remains; and a temporary cluster that a driver started by itself goes away with the driver,
//! whether it exits or is killed with SIGKILL mid-run.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use yr_common::session::SessionInfo;
use yr_tests::{
    alive, children_of, command_line, exclusive, output_within, processes_mentioning, run_yr,
    signal, target_debug_dir, wait_until, yr_binary, KillOnDrop, TempDir, TIMEOUT,
};

/// How long the processes of a cluster may take to go away.
const GONE_WITHIN: Duration = Duration::from_secs(10);

#[track_caller]
fn assert_all_gone(what: &str, needle: &str) {
    let gone = wait_until(GONE_WITHIN, || processes_mentioning(needle).is_empty());
    let left: Vec<String> = processes_mentioning(needle)
        .into_iter()
        .map(|pid| format!("{pid}: {}", command_line(pid)))
        .collect();
    assert!(
        gone,
        "{what}: processes of {needle} remain after {GONE_WITHIN:?}:\n{}",
        left.join("\n")
    );
}

/// A command that finds clusters only through `root` (no server address, no local mode).
fn isolated(mut command: Command, root: &Path) -> Command {
    command
        .env("YR_SESSION_ROOT", root)
        .env("YR_BIN", yr_binary())
        .env_remove("YR_SERVER_ADDRESS")
        .env_remove("YR_LOCAL_MODE")
        .env_remove("YR_RUNTIME_ARGS");
    command
}

#[test]
fn yr_stop_after_a_driver_leaves_no_process_of_the_session() {
    let _exclusive = exclusive();
    let hello = target_debug_dir().join("examples").join("hello");
    assert!(
        hello.is_file(),
        "the hello example is not built at {}; run `cargo build -p yr --examples` first",
        hello.display()
    );
    let root = TempDir::new("sessions");
    let _cleanup = KillOnDrop::new(root.display());
    let envs = [("YR_SESSION_ROOT", root.path())];
    let started = run_yr(
        &["start", "--master", "--cpu", "4000", "--memory", "8192"],
        &envs,
        Duration::from_secs(60),
    );
    assert!(
        started.status.success(),
        "yr start failed: {}",
        String::from_utf8_lossy(&started.stderr)
    );
    let session = SessionInfo::read(&root.path().join("latest")).expect("the session file");
    let session_dir = session.session_dir.display().to_string();
    let pids: Vec<u32> = session.processes.iter().map(|(_, pid)| *pid).collect();
    assert_eq!(
        pids.len(),
        2,
        "a master and a node: {:?}",
        session.processes
    );
    assert!(pids.iter().all(|pid| alive(*pid)));

    // The hello example finds the cluster through the session root.
    let output = output_within(
        isolated(Command::new(&hello), root.path()),
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("hello, yuanrong"),
        "hello failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let node_pid = session
        .processes
        .iter()
        .find(|(role, _)| role == "node")
        .map(|(_, pid)| *pid)
        .unwrap();
    // The node keeps warm runtimes of the driver's binary.
    assert!(
        wait_until(TIMEOUT, || !children_of(node_pid).is_empty()),
        "the node runs runtimes"
    );
    let mut everything = processes_mentioning(&session_dir);
    everything.extend(children_of(node_pid));
    everything.extend(&pids);

    let stopped = run_yr(&["stop"], &envs, Duration::from_secs(90));
    assert!(
        stopped.status.success(),
        "yr stop failed: {}",
        String::from_utf8_lossy(&stopped.stderr)
    );
    assert!(
        wait_until(GONE_WITHIN, || everything.iter().all(|pid| !alive(*pid))),
        "processes remain after yr stop: {:?}",
        everything
            .iter()
            .filter(|pid| alive(**pid))
            .map(|pid| format!("{pid}: {}", command_line(*pid)))
            .collect::<Vec<_>>()
    );
    assert_all_gone("yr stop", &session_dir);
    assert!(
        !root.path().join("latest").exists(),
        "yr stop removes the latest link"
    );
    let left = sockets_of(&everything);
    assert!(
        left.is_empty(),
        "socket files remain after yr stop: {left:?}"
    );
}

/// Socket files (Worker and call sockets) that the processes `pids` left in yr's socket
/// directory.
fn sockets_of(pids: &[u32]) -> Vec<String> {
    let dir = yr_common::sockets::socket_dir().expect("the socket directory");
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| {
            pids.iter()
                .any(|pid| name.starts_with(&format!("w-{pid}-")))
        })
        .collect()
}

/// Start the helper binary `temporary_cluster_driver` (a driver with no cluster to find, which
/// starts a temporary one) in `mode` (`exit` or `block`); returns it and the pids it printed, once it printed READY.
fn start_driver(mode: &str, root: &Path, tmp: &Path) -> (std::process::Child, Vec<u32>) {
    let mut command = isolated(
        yr_tests::helper_process(env!("CARGO_BIN_EXE_temporary_cluster_driver")),
        root,
    );
    command
        .env("TMPDIR", tmp)
        .env("YR_TESTS_DRIVER_MODE", mode)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = command.spawn().expect("start the driver");
    let stdout = child.stdout.take().unwrap();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Keep reading to the end, so that the driver never writes into a closed pipe.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = sender.send(line);
        }
    });
    let mut pids = Vec::new();
    loop {
        match receiver.recv_timeout(Duration::from_secs(90)) {
            Ok(line) if line.ends_with("READY") => break,
            Ok(line) => {
                // libtest may print "test <name> ... " before the first line of output.
                let pid: Option<u32> = ["INSTANCE_RUNTIME ", "FUNCTION_RUNTIME "]
                    .iter()
                    .find_map(|marker| line.split_once(marker))
                    .and_then(|(_, pid)| pid.trim().parse().ok());
                pids.extend(pid);
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                yr_tests::kill_mentioning(&tmp.display().to_string());
                panic!("the driver did not get ready");
            }
        }
    }
    (child, pids)
}

#[test]
fn driver_that_exits_takes_its_temporary_cluster_with_it() {
    let _exclusive = exclusive();
    let root = TempDir::new("empty-root");
    let tmp = TempDir::new("tmpdir");
    let _cleanup = KillOnDrop::new(tmp.display());
    let (mut driver, runtimes) = start_driver("exit", root.path(), tmp.path());
    assert_eq!(runtimes.len(), 2, "the driver ran calls on its cluster");
    assert!(
        !processes_mentioning(&tmp.display()).is_empty(),
        "the temporary cluster runs"
    );
    // Let the driver finish.
    drop(driver.stdin.take());
    let status = driver.wait().unwrap();
    assert!(status.success(), "the driver finished: {status}");
    assert_all_gone("a driver that exited", &tmp.display());
    assert!(
        std::fs::read_dir(root.path()).unwrap().next().is_none(),
        "a temporary cluster is not linked as the latest session"
    );
}

#[test]
fn driver_killed_mid_run_takes_its_temporary_cluster_with_it() {
    let _exclusive = exclusive();
    let root = TempDir::new("empty-root");
    let tmp = TempDir::new("tmpdir");
    let _cleanup = KillOnDrop::new(tmp.display());
    let (mut driver, runtimes) = start_driver("block", root.path(), tmp.path());
    assert_eq!(runtimes.len(), 2, "the driver ran calls on its cluster");
    assert!(runtimes.iter().all(|pid| alive(*pid)));
    let cluster = processes_mentioning(&tmp.display());
    assert!(
        cluster.len() >= 4,
        "yr start, a master, a node and runtimes run: {cluster:?}"
    );
    signal(driver.id(), libc::SIGKILL);
    let _ = driver.wait();
    assert_all_gone("a driver killed with SIGKILL mid-call", &tmp.display());
}

/// An instance that does nothing.
#[yr::instance]
pub struct Idle;

#[yr::instance]
impl Idle {
    pub fn new() -> Self {
        Idle
    }
}

/// A driver that finalizes while its creates are still being placed, started or waiting for
/// CPU kills them mid-way: every runtime started for them ends, and the node gets back every
/// millicore and megabyte. (A kill that came while a create's runtime was starting used to
/// leave that runtime serving nobody, and a kill that came while the scheduler granted a
/// waiting create lost the grant.)
#[test]
fn a_driver_that_finalizes_while_its_instances_start_leaves_no_runtime_and_no_resources_held() {
    let _exclusive = exclusive();
    let warm_pool = 1;
    let cluster = yr_tests::TestCluster::with_node(yr_tests::NodeSpec {
        cpu: 2_000,
        warm_pool,
        ..yr_tests::NodeSpec::default()
    });
    for round in 0..3 {
        yr::init(cluster.config()).unwrap();
        // Four fit (500 m each): one from the warm pool, three started cold; the rest wait.
        let handles: Vec<_> = (0..12)
            .map(|_| yr::instance(Idle::new).invoke(()).unwrap())
            .collect();
        drop(handles);
        yr::finalize().unwrap();
        cluster.wait_for_status(
            TIMEOUT,
            &format!("round {round}: the node has all its resources back"),
            |status| {
                status
                    .nodes
                    .iter()
                    .all(|node| node.allocatable == node.capacity)
                    && status.instances.is_empty()
            },
        );
        // Every runtime started for the killed creates ended: only the warm pool is left.
        let settled = wait_until(TIMEOUT, || cluster.runtime_pids(0).len() <= warm_pool);
        assert!(
            settled,
            "round {round}: runtimes left beyond the warm pool of {warm_pool}: {:?}",
            cluster
                .runtime_pids(0)
                .iter()
                .map(|pid| command_line(*pid))
                .collect::<Vec<_>>()
        );
    }
}
