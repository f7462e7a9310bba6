//! Objects between nodes. A node serves its objects on its data port (`data_port`) and pulls another node's object into its own shared memory for a
//! process of its own (`PullObject`), reading it in ranges, several at once, from the other
//! node's data port: the local copy is read in place like any local object, and
//! later pulls of the same object reuse it while any process still holds it.
//!
//! If the object is gone before it is read, the reader's `get` fails with the code of a get
//! that cannot be served (`GetOperationFailed`) and the reason, never a hang.
//!
//! A node pulls only from the data ports of its cluster's nodes: each node records its data
//! port in the meta store when it starts serving ([`DATA_PORT_PREFIX`]`<node id>`), and a pull
//! from an address not recorded there (looked up again on a miss) is refused with 1001, so a
//! process cannot make its node connect anywhere it names. Pulls present the cluster token and
//! the object's capability, inside mutual TLS when the node has it (see `data_port`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use yr_common::auth::ClusterToken;
use yr_common::{Error, ErrorCode, Result};
use yr_meta::MetaStore;
use yr_proto::ds as pb;
use yr_transport::Tls;

use crate::capability::{Capability, CAPABILITY_LEN};
use crate::data_port::{self, DataPort, RangeError, RangeRequest};
use crate::error::DataSystemError;
use crate::shared_memory::SharedMemoryStore;

/// Where each node records its data port in the meta store: `<prefix><node id>` → `host:port`.
pub const DATA_PORT_PREFIX: &str = "/yr/data-port/";

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

/// A local copy's key: the pool, allocation and capability of the original.
type CopyKey = (String, u64, Capability);

/// A capability from the wire (1001 if it has the wrong length).
fn capability_of(bytes: &[u8]) -> Result<Capability> {
    Capability::try_from(bytes).map_err(|_| {
        Error::new(
            ErrorCode::ParamInvalid,
            format!(
                "an object's capability has {CAPABILITY_LEN} bytes, got {}; pass the location \
                 the object's owner sent",
                bytes.len()
            ),
        )
    })
}

/// Pulls objects for one node, and counts what it pulled and served.
pub struct ObjectTransfer {
    store: Arc<SharedMemoryStore>,
    /// Local copies of other nodes' objects, by the original's pool, allocation and
    /// capability (so that a copy is found only by a reader that could read the original).
    copies: Mutex<HashMap<CopyKey, u64>>,
    /// The cluster token, presented to other nodes' data ports (set when this node serves).
    token: OnceLock<ClusterToken>,
    /// This node's TLS, with which it serves and pulls (set when this node serves with TLS).
    tls: OnceLock<Arc<Tls>>,
    /// The cluster's meta store, where the nodes' data ports are recorded.
    meta: OnceLock<Arc<dyn MetaStore>>,
    /// The data ports of the cluster's nodes, as last read from the meta store.
    members: Mutex<HashSet<String>>,
    /// Bytes pulled from other nodes, and served to them, since the node started.
    pulled_bytes: AtomicU64,
    served_bytes: Arc<AtomicU64>,
}

impl std::fmt::Debug for ObjectTransfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectTransfer")
            .field("pool", &self.store.pool_id())
            .field("in_cluster", &self.meta.get().is_some())
            .field("pulled_bytes", &self.pulled_bytes())
            .field("served_bytes", &self.served_bytes())
            .finish()
    }
}

impl ObjectTransfer {
    /// Transfers into `store`.
    pub fn new(store: Arc<SharedMemoryStore>) -> ObjectTransfer {
        ObjectTransfer {
            store,
            copies: Mutex::new(HashMap::new()),
            token: OnceLock::new(),
            tls: OnceLock::new(),
            meta: OnceLock::new(),
            members: Mutex::new(HashSet::new()),
            pulled_bytes: AtomicU64::new(0),
            served_bytes: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Serve this node's objects to other nodes' pulls on `listener` (the node's data port)
    /// as tasks of `runtime`, to peers that present `token` inside a mutual-TLS session with
    /// `tls` when given; this node's pulls present the same.
    pub fn serve(
        &self,
        listener: std::net::TcpListener,
        token: ClusterToken,
        tls: Option<Arc<Tls>>,
        runtime: &tokio::runtime::Handle,
    ) -> std::io::Result<()> {
        let _ = self.token.set(token.clone());
        if let Some(tls) = &tls {
            let _ = self.tls.set(tls.clone());
        }
        DataPort::new(self.store.clone(), self.served_bytes.clone(), token, tls)
            .serve(listener, runtime)
    }

    /// The cluster's meta store: pulls go only to the data ports recorded there.
    pub fn join_cluster(&self, meta: Arc<dyn MetaStore>) {
        let _ = self.meta.set(meta);
    }

    /// Record this node's data port (`advertised`) under `node_id` in the cluster's meta
    /// store, so that other nodes pull from it. Nothing to do outside a cluster.
    pub async fn register(&self, node_id: &str, advertised: &str) -> Result<()> {
        let Some(meta) = self.meta.get() else {
            return Ok(());
        };
        meta.put(
            &format!("{DATA_PORT_PREFIX}{node_id}"),
            advertised.to_string().into_bytes().into(),
            None,
        )
        .await
        .map(drop)
        .map_err(|source| {
            DataSystemError::Meta {
                what: format!("cannot record this node's data port {advertised} in the meta store"),
                source,
            }
            .into()
        })
    }

    /// Whether `address` is a data port of this cluster: known, or recorded in the meta store
    /// now. 1001 if not, or outside a cluster.
    async fn check_member(&self, address: &str) -> Result<()> {
        if self.members.lock().contains(address) {
            return Ok(());
        }
        let not_member = |why: &str| {
            Error::new(
                ErrorCode::ParamInvalid,
                format!(
                    "{address} is not the data port of a node of this cluster ({why}); objects \
                     are pulled only from the nodes of this node's cluster"
                ),
            )
        };
        let Some(meta) = self.meta.get() else {
            return Err(not_member("this node is not part of a cluster"));
        };
        let recorded =
            meta.range(DATA_PORT_PREFIX)
                .await
                .map_err(|source| DataSystemError::Meta {
                    what: "cannot read the cluster's data ports from the meta store".to_string(),
                    source,
                })?;
        let members: HashSet<String> = recorded
            .iter()
            .filter_map(|kv| std::str::from_utf8(&kv.value).ok().map(str::to_string))
            .collect();
        let known = members.contains(address);
        *self.members.lock() = members;
        if known {
            Ok(())
        } else {
            Err(not_member("no node recorded it in the meta store"))
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

    /// Copy another node's object here with one reference for process `pid` of this node, or
    /// take a reference to the copy already here. Returns the local (allocation, offset, size).
    pub async fn pull(&self, request: &pb::PullObjectRequest, pid: u32) -> Result<(u64, u64, u64)> {
        let capability = capability_of(&request.capability)?;
        self.check_member(&request.node_address).await?;
        let token = self.token.get().cloned().ok_or_else(|| {
            Error::new(
                ErrorCode::AuthorizeFailed,
                "this node serves no data port, so it has no cluster token to pull objects with",
            )
        })?;
        let key = (request.pool_id.clone(), request.allocation, capability);
        let known = self.copies.lock().get(&key).copied();
        if let Some(local) = known {
            if let Ok((offset, size)) = self.store.retain(local, pid) {
                if request.release_source {
                    self.release_source(request, capability, token);
                }
                return Ok((local, offset, size));
            }
            self.copies.lock().remove(&key);
        }
        let (local, offset) = self.store.create(request.size, pid)?;
        let started = std::time::Instant::now();
        if let Err(error) = self
            .copy_into(local, request, capability, token.clone())
            .await
        {
            self.store.release(&[local], pid);
            return Err(error);
        }
        if request.release_source {
            self.release_source(request, capability, token);
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

    /// A result another node holds for a process of this node was dropped unread: ask that
    /// node to drop its hold (see `SharedMemoryStore::hold_for_remote`). 1001 for a node that
    /// is not of this cluster.
    pub async fn drop_remote(&self, request: &pb::DropRemoteRequest) -> Result<()> {
        let capability = capability_of(&request.capability)?;
        self.check_member(&request.node_address).await?;
        let Some(token) = self.token.get().cloned() else {
            return Ok(());
        };
        let pull = pb::PullObjectRequest {
            node_address: request.node_address.clone(),
            allocation: request.allocation,
            size: request.size,
            ..Default::default()
        };
        self.release_source(&pull, capability, token);
        Ok(())
    }

    /// Ask the node `request` pulled from to drop the hold it keeps on the object for this
    /// node's owner, in the background: a failure only leaves the hold to be pushed out there.
    fn release_source(
        &self,
        request: &pb::PullObjectRequest,
        capability: Capability,
        token: ClusterToken,
    ) {
        let address = request.node_address.clone();
        let tls = self.tls.get().cloned();
        let release = RangeRequest {
            capability,
            allocation: request.allocation,
            size: request.size,
            from: 0,
            length: 0,
        };
        tokio::task::spawn_blocking(move || {
            if let Err(error) = data_port::release_hold(&address, &token, tls.as_deref(), &release)
            {
                tracing::debug!(?error, %address, "cannot release a result held by another node");
            }
        });
    }

    /// Read the object in ranges, several at once, each written where it belongs.
    async fn copy_into(
        &self,
        local: u64,
        request: &pb::PullObjectRequest,
        capability: Capability,
        token: ClusterToken,
    ) -> Result<()> {
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
        // Fault tests: the connection to the other node's data port breaks during the pull.
        fail::fail_point!("datasystem::pull", |detail: Option<String>| Err(failed(
            detail.unwrap_or_else(|| "the transfer broke (a fail point)".to_string())
        )));
        let range = request.size.div_ceil(parallel_ranges()).max(MIN_RANGE);
        let mut ranges = Vec::new();
        let mut from = 0;
        while from < request.size || ranges.is_empty() {
            let length = range.min(request.size - from);
            let range = RangeRequest {
                capability,
                allocation: request.allocation,
                size: request.size,
                from,
                length,
            };
            let store = self.store.clone();
            let address = address.clone();
            let token = token.clone();
            let tls = self.tls.get().cloned();
            ranges.push(tokio::task::spawn_blocking(move || {
                data_port::read_range(&address, &token, tls.as_deref(), &range, &store, local)
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
            Some(RangeError::Refused(error)) => Err(error),
            Some(RangeError::Transport(detail)) => Err(failed(detail)),
            Some(RangeError::Local(error)) => Err(error),
        }
    }
}
