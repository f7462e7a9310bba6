//! yr-master: the cluster's master. It owns the node registry (registration, heartbeats,
//! liveness), the cluster resource view (nodes report changes, not snapshots), global placement
//! for requests a node cannot place locally, the instance manager (the cluster-wide view of
//! instances; it fails the instances of a lost node) and cluster status. It serves the `Master`
//! gRPC service and the meta store's service on one port, and health and Prometheus
//! metrics over HTTP on another.
//!
//! It does not own instances: each node's proxy is the single writer of its instances' records.
//! Nor does it run anything on the call path. Group and resource-group managers are not here yet.
//!
//! Its failures are [`MasterError`], [`cluster::RegisterError`], [`placement::PlacementError`] and
//! [`instance_manager::InstanceManagerError`]; the module `error.rs` is the one place that gives
//! each its seed code.
//!
//! The state is durable in the meta store: the embedded store in `data_dir/meta` by default, or
//! etcd ([`MetaBackend::Etcd`], `yr start --master --etcd host:port,...`), whose keys all live
//! under a prefix. Node records are under `/yr/node/`, instance records under `/yr/instance/`,
//! the cluster id at `/yr/cluster/id`. A master restarted on the same directory (or the same etcd
//! and prefix) recovers the registry (every node *recovering* until it registers again within
//! `node_timeout`, else *lost*) and the instance view. Either way nodes reach the store through
//! the master's meta service.
//!
//! ```no_run
//! # async fn example() -> Result<(), yr_master::MasterError> {
//! let options = yr_master::MasterOptions::new("127.0.0.1:0".parse().unwrap(), "/tmp/yr-master".into());
//! let master = yr_master::start(options).await?;
//! println!("master listening on {}", master.address());
//! master.shutdown().await
//! # }
//! ```

pub mod cluster;
mod error;
pub mod instance_manager;
pub mod metrics;
pub mod placement;
pub mod registry;
pub mod resource_view;
pub mod service;
#[cfg(test)]
mod test_store;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use yr_meta::{MetaError, MetaStore};
use yr_proto::v1::master_server::MasterServer;

pub use cluster::Cluster;
pub use service::MasterService;

/// How long in-flight RPCs may take to finish once shutdown starts; then connections are cut.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// How the master runs.
#[derive(Clone, Debug)]
pub struct MasterOptions {
    /// Where the gRPC server (Master service and meta store service) listens.
    pub listen: SocketAddr,
    /// The master's state directory; the meta store lives in `data_dir/meta`.
    pub data_dir: PathBuf,
    /// How long a node may go without heartbeating before it is lost.
    pub node_timeout: Duration,
    /// Where `/healthz` and `/metrics` are served over HTTP, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Serve `/metrics` without the cluster token.
    pub metrics_public: bool,
    /// Which store keeps the state.
    pub meta: MetaBackend,
}

/// Which meta store the master keeps its state in and serves to nodes.
///
/// ```
/// let backend = yr_master::MetaBackend::Etcd(yr_meta::EtcdOptions::new(["127.0.0.1:2379"]));
/// assert_eq!(backend.describe(std::path::Path::new("/tmp/m")), "etcd 127.0.0.1:2379 prefix /yr/default");
/// assert_eq!(
///     yr_master::MetaBackend::Embedded.describe(std::path::Path::new("/tmp/m")),
///     "embedded /tmp/m/meta"
/// );
/// ```
#[derive(Clone, Debug, Default)]
pub enum MetaBackend {
    /// The embedded store in `data_dir/meta` (the default).
    #[default]
    Embedded,
    /// etcd, every key under the options' prefix.
    Etcd(yr_meta::EtcdOptions),
}

impl MetaBackend {
    /// One line naming the store, for logs, `yr status` and `session.json`.
    pub fn describe(&self, data_dir: &std::path::Path) -> String {
        match self {
            MetaBackend::Embedded => format!("embedded {}", data_dir.join("meta").display()),
            MetaBackend::Etcd(options) => format!(
                "etcd {} prefix {}",
                options.endpoints.join(","),
                options.prefix.trim_end_matches('/')
            ),
        }
    }
}

impl MasterOptions {
    /// The default node timeout: five seconds, five missed one-second beats.
    pub const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_secs(5);

    /// Options with the default node timeout and no metrics listener.
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> MasterOptions {
        MasterOptions {
            listen,
            data_dir,
            node_timeout: Self::DEFAULT_NODE_TIMEOUT,
            metrics_listen: None,
            metrics_public: false,
            meta: MetaBackend::Embedded,
        }
    }
}

/// Why the master could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    /// A listener could not be bound.
    #[error("cannot listen on {address}: {source}; choose a free port or stop what uses it")]
    Listen {
        /// The address.
        address: SocketAddr,
        /// The bind error.
        source: std::io::Error,
    },
    /// The meta store could not be opened.
    #[error("cannot open the meta store ({store}): {source}")]
    OpenStore {
        /// The store (`embedded <dir>` or `etcd <endpoints> prefix <prefix>`).
        store: String,
        /// The store's error.
        source: MetaError,
    },
    /// The meta store failed while the master recovered its state.
    #[error("meta store failed while recovering the cluster state: {0}")]
    Meta(#[from] MetaError),
    /// The gRPC server failed.
    #[error("the master's gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// The master's task panicked or was cancelled.
    #[error("the master's task ended abnormally: {0}")]
    Task(String),
}

/// Resolves when `stop` holds true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

async fn bind(address: SocketAddr) -> Result<TcpListener, MasterError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| MasterError::Listen { address, source })
}

/// Opens the meta store: the embedded one in `data_dir/meta`, or etcd.
async fn open_store(options: &MasterOptions) -> Result<Arc<dyn MetaStore>, MasterError> {
    let store = options.meta.describe(&options.data_dir);
    let opened: Result<Arc<dyn MetaStore>, MetaError> = match &options.meta {
        MetaBackend::Embedded => yr_meta::EmbeddedStore::open(&options.data_dir.join("meta"))
            .await
            .map(|store| Arc::new(store) as Arc<dyn MetaStore>),
        MetaBackend::Etcd(etcd) => yr_meta::EtcdStore::connect(etcd.clone())
            .await
            .map(|store| Arc::new(store) as Arc<dyn MetaStore>),
    };
    opened.map_err(|source| MasterError::OpenStore { store, source })
}

/// Runs the master until `shutdown` resolves: binds `options.listen` (and
/// `options.metrics_listen`), opens the meta store, recovers the cluster state and serves.
pub async fn run(
    options: MasterOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), MasterError> {
    let listener = bind(options.listen).await?;
    run_with_listener(options, listener, shutdown).await
}

/// [`run`] on an already bound gRPC listener (for example on port 0).
pub async fn run_with_listener(
    options: MasterOptions,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), MasterError> {
    let metrics = match options.metrics_listen {
        Some(address) => Some(bind(address).await?),
        None => None,
    };
    let prepared = prepare(&options).await?;
    prepared.serve(listener, metrics, shutdown).await
}

/// Starts the master in a background task and returns once it serves: the listeners are
/// bound (port 0 picks a free port), the store is open and the state is recovered.
pub async fn start(options: MasterOptions) -> Result<MasterHandle, MasterError> {
    let listener = bind(options.listen).await?;
    let address = listener
        .local_addr()
        .map_err(|source| MasterError::Listen {
            address: options.listen,
            source,
        })?;
    let metrics = match options.metrics_listen {
        Some(requested) => {
            let listener = bind(requested).await?;
            let bound = listener
                .local_addr()
                .map_err(|source| MasterError::Listen {
                    address: requested,
                    source,
                })?;
            Some((listener, bound))
        }
        None => None,
    };
    let metrics_address = metrics.as_ref().map(|(_, bound)| *bound);
    let prepared = prepare(&options).await?;
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(prepared.serve(
        listener,
        metrics.map(|(listener, _)| listener),
        async move {
            let _ = shutdown_rx.await;
        },
    ));
    Ok(MasterHandle {
        address,
        metrics_address,
        shutdown: Some(shutdown_tx),
        task,
    })
}

/// A master running in a background task (see [`start`]). Dropping the handle shuts it down.
pub struct MasterHandle {
    address: SocketAddr,
    metrics_address: Option<SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), MasterError>>,
}

impl MasterHandle {
    /// Where the gRPC server listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Where `/healthz` and `/metrics` are served, if anywhere.
    pub fn metrics_address(&self) -> Option<SocketAddr> {
        self.metrics_address
    }

    /// Stops the master and waits until it has released its listeners and its store.
    pub async fn shutdown(mut self) -> Result<(), MasterError> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        match (&mut self.task).await {
            Ok(result) => result,
            Err(err) => Err(MasterError::Task(err.to_string())),
        }
    }
}

impl Drop for MasterHandle {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

/// A master whose store is open and whose state is recovered, ready to serve.
struct Prepared {
    store: Arc<dyn MetaStore>,
    meta_store: String,
    cluster: Arc<Cluster>,
    revision: u64,
    metrics_public: bool,
}

async fn prepare(options: &MasterOptions) -> Result<Prepared, MasterError> {
    let store = open_store(options).await?;
    let (cluster, revision) = Cluster::open(store.clone(), options.node_timeout).await?;
    tracing::info!(
        cluster_id = cluster.cluster_id(),
        data_dir = %options.data_dir.display(),
        meta_store = %options.meta.describe(&options.data_dir),
        node_timeout = ?options.node_timeout,
        "master state recovered"
    );
    Ok(Prepared {
        store,
        meta_store: options.meta.describe(&options.data_dir),
        cluster,
        revision,
        metrics_public: options.metrics_public,
    })
}

impl Prepared {
    async fn serve(
        self,
        listener: TcpListener,
        metrics: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), MasterError> {
        let Prepared {
            store,
            meta_store,
            cluster,
            revision,
            metrics_public,
        } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(
            cluster
                .instances()
                .clone()
                .follow(revision, stop_rx.clone()),
        );
        tasks.spawn(cluster.clone().watch_liveness(stop_rx.clone()));
        {
            // Finish what a previous master may have left half-done.
            let cluster = cluster.clone();
            tasks.spawn(async move { cluster.fail_instances_of_lost_nodes().await });
        }
        if let Some(metrics) = metrics {
            if let Ok(address) = metrics.local_addr() {
                tracing::info!(%address, "master serving /healthz and /metrics");
            }
            tasks.spawn(metrics::serve(
                metrics,
                cluster.clone(),
                stop_rx.clone(),
                metrics_public,
            ));
        }
        if let Ok(address) = listener.local_addr() {
            tracing::info!(%address, cluster_id = cluster.cluster_id(), "master serving gRPC");
        }

        let master = MasterServer::new(
            MasterService::new(cluster.clone(), stop_rx.clone()).with_meta_store(meta_store),
        );
        let meta = yr_meta::MetaService::new(store.clone());
        let meta_closer = meta.clone();
        let mut server_stop = stop_rx.clone();
        let server = tonic::transport::Server::builder()
            .add_service(master)
            .add_service(meta.into_server())
            .serve_with_incoming_shutdown(yr_transport::incoming_tcp(listener), async move {
                stopped(&mut server_stop).await
            });
        tokio::pin!(server);
        let result = tokio::select! {
            result = &mut server => result.map_err(MasterError::from),
            () = shutdown => {
                tracing::info!("master shutting down");
                let _ = stop_tx.send(true);
                meta_closer.close_watches();
                match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                    Ok(result) => result.map_err(MasterError::from),
                    Err(_) => {
                        tracing::warn!("in-flight RPCs did not finish in time; cutting connections");
                        Ok(())
                    }
                }
            }
        };
        let _ = stop_tx.send(true);
        meta_closer.close_watches();
        while tasks.join_next().await.is_some() {}
        drop(meta_closer);
        drop(cluster);
        // The store holds its directory's lock until the last handle is gone; give the tasks
        // that still hold one (streams ending, metrics responses) a moment to finish, so that a
        // master restarted on the same directory can open it.
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        while Arc::strong_count(&store) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if Arc::strong_count(&store) > 1 {
            tracing::warn!(
                "the meta store is still in use after shutdown; it closes when released"
            );
        }
        drop(store);
        result
    }
}
