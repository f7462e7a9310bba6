//! `yr start`, `yr stop` and `yr status`: run a cluster's processes in the background under a
//! session directory, stop them gracefully, and show what the master knows.
//!
//! This module holds what the commands share: starting a component's process under the session
//! and waiting until it is ready, and reading a session.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use yr_common::auth::ClusterToken;
use yr_common::session::{private_dir, sessions_root, SessionInfo, ENV_SESSION_DIR};

mod address;
mod start;
mod status;
mod stop;

pub use address::local_ip;
pub use start::{start, StartArgs};
pub use status::{status, StatusArgs};
pub use stop::{stop, StopArgs};

/// How long components may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `yr stop` waits for a graceful stop before killing.
const STOP_TIMEOUT: Duration = Duration::from_secs(40);

pub(super) fn spawn(
    role: &str,
    args: &[String],
    session: &Path,
    attached: bool,
    token: &ClusterToken,
) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("cannot find the yr executable")?;
    let logs = private_dir(&session.join("logs"))?;
    let log = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(logs.join(format!("{role}.log")))
            .with_context(|| format!("cannot create the {role} log"))?
    };
    let mut command = Command::new(exe);
    command
        .arg(role)
        .args(args)
        .env(yr_common::auth::TOKEN_ENV, token.as_str())
        // The mark `yr stop` checks before it signals this process.
        .env(ENV_SESSION_DIR, session)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid and prctl are async-signal-safe; they detach the child from this terminal
    // and, when attached, make it die with this process.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(move || {
            libc::setsid();
            if attached {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            }
            Ok(())
        });
    }
    command
        .spawn()
        .with_context(|| format!("cannot start the {role}"))
}

pub(super) fn wait_ready(
    role: &str,
    child: &mut Child,
    session: &Path,
    ready: impl Fn() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if ready() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(session.join("logs").join(format!("{role}.log")))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "the {role} exited during start ({status}); its log ends with:\n{}",
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!(
        "the {role} did not become ready within {START_TIMEOUT:?}; see {}/logs/{role}.log",
        session.display()
    )
}

/// The session in `dir` (default: the latest), and the directory it really is in.
pub(super) fn read_session(dir: Option<&Path>) -> anyhow::Result<(PathBuf, SessionInfo)> {
    let dir = match dir {
        Some(dir) => dir.to_path_buf(),
        None => sessions_root()?.join("latest"),
    };
    let session = SessionInfo::read(&dir).with_context(|| {
        format!(
            "no yr cluster was started on this machine (cannot read {}/session.json)",
            dir.display()
        )
    })?;
    Ok((dir.canonicalize().unwrap_or(dir), session))
}
