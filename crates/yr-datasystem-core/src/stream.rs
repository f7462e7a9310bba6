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
//! - **Lifetime.** A stream is created by its first producer or consumer. `delete` refuses a
//!   stream that still has producers or consumers; `auto_clean_up` removes it when its last
//!   producer or consumer closes.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use yr_common::{Error, ErrorCode, Result};

/// The longest stream or subscription name, in bytes.
pub const MAX_NAME_SIZE: usize = 255;
/// Page sizes are multiples of this (4 KiB).
pub const PAGE_ALIGNMENT: usize = 4 * 1024;
/// The largest page (16 MiB).
pub const MAX_PAGE_SIZE: usize = 16 * 1024 * 1024;
/// The most subscriptions a producer may ask to retain elements for.
pub const MAX_RETAIN_FOR_NUM_CONSUMERS: u32 = 16;
/// The most bytes one receive returns when it was not given a number to expect.
pub const MAX_RECEIVE_BYTES: usize = 16 * 1024 * 1024;

/// How a producer writes to its stream (openYuanrong's `ProducerConf`).
///
/// ```
/// use std::time::Duration;
/// use yr_datasystem_core::stream::ProducerConfig;
/// let config = ProducerConfig::default();
/// assert_eq!(config.delay_flush_time, Duration::from_millis(5));
/// assert_eq!(config.page_size, 1024 * 1024);
/// assert!(config.validate().is_ok());
/// let bad = ProducerConfig { page_size: 0, ..ProducerConfig::default() };
/// assert_eq!(bad.validate().unwrap_err().code().number(), 1001);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProducerConfig {
    /// The longest a sent element waits in the producer before it is flushed to the stream
    /// (default 5 ms; zero flushes every element at once).
    pub delay_flush_time: Duration,
    /// The producer's batch: a full page is flushed at once (default 1 MiB; a multiple of
    /// 4 KiB, at most 16 MiB).
    pub page_size: usize,
    /// The most bytes the stream holds that some subscription has not acked yet (default
    /// 100 MiB; at least `page_size`). A send waits for room.
    pub max_stream_size: usize,
    /// Keep elements for the first N subscriptions, even those created after the elements
    /// were sent (default 0: elements sent while there is no subscription are dropped; at most
    /// 16).
    pub retain_for_num_consumers: u32,
    /// Remove the stream when its last producer or consumer closes (default false).
    pub auto_clean_up: bool,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            delay_flush_time: Duration::from_millis(5),
            page_size: 1024 * 1024,
            max_stream_size: 100 * 1024 * 1024,
            retain_for_num_consumers: 0,
            auto_clean_up: false,
        }
    }
}

impl ProducerConfig {
    /// Check the configuration: 1001 naming the bad field.
    pub fn validate(&self) -> Result<()> {
        if self.page_size == 0
            || !self.page_size.is_multiple_of(PAGE_ALIGNMENT)
            || self.page_size > MAX_PAGE_SIZE
        {
            return Err(StreamError::InvalidArgument(format!(
                "page_size {} is invalid; use a multiple of 4096 bytes between 4 KiB and 16 MiB",
                self.page_size
            ))
            .into());
        }
        if self.max_stream_size < self.page_size {
            return Err(StreamError::InvalidArgument(format!(
                "max_stream_size {} is smaller than page_size {}; use a max_stream_size of at \
                 least one page",
                self.max_stream_size, self.page_size
            ))
            .into());
        }
        if self.retain_for_num_consumers > MAX_RETAIN_FOR_NUM_CONSUMERS {
            return Err(StreamError::InvalidArgument(format!(
                "retain_for_num_consumers {} is larger than {MAX_RETAIN_FOR_NUM_CONSUMERS}; use \
                 0 to {MAX_RETAIN_FOR_NUM_CONSUMERS}",
                self.retain_for_num_consumers
            ))
            .into());
        }
        Ok(())
    }
}

/// How the consumers of one subscription share its elements.
///
/// ```
/// use yr_datasystem_core::stream::SubscriptionType;
/// assert_eq!(SubscriptionType::default(), SubscriptionType::Stream);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SubscriptionType {
    /// openYuanrong's `STREAM`: the subscription has one consumer, which gets every element.
    #[default]
    Stream,
    /// A shared subscription (beyond openYuanrong, which defines `ROUND_ROBIN` but does not
    /// support it): any number of consumers join it, and each element goes to one of them, in
    /// turn.
    RoundRobin,
}

/// A consumer's subscription (openYuanrong's `SubscriptionConfig`).
///
/// ```
/// use yr_datasystem_core::stream::{SubscriptionConfig, SubscriptionType};
/// let shared = SubscriptionConfig::new("workers", SubscriptionType::RoundRobin);
/// assert!(shared.validate().is_ok());
/// assert_eq!(SubscriptionConfig::new("", SubscriptionType::Stream).validate().unwrap_err().code().number(), 1001);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubscriptionConfig {
    /// The subscription's name: unique per stream for [`SubscriptionType::Stream`], shared by
    /// the consumers of a [`SubscriptionType::RoundRobin`] subscription.
    pub subscription_name: String,
    /// How its consumers share the elements.
    pub subscription_type: SubscriptionType,
}

impl SubscriptionConfig {
    /// A subscription named `name` of type `subscription_type`.
    pub fn new(name: impl Into<String>, subscription_type: SubscriptionType) -> Self {
        SubscriptionConfig {
            subscription_name: name.into(),
            subscription_type,
        }
    }

    /// Check the subscription: a name of 1 to 255 bytes, else 1001.
    pub fn validate(&self) -> Result<()> {
        validate_name("subscription", &self.subscription_name)
    }
}

/// A received element: its id in the stream (acks name it) and its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Element {
    /// The element's id: 1 for the stream's first element, then one more per element.
    pub id: u64,
    /// The bytes the producer sent.
    pub value: Bytes,
}

/// What can go wrong with a stream call. Converts to a [`yr_common::Error`] with its code.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// A name, a configuration or an argument failed validation (1001).
    #[error("{0}")]
    InvalidArgument(String),
    /// The stream had no room for the elements within the send's timeout (4202).
    #[error(
        "stream {stream:?} is full: {used} of its {max} bytes (max_stream_size) are not acked \
         yet, and {wanted} more bytes found no room within {timeout:?}; let consumers receive and \
         ack, raise max_stream_size, or send with a longer timeout"
    )]
    Full {
        /// The stream.
        stream: String,
        /// Bytes not acked yet.
        used: usize,
        /// The stream's limit.
        max: usize,
        /// Bytes the send needed.
        wanted: usize,
        /// The send's timeout.
        timeout: Duration,
    },
    /// The producer or consumer was closed, or never existed here (4298).
    #[error(
        "the {what} {id} of stream {stream:?} is closed (or the stream was removed); create a \
         new {what}"
    )]
    Closed {
        /// "producer" or "consumer".
        what: &'static str,
        /// Its id.
        id: u64,
        /// The stream.
        stream: String,
    },
    /// `delete` of a stream that still has producers or consumers (4299).
    #[error(
        "stream {stream:?} cannot be deleted: it still has {producers} producer(s) and \
         {consumers} consumer(s); close them first"
    )]
    InUse {
        /// The stream.
        stream: String,
        /// Its producers.
        producers: u64,
        /// Its consumers.
        consumers: u64,
    },
    /// The store was closed (finalize): the error every call now gets.
    #[error("{0}")]
    StoreClosed(Error),
}

impl From<StreamError> for Error {
    fn from(error: StreamError) -> Error {
        let code = match &error {
            StreamError::InvalidArgument(_) => ErrorCode::ParamInvalid,
            StreamError::Full { .. } => ErrorCode::SharedMemoryLimited,
            StreamError::Closed { .. } => ErrorCode::ClientAlreadyClosed,
            StreamError::InUse { .. } => ErrorCode::DatasystemFailed,
            StreamError::StoreClosed(error) => return error.clone(),
        };
        Error::new(code, error.to_string())
    }
}

fn validate_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_NAME_SIZE {
        return Err(StreamError::InvalidArgument(format!(
            "the {what} name {name:?} is {} bytes; use a name of 1 to {MAX_NAME_SIZE} bytes",
            name.len()
        ))
        .into());
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-_.:/@".contains(*c)))
    {
        return Err(StreamError::InvalidArgument(format!(
            "the {what} name {name:?} contains {bad:?}; use letters, digits and - _ . : / @"
        ))
        .into());
    }
    Ok(())
}

/// Check a stream name: 1 to 255 bytes of letters, digits and `-_.:/@`, else 1001.
pub fn validate_stream_name(name: &str) -> Result<()> {
    validate_name("stream", name)
}

/// Check one element against its producer's configuration: at most `max_stream_size` bytes.
pub fn validate_element(stream: &str, len: usize, config: &ProducerConfig) -> Result<()> {
    if len > config.max_stream_size {
        return Err(StreamError::InvalidArgument(format!(
            "an element of {len} bytes cannot fit stream {stream:?}, whose max_stream_size is {} \
             bytes; send smaller elements or raise max_stream_size",
            config.max_stream_size
        ))
        .into());
    }
    Ok(())
}

/// One consumer's share of its subscription.
#[derive(Debug, Default)]
struct ConsumerState {
    /// Dealt to this consumer, not received yet (ascending ids).
    pending: VecDeque<u64>,
    /// Received, not acked yet (ascending ids).
    unacked: VecDeque<u64>,
    /// The highest id received.
    last_received: u64,
}

impl ConsumerState {
    /// The lowest id this consumer still holds.
    fn low(&self) -> Option<u64> {
        match (self.unacked.front(), self.pending.front()) {
            (Some(a), Some(b)) => Some(*a.min(b)),
            (a, b) => a.or(b).copied(),
        }
    }
}

/// Wait for `changed` until `deadline` (`None`: forever). Returns whether the deadline passed.
fn wait_changed<T>(
    changed: &Condvar,
    state: &mut parking_lot::MutexGuard<'_, T>,
    deadline: Option<Instant>,
) -> bool {
    match deadline {
        Some(deadline) => changed.wait_until(state, deadline).timed_out(),
        None => {
            changed.wait(state);
            false
        }
    }
}

fn insert_sorted(queue: &mut VecDeque<u64>, id: u64) {
    match queue.back() {
        Some(back) if *back > id => {
            let at = queue.partition_point(|x| *x < id);
            queue.insert(at, id);
        }
        _ => queue.push_back(id),
    }
}

#[derive(Debug)]
struct Subscription {
    kind: SubscriptionType,
    /// Its consumers, in the order they joined; elements are dealt to them in turn.
    consumers: Vec<u64>,
    /// The next consumer (index into `consumers`) to deal to.
    turn: usize,
}

#[derive(Debug)]
struct StreamState {
    config: ProducerConfig,
    /// Elements not reclaimed yet: ids `first_id..next_id`.
    elements: VecDeque<Bytes>,
    first_id: u64,
    next_id: u64,
    bytes: usize,
    producers: HashMap<u64, ()>,
    subscriptions: HashMap<String, Subscription>,
    consumers: HashMap<u64, (String, ConsumerState)>,
    /// Subscriptions ever created (for `retain_for_num_consumers`).
    subscriptions_created: u32,
    removed: bool,
}

impl StreamState {
    fn new(config: ProducerConfig) -> Self {
        StreamState {
            config,
            elements: VecDeque::new(),
            first_id: 1,
            next_id: 1,
            bytes: 0,
            producers: HashMap::new(),
            subscriptions: HashMap::new(),
            consumers: HashMap::new(),
            subscriptions_created: 0,
            removed: false,
        }
    }

    fn retaining(&self) -> bool {
        self.subscriptions_created < self.config.retain_for_num_consumers
    }

    /// Deal `id` to the next consumer of every subscription.
    fn deal(&mut self, id: u64) {
        for subscription in self.subscriptions.values_mut() {
            if subscription.consumers.is_empty() {
                continue;
            }
            let index = subscription.turn % subscription.consumers.len();
            subscription.turn = index + 1;
            let consumer = subscription.consumers[index];
            if let Some((_, state)) = self.consumers.get_mut(&consumer) {
                insert_sorted(&mut state.pending, id);
            }
        }
    }

    /// Drop the elements every subscription is done with.
    fn reclaim(&mut self) {
        if self.retaining() {
            return;
        }
        let low = self
            .consumers
            .values()
            .filter_map(|(_, state)| state.low())
            .min()
            .unwrap_or(self.next_id);
        while self.first_id < low {
            match self.elements.pop_front() {
                Some(element) => {
                    self.bytes -= element.len();
                    self.first_id += 1;
                }
                None => break,
            }
        }
    }
}

#[derive(Debug)]
struct Stream {
    name: String,
    state: Mutex<StreamState>,
    /// Elements arrived, room was freed, or the stream or store changed.
    changed: Condvar,
}

#[derive(Debug, Default)]
struct StoreInner {
    streams: Mutex<HashMap<String, Arc<Stream>>>,
    next_id: AtomicU64,
    closed: Mutex<Option<Error>>,
}

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
    /// An empty store.
    pub fn new() -> StreamStore {
        StreamStore::default()
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

    /// A new producer of stream `name` (created if it does not exist). The first producer's
    /// configuration is the stream's.
    pub fn create_producer(&self, name: &str, config: &ProducerConfig) -> Result<u64> {
        self.check_open()?;
        validate_stream_name(name)?;
        config.validate()?;
        loop {
            let stream = self.stream_or_create(name, config);
            let mut state = stream.state.lock();
            if state.removed {
                continue;
            }
            if state.producers.is_empty() {
                state.config = config.clone();
            }
            let id = self.new_id();
            state.producers.insert(id, ());
            return Ok(id);
        }
    }

    /// A new consumer of stream `name` (created if it does not exist) in `subscription`. 1001
    /// if a [`SubscriptionType::Stream`] subscription of that name already has its consumer,
    /// or the name is taken by a subscription of the other type.
    pub fn create_consumer(&self, name: &str, subscription: &SubscriptionConfig) -> Result<u64> {
        self.check_open()?;
        validate_stream_name(name)?;
        subscription.validate()?;
        loop {
            let stream = self.stream_or_create(name, &ProducerConfig::default());
            let mut state = stream.state.lock();
            if state.removed {
                continue;
            }
            let id = self.new_id();
            let sub_name = &subscription.subscription_name;
            let start = match state.subscriptions.get_mut(sub_name) {
                Some(existing) => {
                    if existing.kind != subscription.subscription_type {
                        return Err(StreamError::InvalidArgument(format!(
                            "subscription {sub_name:?} of stream {name:?} is of type {:?}, not \
                             {:?}; use its type or another name",
                            existing.kind, subscription.subscription_type
                        ))
                        .into());
                    }
                    if existing.kind == SubscriptionType::Stream {
                        return Err(StreamError::InvalidArgument(format!(
                            "subscription {sub_name:?} of stream {name:?} already has its \
                             consumer; use another subscription name, or a RoundRobin \
                             subscription to share elements between consumers"
                        ))
                        .into());
                    }
                    existing.consumers.push(id);
                    None
                }
                None => {
                    let start = if state.retaining() {
                        state.first_id
                    } else {
                        state.next_id
                    };
                    state.subscriptions_created = state.subscriptions_created.saturating_add(1);
                    state.subscriptions.insert(
                        sub_name.clone(),
                        Subscription {
                            kind: subscription.subscription_type,
                            consumers: vec![id],
                            turn: 0,
                        },
                    );
                    Some(start)
                }
            };
            let mut consumer = ConsumerState::default();
            if let Some(start) = start {
                consumer.pending = (start..state.next_id).collect();
            }
            state.consumers.insert(id, (sub_name.clone(), consumer));
            state.reclaim();
            return Ok(id);
        }
    }

    fn closed_error(stream: &str, what: &'static str, id: u64) -> Error {
        StreamError::Closed {
            what,
            id,
            stream: stream.to_string(),
        }
        .into()
    }

    /// Append `elements` from `producer`, all at once, waiting up to `timeout` for room (4202
    /// after it). 4298 if the producer is closed.
    pub fn send(
        &self,
        name: &str,
        producer: u64,
        elements: Vec<Bytes>,
        timeout: Duration,
    ) -> Result<()> {
        self.check_open()?;
        let stream = self
            .stream(name)
            .ok_or_else(|| Self::closed_error(name, "producer", producer))?;
        let wanted: usize = elements.iter().map(Bytes::len).sum();
        let deadline = Instant::now().checked_add(timeout);
        let mut state = stream.state.lock();
        loop {
            self.check_open()?;
            if state.removed || !state.producers.contains_key(&producer) {
                return Err(Self::closed_error(name, "producer", producer));
            }
            let max = state.config.max_stream_size;
            if state.bytes == 0 || state.bytes.saturating_add(wanted) <= max {
                break;
            }
            let timed_out = wait_changed(&stream.changed, &mut state, deadline);
            if timed_out
                && state.bytes != 0
                && state.bytes.saturating_add(wanted) > state.config.max_stream_size
            {
                return Err(StreamError::Full {
                    stream: name.to_string(),
                    used: state.bytes,
                    max: state.config.max_stream_size,
                    wanted,
                    timeout,
                }
                .into());
            }
        }
        let keep = !state.subscriptions.is_empty() || state.retaining();
        for element in elements {
            let id = state.next_id;
            state.next_id += 1;
            state.bytes += element.len();
            state.elements.push_back(element);
            if keep {
                state.deal(id);
            }
        }
        state.reclaim();
        drop(state);
        stream.changed.notify_all();
        Ok(())
    }

    /// Up to `expect_num` elements for `consumer` (0: all that are ready, up to 16 MiB), waiting
    /// up to `timeout` until `expect_num` (0: one) are ready. A timeout is not an error: it
    /// returns what is ready.
    pub fn receive(
        &self,
        name: &str,
        consumer: u64,
        expect_num: usize,
        timeout: Duration,
    ) -> Result<Vec<Element>> {
        self.check_open()?;
        let stream = self
            .stream(name)
            .ok_or_else(|| Self::closed_error(name, "consumer", consumer))?;
        let deadline = Instant::now().checked_add(timeout);
        let wanted = expect_num.max(1);
        let mut state = stream.state.lock();
        loop {
            self.check_open()?;
            if state.removed {
                return Err(Self::closed_error(name, "consumer", consumer));
            }
            let ready = match state.consumers.get(&consumer) {
                Some((_, consumer)) => consumer.pending.len(),
                None => return Err(Self::closed_error(name, "consumer", consumer)),
            };
            if ready >= wanted {
                break;
            }
            let timed_out = wait_changed(&stream.changed, &mut state, deadline);
            if timed_out {
                break;
            }
        }
        let state = &mut *state;
        let Some((_, consumer_state)) = state.consumers.get_mut(&consumer) else {
            return Err(Self::closed_error(name, "consumer", consumer));
        };
        let limit = if expect_num == 0 {
            usize::MAX
        } else {
            expect_num
        };
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while out.len() < limit {
            let Some(&id) = consumer_state.pending.front() else {
                break;
            };
            let index = usize::try_from(id - state.first_id).unwrap_or(usize::MAX);
            let Some(value) = state.elements.get(index) else {
                // Reclaimed cannot happen while pending; skip defensively.
                consumer_state.pending.pop_front();
                continue;
            };
            if expect_num == 0 && !out.is_empty() && bytes + value.len() > MAX_RECEIVE_BYTES {
                break;
            }
            bytes += value.len();
            out.push(Element {
                id,
                value: value.clone(),
            });
            consumer_state.pending.pop_front();
            insert_sorted(&mut consumer_state.unacked, id);
            consumer_state.last_received = consumer_state.last_received.max(id);
        }
        Ok(out)
    }

    /// Acknowledge every element up to `id` that `consumer` received; their memory is
    /// reclaimed once every subscription acked them. 1001 for an id it has not received.
    pub fn ack(&self, name: &str, consumer: u64, id: u64) -> Result<()> {
        self.check_open()?;
        let stream = self
            .stream(name)
            .ok_or_else(|| Self::closed_error(name, "consumer", consumer))?;
        let mut state = stream.state.lock();
        let Some((_, consumer_state)) = state.consumers.get_mut(&consumer) else {
            return Err(Self::closed_error(name, "consumer", consumer));
        };
        if id == 0 || id > consumer_state.last_received {
            return Err(StreamError::InvalidArgument(format!(
                "consumer {consumer} of stream {name:?} cannot ack element {id}: the last element \
                 it received is {}; ack the id of an element receive returned",
                consumer_state.last_received
            ))
            .into());
        }
        while consumer_state.unacked.front().is_some_and(|x| *x <= id) {
            consumer_state.unacked.pop_front();
        }
        state.reclaim();
        drop(state);
        stream.changed.notify_all();
        Ok(())
    }

    fn remove_if_unused(&self, stream: &Stream, state: &mut StreamState) -> bool {
        if state.config.auto_clean_up && state.producers.is_empty() && state.consumers.is_empty() {
            state.removed = true;
            self.inner.streams.lock().remove(&stream.name);
            return true;
        }
        false
    }

    /// Close `producer`. Returns whether that removed the stream (`auto_clean_up`).
    pub fn close_producer(&self, name: &str, producer: u64) -> Result<bool> {
        self.check_open()?;
        let stream = self
            .stream(name)
            .ok_or_else(|| Self::closed_error(name, "producer", producer))?;
        let mut state = stream.state.lock();
        if state.producers.remove(&producer).is_none() {
            return Err(Self::closed_error(name, "producer", producer));
        }
        let removed = self.remove_if_unused(&stream, &mut state);
        drop(state);
        stream.changed.notify_all();
        Ok(removed)
    }

    /// Close `consumer`, acking what it received. In a shared subscription, what it held goes
    /// to the other consumers; the last consumer's close ends the subscription. Returns
    /// whether that removed the stream (`auto_clean_up`).
    pub fn close_consumer(&self, name: &str, consumer: u64) -> Result<bool> {
        self.check_open()?;
        let stream = self
            .stream(name)
            .ok_or_else(|| Self::closed_error(name, "consumer", consumer))?;
        let mut state = stream.state.lock();
        let Some((subscription_name, consumer_state)) = state.consumers.remove(&consumer) else {
            return Err(Self::closed_error(name, "consumer", consumer));
        };
        let mut orphans: Vec<u64> = Vec::new();
        let mut remaining = Vec::new();
        if let Some(subscription) = state.subscriptions.get_mut(&subscription_name) {
            subscription.consumers.retain(|c| *c != consumer);
            if subscription.consumers.is_empty() {
                state.subscriptions.remove(&subscription_name);
            } else {
                // Received but unacked elements count as acked (openYuanrong: closing acks);
                // those not received yet go to the others.
                orphans.extend(consumer_state.pending.iter().copied());
                remaining = subscription.consumers.clone();
            }
        }
        for (i, id) in orphans.into_iter().enumerate() {
            let to = remaining[i % remaining.len()];
            if let Some((_, other)) = state.consumers.get_mut(&to) {
                insert_sorted(&mut other.pending, id);
            }
        }
        state.reclaim();
        let removed = self.remove_if_unused(&stream, &mut state);
        drop(state);
        stream.changed.notify_all();
        Ok(removed)
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

    fn sub(name: &str) -> SubscriptionConfig {
        SubscriptionConfig::new(name, SubscriptionType::Stream)
    }

    fn ids(elements: &[Element]) -> Vec<u64> {
        elements.iter().map(|e| e.id).collect()
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
