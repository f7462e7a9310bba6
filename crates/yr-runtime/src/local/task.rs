//! Stateless calls in local mode: wait for dependencies, run on the pool, retry as the options
//! allow, and honour `cancel`.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use yr_common::{Error, ErrorCode};

use super::pool::Pool;
use crate::dependencies;
use crate::function::TaskSpec;
use crate::object_store::{Canceller, ObjectHandle};
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
}

impl LocalTask {
    /// Submit `spec`: it runs on `pool` once its dependencies are finished.
    pub fn submit(pool: &Pool, spec: TaskSpec, returns: Vec<ObjectHandle>) {
        let budget = RetryBudget::new(&spec.options);
        let task = Arc::new(LocalTask {
            spec,
            returns,
            state: AtomicU8::new(QUEUED),
            budget: Mutex::new(budget),
            pool: pool.clone(),
        });
        for handle in &task.returns {
            handle.set_canceller(task.clone());
        }
        let ready = task.clone();
        dependencies::when_ready(&task.spec.args, move || ready.enqueue());
    }

    fn enqueue(self: Arc<Self>) {
        let pool = self.pool.clone();
        let task = self.clone();
        if let Err(error) = pool.execute(Box::new(move || task.run())) {
            self.fail(error);
        }
    }

    fn run(self: Arc<Self>) {
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
        let result = user_code::run(function.name, || (function.call)(&self.spec.args));
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

impl Canceller for LocalTask {
    fn cancel(&self, force: bool) {
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
        } else if force && self.state.load(Ordering::Acquire) == RUNNING {
            // A local thread cannot be killed: the call's result is discarded instead.
            for handle in &self.returns {
                handle.fail(cancelled());
            }
        }
    }
}
