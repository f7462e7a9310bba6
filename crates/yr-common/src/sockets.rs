//! Where drivers and runtimes put their Unix sockets, and cleaning them up. Each process that
//! joins a node listens at `<base>/sockets/w-<pid>-<random>.sock` (its Worker service; `<base>`
//! is the user's private [`crate::session::user_base_dir`], so other users can neither connect
//! nor squat the directory), and a
//! runtime also at the same path with the extension `.calls` (its call socket, for direct
//! calls). A process removes its files when it leaves; the node removes those of processes that
//! disconnect; and [`sweep_dead`] removes those of processes that died unseen (SIGKILL, a node
//! killed with its runtimes).

use std::path::{Path, PathBuf};

use crate::ids;
use crate::session::{private_dir, user_base_dir, DirError};

/// The directory for this user's yr sockets, `sockets/` in the user's base directory: created
/// private (0700) if missing, refused if it is not private to this user.
pub fn socket_dir() -> Result<PathBuf, DirError> {
    private_dir(&user_base_dir()?.join("sockets"))
}

/// A new Worker socket path for this process.
pub fn new_worker_socket() -> Result<PathBuf, DirError> {
    Ok(socket_dir()?.join(format!(
        "w-{}-{}.sock",
        std::process::id(),
        ids::random_hex(6)
    )))
}

/// The call socket of the runtime whose Worker socket is `worker`.
pub fn call_socket(worker: &Path) -> PathBuf {
    worker.with_extension("calls")
}

/// Remove the Worker socket `worker` and the call socket beside it.
pub fn remove(worker: &Path) {
    let _ = std::fs::remove_file(worker);
    let _ = std::fs::remove_file(call_socket(worker));
}

/// Remove the socket files of processes that no longer run. Returns how many were removed.
pub fn sweep_dead() -> usize {
    let Ok(dir) = socket_dir() else {
        return 0;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(owner_pid) else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists()
            && std::fs::remove_file(entry.path()).is_ok()
        {
            removed += 1;
        }
    }
    removed
}

/// The process id in a socket file's name `w-<pid>-<random>.<extension>`.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix("w-")?.split('-').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_of_dead_processes_are_swept_and_live_ones_kept() {
        let mine = new_worker_socket().expect("a private socket directory");
        std::fs::write(&mine, b"").expect("own file");
        std::fs::write(call_socket(&mine), b"").expect("own call file");
        // No process has pid 4194304 (above the kernel's pid_max ceiling).
        let dead = socket_dir().unwrap().join("w-4194304-abcdef.sock");
        std::fs::write(&dead, b"").expect("dead file");
        let dead_calls = call_socket(&dead);
        std::fs::write(&dead_calls, b"").expect("dead call file");
        assert!(sweep_dead() >= 2);
        assert!(!dead.exists() && !dead_calls.exists());
        assert!(mine.exists() && call_socket(&mine).exists());
        remove(&mine);
        assert!(!mine.exists() && !call_socket(&mine).exists());
    }

    #[test]
    fn only_yr_names_name_an_owner() {
        assert_eq!(owner_pid("w-123-abcdef.sock"), Some(123));
        assert_eq!(owner_pid("w-123-abcdef.calls"), Some(123));
        assert_eq!(owner_pid("bus.sock"), None);
        assert_eq!(owner_pid("w-x-1.sock"), None);
    }
}
