//! Opening connections: a gRPC channel to another yr process, with TLS when this process has
//! it (TCP only) and the cluster token's hello first, once per connection.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tonic::transport::{Channel, Endpoint, Uri};
use yr_common::auth::{ClusterToken, HELLO_ACCEPTED};
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

/// Open a stream to `address` and authenticate it: TLS when configured (TCP only), then the
/// token's hello. `refused` is set when the peer turned the token down.
pub async fn open(
    address: &Address,
    credentials: &Credentials,
    refused: &AtomicBool,
) -> std::io::Result<Connection> {
    let token = credentials
        .token
        .as_ref()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::PermissionDenied, "no token"))?;
    let mut connection = match address {
        Address::Unix(path) => Connection::Unix(UnixStream::connect(path).await?),
        Address::Tcp(host_port) => {
            let stream = TcpStream::connect(host_port.as_str()).await?;
            stream.set_nodelay(true)?;
            match &credentials.tls {
                None => Connection::Tcp(stream),
                Some(tls) => {
                    let name = crate::tls::server_name(host_port)
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                    let connector = tokio_rustls::TlsConnector::from(tls.client.clone());
                    Connection::TlsClient(Box::new(connector.connect(name, stream).await?))
                }
            }
        }
    };
    match say_hello(&mut connection, token).await {
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
async fn say_hello(connection: &mut Connection, token: &ClusterToken) -> Result<(), Hello> {
    connection
        .write_all(&token.hello())
        .await
        .map_err(Hello::Failed)?;
    connection.flush().await.map_err(Hello::Failed)?;
    let mut answer = [0u8; 1];
    connection
        .read_exact(&mut answer)
        .await
        .map_err(Hello::Failed)?;
    if answer[0] == HELLO_ACCEPTED {
        Ok(())
    } else {
        Err(Hello::Refused)
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
    let (endpoint, connector, refused) = prepare(address, code)?;
    match configure(endpoint).connect_with_connector(connector).await {
        Ok(channel) => Ok(channel),
        Err(_) if refused.load(Ordering::Relaxed) => Err(token_refused(address)),
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
    let (endpoint, connector, _refused) = prepare(address, code)?;
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
    dyn Fn(
            Uri,
        )
            -> std::pin::Pin<Box<dyn Future<Output = std::io::Result<TokioIo<Connection>>> + Send>>
        + Send
        + Sync,
>;
type Connector = tower::util::ServiceFn<ConnectFn>;

fn prepare(
    address: &str,
    code: ErrorCode,
) -> Result<(Endpoint, Connector, Arc<AtomicBool>), Error> {
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
    let refused = Arc::new(AtomicBool::new(false));
    let connector_refused = refused.clone();
    let connect: ConnectFn = Box::new(move |_: Uri| {
        let parsed = parsed.clone();
        let credentials = credentials.clone();
        let refused = connector_refused.clone();
        Box::pin(async move {
            let opened =
                tokio::time::timeout(CONNECT_TIMEOUT, open(&parsed, &credentials, &refused))
                    .await
                    .map_err(|_| {
                        std::io::Error::new(std::io::ErrorKind::TimedOut, "the handshake timed out")
                    })??;
            Ok(TokioIo::new(opened))
        })
    });
    Ok((endpoint, tower::service_fn(connect), refused))
}
