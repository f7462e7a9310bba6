//! The stream calls of the DataWorker service, and where streams live in a cluster.
//!
//! A stream lives on one node's data worker, its *home*: the first node that creates a
//! producer or consumer for the name claims it in the meta store (`/yr/stream/<name>` holds
//! the home's TCP address, written with a create-if-absent). A data worker asked about a
//! stream whose home is elsewhere answers with that home's address and does nothing; the
//! client then talks to the home directly, so elements cross the network once, producer to
//! home to consumer. A stream removed (`delete_stream`, `auto_clean_up`) gives up its claim.
//! Creating and removing streams on one node are serialized by one async lock, so a claim
//! and the stream it names appear and disappear together. Without a meta store (unit tests)
//! every stream lives here.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use yr_common::{ErrorCode, Result};
use yr_datasystem_core::stream::{
    self, ProducerConfig, ReplicaUpdate, Sent, StreamStore, SubscriptionConfig,
};
use yr_meta::MetaStore;
use yr_proto::ds as pb;

use crate::error::DataSystemError;
use crate::service::blocking;
use crate::stream_failover::{home_key as key, Failover, Replicated};

/// Where this node's streams are recorded, and how other nodes reach it.
pub struct Placement {
    meta: Arc<dyn MetaStore>,
    address: String,
    failover: Option<Arc<Failover>>,
    /// Serializes creating, removing and taking over streams on this node: the failover's
    /// lock ([`Failover::lifecycle`]), or this placement's own without one.
    lifecycle: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Placement")
            .field("address", &self.address)
            .finish()
    }
}

impl Placement {
    /// Streams claimed in `meta`, this node reached at `address` (`host:port`); with
    /// `failover`, they survive this node (started on the current tokio runtime).
    pub fn new(
        meta: Arc<dyn MetaStore>,
        address: String,
        failover: Option<Arc<Failover>>,
    ) -> Placement {
        let lifecycle = failover.as_ref().map_or_else(
            || Arc::new(tokio::sync::Mutex::new(())),
            |failover| failover.lifecycle(),
        );
        if let (Some(failover), Ok(runtime)) = (&failover, tokio::runtime::Handle::try_current()) {
            runtime.spawn(failover.clone().follow());
        }
        Placement {
            meta,
            address,
            failover,
            lifecycle,
        }
    }

    /// The failover of this node's streams, in a cluster of nodes.
    pub fn failover(&self) -> Option<&Arc<Failover>> {
        self.failover.as_ref()
    }
}

/// A stream was found (or claimed) here, and a create or resume of its producer or consumer
/// runs next. Fail point `datasystem::stream_claimed` lets a test act at this moment, as a
/// concurrent update that learns the stream was taken over would (only non-returning actions:
/// `pause`, `sleep`, a callback).
fn claimed() {
    fail::fail_point!("datasystem::stream_claimed");
}

/// Either here, or the home's address.
pub enum Home {
    /// The stream lives on this node.
    Here,
    /// The stream lives on the node at this TCP address.
    Elsewhere(String),
}

/// The stream side of the data worker.
#[derive(Clone, Debug)]
pub struct StreamService {
    store: StreamStore,
    placement: Option<Arc<Placement>>,
    /// The placement's lifecycle lock (or this service's own, without one).
    lifecycle: Arc<tokio::sync::Mutex<()>>,
}

impl StreamService {
    /// The service over `store`, placing streams through `placement` (None: all here).
    pub fn new(store: StreamStore, placement: Option<Arc<Placement>>) -> StreamService {
        let lifecycle = placement.as_ref().map_or_else(
            || Arc::new(tokio::sync::Mutex::new(())),
            |placement| placement.lifecycle.clone(),
        );
        StreamService {
            store,
            placement,
            lifecycle,
        }
    }

    /// The store of the streams that live here.
    pub fn store(&self) -> &StreamStore {
        &self.store
    }

    /// Where stream `name` lives, claiming it for this node if no node has.
    async fn claim(&self, name: &str) -> Result<Home> {
        let Some(placement) = &self.placement else {
            return Ok(Home::Here);
        };
        if self.store.contains(name) {
            return Ok(Home::Here);
        }
        let value = Bytes::from(placement.address.clone().into_bytes());
        match yr_meta::create_if_absent(placement.meta.as_ref(), &key(name), value).await? {
            Ok(_) => {
                if let Some(failover) = &placement.failover {
                    failover.homed_here(name);
                }
                Ok(Home::Here)
            }
            Err(Some(current)) => {
                let home = String::from_utf8_lossy(&current.value).into_owned();
                let Some(failover) = placement.failover.as_ref().filter(|f| f.is_lost(&home))
                else {
                    return Ok(home_of(placement, &current.value));
                };
                // The home's node was lost: its successor takes the stream over.
                match failover.successor(name) {
                    Some(successor) if successor.address == placement.address => {
                        let home = failover.take_over(name, &current).await?;
                        Ok(home_of(placement, home.as_bytes()))
                    }
                    Some(successor) => Ok(Home::Elsewhere(successor.address)),
                    None => Ok(home_of(placement, &current.value)),
                }
            }
            Err(None) => Err(DataSystemError::StreamHomeLost {
                name: name.to_string(),
            }
            .into()),
        }
    }

    /// Tell the stream's backup about `update` (see [`Failover::replicate`]): `Some(home)` if
    /// another node took the stream over.
    async fn replicate(&self, name: &str, update: Option<ReplicaUpdate>) -> Result<Option<String>> {
        let Some(failover) = self.placement.as_ref().and_then(|p| p.failover.as_ref()) else {
            return Ok(None);
        };
        Ok(match failover.replicate(name, update).await? {
            Replicated::Held => None,
            Replicated::TakenOver(home) => Some(home),
        })
    }

    /// Producer or consumer `id` of stream `name` was created (or resumed) here: its answer,
    /// once the stream's backup knows it.
    async fn created(&self, name: &str, id: u64) -> Result<(u64, Option<String>)> {
        let update = self.store.snapshot(name, false);
        match self.replicate(name, update).await? {
            Some(home) => Ok((0, Some(home))),
            None => Ok((id, None)),
        }
    }

    /// The home of stream `name` when `error` says its producer or consumer is unknown here
    /// because the stream lives elsewhere (it was taken over); otherwise the error to answer:
    /// `error` itself, or 3002 when the stream is gone from here and the meta store cannot say
    /// where it went (the client then resumes through its own node, as for a lost home).
    async fn moved(&self, name: &str, error: yr_common::Error) -> Result<String> {
        if error.code() != ErrorCode::ClientAlreadyClosed || self.store.contains(name) {
            tracing::debug!(stream = name, %error, here = self.store.contains(name), "a stream call failed here");
            return Err(error);
        }
        let failover = self.placement.as_ref().and_then(|p| p.failover.as_ref());
        if let Some(home) = failover.and_then(|failover| failover.moved_home(name)) {
            return Ok(home);
        }
        let found = self.look_up(name).await;
        tracing::debug!(stream = name, %error, home = ?found.as_ref().ok().map(|h| match h { Home::Here => "", Home::Elsewhere(a) => a.as_str() }), "a stream not here: where it went");
        match found {
            Ok(Home::Elsewhere(home)) => Ok(home),
            Ok(Home::Here) => Err(error),
            Err(read) => Err(yr_common::Error::new(
                ErrorCode::InnerCommunication,
                format!(
                    "stream {name:?} is not on this node, and where it went cannot be read \
                     ({read}); the client resumes through its own node"
                ),
            )),
        }
    }

    /// Where stream `name` lives, without claiming it (Here when no node has it).
    async fn look_up(&self, name: &str) -> Result<Home> {
        let Some(placement) = &self.placement else {
            return Ok(Home::Here);
        };
        if self.store.contains(name) {
            return Ok(Home::Here);
        }
        Ok(match placement.meta.get(&key(name)).await? {
            Some(current) => home_of(placement, &current.value),
            None => Home::Here,
        })
    }

    /// Give up this node's claim on stream `name`, if it has it.
    async fn release(&self, name: &str) -> Result<()> {
        let Some(placement) = &self.placement else {
            return Ok(());
        };
        let key = key(name);
        if let Some(current) = placement.meta.get(&key).await? {
            if current.value == placement.address.as_bytes() {
                let _ = yr_meta::delete_if_version(placement.meta.as_ref(), &key, current.version)
                    .await?;
            }
        }
        if let Some(failover) = &placement.failover {
            failover.removed(name).await;
        }
        Ok(())
    }

    /// A new producer (or producer `resume` of a lost home, carrying on), or the stream's
    /// home.
    pub async fn create_producer(
        &self,
        name: String,
        config: ProducerConfig,
        resume: u64,
    ) -> Result<(u64, Option<String>)> {
        stream::validate_stream_name(&name)?;
        config.validate()?;
        self.made(&name, "producer", resume, || {
            if resume != 0 {
                self.store
                    .resume_producer(&name, resume, &config)
                    .map(|()| resume)
            } else {
                self.store.create_producer(&name, &config)
            }
        })
        .await
    }

    /// A new consumer (or consumer `resume` of a lost home, which received every element up
    /// to `after`, carrying on), or the stream's home.
    pub async fn create_consumer(
        &self,
        name: String,
        subscription: SubscriptionConfig,
        resume: u64,
        after: u64,
    ) -> Result<(u64, Option<String>)> {
        stream::validate_stream_name(&name)?;
        subscription.validate()?;
        self.made(&name, "consumer", resume, || {
            if resume != 0 {
                self.store
                    .resume_consumer(&name, resume, &subscription, after)
                    .map(|()| resume)
            } else {
                self.store.create_consumer(&name, &subscription)
            }
        })
        .await
    }

    /// Create or resume (`resume`, 0 for a new one) a producer or consumer (`what`) of stream
    /// `name` with `make` where the stream lives: its id once the backup knows it, or the
    /// stream's home when that is another node.
    async fn made(
        &self,
        name: &str,
        what: &str,
        resume: u64,
        make: impl FnOnce() -> Result<u64>,
    ) -> Result<(u64, Option<String>)> {
        let id = {
            let _lifecycle = self.lifecycle.lock().await;
            let made = match self.claim(name).await? {
                Home::Elsewhere(home) => {
                    tracing::debug!(stream = name, what, resume, %home, "a create or resume sent to the stream's home");
                    return Ok((0, Some(home)));
                }
                Home::Here => {
                    claimed();
                    make()
                }
            };
            match made {
                Ok(id) => id,
                // Taken over and forgotten while the call ran: the client goes to the new home.
                Err(error) => return Ok((0, Some(self.moved(name, error).await?))),
            }
        };
        let answer = self.created(name, id).await;
        tracing::debug!(stream = name, what, resume, ?answer, "created or resumed");
        answer
    }

    /// Append the producer's batch number `batch`, waiting up to `timeout` for room; the
    /// answer waits until the stream's backup holds it. `Some(home)` (nothing appended) if
    /// the stream lives on another node now.
    pub async fn send(
        &self,
        name: String,
        producer: u64,
        batch: u64,
        elements: Vec<Bytes>,
        timeout: Duration,
    ) -> Result<Option<String>> {
        let store = self.store.clone();
        // Kept for the backup (a cluster of one node has none).
        let copy = self
            .placement
            .as_ref()
            .and_then(|p| p.failover.as_ref())
            .and_then(|failover| failover.backup(&name))
            .map(|_| elements.clone());
        let stream = name.clone();
        let sent =
            blocking(move || store.send_batch(&stream, producer, batch, elements, timeout)).await;
        let sent = match sent {
            Ok(sent) => sent,
            Err(error) => return self.moved(&name, error).await.map(Some),
        };
        let Some(elements) = copy else {
            return Ok(None);
        };
        let update = match sent {
            Sent::Duplicate => None,
            Sent::Appended {
                first_id,
                low,
                kept,
            } => Some(ReplicaUpdate {
                low,
                first_id,
                next_id: first_id + elements.len() as u64,
                elements: if kept { elements } else { Vec::new() },
                producers: vec![(producer, batch)],
                ..ReplicaUpdate::default()
            }),
        };
        self.replicate(&name, update).await
    }

    /// Receive, waiting up to `timeout`; `Some(home)` if the stream lives elsewhere now.
    pub async fn receive(
        &self,
        name: String,
        consumer: u64,
        expect_num: usize,
        timeout: Duration,
    ) -> Result<(Vec<stream::Element>, Option<String>)> {
        let store = self.store.clone();
        let stream = name.clone();
        match blocking(move || store.receive(&stream, consumer, expect_num, timeout)).await {
            Ok(elements) => Ok((elements, None)),
            Err(error) => self
                .moved(&name, error)
                .await
                .map(|home| (Vec::new(), Some(home))),
        }
    }

    /// Ack up to `id`; `Some(home)` if the stream lives elsewhere now.
    pub async fn ack(&self, name: &str, consumer: u64, id: u64) -> Result<Option<String>> {
        match self.store.ack(name, consumer, id) {
            Ok(()) => Ok(None),
            Err(error) => self.moved(name, error).await.map(Some),
        }
    }

    /// An update from the home of a stream this node backs up: `Some(this node)` if the
    /// stream lives here (the sender was taken over).
    pub fn replica_update(&self, request: pb::StreamReplicateRequest) -> Result<Option<String>> {
        match self.placement.as_ref().and_then(|p| p.failover.as_ref()) {
            Some(failover) => failover.receive(request),
            None => Err(yr_common::Error::new(
                ErrorCode::DatasystemFailed,
                format!(
                    "stream {:?}: this data worker is not in a cluster and backs up no stream",
                    request.stream
                ),
            )),
        }
    }

    /// Close a producer (`consumer` false) or a consumer; a stream that `auto_clean_up`
    /// removes gives up its claim. `Some(home)` (nothing closed here) if the stream lives on
    /// another node now: the client resumes there and closes it there.
    pub async fn close(&self, name: String, id: u64, consumer: bool) -> Result<Option<String>> {
        let _lifecycle = self.lifecycle.lock().await;
        let closed = if consumer {
            self.store.close_consumer(&name, id)
        } else {
            self.store.close_producer(&name, id)
        };
        let removed = match closed {
            Ok(removed) => removed,
            Err(error) => return self.moved(&name, error).await.map(Some),
        };
        if removed {
            self.release(&name).await?;
        }
        Ok(None)
    }

    /// Delete a stream here, or answer its home.
    pub async fn delete(&self, name: String) -> Result<Option<String>> {
        stream::validate_stream_name(&name)?;
        let _lifecycle = self.lifecycle.lock().await;
        match self.look_up(&name).await? {
            Home::Elsewhere(home) => Ok(Some(home)),
            Home::Here => {
                self.store.delete(&name)?;
                self.release(&name).await?;
                Ok(None)
            }
        }
    }

    /// The producers and consumers of a stream here, or its home.
    pub async fn query(&self, name: String) -> Result<((u64, u64), Option<String>)> {
        stream::validate_stream_name(&name)?;
        match self.look_up(&name).await? {
            Home::Elsewhere(home) => Ok(((0, 0), Some(home))),
            Home::Here => Ok((self.store.counts(&name)?, None)),
        }
    }
}

fn home_of(placement: &Placement, value: &[u8]) -> Home {
    if value == placement.address.as_bytes() {
        Home::Here
    } else {
        Home::Elsewhere(String::from_utf8_lossy(value).into_owned())
    }
}
