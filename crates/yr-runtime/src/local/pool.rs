//! A bounded thread pool that grows past its bound only while its threads block in yr waits
//! (`get`, `wait`), so that tasks which call other tasks cannot deadlock it. Threads started to
//! compensate for a blocked one exit after a spell of idleness.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use yr_common::{Error, ErrorCode, Result};

use crate::blocking::{self, BlockingObserver};

/// A unit of work.
pub type Job = Box<dyn FnOnce() + Send>;

/// Threads beyond this many are never started, blocked or not.
const HARD_THREAD_LIMIT: usize = 4096;
/// How long a compensating thread waits for work before it exits.
const EXTRA_THREAD_IDLE: Duration = Duration::from_secs(10);

struct Shared {
    name: String,
    jobs: Receiver<Job>,
    core_threads: usize,
    threads: AtomicUsize,
    idle: AtomicUsize,
    closed: AtomicBool,
}

/// A cloneable handle to the pool.
#[derive(Clone)]
pub struct Pool {
    sender: Sender<Job>,
    shared: Arc<Shared>,
}

impl Pool {
    /// A pool named `name` with `size` threads.
    pub fn new(name: &str, size: usize) -> Pool {
        let (sender, jobs) = crossbeam_channel::unbounded();
        let pool = Pool {
            sender,
            shared: Arc::new(Shared {
                name: name.to_string(),
                jobs,
                core_threads: size.max(1),
                threads: AtomicUsize::new(0),
                idle: AtomicUsize::new(0),
                closed: AtomicBool::new(false),
            }),
        };
        for _ in 0..pool.shared.core_threads {
            pool.spawn_thread(true);
        }
        pool
    }

    /// Queue `job`. Fails with 9000 once the pool is shut down.
    pub fn execute(&self, job: Job) -> Result<()> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(finalized());
        }
        self.sender.send(job).map_err(|_| finalized())
    }

    /// Stop the threads once they finish their current job; queued jobs are dropped.
    pub fn shutdown(&self) {
        self.shared.closed.store(true, Ordering::Release);
        while self.shared.jobs.try_recv().is_ok() {}
        for _ in 0..self.shared.threads.load(Ordering::Acquire) {
            let _ = self.sender.send(Box::new(|| {}));
        }
    }

    fn spawn_thread(&self, core: bool) {
        let count = self.shared.threads.fetch_add(1, Ordering::AcqRel);
        if count >= HARD_THREAD_LIMIT {
            self.shared.threads.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        let pool = self.clone();
        let name = format!("{}-{}", self.shared.name, count);
        let spawned = std::thread::Builder::new()
            .name(name)
            .spawn(move || pool.work(core));
        if let Err(e) = spawned {
            self.shared.threads.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(error = %e, pool = %self.shared.name, "could not start a pool thread");
        }
    }

    fn work(self, core: bool) {
        blocking::set_observer(Arc::new(self.clone()));
        let shared = &self.shared;
        loop {
            shared.idle.fetch_add(1, Ordering::AcqRel);
            let next = if core {
                shared
                    .jobs
                    .recv()
                    .map_err(|_| RecvTimeoutError::Disconnected)
            } else {
                shared.jobs.recv_timeout(EXTRA_THREAD_IDLE)
            };
            shared.idle.fetch_sub(1, Ordering::AcqRel);
            match next {
                Ok(job) => {
                    if shared.closed.load(Ordering::Acquire) {
                        break;
                    }
                    job();
                }
                Err(RecvTimeoutError::Timeout) => {
                    if shared.threads.load(Ordering::Acquire) > shared.core_threads {
                        break;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        shared.threads.fetch_sub(1, Ordering::AcqRel);
    }
}

impl BlockingObserver for Pool {
    fn enter(&self) {
        if self.shared.idle.load(Ordering::Acquire) == 0
            && !self.shared.closed.load(Ordering::Acquire)
        {
            self.spawn_thread(false);
        }
    }

    fn exit(&self) {}
}

fn finalized() -> Error {
    Error::new(
        ErrorCode::Finalized,
        "yr has been finalized; call yr::init again before submitting work",
    )
}
