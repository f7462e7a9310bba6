//! Runtime mode: this process was started by a node's runtime manager to run one instance. The
//! user's binary is re-executed with `YR_RUNTIME_MODE=1`; `yr::init` then serves instead of
//! returning: it answers the node's init call (running the constructor), heartbeats and shutdown,
//! and runs the calls that callers stream to it, with the same executors as local mode.

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use yr_common::{Error, ErrorCode, InvokeOptions};
use yr_proto::v1 as pb;

use super::call_channel::CallExecutor;
use super::convert::{args_from_proto, error_to_proto, result_to_proto};
use super::Inner;
use crate::function::{
    find_constructor, find_function, find_method, CreateSpec, MethodSpec, TaskSpec,
};
use crate::local::instance::{LocalInstance, Phase};
use crate::local::pool::Pool;
use crate::local::task::LocalTask;
use crate::object_store::{ObjectHandle, ObjectSlot, Outcome};

/// Environment variables a runtime is started with.
pub const ENV_RUNTIME_MODE: &str = "YR_RUNTIME_MODE";
/// The node's bus address.
pub const ENV_BUS_ADDRESS: &str = "YR_BUS_ADDRESS";
/// The runtime's id, given by the runtime manager.
pub const ENV_RUNTIME_ID: &str = "YR_RUNTIME_ID";

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

/// The runtime's state.
pub struct RuntimeMode {
    env: RuntimeEnv,
    inner: Weak<Inner>,
    pool: OnceLock<Pool>,
    instance: OnceLock<Arc<LocalInstance>>,
    done: Mutex<bool>,
    done_changed: Condvar,
}

impl RuntimeMode {
    pub(crate) fn new(env: RuntimeEnv, inner: Weak<Inner>) -> Arc<RuntimeMode> {
        Arc::new(RuntimeMode {
            env,
            inner,
            pool: OnceLock::new(),
            instance: OnceLock::new(),
            done: Mutex::new(false),
            done_changed: Condvar::new(),
        })
    }

    /// Serve until the node says to shut down, then exit the process.
    pub fn serve_forever(&self) -> ! {
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
        tracing::debug!(instance = %init.instance_id, function = %init.function, stateless = init.stateless, "init call");
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        *inner.parent_instance_id.lock() = init.instance_id.clone();
        let options: InvokeOptions = rmp_serde::from_slice(&init.options).unwrap_or_default();
        let result = if init.stateless {
            let _ = self
                .pool
                .set(Pool::new("yr-runtime", options.concurrency.max(1) as usize));
            Ok(())
        } else {
            self.construct(&init, options)
        };
        inner
            .bus
            .send_oneway(pb::bus_request::Body::InitResult(pb::InitResult {
                instance_id: init.instance_id,
                error: result.err().map(|e| error_to_proto(&e)),
            }));
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
            },
        )?;
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
                    error: Some(error_to_proto(&Error::new(
                        ErrorCode::InnerSystemError,
                        "a result was sent unfinished",
                    ))),
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
    fn execute(&self, request: pb::CallRequest, respond: Box<dyn FnOnce(pb::CallResult) + Send>) {
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
        let submitted = match pb::CallKind::try_from(request.kind) {
            Ok(pb::CallKind::Function) => match (find_function(&request.function), self.pool.get())
            {
                (Err(error), _) => Err(error),
                (Ok(_), None) => Err(Error::new(
                    ErrorCode::ExtensionMetaError,
                    "this runtime runs an instance, not functions",
                )),
                (Ok(function), Some(pool)) => {
                    LocalTask::submit(
                        pool,
                        TaskSpec {
                            function: *function,
                            args,
                            options: Arc::new(InvokeOptions::default()),
                        },
                        returns.clone(),
                    );
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
                    },
                    returns.clone(),
                ),
            },
            Err(_) => Err(Error::new(
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
