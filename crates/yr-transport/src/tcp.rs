//! The TCP settings of every connection between yr processes: no Nagle delay, and the kernel's
//! checks that the peer is still there. A peer whose machine is lost or whose link is cut sends
//! no FIN or RST, so without them a connection that waits for an answer would wait forever (an
//! idle connection is never probed, and unacknowledged data is retransmitted for about fifteen
//! minutes). With them, a connection whose peer stops answering is closed
//! [`UNACKNOWLEDGED_LIMIT`] after it went silent:
//! - an idle connection (a call in flight, its request acknowledged) is probed after
//!   [`KEEPALIVE_IDLE`], every [`KEEPALIVE_INTERVAL`]; with `TCP_USER_TIMEOUT` set, the kernel
//!   closes it when the probes have gone unanswered for the limit;
//! - data that stays unacknowledged (or unsent behind a window the peer keeps closed) for the
//!   limit closes the connection too. The limit is long enough for a peer that merely stops
//!   reading for a while (a stopped process's kernel still acknowledges and answers probes).
//!
//! The owner of the connection sees the close as any other break (a failed read or write) and
//! handles it as it handles a crashed peer.

use std::os::fd::AsRawFd;
use std::time::Duration;

/// Idle time before the first keep-alive probe.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(2);
/// Time between keep-alive probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// Unanswered probes after which the connection is closed (`TCP_USER_TIMEOUT` decides first).
pub const KEEPALIVE_PROBES: u32 = 5;
/// How long a silent peer keeps a connection: unanswered probes, or sent data unacknowledged
/// (or unsent behind a closed window), for this long close it.
pub const UNACKNOWLEDGED_LIMIT: Duration = Duration::from_secs(20);

/// Give the TCP connection `socket` yr's settings: TCP_NODELAY and the dead-peer checks above.
/// A setting the kernel refuses is logged and skipped: the connection works without it.
///
/// ```
/// let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
/// let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
/// yr_transport::tcp::tune(&stream);
/// assert!(stream.nodelay().unwrap());
/// ```
pub fn tune(socket: &impl AsRawFd) {
    let fd = socket.as_raw_fd();
    let settings: [(libc::c_int, libc::c_int, libc::c_int, &str); 6] = [
        (libc::IPPROTO_TCP, libc::TCP_NODELAY, 1, "TCP_NODELAY"),
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1, "SO_KEEPALIVE"),
        (
            libc::IPPROTO_TCP,
            libc::TCP_KEEPIDLE,
            KEEPALIVE_IDLE.as_secs() as libc::c_int,
            "TCP_KEEPIDLE",
        ),
        (
            libc::IPPROTO_TCP,
            libc::TCP_KEEPINTVL,
            KEEPALIVE_INTERVAL.as_secs() as libc::c_int,
            "TCP_KEEPINTVL",
        ),
        (
            libc::IPPROTO_TCP,
            libc::TCP_KEEPCNT,
            KEEPALIVE_PROBES as libc::c_int,
            "TCP_KEEPCNT",
        ),
        (
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            UNACKNOWLEDGED_LIMIT.as_millis() as libc::c_int,
            "TCP_USER_TIMEOUT",
        ),
    ];
    for (level, name, value, what) in settings {
        // SAFETY: `fd` is an open socket owned by `socket` for the duration of the call, and
        // the option value is a c_int that lives across it.
        let set = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if set != 0 {
            tracing::debug!(option = what, error = %std::io::Error::last_os_error(), "a TCP setting was refused");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn option(socket: &impl AsRawFd, level: libc::c_int, name: libc::c_int) -> libc::c_int {
        let mut value: libc::c_int = 0;
        let mut length = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a valid fd, and value/length point to live locals of the right size.
        let got = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                level,
                name,
                (&mut value as *mut libc::c_int).cast(),
                &mut length,
            )
        };
        assert_eq!(got, 0, "{}", std::io::Error::last_os_error());
        value
    }

    #[test]
    fn a_tuned_connection_probes_its_peer_and_bounds_unacknowledged_data() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        tune(&stream);
        assert_eq!(option(&stream, libc::IPPROTO_TCP, libc::TCP_NODELAY), 1);
        assert_eq!(option(&stream, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(option(&stream, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), 2);
        assert_eq!(option(&stream, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL), 1);
        assert_eq!(option(&stream, libc::IPPROTO_TCP, libc::TCP_KEEPCNT), 5);
        assert_eq!(
            option(&stream, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
            20_000
        );
    }
}
