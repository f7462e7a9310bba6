//! How a runtime process ended, and whether the kernel's OOM killer ended it.

use std::fmt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

/// How a runtime process ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitCause {
    /// The exit code, if it exited.
    pub code: Option<i32>,
    /// The signal, if one killed it.
    pub signal: Option<i32>,
    /// Whether the kernel's OOM killer killed it (its cgroup's `oom_kill` count rose).
    pub oom: bool,
}

impl ExitCause {
    /// The cause for `status`, with `oom` from the cgroup counter.
    pub fn from_status(status: ExitStatus, oom: bool) -> ExitCause {
        ExitCause {
            code: status.code(),
            signal: status.signal(),
            oom,
        }
    }

    /// Whether the process ended normally with code 0 (it chose to exit).
    pub fn is_clean_exit(&self) -> bool {
        self.code == Some(0)
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGILL => "SIGILL",
        libc::SIGINT => "SIGINT",
        _ => "signal",
    }
}

impl fmt::Display for ExitCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.oom {
            return write!(f, "killed by the kernel's OOM killer (out of memory)");
        }
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "exited with code {code}"),
            (None, Some(signal)) => write!(f, "killed by {} ({signal})", signal_name(signal)),
            (None, None) => write!(f, "ended for an unknown reason"),
        }
    }
}

/// The number of OOM kills in this process's cgroup so far, if the kernel tells.
pub fn oom_kill_count() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroup.lines().find_map(|line| line.strip_prefix("0::"))?;
    let events = std::fs::read_to_string(format!("/sys/fs/cgroup{path}/memory.events")).ok()?;
    events
        .lines()
        .find_map(|line| line.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}
