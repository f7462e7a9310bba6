//! Accepting connections: every connection a yr server takes is authenticated before any
//! request on it is read. A Unix peer must run as this user (or root, `SO_PEERCRED`); a TCP
//! peer completes TLS when this process has it; then every peer sends the cluster token's
//! hello. A connection that fails any step is answered `HELLO_REFUSED` (where it can be) and
//! closed, with no side effect. Handshakes run in tasks of their own, each bounded by
//! [`HANDSHAKE_TIMEOUT`] and at most [`MAX_HANDSHAKES`] at once, so idle or slow peers
//! cannot hold the accept loop.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use yr_common::auth::{
    self, AuthError, ClusterToken, PeerCredentials, HELLO_ACCEPTED, HELLO_HEADER, HELLO_REFUSED,
};

use crate::credentials::{current, Credentials};
use crate::stream::Connection;

/// How long a peer may take to complete TLS and its hello.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once per listener; connections beyond it are closed at once.
pub const MAX_HANDSHAKES: usize = 256;
/// Authenticated connections waiting for the server to take them.
const ACCEPTED_QUEUE: usize = 64;

/// An authenticated connection, as the gRPC server sees it.
pub struct Authenticated<Info> {
    connection: Connection,
    info: Info,
}

impl<Info> Authenticated<Info> {
    /// The authenticated stream itself, for a server that speaks its own protocol on it (a
    /// runtime's call frames) rather than gRPC.
    pub fn into_connection(self) -> Connection {
        self.connection
    }

    /// Who the peer is (its TCP addresses, or its Unix credentials).
    pub fn info(&self) -> &Info {
        &self.info
    }
}

impl Connected for Authenticated<TcpConnectInfo> {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl Connected for Authenticated<PeerCredentials> {
    type ConnectInfo = PeerCredentials;

    fn connect_info(&self) -> PeerCredentials {
        self.info
    }
}

impl<Info: Unpin> AsyncRead for Authenticated<Info> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().connection).poll_read(cx, buf)
    }
}

impl<Info: Unpin> AsyncWrite for Authenticated<Info> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().connection).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().connection).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().connection).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().connection).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.connection.is_write_vectored()
    }
}

/// Read the peer's hello and answer it.
pub async fn check_hello<S>(stream: &mut S, token: &ClusterToken) -> Result<(), AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut header = [0u8; HELLO_HEADER];
    let checked = async {
        stream
            .read_exact(&mut header)
            .await
            .map_err(|_| AuthError::NotAHello)?;
        let length = auth::hello_length(&header)?;
        let mut presented = vec![0u8; length];
        stream
            .read_exact(&mut presented)
            .await
            .map_err(|_| AuthError::NotAHello)?;
        if token.accepts(&presented) {
            Ok(())
        } else {
            Err(AuthError::Wrong)
        }
    }
    .await;
    let answer = if checked.is_ok() {
        HELLO_ACCEPTED
    } else {
        HELLO_REFUSED
    };
    // A peer that went away hears nothing; the result stands.
    let _ = stream.write_all(&[answer]).await;
    let _ = stream.flush().await;
    if checked.is_err() {
        linger(stream).await;
    }
    checked
}

/// Before closing a refused connection, take (and drop) a little of what the peer sent after
/// its hello: closing with unread bytes resets the connection, and a reset can destroy the
/// refusal before the peer reads it.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) {
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let mut left: usize = 64 * 1024;
    let drained = async {
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(200), drained).await;
}

async fn authenticate_tcp(
    stream: TcpStream,
    credentials: &Credentials,
) -> Result<Authenticated<TcpConnectInfo>, String> {
    let token = credentials
        .token
        .as_ref()
        .ok_or("this process has no cluster token")?;
    crate::tcp::tune(&stream);
    let info = TcpConnectInfo {
        local_addr: stream.local_addr().ok(),
        remote_addr: stream.peer_addr().ok(),
    };
    let mut connection = match &credentials.tls {
        None => Connection::Tcp(stream),
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
            let accepted = acceptor
                .accept(stream)
                .await
                .map_err(|e| format!("TLS handshake failed: {e}"))?;
            Connection::TlsServer(Box::new(accepted))
        }
    };
    check_hello(&mut connection, token)
        .await
        .map_err(|e| e.to_string())?;
    Ok(Authenticated { connection, info })
}

async fn authenticate_unix(
    stream: UnixStream,
    credentials: &Credentials,
) -> Result<Authenticated<PeerCredentials>, String> {
    let token = credentials
        .token
        .as_ref()
        .ok_or("this process has no cluster token")?;
    let info = auth::peer_credentials(&stream).map_err(|e| e.to_string())?;
    let mut connection = Connection::Unix(stream);
    if let Err(error) = auth::peer_allowed(&info) {
        let _ = connection.write_all(&[HELLO_REFUSED]).await;
        linger(&mut connection).await;
        return Err(error.to_string());
    }
    check_hello(&mut connection, token)
        .await
        .map_err(|e| e.to_string())?;
    Ok(Authenticated { connection, info })
}

/// Runs the accept loop of one listener: each accepted connection is authenticated in a task
/// of its own and, if it passes, queued for the server.
fn accept_loop<S, I, A, F>(
    mut accept: A,
    authenticate: fn(S, Arc<Credentials>) -> F,
) -> ReceiverStream<io::Result<Authenticated<I>>>
where
    S: Send + 'static,
    I: Send + 'static,
    A: FnMut() -> Pin<Box<dyn std::future::Future<Output = io::Result<(S, String)>> + Send>>
        + Send
        + 'static,
    F: std::future::Future<Output = Result<Authenticated<I>, String>> + Send + 'static,
{
    let (accepted, queue) = mpsc::channel(ACCEPTED_QUEUE);
    tokio::spawn(async move {
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        loop {
            let next = tokio::select! {
                next = accept() => next,
                () = accepted.closed() => return,
            };
            let (stream, peer) = match next {
                Ok(next) => next,
                Err(error) => {
                    // Out of file descriptors, typically: pace the loop instead of spinning.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "too many connections are authenticating; closing this one");
                continue;
            };
            let accepted = accepted.clone();
            let credentials = current();
            tokio::spawn(async move {
                let result =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, authenticate(stream, credentials))
                        .await;
                drop(permit);
                match result {
                    Ok(Ok(connection)) => {
                        let _ = accepted.send(Ok(connection)).await;
                    }
                    Ok(Err(reason)) => {
                        tracing::warn!(%peer, %reason, "refused a connection (1014)");
                    }
                    Err(_) => {
                        tracing::warn!(%peer, "refused a connection that did not authenticate within {HANDSHAKE_TIMEOUT:?}");
                    }
                }
            });
        }
    });
    ReceiverStream::new(queue)
}

/// The authenticated connections `listener` accepts, for tonic's `serve_with_incoming`.
/// Requests carry the peer's [`TcpConnectInfo`].
pub fn incoming_tcp(
    listener: TcpListener,
) -> ReceiverStream<io::Result<Authenticated<TcpConnectInfo>>> {
    let listener = Arc::new(listener);
    accept_loop(
        move || {
            let listener = listener.clone();
            Box::pin(async move {
                let (stream, peer) = listener.accept().await?;
                Ok((stream, peer.to_string()))
            })
        },
        |stream, credentials| async move { authenticate_tcp(stream, &credentials).await },
    )
}

/// The authenticated connections `listener` accepts, for tonic's `serve_with_incoming`.
/// Requests carry the peer's [`PeerCredentials`]: its pid is the caller's identity on the node.
pub fn incoming_unix(
    listener: UnixListener,
) -> ReceiverStream<io::Result<Authenticated<PeerCredentials>>> {
    let listener = Arc::new(listener);
    accept_loop(
        move || {
            let listener = listener.clone();
            Box::pin(async move {
                let (stream, _) = listener.accept().await?;
                Ok((stream, "a unix peer".to_string()))
            })
        },
        |stream, credentials| async move { authenticate_unix(stream, &credentials).await },
    )
}

/// The caller's peer credentials, for a request that came over a Unix socket served with
/// [`incoming_unix`]; `None` over TCP.
pub fn peer_of<T>(request: &tonic::Request<T>) -> Option<PeerCredentials> {
    request.extensions().get::<PeerCredentials>().copied()
}
