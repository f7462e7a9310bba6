//! The view of the ring: this node follows the node records in the meta store, builds the ring
//! of the nodes not lost from them, and keeps the previous rings whose owners may still hold
//! keys while they move; a change of the ring wakes the moves and the requests that wait on it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::watch;
use yr_common::backoff::Backoff;
use yr_meta::{KeyValue, WatchEvent};

use super::{KvCluster, View, PREVIOUS_RINGS};
use crate::kv_ring::{HashRing, Member};

/// The meta store prefix of node records (prost `NodeInfo`, written by the master).
const NODE_PREFIX: &str = "/yr/node/";
/// The node records' state of a node the master declared lost.
const LOST: &str = "lost";
/// How long a request that arrives before the node records were read waits for them.
const FIRST_VIEW_WAIT: Duration = Duration::from_secs(5);

impl KvCluster {
    /// What this node knows of the ring now.
    pub fn view(&self) -> Arc<View> {
        self.view.borrow().clone()
    }

    /// The ring's changes from now on (streams follow them too: design 025).
    pub fn watch(&self) -> watch::Receiver<Arc<View>> {
        self.view.subscribe()
    }

    /// Whether the node records name the node at `address` lost.
    pub fn is_lost_address(&self, address: &str) -> bool {
        self.records
            .lock()
            .values()
            .any(|(at, state)| at == address && state == LOST)
    }

    /// Wait (up to [`FIRST_VIEW_WAIT`]) until this node read the node records once: a node
    /// that just started serves requests only once it knows the ring, and so which keys may
    /// still be at their previous owners.
    pub(super) async fn first_view(&self) {
        if self.view.borrow().epoch == 0 {
            let deadline = tokio::time::Instant::now() + FIRST_VIEW_WAIT;
            if !self.ring_changed(0, Some(deadline)).await {
                tracing::warn!(
                    "no node records read yet; serving KV requests from this node alone"
                );
            }
        }
    }

    /// Wait until the ring changes after `epoch`, at most until `deadline`; whether it did.
    pub(super) async fn ring_changed(
        &self,
        epoch: u64,
        deadline: Option<tokio::time::Instant>,
    ) -> bool {
        let mut changes = self.view.subscribe();
        let wait = async move { changes.wait_for(|view| view.epoch != epoch).await.is_ok() };
        match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, wait)
                .await
                .unwrap_or(false),
            None => wait.await,
        }
    }

    pub(super) async fn follow(self: Arc<Self>) {
        let mut backoff = Backoff::reconnect();
        loop {
            let revision = self.meta.current_revision().await;
            let records = self.meta.range(NODE_PREFIX).await;
            if let (Ok(revision), Ok(records)) = (revision, records) {
                {
                    let mut known = self.records.lock();
                    known.clear();
                    for kv in &records {
                        if let Some((id, record)) = decode(kv) {
                            known.insert(id, record);
                        }
                    }
                }
                self.rebuild();
                if let Ok(mut events) = self.meta.watch_prefix(NODE_PREFIX, revision).await {
                    backoff.reset();
                    while let Some(event) = events.recv().await {
                        match event {
                            WatchEvent::Put(kv) => {
                                if let Some((id, record)) = decode(&kv) {
                                    self.records.lock().insert(id, record);
                                }
                            }
                            WatchEvent::Delete { key, .. } => {
                                if let Some(id) = key.strip_prefix(NODE_PREFIX) {
                                    self.records.lock().remove(id);
                                }
                            }
                        }
                        self.rebuild();
                    }
                }
            }
            tracing::debug!("following node records for the KV ring again");
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// A new view from the node records, if the ring changed.
    fn rebuild(&self) {
        let (members, lost): (Vec<Member>, HashSet<String>) = {
            let records = self.records.lock();
            let members = records
                .iter()
                .filter(|(_, (address, state))| state != LOST && !address.is_empty())
                .map(|(id, (address, _))| Member {
                    node_id: id.clone(),
                    address: address.clone(),
                })
                .collect();
            let lost = records
                .iter()
                .filter(|(_, (_, state))| state == LOST)
                .map(|(id, _)| id.clone())
                .collect();
            (members, lost)
        };
        let ring = HashRing::new(members);
        let changed = self.view.send_if_modified(|view| {
            if view.ring == ring && view.lost == lost {
                return false;
            }
            let mut next = View {
                epoch: view.epoch + 1,
                ring: ring.clone(),
                previous: Vec::new(),
                lost: lost.clone(),
            };
            if view.ring != ring {
                // A node that starts asks the owners of the ring without it while its keys
                // come in.
                let before = if view.ring.is_empty() {
                    ring.without(&self.node_id)
                } else {
                    view.ring.clone()
                };
                next.previous.push(before);
                next.previous
                    .extend(view.previous.iter().take(PREVIOUS_RINGS - 1).cloned());
            } else {
                next.previous = view.previous.clone();
            }
            *view = Arc::new(next);
            true
        });
        if changed {
            let view = self.view();
            tracing::info!(
                epoch = view.epoch,
                members = ?view.ring.members().iter().map(|m| &m.node_id).collect::<Vec<_>>(),
                "the KV ring changed"
            );
            self.moves.notify_one();
        }
    }
}

fn decode(kv: &KeyValue) -> Option<(String, (String, String))> {
    let info = yr_proto::v1::NodeInfo::decode(kv.value.clone()).ok()?;
    Some((info.node_id, (info.address, info.state)))
}
