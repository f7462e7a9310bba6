//! The Node service: what other nodes ask of this one. Create an instance here and stream its
//! notifications back, kill one, and hand out a driver's binary by its content key.

use std::pin::Pin;
use std::sync::Arc;

use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use yr_proto::error_to_proto;
use yr_proto::v1 as pb;
use yr_proto::v1::InstanceState as S;

use crate::instance_table::Subscriber;
use crate::node::{KillReach, Node};

/// Binary chunks are this large.
const CHUNK: usize = 1 << 20;

/// The Node service over a node.
pub struct NodeService {
    /// The node.
    pub node: Arc<Node>,
}

type NotifyStream = Pin<Box<dyn Stream<Item = Result<pb::InstanceNotify, Status>> + Send>>;
type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::BinaryChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::node_server::Node for NodeService {
    type CreateStream = NotifyStream;
    type FetchBinaryStream = ChunkStream;

    async fn create(
        &self,
        request: Request<pb::CreateRequest>,
    ) -> Result<Response<NotifyStream>, Status> {
        let request = request.into_inner();
        let (sender, receiver) = mpsc::unbounded_channel();
        let instance_id = request.designated_instance_id.clone();
        if let Err(error) = self
            .node
            .create(request, Subscriber::Remote(sender.clone()))
        {
            // A refused create ends the stream with the error, as a terminal notification.
            let _ = sender.send(Ok(pb::InstanceNotify {
                instance_id,
                state: S::Fatal as i32,
                runtime_address: String::new(),
                error: Some(error_to_proto(&error)),
            }));
        }
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(
            receiver,
        ))))
    }

    async fn kill(
        &self,
        request: Request<pb::KillRequest>,
    ) -> Result<Response<pb::KillResponse>, Status> {
        let request = request.into_inner();
        // From another node: never sent on again (a kill makes one hop at most).
        self.node
            .kill_within(&request.instance_id, request.wait, KillReach::HereOnly)
            .await
            .map(|()| Response::new(pb::KillResponse {}))
            .map_err(|error| Status::not_found(error.to_string()))
    }

    async fn fetch_binary(
        &self,
        request: Request<pb::FetchBinaryRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let hash = request.into_inner().hash;
        let Some(path) = self.node.binary_path(&hash) else {
            return Err(Status::not_found(format!(
                "this node does not have binary {hash}"
            )));
        };
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| Status::not_found(format!("cannot open {}: {e}", path.display())))?;
        let (sender, receiver) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut buffer = vec![0u8; CHUNK];
            loop {
                match file.read(&mut buffer).await {
                    Ok(0) => return,
                    Ok(n) => {
                        let chunk = pb::BinaryChunk {
                            data: buffer[..n].to_vec().into(),
                        };
                        if sender.send(Ok(chunk)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = sender
                            .send(Err(Status::internal(format!("read failed: {e}"))))
                            .await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }
}
