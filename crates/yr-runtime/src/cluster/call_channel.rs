//! Direct calls: the channel on which a caller streams calls to an instance's runtime and reads
//! their results back. It is a Unix socket beside the runtime's Worker socket
//! (`w-….sock` → `w-….calls`) for callers on the runtime's host, and a TCP listener on the
//! host's advertised address for callers on other hosts (`cluster::endpoints`), both carrying
//! length-prefixed protobuf frames: `CallRequest` one way, `CallResult` the other (8-byte
//! little-endian length, then the message).
//!
//! Why not the gRPC stream: a call's cost is its wakeups. Through tonic, a call woke the
//! caller's IO thread to write it, the runtime's IO thread to read it, the runtime's IO thread
//! again to write the result and the caller's IO thread to read it. Here the thread that has a
//! frame writes it itself, and a reader spins briefly (yielding) before it blocks, so on a
//! 2-vCPU VM, where a wakeup through the kernel costs about 30 µs, a busy connection sees
//! none. See docs/design/005-direct-call-channel.md.
//!
//! Writes never block the writer: a frame is written without blocking while the socket takes
//! it, and the rest is left to a flusher thread started for that moment. So a thread holding a
//! caller's lock never waits on a peer, and two peers writing to each other cannot deadlock.
//!
//! A TCP connection is authenticated like every TCP connection of the cluster (TLS when the
//! cluster runs it, then the token's hello; `yr_transport`). Plain TCP is read and written
//! directly, like a Unix socket; a TLS connection is bridged to a socket pair by a task on the
//! IO runtime, so the frame reader and writer stay the same. See
//! docs/design/021-calls-across-hosts.md.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use prost::Message;
use yr_common::{Error, ErrorCode};
use yr_proto::v1 as pb;

use super::endpoints::{self, CallRoute};
use super::transport::Address;
use crate::error::RuntimeError;
use crate::handshake::Doorbell;
use crate::object_store::Cancel;

/// How long a reader spins (yielding its CPU) for the next frame before it blocks.
const READ_SPIN: Duration = Duration::from_micros(50);
/// The read buffer's size; frames larger than this grow it for as long as they need.
const READ_CHUNK: usize = 64 * 1024;
/// A write buffer larger than this is given back once drained (after a large inline value).
const KEEP_WRITE_CAPACITY: usize = 1024 * 1024;
/// Bytes of the length prefix.
const PREFIX: usize = 8;

/// Runs the calls a runtime receives.
pub trait CallExecutor: Send + Sync + 'static {
    /// Run `request`, which came on the caller's connection `connection` (a number unique in
    /// this process); `respond` gets its result exactly once, on any thread.
    fn execute(
        &self,
        connection: u64,
        request: pb::CallRequest,
        respond: Box<dyn FnOnce(pb::CallResult) + Send>,
    );

    /// Cancel the call `call_id` that came on `connection` (a `CANCEL` frame), as `how` says.
    fn cancel(&self, connection: u64, call_id: u64, how: Cancel);

    /// The caller's connection `connection` ended.
    fn disconnected(&self, connection: u64);
}

/// The call socket of the runtime whose Worker service listens at `worker_address` (the Unix
/// part of its address).
pub fn socket_path(worker_address: &str) -> Result<PathBuf, Error> {
    match Address::parse(endpoints::parse(worker_address).base)? {
        Address::Unix(path) => Ok(yr_common::sockets::call_socket(&path)),
        Address::Tcp(_) => Err(Error::new(
            ErrorCode::RequestBetweenRuntimeBus,
            format!(
                "the runtime at {worker_address} listens on TCP, but direct calls need a Unix \
                 socket on the caller's machine"
            ),
        )),
    }
}

/// A call connection's socket: Unix (same host) or TCP (another host).
pub enum Socket {
    /// A Unix socket (or one end of the socket pair a TLS connection is bridged to).
    Unix(UnixStream),
    /// Plain TCP.
    Tcp(TcpStream),
}

impl From<UnixStream> for Socket {
    fn from(stream: UnixStream) -> Socket {
        Socket::Unix(stream)
    }
}

impl From<TcpStream> for Socket {
    fn from(stream: TcpStream) -> Socket {
        Socket::Tcp(stream)
    }
}

impl Socket {
    fn try_clone(&self) -> io::Result<Socket> {
        Ok(match self {
            Socket::Unix(stream) => Socket::Unix(stream.try_clone()?),
            Socket::Tcp(stream) => Socket::Tcp(stream.try_clone()?),
        })
    }

    fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        match self {
            Socket::Unix(stream) => stream.set_nonblocking(nonblocking),
            Socket::Tcp(stream) => stream.set_nonblocking(nonblocking),
        }
    }

    fn shutdown(&self) -> io::Result<()> {
        match self {
            Socket::Unix(stream) => stream.shutdown(std::net::Shutdown::Both),
            Socket::Tcp(stream) => stream.shutdown(std::net::Shutdown::Both),
        }
    }
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Socket::Unix(stream) => stream.as_raw_fd(),
            Socket::Tcp(stream) => stream.as_raw_fd(),
        }
    }
}

impl Read for &Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(stream) => (&*stream).read(buf),
            Socket::Tcp(stream) => (&*stream).read(buf),
        }
    }
}

impl Write for &Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(stream) => (&*stream).write(buf),
            Socket::Tcp(stream) => (&*stream).write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes frames to one socket, in the order `send` is called.
pub struct FrameWriter {
    stream: Socket,
    outgoing: Mutex<Outgoing>,
    drained: Condvar,
}

struct Outgoing {
    /// Encoded frames not yet written, from `written` on.
    bytes: Vec<u8>,
    written: usize,
    /// A flusher thread owns the rest of `bytes`; senders only append.
    flushing: bool,
    /// The poller writes `bytes` on its next turn.
    deferred: bool,
    /// The socket failed; nothing more is sent.
    broken: Option<ErrorKind>,
}

impl FrameWriter {
    fn new(stream: Socket) -> Arc<FrameWriter> {
        Arc::new(FrameWriter {
            stream,
            outgoing: Mutex::new(Outgoing {
                bytes: Vec::new(),
                written: 0,
                flushing: false,
                deferred: false,
                broken: None,
            }),
            drained: Condvar::new(),
        })
    }

    /// Queue `message` as a frame and write what the socket takes now. Never blocks on the
    /// peer. Fails once the connection is broken.
    pub fn send(self: &Arc<Self>, message: &impl Message) -> io::Result<()> {
        self.queue(message, true)
    }

    /// Queue `message` as a frame for the poller to write on its next turn, together with
    /// the frames queued after it: one write, and one wakeup of the peer, for a burst.
    pub fn send_soon(self: &Arc<Self>, message: &impl Message) -> io::Result<()> {
        self.queue(message, false)
    }

    fn queue(self: &Arc<Self>, message: &impl Message, now: bool) -> io::Result<()> {
        let mut outgoing = self.outgoing.lock();
        if let Some(kind) = outgoing.broken {
            return Err(io::Error::new(kind, "the call channel is closed"));
        }
        let length = message.encoded_len() as u64;
        outgoing.bytes.extend_from_slice(&length.to_le_bytes());
        message
            .encode(&mut outgoing.bytes)
            .map_err(|e| io::Error::new(ErrorKind::InvalidData, e))?;
        if outgoing.flushing {
            return Ok(());
        }
        if !now {
            if !outgoing.deferred {
                outgoing.deferred = true;
                drop(outgoing);
                poller()
                    .map_err(|e| io::Error::other(e.message().to_string()))?
                    .defer(self.clone());
            }
            return Ok(());
        }
        self.write_or_hand_over(outgoing)
    }

    /// Write what the socket takes; hand the rest to a flusher thread.
    fn write_or_hand_over(
        self: &Arc<Self>,
        mut outgoing: parking_lot::MutexGuard<'_, Outgoing>,
    ) -> io::Result<()> {
        if self.write_some(&mut outgoing)? {
            return Ok(());
        }
        outgoing.flushing = true;
        drop(outgoing);
        let writer = self.clone();
        std::thread::Builder::new()
            .name("yr-call-flush".to_string())
            .spawn(move || writer.flush())
            .map(|_| ())
    }

    /// The poller's turn: write what was deferred.
    fn write_deferred(self: &Arc<Self>) {
        let mut outgoing = self.outgoing.lock();
        outgoing.deferred = false;
        if outgoing.flushing || outgoing.broken.is_some() {
            return;
        }
        // A failure marks the writer broken; the reader side reports the disconnection.
        let _ = self.write_or_hand_over(outgoing);
    }

    /// Write what the socket takes without blocking. True when everything queued is written.
    fn write_some(&self, outgoing: &mut Outgoing) -> io::Result<bool> {
        while outgoing.written < outgoing.bytes.len() {
            match (&self.stream).write(&outgoing.bytes[outgoing.written..]) {
                Ok(0) => return Err(self.break_with(outgoing, ErrorKind::WriteZero)),
                Ok(n) => outgoing.written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.break_with(outgoing, e.kind())),
            }
        }
        outgoing.bytes.clear();
        outgoing.written = 0;
        if outgoing.bytes.capacity() > KEEP_WRITE_CAPACITY {
            outgoing.bytes = Vec::new();
        }
        Ok(true)
    }

    fn break_with(&self, outgoing: &mut Outgoing, kind: ErrorKind) -> io::Error {
        outgoing.broken = Some(kind);
        outgoing.bytes = Vec::new();
        outgoing.written = 0;
        self.drained.notify_all();
        io::Error::new(kind, "the call channel is closed")
    }

    /// The flusher: wait for room, write, until everything queued is written.
    fn flush(self: Arc<Self>) {
        loop {
            wait_for(&self.stream, libc::POLLOUT);
            let mut outgoing = self.outgoing.lock();
            match self.write_some(&mut outgoing) {
                Ok(false) => continue,
                Ok(true) | Err(_) => {
                    outgoing.flushing = false;
                    self.drained.notify_all();
                    return;
                }
            }
        }
    }

    /// Close the connection for both directions; the peer reads its end.
    pub fn close(&self) {
        let _ = self.stream.shutdown();
    }
}

/// Reads frames from one socket, as they arrive.
pub struct FrameReader {
    stream: Socket,
    buffer: Vec<u8>,
    start: usize,
    end: usize,
}

impl FrameReader {
    fn new(stream: Socket) -> FrameReader {
        FrameReader {
            stream,
            buffer: vec![0; READ_CHUNK],
            start: 0,
            end: 0,
        }
    }

    /// Read what the socket holds now and hand each complete frame to `each`, without
    /// blocking. True while the connection is open; false once the peer closed it between
    /// frames. A torn or malformed frame is an error.
    pub fn read_available<M: Message + Default>(
        &mut self,
        mut each: impl FnMut(M),
    ) -> io::Result<bool> {
        loop {
            let wanted = loop {
                match self.frame_length()? {
                    Some(total) if self.end - self.start >= total => {
                        let body = &self.buffer[self.start + PREFIX..self.start + total];
                        let message = M::decode(body)
                            .map_err(|e| io::Error::new(ErrorKind::InvalidData, e))?;
                        self.start += total;
                        each(message);
                    }
                    Some(total) => break total,
                    None => break PREFIX,
                }
            };
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
                if self.buffer.len() > READ_CHUNK {
                    self.buffer = vec![0; READ_CHUNK];
                }
            }
            self.make_room(wanted);
            match (&self.stream).read(&mut self.buffer[self.end..]) {
                Ok(0) if self.end == self.start => return Ok(false),
                Ok(0) => {
                    return Err(io::Error::new(
                        ErrorKind::UnexpectedEof,
                        "the peer closed the call channel in the middle of a frame",
                    ))
                }
                Ok(n) => self.end += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The whole length of the frame at `start`, once its prefix is in.
    fn frame_length(&self) -> io::Result<Option<usize>> {
        if self.end - self.start < PREFIX {
            return Ok(None);
        }
        let mut prefix = [0u8; PREFIX];
        prefix.copy_from_slice(&self.buffer[self.start..self.start + PREFIX]);
        let length = u64::from_le_bytes(prefix);
        let limit = yr_transport::max_message_bytes();
        if length > limit as u64 {
            return Err(io::Error::new(
                ErrorKind::InvalidData,
                format!("a frame of {length} bytes is larger than the limit of {limit} bytes"),
            ));
        }
        Ok(Some(length as usize + PREFIX))
    }

    /// Make room after `start` for a frame of `total` bytes, growing the buffer with what
    /// actually arrives rather than trusting the prefix up front.
    fn make_room(&mut self, total: usize) {
        if self.start > 0
            && (self.start + total > self.buffer.len() || self.end == self.buffer.len())
        {
            self.buffer.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        // Full and still short of the frame: at most double, never past the frame's size.
        if self.end == self.buffer.len() {
            let grown = (self.buffer.len() * 2).min(total);
            self.buffer.resize(grown, 0);
        }
    }
}

/// The thread that reads every call connection of this process: one `epoll` set, so a burst
/// of results from many runtimes costs one wakeup, and a brief spin before it blocks, so a
/// synchronous caller's result costs none.
struct Poller {
    epoll: OwnedFd,
    watched: Mutex<HashMap<u64, Watched>>,
    next_token: AtomicU64,
    /// Writers whose frames wait for the poller's next turn, and whether it sleeps
    /// (`crate::handshake`, model-checked with loom).
    deferred: Doorbell<Arc<FrameWriter>>,
    /// Wakes the poller when it sleeps and a writer is deferred.
    wake: OwnedFd,
}

/// The epoll token of the poller's own wake-up eventfd.
const WAKE_TOKEN: u64 = 0;

struct Watched {
    fd: RawFd,
    /// Reads what is there; false once the connection is done.
    on_readable: Arc<Mutex<Box<dyn FnMut() -> bool + Send>>>,
}

fn poller() -> Result<&'static Poller, Error> {
    static POLLER: OnceLock<Result<&'static Poller, String>> = OnceLock::new();
    POLLER
        .get_or_init(|| {
            // SAFETY: epoll_create1 has no memory arguments; a negative result is an error.
            let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
            if fd < 0 {
                return Err(format!("epoll_create1: {}", io::Error::last_os_error()));
            }
            // SAFETY: `fd` was just returned by epoll_create1 and nothing else owns it.
            let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: eventfd has no memory arguments; a negative result is an error.
            let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
            if wake < 0 {
                return Err(format!("eventfd: {}", io::Error::last_os_error()));
            }
            // SAFETY: `wake` was just returned by eventfd and nothing else owns it.
            let wake = unsafe { OwnedFd::from_raw_fd(wake) };
            let mut event = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: WAKE_TOKEN,
            };
            // SAFETY: `event` is a valid epoll_event for the duration of the call.
            let added = unsafe {
                libc::epoll_ctl(
                    epoll.as_raw_fd(),
                    libc::EPOLL_CTL_ADD,
                    wake.as_raw_fd(),
                    &mut event,
                )
            };
            if added < 0 {
                return Err(format!("epoll_ctl: {}", io::Error::last_os_error()));
            }
            let poller: &'static Poller = Box::leak(Box::new(Poller {
                epoll,
                watched: Mutex::new(HashMap::new()),
                next_token: AtomicU64::new(WAKE_TOKEN + 1),
                deferred: Doorbell::new(),
                wake,
            }));
            std::thread::Builder::new()
                .name("yr-call-poll".to_string())
                .spawn(move || poller.run())
                .map_err(|e| format!("thread: {e}"))?;
            Ok(poller)
        })
        .clone()
        .map_err(|message| {
            RuntimeError::CallSocket {
                what: "cannot start the call poller".to_string(),
                source: io::Error::other(message),
            }
            .into()
        })
}

impl Poller {
    fn run(&self) {
        const MAX_EVENTS: usize = 64;
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; MAX_EVENTS];
        loop {
            self.write_deferred();
            let mut ready = self.wait(&mut events, 0);
            if ready == 0 {
                crate::spin::spin_until(READ_SPIN, || {
                    ready = self.wait(&mut events, 0);
                    ready > 0 || !self.deferred.is_empty()
                });
            }
            if ready == 0 {
                // Announce the sleep, then look again: a writer deferred in between sees the
                // announcement and wakes us.
                ready = self
                    .deferred
                    .sleep_unless_pending(|| self.wait(&mut events, -1))
                    .unwrap_or(0);
            }
            for event in &events[..ready] {
                let token = event.u64;
                if token == WAKE_TOKEN {
                    let mut count = [0u8; 8];
                    // SAFETY: reads 8 bytes into `count`, which has 8.
                    unsafe {
                        libc::read(self.wake.as_raw_fd(), count.as_mut_ptr().cast(), 8);
                    }
                    continue;
                }
                let Some(on_readable) = self
                    .watched
                    .lock()
                    .get(&token)
                    .map(|w| w.on_readable.clone())
                else {
                    continue;
                };
                let open = (on_readable.lock())();
                if !open {
                    if let Some(watched) = self.watched.lock().remove(&token) {
                        // SAFETY: removing a registered fd from our epoll set; no pointers kept.
                        unsafe {
                            libc::epoll_ctl(
                                self.epoll.as_raw_fd(),
                                libc::EPOLL_CTL_DEL,
                                watched.fd,
                                std::ptr::null_mut(),
                            );
                        }
                    }
                }
            }
        }
    }

    /// Write what writers deferred to this turn.
    fn write_deferred(&self) {
        let writers = self.deferred.take();
        for writer in writers {
            writer.write_deferred();
        }
    }

    /// Have `writer` written on the next turn, waking the poller if it sleeps.
    fn defer(&self, writer: Arc<FrameWriter>) {
        if self.deferred.push(writer) {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from `one`, which has 8.
            unsafe {
                libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), 8);
            }
        }
    }

    /// Events ready within `timeout_ms` (-1: forever), 0 on a timeout, an interruption or a
    /// failure (logged, after a pause).
    fn wait(&self, events: &mut [libc::epoll_event], timeout_ms: i32) -> usize {
        // SAFETY: `events` is valid for `events.len()` entries for the duration of the call.
        let ready = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                timeout_ms,
            )
        };
        usize::try_from(ready).unwrap_or_else(|_| {
            let error = io::Error::last_os_error();
            if error.kind() != ErrorKind::Interrupted {
                // Not expected on a valid epoll set; do not turn it into a busy loop.
                tracing::error!(%error, "waiting for call connections failed");
                std::thread::sleep(Duration::from_millis(10));
            }
            0
        })
    }

    fn watch(&self, fd: RawFd, on_readable: Box<dyn FnMut() -> bool + Send>) -> io::Result<()> {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        self.watched.lock().insert(
            token,
            Watched {
                fd,
                on_readable: Arc::new(Mutex::new(on_readable)),
            },
        );
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            u64: token,
        };
        // SAFETY: `event` is a valid epoll_event for the duration of the call.
        let added =
            unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) };
        if added < 0 {
            self.watched.lock().remove(&token);
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Hand every frame that arrives on `reader` to `on_frame`, on this process's poller thread,
/// and `on_closed` the reason once the connection ends. Neither may block for long: they
/// hold up every connection of the process.
pub fn watch<M: Message + Default + 'static>(
    mut reader: FrameReader,
    mut on_frame: impl FnMut(M) + Send + 'static,
    on_closed: impl FnOnce(String) + Send + 'static,
) -> Result<(), Error> {
    let fd = reader.stream.as_raw_fd();
    let mut on_closed = Some(on_closed);
    let on_readable = Box::new(move || {
        let reason = match reader.read_available(&mut on_frame) {
            Ok(true) => return true,
            Ok(false) => "the peer closed the call channel".to_string(),
            Err(error) => format!("the call channel failed: {error}"),
        };
        if let Some(on_closed) = on_closed.take() {
            on_closed(reason);
        }
        false
    });
    poller()?.watch(fd, on_readable).map_err(|source| {
        RuntimeError::CallSocket {
            what: "cannot watch a call connection".to_string(),
            source,
        }
        .into()
    })
}

/// Block until `stream` is ready for `events` (or failed, which the next read or write sees).
fn wait_for(stream: &impl AsRawFd, events: libc::c_short) {
    let mut poll = libc::pollfd {
        fd: stream.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: `poll` points to one valid pollfd for the duration of the call.
    unsafe {
        libc::poll(&mut poll, 1, -1);
    }
}

fn split(stream: impl Into<Socket>) -> io::Result<(Arc<FrameWriter>, FrameReader)> {
    let stream = stream.into();
    stream.set_nonblocking(true)?;
    let reading = stream.try_clone()?;
    Ok((FrameWriter::new(stream), FrameReader::new(reading)))
}

/// Connect to the calls of the runtime at `worker_address`: its call socket when it is on this
/// host, else its TCP call listener. Fails with 3001 (1014 if the runtime refuses this process's
/// token). A TCP connection may take a network round trip: do not call it on the IO thread.
pub fn connect(worker_address: &str) -> Result<(Arc<FrameWriter>, FrameReader), Error> {
    match endpoints::call_route(worker_address)? {
        CallRoute::Unix(path) => connect_unix(worker_address, &path),
        CallRoute::Tcp(host_port) => connect_tcp(&host_port),
    }
}

fn connect_failed(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorCode::RequestBetweenRuntimeBus,
        format!("failed to connect to the runtime's {what}: {e}; the runtime may have exited"),
    )
}

fn connect_unix(
    worker_address: &str,
    path: &Path,
) -> Result<(Arc<FrameWriter>, FrameReader), Error> {
    let what = format!("call socket {}", path.display());
    let failed = |e: io::Error| connect_failed(&what, e);
    let mut stream = UnixStream::connect(path).map_err(failed)?;
    let token = yr_transport::current()
        .token
        .clone()
        .ok_or_else(|| yr_transport::no_token(worker_address))?;
    stream
        .set_read_timeout(Some(yr_transport::HANDSHAKE_TIMEOUT))
        .map_err(failed)?;
    yr_common::auth::send_hello(&mut stream, &token, ErrorCode::RequestBetweenRuntimeBus)?;
    stream.set_read_timeout(None).map_err(failed)?;
    split(stream).map_err(failed)
}

/// The IO runtime that bridges TLS call connections (set by the cluster backend).
static IO: Mutex<Option<tokio::runtime::Handle>> = Mutex::new(None);

/// Give the call channel the IO runtime on which TLS connections are bridged.
pub fn set_io(handle: Option<tokio::runtime::Handle>) {
    *IO.lock() = handle;
}

/// Connect to a runtime's TCP call listener at `host_port`, on another host: TLS when this
/// process has it, then the token's hello.
fn connect_tcp(host_port: &str) -> Result<(Arc<FrameWriter>, FrameReader), Error> {
    let what = format!("call listener {host_port}");
    let failed = |e: io::Error| connect_failed(&what, e);
    let credentials = yr_transport::current();
    let token = credentials
        .token
        .clone()
        .ok_or_else(|| yr_transport::no_token(host_port))?;
    if credentials.tls.is_some() {
        return connect_tls(host_port, credentials).and_then(|near| split(near).map_err(failed));
    }
    let target = std::net::ToSocketAddrs::to_socket_addrs(host_port)
        .map_err(failed)?
        .next()
        .ok_or_else(|| failed(io::Error::other("the address resolves to nothing")))?;
    let mut stream =
        TcpStream::connect_timeout(&target, yr_transport::CONNECT_TIMEOUT).map_err(failed)?;
    yr_transport::tcp::tune(&stream);
    stream
        .set_read_timeout(Some(yr_transport::HANDSHAKE_TIMEOUT))
        .map_err(failed)?;
    yr_common::auth::send_hello(&mut stream, &token, ErrorCode::RequestBetweenRuntimeBus)?;
    stream.set_read_timeout(None).map_err(failed)?;
    split(stream).map_err(failed)
}

/// Open a TLS connection to `host_port` on the IO runtime and bridge it to a socket pair;
/// the near end is returned, to be read and written like a Unix call socket.
fn connect_tls(
    host_port: &str,
    credentials: Arc<yr_transport::Credentials>,
) -> Result<UnixStream, Error> {
    let what = format!("call listener {host_port}");
    let io = IO
        .lock()
        .clone()
        .ok_or_else(|| connect_failed(&what, "this process has no IO runtime to run TLS on"))?;
    let (near, far) = UnixStream::pair().map_err(|e| connect_failed(&what, e))?;
    far.set_nonblocking(true)
        .map_err(|e| connect_failed(&what, e))?;
    let address = Address::Tcp(host_port.to_string());
    let (opened, outcome) = crossbeam_channel::bounded(1);
    io.spawn(async move {
        let refused = std::sync::atomic::AtomicBool::new(false);
        let connecting = tokio::time::timeout(
            yr_transport::CONNECT_TIMEOUT + yr_transport::HANDSHAKE_TIMEOUT,
            yr_transport::open(&address, &credentials, &refused),
        )
        .await;
        let connection = match connecting {
            Ok(Ok(connection)) => connection,
            Ok(Err(error)) => {
                let _ = opened.send(Err((error.to_string(), refused.into_inner())));
                return;
            }
            Err(_) => {
                let _ = opened.send(Err(("connecting timed out".to_string(), false)));
                return;
            }
        };
        match tokio::net::UnixStream::from_std(far) {
            Ok(far) => {
                let _ = opened.send(Ok(()));
                bridge(connection, far).await;
            }
            Err(error) => {
                let _ = opened.send(Err((error.to_string(), false)));
            }
        }
    });
    match outcome.recv() {
        Ok(Ok(())) => Ok(near),
        Ok(Err((_, true))) => Err(yr_transport::token_refused(host_port)),
        Ok(Err((error, false))) => Err(connect_failed(&what, error)),
        Err(_) => Err(connect_failed(&what, "the IO runtime stopped")),
    }
}

/// Copy bytes both ways between an authenticated TLS connection and the far end of the socket
/// pair whose near end the frame reader and writer use, until either side closes.
async fn bridge(mut connection: yr_transport::Connection, mut far: tokio::net::UnixStream) {
    if let Err(error) = tokio::io::copy_bidirectional(&mut connection, &mut far).await {
        tracing::debug!(%error, "a TLS call connection ended");
    }
}

/// Serve calls on `listener` (TCP, on this host's advertised address), for callers on other
/// hosts: every connection is authenticated like the node's TCP port (`yr_transport`:
/// bounded handshakes, TLS when configured, the token's hello), then served like a Unix call
/// connection. Runs on the IO runtime until the process ends.
pub async fn serve_tcp(listener: tokio::net::TcpListener, executor: Arc<dyn CallExecutor>) {
    use tokio_stream::StreamExt;
    let mut incoming = yr_transport::incoming_tcp(listener);
    while let Some(accepted) = incoming.next().await {
        let Ok(accepted) = accepted else {
            continue;
        };
        match accepted.into_connection() {
            yr_transport::Connection::Tcp(stream) => match stream.into_std() {
                Ok(stream) => serve_connection(Socket::Tcp(stream), executor.clone()),
                Err(error) => tracing::warn!(%error, "a TCP call connection could not be set up"),
            },
            connection => {
                let pair = UnixStream::pair().and_then(|(near, far)| {
                    far.set_nonblocking(true)?;
                    Ok((near, tokio::net::UnixStream::from_std(far)?))
                });
                match pair {
                    Ok((near, far)) => {
                        tokio::spawn(bridge(connection, far));
                        serve_connection(Socket::Unix(near), executor.clone());
                    }
                    Err(error) => {
                        tracing::warn!(%error, "a TLS call connection could not be set up")
                    }
                }
            }
        }
    }
}

/// Whether a whole hello frame waits in `stream` already (looked at without taking it), so
/// that checking it cannot block.
fn hello_arrived(stream: &UnixStream) -> bool {
    let mut header = [0u8; yr_common::auth::HELLO_HEADER];
    // SAFETY: `header` is valid for its length; MSG_PEEK leaves the bytes in the socket.
    let peeked = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            header.as_mut_ptr().cast(),
            header.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if peeked != header.len() as isize {
        return false;
    }
    let Ok(length) = yr_common::auth::hello_length(&header) else {
        // Not a hello: refused at once, without a thread.
        return true;
    };
    let mut whole = vec![0u8; header.len() + length];
    // SAFETY: as above, for `whole`.
    let peeked = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            whole.as_mut_ptr().cast(),
            whole.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    peeked == whole.len() as isize
}

/// Call connections authenticating at once; more are closed at once.
const MAX_HANDSHAKES: usize = 64;

/// Let a caller in: it runs as this user (or root), and its first frame is the cluster
/// token's hello, within [`yr_transport::HANDSHAKE_TIMEOUT`].
fn authenticate(stream: &mut UnixStream) -> Result<(), yr_common::auth::AuthError> {
    use yr_common::auth::{self, AuthError, HELLO_ACCEPTED, HELLO_REFUSED};
    let token = yr_transport::current()
        .token
        .clone()
        .ok_or(AuthError::Missing)?;
    let checked = auth::peer_credentials(stream)
        .and_then(|peer| auth::peer_allowed(&peer))
        .and_then(|()| {
            stream
                .set_read_timeout(Some(yr_transport::HANDSHAKE_TIMEOUT))
                .map_err(|e| AuthError::NoCredentials(e.to_string()))?;
            auth::read_hello(stream, &token)
        });
    let answer = if checked.is_ok() {
        HELLO_ACCEPTED
    } else {
        HELLO_REFUSED
    };
    let _ = stream.write_all(&[answer]);
    let _ = stream.set_read_timeout(None);
    checked
}

/// Serve calls on the call socket beside `worker_address`; connections are read by the poller.
/// The socket is bound before this returns, so callers told about this runtime can connect.
pub fn serve(worker_address: &str, executor: Arc<dyn CallExecutor>) -> Result<(), Error> {
    let path = socket_path(worker_address)?;
    let listener = UnixListener::bind(&path).map_err(|source| RuntimeError::CallSocket {
        what: format!("cannot listen for calls on {}", path.display()),
        source,
    })?;
    std::thread::Builder::new()
        .name("yr-call-accept".to_string())
        .spawn(move || {
            for stream in listener.incoming() {
                let mut stream = match stream {
                    Ok(stream) => stream,
                    Err(error) => {
                        tracing::warn!(%error, "accepting a call connection failed");
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                // A caller's hello is usually here already (it sends it as it connects):
                // then it is checked on this thread. Otherwise the caller authenticates on a
                // thread of its own, so a silent one cannot hold the others up.
                if hello_arrived(&stream) {
                    match authenticate(&mut stream) {
                        Ok(()) => serve_connection(stream, executor.clone()),
                        Err(error) => tracing::warn!(%error, "refused a call connection (1014)"),
                    }
                    continue;
                }
                static HANDSHAKES: AtomicU64 = AtomicU64::new(0);
                if HANDSHAKES.fetch_add(1, Ordering::AcqRel) >= MAX_HANDSHAKES as u64 {
                    HANDSHAKES.fetch_sub(1, Ordering::AcqRel);
                    tracing::warn!("too many call connections are authenticating; closing one");
                    continue;
                }
                let executor = executor.clone();
                let spawned = std::thread::Builder::new()
                    .name("yr-call-hello".to_string())
                    .spawn(move || {
                        let result = authenticate(&mut stream);
                        HANDSHAKES.fetch_sub(1, Ordering::AcqRel);
                        match result {
                            Ok(()) => serve_connection(stream, executor),
                            Err(error) => {
                                tracing::warn!(%error, "refused a call connection (1014)")
                            }
                        }
                    });
                if let Err(error) = spawned {
                    HANDSHAKES.fetch_sub(1, Ordering::AcqRel);
                    tracing::warn!(%error, "cannot start a thread for a call connection");
                }
            }
        })
        .map_err(|source| RuntimeError::CallSocket {
            what: "cannot start the call listener".to_string(),
            source,
        })?;
    Ok(())
}

fn serve_connection(stream: impl Into<Socket>, executor: Arc<dyn CallExecutor>) {
    static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);
    let connection = NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed);
    let (writer, reader) = match split(stream) {
        Ok(halves) => halves,
        Err(error) => {
            tracing::warn!(%error, "a call connection could not be set up");
            return;
        }
    };
    let responder = writer.clone();
    let ending = executor.clone();
    let watched = watch(
        reader,
        move |request: pb::CallRequest| {
            if request.kind == pb::CallKind::Cancel as i32 {
                let how = Cancel::new(request.force, request.recursive);
                executor.cancel(connection, request.call_id, how);
                return;
            }
            let writer = responder.clone();
            executor.execute(
                connection,
                request,
                Box::new(move |result| {
                    // A failed write means the caller is gone; it hears from the node.
                    let _ = writer.send(&result);
                }),
            );
        },
        move |reason| {
            tracing::debug!(%reason, "a caller's connection ended");
            ending.disconnected(connection);
            writer.close();
        },
    );
    if let Err(error) = watched {
        tracing::warn!(%error, "a call connection is refused");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Arc<FrameWriter>, FrameReader) {
        let (a, b) = UnixStream::pair().expect("socket pair");
        let (writer, _) = split(a).expect("split a");
        let (_, reader) = split(b).expect("split b");
        (writer, reader)
    }

    /// Blocking reads for tests: the next frame, or None at the end.
    fn next(reader: &mut FrameReader) -> io::Result<Option<pb::CallResult>> {
        let mut got = None;
        loop {
            let open = reader.read_available(|m: pb::CallResult| {
                assert!(got.is_none(), "one frame at a time in these tests");
                got = Some(m);
            })?;
            if got.is_some() || !open {
                return Ok(got);
            }
            wait_for(&reader.stream, libc::POLLIN);
        }
    }

    fn result(id: u64, payload: usize) -> pb::CallResult {
        pb::CallResult {
            call_id: id,
            values: vec![pb::Value {
                data: vec![(id % 251) as u8; payload].into(),
                ..Default::default()
            }],
            error: None,
        }
    }

    #[test]
    fn frames_arrive_in_order_whatever_their_size() {
        let (writer, mut reader) = pair();
        let sizes = [0, 1, 100, 70_000, 3 << 20, 5, 200_000];
        let sender = std::thread::spawn(move || {
            for (i, size) in sizes.iter().enumerate() {
                writer.send(&result(i as u64, *size)).expect("send");
            }
            // Keep the writer open until the reader is done.
            std::thread::sleep(Duration::from_millis(200));
        });
        let mut got = Vec::new();
        loop {
            reader
                .read_available(|m: pb::CallResult| got.push(m))
                .expect("read");
            if got.len() == sizes.len() {
                break;
            }
            wait_for(&reader.stream, libc::POLLIN);
        }
        for (i, size) in sizes.iter().enumerate() {
            assert_eq!(got[i].call_id, i as u64);
            assert_eq!(got[i].values[0].data.len(), *size);
            assert!(got[i].values[0].data.iter().all(|b| *b == (i % 251) as u8));
        }
        sender.join().expect("sender");
    }

    #[test]
    fn a_full_socket_does_not_block_the_sender_and_loses_nothing() {
        let (writer, mut reader) = pair();
        // Far more than a socket buffer holds, with nobody reading yet.
        for i in 0..200 {
            writer
                .send(&result(i, 64 * 1024))
                .expect("send never blocks");
        }
        let mut got = Vec::new();
        loop {
            reader
                .read_available(|m: pb::CallResult| got.push(m.call_id))
                .expect("read");
            if got.len() == 200 {
                break;
            }
            wait_for(&reader.stream, libc::POLLIN);
        }
        assert_eq!(got, (0..200).collect::<Vec<u64>>());
    }

    #[test]
    fn closing_ends_the_stream_and_a_torn_frame_is_an_error() {
        let (writer, mut reader) = pair();
        writer.send(&result(1, 10)).expect("send");
        writer.close();
        assert!(next(&mut reader).expect("read").is_some());
        assert!(next(&mut reader).expect("read").is_none());

        let (a, b) = UnixStream::pair().expect("socket pair");
        let mut raw = a;
        raw.write_all(&100u64.to_le_bytes()).expect("prefix");
        raw.write_all(&[1, 2, 3]).expect("part of a body");
        drop(raw);
        let (_, mut reader) = split(b).expect("split");
        let error = next(&mut reader).expect_err("torn frame");
        assert_eq!(error.kind(), ErrorKind::UnexpectedEof);
    }

    #[test]
    fn garbage_is_an_error_not_a_huge_allocation() {
        let (a, b) = UnixStream::pair().expect("socket pair");
        let mut raw = a;
        raw.write_all(&(1u64 << 40).to_le_bytes()).expect("prefix");
        raw.write_all(&[0xff; 64]).expect("garbage");
        drop(raw);
        let (_, mut reader) = split(b).expect("split");
        assert!(next(&mut reader).is_err());
        assert!(reader.buffer.len() <= 2 * READ_CHUNK);

        let (a, b) = UnixStream::pair().expect("socket pair");
        let mut raw = a;
        raw.write_all(&4u64.to_le_bytes()).expect("prefix");
        raw.write_all(&[0xff; 4]).expect("not protobuf");
        let (_, mut reader) = split(b).expect("split");
        let error = next(&mut reader).expect_err("malformed");
        assert_eq!(error.kind(), ErrorKind::InvalidData);
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(64))]

        /// Whatever a peer writes, the reader yields whole frames or an error: no panic, and
        /// no buffer beyond what arrived (or the frame limit).
        #[test]
        fn random_bytes_give_frames_or_an_error(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..4096),
            prefix in proptest::option::of(proptest::num::u64::ANY),
        ) {
            let (a, b) = UnixStream::pair().expect("socket pair");
            let mut raw = a;
            if let Some(prefix) = prefix {
                raw.write_all(&prefix.to_le_bytes()).expect("prefix");
            }
            raw.write_all(&bytes).expect("bytes");
            drop(raw);
            let (_, mut reader) = split(b).expect("split");
            while let Ok(Some(_)) = next(&mut reader) {}
            proptest::prop_assert!(reader.buffer.len() <= 2 * READ_CHUNK + bytes.len());
        }

        /// A hello made of random bytes is refused, reading at most a header and a token.
        #[test]
        fn random_hellos_are_refused(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..2048),
        ) {
            let token = yr_common::auth::ClusterToken::generate().expect("token");
            let mut input = bytes.as_slice();
            let before = input.len();
            let checked = yr_common::auth::read_hello(&mut input, &token);
            proptest::prop_assert!(checked.is_err());
            let read = before - input.len();
            proptest::prop_assert!(
                read <= yr_common::auth::HELLO_HEADER + yr_common::auth::MAX_TOKEN_LEN
            );
        }
    }

    #[test]
    fn a_frame_over_the_limit_is_refused_before_it_arrives() {
        let (a, b) = UnixStream::pair().expect("socket pair");
        let mut raw = a;
        let over = yr_transport::max_message_bytes() as u64 + 1;
        raw.write_all(&over.to_le_bytes()).expect("prefix");
        raw.write_all(&[0u8; 1024]).expect("a little of it");
        let (_, mut reader) = split(b).expect("split");
        let error = next(&mut reader).expect_err("over the limit");
        assert_eq!(error.kind(), ErrorKind::InvalidData);
        assert!(
            error.to_string().contains("larger than the limit"),
            "{error}"
        );
    }

    #[test]
    fn the_poller_delivers_frames_and_the_end_of_a_connection() {
        let (writer, reader) = pair();
        let (frames, received) = std::sync::mpsc::channel();
        let (closed, ended) = std::sync::mpsc::channel();
        watch(
            reader,
            move |m: pb::CallResult| {
                let _ = frames.send(m.call_id);
            },
            move |reason| {
                let _ = closed.send(reason);
            },
        )
        .expect("watch");
        for i in 0..1000 {
            writer.send(&result(i, 16)).expect("send");
        }
        let wait = Duration::from_secs(10);
        for i in 0..1000 {
            assert_eq!(received.recv_timeout(wait).expect("a frame"), i);
        }
        writer.close();
        let reason = ended.recv_timeout(wait).expect("the end");
        assert!(reason.contains("closed"), "{reason}");
    }

    /// Answers every call with its id.
    struct Echo;

    impl CallExecutor for Echo {
        fn execute(
            &self,
            _connection: u64,
            request: pb::CallRequest,
            respond: Box<dyn FnOnce(pb::CallResult) + Send>,
        ) {
            respond(pb::CallResult {
                call_id: request.call_id,
                values: Vec::new(),
                error: None,
            });
        }

        fn cancel(&self, _connection: u64, _call_id: u64, _how: Cancel) {}

        fn disconnected(&self, _connection: u64) {}
    }

    /// Write `bytes`, then read what the peer answers until it closes (or 5 s pass).
    fn exchange(address: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
        let mut stream = TcpStream::connect(address).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let _ = stream.write_all(bytes);
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        answer
    }

    fn frame(message: &impl Message) -> Vec<u8> {
        let mut bytes = (message.encoded_len() as u64).to_le_bytes().to_vec();
        message.encode(&mut bytes).expect("encode");
        bytes
    }

    #[test]
    fn a_tcp_call_listener_refuses_a_connection_without_the_token() {
        use yr_common::auth::{ClusterToken, HELLO_REFUSED};
        let token = ClusterToken::generate().expect("token");
        yr_transport::install(yr_transport::Credentials::with_token(token.clone()));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address");
        listener.set_nonblocking(true).expect("nonblocking");
        let io = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        std::thread::spawn(move || {
            io.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                serve_tcp(listener, Arc::new(Echo)).await;
            })
        });
        let call = frame(&pb::CallRequest {
            call_id: 7,
            ..Default::default()
        });

        // A call with no hello first: refused, and never run.
        let answer = exchange(address, &call);
        assert_eq!(answer, vec![HELLO_REFUSED], "no hello");

        // Another cluster's token: refused.
        let other = ClusterToken::generate().expect("another token");
        let mut bytes = other.hello();
        bytes.extend_from_slice(&call);
        assert_eq!(
            exchange(address, &bytes),
            vec![HELLO_REFUSED],
            "wrong token"
        );

        // The cluster's token: accepted, and the call is answered on the same connection.
        let mut stream = TcpStream::connect(address).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        yr_common::auth::send_hello(&mut stream, &token, ErrorCode::RequestBetweenRuntimeBus)
            .expect("the token is accepted");
        stream.write_all(&call).expect("call");
        let mut prefix = [0u8; PREFIX];
        stream.read_exact(&mut prefix).expect("a result");
        let mut body = vec![0u8; u64::from_le_bytes(prefix) as usize];
        stream.read_exact(&mut body).expect("its body");
        let result = pb::CallResult::decode(body.as_slice()).expect("decode");
        assert_eq!(result.call_id, 7);
    }

    #[test]
    fn the_call_socket_sits_beside_the_worker_socket() {
        assert_eq!(
            socket_path("unix:/tmp/yr/w-1-ab.sock").expect("unix"),
            PathBuf::from("/tmp/yr/w-1-ab.calls")
        );
        let error = socket_path("127.0.0.1:5").expect_err("tcp");
        assert_eq!(error.code(), ErrorCode::RequestBetweenRuntimeBus);
    }
}
