//! Runtime mode: this process was started by a node's runtime manager to run one instance. The
//! user's binary is re-executed with `YR_RUNTIME_MODE=1`; `yr::init` then serves instead of
//! returning: it answers the node's init call (running the constructor), heartbeats and shutdown,
//! and runs the calls that callers stream to it, with the same executors as local mode.

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use std::collections::HashMap;

use parking_lot::{Condvar, Mutex};
use yr_common::{Error, ErrorCode, InvokeOptions};
use yr_proto::error_to_proto;
use yr_proto::v1 as pb;

use super::call_channel::CallExecutor;
use super::convert::{args_from_proto, result_to_proto};
use super::Inner;
use crate::error::RuntimeError;
use crate::function::{
    find_constructor, find_function, find_method, CreateSpec, MethodSpec, TaskSpec,
};
use crate::local::instance::{LocalInstance, Phase};
use crate::local::pool::Pool;
use crate::local::task::LocalTask;
use crate::object_store::{Cancel, ObjectHandle, ObjectSlot, Outcome};

/// Environment variables a runtime is started with.
pub const ENV_RUNTIME_MODE: &str = "YR_RUNTIME_MODE";
/// The node's bus address.
pub const ENV_BUS_ADDRESS: &str = "YR_BUS_ADDRESS";
/// The runtime's id, given by the runtime manager.
pub const ENV_RUNTIME_ID: &str = "YR_RUNTIME_ID";

/// The pid of the node that started this runtime.
pub const ENV_NODE_PID: &str = "YR_NODE_PID";

/// Make this runtime die with the node that started it: the kernel sends it SIGKILL when the
/// node ends. The node starts runtimes with `posix_spawn`, so this runs here, first thing,
/// rather than between fork and exec. A node that already ended before this call is no longer
/// the parent, and the runtime exits at once.
pub fn die_with_node() {
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number and touches no memory.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    let node_pid = std::env::var(ENV_NODE_PID)
        .ok()
        .and_then(|pid| pid.parse::<u32>().ok());
    if let Some(node_pid) = node_pid {
        if std::os::unix::process::parent_id() != node_pid {
            eprintln!("yr runtime: the node (pid {node_pid}) that started this runtime has ended; exiting");
            std::process::exit(1);
        }
    }
}

/// What a runtime was started with.
#[derive(Clone, Debug)]
pub struct RuntimeEnv {
    /// The node's bus address.
    pub bus_address: String,
    /// This runtime's id.
    pub runtime_id: String,
}

impl RuntimeEnv {
    /// The runtime environment, if this process is a runtime.
    pub fn from_env() -> Option<RuntimeEnv> {
        if std::env::var(ENV_RUNTIME_MODE).ok().as_deref() != Some("1") {
            return None;
        }
        Some(RuntimeEnv {
            bus_address: std::env::var(ENV_BUS_ADDRESS).unwrap_or_default(),
            runtime_id: std::env::var(ENV_RUNTIME_ID).unwrap_or_default(),
        })
    }
}

/// The stateless calls a runtime runs, by the caller's connection and call id.
type RunningCalls = HashMap<(u64, u64), Weak<LocalTask>>;

/// The runtime's state.
pub struct RuntimeMode {
    env: RuntimeEnv,
    inner: Weak<Inner>,
    pool: OnceLock<Pool>,
    /// The stateless calls not finished, by the caller's connection and call id, for the
    /// callers' cancels.
    calls: Arc<Mutex<RunningCalls>>,
    instance: OnceLock<Arc<LocalInstance>>,
    done: Mutex<bool>,
    done_changed: Condvar,
    /// Set once the process's yr state is in place (user code may call yr): init calls wait
    /// for it, so no caller reaches the instance before then.
    serving: Mutex<bool>,
    serving_changed: Condvar,
}

impl RuntimeMode {
    pub(crate) fn new(env: RuntimeEnv, inner: Weak<Inner>) -> Arc<RuntimeMode> {
        crate::blocking::set_object_wait_observer(Arc::new(CpuLoan {
            inner: inner.clone(),
            waiting: Mutex::new(0),
        }));
        Arc::new(RuntimeMode {
            env,
            inner,
            pool: OnceLock::new(),
            calls: Arc::new(Mutex::new(HashMap::new())),
            instance: OnceLock::new(),
            done: Mutex::new(false),
            done_changed: Condvar::new(),
            serving: Mutex::new(false),
            serving_changed: Condvar::new(),
        })
    }

    /// Serve until the node says to shut down, then exit the process. Called once the
    /// process's yr state is in place.
    pub fn serve_forever(&self) -> ! {
        *self.serving.lock() = true;
        self.serving_changed.notify_all();
        let mut done = self.done.lock();
        while !*done {
            self.done_changed.wait(&mut done);
        }
        drop(done);
        tracing::debug!(runtime = %self.env.runtime_id, "runtime exiting");
        if let Some(inner) = self.inner.upgrade() {
            inner.remove_sockets();
        }
        std::process::exit(0)
    }

    fn finish(&self) {
        *self.done.lock() = true;
        self.done_changed.notify_all();
    }

    pub(crate) fn on_push(self: &Arc<Self>, push: pb::bus_response::Body) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        match push {
            pb::bus_response::Body::Heartbeat(_) => {
                inner
                    .bus
                    .send_oneway(pb::bus_request::Body::HeartbeatAck(pb::HeartbeatAck {}));
            }
            pb::bus_response::Body::Init(init) => {
                let runtime = self.clone();
                std::thread::spawn(move || runtime.init(init));
            }
            pb::bus_response::Body::Shutdown(shutdown) => {
                let runtime = self.clone();
                std::thread::spawn(move || {
                    runtime.shutdown(Duration::from_millis(shutdown.grace_period_ms))
                });
            }
            _ => {}
        }
    }

    fn init(&self, init: pb::InitCall) {
        // The node pushes the init call right after registration, which comes before the
        // process's yr state is in place: user code (a constructor, or calls that follow the
        // answer) must find yr initialized.
        {
            let mut serving = self.serving.lock();
            while !*serving {
                self.serving_changed.wait(&mut serving);
            }
        }
        tracing::debug!(instance = %init.instance_id, function = %init.function, stateless = init.stateless, "init call");
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        *inner.parent_instance_id.lock() = init.instance_id.clone();
        let result = self.start(&init);
        if let Err(error) = &result {
            tracing::debug!(instance = %init.instance_id, %error, "init call failed");
        }
        inner
            .bus
            .send_oneway(pb::bus_request::Body::InitResult(pb::InitResult {
                instance_id: init.instance_id,
                error: result.err().map(|e| error_to_proto(&e)),
            }));
    }

    /// Carry out an init call: a pool for a stateless runtime, or the instance's constructor.
    /// Options it cannot decode fail it with 1001 before anything starts.
    fn start(&self, init: &pb::InitCall) -> Result<(), Error> {
        let options = decode_options(&init.instance_id, &init.options)?;
        if init.stateless {
            let _ = self
                .pool
                .set(Pool::new("yr-runtime", options.concurrency.max(1) as usize));
            Ok(())
        } else {
            self.construct(init, options)
        }
    }

    fn construct(&self, init: &pb::InitCall, options: InvokeOptions) -> Result<(), Error> {
        let constructor = *find_constructor(&init.function)?;
        let args = args_from_proto(init.args.clone())?;
        let instance = LocalInstance::start(
            init.instance_id.clone(),
            None,
            CreateSpec {
                constructor,
                args,
                options: Arc::new(options),
                class_name: None,
            },
        )?;
        // Evicted for idleness: the node hears it, ends the instance and tells its callers.
        let inner = self.inner.clone();
        instance.on_evicted(Box::new(move |error| {
            if let Some(inner) = inner.upgrade() {
                inner
                    .bus
                    .send_oneway(pb::bus_request::Body::Exit(pb::ExitRequest {
                        reason: Some(error_to_proto(&error)),
                    }));
            }
        }));
        let _ = self.instance.set(instance.clone());
        match instance.wait_started() {
            Phase::Failed(error) => Err(error),
            _ => Ok(()),
        }
    }

    fn shutdown(&self, grace: Duration) {
        if let Some(instance) = self.instance.get() {
            instance.terminate(true);
        }
        let _ = grace;
        self.finish();
    }
}

/// The `InvokeOptions` of an init call (MessagePack, as the creator encoded them). No bytes
/// means the sender set none: the defaults. Bytes that do not decode are 1001: running with
/// defaults instead would silently drop what the creator asked for.
fn decode_options(instance_id: &str, bytes: &[u8]) -> Result<InvokeOptions, Error> {
    if bytes.is_empty() {
        return Ok(InvokeOptions::default());
    }
    rmp_serde::from_slice(bytes).map_err(|error| {
        RuntimeError::BadInvokeOptions {
            instance_id: instance_id.to_string(),
            detail: error.to_string(),
        }
        .into()
    })
}

/// Lends the instance's CPU back to the node while any of its threads waits for objects, so
/// that the tasks it waits for can run there (nested tasks of any depth finish), and takes it
/// back when the last wait ends. Messages go out in the order of the count's changes.
struct CpuLoan {
    inner: Weak<Inner>,
    /// Threads waiting now.
    waiting: Mutex<usize>,
}

impl CpuLoan {
    fn tell(&self, blocked: bool) {
        if let Some(inner) = self.inner.upgrade() {
            inner
                .bus
                .send_oneway(pb::bus_request::Body::WaitState(pb::WaitState { blocked }));
        }
    }
}

impl crate::blocking::BlockingObserver for CpuLoan {
    fn enter(&self) {
        let mut waiting = self.waiting.lock();
        *waiting += 1;
        if *waiting == 1 {
            self.tell(true);
        }
    }

    fn exit(&self) {
        let mut waiting = self.waiting.lock();
        *waiting = waiting.saturating_sub(1);
        if *waiting == 0 {
            self.tell(false);
        }
    }
}

/// Where a call's results go: the caller's shared-memory pool and pid.
struct Caller {
    pool_id: String,
    pid: u32,
}

fn result_of(call_id: u64, returns: &[ObjectHandle], caller: &Caller) -> pb::CallResult {
    let mut values = Vec::with_capacity(returns.len());
    for handle in returns {
        match handle.outcome() {
            Some(Outcome::Ready(value)) => {
                values.push(result_to_proto(&value, &caller.pool_id, caller.pid))
            }
            Some(Outcome::Failed(error)) => {
                return pb::CallResult {
                    call_id,
                    values: Vec::new(),
                    error: Some(error_to_proto(&error)),
                }
            }
            None => {
                return pb::CallResult {
                    call_id,
                    values: Vec::new(),
                    error: Some(error_to_proto(&Error::from(RuntimeError::Bug(
                        "a result was sent unfinished".to_string(),
                    )))),
                }
            }
        }
    }
    pb::CallResult {
        call_id,
        values,
        error: None,
    }
}

impl CallExecutor for RuntimeMode {
    fn cancel(&self, connection: u64, call_id: u64, how: Cancel) {
        let task = self
            .calls
            .lock()
            .get(&(connection, call_id))
            .and_then(Weak::upgrade);
        if let Some(task) = task {
            tracing::debug!(call_id, ?how, "call cancelled by its caller");
            task.cancel_for_caller(how);
        }
    }

    fn disconnected(&self, connection: u64) {
        self.calls.lock().retain(|(from, _), _| *from != connection);
    }

    fn execute(
        &self,
        connection: u64,
        request: pb::CallRequest,
        respond: Box<dyn FnOnce(pb::CallResult) + Send>,
    ) {
        let call_id = request.call_id;
        tracing::debug!(call_id, function = %request.function, "call received");
        if crash_on_call(&request.function) {
            tracing::warn!(function = %request.function, "crashing (fail point)");
            std::process::abort();
        }
        let fail = |error: Error| pb::CallResult {
            call_id,
            values: Vec::new(),
            error: Some(error_to_proto(&error)),
        };
        if let Err(error) = super::memory::admit_invoke() {
            return respond(fail(error));
        }
        let caller = Caller {
            pool_id: request.reply_pool_id,
            pid: request.reply_pid,
        };
        let args = match args_from_proto(request.args) {
            Ok(args) => args,
            Err(error) => return respond(fail(error)),
        };
        let count = request.return_nums.max(1) as usize;
        let returns: Vec<ObjectHandle> = (0..request.return_nums as usize)
            .map(|_| ObjectSlot::pending())
            .collect();
        // Whether the call is in `self.calls` (a stateless call with results), to be removed
        // when it finishes.
        let mut tracked = false;
        let submitted = match pb::CallKind::try_from(request.kind) {
            Ok(pb::CallKind::Function) => match (find_function(&request.function), self.pool.get())
            {
                (Err(error), _) => Err(error),
                (Ok(_), None) => Err(Error::new(
                    ErrorCode::ExtensionMetaError,
                    "this runtime runs an instance, not functions",
                )),
                (Ok(function), Some(pool)) => {
                    let task = LocalTask::submit(
                        pool,
                        TaskSpec {
                            function: *function,
                            args,
                            options: InvokeOptions::shared_default().clone(),
                        },
                        returns.clone(),
                    );
                    if !returns.is_empty() {
                        self.calls
                            .lock()
                            .insert((connection, call_id), Arc::downgrade(&task));
                        tracked = true;
                    }
                    Ok(())
                }
            },
            Ok(pb::CallKind::Method) => match (find_method(&request.function), self.instance.get())
            {
                (Err(error), _) => Err(error),
                (Ok(_), None) => Err(Error::new(
                    ErrorCode::ExtensionMetaError,
                    "this runtime runs functions, not an instance",
                )),
                (Ok(method), Some(instance)) => instance.submit(
                    MethodSpec {
                        method: *method,
                        args,
                        // The caller keeps the call's deadline. The shared default: no
                        // allocation per call.
                        options: InvokeOptions::shared_default().clone(),
                    },
                    returns.clone(),
                ),
            },
            // Cancels are answered by `cancel`, never run.
            Ok(pb::CallKind::Cancel) | Err(_) => Err(Error::new(
                ErrorCode::ExtensionMetaError,
                format!("unknown call kind {}", request.kind),
            )),
        };
        if let Err(error) = submitted {
            return respond(fail(error));
        }
        let _ = count;
        match returns.last().cloned() {
            None => respond(pb::CallResult {
                call_id,
                values: Vec::new(),
                error: None,
            }),
            Some(last) if tracked => {
                let calls = Arc::downgrade(&self.calls);
                last.on_finished(Box::new(move || {
                    if let Some(calls) = calls.upgrade() {
                        calls.lock().remove(&(connection, call_id));
                    }
                    respond(result_of(call_id, &returns, &caller))
                }))
            }
            // A method call: never in `self.calls`.
            Some(last) => last.on_finished(Box::new(move || {
                respond(result_of(call_id, &returns, &caller))
            })),
        }
    }
}

/// Fault tests: whether this runtime crashes on receiving a call of `function`, as if killed
/// mid-call. The `runtime::crash_on_call` fail point says so for a function whose name
/// contains its argument (`return(name)`), or for every call (`return`).
fn crash_on_call(function: &str) -> bool {
    fail::fail_point!("runtime::crash_on_call", |name: Option<String>| {
        name.is_none_or(|name| function.contains(name.as_str()))
    });
    let _ = function;
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> Arc<RuntimeMode> {
        RuntimeMode::new(
            RuntimeEnv {
                bus_address: "unix:/nonexistent/bus.sock".to_string(),
                runtime_id: "rt-test".to_string(),
            },
            Weak::new(),
        )
    }

    fn init_call(stateless: bool, options: Vec<u8>) -> pb::InitCall {
        pb::InitCall {
            instance_id: "instance-1".to_string(),
            function: "yr_runtime::nobody::Class::new".to_string(),
            stateless,
            options: options.into(),
            ..Default::default()
        }
    }

    #[test]
    fn options_that_do_not_decode_fail_the_init_with_param_invalid() {
        for stateless in [true, false] {
            let mode = runtime();
            let error = mode
                .start(&init_call(stateless, vec![0xc1, 0xff, 0x00]))
                .unwrap_err();
            assert_eq!(error.code(), ErrorCode::ParamInvalid, "{error}");
            assert!(error.message().contains("instance-1"), "{error}");
            assert!(error.message().contains("InvokeOptions"), "{error}");
            assert!(mode.pool.get().is_none(), "nothing started");
        }
    }

    #[test]
    fn options_of_the_wrong_shape_are_not_replaced_by_defaults() {
        // Decodable MessagePack, but not InvokeOptions: a map whose `concurrency` is a string.
        let bytes =
            rmp_serde::to_vec_named(&std::collections::BTreeMap::from([("concurrency", "many")]))
                .unwrap();
        let error = decode_options("instance-2", &bytes).unwrap_err();
        assert_eq!(error.code(), ErrorCode::ParamInvalid, "{error}");
    }

    #[test]
    fn the_creators_options_arrive_and_no_options_are_the_defaults() {
        let options = InvokeOptions {
            concurrency: 7,
            ..Default::default()
        };
        let bytes = rmp_serde::to_vec_named(&options).unwrap();
        assert_eq!(decode_options("i", &bytes).unwrap(), options);
        assert_eq!(decode_options("i", &[]).unwrap(), InvokeOptions::default());
        let mode = runtime();
        mode.start(&init_call(true, bytes)).unwrap();
        assert!(mode.pool.get().is_some());
    }
}
