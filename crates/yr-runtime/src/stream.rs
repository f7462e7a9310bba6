//! Where this process's stream calls go: an in-process [`StreamStore`] in local mode, or the
//! stream's home data worker in a cluster ([`crate::cluster::stream`]). Both check names,
//! configurations and elements the same way and fail with the same codes, so the
//! `yr::create_stream_*` API behaves the same on either.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use yr_common::{Error, ErrorCode, Result};
use yr_datasystem_core::stream::{validate_element, StreamStore};
pub use yr_datasystem_core::stream::{
    Element, ProducerConfig, SubscriptionConfig, SubscriptionType,
};

use crate::blocking;

/// The stream calls of the client core.
pub trait StreamClient: Send + Sync {
    /// A new producer of stream `name`.
    fn create_producer(
        &self,
        name: &str,
        config: &ProducerConfig,
    ) -> Result<Box<dyn ProducerClient>>;
    /// A new consumer of stream `name`.
    fn create_consumer(
        &self,
        name: &str,
        subscription: &SubscriptionConfig,
    ) -> Result<Box<dyn ConsumerClient>>;
    /// Delete stream `name` (4299 while it has producers or consumers).
    fn delete_stream(&self, name: &str) -> Result<()>;
    /// The producers and the consumers of stream `name`, in the whole cluster.
    fn counts(&self, name: &str) -> Result<(u64, u64)>;
    /// `finalize` runs: end waiting calls, and fail later ones, with `error`.
    fn shutdown(&self, error: &Error);
}

/// One producer.
pub trait ProducerClient: Send + Sync {
    /// Send one element, waiting up to `timeout` for room.
    fn send(&self, element: &[u8], timeout: Duration) -> Result<()>;
    /// Flush what is buffered and close.
    fn close(&self) -> Result<()>;
}

/// One consumer.
pub trait ConsumerClient: Send + Sync {
    /// Up to `expect_num` elements (0: what is ready), waiting up to `timeout`.
    fn receive(&self, timeout: Duration, expect_num: usize) -> Result<Vec<Element>>;
    /// Acknowledge every element up to `id`.
    fn ack(&self, id: u64) -> Result<()>;
    /// Close (acks what was received).
    fn close(&self) -> Result<()>;
}

/// The error stream calls get after `finalize` (9000, with `error`'s module).
pub fn finalized_error(error: &Error) -> Error {
    Error::with_module(
        error.code(),
        error.module_code(),
        "yr was finalized, which closed this process's stream producers and consumers; call \
         yr::init again and create new ones",
    )
}

/// The error of a call on a closed producer or consumer (4298).
pub fn closed_handle(what: &str, stream: &str) -> Error {
    Error::new(
        ErrorCode::ClientAlreadyClosed,
        format!("this {what} of stream {stream:?} was closed; create a new {what}"),
    )
}

/// Local mode: the streams live in this process.
#[derive(Debug, Default)]
pub struct LocalStreams {
    store: StreamStore,
}

impl LocalStreams {
    /// No streams yet.
    pub fn new() -> LocalStreams {
        LocalStreams::default()
    }
}

struct LocalProducer {
    store: StreamStore,
    stream: String,
    id: u64,
    config: ProducerConfig,
    closed: AtomicBool,
}

struct LocalConsumer {
    store: StreamStore,
    stream: String,
    id: u64,
    closed: AtomicBool,
    /// One call at a time, like openYuanrong's consumer.
    calls: Mutex<()>,
}

impl StreamClient for LocalStreams {
    fn create_producer(
        &self,
        name: &str,
        config: &ProducerConfig,
    ) -> Result<Box<dyn ProducerClient>> {
        let id = self.store.create_producer(name, config)?;
        Ok(Box::new(LocalProducer {
            store: self.store.clone(),
            stream: name.to_string(),
            id,
            config: config.clone(),
            closed: AtomicBool::new(false),
        }))
    }

    fn create_consumer(
        &self,
        name: &str,
        subscription: &SubscriptionConfig,
    ) -> Result<Box<dyn ConsumerClient>> {
        let id = self.store.create_consumer(name, subscription)?;
        Ok(Box::new(LocalConsumer {
            store: self.store.clone(),
            stream: name.to_string(),
            id,
            closed: AtomicBool::new(false),
            calls: Mutex::new(()),
        }))
    }

    fn delete_stream(&self, name: &str) -> Result<()> {
        self.store.delete(name)
    }

    fn counts(&self, name: &str) -> Result<(u64, u64)> {
        self.store.counts(name)
    }

    fn shutdown(&self, error: &Error) {
        self.store.close(finalized_error(error));
    }
}

impl ProducerClient for LocalProducer {
    fn send(&self, element: &[u8], timeout: Duration) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(closed_handle("producer", &self.stream));
        }
        validate_element(&self.stream, element.len(), &self.config)?;
        // In one process there is nothing to batch: the element is visible at once.
        let element = Bytes::copy_from_slice(element);
        blocking::blocking(|| {
            self.store
                .send(&self.stream, self.id, vec![element], timeout)
        })
    }

    fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Err(closed_handle("producer", &self.stream));
        }
        self.store.close_producer(&self.stream, self.id).map(|_| ())
    }
}

impl ConsumerClient for LocalConsumer {
    fn receive(&self, timeout: Duration, expect_num: usize) -> Result<Vec<Element>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(closed_handle("consumer", &self.stream));
        }
        let _call = self.calls.lock();
        blocking::blocking(|| {
            self.store
                .receive(&self.stream, self.id, expect_num, timeout)
        })
    }

    fn ack(&self, id: u64) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(closed_handle("consumer", &self.stream));
        }
        self.store.ack(&self.stream, self.id, id)
    }

    fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Err(closed_handle("consumer", &self.stream));
        }
        self.store.close_consumer(&self.stream, self.id).map(|_| ())
    }
}

impl Drop for LocalProducer {
    fn drop(&mut self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            let _ = self.store.close_producer(&self.stream, self.id);
        }
    }
}

impl Drop for LocalConsumer {
    fn drop(&mut self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            let _ = self.store.close_consumer(&self.stream, self.id);
        }
    }
}

/// Shared by the handles of one client: set when `finalize` runs.
#[derive(Debug, Default)]
pub struct Finalized {
    error: Mutex<Option<Error>>,
}

impl Finalized {
    /// Ok, or the error `finalize` left.
    pub fn check(&self) -> Result<()> {
        match &*self.error.lock() {
            Some(error) => Err(error.clone()),
            None => Ok(()),
        }
    }

    /// Record `error`.
    pub fn set(&self, error: &Error) {
        *self.error.lock() = Some(error.clone());
    }
}

/// A handle's shared finalize flag.
pub type FinalizedFlag = Arc<Finalized>;
