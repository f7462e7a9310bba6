//! Where other processes reach this one, and which way this process reaches another.
//!
//! A process's address (its Worker address: the owner address in its object references, the
//! runtime address in its instances' records) names its Unix Worker socket and, when its node
//! advertises a host other machines can reach, its TCP listeners on that host:
//!
//! ```text
//! unix:/tmp/yr-1000/sockets/w-4242-ab12.sock;tcp=10.77.0.11:40123;calls=10.77.0.11:40124
//! ```
//!
//! `tcp=` is the Worker service (object values, borrows), `calls=` a runtime's call frames (the
//! same frames as its Unix call socket). A process on the same host (the same advertised host)
//! uses the Unix sockets, the fast path; a process on another host uses TCP, authenticated like
//! every TCP connection of the cluster (TLS when configured, then the token's hello). A process
//! whose node advertises no host (a single-machine cluster on 127.0.0.1) has no TCP part. See
//! docs/design/021-calls-across-hosts.md.

use std::path::PathBuf;

use parking_lot::RwLock;
use yr_common::{Error, ErrorCode};
use yr_transport::Address;

/// The key of the Worker service's TCP address.
const WORKER_KEY: &str = "tcp=";
/// The key of a runtime's TCP call listener.
const CALLS_KEY: &str = "calls=";

/// The environment variable that gives a process the host its node advertises (the node sets
/// it for its runtimes; a driver may set it).
pub const HOST_ENV: &str = "YR_HOST";

/// The parts of a process's address.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Endpoints<'a> {
    /// The base address: `unix:/path` (or, from older or foreign peers, `host:port`).
    pub base: &'a str,
    /// The Worker service on TCP.
    pub worker_tcp: Option<&'a str>,
    /// The call listener on TCP (runtimes only).
    pub calls_tcp: Option<&'a str>,
}

/// The address of a process whose Worker socket is `unix` and whose TCP listeners (if any) are
/// `worker_tcp` and `calls_tcp`.
pub fn compose(unix: &str, worker_tcp: Option<&str>, calls_tcp: Option<&str>) -> String {
    let mut address = unix.to_string();
    if let Some(tcp) = worker_tcp {
        address.push(';');
        address.push_str(WORKER_KEY);
        address.push_str(tcp);
    }
    if let Some(tcp) = calls_tcp {
        address.push(';');
        address.push_str(CALLS_KEY);
        address.push_str(tcp);
    }
    address
}

/// Split a process's address into its parts; parts it does not know are ignored.
pub fn parse(address: &str) -> Endpoints<'_> {
    let mut parts = address.split(';');
    let mut endpoints = Endpoints {
        base: parts.next().unwrap_or_default(),
        ..Endpoints::default()
    };
    for part in parts {
        if let Some(tcp) = part.strip_prefix(WORKER_KEY) {
            endpoints.worker_tcp = Some(tcp);
        } else if let Some(tcp) = part.strip_prefix(CALLS_KEY) {
            endpoints.calls_tcp = Some(tcp);
        }
    }
    endpoints
}

/// The host this process's node advertises to other machines; `None` on a single-machine
/// cluster (loopback).
static OWN_HOST: RwLock<Option<String>> = RwLock::new(None);

/// Set the host this process is on (at `init`).
pub fn set_own_host(host: Option<String>) {
    *OWN_HOST.write() = host;
}

/// The host this process is on, if its node advertises one.
pub fn own_host() -> Option<String> {
    OWN_HOST.read().clone()
}

/// Whether the TCP address `tcp` is on this process's host: then its Unix socket is reachable.
fn on_this_host(tcp: &str) -> bool {
    match (OWN_HOST.read().as_deref(), yr_transport::host_of(tcp)) {
        (Some(own), Some(theirs)) => own == theirs,
        _ => false,
    }
}

/// The address to dial for the Worker service of the process at `address`.
pub fn worker_route(address: &str) -> &str {
    let endpoints = parse(address);
    match endpoints.worker_tcp {
        Some(tcp) if !on_this_host(tcp) => tcp,
        _ => endpoints.base,
    }
}

/// How to reach a runtime's calls.
#[derive(Debug, PartialEq, Eq)]
pub enum CallRoute {
    /// Its call socket, on this host.
    Unix(PathBuf),
    /// Its TCP call listener, on another host.
    Tcp(String),
}

impl CallRoute {
    /// Whether the route leaves this host (connecting may then take a network round trip or a
    /// timeout, so it is done off the IO thread).
    pub fn is_remote(&self) -> bool {
        matches!(self, CallRoute::Tcp(_))
    }
}

/// How to reach the calls of the runtime at `address`. Fails with 3001 when it has neither a
/// call socket nor a TCP call listener.
pub fn call_route(address: &str) -> Result<CallRoute, Error> {
    let endpoints = parse(address);
    match (Address::parse(endpoints.base), endpoints.calls_tcp) {
        (_, Some(tcp)) if !on_this_host(tcp) => Ok(CallRoute::Tcp(tcp.to_string())),
        (Ok(Address::Unix(path)), _) => Ok(CallRoute::Unix(yr_common::sockets::call_socket(&path))),
        (Ok(Address::Tcp(_)), None) | (Err(_), None) => Err(Error::new(
            ErrorCode::RequestBetweenRuntimeBus,
            format!(
                "the runtime at {address} has no call socket this process can reach (neither a \
                 Unix socket nor a TCP call listener)"
            ),
        )),
        (_, Some(tcp)) => Ok(CallRoute::Tcp(tcp.to_string())),
    }
}

/// The host this process is on, as its node advertises it: `YR_HOST` (set by the node for its
/// runtimes), else the address this machine uses to reach a node given as `host:port`, else the
/// address in the local node's `session.json`. `None` when that is loopback: no other machine
/// can call this process then, so it listens on no TCP port.
pub fn find_own_host(node_address: &str) -> Option<String> {
    let host = match std::env::var(HOST_ENV) {
        Ok(host) if !host.is_empty() => Some(host),
        _ => match Address::parse(node_address) {
            Ok(Address::Tcp(host_port)) => route_source(&host_port),
            Ok(Address::Unix(socket)) => socket
                .parent()
                .and_then(|dir| yr_common::session::SessionInfo::read(dir).ok())
                .and_then(|session| {
                    yr_transport::host_of(&session.node_address).map(str::to_string)
                }),
            Err(_) => None,
        },
    };
    host.filter(|host| !yr_transport::is_loopback_host(host))
}

/// The local address this machine sends from to reach `host_port` (a UDP socket's route; no
/// packet is sent).
fn route_source(host_port: &str) -> Option<String> {
    use std::net::ToSocketAddrs;
    let target = host_port.to_socket_addrs().ok()?.next()?;
    let unspecified: std::net::SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(unspecified).ok()?;
    socket.connect(target).ok()?;
    Some(socket.local_addr().ok()?.ip().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_and_routes_follow_the_host() {
        let plain = compose("unix:/s/w-1.sock", None, None);
        assert_eq!(plain, "unix:/s/w-1.sock");
        assert_eq!(parse(&plain).worker_tcp, None);
        let full = compose(
            "unix:/s/w-1.sock",
            Some("10.0.0.2:41000"),
            Some("10.0.0.2:41001"),
        );
        let parts = parse(&full);
        assert_eq!(parts.base, "unix:/s/w-1.sock");
        assert_eq!(parts.worker_tcp, Some("10.0.0.2:41000"));
        assert_eq!(parts.calls_tcp, Some("10.0.0.2:41001"));

        set_own_host(Some("10.0.0.2".into()));
        assert_eq!(worker_route(&full), "unix:/s/w-1.sock");
        assert_eq!(
            call_route(&full).expect("route"),
            CallRoute::Unix(PathBuf::from("/s/w-1.calls"))
        );
        set_own_host(Some("10.0.0.3".into()));
        assert_eq!(worker_route(&full), "10.0.0.2:41000");
        assert_eq!(
            call_route(&full).expect("route"),
            CallRoute::Tcp("10.0.0.2:41001".into())
        );
        assert_eq!(worker_route(&plain), "unix:/s/w-1.sock");
        set_own_host(None);
        assert!(call_route(&full).expect("route").is_remote());
        let error = call_route("127.0.0.1:5").expect_err("no call socket");
        assert_eq!(error.code(), ErrorCode::RequestBetweenRuntimeBus);
    }
}
