//! The launcher: one thread of the node that starts runtime processes from a descriptor table
//! of its own, and the wait for a started process to end.
//!
//! A process started from the node's thread would inherit the node's whole descriptor table,
//! one entry per runtime connection, and `exec` would close them one by one: at 3,000 live
//! runtimes that is about 0.2 ms of every start. The launcher thread unshares its table
//! (`unshare(CLONE_FILES)`) and closes everything but stdin, stdout and stderr in it once, at
//! start; what the node opens later is never in it. So a start costs the same whether 10 or
//! 10,000 runtimes live, and no descriptor of the node reaches a runtime, even one opened
//! without `O_CLOEXEC`.
//!
//! Descriptors are numbers in one table, so the launcher opens a runtime's log files itself,
//! and the node watches the started process through a pidfd it opens in its own table.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// One process to start: `command` with its stdout and stderr in the files at these paths.
struct Launch {
    command: Command,
    stdout: PathBuf,
    stderr: PathBuf,
    started: mpsc::SyncSender<Result<u32, LaunchError>>,
}

/// Why a process was not started.
#[derive(Debug)]
pub(crate) enum LaunchError {
    /// A log file could not be created.
    Logs(io::Error),
    /// The process could not be started.
    Spawn(io::Error),
}

/// Handle to the launcher thread. Starts are serialized on it.
pub(crate) struct Launcher {
    /// None if the thread could not be started: processes then start from the caller's thread.
    requests: Option<mpsc::SyncSender<Launch>>,
}

/// Starts waiting behind each other; the runtime manager sends one at a time.
const QUEUE: usize = 16;

impl Launcher {
    /// Start the launcher thread. It ends when the handle is dropped. If no thread can be
    /// started, processes start from the caller's thread, with its descriptor table.
    pub(crate) fn start() -> Launcher {
        let (requests, received) = mpsc::sync_channel::<Launch>(QUEUE);
        let started = std::thread::Builder::new()
            .name("yr-launcher".to_string())
            .spawn(move || {
                if let Err(error) = own_descriptor_table() {
                    tracing::warn!(
                        %error,
                        "the launcher shares the node's descriptor table: runtime starts cost \
                         more as more runtimes live"
                    );
                }
                for launch in received {
                    let started = start(launch.command, &launch.stdout, &launch.stderr);
                    let _ = launch.started.send(started);
                }
            });
        match started {
            Ok(_) => Launcher {
                requests: Some(requests),
            },
            Err(error) => {
                tracing::warn!(%error, "cannot start the launcher thread");
                Launcher { requests: None }
            }
        }
    }

    /// Start `command` with stdin from `/dev/null` and stdout and stderr into new files at
    /// these paths. Returns its pid once it runs (blocks for the start, as a spawn does).
    pub(crate) fn launch(
        &self,
        command: Command,
        stdout: PathBuf,
        stderr: PathBuf,
    ) -> Result<u32, LaunchError> {
        let Some(requests) = &self.requests else {
            return start(command, &stdout, &stderr);
        };
        let gone = || LaunchError::Spawn(io::Error::other("the node's launcher thread ended"));
        let (started, answer) = mpsc::sync_channel(1);
        requests
            .send(Launch {
                command,
                stdout,
                stderr,
                started,
            })
            .map_err(|_| gone())?;
        answer.recv().map_err(|_| gone())?
    }
}

/// Give this thread a descriptor table of its own, holding only stdin, stdout and stderr.
fn own_descriptor_table() -> io::Result<()> {
    // SAFETY: unshare(CLONE_FILES) gives the calling thread a private copy of the process's
    // descriptor table; nothing is shared with other threads afterwards.
    if unsafe { libc::unshare(libc::CLONE_FILES) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: closes descriptors 3 and up in this thread's private table only; the node's
    // threads keep theirs. Nothing on this thread holds one of them.
    if unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn start(mut command: Command, stdout: &PathBuf, stderr: &PathBuf) -> Result<u32, LaunchError> {
    let stdout = std::fs::File::create(stdout).map_err(LaunchError::Logs)?;
    let stderr = std::fs::File::create(stderr).map_err(LaunchError::Logs)?;
    command.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
    // No `pre_exec`: the standard library then starts the process with `posix_spawn` (a
    // vfork), whose cost does not grow with the node's memory either. The child is not
    // reaped through `Child`: the node waits on its pid ([`wait_for_exit`]).
    let child = command.spawn().map_err(LaunchError::Spawn)?;
    Ok(child.id())
}

/// Wait until the child `pid` of this process ends, reap it and return how it ended. Watches
/// a pidfd on the tokio reactor; without pidfds (Linux before 5.3) a blocking thread waits.
pub(crate) async fn wait_for_exit(pid: u32) -> io::Result<ExitStatus> {
    match pidfd(pid) {
        Ok(pidfd) => {
            // SAFETY: the pidfd is owned here, stays open while registered and is closed
            // only when `watched` is dropped.
            let watched = unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE)? };
            // A pidfd is readable once its process has ended.
            let _ready = watched.readable().await?;
            reap(pid)
        }
        Err(_) => tokio::task::spawn_blocking(move || reap(pid))
            .await
            .map_err(io::Error::other)?,
    }
}

fn pidfd(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0u32) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a descriptor pidfd_open just returned; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Reap the child `pid`, waiting for it to end.
fn reap(pid: u32) -> io::Result<ExitStatus> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid on a child of this process with a valid status pointer.
        let reaped = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
        if reaped == pid as libc::pid_t {
            return Ok(ExitStatus::from_raw(status));
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("yr-launcher-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn a_started_process_holds_no_descriptor_of_the_node() {
        let dir = temp_dir("fds");
        let launcher = Launcher::start();
        // Descriptors the node opens after the launcher started, some without O_CLOEXEC.
        let mut held = Vec::new();
        for _ in 0..20 {
            held.push(std::fs::File::open("/dev/null").unwrap());
            // SAFETY: dup of a valid descriptor; the result is closed below.
            let plain = unsafe { libc::dup(libc::STDERR_FILENO) };
            assert!(plain > 2);
            // SAFETY: `plain` is a descriptor dup just returned.
            held.push(std::fs::File::from(unsafe { OwnedFd::from_raw_fd(plain) }));
        }
        let mut command = Command::new("/bin/sh");
        command.args(["-c", "ls /proc/self/fd"]);
        let pid = launcher
            .launch(command, dir.join("out"), dir.join("err"))
            .unwrap();
        let status = wait_for_exit(pid).await.unwrap();
        assert!(status.success(), "{status:?}");
        let listed = std::fs::read_to_string(dir.join("out")).unwrap();
        let fds: Vec<u32> = listed
            .split_whitespace()
            .map(|s| s.parse().unwrap())
            .collect();
        // stdin, stdout, stderr, and the directory `ls` reads.
        assert!(fds.len() <= 4, "the process held {fds:?}");
        drop(held);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn the_wait_returns_the_exit_code_and_the_signal() {
        let dir = temp_dir("exit");
        let launcher = Launcher::start();
        let mut command = Command::new("/bin/sh");
        command.args(["-c", "exit 7"]);
        let pid = launcher
            .launch(command, dir.join("out"), dir.join("err"))
            .unwrap();
        assert_eq!(wait_for_exit(pid).await.unwrap().code(), Some(7));

        let mut command = Command::new("/bin/sleep");
        command.arg("600");
        let pid = launcher
            .launch(command, dir.join("out2"), dir.join("err2"))
            .unwrap();
        let waited = tokio::spawn(wait_for_exit(pid));
        // SAFETY: kill of the child just started.
        assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
        let status = waited.await.unwrap().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_binary_and_an_unwritable_log_are_told_apart() {
        let dir = temp_dir("errors");
        let launcher = Launcher::start();
        let error = launcher
            .launch(
                Command::new("/nonexistent/binary"),
                dir.join("out"),
                dir.join("err"),
            )
            .unwrap_err();
        assert!(matches!(error, LaunchError::Spawn(_)), "{error:?}");
        let error = launcher
            .launch(
                Command::new("/bin/true"),
                dir.join("no-such-dir/out"),
                dir.join("err"),
            )
            .unwrap_err();
        assert!(matches!(error, LaunchError::Logs(_)), "{error:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
