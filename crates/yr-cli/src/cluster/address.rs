//! Addresses for the processes `yr start` runs: this machine's address as other machines see
//! it, free ports, and whether an address takes connections yet.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::time::Duration;

use anyhow::Context;

pub(super) fn free_port(host: std::net::IpAddr, start: u16) -> anyhow::Result<u16> {
    (start..start.saturating_add(200))
        .find(|port| TcpListener::bind((host, *port)).is_ok())
        .with_context(|| format!("no free port in {start}..{}", start.saturating_add(200)))
}

/// This machine's address as other machines see it, for a component that listens on 0.0.0.0:
/// the source address of its route to a private address, else the first address of an
/// interface that is up and not loopback. Never 127.0.0.1, which every other machine would
/// take for itself (a node advertising it would have other nodes forward to themselves).
pub fn local_ip() -> anyhow::Result<String> {
    // Not a listener: an unconnected UDP socket that "connects" (no packet is sent) only to
    // learn which local address the kernel routes a private address from; 0.0.0.0 lets the
    // kernel choose that address.
    let routed = UdpSocket::bind("0.0.0.0:0")
        .and_then(|socket| {
            socket.connect("10.255.255.255:1")?;
            socket.local_addr()
        })
        .map(|address| address.ip())
        .ok()
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified());
    routed
        .or_else(first_interface_address)
        .map(|ip| ip.to_string())
        .context(
            "cannot tell this machine's address (no route to a private address and no interface \
             up but loopback); give the address other machines reach it at with --host ADDR",
        )
}

/// The first IPv4 address (else IPv6) of an interface that is up and not loopback.
fn first_interface_address() -> Option<std::net::IpAddr> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list that freeifaddrs releases below; it is
    // only read in between.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return None;
    }
    let mut found: Vec<std::net::IpAddr> = Vec::new();
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: `entry` is a node of the list getifaddrs returned, not freed yet.
        let interface = unsafe { &*entry };
        entry = interface.ifa_next;
        let flags = interface.ifa_flags;
        if interface.ifa_addr.is_null()
            || flags & libc::IFF_UP as libc::c_uint == 0
            || flags & libc::IFF_LOOPBACK as libc::c_uint != 0
        {
            continue;
        }
        // SAFETY: ifa_addr is non-null and points at a sockaddr whose family says its type.
        let family = i32::from(unsafe { (*interface.ifa_addr).sa_family });
        if family == libc::AF_INET {
            // SAFETY: an AF_INET address is a sockaddr_in.
            let address = unsafe { &*(interface.ifa_addr as *const libc::sockaddr_in) };
            found.push(std::net::Ipv4Addr::from(u32::from_be(address.sin_addr.s_addr)).into());
        } else if family == libc::AF_INET6 {
            // SAFETY: an AF_INET6 address is a sockaddr_in6.
            let address = unsafe { &*(interface.ifa_addr as *const libc::sockaddr_in6) };
            let ip = std::net::Ipv6Addr::from(address.sin6_addr.s6_addr);
            // Link-local addresses need a scope other machines do not have.
            if ip.segments()[0] & 0xffc0 != 0xfe80 {
                found.push(ip.into());
            }
        }
    }
    // SAFETY: `list` came from getifaddrs and is released once; nothing refers to it after.
    unsafe { libc::freeifaddrs(list) };
    found
        .iter()
        .find(|ip| ip.is_ipv4())
        .or_else(|| found.first())
        .copied()
}

pub(super) fn connects(address: &str) -> bool {
    address
        .parse::<SocketAddr>()
        .ok()
        .map(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_millis(200)).is_ok())
        .unwrap_or(false)
}
