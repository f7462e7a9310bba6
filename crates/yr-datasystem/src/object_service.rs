//! The ObjectStore gRPC service (`yr.ds.v1`) over the node's [`SharedMemoryStore`]: the node's
//! drivers and runtimes ask it for the region to map, for allocations, to count references, and
//! to spill and restore objects, and to reclaim room from the node's other processes
//! ([`Reclaimer`]); its processes pull other nodes' objects through it ([`ObjectTransfer`],
//! which reads them from those nodes' data ports). Most calls are a few map operations under one
//! lock and run on the IO thread; spilling, restoring and copying run on blocking threads, and a
//! reclaim waits asynchronously for the processes it asks.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use yr_common::{Error, ErrorCode, ObjectId};
use yr_proto::ds as pb;

use crate::object_transfer::ObjectTransfer;
use crate::reclaim::Reclaimer;
use crate::service::blocking;
use crate::shared_memory::SharedMemoryStore;
use crate::wire::error_to_proto;

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
        let request = request.into_inner();
        let reply = match self.transfer.pull(&request).await {
            Ok((allocation, offset, size)) => pb::PullObjectResponse {
                allocation,
                offset,
                size,
                error: None,
            },
            Err(error) => pb::PullObjectResponse {
                allocation: 0,
                offset: 0,
                size: 0,
                error: Some(error_to_proto(&error)),
            },
        };
        Ok(Response::new(reply))
    }

    async fn pool_info(
        &self,
        _request: Request<pb::PoolInfoRequest>,
    ) -> Result<Response<pb::PoolInfoResponse>, Status> {
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
        let request = request.into_inner();
        let reply = match self.store.create(request.size, request.pid) {
            Ok((allocation, offset)) => pb::CreateObjectResponse {
                allocation,
                offset,
                error: None,
            },
            Err(error) => pb::CreateObjectResponse {
                allocation: 0,
                offset: 0,
                error: Some(error_to_proto(&error)),
            },
        };
        Ok(Response::new(reply))
    }

    async fn retain(
        &self,
        request: Request<pb::RetainObjectRequest>,
    ) -> Result<Response<pb::RetainObjectResponse>, Status> {
        let request = request.into_inner();
        let retained = if request.for_receiver {
            self.store.retain_for(request.allocation, request.pid)
        } else {
            self.store.retain(request.allocation, request.pid)
        };
        let reply = match retained {
            Ok((offset, size)) => pb::RetainObjectResponse {
                offset,
                size,
                error: None,
            },
            Err(error) => pb::RetainObjectResponse {
                offset: 0,
                size: 0,
                error: Some(error_to_proto(&error)),
            },
        };
        Ok(Response::new(reply))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseObjectsRequest>,
    ) -> Result<Response<pb::ReleaseObjectsResponse>, Status> {
        let request = request.into_inner();
        self.store.release(&request.allocations, request.pid);
        Ok(Response::new(pb::ReleaseObjectsResponse {}))
    }

    async fn spill(
        &self,
        request: Request<pb::SpillObjectRequest>,
    ) -> Result<Response<pb::SpillObjectResponse>, Status> {
        let request = request.into_inner();
        let store = self.store.clone();
        let spilled = blocking(move || {
            let object = object_id(&request.object_id)?;
            store.spill(request.allocation, object, request.pid)
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
        let request = request.into_inner();
        let store = self.store.clone();
        let restored = blocking(move || {
            let object = object_id(&request.object_id)?;
            store.restore(object, request.pid)
        })
        .await;
        Ok(Response::new(match restored {
            Ok((allocation, offset, size)) => pb::RestoreObjectResponse {
                allocation,
                offset,
                size,
                error: None,
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
        let request = request.into_inner();
        let store = self.store.clone();
        // Removing files is disk work; the caller does not wait for it.
        tokio::task::spawn_blocking(move || {
            for id in &request.object_ids {
                if let Ok(object) = object_id(id) {
                    store.delete_spilled(object, request.pid);
                }
            }
        });
        Ok(Response::new(pb::DeleteSpilledResponse {}))
    }

    async fn reclaim(
        &self,
        request: Request<pb::ReclaimRequest>,
    ) -> Result<Response<pb::ReclaimResponse>, Status> {
        let request = request.into_inner();
        let reclaimed = self
            .reclaimer
            .reclaim(request.bytes_needed, request.pid)
            .await;
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
