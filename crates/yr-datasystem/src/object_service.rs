//! The ObjectStore gRPC service (`yr.ds.v1`) over the node's [`SharedMemoryStore`]: the node's
//! drivers and runtimes ask it for the region to map, for allocations, and to count references;
//! other nodes read its objects, and its processes pull other nodes' objects through it
//! ([`ObjectTransfer`]). Reference counting is a few map operations under one lock, so it runs
//! on the IO thread; copying runs on blocking threads.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use yr_proto::ds as pb;

use crate::object_transfer::{ObjectTransfer, MAX_MESSAGE};
use crate::shared_memory::SharedMemoryStore;
use crate::wire::error_to_proto;

/// The ObjectStore service.
#[derive(Clone, Debug)]
pub struct ObjectStoreService {
    store: Arc<SharedMemoryStore>,
    transfer: Arc<ObjectTransfer>,
    /// Where other nodes reach this node (empty outside a cluster).
    node_address: String,
}

impl ObjectStoreService {
    /// The service over `store`, reached by other nodes at `node_address`.
    pub fn new(
        store: Arc<SharedMemoryStore>,
        transfer: Arc<ObjectTransfer>,
        node_address: String,
    ) -> ObjectStoreService {
        ObjectStoreService {
            store,
            transfer,
            node_address,
        }
    }

    /// The tonic server for this service.
    pub fn server(self) -> pb::object_store_server::ObjectStoreServer<ObjectStoreService> {
        pb::object_store_server::ObjectStoreServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }
}

type ChunkStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ObjectChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::object_store_server::ObjectStore for ObjectStoreService {
    type ReadObjectStream = ChunkStream;

    async fn read_object(
        &self,
        request: Request<pb::ReadObjectRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let request = request.into_inner();
        let (sender, receiver) = tokio::sync::mpsc::channel(2);
        let transfer = self.transfer.clone();
        tokio::task::spawn_blocking(move || {
            transfer.serve_read(&request, |chunk| sender.blocking_send(Ok(chunk)).is_ok());
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

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
