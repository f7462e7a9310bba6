//! The ObjectStore gRPC service (`yr.ds.v1`) over the node's [`SharedMemoryStore`]: the node's
//! drivers and runtimes ask it for the region to map, for allocations, to count references, and
//! to spill and restore objects, and to reclaim room from the node's other processes
//! ([`Reclaimer`]); its processes pull other nodes' objects through it ([`ObjectTransfer`],
//! which reads them from those nodes' data ports). Most calls are a few map operations under one
//! lock and run on the IO thread; spilling, restoring and copying run on blocking threads, and a
//! reclaim waits asynchronously for the processes it asks.
//!
//! It is served on the node's Unix socket only. The process that holds a reference is the
//! caller as the socket names it ([`caller_pid`]: its peer credentials), never a pid in the
//! request, so no process creates, retains, releases or spills for another; a hand-over to
//! another process (`Retain` with `for_receiver`) is taken by the caller, which must hold the
//! object, for a process of this node that uses its shared memory.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use yr_common::auth::PeerCredentials;
use yr_common::{Error, ErrorCode, ObjectId};
use yr_proto::ds as pb;
use yr_proto::error_to_proto;

use crate::object_transfer::ObjectTransfer;
use crate::reclaim::Reclaimer;
use crate::service::blocking;
use crate::shared_memory::SharedMemoryStore;

/// The ObjectStore service.
#[derive(Clone, Debug)]
pub struct ObjectStoreService {
    store: Arc<SharedMemoryStore>,
    transfer: Arc<ObjectTransfer>,
    reclaimer: Arc<Reclaimer>,
    /// Where other nodes pull this node's objects from: its data port (empty outside a
    /// cluster).
    node_address: String,
}

impl ObjectStoreService {
    /// The service over `store`, whose objects other nodes pull from `node_address`.
    pub fn new(
        store: Arc<SharedMemoryStore>,
        transfer: Arc<ObjectTransfer>,
        reclaimer: Arc<Reclaimer>,
        node_address: String,
    ) -> ObjectStoreService {
        ObjectStoreService {
            store,
            transfer,
            reclaimer,
            node_address,
        }
    }

    /// The tonic server for this service.
    pub fn server(self) -> pb::object_store_server::ObjectStoreServer<ObjectStoreService> {
        pb::object_store_server::ObjectStoreServer::new(self)
    }
}

/// The process that sent `request`, from its connection: the peer credentials of the node's
/// Unix socket (tonic's `UdsConnectInfo`, or yr's [`PeerCredentials`] from a listener that
/// checked them). 1014 (`unauthenticated`) for a connection that names no process (TCP).
// A tonic handler's error is a `Status`; boxing it here would only be unboxed by the caller.
#[allow(clippy::result_large_err)]
pub fn caller_pid<T>(request: &Request<T>) -> Result<u32, Status> {
    if let Some(peer) = request.extensions().get::<PeerCredentials>() {
        return Ok(peer.pid);
    }
    let from_socket = request
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .and_then(|credentials| credentials.pid())
        .and_then(|pid| u32::try_from(pid).ok())
        .filter(|pid| *pid != 0);
    from_socket.ok_or_else(|| {
        let error = Error::new(
            ErrorCode::AuthorizeFailed,
            "the node's object store serves only processes of its machine, over the node's Unix \
             socket; connect to the node's bus socket",
        );
        Status::unauthenticated(error.to_string())
    })
}

/// A capability for the wire.
fn capability_bytes(store: &SharedMemoryStore, allocation: u64) -> bytes::Bytes {
    store
        .capability_of(allocation)
        .map(|capability| bytes::Bytes::copy_from_slice(&capability))
        .unwrap_or_default()
}

fn object_id(bytes: &[u8]) -> Result<ObjectId, Error> {
    <[u8; 16]>::try_from(bytes)
        .map(ObjectId::from_bytes)
        .map_err(|_| {
            Error::new(
                ErrorCode::ParamInvalid,
                format!("an object id has 16 bytes, got {}", bytes.len()),
            )
        })
}

#[tonic::async_trait]
impl pb::object_store_server::ObjectStore for ObjectStoreService {
    async fn pull_object(
        &self,
        request: Request<pb::PullObjectRequest>,
    ) -> Result<Response<pb::PullObjectResponse>, Status> {
        let pid = caller_pid(&request)?;
        let request = request.into_inner();
        let reply = match self.transfer.pull(&request, pid).await {
            Ok((allocation, offset, size)) => pb::PullObjectResponse {
                allocation,
                offset,
                size,
                error: None,
                capability: capability_bytes(&self.store, allocation),
            },
            Err(error) => pb::PullObjectResponse {
                error: Some(error_to_proto(&error)),
                ..Default::default()
            },
        };
        Ok(Response::new(reply))
    }

    async fn pool_info(
        &self,
        request: Request<pb::PoolInfoRequest>,
    ) -> Result<Response<pb::PoolInfoResponse>, Status> {
        // Every process maps the region before it uses it: from now until it leaves the node,
        // objects may be handed over to it.
        let pid = caller_pid(&request)?;
        self.store.note_client(pid);
        Ok(Response::new(pb::PoolInfoResponse {
            path: self.store.path(),
            capacity: self.store.capacity(),
            pool_id: self.store.pool_id().to_string(),
            node_address: self.node_address.clone(),
        }))
    }

    async fn create(
        &self,
        request: Request<pb::CreateObjectRequest>,
    ) -> Result<Response<pb::CreateObjectResponse>, Status> {
        let pid = caller_pid(&request)?;
        let request = request.into_inner();
        let reply = match self.store.create(request.size, pid) {
            Ok((allocation, offset)) => pb::CreateObjectResponse {
                allocation,
                offset,
                error: None,
                capability: capability_bytes(&self.store, allocation),
            },
            Err(error) => pb::CreateObjectResponse {
                error: Some(error_to_proto(&error)),
                ..Default::default()
            },
        };
        Ok(Response::new(reply))
    }

    async fn retain(
        &self,
        request: Request<pb::RetainObjectRequest>,
    ) -> Result<Response<pb::RetainObjectResponse>, Status> {
        let pid = caller_pid(&request)?;
        let request = request.into_inner();
        if request.for_remote_owner {
            let reply = match self.store.hold_for_remote(request.allocation, pid) {
                Ok(()) => pb::RetainObjectResponse {
                    capability: capability_bytes(&self.store, request.allocation),
                    ..Default::default()
                },
                Err(error) => pb::RetainObjectResponse {
                    error: Some(error_to_proto(&error)),
                    ..Default::default()
                },
            };
            return Ok(Response::new(reply));
        }
        let retained = if request.for_receiver {
            self.store.retain_for(request.allocation, request.pid, pid)
        } else {
            self.store.retain(request.allocation, pid)
        };
        let reply = match retained {
            Ok((offset, size)) => pb::RetainObjectResponse {
                offset,
                size,
                error: None,
                capability: capability_bytes(&self.store, request.allocation),
            },
            Err(error) => pb::RetainObjectResponse {
                error: Some(error_to_proto(&error)),
                ..Default::default()
            },
        };
        Ok(Response::new(reply))
    }

    async fn drop_remote(
        &self,
        request: Request<pb::DropRemoteRequest>,
    ) -> Result<Response<pb::DropRemoteResponse>, Status> {
        caller_pid(&request)?;
        let error = self
            .transfer
            .drop_remote(request.get_ref())
            .await
            .err()
            .map(|error| error_to_proto(&error));
        Ok(Response::new(pb::DropRemoteResponse { error }))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseObjectsRequest>,
    ) -> Result<Response<pb::ReleaseObjectsResponse>, Status> {
        let pid = caller_pid(&request)?;
        let request = request.into_inner();
        self.store.release(&request.allocations, pid);
        Ok(Response::new(pb::ReleaseObjectsResponse {}))
    }

    async fn spill(
        &self,
        request: Request<pb::SpillObjectRequest>,
    ) -> Result<Response<pb::SpillObjectResponse>, Status> {
        let pid = caller_pid(&request)?;
        let request = request.into_inner();
        let store = self.store.clone();
        let spilled = blocking(move || {
            let object = object_id(&request.object_id)?;
            store.spill(request.allocation, object, pid)
        })
        .await;
        Ok(Response::new(match spilled {
            Ok(spilled) => pb::SpillObjectResponse {
                spilled,
                error: None,
            },
            Err(error) => pb::SpillObjectResponse {
                spilled: false,
                error: Some(error_to_proto(&error)),
            },
        }))
    }

    async fn restore(
        &self,
        request: Request<pb::RestoreObjectRequest>,
    ) -> Result<Response<pb::RestoreObjectResponse>, Status> {
        let pid = caller_pid(&request)?;
        let request = request.into_inner();
        let store = self.store.clone();
        let restored = blocking(move || {
            let object = object_id(&request.object_id)?;
            store.restore(object, pid)
        })
        .await;
        Ok(Response::new(match restored {
            Ok((allocation, offset, size)) => pb::RestoreObjectResponse {
                allocation,
                offset,
                size,
                error: None,
                capability: capability_bytes(&self.store, allocation),
            },
            Err(error) => pb::RestoreObjectResponse {
                error: Some(error_to_proto(&error)),
                ..Default::default()
            },
        }))
    }

    async fn delete_spilled(
        &self,
        request: Request<pb::DeleteSpilledRequest>,
    ) -> Result<Response<pb::DeleteSpilledResponse>, Status> {
        let pid = caller_pid(&request)?;
        let request = request.into_inner();
        let store = self.store.clone();
        // Removing files is disk work; the caller does not wait for it.
        tokio::task::spawn_blocking(move || {
            for id in &request.object_ids {
                if let Ok(object) = object_id(id) {
                    store.delete_spilled(object, pid);
                }
            }
        });
        Ok(Response::new(pb::DeleteSpilledResponse {}))
    }

    async fn reclaim(
        &self,
        request: Request<pb::ReclaimRequest>,
    ) -> Result<Response<pb::ReclaimResponse>, Status> {
        let pid = caller_pid(&request)?;
        let request = request.into_inner();
        let reclaimed = self.reclaimer.reclaim(request.bytes_needed, pid).await;
        Ok(Response::new(match reclaimed {
            Ok(bytes_freed) => pb::ReclaimResponse {
                bytes_freed,
                error: None,
            },
            Err(error) => pb::ReclaimResponse {
                bytes_freed: 0,
                error: Some(error_to_proto(&error)),
            },
        }))
    }
}
