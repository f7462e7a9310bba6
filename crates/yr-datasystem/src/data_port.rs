//! The node's data port: a plain TCP listener that serves byte ranges of its shared-memory
//! objects to other nodes' pulls. The serving node sends straight from its region with
//! `sendfile`, and the pulling node moves the bytes from the socket into its own region with
//! `splice`: neither side copies them through a buffer of its own, and there is no framing.
//!
//! One range per connection. The request is [`REQUEST_LEN`] bytes, little-endian: the magic
//! `YRD1`, then the allocation id, the object's size, the first byte and the number of bytes.
//! The answer is one status byte: [`STATUS_OK`] followed by exactly the bytes asked for, or
//! [`STATUS_ERROR`] followed by a `u32` length and an `ErrorInfo` (protobuf) saying why.
//!
//! A fixed set of threads serves the connections, so a burst of pulls queues rather than
//! starting a thread each. While it sends, the serving node holds its own reference to the object
//! ([`TRANSFER_HOLDER`]), so the object outlives its owner until the reader has it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use yr_common::{Error, ErrorCode};

use crate::shared_memory::SharedMemoryStore;
use crate::wire::{error_from_proto, error_to_proto};

/// The holder id under which a node keeps an object it is sending (no process has pid 0).
pub const TRANSFER_HOLDER: u32 = 0;
/// Opens every request.
const MAGIC: &[u8; 4] = b"YRD1";
/// Bytes in a request.
pub const REQUEST_LEN: usize = 4 + 4 * 8;
/// The range follows.
pub const STATUS_OK: u8 = 0;
/// An error follows.
pub const STATUS_ERROR: u8 = 1;
/// The longest an error message may be on the wire.
const MAX_ERROR_LEN: u32 = 64 * 1024;
/// How long a connection waits on a silent peer before it gives up.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a pull waits to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes moved per `splice` through the pipe.
const PIPE_CHUNK: usize = 1 << 20;

/// One range of one object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RangeRequest {
    /// The allocation on the serving node.
    pub allocation: u64,
    /// The object's size, as the reader knows it (a mismatch is refused).
    pub size: u64,
    /// The first byte.
    pub from: u64,
    /// How many bytes.
    pub length: u64,
}

impl RangeRequest {
    fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut bytes = [0u8; REQUEST_LEN];
        bytes[..4].copy_from_slice(MAGIC);
        for (i, field) in [self.allocation, self.size, self.from, self.length]
            .iter()
            .enumerate()
        {
            bytes[4 + i * 8..12 + i * 8].copy_from_slice(&field.to_le_bytes());
        }
        bytes
    }

    fn decode(bytes: &[u8; REQUEST_LEN]) -> Option<RangeRequest> {
        if &bytes[..4] != MAGIC {
            return None;
        }
        let field = |i: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&bytes[4 + i * 8..12 + i * 8]);
            u64::from_le_bytes(word)
        };
        Some(RangeRequest {
            allocation: field(0),
            size: field(1),
            from: field(2),
            length: field(3),
        })
    }
}

/// Why reading one range failed.
#[derive(Debug)]
pub enum RangeError {
    /// The serving node answered with an error.
    Remote(Error),
    /// The connection failed or ended early.
    Transport(String),
    /// Writing the local copy failed.
    Local(Error),
}

/// Serve ranges of `store`'s objects on `listener` until the process ends: one thread accepts,
/// and a fixed set of threads ([`sender_threads`]) serve the connections in turn, so many pulls
/// at once queue instead of starting a thread each. `served` counts the bytes sent.
pub fn serve(
    listener: TcpListener,
    store: Arc<SharedMemoryStore>,
    served: Arc<AtomicU64>,
) -> std::io::Result<()> {
    let (connections, queued) = crossbeam_channel::unbounded::<TcpStream>();
    for _ in 0..sender_threads() {
        let queued = queued.clone();
        let store = store.clone();
        let served = served.clone();
        std::thread::Builder::new()
            .name("yr-data-send".into())
            .spawn(move || {
                for stream in queued {
                    serve_one(stream, &store, &served);
                }
            })?;
    }
    std::thread::Builder::new()
        .name("yr-data-port".into())
        .spawn(move || {
            for connection in listener.incoming() {
                match connection {
                    Ok(stream) => {
                        if connections.send(stream).is_err() {
                            return;
                        }
                    }
                    Err(error) => {
                        tracing::debug!(%error, "the data port failed to accept a connection");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        })
        .map(drop)
}

/// Connections served at once: two per CPU (a sender mostly waits on the network), 4 to 32.
fn sender_threads() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cpus * 2).clamp(4, 32)
}

/// Answer one connection's request.
fn serve_one(mut stream: TcpStream, store: &SharedMemoryStore, served: &AtomicU64) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_nodelay(true);
    let mut bytes = [0u8; REQUEST_LEN];
    if let Err(error) = stream.read_exact(&mut bytes) {
        tracing::debug!(%error, "a pull sent no complete request");
        return;
    }
    let Some(request) = RangeRequest::decode(&bytes) else {
        let error = Error::new(
            ErrorCode::ParamInvalid,
            "the data port got a request that does not start with its magic; only nodes of the \
             same yr version pull objects from it",
        );
        let _ = send_error(&mut stream, &error);
        return;
    };
    if let Err(error) = store.retain(request.allocation, TRANSFER_HOLDER) {
        let _ = send_error(&mut stream, &error);
        return;
    }
    let sent = send_range(&mut stream, store, &request);
    store.release(&[request.allocation], TRANSFER_HOLDER);
    match sent {
        Ok(true) => {
            served.fetch_add(request.length, Ordering::Relaxed);
        }
        Ok(false) => {}
        Err(error) => {
            tracing::debug!(%error, allocation = request.allocation, "a pull ended early")
        }
    }
}

/// Check `request` against the object, then send the status and the bytes. Whether the bytes
/// were sent (false: an error was).
fn send_range(
    stream: &mut TcpStream,
    store: &SharedMemoryStore,
    request: &RangeRequest,
) -> std::io::Result<bool> {
    let located = store.size_of(request.allocation).and_then(|size| {
        if size != request.size {
            return Err(Error::new(
                ErrorCode::ParamInvalid,
                format!(
                    "shared-memory object {} has {size} bytes, not the {} the reader expects",
                    request.allocation, request.size
                ),
            ));
        }
        store.file_range(request.allocation, request.from, request.length)
    });
    let (file, offset) = match located {
        Ok(found) => found,
        Err(error) => return send_error(stream, &error).map(|()| false),
    };
    stream.write_all(&[STATUS_OK])?;
    send_file(stream.as_fd(), file, offset, request.length).map(|()| true)
}

fn send_error(stream: &mut TcpStream, error: &Error) -> std::io::Result<()> {
    let encoded = error_to_proto(error).encode_to_vec();
    let mut answer = Vec::with_capacity(5 + encoded.len());
    answer.push(STATUS_ERROR);
    answer.extend_from_slice(&(encoded.len() as u32).to_le_bytes());
    answer.extend_from_slice(&encoded);
    stream.write_all(&answer)
}

/// `sendfile` `length` bytes of `file` from `offset` to `socket`.
fn send_file(
    socket: BorrowedFd<'_>,
    file: BorrowedFd<'_>,
    offset: u64,
    length: u64,
) -> std::io::Result<()> {
    let mut offset = libc::off_t::try_from(offset).map_err(std::io::Error::other)?;
    let mut left = length;
    while left > 0 {
        let count = usize::try_from(left.min(1 << 30)).unwrap_or(1 << 30);
        // SAFETY: both descriptors are open for the call; `offset` is a valid off_t that
        // sendfile advances.
        let sent =
            unsafe { libc::sendfile(socket.as_raw_fd(), file.as_raw_fd(), &mut offset, count) };
        match sent {
            n if n > 0 => left -= n as u64,
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            _ => {
                let error = std::io::Error::last_os_error();
                if error.kind() != std::io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
    }
    Ok(())
}

/// Read `request`'s range from the data port at `address` into allocation `local` of `store`,
/// at the same offset.
pub fn read_range(
    address: &str,
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
    let _ = stream.set_nodelay(true);
    stream
        .write_all(&request.encode())
        .map_err(|error| transport("cannot ask", error))?;
    let mut status = [0u8; 1];
    stream
        .read_exact(&mut status)
        .map_err(|error| transport("no answer from", error))?;
    if status[0] != STATUS_OK {
        return Err(read_error(&mut stream, status[0]));
    }
    let (file, offset) = store
        .file_range(local, request.from, request.length)
        .map_err(RangeError::Local)?;
    splice_into(stream.as_fd(), file, offset, request.length)
        .map_err(|error| transport("the range broke off from", error))
}

/// The error the serving node sent after status `status`.
fn read_error(stream: &mut TcpStream, status: u8) -> RangeError {
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
    match yr_proto::ds::ErrorInfo::decode(encoded.as_slice()) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A store serving on a port of its own, and its address.
    fn serving(capacity: u64) -> (Arc<SharedMemoryStore>, String) {
        let store = Arc::new(SharedMemoryStore::new(capacity, "serving").expect("store"));
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        serve(listener, store.clone(), Arc::new(AtomicU64::new(0))).expect("serve");
        (store, address)
    }

    fn pattern(size: u64) -> Vec<u8> {
        (0..size).map(|i| (i % 251) as u8).collect()
    }

    fn read(store: &SharedMemoryStore, id: u64, size: u64) -> Vec<u8> {
        let mut bytes = vec![0u8; size as usize];
        store.read_at(id, 0, &mut bytes).expect("read");
        bytes
    }

    #[test]
    fn ranges_of_an_object_arrive_intact_and_the_serving_reference_is_released() {
        let (serving, address) = serving(64 << 20);
        let size = (9 << 20) + 12345;
        let (id, _) = serving.create(size, 7).expect("create");
        serving.write_at(id, 0, &pattern(size)).expect("write");
        let pulling = SharedMemoryStore::new(64 << 20, "pulling").expect("store");
        let (local, _) = pulling.create(size, 8).expect("create");
        // Three ranges, as a parallel pull asks for them, one of them odd-sized.
        let third = size / 3;
        for (from, length) in [
            (0, third),
            (third, third + 1),
            (2 * third + 1, size - 2 * third - 1),
        ] {
            let request = RangeRequest {
                allocation: id,
                size,
                from,
                length,
            };
            read_range(&address, &request, &pulling, local).expect("range");
        }
        assert!(
            read(&pulling, local, size) == pattern(size),
            "the copy differs"
        );
        // The serving node's own reference is gone once the ranges are sent.
        std::thread::sleep(Duration::from_millis(100));
        serving.release(&[id], 7);
        assert_eq!(serving.stats().objects, 0);
    }

    #[test]
    fn a_freed_object_or_a_wrong_size_is_a_clear_error_and_nothing_is_written() {
        let (serving, address) = serving(1 << 20);
        let pulling = SharedMemoryStore::new(1 << 20, "pulling").expect("store");
        let (local, _) = pulling.create(100, 8).expect("create");
        let freed = RangeRequest {
            allocation: 99,
            size: 100,
            from: 0,
            length: 100,
        };
        match read_range(&address, &freed, &pulling, local) {
            Err(RangeError::Remote(error)) => {
                assert_eq!(error.code(), ErrorCode::GetOperationFailed, "{error}")
            }
            other => panic!("expected the serving node's error, got {other:?}"),
        }
        let (id, _) = serving.create(10, 7).expect("create");
        let wrong = RangeRequest {
            allocation: id,
            size: 100,
            from: 0,
            length: 100,
        };
        match read_range(&address, &wrong, &pulling, local) {
            Err(RangeError::Remote(error)) => {
                assert_eq!(error.code(), ErrorCode::ParamInvalid, "{error}");
                assert!(error.message().contains("10 bytes"), "{error}");
            }
            other => panic!("expected the serving node's error, got {other:?}"),
        }
        assert_eq!(read(&pulling, local, 100), vec![0u8; 100]);
    }

    #[test]
    fn a_port_nobody_serves_or_a_stranger_is_a_transport_error() {
        let pulling = SharedMemoryStore::new(1 << 20, "pulling").expect("store");
        let (local, _) = pulling.create(100, 8).expect("create");
        let request = RangeRequest {
            allocation: 1,
            size: 100,
            from: 0,
            length: 100,
        };
        // A port that was free a moment ago.
        let closed = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .to_string();
        assert!(matches!(
            read_range(&closed, &request, &pulling, local),
            Err(RangeError::Transport(_))
        ));
        // A server that is not a data port: it answers with garbage and hangs up.
        let stranger = TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = stranger.local_addr().expect("address").to_string();
        std::thread::spawn(move || {
            if let Ok((mut stream, _)) = stranger.accept() {
                let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
            }
        });
        assert!(matches!(
            read_range(&address, &request, &pulling, local),
            Err(RangeError::Transport(_))
        ));
    }

    #[test]
    fn a_request_without_the_magic_is_refused_with_an_error() {
        let (_serving, address) = serving(1 << 20);
        let mut stream = TcpStream::connect(&address).expect("connect");
        stream.write_all(&[0u8; REQUEST_LEN]).expect("write");
        let mut status = [0u8; 1];
        stream.read_exact(&mut status).expect("status");
        match read_error(&mut stream, status[0]) {
            RangeError::Remote(error) => assert_eq!(error.code(), ErrorCode::ParamInvalid),
            other => panic!("expected an error answer, got {other:?}"),
        }
    }
}
