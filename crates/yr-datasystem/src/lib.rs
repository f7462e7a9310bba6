//! yr-datasystem: the data worker that runs inside each node process. It serves the KV store
//! (`yr_datasystem_core::kv`: openYuanrong's `kv_*` semantics, in memory, with a per-job memory
//! quota) over its second-level store ([`l2`]: a directory by default, or Redis through the
//! minimal client in [`redis`]), and the streams whose home is this node
//! (`yr_datasystem_core::stream`: producers, subscriptions, consumers, acks and back-pressure;
//! [`stream_service`]: which node is a stream's home), both as the `DataWorker` gRPC service
//! ([`service`], wire types in `yr-proto`'s `yr.ds.v1`); and the node's shared-memory region
//! for large objects ([`shared_memory`], served as the `ObjectStore` service by
//! [`object_service`]) with its spill directory ([`spill`]: objects moved to disk under memory
//! pressure, and their metadata log); objects cross nodes through [`object_transfer`] (served
//! on the node's data port, [`data_port`], to peers with the cluster token and the object's
//! [`capability`]); room for a process with nothing of its own to spill is reclaimed from the
//! node's other processes by [`reclaim`] (it chooses whom to ask; the node delivers the asks).
//! It does not own the KV and stream stores themselves, which local mode runs in-process too
//! (`yr-datasystem-core`), nor the client side of KV, streams and objects (that lives in
//! `yr-runtime`), nor the choice of which of its objects an owner gives up (that is the
//! owner's, see `yr_runtime::object_store`).
//!
//! The worker's own failures (disk, spill log, Redis, meta store, start and stop) are
//! [`DataSystemError`]s; [`DataSystemError::code`] in [`error`] is where each gets its seed code.

pub mod capability;
pub mod data_port;
pub mod error;
pub mod kv_cluster;
pub mod kv_ring;
pub mod l2;
pub mod object_service;
pub mod object_transfer;
pub mod reclaim;
pub mod redis;
pub mod service;
pub mod shared_memory;
pub mod spill;
pub mod stream_failover;
pub mod stream_service;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use yr_common::Result;
use yr_datasystem_core::kv::KvStore;
use yr_datasystem_core::l2::L2Store;
use yr_datasystem_core::stream;

pub use error::DataSystemError;

/// How a node's data worker is set up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DataWorkerOptions {
    /// The node's data directory; the KV second-level directory is `<data_dir>/kv-l2/`.
    pub data_dir: PathBuf,
    /// A Redis server (`host:port`) to use as the KV second-level store instead of the
    /// directory.
    pub l2_redis: Option<String>,
    /// The size of the node's shared-memory region for objects, in bytes.
    pub shared_memory_bytes: u64,
    /// Names the node's shared-memory region (the node id).
    pub pool_id: String,
    /// Where objects are spilled under memory pressure (`None`: `<data_dir>/spill/`).
    pub spill_dir: Option<PathBuf>,
    /// The most bytes spilled at once (`None`: 95% of the spill disk's free space when the
    /// node starts; `Some(0)`: spilling is off).
    pub spill_limit_bytes: Option<u64>,
    /// The most bytes (keys and values) one job may keep in the KV store's memory (`None`: no
    /// limit); see [`KvStore::set_quota`].
    pub kv_quota_bytes: Option<u64>,
}

/// A node's data worker.
#[derive(Debug)]
pub struct DataWorker {
    kv: KvStore,
    shared_memory: Arc<shared_memory::SharedMemoryStore>,
    streams: stream::StreamStore,
    placement: OnceLock<Arc<stream_service::Placement>>,
    /// In a cluster: the owners of KV keys, and the moves between them.
    kv_cluster: OnceLock<Arc<kv_cluster::KvCluster>>,
    transfer: Arc<object_transfer::ObjectTransfer>,
    /// Asks the node's processes to spill for one another.
    reclaimer: Arc<reclaim::Reclaimer>,
    /// Where other nodes reach this node, once it joined a cluster.
    node_address: OnceLock<String>,
    /// Where other nodes pull this node's objects from (its data port), once it serves them.
    data_address: OnceLock<String>,
}

impl DataWorker {
    /// Open the data worker: its second-level store is Redis if `l2_redis` is set (3007 if it
    /// does not answer), else `<data_dir>/kv-l2/` (4203 if that is not a writable directory).
    pub fn open(options: &DataWorkerOptions) -> Result<Arc<DataWorker>> {
        let l2: Arc<dyn L2Store> = match &options.l2_redis {
            Some(address) => Arc::new(l2::RedisStore::connect(address)?),
            None => Arc::new(l2::DirectoryStore::open(options.data_dir.join("kv-l2"))?),
        };
        let spill_dir = options
            .spill_dir
            .clone()
            .unwrap_or_else(|| options.data_dir.join("spill"));
        let spill = spill::SpillStore::open(spill_dir, options.spill_limit_bytes);
        let spill_info = spill.stats();
        let spill_dir = spill.dir().to_path_buf();
        let shared_memory = Arc::new(shared_memory::SharedMemoryStore::with_spill(
            options.shared_memory_bytes,
            options.pool_id.clone(),
            Some(spill),
        )?);
        // Give freed shared memory back to the kernel once frees stop.
        let reclaim = Arc::downgrade(&shared_memory);
        std::thread::Builder::new()
            .name("yr-shm-reclaim".into())
            .spawn(move || {
                while let Some(store) = reclaim.upgrade() {
                    store.reclaim_idle();
                    drop(store);
                    std::thread::sleep(shared_memory::RECLAIM_AFTER / 2);
                }
            })
            .map_err(|e| DataSystemError::Start {
                what: "shared-memory reclaimer thread",
                detail: e.to_string(),
            })?;
        let kv = KvStore::with_l2(l2.clone());
        kv.set_quota(options.kv_quota_bytes);
        tracing::info!(
            l2 = %l2.describe(),
            kv_quota_bytes = options.kv_quota_bytes,
            shared_memory_bytes = options.shared_memory_bytes,
            spill_dir = %spill_dir.display(),
            spill_limit_bytes = spill_info.limit,
            spilled_objects = spill_info.objects,
            "data worker ready"
        );
        Ok(Arc::new(DataWorker {
            kv,
            transfer: Arc::new(object_transfer::ObjectTransfer::new(shared_memory.clone())),
            reclaimer: Arc::new(reclaim::Reclaimer::new(
                shared_memory.clone(),
                reclaim::ASK_TIMEOUT,
            )),
            shared_memory,
            streams: stream::StreamStore::new(),
            placement: OnceLock::new(),
            kv_cluster: OnceLock::new(),
            node_address: OnceLock::new(),
            data_address: OnceLock::new(),
        }))
    }

    /// The KV store (this node's share of the keys, in a cluster).
    pub fn kv(&self) -> &KvStore {
        &self.kv
    }

    /// The cluster side of the KV store, once the node joined a cluster.
    pub fn kv_cluster(&self) -> Option<&Arc<kv_cluster::KvCluster>> {
        self.kv_cluster.get()
    }

    /// The streams whose home is this node.
    pub fn streams(&self) -> &stream::StreamStore {
        &self.streams
    }

    /// How this node's streams survive it, once it joined a cluster.
    pub fn stream_failover(&self) -> Option<&Arc<stream_failover::Failover>> {
        self.placement
            .get()
            .and_then(|placement| placement.failover())
    }

    /// Join the cluster as node `node_id`: streams are claimed in `meta`, and other nodes'
    /// clients reach this node's streams at `address` (`host:port`); KV keys are spread over
    /// the nodes that `meta` lists as not lost ([`kv_cluster`]), which needs a tokio runtime
    /// (without one, this node keeps its own keys). Call before [`DataWorker::service`]; a
    /// second call is ignored. Without it, every stream and key lives here.
    pub fn join_cluster(
        &self,
        meta: Arc<dyn yr_meta::MetaStore>,
        node_id: String,
        address: String,
    ) {
        let _ = self.node_address.set(address.clone());
        let mut failover = None;
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let cluster = kv_cluster::KvCluster::new(self.kv.clone(), node_id, meta.clone());
            if self.kv_cluster.set(cluster.clone()).is_ok() {
                cluster.start(&runtime);
                failover = Some(stream_failover::Failover::new(
                    cluster,
                    meta.clone(),
                    self.streams.clone(),
                    address.clone(),
                ));
            }
        }
        self.transfer.join_cluster(meta.clone());
        let _ = self.placement.set(Arc::new(stream_service::Placement::new(
            meta, address, failover,
        )));
    }

    /// Serve this node's shared-memory objects to other nodes' pulls on `listener`, which
    /// they reach at `advertised` (`host:port`), to peers that present `token`, inside a
    /// mutual-TLS session with `tls` when given (this node's pulls present the same). Runs on the current tokio runtime; in a cluster
    /// ([`DataWorker::join_cluster`] first) the data port is recorded in the meta store, where
    /// other nodes check it before they pull. Call once, before [`DataWorker::object_service`].
    pub fn serve_objects(
        &self,
        listener: std::net::TcpListener,
        advertised: String,
        token: yr_common::auth::ClusterToken,
        tls: Option<Arc<yr_transport::Tls>>,
    ) -> Result<()> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|error| {
            DataSystemError::Bug(format!(
                "the node's data port was started outside a tokio runtime: {error}"
            ))
        })?;
        self.transfer
            .serve(listener, token, tls, &runtime)
            .map_err(|error| DataSystemError::Start {
                what: "data port",
                detail: error.to_string(),
            })?;
        let _ = self.data_address.set(advertised.clone());
        let transfer = self.transfer.clone();
        let node_id = self.shared_memory.pool_id().to_string();
        runtime.spawn(async move {
            for attempt in 1..=5u32 {
                match transfer.register(&node_id, &advertised).await {
                    Ok(()) => return,
                    Err(error) => {
                        tracing::warn!(%error, attempt, "cannot record the data port; trying again");
                        tokio::time::sleep(std::time::Duration::from_millis(200 * u64::from(attempt)))
                            .await;
                    }
                }
            }
        });
        Ok(())
    }

    /// The DataWorker gRPC service, to add to the node's servers.
    pub fn service(
        &self,
    ) -> yr_proto::ds::data_worker_server::DataWorkerServer<service::DataWorkerService> {
        let streams =
            stream_service::StreamService::new(self.streams.clone(), self.placement.get().cloned());
        service::DataWorkerService::with_streams(self.kv.clone(), streams)
            .in_cluster(self.kv_cluster.get().cloned())
            .server()
    }

    /// The node's shared-memory object store.
    pub fn shared_memory(&self) -> &Arc<shared_memory::SharedMemoryStore> {
        &self.shared_memory
    }

    /// Object transfers between this node and others (for metrics).
    pub fn transfer(&self) -> &Arc<object_transfer::ObjectTransfer> {
        &self.transfer
    }

    /// Reach the node's processes through `asker` when one needs room that only others can
    /// spill (the node does this once, before serving). Without it, a process spills only its
    /// own objects.
    pub fn install_spill_asker(&self, asker: Arc<dyn reclaim::SpillAsker>) {
        self.reclaimer.install(asker);
    }

    /// The ObjectStore gRPC service, to add to the node's servers.
    pub fn object_service(
        &self,
    ) -> yr_proto::ds::object_store_server::ObjectStoreServer<object_service::ObjectStoreService>
    {
        object_service::ObjectStoreService::new(
            self.shared_memory.clone(),
            self.transfer.clone(),
            self.reclaimer.clone(),
            self.data_address.get().cloned().unwrap_or_default(),
        )
        .server()
    }
}
