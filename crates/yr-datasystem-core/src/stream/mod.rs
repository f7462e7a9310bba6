//! The stream store: openYuanrong's stream semantics (named pub/sub streams with producers,
//! subscriptions, consumers and acks) over memory, for one node's data worker or for local
//! mode. Where a stream lives in a cluster (its home node) is decided by the data worker's
//! service (`yr_datasystem::service`); this module owns only the streams that live here.
//!
//! - **Elements** get ids from one counter per stream, starting at 1, in the order they are
//!   sent. A batch from one producer is appended at once, so elements are FIFO per producer.
//! - **Subscriptions.** A [`SubscriptionType::Stream`] subscription has one consumer, and every
//!   subscription gets every element sent after it was created (broadcast). A
//!   [`SubscriptionType::RoundRobin`] subscription (a *shared* subscription, beyond
//!   openYuanrong) has any number of consumers, and deals each element to one of them in turn.
//! - **Memory.** Elements stay until every subscription has acked them (an ack acknowledges
//!   everything up to its id); then they are reclaimed. The unreclaimed bytes are bounded by
//!   the stream's `max_stream_size`: a send waits for room and fails with 4202 after its
//!   timeout. With no subscription, elements are dropped at once, unless the producer asked to
//!   retain them for the first `retain_for_num_consumers` subscriptions.
//! - **Failover.** A stream's copy on its backup node, and the backup's adoption of it when the
//!   home is lost, are in `replica.rs` (docs/design/025-stream-home-failover.md).
//! - **Lifetime.** A stream is created by its first producer or consumer. `delete` refuses a
//!   stream that still has producers or consumers; `auto_clean_up` removes it when its last
//!   producer or consumer closes.

mod config;
mod consume;
mod error;
mod produce;
mod replica;
mod state;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use yr_common::{Error, Result};

pub use config::{
    validate_element, validate_stream_name, Element, ProducerConfig, SubscriptionConfig,
    SubscriptionType, MAX_NAME_SIZE, MAX_PAGE_SIZE, MAX_RECEIVE_BYTES,
    MAX_RETAIN_FOR_NUM_CONSUMERS, PAGE_ALIGNMENT,
};
pub use error::StreamError;
pub use replica::{Replica, ReplicaUpdate, Sent};
use state::{StoreInner, Stream, StreamState};

/// The streams that live here. Cheap to clone: clones share the streams.
///
/// ```
/// use std::time::Duration;
/// use yr_datasystem_core::stream::{ProducerConfig, StreamStore, SubscriptionConfig, SubscriptionType};
/// let store = StreamStore::new();
/// let consumer = store.create_consumer("s", &SubscriptionConfig::new("sub", SubscriptionType::Stream)).unwrap();
/// let producer = store.create_producer("s", &ProducerConfig::default()).unwrap();
/// store.send("s", producer, vec!["a".into(), "b".into()], Duration::ZERO).unwrap();
/// let got = store.receive("s", consumer, 2, Duration::from_secs(1)).unwrap();
/// assert_eq!(got.iter().map(|e| e.id).collect::<Vec<_>>(), vec![1, 2]);
/// store.ack("s", consumer, 2).unwrap();
/// ```
#[derive(Clone, Debug, Default)]
pub struct StreamStore {
    inner: Arc<StoreInner>,
}

impl StreamStore {
    /// An empty store. Its producer and consumer ids start at a random multiple of 2^24, so
    /// that ids resumed from another node's store (an adopted stream's) do not meet new ones.
    pub fn new() -> StreamStore {
        let store = StreamStore::default();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos() as u64);
        let seed = (nanos ^ u64::from(std::process::id()).rotate_left(32)) & 0xF_FFFF_FFFF;
        store.inner.next_id.store(seed << 24, Ordering::Relaxed);
        store
    }

    fn check_open(&self) -> Result<()> {
        match &*self.inner.closed.lock() {
            Some(error) => Err(error.clone()),
            None => Ok(()),
        }
    }

    /// Whether stream `name` lives here.
    pub fn contains(&self, name: &str) -> bool {
        self.inner.streams.lock().contains_key(name)
    }

    fn stream(&self, name: &str) -> Option<Arc<Stream>> {
        self.inner.streams.lock().get(name).cloned()
    }

    fn stream_or_create(&self, name: &str, config: &ProducerConfig) -> Arc<Stream> {
        self.inner
            .streams
            .lock()
            .entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(Stream {
                    name: name.to_string(),
                    state: Mutex::new(StreamState::new(config.clone())),
                    changed: Condvar::new(),
                })
            })
            .clone()
    }

    fn new_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn closed_error(stream: &str, what: &'static str, id: u64) -> Error {
        StreamError::Closed {
            what,
            id,
            stream: stream.to_string(),
        }
        .into()
    }

    fn remove_if_unused(&self, stream: &Stream, state: &mut StreamState) -> bool {
        if state.config.auto_clean_up && state.producers.is_empty() && state.consumers.is_empty() {
            state.removed = true;
            self.inner.streams.lock().remove(&stream.name);
            return true;
        }
        false
    }

    /// Delete stream `name` and its elements. Ok if it does not exist; 4299 while it has
    /// producers or consumers.
    pub fn delete(&self, name: &str) -> Result<()> {
        self.check_open()?;
        validate_stream_name(name)?;
        let Some(stream) = self.stream(name) else {
            return Ok(());
        };
        let mut state = stream.state.lock();
        if !state.producers.is_empty() || !state.consumers.is_empty() {
            return Err(StreamError::InUse {
                stream: name.to_string(),
                producers: state.producers.len() as u64,
                consumers: state.consumers.len() as u64,
            }
            .into());
        }
        state.removed = true;
        self.inner.streams.lock().remove(name);
        drop(state);
        stream.changed.notify_all();
        Ok(())
    }

    /// The number of producers and of consumers of stream `name` (0 and 0 if it does not
    /// exist).
    pub fn counts(&self, name: &str) -> Result<(u64, u64)> {
        self.check_open()?;
        validate_stream_name(name)?;
        Ok(match self.stream(name) {
            Some(stream) => {
                let state = stream.state.lock();
                (state.producers.len() as u64, state.consumers.len() as u64)
            }
            None => (0, 0),
        })
    }

    /// The bytes of stream `name` not reclaimed yet (for tests and metrics).
    pub fn used_bytes(&self, name: &str) -> usize {
        self.stream(name).map_or(0, |s| s.state.lock().bytes)
    }

    /// How many receives wait for elements, and how many sends wait for room (for metrics, and
    /// for tests that wait until a call waits).
    pub fn waiting(&self) -> (usize, usize) {
        (
            self.inner.receives_waiting.count(),
            self.inner.sends_waiting.count(),
        )
    }

    /// Close the store: every call, and every call waiting, fails with `error` (finalize).
    pub fn close(&self, error: Error) {
        *self.inner.closed.lock() = Some(error);
        let streams: Vec<Arc<Stream>> = self.inner.streams.lock().values().cloned().collect();
        for stream in streams {
            // Take the lock so that a waiter between its check and its wait is not missed.
            drop(stream.state.lock());
            stream.changed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::time::Duration;
    use yr_common::ErrorCode;

    fn sub(name: &str) -> SubscriptionConfig {
        SubscriptionConfig::new(name, SubscriptionType::Stream)
    }

    fn ids(elements: &[Element]) -> Vec<u64> {
        elements.iter().map(|e| e.id).collect()
    }

    #[test]
    fn receives_and_sends_that_wait_are_counted_while_they_wait() {
        let store = StreamStore::new();
        let c = store.create_consumer("w", &sub("a")).unwrap();
        let config = ProducerConfig {
            page_size: 4096,
            max_stream_size: 4096,
            ..ProducerConfig::default()
        };
        let page = || vec![Bytes::from(vec![0u8; 4096])];
        let p = store.create_producer("w", &config).unwrap();
        let receiver = {
            let store = store.clone();
            std::thread::spawn(move || store.receive("w", c, 1, Duration::from_secs(10)))
        };
        while store.waiting() != (1, 0) {
            std::thread::yield_now();
        }
        store.send("w", p, page(), Duration::ZERO).unwrap();
        assert_eq!(ids(&receiver.join().unwrap().unwrap()), vec![1]);
        // The stream is full until that element is acked: the next send waits for room.
        let sender = {
            let store = store.clone();
            std::thread::spawn(move || store.send("w", p, page(), Duration::from_secs(10)))
        };
        while store.waiting() != (0, 1) {
            std::thread::yield_now();
        }
        store.ack("w", c, 1).unwrap();
        sender.join().unwrap().unwrap();
        assert_eq!(store.waiting(), (0, 0));
    }

    #[test]
    fn every_subscription_gets_every_element_in_order() {
        let store = StreamStore::new();
        let a = store.create_consumer("s", &sub("a")).unwrap();
        let b = store.create_consumer("s", &sub("b")).unwrap();
        let p = store
            .create_producer("s", &ProducerConfig::default())
            .unwrap();
        for i in 0..10u8 {
            store
                .send("s", p, vec![Bytes::from(vec![i])], Duration::ZERO)
                .unwrap();
        }
        for c in [a, b] {
            let got = store.receive("s", c, 10, Duration::ZERO).unwrap();
            assert_eq!(ids(&got), (1..=10).collect::<Vec<_>>());
            assert_eq!(got[3].value, Bytes::from(vec![3u8]));
        }
        assert_eq!(store.used_bytes("s"), 10);
        store.ack("s", a, 10).unwrap();
        assert_eq!(store.used_bytes("s"), 10);
        store.ack("s", b, 5).unwrap();
        assert_eq!(store.used_bytes("s"), 5);
        store.ack("s", b, 10).unwrap();
        assert_eq!(store.used_bytes("s"), 0);
    }

    #[test]
    fn round_robin_consumers_split_the_elements() {
        let store = StreamStore::new();
        let shared = SubscriptionConfig::new("w", SubscriptionType::RoundRobin);
        let a = store.create_consumer("s", &shared).unwrap();
        let b = store.create_consumer("s", &shared).unwrap();
        let p = store
            .create_producer("s", &ProducerConfig::default())
            .unwrap();
        let batch = (0..6u8).map(|i| Bytes::from(vec![i])).collect();
        store.send("s", p, batch, Duration::ZERO).unwrap();
        assert_eq!(
            ids(&store.receive("s", a, 0, Duration::ZERO).unwrap()),
            vec![1, 3, 5]
        );
        assert_eq!(
            ids(&store.receive("s", b, 0, Duration::ZERO).unwrap()),
            vec![2, 4, 6]
        );
    }

    #[test]
    fn a_full_stream_times_out_with_4202_and_an_ack_makes_room() {
        let store = StreamStore::new();
        let config = ProducerConfig {
            page_size: 4096,
            max_stream_size: 8192,
            ..ProducerConfig::default()
        };
        let c = store.create_consumer("s", &sub("a")).unwrap();
        let p = store.create_producer("s", &config).unwrap();
        let page = Bytes::from(vec![0u8; 4096]);
        store
            .send("s", p, vec![page.clone()], Duration::ZERO)
            .unwrap();
        store
            .send("s", p, vec![page.clone()], Duration::ZERO)
            .unwrap();
        let error = store
            .send("s", p, vec![page.clone()], Duration::from_millis(20))
            .unwrap_err();
        assert_eq!(error.code(), ErrorCode::SharedMemoryLimited);
        store.receive("s", c, 1, Duration::ZERO).unwrap();
        store.ack("s", c, 1).unwrap();
        store.send("s", p, vec![page], Duration::ZERO).unwrap();
    }

    #[test]
    fn without_subscriptions_elements_are_dropped_unless_retained() {
        let store = StreamStore::new();
        let p = store
            .create_producer("s", &ProducerConfig::default())
            .unwrap();
        store
            .send("s", p, vec!["x".into()], Duration::ZERO)
            .unwrap();
        assert_eq!(store.used_bytes("s"), 0);
        let retain = ProducerConfig {
            retain_for_num_consumers: 1,
            ..ProducerConfig::default()
        };
        let q = store.create_producer("r", &retain).unwrap();
        store
            .send("r", q, vec!["y".into()], Duration::ZERO)
            .unwrap();
        let c = store.create_consumer("r", &sub("late")).unwrap();
        let got = store.receive("r", c, 1, Duration::ZERO).unwrap();
        assert_eq!(got[0].value, Bytes::from("y"));
    }

    #[test]
    fn delete_is_refused_while_in_use_and_auto_clean_up_removes() {
        let store = StreamStore::new();
        let p = store
            .create_producer("s", &ProducerConfig::default())
            .unwrap();
        let error = store.delete("s").unwrap_err();
        assert_eq!(error.code(), ErrorCode::DatasystemFailed);
        assert!(!store.close_producer("s", p).unwrap());
        store.delete("s").unwrap();
        assert!(!store.contains("s"));
        let auto = ProducerConfig {
            auto_clean_up: true,
            ..ProducerConfig::default()
        };
        let p = store.create_producer("t", &auto).unwrap();
        assert!(store.close_producer("t", p).unwrap());
        assert!(!store.contains("t"));
    }

    #[test]
    fn closed_handles_and_a_closed_store_fail_with_their_codes() {
        let store = StreamStore::new();
        let p = store
            .create_producer("s", &ProducerConfig::default())
            .unwrap();
        store.close_producer("s", p).unwrap();
        let error = store.send("s", p, vec![], Duration::ZERO).unwrap_err();
        assert_eq!(error.code(), ErrorCode::ClientAlreadyClosed);
        let c = store.create_consumer("s", &sub("a")).unwrap();
        let waiter = {
            let store = store.clone();
            std::thread::spawn(move || store.receive("s", c, 1, Duration::from_secs(30)))
        };
        std::thread::sleep(Duration::from_millis(50));
        store.close(Error::new(ErrorCode::Finalized, "finalized"));
        assert_eq!(
            waiter.join().unwrap().unwrap_err().code(),
            ErrorCode::Finalized
        );
    }
}
