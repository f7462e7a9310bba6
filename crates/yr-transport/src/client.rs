//! Opening connections: a gRPC channel to another yr process, with TLS when this process has
//! it (TCP only) and the cluster token's hello first, once per connection.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tonic::transport::{Channel, Endpoint, Uri};
use yr_common::auth::{ClusterToken, HELLO_ACCEPTED, HELLO_REFUSED};
use yr_common::{Error, ErrorCode};

use crate::address::Address;
use crate::credentials::{current, Credentials};
use crate::stream::Connection;

/// How long a connection attempt may take, handshakes included.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The error of a connection the peer refused for its token.
pub fn token_refused(address: &str) -> Error {
    Error::new(
        ErrorCode::AuthorizeFailed,
        format!(
            "the yr process at {address} refused this process's cluster token; use the token of \
             the cluster you connect to (YR_TOKEN, --token, or the session's token file)"
        ),
    )
}

/// The error of a process that has no token to present.
pub fn no_token(address: &str) -> Error {
    Error::new(
        ErrorCode::AuthorizeFailed,
        format!(
            "cannot connect to {address}: this process has no cluster token; set YR_TOKEN (or \
             Config's token, or --token) to the token in the cluster's session directory"
        ),
    )
}

/// What the first byte a server sends after a hello means.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Accepted,
    Refused,
    /// A TLS record (alert or handshake): the server expects TLS and this process sent none.
    Tls,
    /// Anything else: not a yr process, or one of another protocol version.
    Unknown(u8),
}

fn answer_meaning(byte: u8) -> Answer {
    match byte {
        HELLO_ACCEPTED => Answer::Accepted,
        HELLO_REFUSED => Answer::Refused,
        // TLS record content types: change_cipher_spec, alert, handshake, application_data.
        0x14..=0x17 => Answer::Tls,
        other => Answer::Unknown(other),
    }
}

/// The error of an answer that is neither an acceptance nor a refusal.
fn unexpected_answer(address: &str, answer: Answer) -> std::io::Error {
    match answer {
        Answer::Tls => std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!(
                "the yr process at {address} serves TLS and this process connected without it; \
                 give it the cluster's certificates (Config::tls, or YR_TLS_CERT, YR_TLS_KEY and \
                 YR_TLS_CA)"
            ),
        ),
        other => std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "the process at {address} answered the hello with {other:?}: it is not a yr \
                 process of this version"
            ),
        ),
    }
}

/// The peer closed the connection before it answered the hello. A yr process always answers,
/// so the peer is something else, or a TLS server this process spoke plain TCP to.
fn closed_without_answer(address: &str, connection: &Connection) -> std::io::Error {
    let hint = match connection {
        Connection::Tcp(_) => {
            " or it serves TLS and this process connected without it (give it the cluster's \
             certificates: Config::tls, or YR_TLS_CERT, YR_TLS_KEY and YR_TLS_CA)"
        }
        _ => "",
    };
    std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        format!(
            "the process at {address} closed the connection without answering this process's \
             hello: it is not a yr process{hint}"
        ),
    )
}

/// Addresses whose last answered connection refused this process's token (bounded).
static REFUSED: parking_lot::Mutex<Vec<String>> = parking_lot::Mutex::new(Vec::new());
/// The most refused addresses remembered.
const REFUSED_REMEMBERED: usize = 64;

fn note_answer(address: &str, accepted: bool) {
    let mut refused = REFUSED.lock();
    refused.retain(|known| known != address);
    if !accepted {
        if refused.len() >= REFUSED_REMEMBERED {
            refused.remove(0);
        }
        refused.push(address.to_string());
    }
}

/// Whether the yr process at `address` refused this process's token on the last connection
/// that got an answer: a failed request to it is then 1014 ([`token_refused`]).
pub fn refused(address: &str) -> bool {
    match Address::parse(address) {
        Ok(parsed) => {
            let parsed = parsed.to_string();
            REFUSED.lock().contains(&parsed)
        }
        Err(_) => false,
    }
}

/// A connection whose hello is sent and whose answer comes as the first byte the peer sends:
/// reads take and check it first. A refusal ends the connection with `PermissionDenied`.
///
/// A write that fails before the answer is read is held back: the peer that refused (or that
/// speaks TLS) has answered and closed, so its answer, read next, says why the write failed.
/// HTTP/2 reports a failed write to its requests only as a broken pipe, so the error has to
/// come from the read side to reach the caller.
pub struct Pipelined {
    connection: Connection,
    answer_pending: bool,
    address: String,
    /// A write error held back until the answer is read.
    write_failed: Option<std::io::Error>,
}

impl AsyncRead for Pipelined {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.answer_pending {
            let mut answer = [0u8; 1];
            let mut answer_buf = ReadBuf::new(&mut answer);
            match Pin::new(&mut this.connection).poll_read(cx, &mut answer_buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) if this.write_failed.is_some() => {
                    return Poll::Ready(Err(this.closed_without_answer()))
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                // The peer closed before it answered.
                Poll::Ready(Ok(())) if answer_buf.filled().is_empty() => {
                    return Poll::Ready(Err(this.closed_without_answer()))
                }
                Poll::Ready(Ok(())) => match answer_meaning(answer[0]) {
                    Answer::Accepted => {
                        note_answer(&this.address, true);
                        this.answer_pending = false;
                    }
                    Answer::Refused => {
                        note_answer(&this.address, false);
                        return Poll::Ready(Err(std::io::Error::new(
                            std::io::ErrorKind::PermissionDenied,
                            format!(
                                "the yr process at {} refused this process's cluster token",
                                this.address
                            ),
                        )));
                    }
                    other => return Poll::Ready(Err(unexpected_answer(&this.address, other))),
                },
            }
        }
        if let Some(error) = this.write_failed.take() {
            // Accepted, but a write after the hello failed: the connection is broken.
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut this.connection).poll_read(cx, buf)
    }
}

impl Pipelined {
    fn closed_without_answer(&self) -> std::io::Error {
        closed_without_answer(&self.address, &self.connection)
    }

    /// What a write's outcome becomes: before the answer, a failure is held back and the write
    /// reported done, so that the reader learns why from the answer.
    fn after_write<T>(
        &mut self,
        outcome: Poll<std::io::Result<T>>,
        done: T,
    ) -> Poll<std::io::Result<T>> {
        match outcome {
            Poll::Ready(Err(error)) if self.answer_pending => {
                self.write_failed.get_or_insert(error);
                Poll::Ready(Ok(done))
            }
            other => other,
        }
    }

    /// A write error held back while the answer was pending, once the answer is read.
    fn held_back(&mut self) -> Option<std::io::Error> {
        if self.answer_pending {
            return None;
        }
        self.write_failed.take()
    }
}

impl AsyncWrite for Pipelined {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if let Some(error) = this.held_back() {
            return Poll::Ready(Err(error));
        }
        if this.write_failed.is_some() {
            return Poll::Ready(Ok(buf.len()));
        }
        let outcome = Pin::new(&mut this.connection).poll_write(cx, buf);
        this.after_write(outcome, buf.len())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(error) = this.held_back() {
            return Poll::Ready(Err(error));
        }
        if this.write_failed.is_some() {
            return Poll::Ready(Ok(()));
        }
        let outcome = Pin::new(&mut this.connection).poll_flush(cx);
        this.after_write(outcome, ())
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().connection).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let len = bufs.iter().map(|b| b.len()).sum();
        if let Some(error) = this.held_back() {
            return Poll::Ready(Err(error));
        }
        if this.write_failed.is_some() {
            return Poll::Ready(Ok(len));
        }
        let outcome = Pin::new(&mut this.connection).poll_write_vectored(cx, bufs);
        this.after_write(outcome, len)
    }

    fn is_write_vectored(&self) -> bool {
        self.connection.is_write_vectored()
    }
}

/// The stream to `address`: Unix, TCP, or TLS over TCP when this process has TLS.
async fn connect_stream(
    address: &Address,
    credentials: &Credentials,
) -> std::io::Result<Connection> {
    Ok(match address {
        Address::Unix(path) => Connection::Unix(UnixStream::connect(path).await?),
        Address::Tcp(host_port) => {
            let stream = TcpStream::connect(host_port.as_str()).await?;
            crate::tcp::tune(&stream);
            match &credentials.tls {
                None => Connection::Tcp(stream),
                Some(tls) => {
                    let name = tls
                        .server_name_for(host_port)
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                    let connector = tokio_rustls::TlsConnector::from(tls.client.clone());
                    Connection::TlsClient(Box::new(connector.connect(name, stream).await?))
                }
            }
        }
    })
}

fn token_of(credentials: &Credentials) -> std::io::Result<&ClusterToken> {
    credentials
        .token
        .as_ref()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::PermissionDenied, "no token"))
}

/// Open a stream to `address` and send the token's hello without waiting for its answer,
/// which is read with the peer's first bytes (what channels use).
pub async fn open_pipelined(
    address: &Address,
    credentials: &Credentials,
) -> std::io::Result<Pipelined> {
    let token = token_of(credentials)?;
    let mut connection = connect_stream(address, credentials).await?;
    connection.write_all(&token.hello()).await?;
    connection.flush().await?;
    Ok(Pipelined {
        connection,
        answer_pending: true,
        address: address.to_string(),
        write_failed: None,
    })
}

/// Open a stream to `address` and authenticate it: TLS when configured (TCP only), then the
/// token's hello and its answer. `refused` is set when the peer turned the token down.
pub async fn open(
    address: &Address,
    credentials: &Credentials,
    refused: &AtomicBool,
) -> std::io::Result<Connection> {
    let token = token_of(credentials)?;
    let mut connection = connect_stream(address, credentials).await?;
    match say_hello(&mut connection, token, &address.to_string()).await {
        Ok(()) => Ok(connection),
        Err(Hello::Refused) => {
            refused.store(true, Ordering::Relaxed);
            Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "the peer refused the cluster token",
            ))
        }
        // The peer went away (or is not a yr process): a connection failure, not a refusal.
        Err(Hello::Failed(error)) => Err(error),
    }
}

/// How a hello failed.
enum Hello {
    /// The peer answered that it does not accept the token.
    Refused,
    /// The connection failed before an answer.
    Failed(std::io::Error),
}

/// Send the token's hello and read the answer.
async fn say_hello(
    connection: &mut Connection,
    token: &ClusterToken,
    address: &str,
) -> Result<(), Hello> {
    connection
        .write_all(&token.hello())
        .await
        .map_err(Hello::Failed)?;
    connection.flush().await.map_err(Hello::Failed)?;
    let mut answer = [0u8; 1];
    if let Err(error) = connection.read_exact(&mut answer).await {
        return Err(Hello::Failed(match error.kind() {
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
                closed_without_answer(address, connection)
            }
            _ => error,
        }));
    }
    match answer_meaning(answer[0]) {
        Answer::Accepted => Ok(()),
        Answer::Refused => Err(Hello::Refused),
        other => Err(Hello::Failed(unexpected_answer(address, other))),
    }
}

/// A gRPC channel to `address`. Fails with `code` (4002 for a driver's init, 3001 for a
/// runtime, …) and a message naming the address, or with 1014 if the peer refuses this
/// process's token.
pub async fn connect(address: &str, code: ErrorCode) -> Result<Channel, Error> {
    connect_with(address, code, |endpoint| endpoint).await
}

/// [`connect`], with the endpoint's settings (keep-alive, …) adjusted by `configure`.
pub async fn connect_with(
    address: &str,
    code: ErrorCode,
    configure: impl FnOnce(Endpoint) -> Endpoint,
) -> Result<Channel, Error> {
    let (endpoint, connector) = prepare(address, code)?;
    match configure(endpoint).connect_with_connector(connector).await {
        Ok(channel) => Ok(channel),
        Err(_) if refused(address) => Err(token_refused(address)),
        Err(e) => Err(connect_failed(address, code, &e)),
    }
}

/// A channel to `address` that connects on its first call (and again after a break), so it can
/// be made before the peer is up. Fails only for a malformed address or a missing token.
pub fn connect_lazy_with(
    address: &str,
    code: ErrorCode,
    configure: impl FnOnce(Endpoint) -> Endpoint,
) -> Result<Channel, Error> {
    let (endpoint, connector) = prepare(address, code)?;
    Ok(configure(endpoint).connect_with_connector_lazy(connector))
}

fn connect_failed(address: &str, code: ErrorCode, e: &dyn std::fmt::Display) -> Error {
    Error::new(
        code,
        format!("failed to connect to {address}: {e}; check that the yr process there is running"),
    )
}

/// Opens one authenticated connection for a channel.
type ConnectFn = Box<
    dyn Fn(Uri) -> Pin<Box<dyn Future<Output = std::io::Result<TokioIo<Pipelined>>> + Send>>
        + Send
        + Sync,
>;
type Connector = tower::util::ServiceFn<ConnectFn>;

fn prepare(address: &str, code: ErrorCode) -> Result<(Endpoint, Connector), Error> {
    let parsed = Address::parse(address)?;
    let credentials = current();
    if credentials.token.is_none() {
        return Err(no_token(address));
    }
    let uri = match &parsed {
        Address::Tcp(host_port) => format!("http://{host_port}"),
        Address::Unix(_) => "http://[::1]:1".to_string(),
    };
    let endpoint = Endpoint::from_shared(uri)
        .map_err(|e| connect_failed(address, code, &e))?
        .connect_timeout(CONNECT_TIMEOUT);
    let connect: ConnectFn = Box::new(move |_: Uri| {
        let parsed = parsed.clone();
        let credentials = credentials.clone();
        Box::pin(async move {
            let opened =
                tokio::time::timeout(CONNECT_TIMEOUT, open_pipelined(&parsed, &credentials))
                    .await
                    .map_err(|_| {
                        std::io::Error::new(std::io::ErrorKind::TimedOut, "connecting timed out")
                    })??;
            Ok(TokioIo::new(opened))
        })
    });
    Ok((endpoint, tower::service_fn(connect)))
}
