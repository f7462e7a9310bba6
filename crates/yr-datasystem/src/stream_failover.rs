//! Streams survive their home node (docs/design/025-stream-home-failover.md). This module owns
//! a node's side of it:
//!
//! - **Backup.** A stream's backup is the owner of its name on the KV ring without the home
//!   ([`crate::kv_ring`], the same ring the KV keys use). Before the home answers a send, it
//!   tells the backup what it appended ([`Failover::replicate`], over the authenticated
//!   node-to-node channel of [`KvCluster`]); creates of producers and subscriptions are told
//!   too. When the backup changes (a ring change), the next update is a full snapshot.
//! - **Replicas.** The backup keeps its copy of each stream ([`Replica`]) until the home
//!   removes the stream or the backup takes it over.
//! - **Take-over.** Once the master declares the home's node lost, the owner of the stream's
//!   name on the ring (its backup) swaps the home record from the lost node's address to its
//!   own with a compare-and-swap on the record's revision, and adopts its replica. It does so
//!   when it sees the loss, and also when a client asks about the stream first.
//! - **Fencing.** A node that is the home of a stream refuses updates for it and answers with
//!   its own address: an old home that comes back learns it was taken over at its next send,
//!   and forgets the stream. On every ring change, each node also checks that the home records
//!   of its streams still name it, and forgets those that do not. A home refused by its backup
//!   forgets the stream only if the stream's record no longer names it: the backup may be the
//!   old home, not told yet, and then the update waits (as for a backup that cannot be
//!   reached) until that node forgets the stream at its ring change.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use yr_common::backoff::Backoff;
use yr_common::{Error, ErrorCode, Result};
use yr_datasystem_core::stream::{Replica, ReplicaUpdate, StreamStore};
use yr_datasystem_core::wire::{replica_update_from_proto, replica_update_to_proto};
use yr_meta::{KeyValue, MetaStore};
use yr_proto::ds as pb;
use yr_proto::error_from_proto;

use crate::kv_cluster::KvCluster;
use crate::kv_ring::{HashRing, Member};

/// How long the backup waits for an update's answer before the send fails with 3002 (and the
/// producer retries it).
const REPLICATE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an update waits for a backup that cannot be reached to come back or be replaced
/// (the master's node timeout, 3 s by default, and the ring's change fit within it).
pub const BACKUP_WAIT: Duration = Duration::from_secs(8);

/// How many taken-over streams a node remembers the new home of.
pub const MOVED_REMEMBERED: usize = 4096;

/// Fault tests: how long a node waits before it forgets a stream that another node took over
/// (fail point `datasystem::stream_forget_stale`, `return(<milliseconds>)`): it learns late.
fn forget_delay() -> Option<Duration> {
    fail::fail_point!("datasystem::stream_forget_stale", |ms: Option<String>| ms
        .and_then(|ms| ms.parse().ok())
        .map(Duration::from_millis));
    None
}

/// Whether `error` says the backup could not be reached (rather than refused the update).
fn backup_unreachable(error: &Error) -> bool {
    matches!(
        error.code(),
        ErrorCode::InnerCommunication | ErrorCode::ConnectionFailed
    )
}
/// The most bytes of elements one update carries (a snapshot goes in parts).
pub const REPLICA_BATCH_BYTES: usize = 8 << 20;
/// How long an adopted stream keeps elements for subscriptions whose consumers have not
/// resumed.
pub const RESUME_GRACE: Duration = Duration::from_secs(60);

/// The meta store key of stream `name`'s home record.
pub fn home_key(stream: &str) -> String {
    format!("/yr/stream/{stream}")
}

/// What an update's backup answered.
#[derive(Debug, PartialEq, Eq)]
pub enum Replicated {
    /// The backup holds the update (or there is no other node to hold it).
    Held,
    /// The backup is the stream's home now, at this address: this node was taken over.
    TakenOver(String),
}

/// A node's side of stream failover.
pub struct Failover {
    cluster: Arc<KvCluster>,
    meta: Arc<dyn MetaStore>,
    store: StreamStore,
    address: String,
    /// The replicas this node holds as a backup, with their home's address.
    replicas: Mutex<HashMap<String, (String, Replica)>>,
    /// The backup (node id) that holds all of each stream that lives here.
    replicated_to: Mutex<HashMap<String, String>>,
    /// Where the streams that lived here and were taken over went (at most
    /// [`MOVED_REMEMBERED`]): a producer or consumer that calls this old home after it forgot
    /// the stream is sent there without a meta store read, which may fail right after a
    /// partition heals.
    moved: Mutex<HashMap<String, String>>,
    /// The ring without this node, by the epoch of the view it came from.
    others: Mutex<(u64, Arc<HashRing>)>,
    /// Streams this node took over (for metrics).
    takeovers: AtomicU64,
    /// Serializes creating, removing, taking over and forgetting the streams that live here
    /// (held across meta store calls: a tokio mutex, made for that). A create or resume that
    /// found its stream here therefore never runs on a stream forgotten under it.
    lifecycle: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for Failover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Failover")
            .field("address", &self.address)
            .field("replicas", &self.replicas.lock().len())
            .finish()
    }
}

fn check(error: Option<yr_proto::v1::ErrorInfo>) -> Result<()> {
    match error {
        Some(error) => Err(error_from_proto(&error)),
        None => Ok(()),
    }
}

impl Failover {
    /// Failover for the streams of `store`, which live at `address` and are recorded in `meta`.
    pub fn new(
        cluster: Arc<KvCluster>,
        meta: Arc<dyn MetaStore>,
        store: StreamStore,
        address: String,
    ) -> Arc<Failover> {
        Arc::new(Failover {
            cluster,
            meta,
            store,
            address,
            replicas: Mutex::new(HashMap::new()),
            replicated_to: Mutex::new(HashMap::new()),
            moved: Mutex::new(HashMap::new()),
            others: Mutex::new((u64::MAX, Arc::new(HashRing::default()))),
            takeovers: AtomicU64::new(0),
            lifecycle: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// The lock that serializes the lifecycle of the streams that live here.
    pub fn lifecycle(&self) -> Arc<tokio::sync::Mutex<()>> {
        self.lifecycle.clone()
    }

    /// Where stream `name` went when another node took it over from this one, if this node
    /// forgot it for that (and has not been its home again since).
    pub fn moved_home(&self, name: &str) -> Option<String> {
        self.moved.lock().get(name).cloned()
    }

    /// This node is stream `name`'s home (again): it did not move away.
    pub fn homed_here(&self, name: &str) {
        self.moved.lock().remove(name);
    }

    /// Whether stream `name`'s home record names this node (false when it cannot be read).
    async fn recorded_here(&self, name: &str) -> bool {
        matches!(
            self.meta.get(&home_key(name)).await,
            Ok(Some(record)) if record.value == self.address.as_bytes()
        )
    }

    /// Stream `name`'s backup says node `home` took it over from this one: forget it, once no
    /// create, resume or removal of a stream runs here.
    async fn learnt_taken_over(&self, name: &str, home: &str) {
        let _lifecycle = self.lifecycle.lock().await;
        self.forget_taken_over(name, home);
    }

    /// Forget stream `name`, which node `home` took over from this one; call with the
    /// lifecycle lock held.
    fn forget_taken_over(&self, name: &str, home: &str) {
        self.store.forget(name);
        self.replicated_to.lock().remove(name);
        let mut moved = self.moved.lock();
        if moved.len() >= MOVED_REMEMBERED && !moved.contains_key(name) {
            // Bounded: a client of a stream forgotten that long ago reads the record instead.
            moved.clear();
        }
        moved.insert(name.to_string(), home.to_string());
    }

    /// How many streams this node took over from lost homes.
    pub fn takeovers(&self) -> u64 {
        self.takeovers.load(Ordering::Relaxed)
    }

    /// The bytes of elements this node holds as other streams' backup.
    pub fn replica_bytes(&self) -> usize {
        self.replicas.lock().values().map(|(_, r)| r.bytes).sum()
    }

    /// This node's address.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The backup of stream `name` that lives here: the owner of its name among the other
    /// nodes (None when this node is alone).
    pub fn backup(&self, name: &str) -> Option<Member> {
        let view = self.cluster.view();
        let ring = {
            let mut others = self.others.lock();
            if others.0 != view.epoch {
                *others = (
                    view.epoch,
                    Arc::new(view.ring.without(self.cluster.node_id())),
                );
            }
            others.1.clone()
        };
        ring.owner(name).cloned()
    }

    /// The node that takes over stream `name` from its lost home: the owner of its name on
    /// the ring of the alive nodes (which no longer has the home).
    pub fn successor(&self, name: &str) -> Option<Member> {
        self.cluster.view().ring.owner(name).cloned()
    }

    /// Whether the node at `address` was declared lost.
    pub fn is_lost(&self, address: &str) -> bool {
        address != self.address && self.cluster.is_lost_address(address)
    }

    /// Tell stream `name`'s backup about `update` before the home answers; the whole stream
    /// instead when the backup does not hold it yet (`None`: only then).
    ///
    /// A backup that cannot be reached is waited for, up to [`BACKUP_WAIT`]: it comes back (a
    /// restarted node gets the whole stream), or the master declares it lost and the ring
    /// names another backup, which gets the whole stream. The wait ends early at each change
    /// of the ring, and otherwise retries with backoff. `Err` (3002) after that: the caller's
    /// call fails and its client retries it.
    pub async fn replicate(&self, name: &str, update: Option<ReplicaUpdate>) -> Result<Replicated> {
        let mut outcome = self.replicate_once(name, update).await;
        let Err(first) = &outcome else {
            return outcome;
        };
        if !backup_unreachable(first) {
            return outcome;
        }
        let deadline = tokio::time::Instant::now() + BACKUP_WAIT;
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        let mut ring = self.cluster.watch();
        ring.borrow_and_update();
        while matches!(&outcome, Err(error) if backup_unreachable(error)) {
            let delay = backoff.next_delay();
            let wake = std::cmp::min(tokio::time::Instant::now() + delay, deadline);
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                changed = ring.changed() => {
                    if changed.is_err() {
                        return outcome;
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return outcome;
            }
            tracing::debug!(
                stream = name,
                "the stream's backup could not be reached; trying again"
            );
            // The backup no longer holds it as far as this node knows: the whole stream goes.
            outcome = self.replicate_once(name, None).await;
        }
        outcome
    }

    /// One attempt of [`Failover::replicate`].
    async fn replicate_once(
        &self,
        name: &str,
        update: Option<ReplicaUpdate>,
    ) -> Result<Replicated> {
        let Some(backup) = self.backup(name) else {
            return Ok(Replicated::Held);
        };
        let fresh = self.replicated_to.lock().get(name) != Some(&backup.node_id);
        let update = match (fresh, update) {
            (false, None) => return Ok(Replicated::Held),
            (false, Some(update)) => update,
            (true, _) => match self.store.snapshot(name, true) {
                Some(snapshot) => snapshot,
                None => return Ok(Replicated::Held),
            },
        };
        let mut outcome = Ok(Replicated::Held);
        for part in update.split(REPLICA_BATCH_BYTES) {
            let request = replica_update_to_proto(name, &self.address, part);
            outcome = self.send(&backup, request).await;
            if !matches!(outcome, Ok(Replicated::Held)) {
                break;
            }
        }
        match outcome {
            Ok(Replicated::Held) => {
                if fresh {
                    self.replicated_to
                        .lock()
                        .insert(name.to_string(), backup.node_id);
                }
                Ok(Replicated::Held)
            }
            Ok(Replicated::TakenOver(home)) => {
                // The stream's record decides: a backup that still holds the stream may be an
                // old home that has not learnt yet that this node took it over.
                if self.recorded_here(name).await {
                    self.replicated_to.lock().remove(name);
                    return Err(Error::new(
                        ErrorCode::InnerCommunication,
                        format!(
                            "the backup of stream {name:?} (node {} at {home}) still holds it as \
                             its home, though this node took it over; it forgets it at its next \
                             ring change, then takes the elements",
                            backup.node_id
                        ),
                    ));
                }
                tracing::warn!(stream = name, %home, "this node was taken over as the stream's home; forgetting it");
                self.learnt_taken_over(name, &home).await;
                Ok(Replicated::TakenOver(home))
            }
            Err(error) => {
                self.replicated_to.lock().remove(name);
                Err(error)
            }
        }
    }

    /// Tell stream `name`'s backup that it is gone (best effort).
    pub async fn removed(&self, name: &str) {
        self.replicated_to.lock().remove(name);
        let Some(backup) = self.backup(name) else {
            return;
        };
        let request = pb::StreamReplicateRequest {
            stream: name.to_string(),
            home: self.address.clone(),
            removed: true,
            ..pb::StreamReplicateRequest::default()
        };
        if let Err(error) = self.send(&backup, request).await {
            tracing::debug!(stream = name, %error, "cannot tell the backup that the stream is gone");
        }
    }

    async fn send(
        &self,
        backup: &Member,
        request: pb::StreamReplicateRequest,
    ) -> Result<Replicated> {
        let stream = request.stream.clone();
        let unreachable = |detail: String| {
            Error::new(
                ErrorCode::InnerCommunication,
                format!(
                    "the backup of stream {stream:?} (node {} at {}) did not take the elements: \
                     {detail}; they are not acknowledged, and the producer retries them once a \
                     backup holds them",
                    backup.node_id, backup.address
                ),
            )
        };
        let mut client = self.cluster.client(backup)?;
        let call = client.stream_replicate(request);
        let reply = match tokio::time::timeout(REPLICATE_TIMEOUT, call).await {
            Ok(Ok(reply)) => reply.into_inner(),
            Ok(Err(status)) => return Err(unreachable(status.message().to_string())),
            Err(_) => {
                return Err(unreachable(format!(
                    "no answer within {REPLICATE_TIMEOUT:?}"
                )))
            }
        };
        check(reply.error)?;
        Ok(if reply.home.is_empty() {
            Replicated::Held
        } else {
            Replicated::TakenOver(reply.home)
        })
    }

    /// An update from a stream's home: kept, unless the stream lives here (then this node
    /// took it over, and answers its own address).
    pub fn receive(&self, request: pb::StreamReplicateRequest) -> Result<Option<String>> {
        if self.store.contains(&request.stream) {
            return Ok(Some(self.address.clone()));
        }
        let mut replicas = self.replicas.lock();
        if request.removed {
            replicas.remove(&request.stream);
            return Ok(None);
        }
        let name = request.stream.clone();
        let home = request.home.clone();
        let update = replica_update_from_proto(request)?;
        let entry = replicas
            .entry(name)
            .or_insert_with(|| (home.clone(), Replica::default()));
        if entry.0 != home {
            // A new home's first update (a take-over elsewhere): start again from it.
            *entry = (home, Replica::default());
        }
        entry.1.apply(update);
        Ok(None)
    }

    /// Take stream `name` over from its lost home, whose record is `record`; call with the
    /// lifecycle lock held. The home after the attempt: this node's address, or the
    /// node that won the record.
    pub async fn take_over(&self, name: &str, record: &KeyValue) -> Result<String> {
        let key = home_key(name);
        let value = Bytes::from(self.address.clone().into_bytes());
        match yr_meta::put_if_mod_revision(self.meta.as_ref(), &key, value, record.mod_revision)
            .await?
        {
            Ok(_) => {
                self.homed_here(name);
                let replica = self.replicas.lock().remove(name);
                let (elements, bytes) = replica
                    .as_ref()
                    .map_or((0, 0), |(_, r)| (r.elements.len(), r.bytes));
                self.store.adopt(
                    name,
                    replica.map(|(_, r)| r).unwrap_or_default(),
                    RESUME_GRACE,
                )?;
                self.takeovers.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    stream = name,
                    from = %String::from_utf8_lossy(&record.value),
                    elements,
                    bytes,
                    "took over the home of a stream whose node was lost"
                );
                Ok(self.address.clone())
            }
            Err(Some(current)) => Ok(String::from_utf8_lossy(&current.value).into_owned()),
            Err(None) => Err(Error::new(
                ErrorCode::EtcdOperationError,
                format!("the home record of stream {name:?} vanished during a take-over; retry"),
            )),
        }
    }

    /// After a ring change: take over the streams this node backs up whose home was lost, drop
    /// the copies of streams it no longer backs up, forget the streams here whose record names
    /// another node, and give the streams here their (new) backups.
    pub async fn ring_changed(&self) {
        let lifecycle = self.lifecycle.lock().await;
        let backed_up: Vec<(String, String)> = self
            .replicas
            .lock()
            .iter()
            .map(|(name, (home, _))| (name.clone(), home.clone()))
            .collect();
        let view = self.cluster.view();
        let mut rings_without: HashMap<String, HashRing> = HashMap::new();
        for (name, home) in backed_up {
            if !self.is_lost(&home) {
                // A home that is alive: keep the copy only while this node is its backup.
                let Some(home_node) = view.ring.members().iter().find(|m| m.address == home) else {
                    continue;
                };
                let ring = rings_without
                    .entry(home_node.node_id.clone())
                    .or_insert_with(|| view.ring.without(&home_node.node_id));
                if ring.owner(&name).map(|m| m.address.as_str()) != Some(self.address.as_str()) {
                    self.replicas.lock().remove(&name);
                }
                continue;
            }
            if self.successor(&name).map(|m| m.address) != Some(self.address.clone()) {
                continue;
            }
            match self.meta.get(&home_key(&name)).await {
                Ok(Some(record)) if record.value == home.as_bytes() => {
                    if let Err(error) = self.take_over(&name, &record).await {
                        tracing::warn!(stream = %name, %error, "cannot take over a stream's home");
                    }
                }
                Ok(_) => {
                    // Removed, or another node's now.
                    self.replicas.lock().remove(&name);
                }
                Err(error) => {
                    tracing::warn!(stream = %name, %error, "cannot read a stream's home record")
                }
            }
        }
        let mut kept = Vec::new();
        for name in self.store.names() {
            match self.meta.get(&home_key(&name)).await {
                Ok(Some(record)) if record.value != self.address.as_bytes() => {
                    let home = String::from_utf8_lossy(&record.value).into_owned();
                    if let Some(delay) = forget_delay() {
                        tokio::time::sleep(delay).await;
                    }
                    tracing::warn!(stream = %name, %home, "another node took this node's stream over; forgetting it");
                    self.forget_taken_over(&name, &home);
                    continue;
                }
                Ok(_) => kept.push(name),
                Err(error) => {
                    tracing::warn!(stream = %name, %error, "cannot read a stream's home record");
                }
            }
        }
        drop(lifecycle);
        for name in kept {
            if let Err(error) = self.replicate(&name, None).await {
                tracing::debug!(stream = %name, %error, "cannot give a stream its new backup yet");
            }
        }
    }

    /// Follow the ring's changes until the process ends.
    pub async fn follow(self: Arc<Self>) {
        let mut changes = self.cluster.watch();
        while changes.changed().await.is_ok() {
            self.ring_changed().await;
        }
    }
}

#[cfg(test)]
mod tests;
