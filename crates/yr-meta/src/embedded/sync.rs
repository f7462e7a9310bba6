//! Group commit: calls run under the state's lock and then wait until every record appended so
//! far is durable; the sync thread `fdatasync`s the log once for all waiting records,
//! publishes their events, and compacts the log when it grows too long.

use std::sync::Arc;

use parking_lot::MutexGuard;

use crate::error::MetaError;

use super::recovery::compact;
use super::state::State;
use super::Inner;

impl Inner {
    /// Runs `f` on the state under the lock, then waits until every record appended so far is
    /// durable. Reads and writes both go through here, so nobody sees a write a crash could
    /// take back.
    pub(super) async fn run<T>(
        &self,
        f: impl FnOnce(&mut State) -> Result<T, MetaError>,
    ) -> Result<T, MetaError> {
        let (out, target) = {
            let mut state = self.state.lock();
            state.usable()?;
            let out = f(&mut state)?;
            let target = state.appended_lsn;
            if state.synced_lsn >= target {
                return Ok(out);
            }
            self.sync_wakeup.notify_one();
            (out, target)
        };
        self.wait_durable(target).await?;
        Ok(out)
    }

    async fn wait_durable(&self, target: u64) -> Result<(), MetaError> {
        let mut durable = self.durable.subscribe();
        let reached = durable
            .wait_for(|d| d.lsn >= target || d.failure.is_some())
            .await
            .map_err(|_| MetaError::Unavailable("the meta store is closed".to_string()))?
            .clone();
        if reached.lsn >= target {
            Ok(())
        } else {
            Err(MetaError::Io(format!(
                "the meta store could not make the write durable: {}",
                reached.failure.as_deref().unwrap_or("unknown failure")
            )))
        }
    }
}

/// The sync thread: makes appended records durable (one sync for all that are waiting),
/// publishes their watch events, and compacts the log when it grows too long.
pub(super) fn run_syncer(inner: Arc<Inner>) {
    let mut state = inner.state.lock();
    loop {
        while state.synced_lsn == state.appended_lsn && !state.closed && !state.needs_compaction() {
            inner.sync_wakeup.wait(&mut state);
        }
        if state.synced_lsn < state.appended_lsn {
            let target = state.appended_lsn;
            let Some(work) = state.log.as_mut().map(|log| log.sync_work()) else {
                return;
            };
            let result = MutexGuard::unlocked(&mut state, || work.run());
            match result {
                Ok(()) => {
                    state.synced_lsn = target;
                    state.publish_synced(target);
                    inner.durable.send_modify(|d| d.lsn = target);
                }
                Err(err) => {
                    let failure: Arc<str> = format!("syncing the log failed: {err}").into();
                    tracing::error!(%failure, "meta store log sync failed; the store refuses further calls and must be restarted");
                    state.failure = Some(failure.clone());
                    state.watchers.clear();
                    state.pending.clear();
                    inner.durable.send_modify(|d| d.failure = Some(failure));
                    return;
                }
            }
            continue;
        }
        if state.closed {
            return;
        }
        if state.needs_compaction() {
            compact(&mut state);
        }
    }
}
