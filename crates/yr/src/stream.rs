//! Streams: named publish/subscribe channels kept by the data system (openYuanrong's
//! `create_stream_producer`/`create_stream_consumer` API). Producers send byte elements;
//! consumers in subscriptions receive and ack them.
//!
//! - A stream is created by its first producer or consumer, anywhere in the cluster, and
//!   lives on that node's data worker (its home); producers and consumers on other nodes talk
//!   to the home directly.
//! - Elements are FIFO per producer. Every subscription gets every element sent after it was
//!   created ([`SubscriptionType::Stream`], one consumer each). A
//!   [`SubscriptionType::RoundRobin`] subscription is shared: its consumers take the elements
//!   in turn (beyond openYuanrong).
//! - [`ProducerConfig::max_stream_size`] bounds the bytes not yet acked by every
//!   subscription: [`Producer::send`] waits for room and fails with 4202 after its timeout.
//!   [`Consumer::ack`] frees elements up to an id.
//! - Closed producers and consumers fail with 4298; bad names and configurations with 1001;
//!   [`delete_stream`] of a stream in use with 4299.
//!
//! Producers and consumers close when dropped.

use std::time::Duration;

use yr_common::Result;
use yr_runtime::stream::{ConsumerClient, ProducerClient};
pub use yr_runtime::stream::{ProducerConfig, SubscriptionConfig, SubscriptionType};

/// A received element.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Element {
    /// Its id in the stream: 1 for the stream's first element, then one more per element.
    /// [`Consumer::ack`] takes it.
    pub id: u64,
    /// The bytes the producer sent.
    pub value: Vec<u8>,
}

/// A producer of one stream. Close it with [`Producer::close`] (dropping it closes it too).
pub struct Producer {
    inner: Box<dyn ProducerClient>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer").finish_non_exhaustive()
    }
}

/// A consumer in one subscription of a stream. Close it with [`Consumer::close`] (dropping it
/// closes it too).
pub struct Consumer {
    inner: Box<dyn ConsumerClient>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer").finish_non_exhaustive()
    }
}

/// A new producer of stream `name`, creating the stream if it does not exist. 1001 for a
/// name that is empty, longer than 255 bytes or has characters other than letters, digits and
/// `-_.:/@`, and for a bad configuration (a `page_size` that is 0 or not a multiple of 4 KiB,
/// a `max_stream_size` smaller than `page_size`, `retain_for_num_consumers` over 16).
///
/// ```
/// # yr::init(yr::Config::local()).unwrap();
/// let producer = yr::create_stream_producer("events", yr::ProducerConfig::default()).unwrap();
/// producer.send(b"hello", yr::FOREVER).unwrap();
/// producer.close().unwrap();
///
/// let bad = yr::ProducerConfig { page_size: 0, ..yr::ProducerConfig::default() };
/// let error = yr::create_stream_producer("events", bad).unwrap_err();
/// assert_eq!(error.code(), yr::ErrorCode::ParamInvalid);
/// # yr::finalize().unwrap();
/// ```
pub fn create_stream_producer(name: &str, config: ProducerConfig) -> Result<Producer> {
    Ok(Producer {
        inner: yr_runtime::current()?
            .streams()
            .create_producer(name, &config)?,
    })
}

/// A new consumer of stream `name` in `config`'s subscription, creating the stream if it does
/// not exist. It receives the elements sent after its subscription was created (and those a
/// producer retained with `retain_for_num_consumers`). 1001 for a bad name, a
/// [`SubscriptionType::Stream`] subscription that already has its consumer, or a subscription
/// name used with the other type.
///
/// ```
/// use std::time::Duration;
/// # yr::init(yr::Config::local()).unwrap();
/// let subscription = yr::SubscriptionConfig::new("audit", yr::SubscriptionType::Stream);
/// let consumer = yr::create_stream_consumer("orders", subscription).unwrap();
/// let producer = yr::create_stream_producer("orders", yr::ProducerConfig::default()).unwrap();
/// producer.send(b"order-1", Duration::from_secs(1)).unwrap();
/// let elements = consumer.receive(Duration::from_secs(5), 1).unwrap();
/// assert_eq!(elements[0].value, b"order-1");
/// consumer.ack(elements[0].id).unwrap();
/// # yr::finalize().unwrap();
/// ```
pub fn create_stream_consumer(name: &str, config: SubscriptionConfig) -> Result<Consumer> {
    Ok(Consumer {
        inner: yr_runtime::current()?
            .streams()
            .create_consumer(name, &config)?,
    })
}

/// Delete stream `name` and the elements it holds. 4299 while it has producers or consumers;
/// deleting a stream that does not exist succeeds.
///
/// ```
/// # yr::init(yr::Config::local()).unwrap();
/// let producer = yr::create_stream_producer("logs", yr::ProducerConfig::default()).unwrap();
/// let error = yr::delete_stream("logs").unwrap_err();
/// assert_eq!(error.code(), yr::ErrorCode::DatasystemFailed);
/// producer.close().unwrap();
/// yr::delete_stream("logs").unwrap();
/// # yr::finalize().unwrap();
/// ```
pub fn delete_stream(name: &str) -> Result<()> {
    yr_runtime::current()?.streams().delete_stream(name)
}

/// How many producers stream `name` has in the whole cluster (0 if it does not exist).
///
/// ```
/// # yr::init(yr::Config::local()).unwrap();
/// let producer = yr::create_stream_producer("metrics", yr::ProducerConfig::default()).unwrap();
/// assert_eq!(yr::query_global_producers_num("metrics").unwrap(), 1);
/// producer.close().unwrap();
/// assert_eq!(yr::query_global_producers_num("metrics").unwrap(), 0);
/// # yr::finalize().unwrap();
/// ```
pub fn query_global_producers_num(name: &str) -> Result<u64> {
    Ok(yr_runtime::current()?.streams().counts(name)?.0)
}

/// How many consumers stream `name` has in the whole cluster (0 if it does not exist).
///
/// ```
/// # yr::init(yr::Config::local()).unwrap();
/// let shared = yr::SubscriptionConfig::new("workers", yr::SubscriptionType::RoundRobin);
/// let _a = yr::create_stream_consumer("jobs", shared.clone()).unwrap();
/// let _b = yr::create_stream_consumer("jobs", shared).unwrap();
/// assert_eq!(yr::query_global_consumers_num("jobs").unwrap(), 2);
/// # yr::finalize().unwrap();
/// ```
pub fn query_global_consumers_num(name: &str) -> Result<u64> {
    Ok(yr_runtime::current()?.streams().counts(name)?.1)
}

impl Producer {
    /// Send `element`. It is buffered for at most `delay_flush_time` (or until a page is
    /// full) and then appended to the stream, after this producer's earlier elements. If the
    /// stream is full, waits up to `timeout` for consumers to ack, then fails with 4202 and
    /// the element is not sent. 1001 for an element larger than `max_stream_size`; 4298 after
    /// [`Producer::close`].
    ///
    /// ```
    /// use std::time::Duration;
    /// # yr::init(yr::Config::local()).unwrap();
    /// let small = yr::ProducerConfig {
    ///     page_size: 4096,
    ///     max_stream_size: 4096,
    ///     ..yr::ProducerConfig::default()
    /// };
    /// let _consumer = yr::create_stream_consumer(
    ///     "tiny",
    ///     yr::SubscriptionConfig::new("slow", yr::SubscriptionType::Stream),
    /// ).unwrap();
    /// let producer = yr::create_stream_producer("tiny", small).unwrap();
    /// producer.send(&[0; 4096], Duration::from_secs(1)).unwrap();
    /// // Nobody acked the first page: the stream is full.
    /// let error = producer.send(&[0; 4096], Duration::from_millis(50)).unwrap_err();
    /// assert_eq!(error.code(), yr::ErrorCode::SharedMemoryLimited);
    /// # yr::finalize().unwrap();
    /// ```
    pub fn send(&self, element: &[u8], timeout: Duration) -> Result<()> {
        self.inner.send(element, timeout)
    }

    /// Flush what is buffered and close the producer. A second close, and every later call,
    /// fails with 4298.
    ///
    /// ```
    /// # yr::init(yr::Config::local()).unwrap();
    /// let producer = yr::create_stream_producer("closing", yr::ProducerConfig::default()).unwrap();
    /// producer.close().unwrap();
    /// let error = producer.send(b"late", yr::FOREVER).unwrap_err();
    /// assert_eq!(error.code(), yr::ErrorCode::ClientAlreadyClosed);
    /// # yr::finalize().unwrap();
    /// ```
    pub fn close(&self) -> Result<()> {
        self.inner.close()
    }
}

impl Consumer {
    /// Up to `expect_num` elements, in order, waiting up to `timeout` until that many are
    /// ready. A timeout is not an error: it returns the elements that are ready (maybe none).
    /// `expect_num` 0 returns as soon as any element is ready, with all that are (up to
    /// 16 MiB). 4298 after [`Consumer::close`].
    ///
    /// ```
    /// use std::time::Duration;
    /// # yr::init(yr::Config::local()).unwrap();
    /// let consumer = yr::create_stream_consumer(
    ///     "numbers",
    ///     yr::SubscriptionConfig::new("reader", yr::SubscriptionType::Stream),
    /// ).unwrap();
    /// let producer = yr::create_stream_producer("numbers", yr::ProducerConfig::default()).unwrap();
    /// for i in 0..3u8 {
    ///     producer.send(&[i], yr::FOREVER).unwrap();
    /// }
    /// let elements = consumer.receive(Duration::from_secs(5), 3).unwrap();
    /// assert_eq!(elements.iter().map(|e| e.value[0]).collect::<Vec<_>>(), vec![0, 1, 2]);
    /// assert!(consumer.receive(Duration::from_millis(10), 1).unwrap().is_empty());
    /// # yr::finalize().unwrap();
    /// ```
    pub fn receive(&self, timeout: Duration, expect_num: usize) -> Result<Vec<Element>> {
        Ok(self
            .inner
            .receive(timeout, expect_num)?
            .into_iter()
            .map(|element| Element {
                id: element.id,
                value: element.value.to_vec(),
            })
            .collect())
    }

    /// Acknowledge every received element up to `id`; the stream frees an element once every
    /// subscription acked it. 1001 for an id this consumer has not received.
    ///
    /// ```
    /// use std::time::Duration;
    /// # yr::init(yr::Config::local()).unwrap();
    /// let consumer = yr::create_stream_consumer(
    ///     "acks",
    ///     yr::SubscriptionConfig::new("reader", yr::SubscriptionType::Stream),
    /// ).unwrap();
    /// let error = consumer.ack(7).unwrap_err();
    /// assert_eq!(error.code(), yr::ErrorCode::ParamInvalid);
    /// # yr::finalize().unwrap();
    /// ```
    pub fn ack(&self, id: u64) -> Result<()> {
        self.inner.ack(id)
    }

    /// Close the consumer; what it received counts as acked, and in a shared subscription what
    /// it had not received yet goes to the other consumers. Later calls fail with 4298.
    ///
    /// ```
    /// use std::time::Duration;
    /// # yr::init(yr::Config::local()).unwrap();
    /// let consumer = yr::create_stream_consumer(
    ///     "closing-consumer",
    ///     yr::SubscriptionConfig::new("reader", yr::SubscriptionType::Stream),
    /// ).unwrap();
    /// consumer.close().unwrap();
    /// let error = consumer.receive(Duration::ZERO, 1).unwrap_err();
    /// assert_eq!(error.code(), yr::ErrorCode::ClientAlreadyClosed);
    /// # yr::finalize().unwrap();
    /// ```
    pub fn close(&self) -> Result<()> {
        self.inner.close()
    }
}
