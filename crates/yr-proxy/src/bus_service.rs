//! The Bus service: one stream per driver or runtime. Requests are answered with the same
//! message id; the node pushes notifications, init calls, heartbeats, shutdowns and asks to
//! spill with id 0 (answered oneway, like heartbeats).
//! A malformed message gets a clear error and the stream keeps serving.

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use yr_common::{Error, ErrorCode};
use yr_proto::v1 as pb;
use yr_proto::v1::bus_request::Body;
use yr_proto::v1::bus_server::Bus;

use crate::client_bus::{Outbound, BUS_QUEUE};
use crate::instance_table::Subscriber;
use crate::node::Node;
use crate::spill_asks::SpillAsks;

/// The Bus service over a node.
pub struct BusService {
    /// The node.
    pub node: Arc<Node>,
    /// Asks to spill that wait for their answers.
    pub spill_asks: Arc<SpillAsks>,
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<pb::BusResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Bus for BusService {
    type SessionStream = ResponseStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::BusRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        // Who the client is comes from the connection, never from what it says.
        let peer = yr_transport::peer_of(&request);
        let mut inbound = request.into_inner();
        let (sender, receiver) = mpsc::channel(BUS_QUEUE);
        let overflowed = Arc::new(tokio::sync::Notify::new());
        let node = self.node.clone();
        let spill_asks = self.spill_asks.clone();
        let client_id = node.connect_client(
            Outbound {
                sender,
                overflowed: overflowed.clone(),
            },
            peer,
        );
        tokio::spawn(async move {
            while let Some(message) = inbound.next().await {
                match message {
                    Ok(message) => handle(&node, &spill_asks, client_id, message),
                    Err(status) => {
                        tracing::debug!(client_id, error = %status, "bus stream ended");
                        break;
                    }
                }
            }
            node.disconnect_client(client_id);
        });
        // The session's messages, until the client falls too far behind.
        let outbound = futures_util::stream::unfold(
            (receiver, overflowed),
            |(mut receiver, overflowed)| async move {
                let message = tokio::select! {
                    message = receiver.recv() => message,
                    () = overflowed.notified() => None,
                };
                message.map(|message| (message, (receiver, overflowed)))
            },
        );
        Ok(Response::new(Box::pin(outbound)))
    }
}

fn handle(node: &Arc<Node>, spill_asks: &SpillAsks, client_id: u64, message: pb::BusRequest) {
    let id = message.message_id;
    let Some(body) = message.body else {
        node.reply(
            client_id,
            id,
            Err(Error::new(
                ErrorCode::ParamInvalid,
                "a bus message without a body; send one of the request kinds",
            )),
        );
        return;
    };
    match body {
        Body::Register(register) => {
            let node = node.clone();
            tokio::spawn(async move {
                let reply = node.register(client_id, register).await;
                if let Err(error) = &reply {
                    tracing::warn!(client_id, %error, "refused a registration");
                }
                node.reply(client_id, id, reply.map(pb::bus_response::Body::Registered));
            });
        }
        Body::RegisterExecutable(request) => {
            let node = node.clone();
            tokio::spawn(async move {
                let reply = node.register_executable(client_id, request).await;
                if let Err(error) = &reply {
                    tracing::warn!(client_id, %error, "refused an executable");
                }
                node.reply(client_id, id, reply.map(pb::bus_response::Body::Executable));
            });
        }
        Body::Create(mut create) => {
            // Only another node forwards creates (on the Node service); a client's are its own.
            create.creator_node_id.clear();
            create.creator_node_address.clear();
            let result = node.create(create, Subscriber::Client(client_id));
            node.reply(client_id, id, result.map(pb::bus_response::Body::Create));
        }
        Body::Kill(kill) => {
            let node = node.clone();
            tokio::spawn(async move {
                let result = if kill.job_id.is_empty() {
                    node.kill(&kill.instance_id, kill.wait).await
                } else {
                    node.kill_job(&kill.job_id, kill.wait).await;
                    Ok(())
                };
                node.reply(
                    client_id,
                    id,
                    result.map(|()| pb::bus_response::Body::Kill(pb::KillResponse {})),
                );
            });
        }
        Body::InitResult(result) => node.init_result(client_id, result),
        Body::HeartbeatAck(_) => node.heartbeat_ack(client_id),
        Body::WaitState(state) => node.wait_state(client_id, state.blocked),
        Body::Exit(exit) => node.evict(client_id, crate::create_options::eviction_reason(&exit)),
        Body::SpillAnswer(answer) => spill_asks.answer(answer),
        Body::GetNamed(request) => {
            let node = node.clone();
            tokio::spawn(async move {
                let result = node.lookup(client_id, request).await;
                node.reply(client_id, id, result.map(pb::bus_response::Body::GetNamed));
            });
        }
        Body::ListNamed(_) => {
            node.reply(
                client_id,
                id,
                Ok(pb::bus_response::Body::ListNamed(node.list_named())),
            );
        }
    }
}
