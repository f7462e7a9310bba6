//! The serving side of the data port: [`DataPort`] accepts connections (at most
//! [`MAX_CONNECTIONS`]), checks the hello and the request within [`IDLE_TIMEOUT`], and sends the
//! range from the shared-memory region, with non-blocking `sendfile` on plain TCP or through
//! one buffer per connection under TLS, holding the object under [`super::TRANSFER_HOLDER`]
//! while it sends.

use std::future::Future;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use yr_common::auth::{self, ClusterToken};
use yr_common::Error;
use yr_transport::Tls;

use crate::shared_memory::SharedMemoryStore;

use super::protocol::{error_answer, RangeRequest, RequestError, REQUEST_LEN, STATUS_OK};
use super::{chunk, send, within, IO_TIMEOUT, TLS_CHUNK, TRANSFER_HOLDER};

/// How long the serving node waits for a connection's hello and request.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// The most connections served at once; more are closed as they arrive.
pub const MAX_CONNECTIONS: usize = 1024;

/// What serves a data port, and its limits.
#[derive(Clone, Debug)]
pub struct DataPort {
    /// The objects served.
    pub store: Arc<SharedMemoryStore>,
    /// Counts the bytes sent.
    pub served: Arc<AtomicU64>,
    /// What every connection presents first.
    pub token: ClusterToken,
    /// Mutual TLS, which every connection then completes before its hello. `None`: plain TCP.
    pub tls: Option<Arc<Tls>>,
    /// How long a connection may take to send its hello and request.
    pub idle_timeout: Duration,
    /// The most connections served at once.
    pub max_connections: usize,
}

impl DataPort {
    /// A data port over `store` for peers that present `token` (inside `tls`, if given), with
    /// the default limits ([`IDLE_TIMEOUT`], [`MAX_CONNECTIONS`]).
    pub fn new(
        store: Arc<SharedMemoryStore>,
        served: Arc<AtomicU64>,
        token: ClusterToken,
        tls: Option<Arc<Tls>>,
    ) -> DataPort {
        DataPort {
            store,
            served,
            token,
            tls,
            idle_timeout: IDLE_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
        }
    }

    /// Serve ranges on `listener` as tasks of `runtime`, until the runtime stops.
    pub fn serve(
        self,
        listener: std::net::TcpListener,
        runtime: &tokio::runtime::Handle,
    ) -> std::io::Result<()> {
        listener.set_nonblocking(true)?;
        let listener = {
            let _entered = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let port = Arc::new(self);
        let permits = Arc::new(tokio::sync::Semaphore::new(port.max_connections));
        runtime.spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        tracing::debug!(%error, "the data port failed to accept a connection");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    tracing::debug!(
                        limit = port.max_connections,
                        "the data port refused a connection: too many at once"
                    );
                    continue;
                };
                let port = port.clone();
                tokio::spawn(async move {
                    port.serve_one(stream).await;
                    drop(permit);
                });
            }
        });
        Ok(())
    }

    /// Answer one connection: its TLS handshake when this port has TLS, then its hello and
    /// its request, all within the idle timeout.
    async fn serve_one(&self, stream: tokio::net::TcpStream) {
        yr_transport::tcp::tune(&stream);
        let deadline = Instant::now() + self.idle_timeout;
        let Some(tls) = &self.tls else {
            return self.answer(stream, deadline).await;
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
        match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => self.answer(stream, deadline).await,
            // Like a refused hello: no certificate, another CA's, or not TLS at all.
            Ok(Err(error)) => {
                tracing::debug!(%error, "the data port refused a connection: its TLS handshake failed")
            }
            Err(_) => tracing::debug!("a data-port connection completed no TLS handshake in time"),
        }
    }

    /// Answer one connection, after TLS if any: its hello, then its request, by `deadline`.
    pub(super) async fn answer<S: RangeConnection>(&self, mut stream: S, deadline: Instant) {
        let opened = tokio::time::timeout_at(deadline, self.open(&mut stream)).await;
        let request = match opened {
            Err(_) => {
                tracing::debug!("a data-port connection sent no hello and request in time");
                return;
            }
            Ok(Err(Opening::Closed)) => return,
            // `check_hello` answered it already.
            Ok(Err(Opening::Refused(error))) => {
                tracing::debug!(%error, "the data port refused a connection");
                return;
            }
            Ok(Err(Opening::Invalid(error))) => {
                let _ = self.send_error(&mut stream, &error.into()).await;
                return;
            }
            Ok(Ok(request)) => request,
        };
        let store = &self.store;
        if let Err(error) = store.retain_presented(
            request.allocation,
            &request.capability,
            request.size,
            TRANSFER_HOLDER,
        ) {
            let _ = self.send_error(&mut stream, &error).await;
            return;
        }
        let sent = self.send_range(&mut stream, &request).await;
        store.release(&[request.allocation], TRANSFER_HOLDER);
        match sent {
            Ok(true) => {
                self.served.fetch_add(request.length, Ordering::Relaxed);
            }
            Ok(false) => {}
            Err(error) => {
                tracing::debug!(%error, allocation = request.allocation, "a pull ended early")
            }
        }
    }

    /// Check the hello and answer it (as every yr listener does), then read the request.
    async fn open<S: RangeConnection>(&self, stream: &mut S) -> Result<RangeRequest, Opening> {
        yr_transport::check_hello(stream, &self.token)
            .await
            .map_err(Opening::Refused)?;
        let mut bytes = [0u8; REQUEST_LEN];
        stream
            .read_exact(&mut bytes)
            .await
            .map_err(|_| Opening::Closed)?;
        RangeRequest::decode(&bytes).map_err(Opening::Invalid)
    }

    /// Check `request`'s range against the object, then send the status and the bytes.
    /// Whether the bytes were sent (false: an error was).
    async fn send_range<S: RangeConnection>(
        &self,
        stream: &mut S,
        request: &RangeRequest,
    ) -> std::io::Result<bool> {
        if let Err(error) = self
            .store
            .file_range(request.allocation, request.from, request.length)
        {
            return self.send_error(stream, &error).await.map(|()| false);
        }
        send(stream, &[STATUS_OK], IO_TIMEOUT).await?;
        stream.send_bytes(&self.store, request).await.map(|()| true)
    }

    async fn send_error<S: RangeConnection>(
        &self,
        stream: &mut S,
        error: &Error,
    ) -> std::io::Result<()> {
        send(stream, &error_answer(error), IO_TIMEOUT).await
    }
}

/// A connection the data port answers on, plain TCP or TLS over it, and how the bytes of a
/// range go out on it.
pub(super) trait RangeConnection: AsyncRead + AsyncWrite + Unpin + Send {
    /// Send `request`'s bytes from `store`, after the status byte. The caller checked the
    /// range and holds a reference to the object.
    fn send_bytes(
        &mut self,
        store: &SharedMemoryStore,
        request: &RangeRequest,
    ) -> impl Future<Output = std::io::Result<()>> + Send;
}

impl RangeConnection for tokio::net::TcpStream {
    /// Straight from the region with `sendfile`: no copy in this process.
    async fn send_bytes(
        &mut self,
        store: &SharedMemoryStore,
        request: &RangeRequest,
    ) -> std::io::Result<()> {
        let (file, offset) = store
            .file_range(request.allocation, request.from, request.length)
            .map_err(std::io::Error::other)?;
        let file = file.as_raw_fd();
        send_file(self, file, offset, request.length).await
    }
}

impl RangeConnection for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {
    /// Through one buffer: TLS encrypts in this process, so `sendfile` cannot carry it. The
    /// region is memory (a memfd), so each `pread` is a copy, not a wait.
    async fn send_bytes(
        &mut self,
        store: &SharedMemoryStore,
        request: &RangeRequest,
    ) -> std::io::Result<()> {
        let mut buffer = vec![0u8; chunk(request.length, TLS_CHUNK)];
        let mut sent = 0;
        while sent < request.length {
            let count = chunk(request.length - sent, buffer.len());
            store
                .read_at(
                    request.allocation,
                    request.from + sent,
                    &mut buffer[..count],
                )
                .map_err(std::io::Error::other)?;
            within(IO_TIMEOUT, self.write_all(&buffer[..count])).await?;
            sent += count as u64;
        }
        within(IO_TIMEOUT, self.flush()).await
    }
}

/// How a connection's opening went wrong.
enum Opening {
    /// The peer closed or broke the connection.
    Closed,
    /// No hello, or not the cluster's token.
    Refused(auth::AuthError),
    /// The request does not parse.
    Invalid(RequestError),
}

/// `sendfile` `length` bytes of `file` from `offset` to the non-blocking `socket`, waiting for
/// room in its buffer (at most [`IO_TIMEOUT`] at a time) between calls.
async fn send_file(
    socket: &tokio::net::TcpStream,
    file: RawFd,
    offset: u64,
    length: u64,
) -> std::io::Result<()> {
    let mut offset = libc::off_t::try_from(offset).map_err(std::io::Error::other)?;
    let mut left = length;
    while left > 0 {
        tokio::time::timeout(IO_TIMEOUT, socket.writable())
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        let count = usize::try_from(left.min(1 << 30)).unwrap_or(1 << 30);
        let sent = socket.try_io(tokio::io::Interest::WRITABLE, || {
            // SAFETY: both descriptors are open for the call (the caller holds a reference to
            // the object, so the store and its region live); `offset` is a valid off_t that
            // sendfile advances.
            let sent = unsafe { libc::sendfile(socket.as_raw_fd(), file, &mut offset, count) };
            if sent < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(sent as u64)
            }
        });
        match sent {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => left -= n,
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}
