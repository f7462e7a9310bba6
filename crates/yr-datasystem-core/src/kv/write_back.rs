//! Write-back to the second-level store: the queue of [`Job`]s a background writer runs after
//! `WriteBackL2Cache` writes (and deletes of stale second-level copies), retried a few times and
//! skipped when the entry has changed since; a bounded queue that writers wait for room in;
//! [`KvStore::flush`]; and draining the queue when the store is dropped.

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use yr_common::{Error, ErrorCode, Result};

use super::map::L2State;
use super::{Handle, KvStore, Shared};

/// Write-backs waiting for the second-level store; a writer waits for room beyond this.
const WRITE_BACK_QUEUE: usize = 10_000;
/// How long a writer waits for room in a full write-back queue.
const WRITE_BACK_ROOM_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts of one write-back before it is given up (and logged).
const WRITE_BACK_ATTEMPTS: u32 = 3;
/// How long dropping the store waits for queued write-backs.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Work for the background writer.
pub(super) enum Job {
    Put {
        key: String,
        version: u64,
        value: Bytes,
        expires_at: Option<SystemTime>,
    },
    Delete {
        key: String,
        version: u64,
    },
}

impl Shared {
    pub(super) fn finish_job(&self) {
        let mut queued = self.queued.lock();
        *queued = queued.saturating_sub(1);
        self.queue_changed.notify_all();
    }

    /// Run one write-back job: only if the entry it was queued for is still current.
    pub(super) fn run_job(&self, job: Job) {
        let Some(l2) = &self.l2 else { return };
        let (key, version) = match &job {
            Job::Put { key, version, .. } | Job::Delete { key, version } => (key, *version),
        };
        for attempt in 0..WRITE_BACK_ATTEMPTS {
            let result = {
                let _lock = self.write_lock(key);
                let current = self
                    .map
                    .lock()
                    .entries
                    .get(key.as_str())
                    .is_some_and(|e| e.version == version);
                if !current {
                    return;
                }
                let result = match &job {
                    Job::Put {
                        value, expires_at, ..
                    } => {
                        if expires_at.is_some_and(|t| t <= SystemTime::now()) {
                            return;
                        }
                        l2.put(key, value, *expires_at)
                    }
                    Job::Delete { .. } => l2.delete(key),
                };
                if result.is_ok() {
                    if let Job::Put { .. } = job {
                        if let Some(entry) = self.map.lock().entries.get_mut(key.as_str()) {
                            if entry.version == version {
                                entry.l2 = L2State::Stored;
                            }
                        }
                    }
                }
                result
            };
            match result {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(key = %key, attempt, %error, "KV write-back to {} failed", l2.describe());
                    std::thread::sleep(Duration::from_millis(100 << attempt));
                }
            }
        }
        tracing::error!(key = %key, "KV write-back to {} gave up after {WRITE_BACK_ATTEMPTS} attempts", l2.describe());
    }
}

impl KvStore {
    pub(super) fn enqueue(&self, job: Job) -> Result<()> {
        let sender = self.handle.jobs.lock().clone();
        let Some(sender) = sender else {
            return Ok(());
        };
        *self.shared().queued.lock() += 1;
        if sender.send(job).is_err() {
            self.shared().finish_job();
        }
        Ok(())
    }

    pub(super) fn wait_for_queue_room(&self, key: &str) -> Result<()> {
        let shared = self.shared();
        let deadline = Instant::now() + WRITE_BACK_ROOM_TIMEOUT;
        let mut queued = shared.queued.lock();
        while *queued >= WRITE_BACK_QUEUE {
            if shared
                .queue_changed
                .wait_until(&mut queued, deadline)
                .timed_out()
            {
                return Err(Error::new(
                    ErrorCode::DatasystemFailed,
                    format!(
                        "the KV write-back queue stayed full ({WRITE_BACK_QUEUE} writes) for \
                         {WRITE_BACK_ROOM_TIMEOUT:?}, so key {key:?} was not written; the \
                         second-level store is too slow or failing: check it, or write with \
                         WriteThroughL2Cache"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Wait up to `timeout` until every queued write-back has reached the second-level store
    /// (or was given up). Returns whether the queue drained.
    pub fn flush(&self, timeout: Duration) -> bool {
        let shared = self.shared();
        let deadline = Instant::now() + timeout;
        let mut queued = shared.queued.lock();
        while *queued > 0 {
            if shared
                .queue_changed
                .wait_until(&mut queued, deadline)
                .timed_out()
            {
                return *queued == 0;
            }
        }
        true
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // Close the queue; the writer finishes what is queued, within a bound.
        drop(self.jobs.lock().take());
        if let Some(writer) = self.writer.lock().take() {
            let deadline = Instant::now() + DRAIN_TIMEOUT;
            while !writer.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if writer.is_finished() {
                let _ = writer.join();
            } else {
                tracing::warn!(
                    "KV write-backs were still queued after {DRAIN_TIMEOUT:?}; they may be lost"
                );
            }
        }
    }
}
