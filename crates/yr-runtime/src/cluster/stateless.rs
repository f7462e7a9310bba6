//! Stateless calls in a cluster (openYuanrong's task submitter). Calls of one resource shape
//! share a pool of stateless instances. A call waits for its arguments, then goes to the
//! least-loaded running instance with room; when none has room it waits in the pool's queue,
//! and the pool starts a few more instances at a time. A running instance may also take a few
//! calls beyond its `concurrency` (a short pipeline, which hides the round trip) once the pool
//! cannot grow. Instances idle for `recycle_time` are released. Failed calls are retried per
//! the code's retry policy.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use yr_common::clock::{self, Clock};
use yr_common::{Error, ErrorCode, InvokeOptions};
use yr_proto::v1 as pb;

use super::remote_instance::{InstanceObserver, OutCall, RemoteInstance};
use super::Inner;
use crate::function::{Arg, FunctionEntry, TaskSpec};
use crate::object_store::{Canceller, ObjectHandle};
use crate::retry::RetryBudget;
use crate::shape::shape_key;

/// Instances of one pool that may be starting at once.
const MAX_STARTING: usize = 2;

/// Calls a running instance may hold beyond its `concurrency` when the pool cannot grow.
const PIPELINE_DEPTH: usize = 8;

/// A function whose calls take less than this (a moving average of send to result) is short.
/// Calls are queued on an instance beyond its `concurrency` only behind short calls: behind a
/// long one they would wait while another instance may be free.
const SHORT_CALL: Duration = Duration::from_millis(10);

struct PooledInstance {
    remote: Arc<RemoteInstance>,
    started: Instant,
    last_used: Mutex<Instant>,
}

/// The instances of one resource shape and the calls waiting for one of them.
struct Pool {
    options: Arc<InvokeOptions>,
    concurrency: usize,
    instances: Vec<Arc<PooledInstance>>,
    /// Instances being asked for, not in `instances` yet.
    requesting: usize,
    /// Ready calls waiting for room, in the order they became ready.
    waiting: VecDeque<Arc<Task>>,
}

/// A stateless call and what it may still spend on retries.
struct Task {
    function: FunctionEntry,
    args: Arc<Vec<Arg>>,
    options: Arc<InvokeOptions>,
    returns: Vec<ObjectHandle>,
    budget: Mutex<RetryBudget>,
    /// Set by `yr::cancel`: the results are failed and the call is not retried.
    cancelled: AtomicBool,
}

impl Task {
    fn fail(&self, error: &Error) {
        for handle in &self.returns {
            handle.fail(error.clone());
        }
    }
}

/// The options of a call and the pool of their shape.
type LastPool = (Arc<InvokeOptions>, Arc<Mutex<Pool>>);

/// The stateless pools of this process.
pub struct StatelessSubmitter {
    pools: Mutex<HashMap<String, Arc<Mutex<Pool>>>>,
    /// The options of the last call and their pool.
    last_pool: Mutex<Option<LastPool>>,
    /// Calls in flight on an instance, by call id, for the retry decision.
    tasks: Mutex<HashMap<u64, Arc<Task>>>,
    /// A moving average of each function's time from send to result.
    call_times: Mutex<HashMap<&'static str, Duration>>,
    recycle_time: Duration,
    max_instances: i64,
    /// The clock idle times are measured on.
    clock: Arc<dyn Clock>,
    /// Set by `finalize`: calls that become ready are not sent any more.
    stopped: AtomicBool,
}

/// The most instances a pool may have: the process's limit (`Config::max_task_instance_num`,
/// -1 = none) and the calls' `max_instances` (0 = none), whichever is lower.
fn pool_limit(process_limit: i64, options: &InvokeOptions) -> i64 {
    match (process_limit, i64::from(options.max_instances)) {
        (limit, 0) => limit,
        (limit, max) if limit < 0 => max,
        (limit, max) => limit.min(max),
    }
}

/// What one pass over a pool decided, carried out with the pool unlocked.
#[derive(Default)]
struct Decisions {
    sends: Vec<(Arc<PooledInstance>, Arc<Task>)>,
    create: bool,
}

impl Pool {
    fn starting(&self) -> usize {
        self.requesting
            + self
                .instances
                .iter()
                .filter(|i| !i.remote.is_open())
                .count()
    }

    /// Hand waiting calls to instances with room, and decide how many instances to ask for.
    fn plan(&mut self, max_instances: i64) -> Decisions {
        let mut decisions = Decisions::default();
        self.instances.retain(|i| !i.remote.is_failed());
        // Each open instance with how many calls it may take in this pass.
        let mut loads: Vec<(usize, usize, Arc<PooledInstance>)> = self
            .instances
            .iter()
            .filter(|i| i.remote.is_open() && !i.remote.is_terminating())
            .map(|i| {
                let (load, pipelinable) = i.remote.load_and_pipelinable(SHORT_CALL);
                let extra = if pipelinable { PIPELINE_DEPTH } else { 0 };
                (load, extra, i.clone())
            })
            .collect();
        let total = self.instances.len() + self.requesting;
        let may_grow = max_instances < 0 || (total as i64) < max_instances;
        let can_start = may_grow && self.starting() < MAX_STARTING;
        while let Some(task) = self.waiting.front() {
            if task.cancelled.load(Ordering::Acquire) {
                self.waiting.pop_front();
                continue;
            }
            let pipelining = !(can_start || total == 0);
            let concurrency = self.concurrency;
            let Some(slot) = loads
                .iter_mut()
                .filter(|(load, extra, _)| {
                    *load < concurrency + if pipelining { *extra } else { 0 }
                })
                .min_by_key(|(load, _, _)| *load)
            else {
                break;
            };
            slot.0 += 1;
            let instance = slot.2.clone();
            if let Some(task) = self.waiting.pop_front() {
                decisions.sends.push((instance, task));
            }
        }
        if !self.waiting.is_empty() && (can_start || total == 0) {
            decisions.create = true;
            self.requesting += 1;
        }
        decisions
    }

    /// The last instance of a pool with waiting calls is gone with `error`: each waiting call
    /// is retried if its budget allows, or fails with the error.
    fn fail_waiting(&mut self, error: &Error) -> Vec<(Arc<Task>, Error)> {
        let alive = self.requesting
            + self
                .instances
                .iter()
                .filter(|i| !i.remote.is_failed())
                .count();
        // Every instance of a pool has its shape: one that fits no node (1006) means none
        // will, so the calls fail now rather than wait for the other creates to fail too.
        let hopeless = error.code() == ErrorCode::ResourceConfigError;
        if alive > 0 && !hopeless {
            return Vec::new();
        }
        let mut failures = Vec::new();
        self.waiting.retain(|task| {
            if task.budget.lock().should_retry(error) {
                return true;
            }
            failures.push((task.clone(), error.clone()));
            false
        });
        failures
    }
}

impl StatelessSubmitter {
    /// Pools that release instances idle for `recycle_time`, with at most `max_instances` per
    /// pool (-1: no limit).
    pub fn new(recycle_time: Duration, max_instances: i64) -> StatelessSubmitter {
        Self::with_clock(recycle_time, max_instances, clock::system())
    }

    /// [`StatelessSubmitter::new`], measuring idle times on `clock`.
    pub fn with_clock(
        recycle_time: Duration,
        max_instances: i64,
        clock: Arc<dyn Clock>,
    ) -> StatelessSubmitter {
        StatelessSubmitter {
            pools: Mutex::new(HashMap::new()),
            last_pool: Mutex::new(None),
            tasks: Mutex::new(HashMap::new()),
            call_times: Mutex::new(HashMap::new()),
            recycle_time,
            max_instances,
            clock,
            stopped: AtomicBool::new(false),
        }
    }

    /// Submit a stateless call. It goes to an instance once its arguments exist.
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
            cancelled: AtomicBool::new(false),
        });
        for handle in &task.returns {
            handle.set_canceller(Arc::new(TaskCanceller {
                task: Arc::downgrade(&task),
            }));
        }
        let weak = Arc::downgrade(inner);
        let args = task.args.clone();
        crate::dependencies::when_ready(&args, move || {
            if let Some(inner) = weak.upgrade() {
                Self::dispatch(&inner, task);
            }
        });
        Ok(())
    }

    /// Send no more calls (`finalize`); what has not been sent is failed by `finalize`.
    pub fn stop_sending(&self) {
        self.stopped.store(true, Ordering::Release);
    }

    /// Queue a ready call on its pool and let the pool place what it can.
    fn dispatch(inner: &Arc<Inner>, task: Arc<Task>) {
        if task.cancelled.load(Ordering::Acquire) || inner.stateless.stopped.load(Ordering::Acquire)
        {
            return;
        }
        let pool = inner.stateless.pool(&task.options);
        pool.lock().waiting.push_back(task);
        Self::pump(inner, &pool);
    }

    fn pool(&self, options: &Arc<InvokeOptions>) -> Arc<Mutex<Pool>> {
        // Calls of one prepared function share their options: skip the key then.
        if let Some((cached, pool)) = &*self.last_pool.lock() {
            if Arc::ptr_eq(cached, options) {
                return pool.clone();
            }
        }
        let pool = self
            .pools
            .lock()
            .entry(shape_key(options))
            .or_insert_with(|| {
                Arc::new(Mutex::new(Pool {
                    options: options.clone(),
                    concurrency: options.concurrency.max(1) as usize,
                    instances: Vec::new(),
                    requesting: 0,
                    waiting: VecDeque::new(),
                }))
            })
            .clone();
        *self.last_pool.lock() = Some((options.clone(), pool.clone()));
        pool
    }

    /// Send waiting calls to instances with room and ask for instances the pool needs. Calls
    /// that fail are failed with no lock held, because failing a call may run other calls'
    /// dispatch.
    fn pump(inner: &Arc<Inner>, pool: &Arc<Mutex<Pool>>) {
        let submitter = &inner.stateless;
        loop {
            let decisions = {
                let mut locked = pool.lock();
                let max_instances = pool_limit(submitter.max_instances, &locked.options);
                locked.plan(max_instances)
            };
            let mut failures = Vec::new();
            let mut retry = Vec::new();
            for (instance, task) in decisions.sends {
                let mut call = OutCall::with_shared_args(
                    pb::CallKind::Function,
                    task.function.name,
                    task.args.clone(),
                    task.returns.clone(),
                );
                let call_id = call.call_id;
                call.expected_short = submitter
                    .call_times
                    .lock()
                    .get(call.function)
                    .is_some_and(|time| *time < SHORT_CALL);
                submitter.tasks.lock().insert(call_id, task.clone());
                *instance.last_used.lock() = submitter.clock.now();
                if instance.remote.try_submit(call).is_err() {
                    // The instance went away in the meantime: the call waits for another.
                    submitter.tasks.lock().remove(&call_id);
                    retry.push(task);
                }
            }
            if decisions.create {
                let options = pool.lock().options.clone();
                let observer = Arc::new(PoolObserver {
                    inner: Arc::downgrade(inner),
                    pool: Arc::downgrade(pool),
                });
                let created = inner.create_stateless(&options, observer);
                let mut locked = pool.lock();
                locked.requesting -= 1;
                match created {
                    Ok(remote) => locked.instances.push(Arc::new(PooledInstance {
                        remote,
                        started: submitter.clock.now(),
                        last_used: Mutex::new(submitter.clock.now()),
                    })),
                    Err(error) => failures.extend(locked.fail_waiting(&error)),
                }
            }
            for (task, error) in failures {
                task.fail(&error);
            }
            if retry.is_empty() {
                return;
            }
            let mut locked = pool.lock();
            for task in retry.into_iter().rev() {
                locked.waiting.push_front(task);
            }
        }
    }

    /// Release instances idle for longer than the recycle time, and instances still waiting
    /// for resources when their pool has no more calls. Returns their ids.
    pub fn recycle_idle(&self) -> Vec<String> {
        let mut released = Vec::new();
        let pools: Vec<Arc<Mutex<Pool>>> = self.pools.lock().values().cloned().collect();
        for pool in pools {
            let mut pool = pool.lock();
            let nothing_waits = pool.waiting.is_empty();
            let now = self.clock.now();
            pool.instances.retain(|instance| {
                let idle = instance.remote.load() == 0
                    && nothing_waits
                    && now.saturating_duration_since(*instance.last_used.lock())
                        >= self.recycle_time
                    && now.saturating_duration_since(instance.started) >= self.recycle_time;
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

/// Tells a pool what happens to one of its instances.
struct PoolObserver {
    inner: Weak<Inner>,
    pool: Weak<Mutex<Pool>>,
}

impl InstanceObserver for PoolObserver {
    /// Retries a failed call per its budget (back through the pool), or lets its result
    /// through.
    fn on_result(&self, call: &OutCall, result: &pb::CallResult) -> bool {
        let Some(inner) = self.inner.upgrade() else {
            return false;
        };
        let Some(task) = inner.stateless.tasks.lock().remove(&call.call_id) else {
            return false;
        };
        if let Some(took) = call.sent_ago() {
            let mut call_times = inner.stateless.call_times.lock();
            let average = call_times.entry(call.function).or_insert(took);
            *average = (*average * 3 + took) / 4;
        }
        let Some(error) = &result.error else {
            return false;
        };
        if task.cancelled.load(Ordering::Acquire) {
            return false;
        }
        let error = yr_proto::error_from_proto(error);
        if !task.budget.lock().should_retry(&error) {
            return false;
        }
        tracing::debug!(function = task.function.name, %error, "retrying a stateless call");
        StatelessSubmitter::dispatch(&inner, task);
        true
    }

    fn on_ready(&self) {
        let (Some(inner), Some(pool)) = (self.inner.upgrade(), self.pool.upgrade()) else {
            return;
        };
        if pool.lock().waiting.is_empty() {
            return;
        }
        StatelessSubmitter::pump(&inner, &pool);
    }

    fn on_gone(&self, error: &Error) {
        let (Some(inner), Some(pool)) = (self.inner.upgrade(), self.pool.upgrade()) else {
            return;
        };
        let failures = {
            let mut locked = pool.lock();
            locked.instances.retain(|i| !i.remote.is_failed());
            locked.fail_waiting(error)
        };
        for (task, error) in failures {
            task.fail(&error);
        }
        StatelessSubmitter::pump(&inner, &pool);
    }
}

struct TaskCanceller {
    task: Weak<Task>,
}

impl Canceller for TaskCanceller {
    fn cancel(&self, _force: bool) {
        let Some(task) = self.task.upgrade() else {
            return;
        };
        task.cancelled.store(true, Ordering::Release);
        let error = Error::new(
            ErrorCode::ScheduleCanceled,
            format!(
                "the call to {} was cancelled by yr::cancel and has no value",
                task.function.name
            ),
        );
        task.fail(&error);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use yr_common::ManualClock;

    #[test]
    fn an_instance_is_released_once_idle_for_the_recycle_time() {
        let clock = ManualClock::new();
        let recycle_time = Duration::from_secs(10);
        let submitter = StatelessSubmitter::with_clock(recycle_time, -1, clock.clone());
        let io = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a tokio runtime");
        let remote = RemoteInstance::new("i-1".into(), io.handle().clone(), None);
        let pool = submitter.pool(&Arc::new(InvokeOptions::default()));
        let pooled = Arc::new(PooledInstance {
            remote: remote.clone(),
            started: clock.now(),
            last_used: Mutex::new(clock.now()),
        });
        pool.lock().instances.push(pooled.clone());
        let just_short = recycle_time - Duration::from_millis(1);

        clock.advance(just_short);
        assert!(submitter.recycle_idle().is_empty(), "not idle long enough");
        // A call now restarts the idle time.
        *pooled.last_used.lock() = clock.now();
        clock.advance(just_short);
        assert!(submitter.recycle_idle().is_empty(), "used a moment ago");
        clock.advance(Duration::from_millis(1));
        assert_eq!(submitter.recycle_idle(), vec!["i-1".to_string()]);
        assert!(remote.is_terminating());
        assert!(pool.lock().instances.is_empty());
    }
}
