//! `yr stop`: stop a session's processes, the node first, gracefully unless forced, signalling
//! only processes that carry the session's mark.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args as ClapArgs;
use yr_common::session::{is_session_process, sessions_root, SessionInfo};

use super::{read_session, STOP_TIMEOUT};

/// Flags of `yr stop`.
#[derive(Debug, ClapArgs)]
pub struct StopArgs {
    /// Kill at once instead of letting instances run their shutdown hooks.
    #[arg(long)]
    pub force: bool,
    /// The session to stop (default: the latest).
    #[arg(long)]
    pub session_dir: Option<PathBuf>,
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

/// `yr stop`.
pub fn stop(args: &StopArgs) -> anyhow::Result<ExitCode> {
    let (dir, session) = read_session(args.session_dir.as_deref())?;
    let signal = if args.force {
        libc::SIGKILL
    } else {
        libc::SIGTERM
    };
    // The node first, so its instances run their shutdown hooks while the master still serves.
    let mut order = session.processes.clone();
    order.sort_by_key(|(role, _)| if role == "node" { 0 } else { 1 });
    for (role, pid) in &order {
        if !alive(*pid) {
            continue;
        }
        // A stale or planted session file may name any process: signal only yr processes that
        // carry this session's mark.
        if !is_session_process(*pid, &dir) {
            eprintln!(
                "yr stop: pid {pid} (the {role} in {}) is not a yr process of this session; not \
                 signalling it",
                dir.join(SessionInfo::FILE).display()
            );
            continue;
        }
        // SAFETY: signalling a process this session started (checked just above).
        unsafe {
            libc::kill(*pid as libc::pid_t, signal);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while alive(*pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        // Checked again: in 40 s the pid may have gone to another process.
        if alive(*pid) && is_session_process(*pid, &dir) {
            eprintln!(
                "yr stop: the {role} ({pid}) did not stop within {STOP_TIMEOUT:?}; killing it"
            );
            // SAFETY: as above.
            unsafe {
                libc::kill(*pid as libc::pid_t, libc::SIGKILL);
            }
        }
        let _ = writeln!(std::io::stdout(), "stopped the {role} ({pid})");
    }
    let latest = sessions_root()?.join("latest");
    if latest.canonicalize().ok().as_deref() == Some(dir.as_path()) {
        let _ = std::fs::remove_file(latest);
    }
    // Runtimes killed with their node left their sockets.
    yr_common::sockets::sweep_dead();
    Ok(ExitCode::SUCCESS)
}
