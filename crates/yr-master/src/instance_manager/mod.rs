//! The instance manager: the master's cluster-wide view of instances, and what happens to the
//! instances of a node that was lost.
//!
//! Each node's proxy is the single writer of its instances' records (`/yr/instance/{id}`, prost
//! `InstanceRecord`, written with a compare-and-swap on the record's version and on the node's
//! live incarnation). The master only reads them, through a prefix watch that keeps
//! [`InstanceManager`]'s cache current, with one exception: when a node is lost nobody else will
//! ever move its instances on, so the master writes them FATAL with `ErrorCode::InstanceExited`
//! ("node X was lost") and `written_by_master`, again with a compare-and-swap so a newer record
//! is never clobbered. The lost incarnation can no longer write (its live incarnation key is
//! gone), and a node never writes over a record the master wrote: the master's FATAL stands.
//!
//! Not done yet: rescheduling instances of a lost node that have a `recover_retry_times` budget
//! (openYuanrong moves them to SCHEDULING under the master's ownership); they go FATAL too.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::watch;
use yr_common::backoff::Backoff;
use yr_common::{ErrorCode, ModuleCode};
use yr_meta::{put_if_version, KeyValue, MetaError, MetaStore, WatchEvent};
use yr_proto::v1::{ErrorInfo, InstanceRecord, InstanceState, InstanceSummary};

/// The meta store prefix of instance records.
pub const INSTANCE_PREFIX: &str = "/yr/instance/";

/// How often a compare-and-swap on one record is retried when the record keeps changing.
const MAX_CAS_ATTEMPTS: usize = 8;

/// What the instance manager failed to do (codes in `error.rs`).
#[derive(Debug, thiserror::Error)]
pub enum InstanceManagerError {
    /// The instances of a lost node could not be marked FATAL: the meta store failed.
    #[error(
        "the instance manager cannot mark the instances of lost node {node_id} FATAL: {source}; \
         their callers wait until the master is restarted with a healthy meta store"
    )]
    MarkFatal {
        /// The lost node.
        node_id: String,
        /// The store's error.
        source: MetaError,
    },
    /// A value under the instance prefix is not an instance record.
    #[error(
        "the instance record {key} cannot be decoded ({detail}); the master ignores it: remove \
         the key, or check that every process of the cluster runs the same yr version"
    )]
    BadRecord {
        /// The record's key.
        key: String,
        /// The decoder's complaint.
        detail: String,
    },
}

/// The meta store key of an instance's record.
pub fn instance_key(instance_id: &str) -> String {
    format!("{INSTANCE_PREFIX}{instance_id}")
}

/// Whether an instance in `state` is finished for good, so a lost node leaves it as it is.
pub fn is_final(state: InstanceState) -> bool {
    matches!(
        state,
        InstanceState::Fatal
            | InstanceState::ScheduleFailed
            | InstanceState::Exited
            | InstanceState::Evicted
    )
}

/// Every instance state, in openYuanrong's numbering.
pub const ALL_STATES: [InstanceState; 14] = [
    InstanceState::New,
    InstanceState::Scheduling,
    InstanceState::Creating,
    InstanceState::Running,
    InstanceState::Failed,
    InstanceState::Exiting,
    InstanceState::Fatal,
    InstanceState::ScheduleFailed,
    InstanceState::Exited,
    InstanceState::Evicting,
    InstanceState::Evicted,
    InstanceState::SubHealth,
    InstanceState::Suspend,
    InstanceState::Paused,
];

#[derive(Clone, Debug)]
struct Cached {
    summary: InstanceSummary,
    mod_revision: u64,
}

/// The cluster-wide view of instances, kept current by a watch on [`INSTANCE_PREFIX`].
pub struct InstanceManager {
    store: Arc<dyn MetaStore>,
    instances: Mutex<BTreeMap<String, Cached>>,
    marked_fatal: AtomicU64,
}

impl InstanceManager {
    /// A manager with an empty view; call [`InstanceManager::sync`] to fill it.
    pub fn new(store: Arc<dyn MetaStore>) -> InstanceManager {
        InstanceManager {
            store,
            instances: Mutex::new(BTreeMap::new()),
            marked_fatal: AtomicU64::new(0),
        }
    }

    /// Loads every instance record, replacing the view, and returns the revision to watch after.
    pub async fn sync(&self) -> Result<u64, MetaError> {
        let revision = self.store.current_revision().await?;
        let records = self.store.range(INSTANCE_PREFIX).await?;
        let mut fresh = BTreeMap::new();
        for kv in &records {
            if let Some(cached) = decode(kv) {
                fresh.insert(kv.key.clone(), cached);
            }
        }
        tracing::debug!(
            instances = fresh.len(),
            revision,
            "instance manager synced from the meta store"
        );
        *self.instances.lock() = fresh;
        Ok(revision)
    }

    /// Follows changes to instance records after `revision` until `stop` turns true. When a
    /// watch cannot be opened or ends (the store compacted its history, or this master fell too
    /// far behind), the view is re-synced in full and watched again from there.
    pub async fn follow(self: Arc<Self>, mut revision: u64, mut stop: watch::Receiver<bool>) {
        // Retries back off while the store fails, and the failure is logged once per outage.
        let mut backoff = Backoff::reconnect();
        let mut failing = false;
        loop {
            let watch = tokio::select! {
                _ = crate::stopped(&mut stop) => return,
                watch = self.store.watch_prefix(INSTANCE_PREFIX, revision) => watch,
            };
            match watch {
                Ok(mut events) => loop {
                    let event = tokio::select! {
                        _ = crate::stopped(&mut stop) => return,
                        event = events.recv() => event,
                    };
                    match event {
                        Some(event) => {
                            revision = revision.max(self.apply(event));
                            backoff.reset();
                            if failing {
                                tracing::info!("watching instance records again");
                                failing = false;
                            }
                        }
                        None => {
                            tracing::info!("instance watch ended; re-syncing instance records");
                            break;
                        }
                    }
                },
                Err(err) if !failing => {
                    tracing::warn!(error = %err, "cannot watch instance records; re-syncing, retrying with backoff");
                    failing = true;
                }
                Err(err) => {
                    tracing::debug!(error = %err, "cannot watch instance records; re-syncing");
                }
            }
            loop {
                tokio::select! {
                    _ = crate::stopped(&mut stop) => return,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
                match self.sync().await {
                    Ok(synced) => {
                        revision = synced;
                        break;
                    }
                    Err(err) if !failing => {
                        tracing::warn!(error = %err, "cannot re-sync instance records; retrying with backoff");
                        failing = true;
                    }
                    Err(err) => {
                        tracing::debug!(error = %err, "cannot re-sync instance records; retrying");
                    }
                }
            }
        }
    }

    /// Applies one watch event to the view and returns its revision. Events older than what the
    /// view holds for the key are ignored.
    fn apply(&self, event: WatchEvent) -> u64 {
        match event {
            WatchEvent::Put(kv) => {
                let revision = kv.mod_revision;
                if let Some(cached) = decode(&kv) {
                    let mut instances = self.instances.lock();
                    let newer = instances
                        .get(&kv.key)
                        .is_none_or(|old| old.mod_revision <= revision);
                    if newer {
                        instances.insert(kv.key, cached);
                    }
                }
                revision
            }
            WatchEvent::Delete { key, revision } => {
                let mut instances = self.instances.lock();
                if instances
                    .get(&key)
                    .is_some_and(|old| old.mod_revision <= revision)
                {
                    instances.remove(&key);
                }
                revision
            }
        }
    }

    /// Every instance, in key order.
    pub fn summaries(&self) -> Vec<InstanceSummary> {
        self.instances
            .lock()
            .values()
            .map(|cached| cached.summary.clone())
            .collect()
    }

    /// How many instances are in each state, in [`ALL_STATES`] order.
    pub fn count_by_state(&self) -> [usize; ALL_STATES.len()] {
        let mut counts = [0; ALL_STATES.len()];
        for cached in self.instances.lock().values() {
            if let Some(slot) = usize::try_from(cached.summary.state)
                .ok()
                .and_then(|index| counts.get_mut(index))
            {
                *slot += 1;
            }
        }
        counts
    }

    /// The functions of every known instance.
    pub fn function_names(&self) -> BTreeSet<String> {
        self.instances
            .lock()
            .values()
            .map(|cached| cached.summary.function.clone())
            .filter(|name| !name.is_empty())
            .collect()
    }

    /// How many instances this master has written FATAL because their node was lost.
    pub fn marked_fatal_total(&self) -> u64 {
        self.marked_fatal.load(Ordering::Relaxed)
    }

    /// Writes FATAL (`InstanceExited`, "node X was lost") into every record of an instance on
    /// `node_id` that is not final yet, and returns how many it wrote. Records of the node's
    /// `live_incarnation` (a node that came back as a new incarnation meanwhile) are left
    /// alone. Reads the store rather than the view, so that records the watch has not delivered
    /// yet are not missed.
    pub async fn fail_instances_of_lost_node(
        &self,
        node_id: &str,
        live_incarnation: &(dyn Fn() -> Option<u64> + Send + Sync),
    ) -> Result<usize, InstanceManagerError> {
        let failed = |source| InstanceManagerError::MarkFatal {
            node_id: node_id.to_string(),
            source,
        };
        let records = self.store.range(INSTANCE_PREFIX).await.map_err(failed)?;
        let mut marked = 0;
        for kv in records {
            let Ok(record) = InstanceRecord::decode(kv.value.clone()) else {
                continue;
            };
            if !belongs_to_lost(&record, node_id, live_incarnation) {
                continue;
            }
            if self
                .mark_fatal(&kv.key, record, kv.version, node_id, live_incarnation)
                .await
                .map_err(failed)?
            {
                marked += 1;
            }
        }
        if marked > 0 {
            tracing::warn!(
                node_id,
                instances = marked,
                "instances of a lost node were marked FATAL"
            );
        }
        Ok(marked)
    }

    /// Moves one record to FATAL with a compare-and-swap; re-reads and retries while a newer
    /// record is still on the lost node and not final. True when this call wrote it.
    async fn mark_fatal(
        &self,
        key: &str,
        mut record: InstanceRecord,
        mut version: u64,
        node_id: &str,
        live_incarnation: &(dyn Fn() -> Option<u64> + Send + Sync),
    ) -> Result<bool, MetaError> {
        for _ in 0..MAX_CAS_ATTEMPTS {
            let instance_id = if record.instance_id.is_empty() {
                key.trim_start_matches(INSTANCE_PREFIX).to_string()
            } else {
                record.instance_id.clone()
            };
            record.set_state(InstanceState::Fatal);
            record.written_by_master = true;
            record.error = Some(ErrorInfo {
                code: ErrorCode::InstanceExited.number(),
                module: ModuleCode::Core.number(),
                message: format!(
                    "instance {instance_id} exited: node {node_id} was lost (it stopped \
                     heartbeating to the master); the instance was not rescheduled, create it \
                     again"
                ),
                ..Default::default()
            });
            let value = Bytes::from(record.encode_to_vec());
            match put_if_version(self.store.as_ref(), key, value, version).await? {
                Ok(kv) => {
                    self.marked_fatal.fetch_add(1, Ordering::Relaxed);
                    self.apply(WatchEvent::Put(kv));
                    tracing::info!(instance_id, node_id, "instance marked FATAL: node lost");
                    return Ok(true);
                }
                Err(None) => return Ok(false),
                Err(Some(current)) => {
                    let Ok(newer) = InstanceRecord::decode(current.value.clone()) else {
                        return Ok(false);
                    };
                    if !belongs_to_lost(&newer, node_id, live_incarnation) {
                        return Ok(false);
                    }
                    record = newer;
                    version = current.version;
                }
            }
        }
        tracing::warn!(
            key,
            node_id,
            "instance record kept changing; gave up marking it FATAL"
        );
        Ok(false)
    }
}

/// Whether `record` is an instance of the lost node `node_id` that the master must fail: not
/// final yet, and not of the node's live incarnation (if it came back as a new one).
fn belongs_to_lost(
    record: &InstanceRecord,
    node_id: &str,
    live_incarnation: &(dyn Fn() -> Option<u64> + Send + Sync),
) -> bool {
    record.node_id == node_id
        && !is_final(record.state())
        && live_incarnation() != Some(record.node_incarnation)
}

/// The view's entry for a record, or `None` (logged) for a value that is not an instance record.
fn decode(kv: &KeyValue) -> Option<Cached> {
    match InstanceRecord::decode(kv.value.clone()) {
        Ok(record) => Some(Cached {
            summary: summary(&kv.key, &record),
            mod_revision: kv.mod_revision,
        }),
        Err(err) => {
            let error = yr_common::Error::from(InstanceManagerError::BadRecord {
                key: kv.key.clone(),
                detail: err.to_string(),
            });
            tracing::warn!(%error, "skipping an undecodable instance record");
            None
        }
    }
}

fn summary(key: &str, record: &InstanceRecord) -> InstanceSummary {
    let instance_id = if record.instance_id.is_empty() {
        key.trim_start_matches(INSTANCE_PREFIX).to_string()
    } else {
        record.instance_id.clone()
    };
    InstanceSummary {
        instance_id,
        function: record.function.clone(),
        state: record.state,
        node_id: record.node_id.clone(),
        job_id: record.job_id.clone(),
        class_name: record.class_name.clone(),
    }
}

#[cfg(test)]
mod tests;
