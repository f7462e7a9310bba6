//! Unit tests of the data port: a store serving on a port of its own, and helpers to pull from it.

use super::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::rustls;
use yr_common::auth::{ClusterToken, HELLO_ACCEPTED};
use yr_common::{Error, ErrorCode};
use yr_transport::Tls;

use crate::capability::CAPABILITY_LEN;
use crate::shared_memory::SharedMemoryStore;

use super::protocol::*;
use super::pull::*;
use super::server::*;
use std::time::Instant;
use yr_common::auth::HELLO_REFUSED;

/// A store serving on a port of its own, with its runtime, address and token.
struct Serving {
    store: Arc<SharedMemoryStore>,
    address: String,
    token: ClusterToken,
    _runtime: tokio::runtime::Runtime,
}

fn serving_with(capacity: u64, limits: impl FnOnce(&mut DataPort)) -> Serving {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let store = Arc::new(SharedMemoryStore::new(capacity, "serving").expect("store"));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    let token = ClusterToken::generate().expect("token");
    let mut port = DataPort::new(
        store.clone(),
        Arc::new(AtomicU64::new(0)),
        token.clone(),
        None,
    );
    limits(&mut port);
    port.serve(listener, runtime.handle()).expect("serve");
    Serving {
        store,
        address,
        token,
        _runtime: runtime,
    }
}

fn serving(capacity: u64) -> Serving {
    serving_with(capacity, |_| {})
}

fn pattern(size: u64) -> Vec<u8> {
    (0..size).map(|i| (i % 251) as u8).collect()
}

fn read(store: &SharedMemoryStore, id: u64, size: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; size as usize];
    store.read_at(id, 0, &mut bytes).expect("read");
    bytes
}

/// An object of `size` bytes on `serving`, held by process 7: its whole-object request.
fn object(serving: &Serving, size: u64) -> RangeRequest {
    let (id, _) = serving.store.create(size, 7).expect("create");
    serving
        .store
        .write_at(id, 0, &pattern(size))
        .expect("write");
    RangeRequest {
        capability: serving.store.capability_of(id).expect("capability"),
        allocation: id,
        size,
        from: 0,
        length: size,
    }
}

/// A connection that has sent the hello, or `hello`'s bytes instead.
fn connected(address: &str, hello: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(address).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    stream.write_all(hello).expect("hello");
    stream
}

/// Everything the server sends until it closes.
fn rest(stream: &mut TcpStream) -> Vec<u8> {
    let mut bytes = Vec::new();
    let _ = stream.read_to_end(&mut bytes);
    bytes
}

fn remote_error(result: std::result::Result<(), RangeError>) -> Error {
    match result {
        Err(RangeError::Remote(error)) => error,
        other => panic!("expected the serving node's error, got {other:?}"),
    }
}

/// How long pulling `request` takes, at best of three.
fn pull_time(
    serving: &Serving,
    request: &RangeRequest,
    pulling: &SharedMemoryStore,
    tls: Option<&Tls>,
) -> Duration {
    let (local, _) = pulling.create(request.size, 8).expect("create");
    let best = (0..3)
        .map(|_| {
            let started = Instant::now();
            read_range(
                &serving.address,
                &serving.token,
                tls,
                request,
                pulling,
                local,
            )
            .expect("pull");
            started.elapsed()
        })
        .min()
        .unwrap_or_default();
    pulling.release(&[local], 8);
    best
}

mod serving;
mod tls;
