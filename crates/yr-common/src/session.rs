//! The session file: where a cluster that `yr start` started on this machine can be reached.
//! `yr start` writes `<session dir>/session.json`; `yr::init()` and `yr stop`/`yr status` read
//! it through the `latest` link in the sessions root.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The environment variable that moves the sessions root (default `/tmp/yr_sessions`).
pub const ENV_SESSION_ROOT: &str = "YR_SESSION_ROOT";

/// What a running cluster on this machine writes down.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// The session directory.
    pub session_dir: PathBuf,
    /// The master's gRPC address (`host:port`), empty on a node that only joined.
    pub master_address: String,
    /// The local node's bus address for drivers (`unix:/path`).
    pub bus_address: String,
    /// The local node's gRPC address (`host:port`).
    pub node_address: String,
    /// The local node's id.
    pub node_id: String,
    /// The processes `yr start` started: `(role, pid)`.
    pub processes: Vec<(String, u32)>,
    /// Metrics and health endpoints: `(role, host:port)`.
    pub metrics: Vec<(String, String)>,
    /// Whether the cluster dies with the driver that started it.
    pub temporary: bool,
}

impl SessionInfo {
    /// The file name inside a session directory.
    pub const FILE: &'static str = "session.json";

    /// Read `<dir>/session.json`.
    pub fn read(dir: &Path) -> std::io::Result<SessionInfo> {
        let text = std::fs::read_to_string(dir.join(Self::FILE))?;
        serde_json::from_str(&text)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// Write `<dir>/session.json` atomically.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        let temporary = dir.join(format!("{}.tmp", Self::FILE));
        std::fs::write(&temporary, text)?;
        std::fs::rename(temporary, dir.join(Self::FILE))
    }
}

/// The sessions root: `$YR_SESSION_ROOT`, or `/tmp/yr_sessions`.
pub fn sessions_root() -> PathBuf {
    std::env::var_os(ENV_SESSION_ROOT)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/yr_sessions"))
}

/// The latest session on this machine, if its file can be read.
pub fn latest_session() -> Option<SessionInfo> {
    SessionInfo::read(&sessions_root().join("latest")).ok()
}
