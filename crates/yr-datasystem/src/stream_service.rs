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
use yr_common::Result;
use yr_datasystem_core::stream::{self, ProducerConfig, StreamStore, SubscriptionConfig};
use yr_meta::MetaStore;

use crate::error::DataSystemError;
use crate::service::blocking;

/// Where this node's streams are recorded, and how other nodes reach it.
pub struct Placement {
    meta: Arc<dyn MetaStore>,
    address: String,
}

impl std::fmt::Debug for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Placement")
            .field("address", &self.address)
            .finish()
    }
}

impl Placement {
    /// Streams claimed in `meta`, this node reached at `address` (`host:port`).
    pub fn new(meta: Arc<dyn MetaStore>, address: String) -> Placement {
        Placement { meta, address }
    }
}

fn key(stream: &str) -> String {
    format!("/yr/stream/{stream}")
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
    /// Serializes creating and removing streams on this node (held across meta store calls:
    /// a tokio mutex, made for that).
    lifecycle: Arc<tokio::sync::Mutex<()>>,
}

impl StreamService {
    /// The service over `store`, placing streams through `placement` (None: all here).
    pub fn new(store: StreamStore, placement: Option<Arc<Placement>>) -> StreamService {
        StreamService {
            store,
            placement,
            lifecycle: Arc::new(tokio::sync::Mutex::new(())),
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
            Ok(_) => Ok(Home::Here),
            Err(Some(current)) => Ok(home_of(placement, &current.value)),
            Err(None) => Err(DataSystemError::StreamHomeLost {
                name: name.to_string(),
            }
            .into()),
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
        Ok(())
    }

    /// A new producer, or the stream's home.
    pub async fn create_producer(
        &self,
        name: String,
        config: ProducerConfig,
    ) -> Result<(u64, Option<String>)> {
        stream::validate_stream_name(&name)?;
        config.validate()?;
        let _lifecycle = self.lifecycle.lock().await;
        match self.claim(&name).await? {
            Home::Elsewhere(home) => Ok((0, Some(home))),
            Home::Here => Ok((self.store.create_producer(&name, &config)?, None)),
        }
    }

    /// A new consumer, or the stream's home.
    pub async fn create_consumer(
        &self,
        name: String,
        subscription: SubscriptionConfig,
    ) -> Result<(u64, Option<String>)> {
        stream::validate_stream_name(&name)?;
        subscription.validate()?;
        let _lifecycle = self.lifecycle.lock().await;
        match self.claim(&name).await? {
            Home::Elsewhere(home) => Ok((0, Some(home))),
            Home::Here => Ok((self.store.create_consumer(&name, &subscription)?, None)),
        }
    }

    /// Append a batch, waiting up to `timeout` for room.
    pub async fn send(
        &self,
        name: String,
        producer: u64,
        elements: Vec<Bytes>,
        timeout: Duration,
    ) -> Result<()> {
        let store = self.store.clone();
        blocking(move || store.send(&name, producer, elements, timeout)).await
    }

    /// Receive, waiting up to `timeout`.
    pub async fn receive(
        &self,
        name: String,
        consumer: u64,
        expect_num: usize,
        timeout: Duration,
    ) -> Result<Vec<stream::Element>> {
        let store = self.store.clone();
        blocking(move || store.receive(&name, consumer, expect_num, timeout)).await
    }

    /// Ack up to `id`.
    pub fn ack(&self, name: &str, consumer: u64, id: u64) -> Result<()> {
        self.store.ack(name, consumer, id)
    }

    /// Close a producer (`consumer` false) or a consumer; a stream that `auto_clean_up`
    /// removes gives up its claim.
    pub async fn close(&self, name: String, id: u64, consumer: bool) -> Result<()> {
        let _lifecycle = self.lifecycle.lock().await;
        let removed = if consumer {
            self.store.close_consumer(&name, id)?
        } else {
            self.store.close_producer(&name, id)?
        };
        if removed {
            self.release(&name).await?;
        }
        Ok(())
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
