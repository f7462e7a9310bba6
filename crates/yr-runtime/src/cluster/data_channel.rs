//! The channel to the node's data worker (the node's Unix socket, next to the Bus), shared by the
//! KV and shared-memory clients, and the one way to call it from a user's thread: the call runs
//! on the backend's IO runtime while the thread waits for the answer.

use std::future::Future;
use std::sync::Arc;

use parking_lot::Mutex;
use tonic::transport::Channel;
use yr_common::{Error, ErrorCode, Result};

use super::transport;
use crate::blocking;

/// A lazily connected channel to the node's data worker.
#[derive(Clone)]
pub struct DataChannel {
    io: tokio::runtime::Handle,
    address: String,
    channel: Arc<Mutex<Option<Channel>>>,
}

impl DataChannel {
    /// A channel to the data worker at `address`, used from `io`.
    pub fn new(io: tokio::runtime::Handle, address: String) -> DataChannel {
        DataChannel {
            io,
            address,
            channel: Arc::new(Mutex::new(None)),
        }
    }

    /// The node's address (`unix:/path` or `host:port`).
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The backend's IO runtime.
    pub fn io(&self) -> &tokio::runtime::Handle {
        &self.io
    }

    /// The connected channel; 4205 if the node does not answer.
    pub async fn connected(&self) -> Result<Channel> {
        let existing = self.channel.lock().clone();
        if let Some(channel) = existing {
            return Ok(channel);
        }
        let channel = transport::connect(&self.address, ErrorCode::ConnectionFailed).await?;
        *self.channel.lock() = Some(channel.clone());
        Ok(channel)
    }

    /// The error for a failed call (its code from [`yr_transport::status_to_code`], 4205 when
    /// the worker could not be reached); the next call connects again.
    pub fn failed(&self, status: &tonic::Status) -> Error {
        *self.channel.lock() = None;
        if transport::refused(&self.address) {
            return transport::token_refused(&self.address);
        }
        Error::new(
            yr_transport::status_to_code(status, ErrorCode::ConnectionFailed),
            format!(
                "the data worker of the node at {} failed the call: {}; check that the node is \
                 running",
                self.address,
                status.message()
            ),
        )
    }

    /// Run one call with a client made by `client` on the IO runtime, and wait for its answer.
    pub fn call<C, R, F>(
        &self,
        client: fn(Channel) -> C,
        make: impl FnOnce(C) -> F + Send + 'static,
    ) -> Result<R>
    where
        C: Send + 'static,
        R: Send + 'static,
        F: Future<Output = std::result::Result<tonic::Response<R>, tonic::Status>> + Send,
    {
        let this = self.clone();
        let (sender, receiver) = crossbeam_channel::bounded(1);
        self.io.spawn(async move {
            let result = async {
                let channel = this.connected().await?;
                make(client(channel))
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(|status| this.failed(&status))
            }
            .await;
            let _ = sender.send(result);
        });
        blocking::blocking(|| receiver.recv()).unwrap_or_else(|_| {
            Err(Error::new(
                ErrorCode::Finalized,
                "yr was finalized while a call to the node's data worker was in flight; keep yr \
                 initialized until its calls return",
            ))
        })
    }
}
