//! The runtime manager: start a runtime process, send its output to log files, reap it and
//! report its end, kill it on request.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::mpsc;
use yr_common::{Error, ErrorCode};

use crate::exit::{oom_kill_count, ExitCause};
use crate::launcher::{wait_for_exit, LaunchError, Launcher};

/// What the runtime manager needs to know.
#[derive(Clone, Debug)]
pub struct RuntimeManagerOptions {
    /// Runtime logs go to `<log_dir>/runtime-<id>.{out,err}`.
    pub log_dir: PathBuf,
    /// The bus address runtimes connect to.
    pub bus_address: String,
    /// The node's id, for runtime ids.
    pub node_id: String,
    /// What runtimes present on their connections: the cluster token (`YR_TOKEN`) and the
    /// node's TLS files (`YR_TLS_*`), as environment variables.
    pub credentials_env: Vec<(String, String)>,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct RuntimeSpec {
    /// The executable.
    pub binary_path: PathBuf,
    /// Extra arguments (for example a test harness filter).
    pub args: Vec<String>,
    /// The job it belongs to.
    pub job_id: String,
    /// Environment variables for the process.
    pub env: Vec<(String, String)>,
}

/// A runtime process ended.
#[derive(Clone, Debug)]
pub struct RuntimeEvent {
    /// Its id.
    pub runtime_id: String,
    /// How it ended.
    pub cause: ExitCause,
    /// The last lines of its stderr.
    pub stderr_tail: String,
}

/// Errors of the function agent and runtime manager. Their codes are chosen in one place,
/// [`AgentError::code`]: preparing an instance's files is the function agent's step (3009),
/// starting the process is the runtime manager's (3012). (A failed code download is the
/// proxy's `ProxyError::CodeDownload`, also 3009.)
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The process could not be started.
    #[error(
        "cannot start runtime {binary}: {source}; check that the file exists and is executable \
         and that the node may start more processes"
    )]
    Spawn {
        /// The executable.
        binary: String,
        /// Why.
        source: std::io::Error,
    },
    /// The log directory could not be used.
    #[error(
        "cannot write runtime logs in {dir}: {source}; check the node's disk space and that the \
         session directory is writable"
    )]
    Logs {
        /// The directory.
        dir: String,
        /// Why.
        source: std::io::Error,
    },
}

impl AgentError {
    /// The code callers see: 3009 (`ERR_FUNCTION_AGENT_OPERATION_ERROR`) when the agent could
    /// not prepare the instance's files (its log directory and files), 3012
    /// (`ERR_RUNTIME_MANAGER_OPERATION_ERROR`) when the runtime process could not be started.
    pub fn code(&self) -> ErrorCode {
        match self {
            AgentError::Logs { .. } => ErrorCode::FunctionAgentOperationError,
            AgentError::Spawn { .. } => ErrorCode::RuntimeManagerOperationError,
        }
    }
}

impl From<AgentError> for Error {
    fn from(error: AgentError) -> Error {
        Error::new(error.code(), error.to_string())
    }
}

struct Running {
    pid: u32,
}

/// Starts, watches and reaps runtime processes.
pub struct RuntimeManager {
    options: RuntimeManagerOptions,
    running: Arc<Mutex<HashMap<String, Running>>>,
    events: mpsc::UnboundedSender<RuntimeEvent>,
    next_id: AtomicU64,
    launcher: Launcher,
}

/// The last `lines` lines of the file at `path`.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl RuntimeManager {
    /// A manager that reports ended runtimes on `events`.
    pub fn new(
        options: RuntimeManagerOptions,
        events: mpsc::UnboundedSender<RuntimeEvent>,
    ) -> RuntimeManager {
        RuntimeManager {
            options,
            running: Arc::new(Mutex::new(HashMap::new())),
            events,
            next_id: AtomicU64::new(1),
            launcher: Launcher::start(),
        }
    }

    /// The file a runtime's stderr goes to.
    pub fn stderr_path(&self, runtime_id: &str) -> PathBuf {
        self.options
            .log_dir
            .join(format!("runtime-{runtime_id}.err"))
    }

    /// Start a runtime. Returns its id and pid; it registers on the bus when ready. Must be
    /// called inside the node's tokio runtime.
    pub fn spawn(&self, spec: &RuntimeSpec) -> Result<(String, u32), AgentError> {
        let runtime_id = format!(
            "{}-rt{}",
            self.options.node_id,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let log_dir = || self.options.log_dir.display().to_string();
        std::fs::create_dir_all(&self.options.log_dir).map_err(|source| AgentError::Logs {
            dir: log_dir(),
            source,
        })?;
        let log_file = |suffix: &str| {
            self.options
                .log_dir
                .join(format!("runtime-{runtime_id}.{suffix}"))
        };
        let mut command = Command::new(&spec.binary_path);
        command
            .args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("YR_RUNTIME_MODE", "1")
            .env("YR_BUS_ADDRESS", &self.options.bus_address)
            .env("YR_RUNTIME_ID", &runtime_id)
            .env("YR_JOB_ID", &spec.job_id)
            .envs(
                self.options
                    .credentials_env
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .env_remove("YR_SERVER_ADDRESS")
            .env_remove("YR_LOCAL_MODE")
            // The runtime asks to die with its node itself, first thing (`yr_runtime`'s
            // `die_with_node`): a `pre_exec` would make the start a fork.
            .env("YR_NODE_PID", std::process::id().to_string());
        let oom_before = oom_kill_count();
        // The table stays locked from the start to the insert: the runtime may connect and
        // ask to be checked (`pid`) before `spawn` returns here.
        let mut running = self.running.lock();
        let pid = self
            .launcher
            .launch(command, log_file("out"), log_file("err"))
            .map_err(|error| match error {
                LaunchError::Logs(source) => AgentError::Logs {
                    dir: log_dir(),
                    source,
                },
                LaunchError::Spawn(source) => AgentError::Spawn {
                    binary: spec.binary_path.display().to_string(),
                    source,
                },
            })?;
        running.insert(runtime_id.clone(), Running { pid });
        drop(running);
        let running = self.running.clone();
        let events = self.events.clone();
        let stderr_path = self.stderr_path(&runtime_id);
        let id = runtime_id.clone();
        tokio::spawn(async move {
            let status = wait_for_exit(pid).await;
            running.lock().remove(&id);
            let oom = match (oom_before, oom_kill_count()) {
                (Some(before), Some(after)) => after > before,
                _ => false,
            };
            let cause = match status {
                Ok(status) => ExitCause::from_status(status, oom),
                Err(_) => ExitCause {
                    code: None,
                    signal: None,
                    oom,
                },
            };
            tracing::debug!(runtime = %id, %cause, "runtime ended");
            let _ = events.send(RuntimeEvent {
                runtime_id: id,
                cause,
                stderr_tail: tail(&stderr_path, 20),
            });
        });
        Ok((runtime_id, pid))
    }

    /// Send `signal` to a runtime. Returns false if it is not running.
    pub fn signal(&self, runtime_id: &str, signal: i32) -> bool {
        let pid = self.running.lock().get(runtime_id).map(|r| r.pid);
        match pid {
            Some(pid) if pid > 0 => {
                // SAFETY: sending a signal to a child process this manager started.
                unsafe { libc::kill(pid as libc::pid_t, signal) == 0 }
            }
            _ => false,
        }
    }

    /// Kill every runtime (the node is stopping).
    pub fn kill_all(&self) {
        let pids: Vec<u32> = self.running.lock().values().map(|r| r.pid).collect();
        for pid in pids {
            // SAFETY: as above.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }

    /// How many runtimes are running.
    pub fn running(&self) -> usize {
        self.running.lock().len()
    }

    /// The pid of a running runtime.
    pub fn pid(&self, runtime_id: &str) -> Option<u32> {
        self.running.lock().get(runtime_id).map(|r| r.pid)
    }
}

impl crate::pool::Spawner for RuntimeManager {
    fn spawn(&self, spec: &RuntimeSpec) -> Result<(String, u32), AgentError> {
        RuntimeManager::spawn(self, spec)
    }

    fn signal(&self, runtime_id: &str, signal: i32) -> bool {
        RuntimeManager::signal(self, runtime_id, signal)
    }

    fn pid(&self, runtime_id: &str) -> Option<u32> {
        RuntimeManager::pid(self, runtime_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manager(log_dir: PathBuf) -> RuntimeManager {
        // `RuntimeManager::new` takes the node's event sender (unbounded: one event per runtime
        // the node started, so bounded by the runtimes it runs); these tests drop the events.
        let (events, _) = mpsc::unbounded_channel();
        RuntimeManager::new(
            RuntimeManagerOptions {
                log_dir,
                bus_address: "unix:/nonexistent/bus.sock".to_string(),
                node_id: "node-test".to_string(),
                credentials_env: Vec::new(),
            },
            events,
        )
    }

    fn spec(binary: &str) -> RuntimeSpec {
        RuntimeSpec {
            binary_path: PathBuf::from(binary),
            args: Vec::new(),
            job_id: "job-test".to_string(),
            env: Vec::new(),
        }
    }

    #[tokio::test]
    async fn an_unwritable_log_directory_is_a_function_agent_failure() {
        let dir = std::env::temp_dir().join(format!("yr-agent-logs-{}", std::process::id()));
        std::fs::write(&dir, b"a file, not a directory").unwrap();
        let error = manager(dir.join("logs"))
            .spawn(&spec("/bin/true"))
            .unwrap_err();
        std::fs::remove_file(&dir).unwrap();
        assert!(matches!(error, AgentError::Logs { .. }), "{error}");
        let error = Error::from(error);
        assert_eq!(error.code(), ErrorCode::FunctionAgentOperationError);
        assert!(error.message().contains("runtime logs"), "{error}");
    }

    #[tokio::test]
    async fn a_binary_that_cannot_run_is_a_runtime_manager_failure() {
        let dir = std::env::temp_dir().join(format!("yr-agent-spawn-{}", std::process::id()));
        let error = manager(dir.clone())
            .spawn(&spec("/nonexistent/yr-runtime-binary"))
            .unwrap_err();
        let _ = std::fs::remove_dir_all(&dir);
        let error = Error::from(error);
        assert_eq!(error.code(), ErrorCode::RuntimeManagerOperationError);
        assert!(
            error.message().contains("/nonexistent/yr-runtime-binary"),
            "{error}"
        );
    }
}
