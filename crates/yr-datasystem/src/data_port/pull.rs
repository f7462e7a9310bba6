//! The pulling side of the data port: [`read_range`] dials the serving node (inside TLS when
//! given), presents the token, sends the request and moves the answer's bytes into its own
//! allocation, with `splice` through a pipe on plain TCP or through one buffer under TLS; and
//! [`RangeError`], how a pull fails.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

use prost::Message;

use tokio_rustls::rustls;
use yr_common::auth::{ClusterToken, HELLO_ACCEPTED};
use yr_common::{Error, ErrorCode};
use yr_proto::error_from_proto;
use yr_transport::Tls;

use crate::shared_memory::SharedMemoryStore;

use super::protocol::{RangeRequest, MAX_ERROR_LEN, STATUS_ERROR, STATUS_OK};
use super::{chunk, IO_TIMEOUT, TLS_CHUNK};

/// How long a pull waits to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes moved per `splice` through the pipe.
const PIPE_CHUNK: usize = 1 << 20;
/// The first byte of a TLS alert record: what a plain-TCP pull reads from a data port that
/// speaks TLS instead of its hello's answer.
const TLS_ALERT: u8 = 0x15;

/// Why reading one range failed.
#[derive(Debug)]
pub enum RangeError {
    /// The serving node answered with an error.
    Remote(Error),
    /// The serving node refused the cluster token.
    Refused(Error),
    /// The connection failed or ended early.
    Transport(String),
    /// Writing the local copy failed.
    Local(Error),
}

/// Read `request`'s range from the data port at `address` into allocation `local` of `store`,
/// at the same offset: inside a mutual-TLS session with `tls`'s certificate when given (the
/// serving node must have TLS too), presenting `token`.
pub fn read_range(
    address: &str,
    token: &ClusterToken,
    tls: Option<&Tls>,
    request: &RangeRequest,
    store: &SharedMemoryStore,
    local: u64,
) -> std::result::Result<(), RangeError> {
    let transport = |what: &str, error: std::io::Error| {
        RangeError::Transport(format!("{what} {address}: {error}"))
    };
    let target = address
        .to_socket_addrs()
        .map_err(|error| transport("cannot resolve", error))?
        .next()
        .ok_or_else(|| RangeError::Transport(format!("{address} resolves to no address")))?;
    let mut stream = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)
        .map_err(|error| transport("cannot connect to", error))?;
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    yr_transport::tcp::tune(&stream);
    let Some(tls) = tls else {
        ask(&mut stream, address, token, request)?;
        let (file, offset) = store
            .file_range(local, request.from, request.length)
            .map_err(RangeError::Local)?;
        return splice_into(stream.as_fd(), file, offset, request.length)
            .map_err(|error| transport("the range broke off from", error));
    };
    let name = tls
        .server_name_for(address)
        .map_err(|error| RangeError::Transport(error.message().to_string()))?;
    let session = rustls::ClientConnection::new(tls.client.clone(), name)
        .map_err(|error| tls_refused(address, &error))?;
    let mut stream = rustls::StreamOwned::new(session, stream);
    ask(&mut stream, address, token, request)?;
    store
        .file_range(local, request.from, request.length)
        .map_err(RangeError::Local)?;
    let mut buffer = vec![0u8; chunk(request.length, TLS_CHUNK)];
    let mut received = 0;
    while received < request.length {
        let count = chunk(request.length - received, buffer.len());
        stream
            .read_exact(&mut buffer[..count])
            .map_err(|error| broken(address, "the range broke off from", error))?;
        store
            .write_at(local, request.from + received, &buffer[..count])
            .map_err(RangeError::Local)?;
        received += count as u64;
    }
    Ok(())
}

/// Present the token, send the request and read the status: `Ok` when the bytes follow.
fn ask(
    stream: &mut (impl Read + Write),
    address: &str,
    token: &ClusterToken,
    request: &RangeRequest,
) -> std::result::Result<(), RangeError> {
    // Only a peer that has the token gets to ask for anything.
    stream
        .write_all(&token.hello())
        .and_then(|()| stream.flush())
        .map_err(|error| broken(address, "cannot send the cluster token to", error))?;
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).map_err(|error| {
        broken(
            address,
            "the connection closed before the cluster token was answered by",
            error,
        )
    })?;
    match answer[0] {
        HELLO_ACCEPTED => {}
        TLS_ALERT => {
            return Err(RangeError::Refused(Error::new(
                ErrorCode::AuthorizeFailed,
                format!(
                    "the data port at {address} speaks TLS and this node does not; give every \
                     node of the cluster --tls-cert, --tls-key and --tls-ca"
                ),
            )))
        }
        _ => {
            return Err(RangeError::Refused(Error::new(
                ErrorCode::AuthorizeFailed,
                format!(
                    "the data port at {address} refused the cluster token; use the token of \
                     the cluster you connect to (YR_TOKEN, --token, or the session's token file)"
                ),
            )))
        }
    }
    stream
        .write_all(&request.encode())
        .and_then(|()| stream.flush())
        .map_err(|error| broken(address, "cannot ask", error))?;
    let mut status = [0u8; 1];
    stream
        .read_exact(&mut status)
        .map_err(|error| broken(address, "no answer from", error))?;
    if status[0] != STATUS_OK {
        return Err(read_error(stream, status[0]));
    }
    Ok(())
}

/// The error of a connection to `address` that failed while it did `what`: a refusal (1014)
/// if TLS failed (a certificate the other side does not trust, or TLS on one side only), else
/// a transport error.
fn broken(address: &str, what: &str, error: std::io::Error) -> RangeError {
    match error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => tls_refused(address, tls),
        None => RangeError::Transport(format!("{what} {address}: {error}")),
    }
}

fn tls_refused(address: &str, error: &rustls::Error) -> RangeError {
    RangeError::Refused(Error::new(
        ErrorCode::AuthorizeFailed,
        format!(
            "no TLS session with the data port at {address}: {error}; every node of the \
             cluster needs TLS with a certificate signed by the cluster's CA (--tls-cert, \
             --tls-key, --tls-ca)"
        ),
    ))
}

/// The error the serving node sent after status `status`.
pub(super) fn read_error(stream: &mut impl Read, status: u8) -> RangeError {
    if status != STATUS_ERROR {
        return RangeError::Transport(format!("the data port answered with status {status}"));
    }
    let mut length = [0u8; 4];
    if let Err(error) = stream.read_exact(&mut length) {
        return RangeError::Transport(format!("the data port's error was cut short: {error}"));
    }
    let length = u32::from_le_bytes(length);
    if length > MAX_ERROR_LEN {
        return RangeError::Transport(format!(
            "the data port sent an error of {length} bytes, over the limit of {MAX_ERROR_LEN}"
        ));
    }
    let mut encoded = vec![0u8; length as usize];
    if let Err(error) = stream.read_exact(&mut encoded) {
        return RangeError::Transport(format!("the data port's error was cut short: {error}"));
    }
    match yr_proto::v1::ErrorInfo::decode(encoded.as_slice()) {
        Ok(info) => RangeError::Remote(error_from_proto(&info)),
        Err(error) => {
            RangeError::Transport(format!("the data port's error does not decode: {error}"))
        }
    }
}

/// Move `length` bytes from `socket` into `file` at `offset` through a pipe with `splice`.
fn splice_into(
    socket: BorrowedFd<'_>,
    file: BorrowedFd<'_>,
    offset: u64,
    length: u64,
) -> std::io::Result<()> {
    let (pipe_read, pipe_write) = pipe()?;
    let mut file_offset = libc::loff_t::try_from(offset).map_err(std::io::Error::other)?;
    let mut left = length;
    while left > 0 {
        let want = usize::try_from(left).unwrap_or(PIPE_CHUNK).min(PIPE_CHUNK);
        // SAFETY: all descriptors are open for the call; null offsets mean "the current
        // position" of the socket and the pipe, which have none.
        let into_pipe = retry_interrupted(|| unsafe {
            libc::splice(
                socket.as_raw_fd(),
                std::ptr::null_mut(),
                pipe_write.as_raw_fd(),
                std::ptr::null_mut(),
                want,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_MORE,
            )
        })?;
        if into_pipe == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("the connection closed with {left} bytes to go"),
            ));
        }
        let mut in_pipe = into_pipe;
        while in_pipe > 0 {
            // SAFETY: as above; `file_offset` is a valid loff_t that splice advances.
            let out = retry_interrupted(|| unsafe {
                libc::splice(
                    pipe_read.as_raw_fd(),
                    std::ptr::null_mut(),
                    file.as_raw_fd(),
                    &mut file_offset,
                    in_pipe,
                    libc::SPLICE_F_MOVE,
                )
            })?;
            if out == 0 {
                return Err(std::io::Error::other("the shared memory took no bytes"));
            }
            in_pipe -= out;
        }
        left -= into_pipe as u64;
    }
    Ok(())
}

/// Run a syscall returning a byte count until it is not interrupted.
fn retry_interrupted(mut call: impl FnMut() -> isize) -> std::io::Result<usize> {
    loop {
        let result = call();
        if result >= 0 {
            return Ok(result as usize);
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// A pipe, as big as the kernel lets this process make it.
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the descriptors are new and ours.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // A larger pipe means fewer splices; the default (64 KiB) still works if this is refused.
    // SAFETY: fcntl on a valid descriptor.
    unsafe {
        libc::fcntl(
            write.as_raw_fd(),
            libc::F_SETPIPE_SZ,
            PIPE_CHUNK as libc::c_int,
        )
    };
    Ok((read, write))
}
