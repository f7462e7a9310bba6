//! Where a yr process listens: `unix:/path/to.sock` (same machine; the fast path) or
//! `host:port` (TCP).

use std::path::PathBuf;

use yr_common::{Error, ErrorCode};

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
