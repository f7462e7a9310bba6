//! [`RemoteStore`]: a [`MetaStore`] served by another process (the master's
//! [`MetaService`](crate::MetaService)), over a tonic channel.
//!
//! Every call has a timeout (5 s by default); a call that times out or cannot reach the server
//! fails with [`MetaError::Unavailable`], and the outcome of such a write is unknown: read the
//! key again before retrying. The channel reconnects by itself on the next call.
//!
//! A store may be given several servers ([`RemoteStore::connect_any`]: every master of a
//! cluster on etcd serves the same store). Calls go to one of them; when it cannot be reached,
//! the next call goes to the next. A read that fails that way is sent again to the next server
//! at once, and so is a write whose connection was refused (it was never sent).
//!
//! Watches survive the server going away: when the stream breaks, a task reconnects with
//! backoff (50 ms doubling to 2 s) and resumes after the last revision it received, so the
//! receiver sees every event once and in order. If the server no longer remembers that revision
//! the channel closes, and a new `watch_prefix` from it fails with [`MetaError::Compacted`].

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use tonic::{Response, Status, Streaming};
use yr_proto::meta as proto;
use yr_proto::meta::meta_service_client::MetaServiceClient;

use crate::error::MetaError;
use crate::store::{Compare, KeyValue, LeaseId, MetaStore, TxnOp, TxnResponse, WatchEvent};
use crate::wire;

/// Events a watch may have waiting for its receiver.
const WATCH_BUFFER: usize = 1024;
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// A [`MetaStore`] reached over gRPC. Cheap to clone; clones share the connections.
#[derive(Clone)]
pub struct RemoteStore {
    servers: Arc<[Server]>,
    /// The server calls go to.
    current: Arc<AtomicUsize>,
    timeout: Duration,
}

/// One server of the store.
struct Server {
    client: MetaServiceClient<Channel>,
    address: Arc<str>,
}

/// Whether a call may be sent again to another server after a failure.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Resend {
    /// A read: whenever the server could not be reached or did not answer.
    Read,
    /// A write: only when it certainly never reached the server.
    Write,
}

impl RemoteStore {
    /// The per-call timeout unless [`with_timeout`](Self::with_timeout) says otherwise.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

    /// Connects to the meta service at `address` (`"http://host:port"`). Fails with
    /// [`MetaError::Unavailable`] if it cannot be reached within the timeout, and with
    /// [`MetaError::InvalidArgument`] if the address is malformed.
    pub async fn connect(address: &str) -> Result<RemoteStore, MetaError> {
        let connect = yr_transport::connect_with(
            address,
            yr_common::ErrorCode::EtcdOperationError,
            keep_alive,
        );
        let channel = tokio::time::timeout(Self::DEFAULT_TIMEOUT, connect)
            .await
            .map_err(|_| {
                MetaError::Unavailable(format!(
                    "could not connect to the meta store at {address} within {:?}; check that the master is running",
                    Self::DEFAULT_TIMEOUT
                ))
            })?
            .map_err(connect_error)?;
        Ok(RemoteStore::from_channels(vec![(
            channel,
            address.to_string(),
        )]))
    }

    /// Connects to the first of `addresses` that answers (each `"http://host:port"`), keeping
    /// the others for when it goes away. Fails as [`connect`](Self::connect) does when none can
    /// be reached.
    ///
    /// ```no_run
    /// # async fn example() -> Result<(), yr_meta::MetaError> {
    /// let store = yr_meta::RemoteStore::connect_any(&[
    ///     "http://10.0.0.1:22770".to_string(),
    ///     "http://10.0.0.2:22770".to_string(),
    /// ]).await?;
    /// println!("talking to {}", store.address());
    /// # Ok(()) }
    /// ```
    pub async fn connect_any(addresses: &[String]) -> Result<RemoteStore, MetaError> {
        let mut channels = Vec::with_capacity(addresses.len());
        let mut first = None;
        let mut last_error = MetaError::InvalidArgument("no meta store address given".into());
        for address in addresses {
            if first.is_none() {
                match Self::connect(address).await {
                    Ok(store) => {
                        first = Some(channels.len());
                        let server = &store.servers[0];
                        channels.push((server.client.clone(), address.clone()));
                        continue;
                    }
                    Err(err @ MetaError::InvalidArgument(_)) => return Err(err),
                    Err(err) => last_error = err,
                }
            }
            let channel = yr_transport::connect_lazy_with(
                address,
                yr_common::ErrorCode::EtcdOperationError,
                keep_alive,
            )
            .map_err(connect_error)?;
            channels.push((Self::client_of(channel), address.clone()));
        }
        let Some(first) = first else {
            return Err(last_error);
        };
        let servers: Vec<Server> = channels
            .into_iter()
            .map(|(client, address)| Server {
                client,
                address: address.into(),
            })
            .collect();
        Ok(RemoteStore {
            servers: servers.into(),
            current: Arc::new(AtomicUsize::new(first)),
            timeout: Self::DEFAULT_TIMEOUT,
        })
    }

    /// A store whose connection is made on the first call, so it can be built before the
    /// master is up.
    pub fn connect_lazy(address: &str) -> Result<RemoteStore, MetaError> {
        let channel = yr_transport::connect_lazy_with(
            address,
            yr_common::ErrorCode::EtcdOperationError,
            keep_alive,
        )
        .map_err(connect_error)?;
        Ok(RemoteStore::from_channels(vec![(
            channel,
            address.to_string(),
        )]))
    }

    fn client_of(channel: Channel) -> MetaServiceClient<Channel> {
        MetaServiceClient::new(channel)
            .max_decoding_message_size(yr_transport::max_message_bytes())
            .max_encoding_message_size(yr_transport::max_message_bytes())
    }

    fn from_channels(channels: Vec<(Channel, String)>) -> RemoteStore {
        let servers: Vec<Server> = channels
            .into_iter()
            .map(|(channel, address)| Server {
                client: Self::client_of(channel),
                address: address.into(),
            })
            .collect();
        RemoteStore {
            servers: servers.into(),
            current: Arc::new(AtomicUsize::new(0)),
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }

    /// The same store with another per-call timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> RemoteStore {
        self.timeout = timeout;
        self
    }

    /// The address this store talks to now.
    pub fn address(&self) -> &str {
        &self.servers[self.current.load(Ordering::Relaxed) % self.servers.len()].address
    }

    /// Sends a call to the current server; when that server cannot be reached, the next call
    /// goes to the next one, and this one is sent there at once if `resend` allows.
    async fn call<T, F, Fut>(&self, what: &str, resend: Resend, call: F) -> Result<T, MetaError>
    where
        F: Fn(MetaServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let mut attempts = self.servers.len();
        loop {
            let index = self.current.load(Ordering::Relaxed) % self.servers.len();
            let server = &self.servers[index];
            let address = &server.address;
            let (error, again) = match tokio::time::timeout(self.timeout, call(server.client.clone())).await {
                Ok(Ok(response)) => return Ok(response.into_inner()),
                Ok(Err(status)) if yr_transport::refused(address) => {
                    return Err(MetaError::Unauthenticated(format!(
                        "{what} at {address}: {}",
                        status.message()
                    )))
                }
                Ok(Err(status)) => {
                    let unreachable = matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                    );
                    let again = unreachable
                        && (resend == Resend::Read || yr_transport::never_sent(&status));
                    let error = wire::error_from_status(status, address, what);
                    if !unreachable {
                        return Err(error);
                    }
                    (error, again)
                }
                Err(_) => (
                    MetaError::Unavailable(format!(
                        "{what} at meta store {address} got no answer within {:?}; check that the master is running and reachable",
                        self.timeout
                    )),
                    resend == Resend::Read,
                ),
            };
            if self.servers.len() > 1 {
                let next = (index + 1) % self.servers.len();
                if self
                    .current
                    .compare_exchange(index, next, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
                {
                    tracing::info!(from = %address, to = %self.servers[next].address, %error, "meta store server unreachable; switching");
                }
            }
            attempts -= 1;
            if !again || attempts == 0 {
                return Err(error);
            }
        }
    }

    async fn open_watch(
        &self,
        prefix: &str,
        after_revision: u64,
    ) -> Result<Streaming<proto::WatchResponse>, MetaError> {
        let request = proto::WatchRequest {
            prefix: prefix.to_string(),
            after_revision,
        };
        self.call("watch", Resend::Read, |mut client| {
            let request = request.clone();
            async move { client.watch(request).await }
        })
        .await
    }
}

fn keep_alive(endpoint: Endpoint) -> Endpoint {
    endpoint
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
}

/// A connection that failed: refused for its token (1014), a malformed address, or a master
/// that cannot be reached.
fn connect_error(error: yr_common::Error) -> MetaError {
    match error.code() {
        yr_common::ErrorCode::AuthorizeFailed => {
            MetaError::Unauthenticated(error.message().to_string())
        }
        yr_common::ErrorCode::ParamInvalid => {
            MetaError::InvalidArgument(error.message().to_string())
        }
        _ => MetaError::Unavailable(format!(
            "{}; check that the master is running",
            error.message()
        )),
    }
}

/// Forwards a watch stream to `tx`, reconnecting and resuming after the last revision received
/// whenever the stream breaks, until the receiver is dropped.
async fn resume_watch(
    store: RemoteStore,
    prefix: String,
    mut last_revision: u64,
    mut stream: Streaming<proto::WatchResponse>,
    tx: mpsc::Sender<WatchEvent>,
) {
    loop {
        loop {
            let message = tokio::select! {
                message = stream.message() => message,
                _ = tx.closed() => return,
            };
            match message {
                Ok(Some(message)) => {
                    for event in message.events {
                        if let Some(event) = wire::event_from_proto(event) {
                            if tx.send(event).await.is_err() {
                                return;
                            }
                        }
                    }
                    last_revision = last_revision.max(message.revision);
                }
                Ok(None) => {
                    tracing::debug!(%prefix, last_revision, "meta store watch stream ended; resuming");
                    break;
                }
                Err(status) => {
                    tracing::debug!(%prefix, last_revision, %status, "meta store watch stream broke; resuming");
                    break;
                }
            }
        }
        let mut backoff = FIRST_BACKOFF;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = tx.closed() => return,
            }
            match store.open_watch(&prefix, last_revision).await {
                Ok(resumed) => {
                    tracing::info!(%prefix, last_revision, address = %store.address(), "meta store watch resumed");
                    stream = resumed;
                    break;
                }
                Err(err @ MetaError::Compacted { .. }) => {
                    tracing::error!(%prefix, %err, "meta store watch cannot resume; closing it so its owner re-reads");
                    return;
                }
                Err(err) => {
                    tracing::warn!(%prefix, last_revision, %err, "meta store watch could not resume yet; retrying");
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

#[async_trait]
impl MetaStore for RemoteStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, MetaError> {
        let request = proto::GetRequest {
            key: key.to_string(),
        };
        let response = self
            .call("get", Resend::Read, |mut client| {
                let request = request.clone();
                async move { client.get(request).await }
            })
            .await?;
        Ok(response.kv.map(wire::kv_from_proto))
    }

    async fn range(&self, prefix: &str) -> Result<Vec<KeyValue>, MetaError> {
        let request = proto::RangeRequest {
            prefix: prefix.to_string(),
        };
        let response = self
            .call("range", Resend::Read, |mut client| {
                let request = request.clone();
                async move { client.range(request).await }
            })
            .await?;
        Ok(response.kvs.into_iter().map(wire::kv_from_proto).collect())
    }

    async fn put(
        &self,
        key: &str,
        value: Bytes,
        lease: Option<LeaseId>,
    ) -> Result<KeyValue, MetaError> {
        let request = proto::PutRequest {
            key: key.to_string(),
            value,
            lease,
        };
        let response = self
            .call("put", Resend::Write, |mut client| {
                let request = request.clone();
                async move { client.put(request).await }
            })
            .await?;
        response.kv.map(wire::kv_from_proto).ok_or_else(|| {
            MetaError::Unavailable(format!(
                "meta store {} answered a put of {key:?} without the written record",
                self.address()
            ))
        })
    }

    async fn delete(&self, key: &str) -> Result<bool, MetaError> {
        let request = proto::DeleteRequest {
            key: key.to_string(),
        };
        let response = self
            .call("delete", Resend::Write, |mut client| {
                let request = request.clone();
                async move { client.delete(request).await }
            })
            .await?;
        Ok(response.deleted)
    }

    async fn txn(
        &self,
        compares: Vec<Compare>,
        success: Vec<TxnOp>,
        failure: Vec<TxnOp>,
    ) -> Result<TxnResponse, MetaError> {
        let request = proto::TxnRequest {
            compares: compares.into_iter().map(wire::compare_to_proto).collect(),
            success: success.into_iter().map(wire::op_to_proto).collect(),
            failure: failure.into_iter().map(wire::op_to_proto).collect(),
        };
        let response = self
            .call("txn", Resend::Write, |mut client| {
                let request = request.clone();
                async move { client.txn(request).await }
            })
            .await?;
        Ok(wire::txn_response_from_proto(response))
    }

    async fn watch_prefix(
        &self,
        prefix: &str,
        after_revision: u64,
    ) -> Result<mpsc::Receiver<WatchEvent>, MetaError> {
        // Pin "from now" to a revision, so a resume after a reconnect misses nothing.
        let start = if after_revision == 0 {
            self.current_revision().await?
        } else {
            after_revision
        };
        let stream = self.open_watch(prefix, start).await?;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(resume_watch(
            self.clone(),
            prefix.to_string(),
            start,
            stream,
            tx,
        ));
        Ok(rx)
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, MetaError> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        if ttl_ms == 0 {
            return Err(MetaError::InvalidArgument(
                "a lease TTL must be at least 1 ms".to_string(),
            ));
        }
        let response = self
            .call("lease grant", Resend::Write, |mut client| async move {
                client
                    .lease_grant(proto::LeaseGrantRequest { ttl_ms })
                    .await
            })
            .await?;
        Ok(response.lease)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), MetaError> {
        self.call("lease keep-alive", Resend::Read, |mut client| async move {
            client
                .lease_keep_alive(proto::LeaseKeepAliveRequest { lease })
                .await
        })
        .await?;
        Ok(())
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), MetaError> {
        self.call("lease revoke", Resend::Read, |mut client| async move {
            client
                .lease_revoke(proto::LeaseRevokeRequest { lease })
                .await
        })
        .await?;
        Ok(())
    }

    async fn current_revision(&self) -> Result<u64, MetaError> {
        let response = self
            .call("current revision", Resend::Read, |mut client| async move {
                client
                    .current_revision(proto::CurrentRevisionRequest {})
                    .await
            })
            .await?;
        Ok(response.revision)
    }
}
