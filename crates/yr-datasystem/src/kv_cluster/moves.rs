//! Moves of keys on ring changes: each node pushes the keys it holds but no longer owns to their
//! new owners in batches, takes the keys pushed to it (over an older value it holds, never over
//! a newer one, by the values' write stamps; never a key deleted meanwhile: the tombstones) and
//! forgets a key once its new owner took it or held a newer value.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use yr_common::backoff::Backoff;
use yr_common::Result;
use yr_datasystem_core::kv::MovingEntry;
use yr_datasystem_core::wire::timeout_to_ms;
use yr_proto::ds as pb;

use super::routing::{check, transport_error};
use super::{KvCluster, View, MOVE_BATCH_BYTES};
use crate::kv_ring::Member;
use crate::service::blocking;

/// The most deleted keys remembered while moves may be in flight, and for how long.
const MAX_TOMBSTONES: usize = 65_536;
const TOMBSTONE_LIFE: Duration = Duration::from_secs(120);

impl KvCluster {
    /// A key stored here that the ring gives to another node (the rings of two nodes
    /// disagreed for a moment) is pushed to its owner.
    pub(super) fn note_stray(&self, view: &View, key: &str) {
        if view
            .ring
            .owner(key)
            .is_some_and(|owner| owner.node_id != self.node_id)
        {
            self.moves.notify_one();
        }
    }

    pub(super) fn remember_deleted(&self, keys: &[String]) {
        let now = Instant::now();
        let mut tombstones = self.tombstones.lock();
        if tombstones.len() + keys.len() > MAX_TOMBSTONES {
            tombstones.retain(|_, at| now.duration_since(*at) < TOMBSTONE_LIFE);
            if tombstones.len() + keys.len() > MAX_TOMBSTONES {
                tracing::warn!(
                    "too many KV keys deleted during moves; forgetting the oldest deletes"
                );
                tombstones.clear();
            }
        }
        for key in keys {
            tombstones.insert(key.clone(), now);
        }
    }

    fn deleted_recently(&self, key: &str) -> bool {
        self.tombstones
            .lock()
            .get(key)
            .is_some_and(|at| at.elapsed() < TOMBSTONE_LIFE)
    }

    /// Take entries pushed here by their previous owner.
    pub async fn adopt(self: &Arc<Self>, entries: Vec<pb::KvEntry>) -> Result<Vec<bool>> {
        let this = self.clone();
        let taken = blocking(move || {
            Ok(entries
                .into_iter()
                .map(|entry| {
                    let entry = MovingEntry {
                        key: entry.key,
                        value: entry.value,
                        ttl: (entry.ttl_ms > 0).then(|| Duration::from_millis(entry.ttl_ms)),
                        job: entry.job_id,
                        in_l2: entry.in_l2,
                        version: 0,
                        stamp: entry.stamp,
                    };
                    this.kv
                        .adopt(&entry, |key| this.deleted_recently(key))
                        .unwrap_or_else(|error| {
                            tracing::warn!(%error, key = %entry.key, "cannot take a moved KV key");
                            false
                        })
                })
                .collect::<Vec<bool>>())
        })
        .await?;
        // Keys this node does not own either (rings disagreed for a moment) move on.
        self.moves.notify_one();
        Ok(taken)
    }

    pub(super) async fn move_keys(self: Arc<Self>) {
        let mut backoff = Backoff::reconnect();
        loop {
            self.moves.notified().await;
            loop {
                match self.move_pass().await {
                    Ok(()) => {
                        backoff.reset();
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cannot move KV keys to their new owners yet; trying again");
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                }
            }
        }
    }

    /// Push every key held here that another node owns to it.
    async fn move_pass(self: &Arc<Self>) -> Result<()> {
        let mut kept: HashSet<String> = HashSet::new();
        let mut moved = 0usize;
        loop {
            let view = self.view();
            if view.ring.is_empty() || !view.ring.contains(&self.node_id) {
                return Ok(());
            }
            let batch = {
                let (kv, view, node_id) = (self.kv.clone(), view.clone(), self.node_id.clone());
                let skip = kept.clone();
                blocking(move || {
                    Ok(kv.moving_entries(
                        |key| {
                            view.ring.owner(key).is_some_and(|o| o.node_id != node_id)
                                && !skip.contains(key)
                        },
                        MOVE_BATCH_BYTES,
                    ))
                })
                .await?
            };
            if batch.is_empty() {
                if moved > 0 {
                    tracing::info!(
                        moved,
                        kept = kept.len(),
                        epoch = view.epoch,
                        "KV keys moved to their new owners"
                    );
                }
                return Ok(());
            }
            let mut by_owner: HashMap<Member, Vec<MovingEntry>> = HashMap::new();
            for entry in batch {
                if let Some(owner) = view.ring.owner(&entry.key) {
                    by_owner.entry(owner.clone()).or_default().push(entry);
                }
            }
            for (owner, entries) in by_owner {
                let mut client = self.client(&owner)?;
                let request = pb::KvAdoptRequest {
                    entries: entries
                        .iter()
                        .map(|e| pb::KvEntry {
                            key: e.key.clone(),
                            value: e.value.clone(),
                            ttl_ms: e.ttl.map_or(0, |t| timeout_to_ms(t).max(1)),
                            job_id: e.job.clone(),
                            in_l2: e.in_l2,
                            stamp: e.stamp,
                        })
                        .collect(),
                };
                let reply = client
                    .kv_adopt(request)
                    .await
                    .map_err(|status| transport_error(&owner, &status))?
                    .into_inner();
                check(reply.error)?;
                for (entry, taken) in entries
                    .into_iter()
                    .zip(reply.taken.into_iter().chain(std::iter::repeat(false)))
                {
                    if taken {
                        let kv = self.kv.clone();
                        let (key, version) = (entry.key.clone(), entry.version);
                        blocking(move || kv.forget_moved(&key, version)).await?;
                        moved += 1;
                    } else {
                        kept.insert(entry.key);
                    }
                }
            }
        }
    }
}
