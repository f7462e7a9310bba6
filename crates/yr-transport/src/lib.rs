//! yr-transport: every connection between yr processes. It owns addresses (`unix:/path` or
//! `host:port`), this process's credentials (the cluster token, TLS, the message-size limit),
//! opening gRPC channels that authenticate themselves ([`connect`]) and accepting only
//! authenticated connections ([`incoming_tcp`], [`incoming_unix`]). The token is checked once
//! per connection, in a hello before the first request, so calls pay nothing for it. It owns no
//! service: the crates that serve add their services to tonic over these streams. It also owns
//! what a failed call means: [`status_to_code`] maps a gRPC status to a yr error code, with the
//! table in its documentation.
//!
//! ```no_run
//! # async fn example() -> Result<(), yr_common::Error> {
//! use yr_common::auth::ClusterToken;
//! yr_transport::install(yr_transport::Credentials::with_token(ClusterToken::generate()?));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
//! let _incoming = yr_transport::incoming_tcp(listener); // for Server::serve_with_incoming
//! let _channel = yr_transport::connect("127.0.0.1:22770", yr_common::ErrorCode::InnerCommunication).await?;
//! # Ok(()) }
//! ```

mod address;
mod client;
mod credentials;
pub mod http;
pub mod metrics;
mod server;
mod status;
mod stream;
pub mod tcp;
pub mod tls;

pub use address::{host_of, is_loopback_host, Address};
pub use client::{
    connect, connect_lazy_with, connect_with, no_token, open, open_pipelined, refused,
    token_refused, Pipelined, CONNECT_TIMEOUT,
};
pub use credentials::{
    current, install, max_message_bytes, Credentials, DEFAULT_MAX_MESSAGE_BYTES,
    MESSAGE_ENVELOPE_BYTES,
};
pub use server::{
    check_hello, incoming_tcp, incoming_unix, peer_of, Authenticated, HANDSHAKE_TIMEOUT,
    MAX_HANDSHAKES,
};
pub use status::{leader_redirect, never_sent, status_detail, status_to_code, LEADER_METADATA};
pub use stream::Connection;
pub use tls::Tls;
