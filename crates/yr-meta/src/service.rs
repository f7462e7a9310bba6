//! The server side of `yr.meta.v1.MetaService`: [`MetaService`] serves any
//! [`MetaStore`] over gRPC, and [`serve`] runs it on a listener.
//!
//! ```no_run
//! # async fn run() -> Result<(), yr_meta::MetaError> {
//! use std::sync::Arc;
//! use yr_meta::{serve, EmbeddedStore};
//! let store = Arc::new(EmbeddedStore::open("/var/lib/yr/meta").await?);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:31501").await.unwrap();
//! serve(store, listener, async { tokio::signal::ctrl_c().await.ok(); }).await
//! # }
//! ```
//!
//! To put the service on a server that also carries other services, add
//! [`MetaService::into_server`] to it, serve it on `yr_transport::incoming_tcp(listener)` (authenticated connections), and
//! call [`MetaService::close_watches`] before shutting the server down so that its open watch
//! streams end.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use yr_proto::meta as proto;
pub use yr_proto::meta::meta_service_server::MetaServiceServer;

use crate::error::MetaError;
use crate::store::{MetaStore, WatchEvent};
use crate::wire;

/// Serves a [`MetaStore`] as `yr.meta.v1.MetaService`.
#[derive(Clone)]
pub struct MetaService {
    store: Arc<dyn MetaStore>,
    closing: Arc<watch::Sender<bool>>,
}

impl MetaService {
    /// A service over `store`.
    pub fn new(store: Arc<dyn MetaStore>) -> MetaService {
        MetaService {
            store,
            closing: Arc::new(watch::Sender::new(false)),
        }
    }

    /// The tonic service to add to a `tonic::transport::Server`.
    pub fn into_server(self) -> MetaServiceServer<MetaService> {
        MetaServiceServer::new(self)
            .max_decoding_message_size(yr_transport::max_message_bytes())
            .max_encoding_message_size(yr_transport::max_message_bytes())
    }

    /// Ends every open watch stream, now and for watches opened later; clients resume against
    /// the next server. Call before a graceful shutdown, which otherwise waits for them.
    pub fn close_watches(&self) {
        self.closing.send_replace(true);
    }
}

/// Serves `store` on `listener` until `shutdown` completes, then ends open watch streams and
/// stops once in-flight calls are answered.
pub async fn serve(
    store: Arc<dyn MetaStore>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), MetaError> {
    let address = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".to_string());
    let service = MetaService::new(store);
    let closer = service.clone();
    tracing::info!(%address, "meta store service listening");
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(yr_transport::incoming_tcp(listener), async move {
            shutdown.await;
            closer.close_watches();
        })
        .await
        .map_err(|e| MetaError::Unavailable(format!("meta store service on {address} failed: {e}")))
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<proto::WatchResponse, Status>> + Send>>;

// The handlers' return type is tonic's, Status and all.
#[allow(clippy::result_large_err)]
fn ok<T>(result: Result<T, MetaError>) -> Result<T, Status> {
    result.map_err(wire::status_from_error)
}

/// Forwards a store watch to a stream, one message per revision, until either side goes away
/// or the service closes.
async fn forward_watch(
    mut events: mpsc::Receiver<WatchEvent>,
    out: mpsc::Sender<Result<proto::WatchResponse, Status>>,
    mut closing: watch::Receiver<bool>,
) {
    let mut held: Option<WatchEvent> = None;
    loop {
        let first = match held.take() {
            Some(event) => event,
            None => tokio::select! {
                event = events.recv() => match event {
                    Some(event) => event,
                    None => return,
                },
                _ = closing.wait_for(|closing| *closing) => return,
                _ = out.closed() => return,
            },
        };
        let revision = first.revision();
        let mut batch = vec![wire::event_to_proto(first)];
        // A store queues all events of a revision at once, so the rest are already here.
        while let Ok(event) = events.try_recv() {
            if event.revision() == revision {
                batch.push(wire::event_to_proto(event));
            } else {
                held = Some(event);
                break;
            }
        }
        let message = proto::WatchResponse {
            revision,
            events: batch,
        };
        tokio::select! {
            sent = out.send(Ok(message)) => if sent.is_err() { return },
            _ = closing.wait_for(|closing| *closing) => return,
        }
    }
}

#[async_trait::async_trait]
impl proto::meta_service_server::MetaService for MetaService {
    async fn get(
        &self,
        request: Request<proto::GetRequest>,
    ) -> Result<Response<proto::GetResponse>, Status> {
        let kv = ok(self.store.get(&request.into_inner().key).await)?;
        Ok(Response::new(proto::GetResponse {
            kv: kv.map(wire::kv_to_proto),
        }))
    }

    async fn range(
        &self,
        request: Request<proto::RangeRequest>,
    ) -> Result<Response<proto::RangeResponse>, Status> {
        let kvs = ok(self.store.range(&request.into_inner().prefix).await)?;
        Ok(Response::new(proto::RangeResponse {
            kvs: kvs.into_iter().map(wire::kv_to_proto).collect(),
        }))
    }

    async fn put(
        &self,
        request: Request<proto::PutRequest>,
    ) -> Result<Response<proto::PutResponse>, Status> {
        let request = request.into_inner();
        let kv = ok(self
            .store
            .put(&request.key, request.value, request.lease)
            .await)?;
        Ok(Response::new(proto::PutResponse {
            kv: Some(wire::kv_to_proto(kv)),
        }))
    }

    async fn delete(
        &self,
        request: Request<proto::DeleteRequest>,
    ) -> Result<Response<proto::DeleteResponse>, Status> {
        let deleted = ok(self.store.delete(&request.into_inner().key).await)?;
        Ok(Response::new(proto::DeleteResponse { deleted }))
    }

    async fn txn(
        &self,
        request: Request<proto::TxnRequest>,
    ) -> Result<Response<proto::TxnResponse>, Status> {
        let request = request.into_inner();
        let compares = ok(request
            .compares
            .into_iter()
            .map(wire::compare_from_proto)
            .collect())?;
        let success = ok(request
            .success
            .into_iter()
            .map(wire::op_from_proto)
            .collect())?;
        let failure = ok(request
            .failure
            .into_iter()
            .map(wire::op_from_proto)
            .collect())?;
        let response = ok(self.store.txn(compares, success, failure).await)?;
        Ok(Response::new(wire::txn_response_to_proto(response)))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<proto::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let request = request.into_inner();
        if *self.closing.borrow() {
            return Err(wire::status_from_error(MetaError::Unavailable(
                "the meta store service is shutting down".to_string(),
            )));
        }
        let events = ok(self
            .store
            .watch_prefix(&request.prefix, request.after_revision)
            .await)?;
        let (out, stream) = mpsc::channel(16);
        tokio::spawn(forward_watch(events, out, self.closing.subscribe()));
        Ok(Response::new(Box::pin(ReceiverStream::new(stream))))
    }

    async fn lease_grant(
        &self,
        request: Request<proto::LeaseGrantRequest>,
    ) -> Result<Response<proto::LeaseGrantResponse>, Status> {
        let ttl = Duration::from_millis(request.into_inner().ttl_ms);
        let lease = ok(self.store.grant_lease(ttl).await)?;
        Ok(Response::new(proto::LeaseGrantResponse { lease }))
    }

    async fn lease_keep_alive(
        &self,
        request: Request<proto::LeaseKeepAliveRequest>,
    ) -> Result<Response<proto::LeaseKeepAliveResponse>, Status> {
        ok(self.store.keep_alive(request.into_inner().lease).await)?;
        Ok(Response::new(proto::LeaseKeepAliveResponse {}))
    }

    async fn lease_revoke(
        &self,
        request: Request<proto::LeaseRevokeRequest>,
    ) -> Result<Response<proto::LeaseRevokeResponse>, Status> {
        ok(self.store.revoke_lease(request.into_inner().lease).await)?;
        Ok(Response::new(proto::LeaseRevokeResponse {}))
    }

    async fn current_revision(
        &self,
        _request: Request<proto::CurrentRevisionRequest>,
    ) -> Result<Response<proto::CurrentRevisionResponse>, Status> {
        let revision = ok(self.store.current_revision().await)?;
        Ok(Response::new(proto::CurrentRevisionResponse { revision }))
    }
}
