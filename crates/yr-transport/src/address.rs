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

/// The host of a TCP `host:port` (without the brackets of an IPv6 literal); `None` when the
/// text has no port.
pub fn host_of(host_port: &str) -> Option<&str> {
    let (host, port) = host_port.rsplit_once(':')?;
    if port.is_empty() || host.is_empty() {
        return None;
    }
    Some(
        host.strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host),
    )
}

/// Whether `host` names this machine's loopback (`127.0.0.0/8`, `::1`, `localhost`): an address
/// no other machine can reach.
pub fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn invalid(text: &str) -> Error {
    Error::new(
        ErrorCode::ParamInvalid,
        format!("{text:?} is not a yr address; use unix:/path/to.sock or host:port"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_of_addresses() {
        assert_eq!(host_of("10.0.0.1:80"), Some("10.0.0.1"));
        assert_eq!(host_of("[::1]:80"), Some("::1"));
        assert_eq!(host_of("name"), None);
        assert!(is_loopback_host("127.0.0.1"));
        assert!(is_loopback_host("::1"));
        assert!(is_loopback_host("localhost"));
        assert!(!is_loopback_host("10.77.0.11"));
    }
}
