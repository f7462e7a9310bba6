//! The process's yr runtime: its lifecycle (`init`, `finalize`) and the calls every SDK makes
//! through it. It owns the backend; objects live in the process-wide object store.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use yr_common::{ids, Config, Error, ErrorCode, Result};

use crate::backend::{Backend, InstanceInfo, NamedInstance};
use crate::blocking;
use crate::cluster::runtime_mode::RuntimeEnv;
use crate::cluster::ClusterBackend;
use crate::cross_language::Executable;
use crate::error::{EntryKind, RuntimeError};
use crate::function::{check_unique, CreateSpec, MethodSpec, TaskSpec};
use crate::kv::{KvClient, LocalKv};
use crate::local::LocalBackend;
use crate::object_store::{self, ObjectHandle, ObjectSlot, Outcome, StoredValue};
use crate::stream::{LocalStreams, StreamClient};

/// What `init` returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientInfo {
    /// The job id: the one configured, or a generated one.
    pub job_id: String,
}

enum Lifecycle {
    Uninitialized,
    Running(Arc<Runtime>),
    Finalized,
}

static LIFECYCLE: RwLock<Lifecycle> = RwLock::new(Lifecycle::Uninitialized);

/// An initialized runtime.
pub struct Runtime {
    config: Config,
    job_id: String,
    /// This process is a runtime the node started, not a driver.
    in_runtime: bool,
    backend: Box<dyn Backend>,
    kv: Box<dyn KvClient>,
    streams: Box<dyn StreamClient>,
}

/// Initialize yr in this process. A second call, before `finalize`, fails with 4001.
pub fn init(config: Config) -> Result<ClientInfo> {
    config.validate()?;
    if let Some(env) = crate::cluster::runtime_mode::RuntimeEnv::from_env() {
        crate::cluster::runtime_mode::die_with_node();
        // A runtime takes its fail points from `FAILPOINTS` (inherited from its node) when
        // its binary was built with them; a user's binary, built without, ignores them.
        if fail::has_failpoints() {
            if let Err(message) = yr_common::fail_points::setup_from_env() {
                tracing::warn!(%message, "ignoring FAILPOINTS");
            }
        }
        run_as_runtime(config, env);
    }
    let mut lifecycle = LIFECYCLE.write();
    if let Lifecycle::Running(runtime) = &*lifecycle {
        return Err(Error::new(
            ErrorCode::IncorrectInitUsage,
            format!(
                "yr::init was called twice (job {} is running); call yr::finalize before \
                 initializing again",
                runtime.job_id
            ),
        ));
    }
    init_logging(&config);
    let job_id = config
        .job_id
        .clone()
        .unwrap_or_else(|| format!("job-{}", ids::random_hex(8)));
    type Clients = (Box<dyn Backend>, Box<dyn KvClient>, Box<dyn StreamClient>);
    let (backend, kv, streams): Clients = if config.local_mode {
        (
            Box::new(LocalBackend::new(&config)),
            Box::new(LocalKv::new()),
            Box::new(LocalStreams::new()),
        )
    } else {
        let cluster = ClusterBackend::connect(&config, &job_id, None)?;
        let kv = Box::new(cluster.kv_client());
        let streams = Box::new(cluster.stream_client());
        (Box::new(cluster), kv, streams)
    };
    tracing::debug!(job_id = %job_id, backend = backend.name(), "yr initialized");
    let runtime = Arc::new(Runtime {
        config,
        job_id: job_id.clone(),
        in_runtime: false,
        backend,
        kv,
        streams,
    });
    *lifecycle = Lifecycle::Running(runtime);
    Ok(ClientInfo { job_id })
}

/// This process is a runtime: serve the node until it says to stop, then exit. Never returns.
fn run_as_runtime(config: Config, env: RuntimeEnv) -> ! {
    init_logging(&config);
    let job_id = std::env::var("YR_JOB_ID").unwrap_or_else(|_| "job-unknown".to_string());
    let backend = match ClusterBackend::connect(&config, &job_id, Some(env)) {
        Ok(backend) => backend,
        Err(error) => {
            eprintln!("yr runtime: cannot connect to the node: {error}");
            std::process::exit(3);
        }
    };
    let Some(mode) = backend.inner().runtime.get().cloned() else {
        eprintln!("yr runtime: runtime mode was not set up");
        std::process::exit(3);
    };
    *LIFECYCLE.write() = Lifecycle::Running(Arc::new(Runtime {
        config,
        job_id,
        in_runtime: true,
        kv: Box::new(backend.kv_client()),
        streams: Box::new(backend.stream_client()),
        backend: Box::new(backend),
    }));
    mode.serve_forever()
}

fn init_logging(config: &Config) {
    static LOGGING: OnceLock<()> = OnceLock::new();
    LOGGING.get_or_init(|| {
        let level = match config.log_level.to_ascii_lowercase().as_str() {
            "trace" => tracing::Level::TRACE,
            "debug" => tracing::Level::DEBUG,
            "warn" => tracing::Level::WARN,
            "error" | "off" => tracing::Level::ERROR,
            _ => tracing::Level::INFO,
        };
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        use tracing_subscriber::Layer;
        // yr's own events at the configured level; libraries (h2, hyper, tonic) at warn.
        let filter = tracing_subscriber::filter::Targets::new()
            .with_target("yr", level)
            .with_default(tracing::Level::WARN);
        let layer = |ansi: bool| {
            tracing_subscriber::fmt::layer()
                .with_target(false)
                .with_ansi(ansi)
        };
        let installed = match &config.log_dir {
            Some(dir) => std::fs::create_dir_all(dir)
                .and_then(|()| {
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(dir.join(format!("yr-driver-{}.log", std::process::id())))
                })
                .map_err(|e| e.to_string())
                .and_then(|file| {
                    tracing_subscriber::registry()
                        .with(
                            layer(false)
                                .with_writer(std::sync::Mutex::new(file))
                                .with_filter(filter.clone()),
                        )
                        .try_init()
                        .map_err(|e| e.to_string())
                }),
            None => tracing_subscriber::registry()
                .with(layer(true).with_writer(std::io::stderr).with_filter(filter))
                .try_init()
                .map_err(|e| e.to_string()),
        };
        // Another subscriber may already be installed by the application; that one wins.
        let _ = installed;
    });
}

/// Finalize: release the job's instances, fail pending calls with 9000, and refuse new calls
/// with 9000. Does nothing if yr is not initialized. Only the driver finalizes: inside a
/// function or method (in local mode too), or anywhere in a runtime process, it fails with 4006
/// and changes nothing.
pub fn finalize() -> Result<()> {
    if crate::user_code::in_user_code() {
        return Err(RuntimeError::FinalizeInRuntime {
            place: "inside a function, constructor or method",
        }
        .into());
    }
    let runtime = {
        let mut lifecycle = LIFECYCLE.write();
        if let Lifecycle::Running(runtime) = &*lifecycle {
            if runtime.in_runtime {
                return Err(RuntimeError::FinalizeInRuntime {
                    place: "in a runtime process (the node stops it)",
                }
                .into());
            }
        }
        match std::mem::replace(&mut *lifecycle, Lifecycle::Finalized) {
            Lifecycle::Running(runtime) => runtime,
            other => {
                *lifecycle = other;
                return Ok(());
            }
        }
    };
    let finalized = Error::new(
        ErrorCode::Finalized,
        format!(
            "job {} was finalized before this result arrived; keep yr initialized until every \
             result is read",
            runtime.job_id
        ),
    );
    // Pending calls fail with 9000 before the backend stops, so that stopping an instance does
    // not fail its queued calls with 1007 first; the second sweep catches calls that were still
    // being submitted and jobs the backend dropped.
    runtime.backend.stop_sending();
    object_store::fail_all_pending(&finalized);
    runtime.kv.shutdown(&finalized);
    runtime.streams.shutdown(&finalized);
    runtime.backend.shutdown();
    object_store::fail_all_pending(&finalized);
    tracing::debug!(job_id = %runtime.job_id, "yr finalized");
    Ok(())
}

/// Whether `init` has been called and `finalize` has not.
pub fn is_initialized() -> bool {
    matches!(*LIFECYCLE.read(), Lifecycle::Running(_))
}

/// The running runtime: 4001 before `init`, 9000 after `finalize`.
pub fn current() -> Result<Arc<Runtime>> {
    match &*LIFECYCLE.read() {
        Lifecycle::Running(runtime) => Ok(runtime.clone()),
        Lifecycle::Uninitialized => Err(Error::new(
            ErrorCode::IncorrectInitUsage,
            "yr is not initialized; call yr::init(Config) before any other yr call",
        )),
        Lifecycle::Finalized => Err(Error::new(
            ErrorCode::Finalized,
            "yr has been finalized; call yr::init again before using yr",
        )),
    }
}

/// A kill's error: the backends look the id up first and answer 1003 for an unknown one, which
/// for a kill is a usage error (4009: the caller passed an id that names no instance).
fn kill_error(instance_id: &str, error: Error) -> Error {
    if error.code() != ErrorCode::InstanceNotFound {
        return error;
    }
    RuntimeError::KillUnknown {
        instance_id: instance_id.to_string(),
        detail: error.message().to_string(),
    }
    .into()
}

fn timeout_error(missing: &[ObjectHandle], timeout: Duration) -> Error {
    let ids: Vec<String> = missing.iter().map(|h| h.id().to_string()).collect();
    Error::new(
        ErrorCode::GetOperationFailed,
        format!(
            "Get object timeout after {timeout:?}. {} of the objects did not arrive: [{}]; \
             raise the timeout or check the calls that produce them",
            ids.len(),
            ids.join(", ")
        ),
    )
}

fn deadline_after(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}

impl Runtime {
    /// The configuration `init` was given.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The job id.
    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// Where KV calls go: this process's store in local mode, the node's data worker in a
    /// cluster.
    pub fn kv(&self) -> &dyn KvClient {
        self.kv.as_ref()
    }

    /// Where stream calls go: this process's streams in local mode, the streams' home data
    /// workers in a cluster.
    pub fn streams(&self) -> &dyn StreamClient {
        self.streams.as_ref()
    }

    /// Store `value` as a new object owned by this process.
    pub fn put(&self, value: StoredValue) -> ObjectHandle {
        ObjectSlot::ready(value)
    }

    /// Wait for every object in `handles`, at most `timeout` in all. Each outcome is the value
    /// or the error its request ended with. If some did not finish in time: with
    /// `allow_partial`, they are `None`; otherwise the call fails with 4005 naming them.
    pub fn get(
        &self,
        handles: &[ObjectHandle],
        timeout: Duration,
        allow_partial: bool,
    ) -> Result<Vec<Option<Outcome>>> {
        let deadline = deadline_after(timeout);
        let mut outcomes = Vec::with_capacity(handles.len());
        let mut missing = Vec::new();
        for handle in handles {
            let outcome = match handle.outcome() {
                Some(outcome) => Some(outcome),
                None => blocking::waiting_for_objects(|| handle.wait_until(deadline)),
            };
            if outcome.is_none() {
                missing.push(handle.clone());
            }
            outcomes.push(outcome);
        }
        if !missing.is_empty() && !allow_partial {
            return Err(timeout_error(&missing, timeout));
        }
        Ok(outcomes)
    }

    /// Wait until `wait_num` of `handles` are finished (with a value or an error) or `timeout`
    /// passes. Returns the indices of the finished and the unfinished ones.
    pub fn wait(
        &self,
        handles: &[ObjectHandle],
        wait_num: usize,
        timeout: Duration,
    ) -> Result<(Vec<usize>, Vec<usize>)> {
        if wait_num == 0 || wait_num > handles.len() {
            return Err(Error::new(
                ErrorCode::ParamInvalid,
                format!(
                    "wait_num must be in [1, {}] (the number of refs), got {wait_num}",
                    handles.len()
                ),
            ));
        }
        let mut seen = std::collections::HashSet::with_capacity(handles.len());
        if let Some(duplicate) = handles.iter().find(|h| !seen.insert(h.id())) {
            return Err(Error::new(
                ErrorCode::ParamInvalid,
                format!(
                    "wait got object {} more than once; pass each ref once",
                    duplicate.id()
                ),
            ));
        }
        let finished_now = || handles.iter().filter(|h| h.is_finished()).count();
        if finished_now() < wait_num {
            let signal = Arc::new((parking_lot::Mutex::new(0usize), parking_lot::Condvar::new()));
            for handle in handles {
                let signal = signal.clone();
                handle.on_finished(Box::new(move || {
                    *signal.0.lock() += 1;
                    signal.1.notify_all();
                }));
            }
            let deadline = deadline_after(timeout);
            blocking::waiting_for_objects(|| {
                let mut count = signal.0.lock();
                while *count < wait_num {
                    match deadline {
                        Some(deadline) => {
                            if signal.1.wait_until(&mut count, deadline).timed_out() {
                                break;
                            }
                        }
                        None => signal.1.wait(&mut count),
                    }
                }
            });
        }
        let (ready, unready): (Vec<usize>, Vec<usize>) =
            (0..handles.len()).partition(|&i| handles[i].is_finished());
        Ok((ready, unready))
    }

    /// Cancel the stateless call producing `handle`. Method results are ignored silently.
    pub fn cancel(&self, handle: &ObjectHandle, force: bool) -> Result<()> {
        self.cancel_all(std::slice::from_ref(handle), force, false)
    }

    /// Cancel the stateless calls producing `handles` (openYuanrong's `cancel(refs,
    /// allow_force, allow_recursive)`). A queued call is dropped; with `force`, a running one's
    /// results fail now (its code runs on). With `recursive`, the stateless calls each one
    /// submitted while it ran are cancelled too, and theirs: a running descendant is stopped
    /// where it runs alone in a runtime process (that process ends, with what it started), and
    /// abandoned otherwise. Every cancelled result fails with 1017. Results of method calls and
    /// finished calls are left alone.
    ///
    /// ```
    /// use yr_runtime::object_store::StoredValue;
    ///
    /// yr_runtime::init(yr_common::Config::local()).unwrap();
    /// let runtime = yr_runtime::current().unwrap();
    /// let stored = runtime.put(StoredValue::default());
    /// runtime.cancel_all(&[stored.clone()], true, true).unwrap();
    /// assert!(stored.is_finished(), "a finished object keeps its value");
    /// # drop(runtime);
    /// yr_runtime::finalize().unwrap();
    /// ```
    pub fn cancel_all(&self, handles: &[ObjectHandle], force: bool, recursive: bool) -> Result<()> {
        let how = crate::object_store::Cancel::new(force, recursive);
        for handle in handles {
            handle.cancel(how);
        }
        Ok(())
    }

    /// Submit a stateless call. Returns one pending object per return value. Options that
    /// mean nothing for a stateless call (a name, `need_order`, …) fail it with 1001; with
    /// `timeout_s`, the results fail with 4005 if the call has not finished by then.
    pub fn invoke_function(&self, task: TaskSpec) -> Result<Vec<ObjectHandle>> {
        check_unique(EntryKind::Function, task.function.name)?;
        self.submit_function(task, None)
    }

    /// Submit a stateless call of code in `executable` (a call across languages, design 018),
    /// as [`Runtime::invoke_function`] does. The task's entry only names the code
    /// ([`crate::cross_language::function_entry`]); the callee's runtime looks the name up
    /// (1015 if it has no such function). 4006 in local mode.
    pub fn invoke_function_in(
        &self,
        executable: &Executable,
        task: TaskSpec,
    ) -> Result<Vec<ObjectHandle>> {
        self.submit_function(task, Some(executable))
    }

    fn submit_function(
        &self,
        task: TaskSpec,
        executable: Option<&Executable>,
    ) -> Result<Vec<ObjectHandle>> {
        task.options.check_for_function()?;
        let returns: Vec<ObjectHandle> = (0..task.function.return_nums)
            .map(|_| ObjectSlot::pending())
            .collect();
        let deadline = task.options.timeout().map(|t| (task.function.name, t));
        match executable {
            None => self.backend.submit_task(task, returns.clone())?,
            Some(executable) => self
                .backend
                .submit_task_in(executable, task, returns.clone())?,
        }
        if let Some((function, timeout)) = deadline {
            crate::deadline::fail_after(function, timeout, &returns);
        }
        Ok(returns)
    }

    /// Create an instance. Returns at once; a constructor failure surfaces on its calls.
    /// Options that mean nothing for an instance (stateless retries, `timeout_s`, …) fail it
    /// with 1001.
    pub fn create_instance(&self, spec: CreateSpec) -> Result<InstanceInfo> {
        check_unique(EntryKind::Constructor, spec.constructor.name)?;
        spec.options.check_for_instance()?;
        self.backend.create_instance(spec)
    }

    /// Create an instance of a class in `executable` (a call across languages), as
    /// [`Runtime::create_instance`] does. Its methods are called with
    /// [`Runtime::invoke_method`] and entries from [`crate::cross_language::method_entry`].
    /// A constructor the callee's runtime does not have fails the instance with 1015. 4006 in
    /// local mode.
    pub fn create_instance_in(
        &self,
        executable: &Executable,
        spec: CreateSpec,
    ) -> Result<InstanceInfo> {
        spec.options.check_for_instance()?;
        self.backend.create_instance_in(executable, spec)
    }

    /// Call a method of an instance. Returns one pending object per return value. Options
    /// other than `timeout_s` fail the call with 1001 (they belong to the instance); with
    /// `timeout_s`, the results fail with 4005 if the call has not finished by then.
    pub fn invoke_method(
        &self,
        instance_id: &str,
        call: MethodSpec,
        return_nums: usize,
    ) -> Result<Vec<ObjectHandle>> {
        check_unique(EntryKind::Method, call.method.name)?;
        call.options.check_for_method()?;
        let returns: Vec<ObjectHandle> = (0..return_nums).map(|_| ObjectSlot::pending()).collect();
        let deadline = call.options.timeout().map(|t| (call.method.name, t));
        self.backend
            .submit_method(instance_id, call, returns.clone())?;
        if let Some((method, timeout)) = deadline {
            crate::deadline::fail_after(method, timeout, &returns);
        }
        Ok(returns)
    }

    /// Terminate an instance, running its shutdown hook; with `wait`, until it has exited. 4004
    /// for an empty id, 4009 for an id no instance has.
    pub fn terminate_instance(&self, instance_id: &str, wait: bool) -> Result<()> {
        self.backend
            .terminate_instance(instance_id, wait)
            .map_err(|error| kill_error(instance_id, error))
    }

    /// The named instance, waiting up to `timeout` for it to appear; 1003 if it does not.
    pub fn get_named_instance(
        &self,
        name: &str,
        namespace: &str,
        timeout: Duration,
    ) -> Result<InstanceInfo> {
        if name.is_empty() {
            return Err(Error::new(
                ErrorCode::ParamInvalid,
                "the instance name is empty; pass the name given at creation",
            ));
        }
        self.backend.get_named_instance(name, namespace, timeout)
    }

    /// Every named instance.
    pub fn list_named_instances(&self) -> Result<Vec<NamedInstance>> {
        self.backend.list_named_instances()
    }

    /// Kill an instance by id and wait for it to exit. 4004 for an empty id, 4009 for an id no
    /// instance has.
    pub fn kill_instance(&self, instance_id: &str) -> Result<()> {
        self.terminate_instance(instance_id, true)
    }
}
