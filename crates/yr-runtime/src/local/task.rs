//! Stateless calls in local mode: wait for dependencies, run on the pool, retry as the options
//! allow, and honour `cancel` (with `recursive`, also of the calls each one submitted). Calls of one shape with `max_instances` run at most
//! `max_instances × concurrency` at once, the calls a cluster's pool of that many instances
//! would run.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use yr_common::{Error, ErrorCode};

use super::pool::Pool;
use crate::children::{self, Children};
use crate::dependencies;
use crate::function::TaskSpec;
use crate::object_store::{Cancel, Canceller, ObjectHandle};
use crate::retry::RetryBudget;
use crate::user_code;

const QUEUED: u8 = 0;
const RUNNING: u8 = 1;
const DONE: u8 = 2;

/// One stateless call and its results.
pub struct LocalTask {
    spec: TaskSpec,
    returns: Vec<ObjectHandle>,
    state: AtomicU8,
    budget: Mutex<RetryBudget>,
    pool: Pool,
    /// The bound of its shape, when its options set `max_instances`.
    limit: Option<Arc<Mutex<Limit>>>,
    /// The stateless calls it submitted while it ran.
    children: Arc<Children>,
}

/// The calls of one shape that run, and those waiting for one of them to finish.
struct Limit {
    most: usize,
    running: usize,
    waiting: VecDeque<Arc<LocalTask>>,
}

/// The bound of calls of `spec`'s shape, if its options set `max_instances`.
fn limit_of(spec: &TaskSpec) -> Option<Arc<Mutex<Limit>>> {
    static LIMITS: OnceLock<Mutex<HashMap<String, Arc<Mutex<Limit>>>>> = OnceLock::new();
    let options = &spec.options;
    if options.max_instances == 0 {
        return None;
    }
    let most = options.max_instances as usize * options.concurrency.max(1) as usize;
    let limits = LIMITS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut limits = limits.lock();
    // Bounds nobody uses any more are dropped as others come.
    limits.retain(|_, limit| Arc::strong_count(limit) > 1);
    Some(
        limits
            .entry(crate::shape::shape_key(options))
            .or_insert_with(|| {
                Arc::new(Mutex::new(Limit {
                    most,
                    running: 0,
                    waiting: VecDeque::new(),
                }))
            })
            .clone(),
    )
}

impl LocalTask {
    /// Submit `spec`: it runs on `pool` once its dependencies are finished. It is a child of
    /// the call this thread runs, if any.
    pub fn submit(pool: &Pool, spec: TaskSpec, returns: Vec<ObjectHandle>) -> Arc<LocalTask> {
        let budget = RetryBudget::new(&spec.options);
        let task = Arc::new(LocalTask {
            returns,
            state: AtomicU8::new(QUEUED),
            limit: limit_of(&spec),
            budget: Mutex::new(budget),
            pool: pool.clone(),
            children: Children::new(),
            spec,
        });
        for handle in &task.returns {
            handle.set_canceller(task.clone());
        }
        children::record(task.clone());
        let ready = task.clone();
        dependencies::when_ready(&task.spec.args, move || ready.enqueue());
        task
    }

    /// Run it on the pool, once its shape's bound lets it.
    fn enqueue(self: Arc<Self>) {
        if let Some(limit) = &self.limit {
            let mut limit = limit.lock();
            if limit.running >= limit.most {
                limit.waiting.push_back(self.clone());
                return;
            }
            limit.running += 1;
        }
        self.execute();
    }

    fn execute(self: Arc<Self>) {
        let pool = self.pool.clone();
        let task = self.clone();
        if let Err(error) = pool.execute(Box::new(move || task.run())) {
            self.fail(error);
            self.finished_running();
        }
    }

    /// This call no longer runs: the next call of its shape may.
    fn finished_running(&self) {
        let Some(limit) = &self.limit else { return };
        let next = {
            let mut limit = limit.lock();
            let next = limit.waiting.pop_front();
            if next.is_none() {
                limit.running -= 1;
            }
            next
        };
        if let Some(next) = next {
            next.execute();
        }
    }

    fn run(self: Arc<Self>) {
        let task = self.clone();
        task.run_once();
        self.finished_running();
    }

    fn run_once(self: Arc<Self>) {
        if self
            .state
            .compare_exchange(QUEUED, RUNNING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        if let Err(error) = dependencies::first_failure(&self.spec.args) {
            self.fail(error);
            return;
        }
        let function = self.spec.function;
        let result = self
            .children
            .run_as_parent(|| user_code::run(function.name, || (function.call)(&self.spec.args)));
        match result {
            Ok(values) => {
                if values.len() != self.returns.len() {
                    self.fail(Error::new(
                        ErrorCode::UserFunctionException,
                        format!(
                            "function {} returned {} values but return_nums is {}",
                            function.name,
                            values.len(),
                            self.returns.len()
                        ),
                    ));
                    return;
                }
                self.state.store(DONE, Ordering::Release);
                for (handle, value) in self.returns.iter().zip(values.into_vec()) {
                    handle.complete(Arc::new(value));
                }
            }
            Err(error) => {
                if self.budget.lock().should_retry(&error)
                    && self
                        .state
                        .compare_exchange(RUNNING, QUEUED, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                {
                    tracing::debug!(function = function.name, %error, "retrying a failed call");
                    self.enqueue();
                } else {
                    self.fail(error);
                }
            }
        }
    }

    fn fail(&self, error: Error) {
        self.state.store(DONE, Ordering::Release);
        for handle in &self.returns {
            handle.fail(error.clone());
        }
    }
}

impl LocalTask {
    /// A cancel that this call's caller sent to the runtime running it: the caller has failed
    /// the results already. A queued call is dropped; a running one keeps running and answers
    /// when it ends (so that its caller counts the instance busy until then); with `how`'s
    /// `recursive`, its children are cancelled as `how` says.
    pub fn cancel_for_caller(&self, how: Cancel) {
        self.cancel(Cancel::default());
        if how.recursive {
            self.children.cancel(how);
        }
    }
}

impl Canceller for LocalTask {
    fn cancel(&self, how: Cancel) {
        let cancelled = || {
            Error::new(
                ErrorCode::ScheduleCanceled,
                format!(
                    "the call to {} (request {}) was cancelled by yr::cancel and has no value",
                    self.spec.function.name,
                    self.returns
                        .first()
                        .map(|h| h.id().to_string())
                        .unwrap_or_default()
                ),
            )
        };
        if self
            .state
            .compare_exchange(QUEUED, DONE, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            for handle in &self.returns {
                handle.fail(cancelled());
            }
        } else if how.force && self.state.load(Ordering::Acquire) == RUNNING {
            // A local thread cannot be killed: the call's result is discarded instead.
            for handle in &self.returns {
                handle.fail(cancelled());
            }
        }
        // After its own results: a call whose child fails may finish at once, and the cancel
        // must be what its results say.
        if how.recursive {
            self.children.cancel(how);
        }
    }
}
