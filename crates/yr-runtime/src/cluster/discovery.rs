//! Finding the node to connect to: `Config::server_address` (or `YR_SERVER_ADDRESS`), else the
//! latest session that `yr start` left on this machine, else a temporary one-machine cluster
//! started for this driver, which dies with it. A latest session whose node is dead is an
//! error (4002), not a reason to start a temporary cluster: the user meant that cluster.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use yr_common::session::{carries_session_mark, sessions_root, SessionInfo};
use yr_common::{ids, Config, Error, ErrorCode};

/// How long a temporary cluster may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The bus address of the node this driver should use.
pub fn find_node(config: &Config) -> Result<String, Error> {
    if let Some(address) = &config.server_address {
        return Ok(address.clone());
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
    let (dir, address) = start_temporary_cluster()?;
    *temporary = Some(dir);
    Ok(address)
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

fn start_temporary_cluster() -> Result<(PathBuf, String), Error> {
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
    eprintln!(
        "There is no existing yr cluster. Starting a temporary one in {} ...",
        session_dir.display()
    );
    let (result_sender, result) = crossbeam_channel::bounded(1);
    let dir = session_dir.clone();
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
                    let _ = result_sender.send(Ok(()));
                    let _ = child.wait();
                    loop {
                        std::thread::park();
                    }
                }
            }
        })
        .map_err(|e| {
            Error::new(
                ErrorCode::InitConnectionFailed,
                format!("cannot start a thread: {e}"),
            )
        })?;
    result
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
                return Ok((session_dir, session.bus_address));
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
