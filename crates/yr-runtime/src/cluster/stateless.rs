//! Stateless calls in a cluster (openYuanrong's task submitter). Calls of one resource shape
//! and binary (this process's own, or another executable's for calls across languages) share a
//! pool of stateless instances. A call waits for its arguments, then goes to the
//! least-loaded running instance with room; when none has room it waits in the pool's queue,
//! and the pool starts a few more instances at a time. A running instance may also take a few
//! calls beyond its `concurrency` (a short pipeline, which hides the round trip) once the pool
//! cannot grow. Instances idle for `recycle_time` are released; while the node says creates
//! wait for resources (`ResourcePressure`), an instance is released as soon as it is idle and
//! its pool has nothing queued, so that one caller's idle instances do not hold the CPU another
//! caller waits for. Failed calls are retried per the code's retry policy. A cancelled call
//! that was sent is cancelled in its runtime too (its children with `recursive`), and a
//! descendant of a recursive, forced cancel that runs alone on its instance ends that instance
//! (design 017).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use yr_common::clock::{self, Clock};
use yr_common::{Error, ErrorCode, InvokeOptions};
use yr_proto::v1 as pb;

use super::convert::{finish_returns_with, has_remote_values};
use super::executables::Binary;
use super::remote_instance::{InstanceObserver, OutCall, RemoteInstance};
use super::Inner;
use crate::function::{Arg, FunctionEntry, TaskSpec};
use crate::object_store::{Cancel, Canceller, ObjectHandle, ObjectSlot, Outcome, StoredValue};
use crate::remote_value::{Lineage, LineageBudget, Recovery, LINEAGE_FULL};
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

/// The instances of one resource shape and binary, and the calls waiting for one of them.
struct Pool {
    options: Arc<InvokeOptions>,
    /// What its instances run.
    binary: Arc<Binary>,
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
    /// What runs it.
    binary: Arc<Binary>,
    returns: Vec<ObjectHandle>,
    budget: Mutex<RetryBudget>,
    /// Set by `yr::cancel`: the results are failed and the call is not retried.
    cancelled: AtomicBool,
    /// Where it was last sent, while it may still run there.
    sent: Mutex<Option<Sent>>,
    /// For the kill of the instance that runs it, when a cancel ends it.
    inner: Weak<Inner>,
    /// How many times its results may still be recomputed when lost with their node.
    recomputes_left: u32,
}

/// Where a call was sent.
struct Sent {
    instance: Weak<RemoteInstance>,
    call_id: u64,
    /// The instance takes one call at a time (`concurrency` 1): ending it ends only this call
    /// (and calls queued behind it, which are retried elsewhere).
    alone: bool,
}

impl Task {
    fn fail(&self, error: &Error) {
        for handle in &self.returns {
            handle.fail(error.clone());
        }
    }
}

impl Canceller for Task {
    /// Fail the results with 1017 and retry no more. A call that was sent is cancelled in its
    /// runtime too: dropped there if it has not started, its children cancelled with
    /// `recursive`. A running descendant of a forced recursive cancel that runs alone on its
    /// instance is stopped by ending that instance: its node ends the runtime process and the
    /// instances it created.
    fn cancel(&self, how: Cancel) {
        self.cancelled.store(true, Ordering::Release);
        let error = Error::new(
            ErrorCode::ScheduleCanceled,
            format!(
                "the call to {} was cancelled by yr::cancel and has no value",
                self.function.name
            ),
        );
        self.fail(&error);
        let Some(sent) = self.sent.lock().take() else {
            return;
        };
        let inner = self.inner.upgrade();
        if let Some(inner) = &inner {
            // Its result, if it comes, is not retried and finishes nothing.
            inner.stateless.tasks.lock().remove(&sent.call_id);
        }
        let Some(instance) = sent.instance.upgrade() else {
            return;
        };
        instance.cancel_call(sent.call_id, how);
        if how.descendant && how.force && sent.alone {
            if let Some(inner) = inner {
                tracing::debug!(instance = %instance.id, function = self.function.name, "ending the instance of a cancelled call");
                instance.mark_terminating();
                inner.kill(&instance.id, false);
            }
        }
    }
}

/// A pool's key: its binary's content key and its shape.
type PoolKey = (String, String);

/// The options and binary of a call and the pool of their shape.
type LastPool = (Arc<InvokeOptions>, Arc<Binary>, Arc<Mutex<Pool>>);

/// The stateless pools of this process, by binary (its content key) and shape.
pub struct StatelessSubmitter {
    pools: Mutex<HashMap<PoolKey, Arc<Mutex<Pool>>>>,
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
    /// The node has creates waiting for resources: idle instances are released at once.
    pressure: AtomicBool,
    /// Rung when a pool gets an instance: the recycle loop sleeps on it while there is none,
    /// so a process without stateless instances does not wake up for them.
    instance_added: Arc<tokio::sync::Notify>,
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
            pressure: AtomicBool::new(false),
            instance_added: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Whether any pool has an instance.
    pub fn has_instances(&self) -> bool {
        self.pools
            .lock()
            .values()
            .any(|pool| !pool.lock().instances.is_empty())
    }

    /// Rung when a pool gets an instance (with a permit, so a ring before the wait counts).
    pub fn instance_added(&self) -> Arc<tokio::sync::Notify> {
        self.instance_added.clone()
    }

    /// Submit a stateless call that runs in `binary`. It goes to an instance once its
    /// arguments exist.
    pub(crate) fn submit(
        inner: &Arc<Inner>,
        spec: TaskSpec,
        binary: Arc<Binary>,
        returns: Vec<ObjectHandle>,
    ) -> Result<(), Error> {
        let recomputes_left = max_recomputes(&spec.options);
        Self::submit_task(
            inner,
            Task {
                function: spec.function,
                binary,
                budget: Mutex::new(RetryBudget::new(&spec.options)),
                args: Arc::new(spec.args),
                options: spec.options,
                returns,
                cancelled: AtomicBool::new(false),
                sent: Mutex::new(None),
                inner: Arc::downgrade(inner),
                recomputes_left,
            },
        );
        Ok(())
    }

    fn submit_task(inner: &Arc<Inner>, task: Task) {
        let task = Arc::new(task);
        for handle in &task.returns {
            handle.set_canceller(Arc::new(TaskCanceller {
                task: Arc::downgrade(&task),
            }));
        }
        crate::children::record(task.clone());
        let weak = Arc::downgrade(inner);
        let args = task.args.clone();
        crate::dependencies::when_ready(&args, move || {
            if let Some(inner) = weak.upgrade() {
                Self::dispatch(&inner, task);
            }
        });
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
        let pool = inner.stateless.pool(&task.options, &task.binary);
        pool.lock().waiting.push_back(task);
        Self::pump(inner, &pool);
    }

    fn pool(&self, options: &Arc<InvokeOptions>, binary: &Arc<Binary>) -> Arc<Mutex<Pool>> {
        // Calls of one prepared function share their options, and calls one after another
        // mostly have equal ones (the defaults): skip the key then. Comparing is a few tens of
        // nanoseconds; the key formats every shape field, a few microseconds.
        if let Some((cached, cached_binary, pool)) = &*self.last_pool.lock() {
            if Arc::ptr_eq(cached_binary, binary)
                && (Arc::ptr_eq(cached, options) || **cached == **options)
            {
                return pool.clone();
            }
        }
        let pool = self
            .pools
            .lock()
            .entry((binary.hash.clone(), shape_key(options)))
            .or_insert_with(|| {
                Arc::new(Mutex::new(Pool {
                    options: options.clone(),
                    binary: binary.clone(),
                    concurrency: options.concurrency.max(1) as usize,
                    instances: Vec::new(),
                    requesting: 0,
                    waiting: VecDeque::new(),
                }))
            })
            .clone();
        *self.last_pool.lock() = Some((options.clone(), binary.clone(), pool.clone()));
        pool
    }

    /// Send waiting calls to instances with room and ask for instances the pool needs. Calls
    /// that fail are failed with no lock held, because failing a call may run other calls'
    /// dispatch.
    fn pump(inner: &Arc<Inner>, pool: &Arc<Mutex<Pool>>) {
        let submitter = &inner.stateless;
        loop {
            let (decisions, concurrency) = {
                let mut locked = pool.lock();
                let max_instances = pool_limit(submitter.max_instances, &locked.options);
                (locked.plan(max_instances), locked.concurrency)
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
                *task.sent.lock() = Some(Sent {
                    instance: Arc::downgrade(&instance.remote),
                    call_id,
                    alone: concurrency == 1,
                });
                if instance.remote.try_submit(call).is_err() {
                    // The instance went away in the meantime: the call waits for another.
                    submitter.tasks.lock().remove(&call_id);
                    *task.sent.lock() = None;
                    retry.push(task);
                } else if task.cancelled.load(Ordering::Acquire) {
                    // Cancelled while it was being sent: it is not run after all.
                    instance.remote.cancel_call(call_id, Cancel::default());
                }
            }
            if decisions.create {
                let (options, binary) = {
                    let locked = pool.lock();
                    (locked.options.clone(), locked.binary.clone())
                };
                let observer = Arc::new(PoolObserver {
                    inner: Arc::downgrade(inner),
                    pool: Arc::downgrade(pool),
                });
                let created = inner.create_stateless(&options, &binary, observer);
                let mut locked = pool.lock();
                locked.requesting -= 1;
                match created {
                    Ok(remote) => {
                        locked.instances.push(Arc::new(PooledInstance {
                            remote,
                            started: submitter.clock.now(),
                            last_used: Mutex::new(submitter.clock.now()),
                        }));
                        submitter.instance_added.notify_one();
                    }
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
        self.release_idle(self.recycle_time)
    }

    /// The node's scheduler has creates waiting for resources (`waiting`), or no longer has.
    /// While they wait, idle instances are released at once. Returns the instances released
    /// now.
    pub fn set_pressure(&self, waiting: bool) -> Vec<String> {
        self.pressure.store(waiting, Ordering::Release);
        if waiting {
            self.release_idle(Duration::ZERO)
        } else {
            Vec::new()
        }
    }

    /// Release the instances of every pool that have been idle for `min_idle` (and are as old),
    /// in pools with nothing queued. Returns their ids.
    fn release_idle(&self, min_idle: Duration) -> Vec<String> {
        let mut released = Vec::new();
        let pools: Vec<Arc<Mutex<Pool>>> = self.pools.lock().values().cloned().collect();
        for pool in pools {
            released.extend(self.release_idle_in(&mut pool.lock(), min_idle));
        }
        released
    }

    fn release_idle_in(&self, pool: &mut Pool, min_idle: Duration) -> Vec<String> {
        let mut released = Vec::new();
        if !pool.waiting.is_empty() {
            return released;
        }
        let now = self.clock.now();
        pool.instances.retain(|instance| {
            let idle = instance.remote.load() == 0
                && now.saturating_duration_since(*instance.last_used.lock()) >= min_idle
                && now.saturating_duration_since(instance.started) >= min_idle;
            if idle {
                instance.remote.mark_terminating();
                released.push(instance.remote.id.clone());
            }
            !idle
        });
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
            if !has_remote_values(result) {
                return false;
            }
            // Results another node keeps for this process: recomputed from the call should
            // that node lose them.
            let lineage = TaskLineage::of(&task);
            finish_returns_with(&call.returns, result.clone(), |index| match &lineage {
                Some(lineage) => Recovery::Recompute(lineage.clone(), index),
                None => Recovery::Not(LINEAGE_FULL),
            });
            return true;
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
            if inner.stateless.pressure.load(Ordering::Acquire) {
                // Creates wait on the node: an idle instance gives its resources back now.
                let released = inner
                    .stateless
                    .release_idle_in(&mut pool.lock(), Duration::ZERO);
                for id in released {
                    inner.kill(&id, false);
                }
            }
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

/// How many times a stateless call's lost results may be recomputed: its `retry_times` when
/// set, else 3 (Ray's default `max_retries` for tasks).
fn max_recomputes(options: &InvokeOptions) -> u32 {
    if options.retry_times > 0 {
        options.retry_times
    } else {
        DEFAULT_RECOMPUTES
    }
}

/// Recomputes of a stateless call's lost results when its options set no `retry_times`.
const DEFAULT_RECOMPUTES: u32 = 3;

/// How long a recompute waits for the call's new result.
const RECOMPUTE_WAIT: Duration = Duration::from_secs(300);

/// The lineage of a stateless call whose results another node keeps for this process (design
/// 026): what runs it again. It holds the call's arguments (and so the objects they refer to)
/// while any of those results lives here unread, within the owner's bound
/// ([`LineageBudget`]).
struct TaskLineage {
    function: FunctionEntry,
    args: Arc<Vec<Arg>>,
    options: Arc<InvokeOptions>,
    binary: Arc<Binary>,
    returns: usize,
    inner: Weak<Inner>,
    /// Recomputes left, shared by the results of the call and by those of its recomputes.
    recomputes_left: Mutex<u32>,
    _budget: LineageBudget,
}

impl TaskLineage {
    /// The lineage of `task`, if the owner's bound has room for it.
    fn of(task: &Task) -> Option<Arc<dyn Lineage>> {
        let inline_bytes = task
            .args
            .iter()
            .map(|arg| match arg {
                Arg::Value(value) => value.bytes.len(),
                Arg::Ref(_) => 0,
            })
            .sum();
        let budget = LineageBudget::take(inline_bytes)?;
        Some(Arc::new(TaskLineage {
            function: task.function,
            args: task.args.clone(),
            options: task.options.clone(),
            binary: task.binary.clone(),
            returns: task.returns.len(),
            inner: task.inner.clone(),
            recomputes_left: Mutex::new(task.recomputes_left),
            _budget: budget,
        }))
    }
}

impl Lineage for TaskLineage {
    /// Its arguments are brought here first (an argument lost with its node and recomputable
    /// is recomputed, recursively); then the call runs again through its pool, which places
    /// new instances on live nodes, and its result is brought here.
    fn recompute(&self, index: usize, lost: &Error) -> Result<Arc<StoredValue>, Error> {
        let function = self.function.name;
        let cannot = |why: String| {
            Error::new(
                ErrorCode::GetOperationFailed,
                format!(
                    "a result of {function} was lost with the node that held it ({}), and it                      cannot be recomputed: {why}",
                    lost.message()
                ),
            )
        };
        let left = {
            let mut left = self.recomputes_left.lock();
            if *left == 0 {
                return Err(cannot(format!(
                    "its {} recomputes are spent (the call's retry_times, or 3)",
                    max_recomputes(&self.options)
                )));
            }
            *left -= 1;
            *left
        };
        let Some(inner) = self.inner.upgrade() else {
            return Err(cannot("yr was finalized".to_string()));
        };
        for arg in self.args.iter() {
            if let Arg::Ref(handle) = arg {
                if let Some(Outcome::Failed(error)) = handle.outcome() {
                    return Err(cannot(format!(
                        "its argument {} is gone too: {}",
                        handle.id(),
                        error.message()
                    )));
                }
            }
        }
        tracing::info!(
            function,
            recomputes_left = left,
            "recomputing a lost result from its lineage"
        );
        let returns: Vec<ObjectHandle> = (0..self.returns).map(|_| ObjectSlot::pending()).collect();
        let Some(result) = returns.get(index).cloned() else {
            return Err(cannot(format!("it has no result number {index}")));
        };
        StatelessSubmitter::submit_task(
            &inner,
            Task {
                function: self.function,
                binary: self.binary.clone(),
                budget: Mutex::new(RetryBudget::new(&self.options)),
                args: self.args.clone(),
                options: self.options.clone(),
                returns,
                cancelled: AtomicBool::new(false),
                sent: Mutex::new(None),
                inner: self.inner.clone(),
                recomputes_left: left,
            },
        );
        match result.wait_until(Instant::now().checked_add(RECOMPUTE_WAIT)) {
            Some(Outcome::Ready(value)) => Ok(value),
            Some(Outcome::Failed(error)) => Err(error),
            None => Err(cannot(format!(
                "its new run gave no result within {RECOMPUTE_WAIT:?}"
            ))),
        }
    }
}

struct TaskCanceller {
    task: Weak<Task>,
}

impl Canceller for TaskCanceller {
    fn cancel(&self, how: Cancel) {
        if let Some(task) = self.task.upgrade() {
            task.cancel(how);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use yr_common::ManualClock;

    fn binary(hash: &str) -> Arc<Binary> {
        Arc::new(Binary {
            path: format!("/bin/{hash}"),
            hash: hash.to_string(),
            args: Vec::new(),
        })
    }

    #[test]
    fn equal_options_share_a_pool_and_other_shapes_do_not() {
        let submitter = StatelessSubmitter::new(Duration::from_secs(10), -1);
        let own = binary("own");
        let first = submitter.pool(&Arc::new(InvokeOptions::default()), &own);
        let equal = submitter.pool(&Arc::new(InvokeOptions::default()), &own);
        assert!(Arc::ptr_eq(&first, &equal));
        let bigger = submitter.pool(
            &Arc::new(InvokeOptions {
                cpu: 1000,
                ..Default::default()
            }),
            &own,
        );
        assert!(!Arc::ptr_eq(&first, &bigger));
        let retried = submitter.pool(
            &Arc::new(InvokeOptions {
                retry_times: 3,
                ..Default::default()
            }),
            &own,
        );
        assert!(
            Arc::ptr_eq(&first, &retried),
            "retries do not change the shape"
        );
    }

    #[test]
    fn calls_into_another_executable_have_pools_of_their_own() {
        let submitter = StatelessSubmitter::new(Duration::from_secs(10), -1);
        let options = Arc::new(InvokeOptions::default());
        let own = submitter.pool(&options, &binary("own"));
        let other = submitter.pool(&options, &binary("other"));
        assert!(!Arc::ptr_eq(&own, &other));
        assert_eq!(other.lock().binary.hash, "other");
        assert!(Arc::ptr_eq(&own, &submitter.pool(&options, &binary("own"))));
    }

    #[test]
    fn an_instance_is_released_once_idle_for_the_recycle_time() {
        let clock = ManualClock::new();
        let recycle_time = Duration::from_secs(10);
        let submitter = StatelessSubmitter::with_clock(recycle_time, -1, clock.clone());
        let io = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a tokio runtime");
        let remote = RemoteInstance::new("i-1".into(), io.handle().clone(), None);
        let pool = submitter.pool(&Arc::new(InvokeOptions::default()), &binary("own"));
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

    #[test]
    fn while_creates_wait_on_the_node_an_idle_instance_is_released_at_once() {
        let clock = ManualClock::new();
        let submitter = StatelessSubmitter::with_clock(Duration::from_secs(10), -1, clock.clone());
        let io = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a tokio runtime");
        let pool = submitter.pool(&Arc::new(InvokeOptions::default()), &binary("own"));
        for id in ["i-1", "i-2"] {
            pool.lock().instances.push(Arc::new(PooledInstance {
                remote: RemoteInstance::new(id.into(), io.handle().clone(), None),
                started: clock.now(),
                last_used: Mutex::new(clock.now()),
            }));
        }
        let mut released = submitter.set_pressure(true);
        released.sort();
        assert_eq!(released, vec!["i-1".to_string(), "i-2".to_string()]);
        assert!(pool.lock().instances.is_empty());
        // Without pressure, idle instances wait for the recycle time again.
        assert!(submitter.set_pressure(false).is_empty());
        pool.lock().instances.push(Arc::new(PooledInstance {
            remote: RemoteInstance::new("i-3".into(), io.handle().clone(), None),
            started: clock.now(),
            last_used: Mutex::new(clock.now()),
        }));
        assert!(submitter.recycle_idle().is_empty());
    }
}
