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
//! On etcd, two or more masters on the same etcd and prefix elect a leader through a lease
//! ([`election`]); only the leader serves the `Master` service (registry, placement, instance
//! manager, liveness), and its writes are fenced by its term ([`fenced`]). A standby answers
//! with [`leadership::NotLeader`] (3002, naming the leader) and campaigns; when it wins, it
//! rebuilds its view from etcd and from the nodes, which register again with it. Every master
//! serves the meta store's service: etcd orders its writes, and the nodes' own record writes are
//! fenced by their incarnations.
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
pub mod election;
mod error;
pub mod fenced;
pub mod instance_manager;
pub mod leadership;
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
use tokio::task::{JoinHandle, JoinSet};
use yr_common::backoff::Backoff;
use yr_meta::{MetaError, MetaStore};
use yr_proto::v1::master_server::MasterServer;

pub use cluster::Cluster;
pub use election::Election;
pub use leadership::Leadership;
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
    /// The address other masters and nodes reach this master at (the leader key's value on
    /// etcd); `None`: the bound listen address.
    pub advertise: Option<String>,
    /// The TTL of the leader lease on etcd ([`election::DEFAULT_LEASE_TTL`]).
    pub leader_lease: Duration,
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
    /// The default node timeout: three seconds, three missed one-second beats, so a lost node
    /// is declared lost within about three seconds (design 023).
    pub const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_secs(3);

    /// Options with the default node timeout and no metrics listener.
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> MasterOptions {
        MasterOptions {
            listen,
            data_dir,
            node_timeout: Self::DEFAULT_NODE_TIMEOUT,
            metrics_listen: None,
            metrics_public: false,
            meta: MetaBackend::Embedded,
            advertise: None,
            leader_lease: election::DEFAULT_LEASE_TTL,
        }
    }
}

/// Why the master could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    /// A listener could not be bound.
    // The causes are in the messages, and not `source` fields, so that a chain printed with
    // `{:#}` says them once.
    #[error("cannot listen on {address}: {error}; choose a free port or stop what uses it")]
    Listen {
        /// The address.
        address: SocketAddr,
        /// The bind error.
        error: std::io::Error,
    },
    /// The meta store could not be opened.
    #[error("cannot open the meta store ({store}): {error}")]
    OpenStore {
        /// The store (`embedded <dir>` or `etcd <endpoints> prefix <prefix>`).
        store: String,
        /// The store's error.
        error: MetaError,
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
        .map_err(|error| MasterError::Listen { address, error })
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
    opened.map_err(|error| MasterError::OpenStore { store, error })
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
    let address = listener.local_addr().map_err(|error| MasterError::Listen {
        address: options.listen,
        error,
    })?;
    let metrics = match options.metrics_listen {
        Some(requested) => {
            let listener = bind(requested).await?;
            let bound = listener.local_addr().map_err(|error| MasterError::Listen {
                address: requested,
                error,
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

/// A master whose store is open, ready to serve: with the embedded store its state is
/// recovered; on etcd it campaigns once it serves.
struct Prepared {
    store: Arc<dyn MetaStore>,
    meta_store: String,
    /// The embedded store's state, recovered; `None` on etcd, where each term recovers it.
    recovered: Option<(Arc<Cluster>, u64)>,
    node_timeout: Duration,
    metrics_public: bool,
    advertise: Option<String>,
    leader_lease: Duration,
}

async fn prepare(options: &MasterOptions) -> Result<Prepared, MasterError> {
    let store = open_store(options).await?;
    let recovered = match options.meta {
        MetaBackend::Embedded => {
            let (cluster, revision) = Cluster::open(store.clone(), options.node_timeout).await?;
            tracing::info!(
                cluster_id = cluster.cluster_id(),
                data_dir = %options.data_dir.display(),
                node_timeout = ?options.node_timeout,
                "master state recovered"
            );
            Some((cluster, revision))
        }
        MetaBackend::Etcd(_) => None,
    };
    Ok(Prepared {
        store,
        meta_store: options.meta.describe(&options.data_dir),
        recovered,
        node_timeout: options.node_timeout,
        metrics_public: options.metrics_public,
        advertise: options.advertise.clone(),
        leader_lease: options.leader_lease,
    })
}

/// Starts the tasks of a term: following instance records, liveness, and finishing what a
/// previous leader left half-done (failing the instances of nodes it declared lost).
fn spawn_term_tasks(
    tasks: &mut JoinSet<()>,
    cluster: &Arc<Cluster>,
    revision: u64,
    term_ended: &watch::Receiver<bool>,
) {
    tasks.spawn(
        cluster
            .instances()
            .clone()
            .follow(revision, term_ended.clone()),
    );
    tasks.spawn(cluster.clone().watch_liveness(term_ended.clone()));
    let cluster = cluster.clone();
    tasks.spawn(async move {
        cluster.fail_instances_of_lost_nodes().await;
        cluster.resend_reschedules().await;
    });
}

/// Campaigns, leads while the term lasts, and campaigns again, until `stop` turns true. Each
/// term rebuilds the cluster state from the store through a [`fenced::FencedStore`], so a
/// deposed term writes nothing.
async fn lead_terms(
    election: Arc<Election>,
    store: Arc<dyn MetaStore>,
    leadership: Arc<Leadership>,
    node_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::reconnect();
    loop {
        let Some(term) = election.campaign(&mut stop).await else {
            return;
        };
        let won_at = std::time::Instant::now();
        let fenced = Arc::new(fenced::FencedStore::new(store.clone(), term));
        let (cluster, revision) = match Cluster::open(fenced.clone(), node_timeout).await {
            Ok(opened) => opened,
            Err(err) => {
                tracing::warn!(error = %err, "won the election but cannot recover the cluster state; resigning");
                election.resign(term).await;
                tokio::select! {
                    _ = stopped(&mut stop) => return,
                    _ = tokio::time::sleep(backoff.next_delay()) => continue,
                }
            }
        };
        backoff.reset();
        let (term_tx, term_ended) = watch::channel(false);
        let mut term_tasks = JoinSet::new();
        spawn_term_tasks(&mut term_tasks, &cluster, revision, &term_ended);
        leadership.begin(cluster.clone(), term_ended);
        tracing::info!(
            term = term.mod_revision,
            cluster_id = cluster.cluster_id(),
            recovered_in = ?won_at.elapsed(),
            "leading: cluster state rebuilt from the store; nodes register again"
        );
        let end = election.hold(term, &fenced.fenced(), &mut stop).await;
        leadership.end();
        let _ = term_tx.send(true);
        term_tasks.shutdown().await;
        drop(cluster);
        match end {
            election::TermEnd::Stopped => {
                election.resign(term).await;
                return;
            }
            election::TermEnd::Lost(reason) => {
                election.deposed();
                tracing::warn!(
                    term = term.mod_revision,
                    reason,
                    fenced_writes = fenced.refused(),
                    "leadership lost; standing by"
                );
            }
        }
    }
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
            recovered,
            node_timeout,
            metrics_public,
            advertise,
            leader_lease,
        } = self;
        let address = match advertise {
            Some(address) => address,
            None => listener
                .local_addr()
                .map(|address| address.to_string())
                .unwrap_or_default(),
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let leadership = match recovered {
            Some((cluster, revision)) => {
                let leadership = Arc::new(Leadership::new(address.clone(), None));
                spawn_term_tasks(&mut tasks, &cluster, revision, &stop_rx);
                leadership.begin(cluster, stop_rx.clone());
                leadership
            }
            None => {
                let election =
                    Arc::new(Election::new(store.clone(), address.clone(), leader_lease));
                let leadership = Arc::new(Leadership::new(address.clone(), Some(election.clone())));
                {
                    let election = election.clone();
                    let stop = stop_rx.clone();
                    tasks.spawn(async move { election.keep_membership(stop).await });
                }
                tasks.spawn(lead_terms(
                    election,
                    store.clone(),
                    leadership.clone(),
                    node_timeout,
                    stop_rx.clone(),
                ));
                leadership
            }
        };
        if let Some(metrics) = metrics {
            if let Ok(address) = metrics.local_addr() {
                tracing::info!(%address, "master serving /healthz and /metrics");
            }
            tasks.spawn(metrics::serve(
                metrics,
                leadership.clone(),
                stop_rx.clone(),
                metrics_public,
            ));
        }
        if let Ok(bound) = listener.local_addr() {
            tracing::info!(address = %bound, advertised = %address, meta_store, "master serving gRPC");
        }

        let master = MasterServer::new(
            MasterService::new(leadership.clone(), stop_rx.clone()).with_meta_store(meta_store),
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
        leadership.end();
        drop(leadership);
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
