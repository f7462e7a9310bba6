//! The ObjectStore gRPC service (`yr.ds.v1`) over the node's [`SharedMemoryStore`]: the node's
//! drivers and runtimes ask it for the region to map, for allocations, and to count references.
//! Every call is a few map operations under one lock, so it runs on the IO thread.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use yr_proto::ds as pb;

use crate::shared_memory::SharedMemoryStore;
use crate::wire::error_to_proto;

/// The ObjectStore service.
#[derive(Clone, Debug)]
pub struct ObjectStoreService {
    store: Arc<SharedMemoryStore>,
}

impl ObjectStoreService {
    /// The service over `store`.
    pub fn new(store: Arc<SharedMemoryStore>) -> ObjectStoreService {
        ObjectStoreService { store }
    }

    /// The tonic server for this service.
    pub fn server(self) -> pb::object_store_server::ObjectStoreServer<ObjectStoreService> {
        pb::object_store_server::ObjectStoreServer::new(self)
    }
}

#[tonic::async_trait]
impl pb::object_store_server::ObjectStore for ObjectStoreService {
    async fn pool_info(
        &self,
        _request: Request<pb::PoolInfoRequest>,
    ) -> Result<Response<pb::PoolInfoResponse>, Status> {
        Ok(Response::new(pb::PoolInfoResponse {
            path: self.store.path(),
            capacity: self.store.capacity(),
            pool_id: self.store.pool_id().to_string(),
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
        let reply = match self.store.retain(request.allocation, request.pid) {
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
}
