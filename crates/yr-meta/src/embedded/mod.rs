//! [`EmbeddedStore`]: the meta store the master runs in its own process, in memory or durable in
//! a directory.
//!
//! One mutex guards the state (keys, leases, watchers, the event history). It is never held
//! across an `.await`. A write is applied in three steps:
//!
//! 1. under the lock, the request is checked against the state, its record is appended to the
//!    write-ahead log (a `write(2)` into the page cache), and the state is changed;
//! 2. the sync thread `fdatasync`s the log, one sync for every record appended meanwhile (group
//!    commit), and only then publishes the write's watch events;
//! 3. the writer's call returns once its record is synced.
//!
//! A read returns once every write it could have seen is synced, so no caller ever acts on a
//! write that a crash could take back. If a sync fails, the store refuses every later call with
//! [`MetaError::Io`]: after a failed `fsync` the page cache cannot be trusted, and the master
//! must restart and recover from the files.
//!
//! Leases are timed by a tokio task that starts with the first lease. An expired lease is
//! deleted like a revoke: its keys are deleted in one revision and watchers see the deletes.
//! Lease grants and ends are logged; keep-alives are not. **After a restart every recovered
//! lease gets a fresh full TTL**, so the owners that are still alive have a whole TTL to renew
//! it, and the keys of owners that died with the master expire one TTL after it comes back.
//!
//! Watchers get a bounded channel each. A watcher whose channel is full when a revision is
//! published is dropped with a warning rather than slowing writers down; its channel closes
//! after the last whole revision it received, so it can resume from there. The store remembers
//! the events of the last [`EmbeddedOptions::history_limit`] revisions (after a restart, those
//! replayed from the log since the last snapshot) for watches that resume.

mod leases;
mod recovery;
mod state;
mod sync;
mod watchers;
mod writes;

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use tokio::sync::{mpsc, watch, Notify};

use crate::error::MetaError;
use crate::store::{Compare, KeyValue, LeaseId, MetaStore, TxnOp, TxnResponse, WatchEvent};
use crate::wal::{self};

use state::{check_key, State};
use sync::run_syncer;

/// Tuning of an [`EmbeddedStore`].
#[derive(Clone, Debug)]
pub struct EmbeddedOptions {
    /// Compact (snapshot and start a new log) once the log holds this many bytes.
    pub max_log_bytes: u64,
    /// ... or this many records.
    pub max_log_records: u64,
    /// Events a watcher may have waiting before it is dropped.
    pub watch_buffer: usize,
    /// Revisions of events kept for watches that resume.
    pub history_limit: usize,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            max_log_bytes: 64 << 20,
            max_log_records: 100_000,
            watch_buffer: 1024,
            history_limit: 100_000,
        }
    }
}

/// The meta store embedded in the master: in memory ([`EmbeddedStore::in_memory`]) or durable
/// in a directory ([`EmbeddedStore::open`]). Serve it to other processes with
/// [`serve`](crate::service::serve).
pub struct EmbeddedStore {
    inner: Arc<Inner>,
    syncer: Option<std::thread::JoinHandle<()>>,
}

struct Inner {
    state: Mutex<State>,
    /// Wakes the sync thread when records are appended or the store closes.
    sync_wakeup: Condvar,
    /// The last durable log sequence number, or why the store failed.
    durable: watch::Sender<Durable>,
    lease_wakeup: Notify,
    reaper_started: AtomicBool,
}

#[derive(Clone, Debug)]
struct Durable {
    lsn: u64,
    failure: Option<Arc<str>>,
}

impl EmbeddedStore {
    /// A store that keeps everything in memory: for tests and `local_mode`.
    pub fn in_memory() -> EmbeddedStore {
        EmbeddedStore::start(State::new(EmbeddedOptions::default()))
            .expect("an in-memory store starts no thread")
    }

    /// [`in_memory`](Self::in_memory) with options.
    pub fn in_memory_with(options: EmbeddedOptions) -> EmbeddedStore {
        EmbeddedStore::start(State::new(options)).expect("an in-memory store starts no thread")
    }

    /// Opens (or creates) a durable store in `dir`, recovering what it holds. Every write is
    /// synced to the directory's log before its call returns. Fails with [`MetaError::Corrupt`]
    /// if the files are damaged (a torn final write is repaired, with a warning), and with
    /// [`MetaError::Io`] if another store has `dir` open.
    pub async fn open(dir: impl AsRef<Path>) -> Result<EmbeddedStore, MetaError> {
        EmbeddedStore::open_with(dir, EmbeddedOptions::default()).await
    }

    /// [`open`](Self::open) with options.
    pub async fn open_with(
        dir: impl AsRef<Path>,
        options: EmbeddedOptions,
    ) -> Result<EmbeddedStore, MetaError> {
        let dir = dir.as_ref().to_path_buf();
        let state = tokio::task::spawn_blocking(move || -> Result<State, MetaError> {
            let mut state = State::new(options);
            let (log, lsn) = wal::recover(&dir, &mut |replay| state.replay(replay))?;
            if state.appended_lsn != lsn {
                return Err(MetaError::Corrupt(format!(
                    "{}: replayed {} records but the logs end at record {lsn}",
                    dir.display(),
                    state.appended_lsn
                )));
            }
            // Every lease gets a full TTL from now, so live owners can renew it.
            let now = Instant::now();
            for lease in state.leases.values_mut() {
                lease.deadline = now + lease.ttl;
            }
            state.synced_lsn = lsn;
            state.log = Some(log);
            tracing::info!(
                dir = %dir.display(),
                revision = state.revision,
                keys = state.kvs.len(),
                leases = state.leases.len(),
                "meta store recovered"
            );
            Ok(state)
        })
        .await
        .map_err(|e| {
            MetaError::Unavailable(format!("meta store recovery did not finish: {e}"))
        })??;
        let has_leases = !state.leases.is_empty();
        let store = EmbeddedStore::start(state)?;
        if has_leases {
            store.inner.start_reaper();
        }
        Ok(store)
    }

    fn start(state: State) -> Result<EmbeddedStore, MetaError> {
        let durable = watch::Sender::new(Durable {
            lsn: state.synced_lsn,
            failure: None,
        });
        let durable_store = state.log.is_some();
        let inner = Arc::new(Inner {
            state: Mutex::new(state),
            sync_wakeup: Condvar::new(),
            durable,
            lease_wakeup: Notify::new(),
            reaper_started: AtomicBool::new(false),
        });
        let syncer = if durable_store {
            let syncer_inner = inner.clone();
            let handle = std::thread::Builder::new()
                .name("yr-meta-sync".to_string())
                .spawn(move || run_syncer(syncer_inner))
                .map_err(|e| MetaError::io("start the meta store sync thread", e))?;
            Some(handle)
        } else {
            None
        };
        Ok(EmbeddedStore { inner, syncer })
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        {
            let mut state = self.inner.state.lock();
            state.closed = true;
            state.watchers.clear();
        }
        self.inner.sync_wakeup.notify_all();
        self.inner.lease_wakeup.notify_one();
        if let Some(syncer) = self.syncer.take() {
            let _ = syncer.join();
        }
        // Close the files and release the directory lock now, even if the lease task still
        // holds the state for a moment.
        let log = self.inner.state.lock().log.take();
        drop(log);
        self.inner
            .durable
            .send_modify(|d| d.failure = d.failure.clone().or_else(|| Some("closed".into())));
    }
}

#[async_trait]
impl MetaStore for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, MetaError> {
        check_key(key)?;
        self.inner.run(|state| Ok(state.kv(key))).await
    }

    async fn range(&self, prefix: &str) -> Result<Vec<KeyValue>, MetaError> {
        self.inner.run(|state| Ok(state.range(prefix))).await
    }

    async fn put(
        &self,
        key: &str,
        value: Bytes,
        lease: Option<LeaseId>,
    ) -> Result<KeyValue, MetaError> {
        let op = TxnOp::Put {
            key: key.to_string(),
            value,
            lease,
        };
        let response = self
            .inner
            .run(|state| state.txn(&[], vec![op], Vec::new(), Instant::now()))
            .await?;
        Ok(response
            .results
            .into_iter()
            .next()
            .flatten()
            .expect("a put returns the key as written"))
    }

    async fn delete(&self, key: &str) -> Result<bool, MetaError> {
        let op = TxnOp::Delete {
            key: key.to_string(),
        };
        let response = self
            .inner
            .run(|state| state.txn(&[], vec![op], Vec::new(), Instant::now()))
            .await?;
        Ok(matches!(response.results.first(), Some(Some(_))))
    }

    async fn txn(
        &self,
        compares: Vec<Compare>,
        success: Vec<TxnOp>,
        failure: Vec<TxnOp>,
    ) -> Result<TxnResponse, MetaError> {
        self.inner
            .run(|state| state.txn(&compares, success, failure, Instant::now()))
            .await
    }

    async fn watch_prefix(
        &self,
        prefix: &str,
        after_revision: u64,
    ) -> Result<mpsc::Receiver<WatchEvent>, MetaError> {
        self.inner
            .run(|state| state.watch(prefix, after_revision))
            .await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, MetaError> {
        let id = self
            .inner
            .run(|state| state.grant_lease(ttl, Instant::now()))
            .await?;
        self.inner.start_reaper();
        self.inner.lease_wakeup.notify_one();
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), MetaError> {
        self.inner
            .run(|state| state.keep_alive(lease, Instant::now()))
            .await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), MetaError> {
        self.inner.run(|state| state.revoke_lease(lease)).await
    }

    async fn current_revision(&self) -> Result<u64, MetaError> {
        self.inner.run(|state| Ok(state.revision)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_watcher_that_falls_behind_is_dropped_after_a_whole_revision() {
        let store = EmbeddedStore::in_memory_with(EmbeddedOptions {
            watch_buffer: 4,
            ..Default::default()
        });
        let mut rx = store.watch_prefix("k/", 0).await.unwrap();
        for i in 0..3 {
            store
                .put(&format!("k/{i}"), "v".into(), None)
                .await
                .unwrap();
        }
        // A revision of two events no longer fits: the watcher is dropped before it.
        store
            .txn(
                vec![],
                vec![
                    TxnOp::Put {
                        key: "k/a".into(),
                        value: "v".into(),
                        lease: None,
                    },
                    TxnOp::Put {
                        key: "k/b".into(),
                        value: "v".into(),
                        lease: None,
                    },
                ],
                vec![],
            )
            .await
            .unwrap();
        let mut seen = Vec::new();
        while let Some(event) = rx.recv().await {
            seen.push(event.key().to_string());
        }
        assert_eq!(seen, ["k/0", "k/1", "k/2"]);
        // Writers were not blocked, and the watcher can resume after the last revision it got.
        let mut rx = store.watch_prefix("k/", 4).await.unwrap();
        assert_eq!(rx.recv().await.unwrap().key(), "k/a");
        assert_eq!(rx.recv().await.unwrap().key(), "k/b");
    }

    #[tokio::test]
    async fn history_beyond_the_limit_is_compacted() {
        let store = EmbeddedStore::in_memory_with(EmbeddedOptions {
            history_limit: 3,
            ..Default::default()
        });
        for i in 0..5 {
            store
                .put(&format!("k/{i}"), "v".into(), None)
                .await
                .unwrap();
        }
        // Revisions 2..=6 were written; 4, 5, 6 are remembered.
        let err = store.watch_prefix("k/", 2).await.unwrap_err();
        assert_eq!(
            err,
            MetaError::Compacted {
                revision: 2,
                compacted_revision: 3
            }
        );
        let mut rx = store.watch_prefix("k/", 3).await.unwrap();
        assert_eq!(rx.recv().await.unwrap().revision(), 4);
    }
}
