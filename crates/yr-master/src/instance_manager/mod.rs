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
//! An instance of a lost node with restarts left of its `recover_retry_times` (and an owner
//! that outlives the node) is not failed but re-created: the master places it on an alive node
//! and writes its record SCHEDULING there (`written_by_master`, `rescheduled_to`, one more
//! restart), then sends that node a create with the same instance id; the chosen node, and only
//! it, takes the record over (docs/design/023-node-loss-recovery.md).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::watch;
use yr_common::backoff::Backoff;
use yr_common::{ErrorCode, InvokeOptions, ModuleCode};
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
    /// The node the master re-creates it on, while the master's SCHEDULING stands.
    rescheduled_to: Option<String>,
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
    /// `node_id` that is not final yet, and returns how many it wrote; no instance is
    /// re-created (see [`InstanceManager::recover_instances_of_lost_node`]).
    pub async fn fail_instances_of_lost_node(
        &self,
        node_id: &str,
        live_incarnation: &(dyn Fn() -> Option<u64> + Send + Sync),
    ) -> Result<usize, InstanceManagerError> {
        let recovered = self
            .recover_instances_of_lost_node(node_id, live_incarnation, &|_, _| {
                Err("the master does not re-create instances here".to_string())
            })
            .await?;
        Ok(recovered.fatal + recovered.rescheduled.len())
    }

    /// Settles every record of an instance on `node_id` that is not final yet: an instance with
    /// restarts left (`recover_retry_times`, see [`recovery_options`]) that `place` finds a
    /// node for is written SCHEDULING on that node (`written_by_master`, `rescheduled_to`,
    /// one more restart), for the caller to send the create; every other one is written FATAL
    /// (`InstanceExited`, "node X was lost"). Records of the node's `live_incarnation` (a node
    /// that came back as a new incarnation meanwhile) are left alone. Reads the store rather
    /// than the view, so that records the watch has not delivered yet are not missed.
    pub async fn recover_instances_of_lost_node(
        &self,
        node_id: &str,
        live_incarnation: &(dyn Fn() -> Option<u64> + Send + Sync),
        place: Placer<'_>,
    ) -> Result<Recovered, InstanceManagerError> {
        let failed = |source| InstanceManagerError::MarkFatal {
            node_id: node_id.to_string(),
            source,
        };
        let records = self.store.range(INSTANCE_PREFIX).await.map_err(failed)?;
        let mut recovered = Recovered::default();
        for kv in records {
            let Ok(record) = InstanceRecord::decode(kv.value.clone()) else {
                continue;
            };
            if !belongs_to_lost(&record, node_id, live_incarnation) {
                continue;
            }
            match self
                .settle(
                    &kv.key,
                    record,
                    kv.version,
                    node_id,
                    live_incarnation,
                    place,
                )
                .await
                .map_err(failed)?
            {
                Some(Settled::Fatal) => recovered.fatal += 1,
                Some(Settled::Rescheduled(rescheduled)) => recovered.rescheduled.push(*rescheduled),
                None => {}
            }
        }
        if recovered.fatal > 0 || !recovered.rescheduled.is_empty() {
            tracing::warn!(
                node_id,
                fatal = recovered.fatal,
                rescheduled = recovered.rescheduled.len(),
                "instances of a lost node were settled"
            );
        }
        Ok(recovered)
    }

    /// Writes FATAL (with `reason`) over the master's SCHEDULING of `instance_id` for node
    /// `target`, unless the record moved on (the node took it over, or it was settled again).
    /// True when this call wrote it.
    pub async fn fail_reschedule(
        &self,
        instance_id: &str,
        target: &str,
        reason: &str,
    ) -> Result<bool, MetaError> {
        let key = instance_key(instance_id);
        for _ in 0..MAX_CAS_ATTEMPTS {
            let Some(kv) = self.store.get(&key).await? else {
                return Ok(false);
            };
            let Ok(mut record) = InstanceRecord::decode(kv.value.clone()) else {
                return Ok(false);
            };
            if !(record.written_by_master
                && record.rescheduled_to == target
                && record.state() == InstanceState::Scheduling)
            {
                return Ok(false);
            }
            mark_fatal(
                &mut record,
                format!(
                    "instance {instance_id} exited: its node was lost and the master could not re-create it on node {target}: {reason}; create it again"
                ),
            );
            let value = Bytes::from(record.encode_to_vec());
            if let Ok(written) =
                put_if_version(self.store.as_ref(), &key, value, kv.version).await?
            {
                self.marked_fatal.fetch_add(1, Ordering::Relaxed);
                self.apply(WatchEvent::Put(written));
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Moves one record to SCHEDULING on another node, or to FATAL, with a compare-and-swap;
    /// re-reads and retries while a newer record is still on the lost node and not final.
    /// What this call wrote, if anything.
    async fn settle(
        &self,
        key: &str,
        mut record: InstanceRecord,
        mut version: u64,
        node_id: &str,
        live_incarnation: &(dyn Fn() -> Option<u64> + Send + Sync),
        place: Placer<'_>,
    ) -> Result<Option<Settled>, MetaError> {
        for _ in 0..MAX_CAS_ATTEMPTS {
            let instance_id = if record.instance_id.is_empty() {
                key.trim_start_matches(INSTANCE_PREFIX).to_string()
            } else {
                record.instance_id.clone()
            };
            let placed = recovery_options(&record, node_id)
                .map(|options| place(&record, &options).map(|target| (target, options)));
            let mut rescheduled = None;
            record.written_by_master = true;
            match placed {
                Some(Ok(((target, address), options))) => {
                    record.set_state(InstanceState::Scheduling);
                    record.restarts += 1;
                    record.node_id.clone_from(&target);
                    record.node_incarnation = 0;
                    record.runtime_address.clear();
                    record.runtime_pid = 0;
                    record.rescheduled_to.clone_from(&target);
                    record.error = Some(ErrorInfo {
                        code: ErrorCode::InstanceExited.number(),
                        module: ModuleCode::Core.number(),
                        message: format!(
                            "instance {instance_id} is re-created on node {target}: node {node_id} was lost (restart {} of {})",
                            record.restarts, options.recover_retry_times
                        ),
                        ..Default::default()
                    });
                    rescheduled = Some((target, address));
                }
                placed => {
                    let why = match placed {
                        Some(Err(reason)) => format!(
                            "; it could not be re-created on another node ({reason}), create it again"
                        ),
                        _ => "; the instance was not rescheduled (no recover_retry_times left), create it again"
                            .to_string(),
                    };
                    mark_fatal(
                        &mut record,
                        format!(
                            "instance {instance_id} exited: node {node_id} was lost (it stopped \
                             heartbeating to the master){why}"
                        ),
                    );
                }
            }
            let value = Bytes::from(record.encode_to_vec());
            match put_if_version(self.store.as_ref(), key, value, version).await? {
                Ok(kv) => {
                    self.apply(WatchEvent::Put(kv));
                    return Ok(Some(match rescheduled {
                        Some((target, address)) => {
                            tracing::info!(
                                instance_id,
                                node_id,
                                target,
                                restarts = record.restarts,
                                "instance of a lost node rescheduled"
                            );
                            Settled::Rescheduled(Box::new(Rescheduled {
                                record,
                                node_id: target,
                                address,
                            }))
                        }
                        None => {
                            self.marked_fatal.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(
                                instance_id,
                                node_id,
                                "instance marked FATAL: node lost"
                            );
                            Settled::Fatal
                        }
                    }));
                }
                Err(None) => return Ok(None),
                Err(Some(current)) => {
                    let Ok(newer) = InstanceRecord::decode(current.value.clone()) else {
                        return Ok(None);
                    };
                    if !belongs_to_lost(&newer, node_id, live_incarnation) {
                        return Ok(None);
                    }
                    record = newer;
                    version = current.version;
                }
            }
        }
        tracing::warn!(
            key,
            node_id,
            "instance record kept changing; gave up settling it"
        );
        Ok(None)
    }

    /// Every record the master wrote SCHEDULING for a node that has not taken it over yet
    /// (a master that took over finishes what its predecessor started), with the node.
    pub fn pending_reschedules(&self) -> Vec<(String, String)> {
        self.instances
            .lock()
            .values()
            .filter(|cached| cached.rescheduled_to.is_some())
            .filter_map(|cached| {
                cached
                    .rescheduled_to
                    .clone()
                    .map(|node| (cached.summary.instance_id.clone(), node))
            })
            .collect()
    }

    /// The stored record of `instance_id`, read from the store.
    pub async fn record(&self, instance_id: &str) -> Result<Option<InstanceRecord>, MetaError> {
        Ok(self
            .store
            .get(&instance_key(instance_id))
            .await?
            .and_then(|kv| InstanceRecord::decode(kv.value).ok()))
    }
}

/// Where the master re-creates an instance of a lost node (its record and decoded options):
/// `Ok((node_id, node_address))`, or why no node fits.
pub type Placer<'a> =
    &'a (dyn Fn(&InstanceRecord, &InvokeOptions) -> Result<(String, String), String> + Send + Sync);

/// What the master did with the instances of a lost node.
#[derive(Debug, Default)]
pub struct Recovered {
    /// How many it wrote FATAL.
    pub fatal: usize,
    /// The instances it wrote SCHEDULING on another node; their creates are to be sent.
    pub rescheduled: Vec<Rescheduled>,
}

/// An instance of a lost node that the master re-creates elsewhere.
#[derive(Clone, Debug)]
pub struct Rescheduled {
    /// Its record as the master wrote it (SCHEDULING, `rescheduled_to`).
    pub record: InstanceRecord,
    /// The node chosen.
    pub node_id: String,
    /// That node's Node service address.
    pub address: String,
}

enum Settled {
    Fatal,
    Rescheduled(Box<Rescheduled>),
}

/// The options of an instance of lost node `lost` that the master re-creates elsewhere, or
/// `None` if it goes FATAL: a stateful instance with restarts left of its
/// `recover_retry_times`, not being killed, whose owner outlives the node (it is detached, or
/// another node created it).
pub fn recovery_options(record: &InstanceRecord, lost: &str) -> Option<InvokeOptions> {
    if record.stateless
        || matches!(
            record.state(),
            InstanceState::Exiting | InstanceState::Evicting
        )
    {
        return None;
    }
    let options: InvokeOptions = rmp_serde::from_slice(&record.options).ok()?;
    yr_proto::record::moves_when_node_lost(record, &options, lost).then_some(options)
}

/// Marks `record` FATAL (no longer rescheduled anywhere), its error an "instance exited" that
/// says why in `message`.
fn mark_fatal(record: &mut InstanceRecord, message: String) {
    record.set_state(InstanceState::Fatal);
    record.rescheduled_to.clear();
    record.error = Some(ErrorInfo {
        code: ErrorCode::InstanceExited.number(),
        module: ModuleCode::Core.number(),
        message,
        ..Default::default()
    });
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
            rescheduled_to: (record.written_by_master
                && record.state() == InstanceState::Scheduling
                && !record.rescheduled_to.is_empty())
            .then(|| record.rescheduled_to.clone()),
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
