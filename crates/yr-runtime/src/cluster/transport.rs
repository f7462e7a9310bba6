//! Connections between yr processes. An address is `unix:/path/to.sock` (same machine; the
//! fast path) or `host:port` (TCP). Every gRPC channel and listener in yr is made here.

use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};
use yr_common::{Error, ErrorCode};

/// How long a connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a process listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// A Unix socket.
    Unix(PathBuf),
    /// A TCP `host:port`.
    Tcp(String),
}

impl Address {
    /// Parse `unix:/path` or `host:port` (an optional `http://` is ignored).
    pub fn parse(text: &str) -> Result<Address, Error> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(invalid(text));
            }
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        let host_port = text
            .strip_prefix("http://")
            .or_else(|| text.strip_prefix("grpc://"))
            .unwrap_or(text);
        if host_port.is_empty() || !host_port.contains(':') {
            return Err(invalid(text));
        }
        Ok(Address::Tcp(host_port.to_string()))
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
            Address::Tcp(host_port) => f.write_str(host_port),
        }
    }
}

fn invalid(text: &str) -> Error {
    Error::new(
        ErrorCode::ParamInvalid,
        format!("{text:?} is not a yr address; use unix:/path/to.sock or host:port"),
    )
}

/// A gRPC channel to `address`. Fails with `code` (4002 for a driver's init, 3001 for a
/// runtime, …) and a message naming the address.
pub async fn connect(address: &str, code: ErrorCode) -> Result<Channel, Error> {
    let parsed = Address::parse(address)?;
    let failed = |e: &dyn std::fmt::Display| {
        Error::new(
            code,
            format!("failed to connect to {address}: {e}; check that the yr node there is running"),
        )
    };
    match parsed {
        Address::Tcp(host_port) => {
            let endpoint = Endpoint::from_shared(format!("http://{host_port}"))
                .map_err(|e| failed(&e))?
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true);
            endpoint.connect().await.map_err(|e| failed(&e))
        }
        Address::Unix(path) => {
            let endpoint = Endpoint::from_static("http://[::1]:1").connect_timeout(CONNECT_TIMEOUT);
            endpoint
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(TokioIo::new(stream))
                    }
                }))
                .await
                .map_err(|e| failed(&e))
        }
    }
}
