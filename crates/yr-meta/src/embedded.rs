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

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::{Condvar, Mutex, MutexGuard};
use tokio::sync::{mpsc, watch, Notify};

use crate::error::MetaError;
use crate::store::{Compare, KeyValue, LeaseId, MetaStore, TxnOp, TxnResponse, WatchEvent};
use crate::wal::{self, Replay, WalOp, WalRecord};

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

#[derive(Clone, Debug)]
struct Entry {
    value: Bytes,
    version: u64,
    mod_revision: u64,
    lease: Option<LeaseId>,
}

#[derive(Clone, Debug)]
struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

struct Watcher {
    prefix: String,
    /// Deliver only revisions after this one.
    start_after: u64,
    /// The last revision delivered.
    delivered: u64,
    tx: mpsc::Sender<WatchEvent>,
}

impl Watcher {
    /// Delivers the matching events of one revision; false if the watcher is gone or dropped.
    fn deliver(&mut self, revision: u64, events: &[WatchEvent]) -> bool {
        if self.tx.is_closed() {
            return false;
        }
        if revision <= self.start_after {
            return true;
        }
        let matching: Vec<&WatchEvent> = events
            .iter()
            .filter(|e| e.key().starts_with(&self.prefix))
            .collect();
        if matching.is_empty() {
            return true;
        }
        if self.tx.capacity() < matching.len() {
            tracing::warn!(
                prefix = %self.prefix,
                revision,
                resume_after = self.delivered.max(self.start_after),
                "meta store watcher fell too far behind and was dropped; it must watch again from the last revision it received"
            );
            return false;
        }
        for event in matching {
            if self.tx.try_send(event.clone()).is_err() {
                return false;
            }
        }
        self.delivered = revision;
        true
    }
}

struct State {
    options: EmbeddedOptions,
    kvs: BTreeMap<String, Entry>,
    revision: u64,
    leases: HashMap<LeaseId, Lease>,
    next_lease_id: LeaseId,
    watchers: Vec<Watcher>,
    /// Published events, one entry per revision, oldest first.
    history: VecDeque<(u64, Vec<WatchEvent>)>,
    /// The history holds every event with a revision above this.
    compacted_revision: u64,
    /// Events of appended records not yet synced: (lsn, revision, events).
    pending: VecDeque<(u64, u64, Vec<WatchEvent>)>,
    /// None for an in-memory store.
    log: Option<wal::Log>,
    appended_lsn: u64,
    synced_lsn: u64,
    /// Do not try compacting again before this lsn (after a failed attempt).
    compaction_retry_lsn: u64,
    failure: Option<Arc<str>>,
    closed: bool,
}

/// The revision of a store that was never written, as in etcd.
const INITIAL_REVISION: u64 = 1;

fn check_key(key: &str) -> Result<(), MetaError> {
    if key.is_empty() {
        return Err(MetaError::InvalidArgument("the key is empty".to_string()));
    }
    Ok(())
}

fn lease_or_none(id: i64) -> Option<LeaseId> {
    (id != 0).then_some(id)
}

impl State {
    fn new(options: EmbeddedOptions) -> State {
        State {
            options,
            kvs: BTreeMap::new(),
            revision: INITIAL_REVISION,
            leases: HashMap::new(),
            next_lease_id: 1,
            watchers: Vec::new(),
            history: VecDeque::new(),
            compacted_revision: INITIAL_REVISION,
            pending: VecDeque::new(),
            log: None,
            appended_lsn: 0,
            synced_lsn: 0,
            compaction_retry_lsn: 0,
            failure: None,
            closed: false,
        }
    }

    fn usable(&self) -> Result<(), MetaError> {
        if let Some(failure) = &self.failure {
            return Err(MetaError::Io(format!(
                "the meta store failed earlier and refuses further calls until it restarts: {failure}"
            )));
        }
        if self.closed {
            return Err(MetaError::Unavailable(
                "the meta store is closed".to_string(),
            ));
        }
        Ok(())
    }

    fn kv(&self, key: &str) -> Option<KeyValue> {
        self.kvs.get(key).map(|e| KeyValue {
            key: key.to_string(),
            value: e.value.clone(),
            version: e.version,
            mod_revision: e.mod_revision,
            lease: e.lease,
        })
    }

    fn range(&self, prefix: &str) -> Vec<KeyValue> {
        self.kvs
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| KeyValue {
                key: k.clone(),
                value: e.value.clone(),
                version: e.version,
                mod_revision: e.mod_revision,
                lease: e.lease,
            })
            .collect()
    }

    fn lease_alive(&self, id: LeaseId, now: Instant) -> bool {
        self.leases.get(&id).is_some_and(|l| l.deadline > now)
    }

    // ---- changing keys (shared by live writes and replay) ----

    fn put_entry(
        &mut self,
        key: &str,
        value: Bytes,
        lease: Option<LeaseId>,
        revision: u64,
    ) -> KeyValue {
        let old = self.kvs.get(key);
        let version = old.map_or(1, |e| e.version + 1);
        let old_lease = old.and_then(|e| e.lease);
        if old_lease != lease {
            if let Some(old_lease) = old_lease.and_then(|id| self.leases.get_mut(&id)) {
                old_lease.keys.remove(key);
            }
            if let Some(new_lease) = lease.and_then(|id| self.leases.get_mut(&id)) {
                new_lease.keys.insert(key.to_string());
            }
        }
        self.kvs.insert(
            key.to_string(),
            Entry {
                value: value.clone(),
                version,
                mod_revision: revision,
                lease,
            },
        );
        KeyValue {
            key: key.to_string(),
            value,
            version,
            mod_revision: revision,
            lease,
        }
    }

    fn remove_entry(&mut self, key: &str) -> Option<KeyValue> {
        let old = self.kvs.remove(key)?;
        if let Some(lease) = old.lease.and_then(|id| self.leases.get_mut(&id)) {
            lease.keys.remove(key);
        }
        Some(KeyValue {
            key: key.to_string(),
            value: old.value,
            version: old.version,
            mod_revision: old.mod_revision,
            lease: old.lease,
        })
    }

    /// Ends a lease: deletes its keys at `revision` and forgets it.
    fn end_lease(&mut self, id: LeaseId, revision: u64) -> Vec<WatchEvent> {
        let Some(lease) = self.leases.remove(&id) else {
            return Vec::new();
        };
        let mut events = Vec::with_capacity(lease.keys.len());
        for key in lease.keys {
            if self.kvs.remove(&key).is_some() {
                events.push(WatchEvent::Delete { key, revision });
            }
        }
        events
    }

    // ---- the log and watchers ----

    /// Appends `record` to the log (if durable) and returns its sequence number.
    fn log_record(&mut self, record: &WalRecord) -> Result<u64, MetaError> {
        if let Some(log) = &mut self.log {
            log.append(record)?;
        }
        self.appended_lsn += 1;
        if self.log.is_none() {
            self.synced_lsn = self.appended_lsn;
        }
        Ok(self.appended_lsn)
    }

    /// Publishes the events of record `lsn` now if it is durable, or once it is synced.
    fn emit(&mut self, lsn: u64, revision: u64, events: Vec<WatchEvent>) {
        if events.is_empty() {
            return;
        }
        if lsn <= self.synced_lsn {
            self.publish(revision, events);
        } else {
            self.pending.push_back((lsn, revision, events));
        }
    }

    /// Publishes the events of every record up to `lsn`.
    fn publish_synced(&mut self, lsn: u64) {
        while self.pending.front().is_some_and(|(l, _, _)| *l <= lsn) {
            let (_, revision, events) = self.pending.pop_front().expect("checked");
            self.publish(revision, events);
        }
    }

    fn publish(&mut self, revision: u64, events: Vec<WatchEvent>) {
        self.watchers.retain_mut(|w| w.deliver(revision, &events));
        self.remember(revision, events);
    }

    fn remember(&mut self, revision: u64, events: Vec<WatchEvent>) {
        self.history.push_back((revision, events));
        while self.history.len() > self.options.history_limit {
            if let Some((old, _)) = self.history.pop_front() {
                self.compacted_revision = old;
            }
        }
    }

    fn watch(
        &mut self,
        prefix: &str,
        after_revision: u64,
    ) -> Result<mpsc::Receiver<WatchEvent>, MetaError> {
        if after_revision != 0 && after_revision < self.compacted_revision {
            return Err(MetaError::Compacted {
                revision: after_revision,
                compacted_revision: self.compacted_revision,
            });
        }
        let start_after = if after_revision == 0 {
            self.revision
        } else {
            after_revision
        };
        let backlog: Vec<&WatchEvent> = self
            .history
            .iter()
            .filter(|(revision, _)| *revision > start_after)
            .flat_map(|(_, events)| events.iter())
            .filter(|e| e.key().starts_with(prefix))
            .collect();
        let (tx, rx) = mpsc::channel(self.options.watch_buffer.max(1) + backlog.len());
        let mut delivered = start_after;
        for event in backlog {
            delivered = event.revision();
            tx.try_send(event.clone())
                .expect("the channel has room for the backlog");
        }
        self.watchers.push(Watcher {
            prefix: prefix.to_string(),
            start_after,
            delivered,
            tx,
        });
        Ok(rx)
    }

    // ---- live writes ----

    fn txn(
        &mut self,
        compares: &[Compare],
        success: Vec<TxnOp>,
        failure: Vec<TxnOp>,
        now: Instant,
    ) -> Result<TxnResponse, MetaError> {
        let mut succeeded = true;
        for compare in compares {
            let holds = match compare {
                Compare::Version { key, version } => {
                    check_key(key)?;
                    self.kvs.get(key).map_or(0, |e| e.version) == *version
                }
                Compare::ValueEquals { key, value } => {
                    check_key(key)?;
                    self.kvs.get(key).is_some_and(|e| e.value == *value)
                }
            };
            succeeded &= holds;
        }
        let ops = if succeeded { success } else { failure };

        // Check the whole branch before changing anything.
        let mut written = BTreeSet::new();
        let mut mutates = false;
        for op in &ops {
            match op {
                TxnOp::Get { key } => check_key(key)?,
                TxnOp::Put { key, lease, .. } => {
                    check_key(key)?;
                    if let Some(lease) = lease {
                        if !self.lease_alive(*lease, now) {
                            return Err(MetaError::LeaseNotFound(*lease));
                        }
                    }
                    if !written.insert(key.as_str()) {
                        return Err(MetaError::InvalidArgument(format!(
                            "key {key:?} is written twice in one transaction branch"
                        )));
                    }
                    mutates = true;
                }
                TxnOp::Delete { key } => {
                    check_key(key)?;
                    if !written.insert(key.as_str()) {
                        return Err(MetaError::InvalidArgument(format!(
                            "key {key:?} is written twice in one transaction branch"
                        )));
                    }
                    mutates |= self.kvs.contains_key(key);
                }
            }
        }

        if !mutates {
            let results = ops
                .iter()
                .map(|op| match op {
                    TxnOp::Get { key } => self.kv(key),
                    _ => None,
                })
                .collect();
            return Ok(TxnResponse {
                succeeded,
                revision: self.revision,
                results,
            });
        }

        let revision = self.revision + 1;
        let record = WalRecord {
            revision,
            ops: ops
                .iter()
                .filter_map(|op| match op {
                    TxnOp::Put { key, value, lease } => Some(WalOp {
                        key: key.clone(),
                        delete: false,
                        value: value.clone(),
                        lease: lease.unwrap_or(0),
                    }),
                    TxnOp::Delete { key } if self.kvs.contains_key(key) => Some(WalOp {
                        key: key.clone(),
                        delete: true,
                        value: Bytes::new(),
                        lease: 0,
                    }),
                    _ => None,
                })
                .collect(),
            ..Default::default()
        };
        let lsn = self.log_record(&record)?;
        self.revision = revision;
        let mut results = Vec::with_capacity(ops.len());
        let mut events = Vec::new();
        for op in ops {
            match op {
                TxnOp::Get { key } => results.push(self.kv(&key)),
                TxnOp::Put { key, value, lease } => {
                    let kv = self.put_entry(&key, value, lease, revision);
                    events.push(WatchEvent::Put(kv.clone()));
                    results.push(Some(kv));
                }
                TxnOp::Delete { key } => {
                    let old = self.remove_entry(&key);
                    if old.is_some() {
                        events.push(WatchEvent::Delete { key, revision });
                    }
                    results.push(old);
                }
            }
        }
        self.emit(lsn, revision, events);
        Ok(TxnResponse {
            succeeded,
            revision,
            results,
        })
    }

    fn grant_lease(&mut self, ttl: Duration, now: Instant) -> Result<LeaseId, MetaError> {
        if ttl.is_zero() {
            return Err(MetaError::InvalidArgument(
                "a lease TTL must be positive".to_string(),
            ));
        }
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let id = self.next_lease_id;
        self.log_record(&WalRecord {
            revision: self.revision,
            grant_lease: id,
            grant_ttl_ms: ttl_ms,
            ..Default::default()
        })?;
        self.next_lease_id += 1;
        self.leases.insert(
            id,
            Lease {
                ttl,
                deadline: now + ttl,
                keys: BTreeSet::new(),
            },
        );
        Ok(id)
    }

    fn revoke_lease(&mut self, id: LeaseId) -> Result<(), MetaError> {
        let Some(lease) = self.leases.get(&id) else {
            return Err(MetaError::LeaseNotFound(id));
        };
        let revision = if lease.keys.is_empty() {
            self.revision
        } else {
            self.revision + 1
        };
        let lsn = self.log_record(&WalRecord {
            revision,
            end_lease: id,
            ..Default::default()
        })?;
        self.revision = revision;
        let events = self.end_lease(id, revision);
        self.emit(lsn, revision, events);
        Ok(())
    }

    fn keep_alive(&mut self, id: LeaseId, now: Instant) -> Result<(), MetaError> {
        match self.leases.get_mut(&id) {
            Some(lease) if lease.deadline > now => {
                lease.deadline = now + lease.ttl;
                Ok(())
            }
            _ => Err(MetaError::LeaseNotFound(id)),
        }
    }

    // ---- recovery ----

    fn replay(&mut self, replay: Replay) -> Result<(), MetaError> {
        match replay {
            Replay::Snapshot { lsn, snapshot } => {
                self.appended_lsn = lsn;
                self.revision = snapshot.revision;
                self.compacted_revision = snapshot.revision;
                self.next_lease_id = snapshot.next_lease_id.max(1);
                let now = Instant::now();
                for lease in snapshot.leases {
                    let ttl = Duration::from_millis(lease.ttl_ms);
                    self.leases.insert(
                        lease.id,
                        Lease {
                            ttl,
                            deadline: now + ttl,
                            keys: BTreeSet::new(),
                        },
                    );
                }
                for kv in snapshot.kvs {
                    let lease = lease_or_none(kv.lease);
                    if let Some(id) = lease {
                        let Some(lease) = self.leases.get_mut(&id) else {
                            return Err(MetaError::Corrupt(format!(
                                "snapshot key {:?} is attached to unknown lease {id}",
                                kv.key
                            )));
                        };
                        lease.keys.insert(kv.key.clone());
                    }
                    self.kvs.insert(
                        kv.key,
                        Entry {
                            value: kv.value,
                            version: kv.version,
                            mod_revision: kv.mod_revision,
                            lease,
                        },
                    );
                }
                Ok(())
            }
            Replay::Record(record) => self.replay_record(record),
        }
    }

    fn replay_record(&mut self, record: WalRecord) -> Result<(), MetaError> {
        let mismatch = |expected: u64| {
            MetaError::Corrupt(format!(
                "record at revision {} where revision {expected} was expected",
                record.revision
            ))
        };
        self.appended_lsn += 1;
        if record.grant_lease != 0 {
            if record.revision != self.revision {
                return Err(mismatch(self.revision));
            }
            let ttl = Duration::from_millis(record.grant_ttl_ms);
            self.leases.insert(
                record.grant_lease,
                Lease {
                    ttl,
                    deadline: Instant::now() + ttl,
                    keys: BTreeSet::new(),
                },
            );
            self.next_lease_id = self.next_lease_id.max(record.grant_lease + 1);
            return Ok(());
        }
        if record.end_lease != 0 {
            let has_keys = self
                .leases
                .get(&record.end_lease)
                .is_some_and(|l| !l.keys.is_empty());
            let expected = self.revision + u64::from(has_keys);
            if record.revision != expected {
                return Err(mismatch(expected));
            }
            self.revision = expected;
            let events = self.end_lease(record.end_lease, expected);
            if !events.is_empty() {
                self.remember(expected, events);
            }
            return Ok(());
        }
        let expected = self.revision + 1;
        if record.revision != expected {
            return Err(mismatch(expected));
        }
        self.revision = expected;
        let mut events = Vec::with_capacity(record.ops.len());
        for op in record.ops {
            if op.delete {
                if self.remove_entry(&op.key).is_some() {
                    events.push(WatchEvent::Delete {
                        key: op.key,
                        revision: expected,
                    });
                }
            } else {
                let lease = lease_or_none(op.lease);
                if let Some(id) = lease {
                    if !self.leases.contains_key(&id) {
                        return Err(MetaError::Corrupt(format!(
                            "key {:?} is attached to unknown lease {id}",
                            op.key
                        )));
                    }
                }
                let kv = self.put_entry(&op.key, op.value, lease, expected);
                events.push(WatchEvent::Put(kv));
            }
        }
        self.remember(expected, events);
        Ok(())
    }

    fn snapshot(&self) -> wal::Snapshot {
        wal::Snapshot {
            revision: self.revision,
            next_lease_id: self.next_lease_id,
            kvs: self
                .kvs
                .iter()
                .map(|(key, e)| wal::SnapshotKv {
                    key: key.clone(),
                    value: e.value.clone(),
                    version: e.version,
                    mod_revision: e.mod_revision,
                    lease: e.lease.unwrap_or(0),
                })
                .collect(),
            leases: self
                .leases
                .iter()
                .map(|(id, l)| wal::SnapshotLease {
                    id: *id,
                    ttl_ms: u64::try_from(l.ttl.as_millis()).unwrap_or(u64::MAX).max(1),
                })
                .collect(),
        }
    }

    fn needs_compaction(&self) -> bool {
        match &self.log {
            Some(log) => {
                self.appended_lsn >= self.compaction_retry_lsn
                    && (log.bytes >= self.options.max_log_bytes
                        || log.records >= self.options.max_log_records)
            }
            None => false,
        }
    }
}

impl Inner {
    /// Runs `f` on the state under the lock, then waits until every record appended so far is
    /// durable. Reads and writes both go through here, so nobody sees a write a crash could
    /// take back.
    async fn run<T>(
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

    fn start_reaper(self: &Arc<Self>) {
        if !self.reaper_started.swap(true, Ordering::SeqCst) {
            tokio::spawn(reap_leases(self.clone()));
        }
    }
}

/// Ends expired leases, deleting their keys, until the store closes.
async fn reap_leases(inner: Arc<Inner>) {
    loop {
        let next = {
            let state = inner.state.lock();
            if state.closed || state.failure.is_some() {
                return;
            }
            state.leases.values().map(|l| l.deadline).min()
        };
        let now = Instant::now();
        match next {
            Some(deadline) if deadline <= now => {
                let result = inner
                    .run(|state| {
                        let now = Instant::now();
                        let expired: Vec<LeaseId> = state
                            .leases
                            .iter()
                            .filter(|(_, l)| l.deadline <= now)
                            .map(|(id, _)| *id)
                            .collect();
                        for id in &expired {
                            state.revoke_lease(*id)?;
                        }
                        Ok(expired)
                    })
                    .await;
                match result {
                    Ok(expired) => {
                        for id in expired {
                            tracing::info!(
                                lease = id,
                                "meta store lease expired; its keys are deleted"
                            );
                        }
                    }
                    Err(err) => {
                        tracing::warn!(%err, "meta store could not end expired leases");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            _ => {
                let wait = next.map_or(Duration::from_secs(3600), |d| d - now);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = inner.lease_wakeup.notified() => {}
                }
            }
        }
    }
}

/// The sync thread: makes appended records durable (one sync for all that are waiting),
/// publishes their watch events, and compacts the log when it grows too long.
fn run_syncer(inner: Arc<Inner>) {
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

/// Starts a new log and writes a snapshot of the state so far; the old logs are then removed.
fn compact(state: &mut MutexGuard<'_, State>) {
    let lsn = state.appended_lsn;
    let snapshot = state.snapshot();
    let rotated = match state.log.as_mut() {
        Some(log) => log.rotate(lsn).map(|()| log.dir().to_path_buf()),
        None => return,
    };
    let dir = match rotated {
        Ok(dir) => dir,
        Err(err) => {
            tracing::warn!(%err, "meta store could not start a new log; compaction postponed");
            state.compaction_retry_lsn = lsn + 1000;
            return;
        }
    };
    let result = MutexGuard::unlocked(state, || wal::write_snapshot(&dir, lsn, &snapshot));
    match result {
        Ok(()) => tracing::info!(
            lsn,
            revision = snapshot.revision,
            keys = snapshot.kvs.len(),
            "meta store compacted its log into a snapshot"
        ),
        Err(err) => {
            tracing::warn!(%err, "meta store could not write a snapshot; the logs are kept");
            state.compaction_retry_lsn = state.appended_lsn + 1000;
        }
    }
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
