//! The `Master` gRPC service (`yr.v1.Master`): a thin translation between the wire and
//! [`Cluster`](crate::cluster::Cluster).
//!
//! - `RegisterNode`: a node joins (or re-joins) with its id, incarnation, addresses, labels,
//!   capacity and allocatable; the answer carries the cluster id, or says that the incarnation
//!   was declared lost (the node then fails its instances and registers as a new incarnation).
//! - `NodeHeartbeat`: one bidirectional stream per node. The node sends `NodeUpdate`s (deltas to
//!   its allocatable, or numbered empty beats at least once a second). The master acknowledges
//!   each numbered beat of a node it knows as alive with `MasterCommand{beat}` (the node's
//!   lease: without acknowledgements it pauses the instances the master could re-create
//!   elsewhere, before the master can declare it lost), and answers
//!   `MasterCommand{reregister: true}` for a node it does not know as alive (unknown,
//!   recovering after a restart, or declared lost; the registration that follows tells a lost
//!   incarnation apart). A standby answers no beat: it refuses the stream.
//! - `Schedule`: global placement; a failure is an `ErrorInfo` in the response, not a gRPC error.
//! - `ClusterStatus`: nodes, instances and registered functions, the leader and the masters.
//!
//! Every call needs this master to lead ([`Leadership`]); a standby answers with
//! [`NotLeader`](crate::leadership::NotLeader) (3002, "not the leader; the leader is at X").
//! A heartbeat stream belongs to the term it was opened in and ends with it, so the node
//! reconnects (and finds the new leader).

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use yr_proto::v1::master_server::Master;
use yr_proto::v1::{
    ClusterStatusRequest, ClusterStatusResponse, MasterCommand, NodeUpdate, RegisterNodeRequest,
    RegisterNodeResponse, ScheduleRequest, ScheduleResponse,
};

use crate::cluster::RegisterError;
use crate::leadership::Leadership;
use crate::registry::HeartbeatOutcome;

/// How many commands may wait for a node that does not read its heartbeat stream.
const COMMAND_BUFFER: usize = 8;

/// The tonic implementation of `yr.v1.Master`.
pub struct MasterService {
    leadership: Arc<Leadership>,
    stop: watch::Receiver<bool>,
    meta_store: String,
}

impl MasterService {
    /// A service over the cluster of the term `leadership` holds; heartbeat streams end when
    /// `stop` turns true or their term ends.
    pub fn new(leadership: Arc<Leadership>, stop: watch::Receiver<bool>) -> MasterService {
        MasterService {
            leadership,
            stop,
            meta_store: String::new(),
        }
    }

    /// The same service, naming its meta store in cluster status (`yr status`).
    pub fn with_meta_store(mut self, meta_store: String) -> MasterService {
        self.meta_store = meta_store;
        self
    }
}

fn register_status(err: RegisterError) -> Status {
    let invalid = matches!(err, RegisterError::Invalid(_));
    let message = yr_common::Error::from(err).to_string();
    if invalid {
        Status::invalid_argument(message)
    } else {
        Status::unavailable(message)
    }
}

#[tonic::async_trait]
impl Master for MasterService {
    async fn register_node(
        &self,
        request: Request<RegisterNodeRequest>,
    ) -> Result<Response<RegisterNodeResponse>, Status> {
        let cluster = self.leadership.leader().map_err(|e| e.to_status())?;
        let response: RegisterNodeResponse = cluster
            .register(request.into_inner().node)
            .await
            .map_err(register_status)?;
        Ok(Response::new(response))
    }

    type NodeHeartbeatStream = ReceiverStream<Result<MasterCommand, Status>>;

    async fn node_heartbeat(
        &self,
        request: Request<Streaming<NodeUpdate>>,
    ) -> Result<Response<Self::NodeHeartbeatStream>, Status> {
        let led = self.leadership.led().map_err(|e| e.to_status())?;
        let cluster = led.cluster;
        let mut term_ended = led.term_ended;
        let mut updates = request.into_inner();
        let (commands, receiver) = mpsc::channel(COMMAND_BUFFER);
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            let mut node_id = String::new();
            loop {
                let update = tokio::select! {
                    _ = crate::stopped(&mut stop) => break,
                    _ = crate::stopped(&mut term_ended) => break,
                    update = updates.message() => update,
                };
                match update {
                    Ok(Some(update)) => {
                        node_id.clone_from(&update.node_id);
                        let command = match cluster.heartbeat(&update) {
                            HeartbeatOutcome::Reregister => {
                                tracing::debug!(
                                    node_id,
                                    "heartbeat from an unknown node: reregister"
                                );
                                MasterCommand {
                                    reregister: true,
                                    beat: 0,
                                }
                            }
                            // The node's lease: it fences itself unless beats are acknowledged
                            // (crates/yr-proxy/src/self_fence.rs).
                            HeartbeatOutcome::Accepted if update.beat != 0 => MasterCommand {
                                reregister: false,
                                beat: update.beat,
                            },
                            HeartbeatOutcome::Accepted => continue,
                        };
                        // A full channel drops the command: a node that does not read its
                        // stream misses an acknowledgement, and is only more careful.
                        match commands.try_send(Ok(command)) {
                            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
                            Err(mpsc::error::TrySendError::Closed(_)) => break,
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(node_id, %status, "heartbeat stream broke");
                        break;
                    }
                }
            }
            tracing::debug!(node_id, "heartbeat stream ended");
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn schedule(
        &self,
        request: Request<ScheduleRequest>,
    ) -> Result<Response<ScheduleResponse>, Status> {
        let cluster = self.leadership.leader().map_err(|e| e.to_status())?;
        Ok(Response::new(cluster.schedule(request.get_ref())))
    }

    async fn cluster_status(
        &self,
        _request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        let cluster = self.leadership.leader().map_err(|e| e.to_status())?;
        let mut status = cluster.status().await;
        status.meta_store = self.meta_store.clone();
        status.leader = self.leadership.address().to_string();
        status.masters = self.leadership.masters().await;
        Ok(Response::new(status))
    }
}
