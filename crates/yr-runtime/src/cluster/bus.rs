//! The Bus stream to this process's node: requests paired with responses by message id, and
//! pushes from the node (instance notifications; init, heartbeat and shutdown for runtimes).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use yr_common::{Error, ErrorCode};
use yr_proto::error_from_proto;
use yr_proto::v1 as pb;
use yr_proto::v1::bus_client::BusClient;

use super::transport;
use crate::error::RuntimeError;

/// What the node pushes (message id 0).
pub type PushHandler = Arc<dyn Fn(pb::bus_response::Body) + Send + Sync>;

type Responder = Box<dyn FnOnce(Result<pb::bus_response::Body, Error>) + Send>;

/// How long a request waits for the node's answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A connected Bus stream.
pub struct Bus {
    outbound: mpsc::UnboundedSender<pb::BusRequest>,
    pending: Arc<Mutex<HashMap<u64, Responder>>>,
    next_id: AtomicU64,
    address: String,
}

impl Bus {
    /// Open a Bus stream to the node at `address`. `on_push` receives the node's pushes;
    /// `on_closed` runs once if the stream ends. Register next, with [`Bus::register`].
    pub async fn connect(
        address: String,
        connect_code: ErrorCode,
        on_push: PushHandler,
        on_closed: Box<dyn FnOnce(Error) + Send>,
    ) -> Result<Arc<Bus>, Error> {
        let address = address.as_str();
        let channel = transport::connect(address, connect_code).await?;
        let (outbound, receiver) = mpsc::unbounded_channel();
        let mut client = BusClient::new(channel)
            .max_decoding_message_size(yr_transport::max_message_bytes())
            .max_encoding_message_size(yr_transport::max_message_bytes());
        let bus = Arc::new(Bus {
            outbound,
            pending: Arc::new(Mutex::new(HashMap::new())),
            next_id: AtomicU64::new(1),
            address: address.to_string(),
        });
        let response = client
            .session(UnboundedReceiverStream::new(receiver))
            .await
            .map_err(|status| {
                if transport::refused(address) {
                    return transport::token_refused(address);
                }
                Error::new(
                    yr_transport::status_to_code(&status, connect_code),
                    format!(
                        "the node at {address} refused the session: {}",
                        yr_transport::status_detail(&status)
                    ),
                )
            })?;
        let mut inbound = response.into_inner();
        let reader = bus.clone();
        tokio::spawn(async move {
            let reason = loop {
                match inbound.next().await {
                    Some(Ok(message)) => reader.dispatch(message, &on_push),
                    Some(Err(status)) => {
                        break format!("the bus stream failed: {}", status.message())
                    }
                    None => break "the node closed the bus stream".to_string(),
                }
            };
            let error = Error::new(
                ErrorCode::BusDisconnection,
                format!(
                    "lost the connection to the node at {}: the node stopped or crashed; check \
                     `yr status` and the node's log, then init again (detail: {reason})",
                    reader.address
                ),
            );
            let pending: Vec<Responder> = reader.pending.lock().drain().map(|(_, r)| r).collect();
            for responder in pending {
                responder(Err(error.clone()));
            }
            on_closed(error);
        });
        Ok(bus)
    }

    /// Register this process with the node; blocks this (non-IO) thread.
    pub fn register(
        &self,
        register: pb::RegisterClient,
        connect_code: ErrorCode,
    ) -> Result<pb::RegisterReply, Error> {
        match self.request_blocking(pb::bus_request::Body::Register(register), REQUEST_TIMEOUT) {
            Ok(pb::bus_response::Body::Registered(reply)) => Ok(reply),
            Ok(other) => Err(RuntimeError::UnexpectedAnswer {
                request: "a registration",
                answer: format!("{other:?}"),
            }
            .into()),
            Err(error) => Err(Error::new(
                connect_code,
                format!(
                    "the node at {} did not accept this process: {}",
                    self.address,
                    error.message()
                ),
            )),
        }
    }

    fn dispatch(&self, message: pb::BusResponse, on_push: &PushHandler) {
        let Some(body) = message.body else { return };
        if message.message_id == 0 {
            on_push(body);
            return;
        }
        let responder = self.pending.lock().remove(&message.message_id);
        if let Some(responder) = responder {
            match body {
                pb::bus_response::Body::Error(info) => responder(Err(error_from_proto(&info))),
                body => responder(Ok(body)),
            }
        }
    }

    /// Send a request; `responder` gets the answer (or the error that ended the stream).
    pub fn send_request(&self, body: pb::bus_request::Body, responder: Responder) {
        let message_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.pending.lock().insert(message_id, responder);
        let sent = self.outbound.send(pb::BusRequest {
            message_id,
            body: Some(body),
        });
        if sent.is_err() {
            if let Some(responder) = self.pending.lock().remove(&message_id) {
                responder(Err(Error::new(
                    ErrorCode::BusDisconnection,
                    format!("the bus stream to {} is closed", self.address),
                )));
            }
        }
    }

    /// Send a message that has no answer (heartbeat acks, init results, exits).
    pub fn send_oneway(&self, body: pb::bus_request::Body) {
        let _ = self.outbound.send(pb::BusRequest {
            message_id: 0,
            body: Some(body),
        });
    }

    /// Send a request and block this (non-IO) thread for the answer.
    pub fn request_blocking(
        &self,
        body: pb::bus_request::Body,
        timeout: Duration,
    ) -> Result<pb::bus_response::Body, Error> {
        let (sender, receiver) = crossbeam_channel::bounded(1);
        self.send_request(
            body,
            Box::new(move |reply| {
                let _ = sender.send(reply);
            }),
        );
        crate::blocking::blocking(|| receiver.recv_timeout(timeout)).unwrap_or_else(|_| {
            Err(Error::new(
                ErrorCode::InnerCommunication,
                format!(
                    "the node at {} did not answer within {timeout:?}",
                    self.address
                ),
            ))
        })
    }
}
