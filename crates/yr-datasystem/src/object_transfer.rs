//! Objects between nodes. A node serves the bytes of its shared-memory objects to other nodes
//! in chunks (`ReadObject`), and pulls another node's object into its own shared memory for a
//! process of its own (`PullObject`): the local copy is read in place like any local object,
//! and later pulls of the same object reuse it while any process still holds it.
//!
//! While a chunk stream runs, the serving node holds its own reference to the object
//! ([`TRANSFER_HOLDER`]), so the object outlives its owner until the reader has it. If the
//! object is gone before that, the reader's `get` fails with the code of a get that cannot be
//! served (`GetOperationFailed`) and the reason, never a hang.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tonic::transport::{Channel, Endpoint};
use yr_common::{Error, ErrorCode, Result};
use yr_proto::ds as pb;
use yr_proto::ds::object_store_client::ObjectStoreClient;

use crate::shared_memory::SharedMemoryStore;
use crate::wire::{error_from_proto, error_to_proto};

/// Bytes per chunk on the wire.
pub const CHUNK: usize = 4 << 20;
/// The largest message either side accepts (a chunk and its framing).
pub const MAX_MESSAGE: usize = 2 * CHUNK;
/// The holder id under which a node keeps an object it is sending (no process has pid 0).
pub const TRANSFER_HOLDER: u32 = 0;
/// A pull reads ranges of at least this size, at most [`PARALLEL_RANGES`] at once.
const MIN_RANGE: u64 = 16 << 20;
/// Ranges of one object read at once.
const PARALLEL_RANGES: u64 = 4;
/// Copies remembered before forgotten ones (whose copy was freed) are swept.
const SWEEP_COPIES_ABOVE: usize = 4096;

/// Serves and pulls objects for one node.
#[derive(Debug)]
pub struct ObjectTransfer {
    store: Arc<SharedMemoryStore>,
    /// Channels to other nodes' ObjectStore, by address.
    channels: Mutex<HashMap<String, Channel>>,
    /// Local copies of other nodes' objects: (pool id, allocation there) → allocation here.
    copies: Mutex<HashMap<(String, u64), u64>>,
    /// Bytes pulled from other nodes, and served to them, since the node started.
    pulled_bytes: AtomicU64,
    served_bytes: AtomicU64,
}

impl ObjectTransfer {
    /// Transfers in and out of `store`.
    pub fn new(store: Arc<SharedMemoryStore>) -> ObjectTransfer {
        ObjectTransfer {
            store,
            channels: Mutex::new(HashMap::new()),
            copies: Mutex::new(HashMap::new()),
            pulled_bytes: AtomicU64::new(0),
            served_bytes: AtomicU64::new(0),
        }
    }

    /// Bytes of objects pulled from other nodes since the node started.
    pub fn pulled_bytes(&self) -> u64 {
        self.pulled_bytes.load(Ordering::Relaxed)
    }

    /// Bytes of objects served to other nodes since the node started.
    pub fn served_bytes(&self) -> u64 {
        self.served_bytes.load(Ordering::Relaxed)
    }

    /// Send allocation `request.allocation` in chunks to `send`, which returns false once the
    /// reader is gone. Blocking (copies out of shared memory): run it off the IO threads.
    pub fn serve_read(
        &self,
        request: &pb::ReadObjectRequest,
        mut send: impl FnMut(pb::ObjectChunk) -> bool,
    ) {
        let failed = |error: Error| pb::ObjectChunk {
            data: Default::default(),
            error: Some(error_to_proto(&error)),
        };
        let (_, size) = match self.store.retain(request.allocation, TRANSFER_HOLDER) {
            Ok(bounds) => bounds,
            Err(error) => {
                send(failed(error));
                return;
            }
        };
        let end = request.from.checked_add(request.length);
        if size != request.size || end.is_none_or(|end| end > size) {
            send(failed(Error::new(
                ErrorCode::ParamInvalid,
                format!(
                    "shared-memory object {} has {size} bytes; bytes {}..+{} of {} were asked for",
                    request.allocation, request.from, request.length, request.size
                ),
            )));
        } else {
            let end = request.from + request.length;
            let mut from = request.from;
            while from < end {
                let length = (end - from).min(CHUNK as u64) as usize;
                let mut data = vec![0u8; length];
                if let Err(error) = self.store.read_at(request.allocation, from, &mut data) {
                    send(failed(error));
                    break;
                }
                if !send(pb::ObjectChunk {
                    data: data.into(),
                    error: None,
                }) {
                    break;
                }
                self.served_bytes
                    .fetch_add(length as u64, Ordering::Relaxed);
                from += length as u64;
            }
        }
        self.store.release(&[request.allocation], TRANSFER_HOLDER);
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
        let channel = self
            .channel(address)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let range = request.size.div_ceil(PARALLEL_RANGES).max(MIN_RANGE);
        let mut ranges = Vec::new();
        let mut from = 0;
        while from < request.size || ranges.is_empty() {
            let length = range.min(request.size - from);
            ranges.push(self.copy_range(channel.clone(), local, request, from, length));
            from += length;
        }
        let results = futures_util::future::join_all(ranges).await;
        if let Some(Err(error)) = results.into_iter().find(|r| r.is_err()) {
            self.channels.lock().remove(address);
            return Err(match error {
                RangeError::Remote(error) => {
                    Error::new(error.code(), failed(error.message().to_string()).message())
                }
                RangeError::Transport(detail) => failed(detail),
                RangeError::Local(error) => error,
            });
        }
        Ok(())
    }

    async fn copy_range(
        &self,
        channel: Channel,
        local: u64,
        request: &pb::PullObjectRequest,
        from: u64,
        length: u64,
    ) -> std::result::Result<(), RangeError> {
        let mut client = ObjectStoreClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let mut chunks = client
            .read_object(pb::ReadObjectRequest {
                allocation: request.allocation,
                size: request.size,
                from,
                length,
            })
            .await
            .map_err(|status| RangeError::Transport(status.message().to_string()))?
            .into_inner();
        let mut written = 0u64;
        loop {
            let chunk = match chunks.message().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(status) => return Err(RangeError::Transport(status.message().to_string())),
            };
            if let Some(error) = chunk.error {
                return Err(RangeError::Remote(error_from_proto(&error)));
            }
            self.store
                .write_at(local, from + written, &chunk.data)
                .map_err(RangeError::Local)?;
            written += chunk.data.len() as u64;
        }
        if written != length {
            return Err(RangeError::Transport(format!(
                "a range ended after {written} of {length} bytes"
            )));
        }
        Ok(())
    }

    async fn channel(
        &self,
        address: &str,
    ) -> std::result::Result<Channel, tonic::transport::Error> {
        if let Some(channel) = self.channels.lock().get(address) {
            return Ok(channel.clone());
        }
        let channel = Endpoint::from_shared(format!("http://{address}"))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(MAX_MESSAGE as u32))
            .initial_connection_window_size(Some(4 * MAX_MESSAGE as u32))
            .connect()
            .await?;
        self.channels
            .lock()
            .insert(address.to_string(), channel.clone());
        Ok(channel)
    }
}

/// Why reading one range failed.
enum RangeError {
    /// The serving node answered with an error.
    Remote(Error),
    /// The connection failed or the stream ended early.
    Transport(String),
    /// Writing the local copy failed.
    Local(Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_is_served_in_order_in_chunks_and_released_after() {
        let store = Arc::new(SharedMemoryStore::new(64 << 20, "pool").expect("store"));
        let size = CHUNK as u64 * 2 + 12345;
        let (id, _) = store.create(size, 7).expect("create");
        let pattern: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        store.write_at(id, 0, &pattern).expect("write");
        let transfer = ObjectTransfer::new(store.clone());
        let mut received = Vec::new();
        transfer.serve_read(
            &pb::ReadObjectRequest {
                allocation: id,
                size,
                from: 0,
                length: size,
            },
            |chunk| {
                assert!(chunk.error.is_none());
                assert!(chunk.data.len() <= CHUNK);
                received.extend_from_slice(&chunk.data);
                true
            },
        );
        assert_eq!(received, pattern);
        // A range in the middle, as a parallel pull asks for.
        let mut middle = Vec::new();
        transfer.serve_read(
            &pb::ReadObjectRequest {
                allocation: id,
                size,
                from: 1000,
                length: CHUNK as u64 + 7,
            },
            |chunk| {
                middle.extend_from_slice(&chunk.data);
                true
            },
        );
        assert_eq!(middle, pattern[1000..1000 + CHUNK + 7]);
        // The transfer's own reference is gone: the owner's release frees the object.
        store.release(&[id], 7);
        assert_eq!(store.stats().objects, 0);
    }

    #[test]
    fn a_freed_object_or_a_wrong_size_is_an_error_chunk() {
        let store = Arc::new(SharedMemoryStore::new(1 << 20, "pool").expect("store"));
        let transfer = ObjectTransfer::new(store.clone());
        let range = |allocation, size| pb::ReadObjectRequest {
            allocation,
            size,
            from: 0,
            length: size,
        };
        let mut errors = Vec::new();
        transfer.serve_read(&range(99, 10), |chunk| {
            errors.push(chunk.error.expect("an error").code);
            true
        });
        let (id, _) = store.create(100, 7).expect("create");
        transfer.serve_read(&range(id, 10), |chunk| {
            errors.push(chunk.error.expect("an error").code);
            true
        });
        assert_eq!(
            errors,
            vec![
                ErrorCode::GetOperationFailed as u32,
                ErrorCode::ParamInvalid as u32
            ]
        );
    }
}
