//! The Worker service every driver and runtime serves: the objects it holds (`GetObject`: the
//! ones it owns, and borrowed ones it sent on) and their borrowers' counts (`ReleaseBorrowed`,
//! kept by `borrows`). Calls to a runtime come on its call socket instead (`call_channel`).

use std::time::{Duration, Instant};

use tonic::{Request, Response, Status};
use yr_common::{Error, ErrorCode, ObjectId};
use yr_proto::error_to_proto;
use yr_proto::v1 as pb;
use yr_proto::v1::worker_server::Worker;

use super::convert::value_to_proto_for;
use crate::object_store::{ObjectSlot, Outcome};

/// The Worker service.
pub struct WorkerService;

#[tonic::async_trait]
impl Worker for WorkerService {
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
                        crate::borrows::on_fetched(id, &request.borrower_address);
                        let timeout = Duration::from_millis(request.timeout_ms.max(1));
                        // A result another node keeps for this process is read from there
                        // by a borrower with shared memory; one without gets it from here.
                        let here = request.pool_id.is_empty();
                        let outcome = tokio::task::spawn_blocking(move || {
                            let deadline = Instant::now().checked_add(timeout);
                            if here {
                                handle.wait_until(deadline)
                            } else {
                                handle.wait_as_held(deadline)
                            }
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

    async fn release_borrowed(
        &self,
        request: Request<pb::BorrowUpdate>,
    ) -> Result<Response<pb::BorrowUpdateResponse>, Status> {
        let update = request.into_inner();
        for (id, count) in counted_ids(&update) {
            crate::borrows::on_released(id, &update.borrower_address, count);
        }
        Ok(Response::new(pb::BorrowUpdateResponse {}))
    }
}

/// The well-formed ids of a borrow update with their counts; malformed ones are logged.
fn counted_ids(update: &pb::BorrowUpdate) -> impl Iterator<Item = (ObjectId, u64)> + '_ {
    update
        .objects
        .iter()
        .filter_map(|object| match <[u8; 16]>::try_from(object.id.as_ref()) {
            Ok(bytes) => Some((ObjectId::from_bytes(bytes), object.count)),
            Err(_) => {
                tracing::warn!(
                    borrower = %update.borrower_address,
                    length = object.id.len(),
                    "a borrow update named an object id that is not 16 bytes; ignored"
                );
                None
            }
        })
}

fn error_reply(error: Error) -> pb::GetObjectResponse {
    pb::GetObjectResponse {
        value: None,
        error: Some(error_to_proto(&error)),
    }
}
