//! One byte stream type for every kind of yr connection: TCP, Unix, or TLS over TCP, on the
//! client side and the server side alike, so the rest of the crate handles them the same way.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// A connection between two yr processes.
pub enum Connection {
    /// Plain TCP.
    Tcp(TcpStream),
    /// A Unix socket.
    Unix(UnixStream),
    /// TLS over TCP, as the side that connected.
    TlsClient(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// TLS over TCP, as the side that accepted.
    TlsServer(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

macro_rules! delegate {
    ($self:ident, $inner:ident => $call:expr) => {
        match $self.get_mut() {
            Connection::Tcp($inner) => {
                let $inner = Pin::new($inner);
                $call
            }
            Connection::Unix($inner) => {
                let $inner = Pin::new($inner);
                $call
            }
            Connection::TlsClient($inner) => {
                let $inner = Pin::new($inner.as_mut());
                $call
            }
            Connection::TlsServer($inner) => {
                let $inner = Pin::new($inner.as_mut());
                $call
            }
        }
    };
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, inner => inner.poll_read(cx, buf))
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, inner => inner.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, inner => inner.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, inner => inner.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, inner => inner.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Connection::Tcp(inner) => inner.is_write_vectored(),
            Connection::Unix(inner) => inner.is_write_vectored(),
            Connection::TlsClient(inner) => inner.is_write_vectored(),
            Connection::TlsServer(inner) => inner.is_write_vectored(),
        }
    }
}
