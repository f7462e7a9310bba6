//! Finding the node to connect to: `Config::server_address` (or `YR_SERVER_ADDRESS`), else a
//! cluster of the driver's own when `Config::deployment` asks for one (stopped at `finalize`),
//! else the latest session that `yr start` left on this machine, else a temporary one-machine
//! cluster started for this driver, which dies with it. A latest session whose node is dead is
//! an error (4002), not a reason to start a temporary cluster: the user meant that cluster.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use yr_common::session::{carries_session_mark, sessions_root, SessionInfo};
use yr_common::{ids, Config, Error, ErrorCode};

/// The cluster `Config::deployment` started, until `finalize`.
static OWN_CLUSTER: parking_lot::Mutex<Option<Started>> = parking_lot::Mutex::new(None);

/// How long a cluster of the driver's own may take to stop (its instances' shutdown hooks).
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// A cluster this process started: `yr start --master --block --temporary`.
struct Started {
    session_dir: PathBuf,
    /// The bus address of its node.
    address: String,
    /// The `yr start --block` process, which stops the master and the node on SIGTERM.
    supervisor: u32,
    /// Closed when the supervisor has exited (and so reaped the master and the node).
    exited: crossbeam_channel::Receiver<()>,
}

impl Started {
    /// Stop the cluster and wait until its processes are gone: its node first, so instances
    /// run their shutdown hooks.
    fn stop(self) {
        // SAFETY: signalling the child this process started; it is not reaped before
        // `exited` closes, so the pid is still the supervisor's.
        unsafe {
            libc::kill(self.supervisor as libc::pid_t, libc::SIGTERM);
        }
        if self.exited.recv_timeout(STOP_TIMEOUT)
            == Err(crossbeam_channel::RecvTimeoutError::Timeout)
        {
            tracing::warn!(
                dir = %self.session_dir.display(),
                "the driver's cluster did not stop within {STOP_TIMEOUT:?}"
            );
        }
    }
}

/// How long a temporary cluster may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The bus address of the node this driver should use.
pub fn find_node(config: &Config) -> Result<String, Error> {
    if let Some(address) = &config.server_address {
        return Ok(address.clone());
    }
    if let Some(deployment) = &config.deployment {
        let mut own = OWN_CLUSTER.lock();
        if let Some(started) = own.take() {
            started.stop();
        }
        let started = start_cluster(&deployment.start_args())?;
        let address = started.address.clone();
        *own = Some(started);
        return Ok(address);
    }
    let latest = sessions_root()?.join("latest");
    if let Ok(session) = SessionInfo::read(&latest) {
        if session_alive(&session) {
            return Ok(session.bus_address);
        }
        let dir = std::fs::canonicalize(&latest).unwrap_or(latest);
        return Err(Error::new(
            ErrorCode::InitConnectionFailed,
            format!(
                "the yr cluster of session {} is not running (its node is gone); run `yr stop` \
                 to clear that session (then yr::init starts a temporary cluster), or `yr start \
                 --master` to start a cluster again",
                dir.display()
            ),
        ));
    }
    // One temporary cluster per process: later `init`s after `finalize` reuse it.
    static TEMPORARY: parking_lot::Mutex<Option<PathBuf>> = parking_lot::Mutex::new(None);
    let mut temporary = TEMPORARY.lock();
    if let Some(dir) = temporary.as_ref() {
        if let Ok(session) = SessionInfo::read(dir) {
            if session_alive(&session) {
                return Ok(session.bus_address);
            }
        }
    }
    let started = start_cluster(&[])?;
    *temporary = Some(started.session_dir);
    Ok(started.address)
}

/// Stop the cluster `Config::deployment` started, if one runs (at `finalize`), and wait until
/// its processes are gone. Its instances run their shutdown hooks, as under `yr stop`.
pub fn stop_own_cluster() {
    let started = OWN_CLUSTER.lock().take();
    if let Some(started) = started {
        started.stop();
    }
}

fn session_alive(session: &SessionInfo) -> bool {
    !session.bus_address.is_empty()
        && session
            .processes
            .iter()
            .any(|(role, pid)| role == "node" && carries_session_mark(*pid, &session.session_dir))
}

/// The `yr` executable: `$YR_BIN`, next to this executable (or one directory up, for Cargo
/// examples and tests), or on `PATH`.
pub fn find_yr_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("YR_BIN") {
        return Some(PathBuf::from(path));
    }
    if let Ok(exe) = std::env::current_exe() {
        let mut dir = exe.parent().map(Path::to_path_buf);
        for _ in 0..2 {
            if let Some(d) = &dir {
                let candidate = d.join("yr");
                if candidate.is_file() {
                    return Some(candidate);
                }
                dir = d.parent().map(Path::to_path_buf);
            }
        }
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("yr"))
            .find(|candidate| candidate.is_file())
    })
}

/// Start a one-machine cluster for this driver (`yr start --master --temporary`, with `extra`
/// arguments), which dies with this process at the latest.
fn start_cluster(extra: &[String]) -> Result<Started, Error> {
    let yr = find_yr_binary().ok_or_else(|| {
        Error::new(
            ErrorCode::InitConnectionFailed,
            "there is no running yr cluster and the `yr` command was not found to start one; \
             build it (cargo build --release -p yr-cli), put it on PATH or set YR_BIN, or set \
             local_mode (YR_LOCAL_MODE=true)",
        )
    })?;
    let session_dir = std::env::temp_dir().join(format!(
        "yr-temporary-{}-{}",
        std::process::id(),
        ids::random_hex(6)
    ));
    if extra.is_empty() {
        eprintln!(
            "There is no existing yr cluster. Starting a temporary one in {} ...",
            session_dir.display()
        );
    } else {
        eprintln!(
            "Starting a cluster for this driver in {} ({}); finalize stops it ...",
            session_dir.display(),
            extra.join(" ")
        );
    }
    let (result_sender, result) = crossbeam_channel::bounded(1);
    let (exited_sender, exited) = crossbeam_channel::bounded::<()>(0);
    let dir = session_dir.clone();
    let extra = extra.to_vec();
    // The cluster dies with the thread that started it (PR_SET_PDEATHSIG), so start it from a
    // thread that lives as long as the process.
    std::thread::Builder::new()
        .name("yr-temporary-cluster".into())
        .spawn(move || {
            let mut command = Command::new(&yr);
            command
                .args([
                    "start",
                    "--master",
                    "--block",
                    "--temporary",
                    "--session-dir",
                ])
                .arg(&dir)
                .args(&extra)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit());
            // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death signal.
            unsafe {
                use std::os::unix::process::CommandExt;
                command.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            match command.spawn() {
                Err(e) => {
                    let _ = result_sender.send(Err(format!("cannot run {}: {e}", yr.display())));
                }
                Ok(mut child) => {
                    let _ = result_sender.send(Ok(child.id()));
                    let _ = child.wait();
                    drop(exited_sender);
                }
            }
        })
        .map_err(|e| {
            Error::new(
                ErrorCode::InitConnectionFailed,
                format!("cannot start a thread: {e}"),
            )
        })?;
    let supervisor = result
        .recv()
        .map_err(|_| {
            Error::new(
                ErrorCode::InitConnectionFailed,
                "the cluster starter thread died",
            )
        })?
        .map_err(|e| Error::new(ErrorCode::InitConnectionFailed, e))?;
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(session) = SessionInfo::read(&session_dir) {
            if !session.bus_address.is_empty() {
                return Ok(Started {
                    session_dir,
                    address: session.bus_address,
                    supervisor,
                    exited,
                });
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(Error::new(
        ErrorCode::InitConnectionFailed,
        format!(
            "the temporary cluster did not come up within {START_TIMEOUT:?}; see the logs in {}",
            session_dir.display()
        ),
    ))
}
