//! Streams in a cluster: unary calls to data workers. Creating a producer or consumer, and
//! deleting or querying a stream, go first to this process's node; if the stream's home is
//! another node, the answer names it and the call goes there. A producer or consumer then
//! talks to the home directly, over one cached channel per address.
//!
//! A producer batches: `send` adds the element to a buffer of at most one page, which is
//! flushed when it is full, when its oldest element has waited `delay_flush_time` (by a
//! flusher thread), or on `close`. Flushes go out one at a time, in order, so elements stay
//! FIFO. A flush waits for room in the stream; a send that needs to flush and finds no room
//! within its timeout fails with 4202 and its element is not sent. Long waits (a receive, a
//! flush into a full stream) are cut into calls of at most [`MAX_CALL_WAIT`], so no data
//! worker thread waits long for a client that may be gone.
//!
//! **A lost home** (docs/design/025-stream-home-failover.md). When a call cannot reach the
//! stream's home (3002 or 4205, or no answer within [`CALL_LIMIT`]), or the node answers that
//! the stream lives elsewhere now, the producer or consumer resumes: it asks its own node for
//! the stream's home again (which the lost home's successor takes over) and re-registers there
//! under the same id, then repeats the call, for up to [`RESUME_BUDGET`] with backoff (also
//! while the meta store answers 3005); after that the call fails with the last code and says
//! so. A producer's batches are numbered, so a batch whose answer was lost is appended once; a
//! consumer resumes after the highest element id it received, so it gets each element once.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use tonic::transport::Channel;
use yr_common::backoff::Backoff;
use yr_common::{Error, ErrorCode, Result};
use yr_datasystem_core::stream::{validate_element, validate_stream_name};
use yr_datasystem_core::wire::{
    producer_config_to_proto, subscription_type_to_proto, timeout_to_ms,
};
use yr_proto::ds as pb;
use yr_proto::ds::data_worker_client::DataWorkerClient;
use yr_proto::error_from_proto;

use super::{transport, ClusterBackend};
use crate::blocking;
use crate::stream::{
    closed_handle, ConsumerClient, Element, Finalized, ProducerClient, ProducerConfig,
    StreamClient, SubscriptionConfig,
};

/// The longest one call waits inside a data worker.
pub const MAX_CALL_WAIT: Duration = Duration::from_secs(2);
/// How long `close` waits to flush what a producer still buffers.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(30);
/// The most redirects one call follows.
const MAX_HOPS: usize = 4;
/// The longest a call waits for its answer: its wait at the data worker, the home's update of
/// the stream's backup, and room for a loaded machine. No answer by then counts as a lost home.
pub const CALL_LIMIT: Duration = Duration::from_secs(15);
/// How long a producer or consumer keeps trying to resume on a stream's new home.
pub const RESUME_BUDGET: Duration = Duration::from_secs(30);

/// Whether `error` says the stream's home could not be reached (or could not reach its backup).
fn unreachable_home(error: &Error) -> bool {
    matches!(
        error.code(),
        ErrorCode::ConnectionFailed | ErrorCode::InnerCommunication
    )
}

struct Shared {
    io: tokio::runtime::Handle,
    local: String,
    channels: Mutex<HashMap<String, Channel>>,
    finalized: Finalized,
    /// The backend: once this process has lost its node (3006), stream calls fail with that
    /// too, rather than resuming through a node that may have been started again at the same
    /// address and knows nothing of this process.
    backend: std::sync::Weak<super::Inner>,
}

/// The stream client of a cluster backend.
pub struct ClusterStreams {
    shared: Arc<Shared>,
}

impl ClusterBackend {
    /// A stream client whose calls start at the node this backend is connected to.
    pub fn stream_client(&self) -> ClusterStreams {
        ClusterStreams {
            shared: Arc::new(Shared {
                io: self.inner.io.clone(),
                local: self.inner.data.address().to_string(),
                channels: Mutex::new(HashMap::new()),
                finalized: Finalized::default(),
                backend: Arc::downgrade(&self.inner),
            }),
        }
    }
}

fn check(error: Option<yr_proto::v1::ErrorInfo>) -> Result<()> {
    match error {
        Some(error) => Err(error_from_proto(&error)),
        None => Ok(()),
    }
}

fn home(home: String) -> Option<String> {
    (!home.is_empty()).then_some(home)
}

impl Shared {
    /// Run one call to the data worker at `address` on the IO runtime and wait for its answer.
    fn call<R, F>(
        &self,
        address: &str,
        make: impl FnOnce(DataWorkerClient<Channel>) -> F + Send + 'static,
    ) -> Result<R>
    where
        R: Send + 'static,
        F: Future<Output = std::result::Result<tonic::Response<R>, tonic::Status>> + Send,
    {
        self.finalized.check()?;
        if let Some(backend) = self.backend.upgrade() {
            backend.check_connected()?;
        }
        let key = address.to_string();
        let address = key.clone();
        let cached = self.channels.lock().get(&key).cloned();
        let (sender, receiver) = crossbeam_channel::bounded(1);
        let (new_channel, channel_made) = crossbeam_channel::bounded::<Channel>(1);
        self.io.spawn(async move {
            let result = async {
                let channel = match cached {
                    Some(channel) => channel,
                    None => {
                        let channel =
                            transport::connect(&address, ErrorCode::ConnectionFailed).await?;
                        let _ = new_channel.send(channel.clone());
                        channel
                    }
                };
                let client = DataWorkerClient::new(channel)
                    .max_decoding_message_size(yr_transport::max_message_bytes())
                    .max_encoding_message_size(yr_transport::max_message_bytes());
                let Ok(answer) = tokio::time::timeout(CALL_LIMIT, make(client)).await else {
                    return Err(Error::new(
                        ErrorCode::ConnectionFailed,
                        format!(
                            "the data worker at {address} did not answer a stream call within \
                             {CALL_LIMIT:?}; check that the node there is running"
                        ),
                    ));
                };
                answer.map(tonic::Response::into_inner).map_err(|status| {
                    Error::new(
                        yr_transport::status_to_code(&status, ErrorCode::ConnectionFailed),
                        format!(
                            "the data worker at {address} failed a stream call: {}; check \
                                 that the node there is running",
                            status.message()
                        ),
                    )
                })
            }
            .await;
            let _ = sender.send(result);
        });
        let result = blocking::blocking(|| receiver.recv()).unwrap_or_else(|_| {
            Err(Error::new(
                ErrorCode::Finalized,
                "yr was finalized while a stream call was in flight; keep yr initialized until \
                 its stream calls return",
            ))
        });
        match &result {
            // Connect again on the next call.
            Err(error) if error.code() == ErrorCode::ConnectionFailed => {
                self.channels.lock().remove(&key);
            }
            _ => {
                if let Ok(channel) = channel_made.try_recv() {
                    self.channels.lock().insert(key, channel);
                }
            }
        }
        result
    }
}

impl Shared {
    /// Send a call to this node, then to the home it names, until one answers for itself.
    fn routed<R, F>(
        &self,
        name: &str,
        make: impl Fn(DataWorkerClient<Channel>) -> F + Send + Sync + Clone + 'static,
        home_of: impl Fn(&R) -> Option<String>,
    ) -> Result<(String, R)>
    where
        R: Send + 'static,
        F: Future<Output = std::result::Result<tonic::Response<R>, tonic::Status>> + Send,
    {
        let mut address = self.local.clone();
        for _ in 0..MAX_HOPS {
            let reply = self.call(&address, make.clone())?;
            match home_of(&reply) {
                Some(next) => address = next,
                None => return Ok((address, reply)),
            }
        }
        Err(Error::new(
            ErrorCode::DatasystemFailed,
            format!(
                "the home of stream {name:?} kept moving (last seen at {address}); retry the call"
            ),
        ))
    }

    /// Run `attempt` at the stream's home (`home`), resuming on the stream's new home with
    /// `resume` (which answers the new home's address) while the home cannot be reached or
    /// says the stream moved, within [`RESUME_BUDGET`]. `attempt` answers `Ok(Err(home))`
    /// when the node says the stream lives at `home` now.
    fn at_home<R>(
        &self,
        stream: &str,
        home: &Mutex<String>,
        resume: impl Fn() -> Result<String>,
        mut attempt: impl FnMut(&str) -> Result<std::result::Result<R, String>>,
    ) -> Result<R> {
        let mut deadline: Option<Instant> = None;
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            let at = home.lock().clone();
            let mut failure = match attempt(&at) {
                Ok(Ok(reply)) => return Ok(reply),
                Ok(Err(moved)) => Error::new(
                    ErrorCode::ConnectionFailed,
                    format!("its home moved from {at} to {moved}"),
                ),
                Err(error) if unreachable_home(&error) => error,
                Err(error) => return Err(error),
            };
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + RESUME_BUDGET);
            tracing::info!(stream, home = %at, error = %failure, "resuming on the stream's home");
            loop {
                self.finalized.check()?;
                if Instant::now() >= deadline {
                    return Err(Error::new(
                        failure.code(),
                        format!(
                            "stream {stream:?}: its home at {at} was lost, and no node took it \
                             over within {RESUME_BUDGET:?} ({}); check the cluster's nodes with \
                             `yr status`, then create the producer or consumer again",
                            failure.message()
                        ),
                    ));
                }
                match resume() {
                    Ok(new_home) => {
                        tracing::info!(stream, home = %new_home, "resumed on the stream's home");
                        *home.lock() = new_home;
                        break;
                    }
                    // The meta store may be failing over too (3005): keep trying.
                    Err(error)
                        if unreachable_home(&error)
                            || error.code() == ErrorCode::EtcdOperationError =>
                    {
                        failure = error;
                        std::thread::sleep(backoff.next_delay());
                    }
                    Err(error) => {
                        return Err(Error::new(
                            error.code(),
                            format!(
                                "stream {stream:?}: its home at {at} could not be reached ({}), \
                                 and asking for its new home failed: {}",
                                failure.message(),
                                error.message()
                            ),
                        ))
                    }
                }
            }
        }
    }
}

impl StreamClient for ClusterStreams {
    fn create_producer(
        &self,
        name: &str,
        config: &ProducerConfig,
    ) -> Result<Box<dyn ProducerClient>> {
        validate_stream_name(name)?;
        config.validate()?;
        let request = pb::StreamCreateProducerRequest {
            stream: name.to_string(),
            config: Some(producer_config_to_proto(config)),
            resume_id: 0,
        };
        let (address, reply) = self.shared.routed(
            name,
            move |mut client| {
                let request = request.clone();
                async move { client.stream_create_producer(request).await }
            },
            |reply: &pb::StreamCreateResponse| home(reply.home.clone()),
        )?;
        check(reply.error)?;
        Ok(Box::new(ClusterProducer::start(
            self.shared.clone(),
            address,
            name.to_string(),
            reply.id,
            config.clone(),
        )))
    }

    fn create_consumer(
        &self,
        name: &str,
        subscription: &SubscriptionConfig,
    ) -> Result<Box<dyn ConsumerClient>> {
        validate_stream_name(name)?;
        subscription.validate()?;
        let request = consumer_request(name, subscription, 0, 0);
        let (address, reply) = self.shared.routed(
            name,
            move |mut client| {
                let request = request.clone();
                async move { client.stream_create_consumer(request).await }
            },
            |reply: &pb::StreamCreateResponse| home(reply.home.clone()),
        )?;
        check(reply.error)?;
        Ok(Box::new(ClusterConsumer {
            shared: self.shared.clone(),
            home: Mutex::new(address),
            stream: name.to_string(),
            subscription: subscription.clone(),
            id: reply.id,
            last_received: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            calls: Mutex::new(()),
        }))
    }

    fn delete_stream(&self, name: &str) -> Result<()> {
        validate_stream_name(name)?;
        let request = pb::StreamNameRequest {
            stream: name.to_string(),
        };
        let (_, reply) = self.shared.routed(
            name,
            move |mut client| {
                let request = request.clone();
                async move { client.stream_delete(request).await }
            },
            |reply: &pb::StreamResponse| home(reply.home.clone()),
        )?;
        check(reply.error)
    }

    fn counts(&self, name: &str) -> Result<(u64, u64)> {
        validate_stream_name(name)?;
        let request = pb::StreamNameRequest {
            stream: name.to_string(),
        };
        let (_, reply) = self.shared.routed(
            name,
            move |mut client| {
                let request = request.clone();
                async move { client.stream_query(request).await }
            },
            |reply: &pb::StreamQueryResponse| home(reply.home.clone()),
        )?;
        check(reply.error)?;
        Ok((reply.producers, reply.consumers))
    }

    fn shutdown(&self, error: &Error) {
        self.shared
            .finalized
            .set(&crate::stream::finalized_error(error));
    }
}

fn consumer_request(
    name: &str,
    subscription: &SubscriptionConfig,
    resume_id: u64,
    resume_after: u64,
) -> pb::StreamCreateConsumerRequest {
    pb::StreamCreateConsumerRequest {
        stream: name.to_string(),
        subscription_name: subscription.subscription_name.clone(),
        subscription_type: subscription_type_to_proto(subscription.subscription_type) as i32,
        resume_id,
        resume_after,
    }
}

/// Re-register a producer or consumer of stream `name` on its home (`make` sends its create
/// with `resume_id`), through this process's node: the home's address.
fn resume_at<F>(
    shared: &Shared,
    name: &str,
    make: impl Fn(DataWorkerClient<Channel>) -> F + Send + Sync + Clone + 'static,
) -> Result<String>
where
    F: Future<
            Output = std::result::Result<tonic::Response<pb::StreamCreateResponse>, tonic::Status>,
        > + Send,
{
    let (address, reply) = shared.routed(name, make, |reply: &pb::StreamCreateResponse| {
        home(reply.home.clone())
    })?;
    check(reply.error)?;
    Ok(address)
}

/// What a call at the stream's home came to: `Ok(Err(home))` if the node says the stream
/// lives at `home` now.
fn followed<R>(
    moved: String,
    error: Option<yr_proto::v1::ErrorInfo>,
    reply: R,
) -> Result<std::result::Result<R, String>> {
    match home(moved) {
        Some(moved) => Ok(Err(moved)),
        None => check(error).map(|()| Ok(reply)),
    }
}

#[derive(Default)]
struct Pending {
    elements: Vec<Bytes>,
    bytes: usize,
    /// When the oldest buffered element was sent.
    since: Option<Instant>,
}

struct ProducerShared {
    client: Arc<Shared>,
    home: Mutex<String>,
    stream: String,
    id: u64,
    /// The number of the last batch flushed.
    batches: AtomicU64,
    config: ProducerConfig,
    pending: Mutex<Pending>,
    pending_changed: Condvar,
    /// Held by whoever is flushing: flushes go out one at a time, in order.
    flush_lane: Mutex<()>,
    /// Sends and close, one at a time.
    sends: Mutex<()>,
    closed: AtomicBool,
    /// Why the flusher thread gave up (elements were lost).
    failed: Mutex<Option<Error>>,
}

fn full_error(stream: &str, config: &ProducerConfig, timeout: Duration) -> Error {
    Error::new(
        ErrorCode::SharedMemoryLimited,
        format!(
            "stream {stream:?} is full: its max_stream_size of {} bytes holds elements some \
             subscription has not acked, and the send found no room within {timeout:?}; let \
             consumers receive and ack, raise max_stream_size, or send with a longer timeout",
            config.max_stream_size
        ),
    )
}

impl ProducerShared {
    /// Re-register on the stream's home: its address.
    fn resume(&self) -> Result<String> {
        let request = pb::StreamCreateProducerRequest {
            stream: self.stream.clone(),
            config: Some(producer_config_to_proto(&self.config)),
            resume_id: self.id,
        };
        resume_at(&self.client, &self.stream, move |mut client| {
            let request = request.clone();
            async move { client.stream_create_producer(request).await }
        })
    }

    /// Send batch number `batch` to the stream's home, following it.
    fn send_batch(&self, batch: u64, elements: &[Bytes], wait: Duration) -> Result<()> {
        self.client.at_home(
            &self.stream,
            &self.home,
            || self.resume(),
            |at| {
                let request = pb::StreamSendRequest {
                    stream: self.stream.clone(),
                    producer_id: self.id,
                    elements: elements.to_vec(),
                    timeout_ms: timeout_to_ms(wait),
                    batch,
                };
                let reply = self.client.call(at, move |mut client| async move {
                    client.stream_send(request).await
                })?;
                followed(reply.home, reply.error, ())
            },
        )
    }

    fn check(&self) -> Result<()> {
        self.client.finalized.check()?;
        if self.closed.load(Ordering::Acquire) {
            return Err(closed_handle("producer", &self.stream));
        }
        if let Some(error) = &*self.failed.lock() {
            return Err(Error::new(
                error.code(),
                format!(
                    "an earlier flush of this producer of stream {:?} failed, and its elements \
                     were not sent: {}",
                    self.stream,
                    error.message()
                ),
            ));
        }
        Ok(())
    }

    /// Send everything buffered, waiting until `deadline` for room; on failure the batch is
    /// buffered again, ahead of anything newer.
    fn flush(&self, deadline: Option<Instant>, timeout: Duration) -> Result<()> {
        let lane = match deadline {
            Some(deadline) => self.flush_lane.try_lock_until(deadline),
            None => Some(self.flush_lane.lock()),
        };
        let Some(_lane) = lane else {
            return Err(full_error(&self.stream, &self.config, timeout));
        };
        let batch = {
            let mut pending = self.pending.lock();
            pending.since = None;
            pending.bytes = 0;
            std::mem::take(&mut pending.elements)
        };
        if batch.is_empty() {
            return Ok(());
        }
        let number = self.batches.fetch_add(1, Ordering::Relaxed) + 1;
        loop {
            let wait = match deadline {
                Some(deadline) => deadline.saturating_duration_since(Instant::now()),
                None => MAX_CALL_WAIT,
            }
            .min(MAX_CALL_WAIT);
            match self.send_batch(number, &batch, wait) {
                Ok(()) => return Ok(()),
                Err(error)
                    if error.code() == ErrorCode::SharedMemoryLimited
                        && deadline.is_none_or(|d| Instant::now() < d)
                        && self.client.finalized.check().is_ok() => {}
                Err(error) => {
                    let mut pending = self.pending.lock();
                    let newer = std::mem::replace(&mut pending.elements, batch);
                    pending.elements.extend(newer);
                    pending.bytes = pending.elements.iter().map(Bytes::len).sum();
                    pending.since = Some(Instant::now());
                    return Err(if error.code() == ErrorCode::SharedMemoryLimited {
                        full_error(&self.stream, &self.config, timeout)
                    } else {
                        error
                    });
                }
            }
        }
    }

    /// The flusher thread: flush a buffer whose oldest element has waited `delay_flush_time`.
    fn run_flusher(self: Arc<Self>) {
        let delay = self.config.delay_flush_time;
        loop {
            let due = {
                let mut pending = self.pending.lock();
                loop {
                    if self.closed.load(Ordering::Acquire) || self.client.finalized.check().is_err()
                    {
                        return;
                    }
                    if let Some(since) = pending.since {
                        break since + delay;
                    }
                    self.pending_changed
                        .wait_for(&mut pending, Duration::from_millis(200));
                }
            };
            let now = Instant::now();
            if now < due {
                std::thread::sleep((due - now).min(Duration::from_millis(50)));
                continue;
            }
            let deadline = Instant::now() + MAX_CALL_WAIT;
            match self.flush(Some(deadline), MAX_CALL_WAIT) {
                Ok(()) => {}
                Err(error) if error.code() == ErrorCode::SharedMemoryLimited => {}
                Err(error) if error.code() == ErrorCode::Finalized => return,
                Err(error) => {
                    tracing::warn!(stream = %self.stream, error = %error, "a producer's flush failed");
                    *self.failed.lock() = Some(error);
                    return;
                }
            }
        }
    }

    /// Take `element` back out of the buffer after a failed flush (it is the newest).
    fn take_back(&self) {
        let mut pending = self.pending.lock();
        if let Some(element) = pending.elements.pop() {
            pending.bytes -= element.len();
        }
        if pending.elements.is_empty() {
            pending.since = None;
        }
    }
}

struct ClusterProducer {
    shared: Arc<ProducerShared>,
    flusher: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl ClusterProducer {
    fn start(
        client: Arc<Shared>,
        home: String,
        stream: String,
        id: u64,
        config: ProducerConfig,
    ) -> ClusterProducer {
        let shared = Arc::new(ProducerShared {
            client,
            home: Mutex::new(home),
            stream,
            id,
            batches: AtomicU64::new(0),
            config,
            pending: Mutex::new(Pending::default()),
            pending_changed: Condvar::new(),
            flush_lane: Mutex::new(()),
            sends: Mutex::new(()),
            closed: AtomicBool::new(false),
            failed: Mutex::new(None),
        });
        let flusher = if shared.config.delay_flush_time.is_zero() {
            None
        } else {
            let thread_shared = shared.clone();
            std::thread::Builder::new()
                .name("yr-stream-flush".into())
                .spawn(move || thread_shared.run_flusher())
                .ok()
        };
        ClusterProducer {
            shared,
            flusher: Mutex::new(flusher),
        }
    }
}

impl ProducerClient for ClusterProducer {
    fn send(&self, element: &[u8], timeout: Duration) -> Result<()> {
        let shared = &*self.shared;
        shared.check()?;
        validate_element(&shared.stream, element.len(), &shared.config)?;
        let _send = shared.sends.lock();
        let deadline = Instant::now().checked_add(timeout);
        let page_size = shared.config.page_size;
        let immediate = shared.config.delay_flush_time.is_zero() || self.flusher.lock().is_none();
        let fits = {
            let pending = shared.pending.lock();
            pending.elements.is_empty() || pending.bytes + element.len() <= page_size
        };
        if !fits {
            shared.flush(deadline, timeout)?;
        }
        let full = {
            let mut pending = shared.pending.lock();
            pending.elements.push(Bytes::copy_from_slice(element));
            pending.bytes += element.len();
            if pending.since.is_none() {
                pending.since = Some(Instant::now());
                shared.pending_changed.notify_one();
            }
            pending.bytes >= page_size
        };
        if immediate || full {
            if let Err(error) = shared.flush(deadline, timeout) {
                shared.take_back();
                return Err(error);
            }
        }
        Ok(())
    }

    fn close(&self) -> Result<()> {
        let shared = &*self.shared;
        shared.client.finalized.check()?;
        let _send = shared.sends.lock();
        if shared.closed.swap(true, Ordering::AcqRel) {
            return Err(closed_handle("producer", &shared.stream));
        }
        shared.pending_changed.notify_all();
        if let Some(flusher) = self.flusher.lock().take() {
            let _ = flusher.join();
        }
        let flushed = shared.flush(
            Instant::now().checked_add(CLOSE_FLUSH_TIMEOUT),
            CLOSE_FLUSH_TIMEOUT,
        );
        let closed = shared.client.at_home(
            &shared.stream,
            &shared.home,
            || shared.resume(),
            |at| {
                let request = pb::StreamCloseRequest {
                    stream: shared.stream.clone(),
                    id: shared.id,
                };
                let reply = shared.client.call(at, move |mut client| async move {
                    client.stream_close_producer(request).await
                })?;
                followed(reply.home, reply.error, ())
            },
        );
        flushed.and(closed)
    }
}

impl Drop for ClusterProducer {
    fn drop(&mut self) {
        if !self.shared.closed.load(Ordering::Acquire) {
            let _ = ProducerClient::close(self);
        }
        self.shared.closed.store(true, Ordering::Release);
        self.shared.pending_changed.notify_all();
    }
}

struct ClusterConsumer {
    shared: Arc<Shared>,
    home: Mutex<String>,
    stream: String,
    subscription: SubscriptionConfig,
    id: u64,
    /// The highest element id received.
    last_received: AtomicU64,
    closed: AtomicBool,
    calls: Mutex<()>,
}

impl ClusterConsumer {
    /// Re-register on the stream's home, after the last element received: its address.
    fn resume(&self) -> Result<String> {
        let request = consumer_request(
            &self.stream,
            &self.subscription,
            self.id,
            self.last_received.load(Ordering::Acquire),
        );
        resume_at(&self.shared, &self.stream, move |mut client| {
            let request = request.clone();
            async move { client.stream_create_consumer(request).await }
        })
    }

    /// A call (`send`, answering `home` and `error`) at the stream's home, following it.
    fn at_home<R, F>(
        &self,
        send: impl Fn(DataWorkerClient<Channel>) -> F + Send + Sync + Clone + 'static,
        reply_of: impl Fn(R) -> (String, Option<yr_proto::v1::ErrorInfo>, R),
    ) -> Result<R>
    where
        R: Send + 'static,
        F: Future<Output = std::result::Result<tonic::Response<R>, tonic::Status>> + Send,
    {
        self.shared.at_home(
            &self.stream,
            &self.home,
            || self.resume(),
            |at| {
                let (moved, error, reply) = reply_of(self.shared.call(at, send.clone())?);
                followed(moved, error, reply)
            },
        )
    }

    fn check(&self) -> Result<()> {
        self.shared.finalized.check()?;
        if self.closed.load(Ordering::Acquire) {
            return Err(closed_handle("consumer", &self.stream));
        }
        Ok(())
    }
}

impl ConsumerClient for ClusterConsumer {
    fn receive(&self, timeout: Duration, expect_num: usize) -> Result<Vec<Element>> {
        self.check()?;
        let _call = self.calls.lock();
        let deadline = Instant::now().checked_add(timeout);
        let mut out: Vec<Element> = Vec::new();
        loop {
            let wait = match deadline {
                Some(deadline) => deadline.saturating_duration_since(Instant::now()),
                None => MAX_CALL_WAIT,
            }
            .min(MAX_CALL_WAIT);
            let request = pb::StreamReceiveRequest {
                stream: self.stream.clone(),
                consumer_id: self.id,
                expect_num: if expect_num == 0 {
                    0
                } else {
                    (expect_num - out.len()) as u64
                },
                timeout_ms: timeout_to_ms(wait),
            };
            let reply = self.at_home(
                move |mut client| {
                    let request = request.clone();
                    async move { client.stream_receive(request).await }
                },
                |mut reply: pb::StreamReceiveResponse| {
                    (std::mem::take(&mut reply.home), reply.error.take(), reply)
                },
            )?;
            for (id, value) in reply.ids.into_iter().zip(reply.values) {
                self.last_received.fetch_max(id, Ordering::AcqRel);
                out.push(Element { id, value });
            }
            let enough = if expect_num == 0 {
                !out.is_empty()
            } else {
                out.len() >= expect_num
            };
            if enough || deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(out);
            }
            self.check()?;
        }
    }

    fn ack(&self, id: u64) -> Result<()> {
        self.check()?;
        let request = pb::StreamAckRequest {
            stream: self.stream.clone(),
            consumer_id: self.id,
            element_id: id,
        };
        self.answered_at_home(move |mut client| {
            let request = request.clone();
            async move { client.stream_ack(request).await }
        })
    }

    fn close(&self) -> Result<()> {
        self.shared.finalized.check()?;
        if self.closed.swap(true, Ordering::AcqRel) {
            return Err(closed_handle("consumer", &self.stream));
        }
        let request = pb::StreamCloseRequest {
            stream: self.stream.clone(),
            id: self.id,
        };
        self.answered_at_home(move |mut client| {
            let request = request.clone();
            async move { client.stream_close_consumer(request).await }
        })
    }
}

impl ClusterConsumer {
    /// A call answered with a [`pb::StreamResponse`] at the stream's home, following it.
    fn answered_at_home<F>(
        &self,
        send: impl Fn(DataWorkerClient<Channel>) -> F + Send + Sync + Clone + 'static,
    ) -> Result<()>
    where
        F: Future<Output = std::result::Result<tonic::Response<pb::StreamResponse>, tonic::Status>>
            + Send,
    {
        self.at_home(send, |mut reply: pb::StreamResponse| {
            (std::mem::take(&mut reply.home), reply.error.take(), reply)
        })
        .map(drop)
    }
}

impl Drop for ClusterConsumer {
    fn drop(&mut self) {
        if !self.closed.load(Ordering::Acquire) {
            let _ = ConsumerClient::close(self);
        }
    }
}
