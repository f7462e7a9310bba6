//! The `yr` command's files and processes are its user's alone, and it does no harm on bad
//! input (security issue #9): `yr stop` signals only yr processes of its session whatever a
//! session file says; a second `yr start --master` is refused while one runs; sessions and their
//! files are private, and a sessions root that is a symbolic link or another user's is refused;
//! resource flags beyond the host are refused; a closed pipe ends `yr status` quietly; a driver
//! whose session died fails with 4002 instead of starting a cluster of its own.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use yr_common::session::SessionInfo;
use yr_tests::{
    alive, exclusive, free_port, output_within, run_yr, signal, wait_until, yr_binary, KillOnDrop,
    TempDir, TestCluster, TIMEOUT,
};

const START_TIMEOUT: Duration = Duration::from_secs(60);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `yr start --master` (small, no warm runtimes) under the sessions root `root`, with `extra`
/// flags.
fn yr_start(root: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "start",
        "--master",
        "--cpu",
        "1000",
        "--memory",
        "2048",
        "--warm-pool",
        "0",
    ];
    args.extend_from_slice(extra);
    run_yr(&args, &[("YR_SESSION_ROOT", root)], START_TIMEOUT)
}

fn started(output: &Output) {
    assert!(
        output.status.success(),
        "yr start failed: {}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// A `sleep 600` that the test owns and kills when dropped.
struct Decoy(std::process::Child);

impl Decoy {
    fn start() -> Decoy {
        Decoy(
            Command::new("sleep")
                .arg("600")
                .spawn()
                .expect("start sleep"),
        )
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Send `signal`, reap the decoy, and give the signal it died of.
    fn end_with(&mut self, signal: i32) -> Option<i32> {
        use std::os::unix::process::ExitStatusExt;
        assert!(yr_tests::signal(self.pid(), signal));
        self.0.wait().expect("reap the decoy").signal()
    }
}

impl Drop for Decoy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Plant `<dir>/session.json` naming `pids` as the session's node and master.
fn plant_session(dir: &Path, node: u32, master: u32) {
    SessionInfo {
        session_dir: dir.to_path_buf(),
        bus_address: format!("unix:{}", dir.join("bus.sock").display()),
        processes: vec![("node".into(), node), ("master".into(), master)],
        ..Default::default()
    }
    .write(dir)
    .expect("plant the session file");
}

#[test]
fn yr_stop_does_not_signal_a_process_that_a_planted_session_file_names() {
    let _exclusive = exclusive();
    let dir = TempDir::new("planted");
    for flags in [&[][..], &["--force"][..]] {
        let mut decoy = Decoy::start();
        plant_session(dir.path(), decoy.pid(), decoy.pid());
        let mut args = vec!["stop", "--session-dir", dir.path().to_str().unwrap()];
        args.extend_from_slice(flags);
        let output = run_yr(&args, &[], TIMEOUT);
        let stderr = text(&output.stderr);
        assert!(
            stderr.contains(&format!("pid {}", decoy.pid()))
                && stderr.contains("is not a yr process of this session; not signalling it"),
            "yr {args:?} does not say why it skipped the decoy: {stderr}"
        );
        assert!(
            !text(&output.stdout).contains("stopped"),
            "{}",
            text(&output.stdout)
        );
        assert!(alive(decoy.pid()), "yr {args:?} killed the decoy");
        // `yr stop` has exited, so any signal it sent is already generated. The first fatal
        // signal a process gets is the one it dies of: had `yr stop` sent one, the decoy dies of
        // that instead of the test's SIGUSR2.
        assert_eq!(
            decoy.end_with(libc::SIGUSR2),
            Some(libc::SIGUSR2),
            "yr {args:?} signalled the decoy"
        );
    }
}

#[test]
fn a_second_yr_start_master_is_refused_while_one_runs_and_allowed_with_port_and_session_dir() {
    let _exclusive = exclusive();
    let root = TempDir::new("second");
    let _cleanup = KillOnDrop::new(root.display());
    started(&yr_start(root.path(), &[]));
    let first = SessionInfo::read(&root.path().join("latest")).expect("the first session");
    let first_dir = root.path().join("latest").canonicalize().unwrap();

    // The session and its files are private.
    assert_eq!(mode(&first_dir), 0o700);
    assert_eq!(mode(&first_dir.join("session.json")), 0o600);
    for log in ["master.log", "node.log"] {
        assert_eq!(mode(&first_dir.join("logs").join(log)), 0o600, "{log}");
    }
    assert_eq!(mode(&first_dir.join("logs")), 0o700);

    // Again without --port and --session-dir (with either alone too): refused.
    let other = root.path().join("other");
    let port = free_port().to_string();
    for extra in [
        &[][..],
        &["--port", &port][..],
        &["--session-dir", other.to_str().unwrap()][..],
    ] {
        let output = yr_start(root.path(), extra);
        let stderr = text(&output.stderr);
        assert!(
            !output.status.success(),
            "a second cluster started: {extra:?}"
        );
        assert!(
            stderr.contains("a yr cluster is already running on this machine")
                && stderr.contains(&first_dir.display().to_string())
                && stderr.contains("yr stop")
                && stderr.contains("--port and --session-dir"),
            "{stderr}"
        );
    }
    assert!(!other.exists(), "a refused start created its session");
    for (_, pid) in &first.processes {
        assert!(alive(*pid), "the first cluster's process {pid} is gone");
    }

    // A session file naming the first cluster's node, planted elsewhere, cannot stop it.
    let planted = TempDir::new("planted-node");
    let node = first.pid_of("node").unwrap();
    let master = first.pid_of("master").unwrap();
    plant_session(planted.path(), node, master);
    let output = run_yr(
        &["stop", "--session-dir", planted.path().to_str().unwrap()],
        &[],
        TIMEOUT,
    );
    assert!(
        text(&output.stderr).contains("is not a yr process of this session"),
        "{}",
        text(&output.stderr)
    );
    assert!(
        alive(node) && alive(master),
        "a planted session stopped a cluster"
    );

    // With both: a second cluster, which leaves `latest` to the first.
    let second_dir = root.path().join("second");
    started(&yr_start(
        root.path(),
        &[
            "--port",
            &port,
            "--session-dir",
            second_dir.to_str().unwrap(),
        ],
    ));
    let second = SessionInfo::read(&second_dir).expect("the second session");
    assert_ne!(second.master_address, first.master_address);
    assert_eq!(
        root.path().join("latest").canonicalize().unwrap(),
        first_dir,
        "the second cluster took the latest link"
    );

    for dir in [second_dir.as_path(), first_dir.as_path()] {
        let output = run_yr(
            &["stop", "--session-dir", dir.to_str().unwrap()],
            &[],
            Duration::from_secs(90),
        );
        assert!(output.status.success(), "{}", text(&output.stderr));
    }
    for pid in first.processes.iter().chain(&second.processes).map(|p| p.1) {
        assert!(
            wait_until(TIMEOUT, || !alive(pid)),
            "process {pid} survived yr stop"
        );
    }
}

/// `yr start` under the sessions root `root` fails, without starting anything; returns stderr.
fn refused_root(root: &Path) -> String {
    let output = yr_start(root, &[]);
    assert!(
        !output.status.success(),
        "yr start accepted the sessions root {}",
        root.display()
    );
    text(&output.stderr)
}

#[test]
fn a_sessions_root_that_is_a_symlink_open_to_others_or_another_users_is_refused() {
    let _exclusive = exclusive();
    let top = TempDir::new("roots");
    let _cleanup = KillOnDrop::new(top.display());

    let target = top.path().join("target");
    std::fs::create_dir(&target).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o700)).unwrap();
    let link = top.path().join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let stderr = refused_root(&link);
    assert!(
        stderr.contains(&link.display().to_string()) && stderr.contains("symbolic link"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);

    let open = top.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let stderr = refused_root(&open);
    assert!(
        stderr.contains(&open.display().to_string()) && stderr.contains("chmod 700"),
        "{stderr}"
    );

    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped the other-owner case: only root can give a directory away");
        return;
    }
    let theirs = top.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    let stderr = refused_root(&theirs);
    assert!(
        stderr.contains(&theirs.display().to_string()) && stderr.contains("belongs to user 65534"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_dir(&theirs).unwrap().count(), 0);
}

#[test]
fn shared_memory_beyond_the_host_is_refused_before_anything_starts() {
    let _exclusive = exclusive();
    let root = TempDir::new("shm");
    let _cleanup = KillOnDrop::new(root.display());
    let output = yr_start(root.path(), &["--shared-memory-mb", "99999999999"]);
    let stderr = text(&output.stderr);
    assert!(
        !output.status.success(),
        "accepted: {}",
        text(&output.stdout)
    );
    assert!(
        stderr.contains("--shared-memory-mb 99999999999") && stderr.contains("physical memory"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        std::fs::read_dir(root.path()).unwrap().count(),
        0,
        "a refused start left a session behind"
    );
    // Beyond the node's own --memory too.
    let output = yr_start(root.path(), &["--shared-memory-mb", "4096"]);
    let stderr = text(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("--memory 2048"), "{stderr}");
}

/// Run `yr args` with its stdout a pipe whose reading end is already closed.
fn yr_into_a_closed_pipe(args: &[&str]) -> Output {
    let mut fds = [0; 2];
    // SAFETY: pipe writes two new descriptors into the array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both descriptors were just created and are owned here only.
    let (reader, writer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(reader);
    let mut command = Command::new(yr_binary());
    command.args(args).stdin(Stdio::null());
    // `yr status --master-address` needs the cluster's token.
    if let Some(token) = &yr_transport::current().token {
        command.env(yr_common::auth::TOKEN_ENV, token.as_str());
    }
    let child = command
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .spawn()
        .expect("run yr");
    let pid = child.id();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(child.wait_with_output());
    });
    receiver
        .recv_timeout(TIMEOUT)
        .unwrap_or_else(|_| {
            signal(pid, libc::SIGKILL);
            panic!("yr {args:?} hung");
        })
        .expect("yr's output")
}

#[test]
fn yr_status_and_yr_errors_end_quietly_when_the_reader_went_away() {
    let _exclusive = exclusive();
    let cluster = TestCluster::start();
    let master = cluster.master_address();
    for args in [
        &["status", "--master-address", master.as_str()][..],
        &["status", "--json", "--master-address", master.as_str()][..],
        &["errors"][..],
    ] {
        let output = yr_into_a_closed_pipe(args);
        let stderr = text(&output.stderr);
        assert!(!stderr.contains("panicked"), "yr {args:?}: {stderr}");
        assert!(
            output.status.success(),
            "yr {args:?} ended with {:?}: {stderr}",
            output.status
        );
    }
}

#[test]
fn a_driver_whose_session_died_fails_with_4002_naming_the_session() {
    let _exclusive = exclusive();
    let root = TempDir::new("dead");
    let tmp = TempDir::new("dead-tmp");
    let _cleanup = KillOnDrop::new(root.display());
    let _cleanup_tmp = KillOnDrop::new(tmp.display());
    started(&yr_start(root.path(), &[]));
    let session_dir: PathBuf = root.path().join("latest").canonicalize().unwrap();
    let session = SessionInfo::read(&session_dir).unwrap();
    for (_, pid) in &session.processes {
        signal(*pid, libc::SIGKILL);
    }
    for (_, pid) in &session.processes {
        assert!(
            wait_until(TIMEOUT, || !alive(*pid)),
            "{pid} survived SIGKILL"
        );
    }

    let mut driver = yr_tests::helper_process(env!("CARGO_BIN_EXE_dead_session_driver"));
    driver
        .env("YR_SESSION_ROOT", root.path())
        .env("YR_BIN", yr_binary())
        // A temporary cluster, if one were wrongly started, would go here (and be killed).
        .env("TMPDIR", tmp.path())
        .env_remove("YR_SERVER_ADDRESS")
        .env_remove("YR_LOCAL_MODE")
        .env_remove("YR_RUNTIME_ARGS");
    let output = output_within(driver, START_TIMEOUT);
    let stdout = text(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.find("INIT_").map(|at| &l[at..]))
        .unwrap_or_else(|| panic!("the driver said nothing: {stdout}{}", text(&output.stderr)));
    assert!(line.starts_with("INIT_ERROR 4002 "), "{line}");
    assert!(
        line.contains(&session_dir.display().to_string()) && line.contains("yr stop"),
        "{line}"
    );
    assert!(
        !text(&output.stderr).contains("Starting a temporary one"),
        "the driver started a temporary cluster"
    );

    // `yr stop` clears the dead session: then a driver starts a temporary cluster as before.
    let output = run_yr(&["stop"], &[("YR_SESSION_ROOT", root.path())], TIMEOUT);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(!root.path().join("latest").exists());
}

#[test]
fn a_node_whose_master_is_gone_retries_with_backoff_and_logs_it_once() {
    let _exclusive = exclusive();
    let mut cluster = TestCluster::start();
    let log_path = cluster.dir().join("node0.log");
    let downs = || {
        std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .matches("master link down")
            .count()
    };
    assert_eq!(downs(), 0);
    cluster.kill_master();
    assert!(
        wait_until(TIMEOUT, || downs() >= 1),
        "the node never said its master link is down"
    );
    // Retrying every 500 ms and logging each time, as it used to, would have logged four more
    // times by now.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        downs(),
        1,
        "{}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
    // The node comes back to a master started again.
    cluster.restart_master();
    let up = wait_until(TIMEOUT, || {
        std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .contains("master link up again")
    });
    assert!(
        up,
        "{}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
}
