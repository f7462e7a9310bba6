//! Stateless calls in a cluster (openYuanrong's task submitter): calls of one resource shape
//! share a pool of stateless instances. A call goes to the least-loaded instance with room; the
//! pool grows a few instances at a time while every instance is busy, and instances idle for
//! `recycle_time` are released. Failed calls are retried per the code's retry policy.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use yr_common::{Error, ErrorCode, InvokeOptions};
use yr_proto::v1 as pb;

use super::remote_instance::{OutCall, RemoteInstance, ResultHook};
use super::Inner;
use crate::function::{Arg, FunctionEntry, TaskSpec};
use crate::object_store::{Canceller, ObjectHandle};
use crate::retry::RetryBudget;

/// Instances of one pool that may be starting at once.
const MAX_STARTING: usize = 2;

struct PooledInstance {
    remote: Arc<RemoteInstance>,
    started: Instant,
    last_used: Mutex<Instant>,
}

struct Pool {
    options: Arc<InvokeOptions>,
    instances: Vec<Arc<PooledInstance>>,
}

/// A stateless call and what it may still spend on retries.
struct Task {
    function: FunctionEntry,
    args: Arc<Vec<Arg>>,
    options: Arc<InvokeOptions>,
    returns: Vec<ObjectHandle>,
    budget: Mutex<RetryBudget>,
    /// Set by `yr::cancel`: the results are failed and the call is not retried.
    cancelled: std::sync::atomic::AtomicBool,
}

/// The stateless pools of this process.
pub struct StatelessSubmitter {
    pools: Mutex<HashMap<String, Pool>>,
    tasks: Mutex<HashMap<u64, Arc<Task>>>,
    recycle_time: Duration,
    max_instances: i64,
}

fn shape_key(options: &InvokeOptions) -> String {
    format!(
        "{}|{}|{}|{:?}|{:?}|{:?}",
        options.cpu,
        options.memory,
        options.concurrency,
        options.custom_resources,
        options.labels,
        options.env_vars
    )
}

impl StatelessSubmitter {
    /// Pools that release instances idle for `recycle_time`, with at most `max_instances` per
    /// pool (-1: no limit).
    pub fn new(recycle_time: Duration, max_instances: i64) -> StatelessSubmitter {
        StatelessSubmitter {
            pools: Mutex::new(HashMap::new()),
            tasks: Mutex::new(HashMap::new()),
            recycle_time,
            max_instances,
        }
    }

    /// Submit a stateless call.
    pub fn submit(
        inner: &Arc<Inner>,
        spec: TaskSpec,
        returns: Vec<ObjectHandle>,
    ) -> Result<(), Error> {
        let task = Arc::new(Task {
            function: spec.function,
            budget: Mutex::new(RetryBudget::new(&spec.options)),
            args: Arc::new(spec.args),
            options: spec.options,
            returns,
            cancelled: std::sync::atomic::AtomicBool::new(false),
        });
        for handle in &task.returns {
            handle.set_canceller(Arc::new(TaskCanceller {
                task: Arc::downgrade(&task),
            }));
        }
        Self::dispatch(inner, task)
    }

    fn dispatch(inner: &Arc<Inner>, task: Arc<Task>) -> Result<(), Error> {
        let submitter = &inner.stateless;
        let instance = submitter.pick_instance(inner, &task.options)?;
        let call = OutCall::with_shared_args(
            pb::CallKind::Function,
            task.function.name,
            task.args.clone(),
            task.returns.clone(),
        );
        submitter.tasks.lock().insert(call.call_id, task);
        *instance.last_used.lock() = Instant::now();
        instance.remote.submit(call)
    }

    fn pick_instance(
        &self,
        inner: &Arc<Inner>,
        options: &Arc<InvokeOptions>,
    ) -> Result<Arc<PooledInstance>, Error> {
        let key = shape_key(options);
        let concurrency = options.concurrency.max(1) as usize;
        let mut pools = self.pools.lock();
        let pool = pools.entry(key).or_insert_with(|| Pool {
            options: options.clone(),
            instances: Vec::new(),
        });
        pool.instances.retain(|i| !i.remote.is_failed());
        let least = pool
            .instances
            .iter()
            .min_by_key(|i| i.remote.load())
            .cloned();
        if let Some(least) = &least {
            if least.remote.load() < concurrency {
                return Ok(least.clone());
            }
        }
        let starting = pool
            .instances
            .iter()
            .filter(|i| !i.remote.is_open())
            .count();
        let under_limit =
            self.max_instances < 0 || (pool.instances.len() as i64) < self.max_instances;
        if least.is_none() || (starting < MAX_STARTING && under_limit) {
            let remote = inner.create_stateless(&pool.options, stateless_hook(inner))?;
            let instance = Arc::new(PooledInstance {
                remote,
                started: Instant::now(),
                last_used: Mutex::new(Instant::now()),
            });
            pool.instances.push(instance.clone());
            return Ok(instance);
        }
        least.ok_or_else(|| Error::new(ErrorCode::InnerSystemError, "no stateless instance to use"))
    }

    /// Release instances idle for longer than the recycle time. Returns their ids.
    pub fn recycle_idle(&self) -> Vec<String> {
        let mut released = Vec::new();
        let mut pools = self.pools.lock();
        for pool in pools.values_mut() {
            pool.instances.retain(|instance| {
                let idle = instance.remote.load() == 0
                    && instance.remote.is_open()
                    && instance.last_used.lock().elapsed() >= self.recycle_time
                    && instance.started.elapsed() >= self.recycle_time;
                if idle {
                    instance.remote.mark_terminating();
                    released.push(instance.remote.id.clone());
                }
                !idle
            });
        }
        released
    }
}

/// Retries a failed stateless call on another attempt, or lets its result through.
fn stateless_hook(inner: &Arc<Inner>) -> ResultHook {
    let inner: Weak<Inner> = Arc::downgrade(inner);
    Arc::new(move |call: &OutCall, result: &pb::CallResult| {
        let Some(inner) = inner.upgrade() else {
            return false;
        };
        let Some(task) = inner.stateless.tasks.lock().remove(&call.call_id) else {
            return false;
        };
        let Some(error) = &result.error else {
            return false;
        };
        if task.cancelled.load(std::sync::atomic::Ordering::Acquire) {
            return false;
        }
        let error = super::convert::error_from_proto(error);
        if !task.budget.lock().should_retry(&error) {
            return false;
        }
        tracing::debug!(function = task.function.name, %error, "retrying a stateless call");
        match StatelessSubmitter::dispatch(&inner, task.clone()) {
            Ok(()) => true,
            Err(_) => false,
        }
    })
}

struct TaskCanceller {
    task: Weak<Task>,
}

impl Canceller for TaskCanceller {
    fn cancel(&self, _force: bool) {
        let Some(task) = self.task.upgrade() else {
            return;
        };
        task.cancelled
            .store(true, std::sync::atomic::Ordering::Release);
        let error = Error::new(
            ErrorCode::ScheduleCanceled,
            format!(
                "the call to {} was cancelled by yr::cancel and has no value",
                task.function.name
            ),
        );
        for handle in &task.returns {
            handle.fail(error.clone());
        }
    }
}
