//! Objects between nodes. A node serves its objects on its data port (`data_port`) and pulls another node's object into its own shared memory for a
//! process of its own (`PullObject`), reading it in ranges, several at once, from the other
//! node's data port: the local copy is read in place like any local object, and
//! later pulls of the same object reuse it while any process still holds it.
//!
//! If the object is gone before it is read, the reader's `get` fails with the code of a get
//! that cannot be served (`GetOperationFailed`) and the reason, never a hang.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use yr_common::{Error, ErrorCode, Result};
use yr_proto::ds as pb;

use crate::data_port::{self, RangeError, RangeRequest};
use crate::shared_memory::SharedMemoryStore;

/// A pull reads ranges of at least this size, at most [`parallel_ranges`] at once.
const MIN_RANGE: u64 = 16 << 20;
/// The most ranges of one object read at once.
const MAX_PARALLEL_RANGES: u64 = 4;

/// Ranges of one object read at once: one per two CPUs (each range keeps a sending and a
/// receiving thread busy), from 1 to [`MAX_PARALLEL_RANGES`]. On two CPUs a single range is
/// fastest: `yr-bench --case cross-node` measured 3.2–4.0 GB/s with one, 2.9–3.1 with two and
/// 1.7 with four.
fn parallel_ranges() -> u64 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    (cpus / 2).clamp(1, MAX_PARALLEL_RANGES)
}
/// Copies remembered before forgotten ones (whose copy was freed) are swept.
const SWEEP_COPIES_ABOVE: usize = 4096;

/// Pulls objects for one node, and counts what it pulled and served.
#[derive(Debug)]
pub struct ObjectTransfer {
    store: Arc<SharedMemoryStore>,
    /// Local copies of other nodes' objects: (pool id, allocation there) → allocation here.
    copies: Mutex<HashMap<(String, u64), u64>>,
    /// Bytes pulled from other nodes, and served to them, since the node started.
    pulled_bytes: AtomicU64,
    served_bytes: Arc<AtomicU64>,
}

impl ObjectTransfer {
    /// Transfers into `store`.
    pub fn new(store: Arc<SharedMemoryStore>) -> ObjectTransfer {
        ObjectTransfer {
            store,
            copies: Mutex::new(HashMap::new()),
            pulled_bytes: AtomicU64::new(0),
            served_bytes: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Serve this node's objects to other nodes' pulls on `listener` (the node's data port),
    /// from now until the process ends.
    pub fn serve(&self, listener: std::net::TcpListener) -> std::io::Result<()> {
        data_port::serve(listener, self.store.clone(), self.served_bytes.clone())
    }

    /// Bytes of objects pulled from other nodes since the node started.
    pub fn pulled_bytes(&self) -> u64 {
        self.pulled_bytes.load(Ordering::Relaxed)
    }

    /// Bytes of objects served to other nodes since the node started.
    pub fn served_bytes(&self) -> u64 {
        self.served_bytes.load(Ordering::Relaxed)
    }

    /// Copy another node's object here with one reference for `request.pid`, or take a
    /// reference to the copy already here. Returns the local (allocation, offset, size).
    pub async fn pull(&self, request: &pb::PullObjectRequest) -> Result<(u64, u64, u64)> {
        let key = (request.pool_id.clone(), request.allocation);
        let known = self.copies.lock().get(&key).copied();
        if let Some(local) = known {
            if let Ok((offset, size)) = self.store.retain(local, request.pid) {
                return Ok((local, offset, size));
            }
            self.copies.lock().remove(&key);
        }
        let (local, offset) = self.store.create(request.size, request.pid)?;
        let started = std::time::Instant::now();
        if let Err(error) = self.copy_into(local, request).await {
            self.store.release(&[local], request.pid);
            return Err(error);
        }
        self.pulled_bytes.fetch_add(request.size, Ordering::Relaxed);
        tracing::debug!(
            bytes = request.size,
            seconds = started.elapsed().as_secs_f64(),
            from = %request.node_address,
            "pulled an object"
        );
        let mut copies = self.copies.lock();
        if copies.len() >= SWEEP_COPIES_ABOVE {
            copies.retain(|_, local| self.store.holds(*local));
        }
        copies.insert(key, local);
        Ok((local, offset, request.size))
    }

    /// Read the object in ranges, several at once, each written where it belongs.
    async fn copy_into(&self, local: u64, request: &pb::PullObjectRequest) -> Result<()> {
        let address = &request.node_address;
        let failed = |detail: String| {
            Error::new(
                ErrorCode::GetOperationFailed,
                format!(
                    "cannot pull object {} of {} bytes from the node at {address}: {detail}; \
                     the node or the object's owner may have left the cluster",
                    request.allocation, request.size
                ),
            )
        };
        let range = request.size.div_ceil(parallel_ranges()).max(MIN_RANGE);
        let mut ranges = Vec::new();
        let mut from = 0;
        while from < request.size || ranges.is_empty() {
            let length = range.min(request.size - from);
            let range = RangeRequest {
                allocation: request.allocation,
                size: request.size,
                from,
                length,
            };
            let store = self.store.clone();
            let address = address.clone();
            ranges.push(tokio::task::spawn_blocking(move || {
                data_port::read_range(&address, &range, &store, local)
            }));
            from += length;
        }
        let mut first_error = None;
        for range in futures_util::future::join_all(ranges).await {
            let result = range.unwrap_or_else(|error| {
                Err(RangeError::Transport(format!(
                    "the range's thread failed: {error}"
                )))
            });
            if let (Err(error), None) = (result, &first_error) {
                first_error = Some(error);
            }
        }
        match first_error {
            None => Ok(()),
            Some(RangeError::Remote(error)) => Err(Error::new(
                error.code(),
                failed(error.message().to_string()).message(),
            )),
            Some(RangeError::Transport(detail)) => Err(failed(detail)),
            Some(RangeError::Local(error)) => Err(error),
        }
    }
}
