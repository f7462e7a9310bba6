//! yr-proxy: a yr node. It owns the local scheduler (this node's resources), each local
//! instance's state machine (the single writer of its record in the meta store, fenced by the
//! node's incarnation), the bus proxy
//! that routes create/kill/notifications between drivers, runtimes and the master, heartbeats to
//! runtimes, the create rate limit, and the delivery of the data worker's asks to spill. It runs
//! the function agent (`yr-agent`) in the same process. Calls do not pass through it: callers
//! stream them to runtimes directly.

mod bus_service;
mod client_bus;
mod create_options;
mod error;
mod fencing;
mod health;
mod instance_table;
mod master_link;
mod node;
mod node_losses;
mod node_service;
mod rate_limit;
mod record_writer;
mod resources;
mod scheduler;
mod self_fence;
mod spill_asks;
mod state_machine;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use yr_common::{Error, ErrorCode};
use yr_proto::v1 as pb;

pub use error::ProxyError;
pub use fencing::Fencing;
pub use node::{Node, NodeSettings};
pub use resources::Amount;
pub use state_machine::{allowed as transition_allowed, check as check_transition};

/// How to run a node.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// The node's id.
    pub node_id: String,
    /// The masters' gRPC addresses (`host:port`): one, or every master of a cluster on etcd
    /// (the node follows the leader among them).
    pub master_addresses: Vec<String>,
    /// TCP address for the bus (remote drivers) and the Node service (other nodes).
    pub listen: SocketAddr,
    /// The host other nodes use to reach this one when `listen` is a wildcard address.
    pub advertise_host: String,
    /// Fetch drivers' binaries from the node that created an instance even when the same path
    /// exists here (for machines whose paths look alike but hold other files).
    pub fetch_binaries: bool,
    /// The bus's Unix socket for drivers and runtimes on this machine.
    pub bus_socket: PathBuf,
    /// Health and metrics.
    pub metrics_listen: Option<SocketAddr>,
    /// Serve `/metrics` without the cluster token.
    pub metrics_public: bool,
    /// What this node offers.
    pub capacity: Amount,
    /// Node labels.
    pub labels: Vec<(String, String)>,
    /// Session directory (logs).
    pub session_dir: PathBuf,
    /// Spare runtimes per driver binary.
    pub warm_pool_size: usize,
    /// Heartbeat period and the silence after which a runtime counts as hung.
    pub heartbeat: (Duration, Duration),
    /// Creates per second and burst.
    pub create_rate: (f64, f64),
    /// The data worker (KV), served next to the bus.
    pub data_worker: Arc<yr_datasystem::DataWorker>,
}

/// Errors that stop a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A listener could not be bound.
    #[error("cannot listen on {what}: {source}")]
    Listen {
        /// Which listener.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// The meta store could not be reached.
    #[error("cannot reach the meta store at {address}: {message}")]
    Meta {
        /// Where.
        address: String,
        /// Why.
        message: String,
    },
}

impl From<NodeError> for Error {
    fn from(error: NodeError) -> Error {
        Error::new(ErrorCode::LocalSchedulerOperationError, error.to_string())
    }
}

/// The node's [`self_fence::Fence`]: it pauses and resumes the node's movable instances.
struct PauseInstances(std::sync::Weak<Node>);

impl self_fence::Fence for PauseInstances {
    fn fence(&self, expired: self_fence::Lease) {
        if let Some(node) = self.0.upgrade() {
            node.self_fence(expired);
        }
    }

    fn unfence(&self, lease: self_fence::Lease) {
        if let Some(node) = self.0.upgrade() {
            node.self_unfence(lease);
        }
    }
}

/// Run a node until `shutdown` resolves; then stop its instances gracefully (shutdown hooks).
pub async fn run(
    options: NodeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    let meta_addresses: Vec<String> = options
        .master_addresses
        .iter()
        .map(|address| format!("http://{address}"))
        .collect();
    let meta = yr_meta::RemoteStore::connect_any(&meta_addresses)
        .await
        .map_err(|e| NodeError::Meta {
            address: options.master_addresses.join(","),
            message: e.to_string(),
        })?;
    let _ = std::fs::remove_file(&options.bus_socket);
    if let Some(parent) = options.bus_socket.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let unix = UnixListener::bind(&options.bus_socket).map_err(|source| NodeError::Listen {
        what: options.bus_socket.display().to_string(),
        source,
    })?;
    let tcp = TcpListener::bind(options.listen)
        .await
        .map_err(|source| NodeError::Listen {
            what: options.listen.to_string(),
            source,
        })?;
    let tcp_address = tcp.local_addr().map_err(|source| NodeError::Listen {
        what: options.listen.to_string(),
        source,
    })?;
    let bus_address = format!("unix:{}", options.bus_socket.display());
    let advertised = if tcp_address.ip().is_unspecified() {
        format!("{}:{}", options.advertise_host, tcp_address.port())
    } else {
        tcp_address.to_string()
    };
    // Streams whose home is this node are claimed in the meta store under this address.
    options.data_worker.join_cluster(
        Arc::new(meta.clone()),
        options.node_id.clone(),
        advertised.clone(),
    );
    // Other nodes pull this node's objects from its data port, on the same interface.
    let data_listen = std::net::SocketAddr::new(tcp_address.ip(), 0);
    let data_port = std::net::TcpListener::bind(data_listen)
        .and_then(|listener| listener.local_addr().map(|address| (listener, address)));
    let (data_listener, data_address) = data_port.map_err(|source| NodeError::Listen {
        what: format!("the data port on {data_listen}"),
        source,
    })?;
    let data_advertised = if data_address.ip().is_unspecified() {
        format!("{}:{}", options.advertise_host, data_address.port())
    } else {
        data_address.to_string()
    };
    // Other nodes present the cluster's token on the data port too, inside mutual TLS when
    // this node has it.
    let credentials = yr_transport::current();
    let data_token = credentials.token.clone().ok_or_else(|| NodeError::Listen {
        what: "the data port".into(),
        source: std::io::Error::other("this node has no cluster token"),
    })?;
    options
        .data_worker
        .serve_objects(
            data_listener,
            data_advertised,
            data_token,
            credentials.tls.clone(),
        )
        .map_err(|error| NodeError::Listen {
            what: "the data port".into(),
            source: std::io::Error::other(error.to_string()),
        })?;
    let node_info = pb::NodeInfo {
        node_id: options.node_id.clone(),
        address: advertised.clone(),
        bus_address: bus_address.clone(),
        capacity: Some(options.capacity.to_proto()),
        allocatable: Some(options.capacity.to_proto()),
        labels: options.labels.iter().cloned().collect(),
        state: "ready".into(),
        // Set per registration, from `fencing`.
        incarnation: 0,
    };
    let meta: Arc<dyn yr_meta::MetaStore> = Arc::new(meta);
    let fencing = Fencing::new(options.node_id.clone(), meta.clone());
    let master = Arc::new(master_link::MasterLink::new(
        options.master_addresses.clone(),
        node_info,
        fencing.clone(),
    ));
    // Unbounded on purpose: the reaper sends one event per runtime that ends, so the queue is
    // bounded by the runtimes this node started, and a reaper must never block on it.
    let (events, mut event_receiver) = tokio::sync::mpsc::unbounded_channel();
    let node = Node::new(
        NodeSettings {
            node_id: options.node_id.clone(),
            bus_address,
            node_address: advertised.clone(),
            fetch_binaries: options.fetch_binaries,
            session_dir: options.session_dir.clone(),
            warm_pool_size: options.warm_pool_size,
            heartbeat_interval: options.heartbeat.0,
            heartbeat_timeout: options.heartbeat.1,
            runtime_start_timeout: Duration::from_secs(30),
            init_timeout: Duration::from_secs(300),
            create_rate: options.create_rate,
        },
        options.capacity.clone(),
        meta,
        master.clone(),
        events,
        fencing.clone(),
    );
    // When the master declared this node lost, or another writer owns one of its records, the
    // node fails the instances concerned.
    // Its memory-only KV values go too: their keys were owned elsewhere meanwhile and may have
    // been written again there, so the newer values must win when the keys move back.
    let fenced_node = Arc::downgrade(&node);
    let fenced_instance = Arc::downgrade(&node);
    let fenced_kv = options.data_worker.clone();
    fencing.set_handlers(fencing::FenceHandlers {
        node: Box::new(move |error| {
            if let Some(node) = fenced_node.upgrade() {
                node.fence_local_instances(error);
            }
            let forgotten = fenced_kv.kv().forget_memory_only();
            tracing::warn!(
                keys = forgotten,
                "declared lost: forgot the memory-only KV values this node held"
            );
        }),
        instance: Box::new(move |instance_id, error| {
            if let Some(node) = fenced_instance.upgrade() {
                node.on_fenced(instance_id, &error);
            }
        }),
    });
    fencing.follow_node_losses();
    // A process that goes away without dropping its objects gives its shared memory back.
    let data_worker = options.data_worker.clone();
    node.on_client_gone(Box::new(move |pid| {
        // Its spilled objects' files go too: disk work, kept off the async threads.
        let data_worker = data_worker.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn_blocking(move || data_worker.shared_memory().release_process(pid));
            }
            Err(_) => data_worker.shared_memory().release_process(pid),
        }
    }));

    // A process with nothing of its own to spill gets room from the others: the data worker
    // chooses whom to ask, and the asks travel on their Bus sessions.
    let spill_asks = Arc::new(spill_asks::SpillAsks::new(node.clone()));
    options.data_worker.install_spill_asker(spill_asks.clone());

    // The node fences itself before the master can declare it lost: it pauses the instances
    // the master may re-create elsewhere while no master accepts its beats.
    tokio::spawn(self_fence::guard(
        master.leases(),
        PauseInstances(Arc::downgrade(&node)),
    ));
    let link_node = node.clone();
    tokio::spawn(async move {
        master.run(move || link_node.resources().allocatable).await;
    });
    let event_node = node.clone();
    tokio::spawn(async move {
        while let Some(event) = event_receiver.recv().await {
            event_node.on_runtime_exit(event).await;
        }
    });
    let beat_node = node.clone();
    let interval = options.heartbeat.0;
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            beat_node.heartbeat_round();
        }
    });
    if let Some(address) = options.metrics_listen {
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| NodeError::Listen {
                what: address.to_string(),
                source,
            })?;
        tokio::spawn(health::serve(
            listener,
            node.clone(),
            fencing.clone(),
            options.data_worker.clone(),
            options.metrics_public,
        ));
    }

    // Large request bodies (a stream's 1 MiB page, its replicate to the backup) arrive in a
    // few frames and without waiting for a window update halfway.
    const BODY_WINDOW: u32 = 8 << 20;
    const BODY_FRAME: u32 = 1 << 20;
    let service = || {
        pb::bus_server::BusServer::new(bus_service::BusService {
            node: node.clone(),
            spill_asks: spill_asks.clone(),
        })
        .max_decoding_message_size(yr_transport::max_message_bytes())
        .max_encoding_message_size(yr_transport::max_message_bytes())
    };
    let unix_server = tonic::transport::Server::builder()
        .initial_stream_window_size(BODY_WINDOW)
        .initial_connection_window_size(2 * BODY_WINDOW)
        .max_frame_size(BODY_FRAME)
        .add_service(service())
        .add_service(options.data_worker.service())
        .add_service(options.data_worker.object_service())
        .serve_with_incoming(yr_transport::incoming_unix(unix));
    // The object store is for the node's own processes, on the Unix socket only.
    let tcp_server = tonic::transport::Server::builder()
        .initial_stream_window_size(BODY_WINDOW)
        .initial_connection_window_size(2 * BODY_WINDOW)
        .max_frame_size(BODY_FRAME)
        .add_service(service())
        .add_service(options.data_worker.service())
        .add_service(
            pb::node_server::NodeServer::new(node_service::NodeService { node: node.clone() })
                .max_decoding_message_size(yr_transport::max_message_bytes())
                .max_encoding_message_size(yr_transport::max_message_bytes()),
        )
        .serve_with_incoming(yr_transport::incoming_tcp(tcp));
    tracing::info!(node = %options.node_id, bus = %options.bus_socket.display(), tcp = %tcp_address, "node serving");
    tokio::select! {
        result = unix_server => {
            if let Err(e) = result { tracing::error!(error = %e, "bus (unix) stopped"); }
        }
        result = tcp_server => {
            if let Err(e) = result { tracing::error!(error = %e, "bus (tcp) stopped"); }
        }
        () = shutdown => {
            tracing::info!("node stopping: running shutdown hooks");
            node.drain().await;
        }
    }
    node.stop();
    let _ = std::fs::remove_file(&options.bus_socket);
    Ok(())
}
