//! The session file: where a cluster that `yr start` started on this machine can be reached.
//! `yr start` writes `<session dir>/session.json`; `yr::init()` and `yr stop`/`yr status` read
//! it through the `latest` link in the sessions root.
//!
//! Everything here lives in directories private to the user ([`private_dir`]): the sessions
//! root is `$YR_SESSION_ROOT`, or `sessions/` under the user's base directory
//! ([`user_base_dir`], `$TMPDIR/yr-<uid>`), and each session directory is mode 0700, because a
//! session holds the cluster's token and its logs.

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The environment variable that moves the sessions root (default `$TMPDIR/yr-<uid>/sessions`).
pub const ENV_SESSION_ROOT: &str = "YR_SESSION_ROOT";

/// The environment variable `yr start` gives the processes it starts: their session directory.
/// `yr stop` signals only processes that carry their session's marker.
pub const ENV_SESSION_DIR: &str = "YR_SESSION_DIR";

/// Why a directory that must be private to this user cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// The directory could not be created or inspected.
    #[error("cannot create or inspect {path}: {source}; choose another directory (YR_SESSION_ROOT, TMPDIR or --session-dir)")]
    Io {
        /// The directory.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// A symbolic link stands where the directory should be.
    #[error("{path} is a symbolic link, not a directory; yr keeps secrets there and refuses to follow it. Remove it (rm {path}) or choose another directory (YR_SESSION_ROOT, TMPDIR or --session-dir)")]
    Symlink {
        /// The directory.
        path: PathBuf,
    },
    /// Something other than a directory stands there.
    #[error("{path} exists and is not a directory; remove it or choose another directory (YR_SESSION_ROOT, TMPDIR or --session-dir)")]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// Another user owns the directory.
    #[error("{path} belongs to user {owner}, not to you (user {uid}); another user may read or replace what yr keeps there. Remove it as its owner or root, or choose another directory (YR_SESSION_ROOT, TMPDIR or --session-dir)")]
    OtherOwner {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// This process's effective user.
        uid: u32,
    },
    /// Group or others may use the directory.
    #[error("{path} has mode {mode:04o}: group or others may use it; make it private (chmod 700 {path}) or choose another directory")]
    NotPrivate {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

impl From<DirError> for crate::Error {
    fn from(error: DirError) -> crate::Error {
        crate::Error::new(crate::ErrorCode::InitConnectionFailed, error.to_string())
    }
}

/// This process's effective user id.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Create `path` (and missing parents) with mode 0700 if it is missing, then check that it is a
/// real directory (not a symbolic link), owned by this user, with no permission for group or
/// others. Returns `path`. An existing directory that fails the check is refused, never
/// repaired: someone else may have planted it.
pub fn private_dir(path: &Path) -> Result<PathBuf, DirError> {
    let io = |source| DirError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
    {
        // `recursive` reports an existing directory (or a symbolic link to one) as success,
        // and anything else that stands there as an error: the check below says which.
        Ok(()) => {}
        Err(_) if path.symlink_metadata().is_ok() => {}
        Err(e) => return Err(io(e)),
    }
    check_private(path)?;
    Ok(path.to_path_buf())
}

/// Check that `path` is a real directory, owned by this user, private to it.
pub fn check_private(path: &Path) -> Result<(), DirError> {
    let metadata = path.symlink_metadata().map_err(|source| DirError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let file_type = metadata.file_type();
    if file_type.is_symlink() {
        return Err(DirError::Symlink {
            path: path.to_path_buf(),
        });
    }
    if !file_type.is_dir() {
        return Err(DirError::NotADirectory {
            path: path.to_path_buf(),
        });
    }
    let uid = effective_uid();
    if metadata.uid() != uid {
        return Err(DirError::OtherOwner {
            path: path.to_path_buf(),
            owner: metadata.uid(),
            uid,
        });
    }
    let mode = metadata.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(DirError::NotPrivate {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// The user's base directory for yr, private and created if missing: `$TMPDIR/yr-<uid>` (or
/// `/tmp/yr-<uid>`). Sessions go in its `sessions/` folder and sockets in its `sockets/`.
///
/// Not `$XDG_RUNTIME_DIR`: the system removes it when the user's last login session ends, which
/// would take the bus socket and the state of a cluster that `yr start` left running, and it
/// is a small memory-backed file system, while a session's data directory holds spilled
/// objects.
pub fn user_base_dir() -> Result<PathBuf, DirError> {
    private_dir(&std::env::temp_dir().join(format!("yr-{}", effective_uid())))
}

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
    /// The master's meta store: `embedded <dir>` or `etcd <endpoints> prefix <prefix>` (empty
    /// on a node that only joined, and in sessions written before it was recorded).
    #[serde(default)]
    pub meta_store: String,
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

    /// Write `<dir>/session.json` atomically, readable by its owner only.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        let temporary = dir.join(format!("{}.tmp", Self::FILE));
        let _ = std::fs::remove_file(&temporary);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(temporary, dir.join(Self::FILE))
    }

    /// The pid of the process `yr start` started in `role`, if any.
    pub fn pid_of(&self, role: &str) -> Option<u32> {
        self.processes
            .iter()
            .find(|(r, _)| r == role)
            .map(|(_, pid)| *pid)
    }
}

/// The sessions root, private and created if missing: `$YR_SESSION_ROOT`, or `sessions/` in
/// [`user_base_dir`].
pub fn sessions_root() -> Result<PathBuf, DirError> {
    match std::env::var_os(ENV_SESSION_ROOT) {
        Some(root) if !root.is_empty() => private_dir(Path::new(&root)),
        _ => private_dir(&user_base_dir()?.join("sessions")),
    }
}

/// The latest session on this machine, if its file can be read.
pub fn latest_session() -> Option<SessionInfo> {
    SessionInfo::read(&sessions_root().ok()?.join("latest")).ok()
}

/// Whether `pid` is a yr process that `yr start` started for the session in `session_dir`:
/// its executable is a `yr` (this very file, or one named `yr`), and it carries the session's
/// marker ([`ENV_SESSION_DIR`] in its environment, or `--session-dir <dir>` or `--data-dir
/// <dir>/master` on its command line). A pid that a stale or planted session file names fails
/// this check.
pub fn is_session_process(pid: u32, session_dir: &Path) -> bool {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    is_yr_executable(&proc_dir) && carries_session(&proc_dir, session_dir)
}

/// Whether process `pid` carries the mark of `session_dir` (in its environment or on its
/// command line), whatever its executable: enough to tell that a session still runs, since
/// only processes `yr start` started carry it.
pub fn carries_session_mark(pid: u32, session_dir: &Path) -> bool {
    carries_session(&PathBuf::from(format!("/proc/{pid}")), session_dir)
}

fn is_yr_executable(proc_dir: &Path) -> bool {
    let exe = proc_dir.join("exe");
    // The same file as this executable (compared by device and inode, which survives renames).
    if let (Ok(theirs), Ok(mine)) = (
        std::fs::metadata(&exe),
        std::env::current_exe().and_then(std::fs::metadata),
    ) {
        if theirs.dev() == mine.dev() && theirs.ino() == mine.ino() {
            return true;
        }
    }
    // Or a file named `yr` (rebuilt since it started, the link then ends in " (deleted)").
    std::fs::read_link(&exe)
        .ok()
        .and_then(|path| {
            path.file_name()
                .map(|name| name.to_string_lossy().into_owned())
        })
        .is_some_and(|name| name == "yr" || name == "yr (deleted)")
}

fn carries_session(proc_dir: &Path, session_dir: &Path) -> bool {
    let wanted = session_dir
        .canonicalize()
        .unwrap_or_else(|_| session_dir.to_path_buf());
    let same = |value: &[u8]| {
        let path = Path::new(std::ffi::OsStr::from_bytes(value));
        path == session_dir || path.canonicalize().is_ok_and(|p| p == wanted)
    };
    if let Ok(environ) = std::fs::read(proc_dir.join("environ")) {
        let marker = format!("{ENV_SESSION_DIR}=");
        if environ
            .split(|b| *b == 0)
            .filter_map(|entry| entry.strip_prefix(marker.as_bytes()))
            .any(same)
        {
            return true;
        }
    }
    if let Ok(cmdline) = std::fs::read(proc_dir.join("cmdline")) {
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        // The node names its session; a master started before the environment mark existed
        // names its data directory, `<session>/master`.
        let master_of_session = |value: &[u8]| {
            Path::new(std::ffi::OsStr::from_bytes(value))
                .parent()
                .is_some_and(|parent| same(parent.as_os_str().as_bytes()))
                && value.ends_with(b"/master")
        };
        if args.windows(2).any(|pair| {
            (pair[0] == b"--session-dir" && same(pair[1]))
                || (pair[0] == b"--data-dir" && master_of_session(pair[1]))
        }) {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn scratch(label: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "yr-session-test-{label}-{}-{}",
            std::process::id(),
            crate::ids::random_hex(6)
        ));
        let _ = std::fs::remove_dir_all(&path);
        path
    }

    #[test]
    fn a_missing_directory_is_created_private_with_its_parents() {
        let top = scratch("create");
        let path = top.join("a").join("b");
        assert_eq!(private_dir(&path).expect("created"), path);
        for dir in [&top, &path] {
            let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", dir.display());
        }
        // An existing private directory is fine.
        private_dir(&path).expect("again");
        std::fs::remove_dir_all(&top).unwrap();
    }

    #[test]
    fn an_open_directory_a_symlink_and_a_file_are_refused() {
        let top = scratch("refuse");
        private_dir(&top).unwrap();
        let open = top.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        let error = private_dir(&open).unwrap_err();
        assert!(
            matches!(error, DirError::NotPrivate { mode: 0o755, .. }),
            "{error}"
        );
        assert!(error.to_string().contains("chmod 700"), "{error}");

        let private = top.join("private");
        private_dir(&private).unwrap();
        let link = top.join("link");
        std::os::unix::fs::symlink(&private, &link).unwrap();
        let error = private_dir(&link).unwrap_err();
        assert!(matches!(error, DirError::Symlink { .. }), "{error}");
        assert!(error.to_string().contains(&link.display().to_string()));
        let dangling = top.join("dangling");
        std::os::unix::fs::symlink(top.join("nowhere"), &dangling).unwrap();
        assert!(matches!(
            private_dir(&dangling).unwrap_err(),
            DirError::Symlink { .. }
        ));

        let file = top.join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(matches!(
            private_dir(&file).unwrap_err(),
            DirError::NotADirectory { .. }
        ));
        std::fs::remove_dir_all(&top).unwrap();
    }

    #[test]
    fn a_directory_of_another_user_is_refused() {
        if effective_uid() != 0 {
            eprintln!("skipped: only root can give a directory to another user");
            return;
        }
        let top = scratch("owner");
        private_dir(&top).unwrap();
        let path = std::ffi::CString::new(top.as_os_str().as_bytes()).unwrap();
        // SAFETY: chown on a path we own, with a valid C string.
        assert_eq!(unsafe { libc::chown(path.as_ptr(), 65534, 65534) }, 0);
        let error = private_dir(&top).unwrap_err();
        assert!(
            matches!(error, DirError::OtherOwner { owner: 65534, .. }),
            "{error}"
        );
        std::fs::remove_dir_all(&top).unwrap();
    }

    #[test]
    fn the_session_file_is_private() {
        let dir = scratch("file");
        private_dir(&dir).unwrap();
        let info = SessionInfo {
            session_dir: dir.clone(),
            processes: vec![("node".into(), 1)],
            ..Default::default()
        };
        info.write(&dir).unwrap();
        let mode = std::fs::metadata(dir.join(SessionInfo::FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(SessionInfo::read(&dir).unwrap(), info);
        assert_eq!(info.pid_of("node"), Some(1));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_process_without_the_session_marker_is_not_a_session_process() {
        let dir = scratch("marker");
        private_dir(&dir).unwrap();
        let mut sleeper = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        assert!(!is_session_process(sleeper.id(), &dir));
        // Not even with the marker: `sleep` is not a yr executable.
        let mut marked = std::process::Command::new("sleep")
            .arg("30")
            .env(ENV_SESSION_DIR, &dir)
            .spawn()
            .unwrap();
        assert!(!is_session_process(marked.id(), &dir));
        assert!(!is_session_process(4_194_304, &dir), "no such process");
        for child in [&mut sleeper, &mut marked] {
            let _ = child.kill();
            let _ = child.wait();
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
