//! The Worker service this process serves: objects it owns (`GetObject`), and in a runtime, the
//! calls its callers stream to it (`Call`).

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use yr_common::{Error, ErrorCode, ObjectId};
use yr_proto::v1 as pb;
use yr_proto::v1::worker_server::Worker;

use super::convert::{error_to_proto, value_to_proto_for};
use crate::object_store::{ObjectSlot, Outcome};

/// Runs the calls a runtime receives.
pub trait CallExecutor: Send + Sync + 'static {
    /// Run `request`; `respond` gets its result exactly once.
    fn execute(&self, request: pb::CallRequest, respond: Box<dyn FnOnce(pb::CallResult) + Send>);
}

/// The Worker service.
pub struct WorkerService {
    /// Set in a runtime; a driver serves only objects.
    pub executor: Option<Arc<dyn CallExecutor>>,
}

type CallStream = Pin<Box<dyn Stream<Item = Result<pb::CallResult, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for WorkerService {
    type CallStream = CallStream;

    async fn call(
        &self,
        request: Request<Streaming<pb::CallRequest>>,
    ) -> Result<Response<CallStream>, Status> {
        let Some(executor) = self.executor.clone() else {
            return Err(Status::failed_precondition(
                "this process is a driver; it runs no calls",
            ));
        };
        let mut calls = request.into_inner();
        let (sender, receiver) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Ok(call)) = calls.next().await {
                let sender = sender.clone();
                executor.execute(
                    call,
                    Box::new(move |result| {
                        let _ = sender.send(Ok(result));
                    }),
                );
            }
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(
            receiver,
        ))))
    }

    async fn get_object(
        &self,
        request: Request<pb::GetObjectRequest>,
    ) -> Result<Response<pb::GetObjectResponse>, Status> {
        let request = request.into_inner();
        let reply = match <[u8; 16]>::try_from(request.id.as_ref()) {
            Err(_) => error_reply(Error::new(
                ErrorCode::ParamInvalid,
                format!("an object id has 16 bytes, got {}", request.id.len()),
            )),
            Ok(bytes) => {
                let id = ObjectId::from_bytes(bytes);
                match ObjectSlot::lookup(id) {
                    None => error_reply(Error::new(
                        ErrorCode::GetOperationFailed,
                        format!(
                            "object {id} is not held by its owner any more: every reference to it \
                             was dropped"
                        ),
                    )),
                    Some(handle) => {
                        let timeout = Duration::from_millis(request.timeout_ms.max(1));
                        let outcome = tokio::task::spawn_blocking(move || {
                            handle.wait_until(Instant::now().checked_add(timeout))
                        })
                        .await
                        .ok()
                        .flatten();
                        match outcome {
                            Some(Outcome::Ready(value)) => pb::GetObjectResponse {
                                value: Some(value_to_proto_for(&value, &request.pool_id)),
                                error: None,
                            },
                            Some(Outcome::Failed(error)) => error_reply(error),
                            None => error_reply(Error::new(
                                ErrorCode::GetOperationFailed,
                                format!("object {id} did not arrive within {timeout:?}"),
                            )),
                        }
                    }
                }
            }
        };
        Ok(Response::new(reply))
    }
}

fn error_reply(error: Error) -> pb::GetObjectResponse {
    pb::GetObjectResponse {
        value: None,
        error: Some(error_to_proto(&error)),
    }
}
