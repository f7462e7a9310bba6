//! The node's data port: a TCP listener that serves byte ranges of its shared-memory objects
//! to other nodes' pulls. Without TLS, the serving node sends straight from its region with
//! `sendfile`, and the pulling node moves the bytes from the socket into its own region with
//! `splice`: neither side copies them through a buffer of its own, and there is no framing.
//!
//! With TLS (the node's credentials have it, `yr_transport::current().tls`), every connection
//! runs inside a mutual-TLS session: the serving node accepts only a peer whose certificate its
//! CA signed, before it reads anything else, and the pulling node checks the serving node's
//! certificate against the address it dials. The kernel cannot encrypt, so the bytes then go
//! through one buffer per connection ([`TLS_CHUNK`]): read from the region with `pread`,
//! written to the TLS stream; read from it and written into the pulling node's region.
//!
//! One range per connection. The connection opens (inside TLS, if any) with the cluster token's hello frame
//! (`yr_common::auth`), answered with `HELLO_ACCEPTED`, or `HELLO_REFUSED` and a close: a
//! peer without the token learns nothing and costs nothing. Then the request, [`REQUEST_LEN`]
//! bytes, little-endian: the magic `YRD2`, the object's capability (16 bytes, see
//! [`crate::capability`]), the allocation id, the object's size, the first byte and the number
//! of bytes. The answer is one status byte: [`STATUS_OK`] followed by exactly the bytes asked
//! for, or [`STATUS_ERROR`] followed by a `u32` length and an `ErrorInfo` (protobuf) saying why.
//! A wrong capability, a wrong size and a freed object get the same answer, which names no size.
//! A request with the magic `YRDR` instead (same layout) drops the hold the serving node keeps
//! on a call's result for an owner on the asking node (`SharedMemoryStore::hold_for_remote`),
//! and is answered with [`STATUS_OK`] alone; a hold that does not match is left alone.
//!
//! Connections are tokio tasks on the node's runtime, at most [`MAX_CONNECTIONS`] at once (more
//! are closed at once); the TLS handshake, the hello and the request must arrive within
//! [`IDLE_TIMEOUT`], and the bytes go out with non-blocking `sendfile` driven by the socket's
//! readiness (or non-blocking TLS writes), so an idle or slow peer holds no thread. While it sends, the serving node holds its own reference to the
//! object ([`TRANSFER_HOLDER`]), so the object outlives its owner until the reader has it.

mod protocol;
mod pull;
mod server;

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};

pub use protocol::{Ask, RangeRequest, RequestError, REQUEST_LEN, STATUS_ERROR, STATUS_OK};
pub use pull::{read_range, release_hold, RangeError};
pub use server::{DataPort, IDLE_TIMEOUT, MAX_CONNECTIONS};

/// The holder id under which a node keeps an object it is sending (no process has pid 0).
pub const TRANSFER_HOLDER: u32 = 0;
/// How long either side waits on a peer that stopped reading or sending mid-range.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Under TLS, the most bytes each side moves through its buffer at a time (one buffer per
/// connection, allocated once).
pub const TLS_CHUNK: usize = 1 << 20;

/// `left` bytes, or `limit` if fewer.
fn chunk(left: u64, limit: usize) -> usize {
    usize::try_from(left).map_or(limit, |left| left.min(limit))
}

/// `operation`, or `TimedOut` after `timeout`.
async fn within(
    timeout: Duration,
    operation: impl Future<Output = std::io::Result<()>>,
) -> std::io::Result<()> {
    tokio::time::timeout(timeout, operation)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// Write `bytes` and flush them (under TLS they wait in the session until flushed), within
/// `timeout`.
async fn send<S: AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: &[u8],
    timeout: Duration,
) -> std::io::Result<()> {
    within(timeout, async {
        stream.write_all(bytes).await?;
        stream.flush().await
    })
    .await
}

#[cfg(test)]
mod tests;
