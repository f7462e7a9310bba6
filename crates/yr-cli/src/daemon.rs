//! `yr master` and `yr node`: run one component in the foreground until SIGTERM or SIGINT. `yr
//! start` runs these in the background; they are also handy under a process supervisor.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args as ClapArgs;
use yr_common::auth::ClusterToken;
use yr_proxy::Amount;

/// Flags of `yr master`.
#[derive(Debug, ClapArgs)]
pub struct MasterArgs {
    /// Address of the master's gRPC service (the Master and meta store services).
    #[arg(long, default_value = "127.0.0.1:22770")]
    pub listen: SocketAddr,
    /// Directory for the master's state (the meta store); reusing it recovers the cluster.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Address of the health and Prometheus metrics endpoint (/healthz, /metrics).
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Seconds without heartbeats after which a node is lost (nodes beat every second).
    #[arg(long, default_value_t = 3.0)]
    pub node_timeout: f64,
    /// The address nodes and other masters reach this master at (the leader's address in the
    /// election on etcd); default: the listen address.
    #[arg(long, value_name = "HOST:PORT")]
    pub advertise: Option<String>,
    /// Seconds of the leader lease on etcd: a dead leader is replaced about this long after it
    /// died (etcd raises it to its minimum, 2 s with its default election timeout).
    #[arg(long, default_value_t = 2.0)]
    pub leader_lease: f64,
    #[command(flatten)]
    pub meta: MetaStoreArgs,
    #[command(flatten)]
    pub security: SecurityArgs,
}

/// Where the master keeps its state: the embedded store in its data directory (the default),
/// or etcd. Flags of `yr master` and `yr start --master`.
#[derive(Clone, Debug, Default, ClapArgs)]
pub struct MetaStoreArgs {
    /// Keep the cluster's state in etcd (v3 API, e.g. Debian's etcd-server) at these client
    /// endpoints instead of the embedded store. Nodes still reach it through the master.
    #[arg(long, value_name = "HOST:PORT,...", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// The prefix every etcd key is stored under; clusters sharing one etcd need different
    /// prefixes. A master restarted with the same etcd and prefix recovers the cluster.
    #[arg(long, value_name = "PREFIX", default_value = yr_meta::EtcdOptions::DEFAULT_PREFIX, requires = "etcd")]
    pub etcd_prefix: String,
    /// Speak TLS to etcd (https endpoints): the CA certificate (PEM) that etcd's certificate
    /// chains to.
    #[arg(long, value_name = "FILE", requires = "etcd")]
    pub etcd_ca: Option<PathBuf>,
    /// The master's certificate (PEM) for an etcd that authenticates clients by certificate
    /// (`etcd --client-cert-auth`); with --etcd-ca and --etcd-key.
    #[arg(long, value_name = "FILE", requires_all = ["etcd_ca", "etcd_key"])]
    pub etcd_cert: Option<PathBuf>,
    /// The key (PEM) of --etcd-cert.
    #[arg(long, value_name = "FILE", requires_all = ["etcd_ca", "etcd_cert"])]
    pub etcd_key: Option<PathBuf>,
}

impl MetaStoreArgs {
    /// The flags again, for the `yr master` that `yr start` spawns.
    pub fn to_args(&self) -> Vec<String> {
        if self.etcd.is_empty() {
            return Vec::new();
        }
        let mut args = vec![
            "--etcd".into(),
            self.etcd.join(","),
            "--etcd-prefix".into(),
            self.etcd_prefix.clone(),
        ];
        // Absolute, so that the spawned master reads the same files from any directory.
        let absolute = |path: &PathBuf| {
            std::path::absolute(path)
                .unwrap_or_else(|_| path.clone())
                .display()
                .to_string()
        };
        for (flag, path) in [
            ("--etcd-ca", &self.etcd_ca),
            ("--etcd-cert", &self.etcd_cert),
            ("--etcd-key", &self.etcd_key),
        ] {
            if let Some(path) = path {
                args.extend([flag.to_string(), absolute(path)]);
            }
        }
        args
    }

    /// The master's store.
    pub fn backend(&self) -> yr_master::MetaBackend {
        if self.etcd.is_empty() {
            yr_master::MetaBackend::Embedded
        } else {
            let mut options =
                yr_meta::EtcdOptions::new(&self.etcd).with_prefix(self.etcd_prefix.clone());
            if let Some(ca) = &self.etcd_ca {
                options = options.with_tls(yr_meta::EtcdTls {
                    ca: ca.clone(),
                    client: self.etcd_cert.clone().zip(self.etcd_key.clone()),
                    server_name: None,
                });
            }
            yr_master::MetaBackend::Etcd(options)
        }
    }
}

/// Flags of `yr node`.
#[derive(Debug, ClapArgs)]
pub struct NodeArgs {
    /// The master's address (host:port); for a cluster on etcd with standby masters, all of
    /// them, comma-separated: the node follows the leader among them.
    #[arg(
        long,
        value_name = "HOST:PORT,...",
        value_delimiter = ',',
        required = true
    )]
    pub master_address: Vec<String>,
    /// TCP address of this node's bus.
    #[arg(long, default_value = "127.0.0.1:22773")]
    pub listen: SocketAddr,
    /// Fetch drivers' binaries from the node that created an instance, even when the same path
    /// exists on this machine.
    #[arg(long)]
    pub fetch_binaries: bool,
    /// The host other nodes use to reach this one (default: this machine's address).
    #[arg(long)]
    pub advertise_host: Option<String>,
    /// Unix socket of this node's bus, for drivers and runtimes on this machine.
    #[arg(long)]
    pub bus_socket: PathBuf,
    /// Session directory: logs go in its logs/ folder.
    #[arg(long)]
    pub session_dir: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    /// The node's id (default: generated).
    #[arg(long)]
    pub node_id: Option<String>,
    #[command(flatten)]
    pub capacity: CapacityArgs,
    /// Address of the health and Prometheus metrics endpoint (/healthz, /metrics).
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Spare runtimes kept started per driver binary.
    #[arg(long, default_value_t = 2)]
    pub warm_pool: usize,
    /// Instance creates allowed per second on this node (token bucket), and the burst.
    #[arg(long, default_value_t = 1000.0)]
    pub create_rate: f64,
    /// Burst of the create rate limit.
    #[arg(long, default_value_t = 2000.0)]
    pub create_burst: f64,
    /// Seconds of silence after which a runtime counts as hung.
    #[arg(long, default_value_t = 3.0)]
    pub heartbeat_timeout: f64,
    #[command(flatten)]
    pub security: SecurityArgs,
}

/// How a component authenticates its connections: the flags `yr master`, `yr node` and `yr
/// start` share. The cluster token itself comes from `YR_TOKEN` or `--token-file` (never the
/// command line of a long-running process, which other users can read).
#[derive(Debug, Clone, Default, ClapArgs)]
pub struct SecurityArgs {
    /// A file holding the cluster token (default: the YR_TOKEN environment variable).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Serve /metrics without the cluster token (/healthz is always open).
    #[arg(long)]
    pub metrics_public: bool,
    /// TLS certificate (PEM) for every TCP connection; needs --tls-key and --tls-ca.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The CA (PEM) that signs every member's certificate; peers must present one (mutual TLS).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// The largest gRPC message accepted or sent, in MB (values above 100 KB travel through
    /// shared memory, not in messages).
    #[arg(long, value_name = "MB", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub max_message_mb: u64,
}

impl SecurityArgs {
    /// The same flags for a child's command line (`yr start` passes them on).
    pub fn to_args(&self) -> Vec<String> {
        // Not the token file: `yr start` hands the token over in YR_TOKEN.
        let mut args = Vec::new();
        if self.metrics_public {
            args.push("--metrics-public".into());
        }
        for (flag, file) in [
            ("--tls-cert", &self.tls_cert),
            ("--tls-key", &self.tls_key),
            ("--tls-ca", &self.tls_ca),
        ] {
            if let Some(file) = file {
                args.extend([flag.to_string(), file.display().to_string()]);
            }
        }
        args.extend([
            "--max-message-mb".to_string(),
            self.max_message_mb.to_string(),
        ]);
        args
    }

    /// The token from `--token-file`, else `YR_TOKEN`; an error saying how to give one.
    pub fn token(&self) -> anyhow::Result<ClusterToken> {
        if let Some(file) = &self.token_file {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read the token file {}", file.display()))?;
            return ClusterToken::parse(&text).with_context(|| {
                format!("the token file {} holds no valid token", file.display())
            });
        }
        match ClusterToken::resolve(None, None)? {
            Some(token) => Ok(token),
            None => anyhow::bail!(
                "no cluster token: set {} or pass --token-file (`yr start` does this for you; \
                 the token of a running cluster is in its session directory's `token` file)",
                yr_common::auth::TOKEN_ENV
            ),
        }
    }

    /// Install this process's credentials: `token`, TLS if given, the message limit.
    pub fn install(&self, token: ClusterToken) -> anyhow::Result<()> {
        let tls = match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => {
                Some(std::sync::Arc::new(yr_transport::Tls::load(cert, key, ca)?))
            }
            _ => None,
        };
        yr_transport::install(yr_transport::Credentials {
            token: Some(token),
            tls,
            max_message_bytes: (self.max_message_mb as usize) << 20,
        });
        Ok(())
    }
}

/// Where a node keeps its data: the flags `yr start` and `yr node` share.
#[derive(Debug, Clone, ClapArgs)]
pub struct DataArgs {
    /// The node's data directory (default: the session directory's data/ folder). KV values
    /// written through to the second-level store live in its kv-l2/ folder, so a node started
    /// again on the same directory serves them.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Keep KV values written through (or back) to the second-level store in this Redis server
    /// instead of the data directory.
    #[arg(long, value_name = "HOST:PORT")]
    pub l2_redis: Option<String>,
    /// The node's shared memory for objects larger than 100 KB, in MB (default: a third of the
    /// node's memory, at most the host's physical memory).
    #[arg(long, value_name = "MB")]
    pub shared_memory_mb: Option<u64>,
    /// Where objects are spilled when shared memory is full (default: the data directory's
    /// spill/ folder). A node started again on the same directory serves what it had spilled.
    #[arg(long, value_name = "DIR")]
    pub spill_dir: Option<PathBuf>,
    /// The most disk the spilled objects may take, in MB (default: 95% of the spill
    /// directory's free disk space when the node starts; 0 turns spilling off).
    #[arg(long, value_name = "MB")]
    pub spill_limit_mb: Option<u64>,
    /// The most KV memory (keys and values) one job may hold on this node, in MB (default: a
    /// quarter of the node's memory, at most 4096; 0: no quota). A write over it fails with
    /// 4202.
    #[arg(long, value_name = "MB")]
    pub kv_quota_mb: Option<u64>,
}

impl DataArgs {
    /// The KV quota per job in bytes, for a node with `memory_mb` of memory (`None`: no quota).
    pub fn kv_quota_bytes(&self, memory_mb: u64) -> Option<u64> {
        let mb = self
            .kv_quota_mb
            .unwrap_or((memory_mb / 4).clamp(1, DEFAULT_KV_QUOTA_MAX_MB));
        (mb > 0).then(|| mb.saturating_mul(1 << 20))
    }
}

/// The default KV quota per job is a quarter of the node's memory, and at most this (MB).
pub const DEFAULT_KV_QUOTA_MAX_MB: u64 = 4096;

impl DataArgs {
    /// The same flags, for a `yr node` command line.
    pub fn to_node_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        let mut push = |flag: &str, value: String| {
            args.push(flag.to_string());
            args.push(value);
        };
        if let Some(dir) = &self.data_dir {
            push("--data-dir", dir.display().to_string());
        }
        if let Some(redis) = &self.l2_redis {
            push("--l2-redis", redis.clone());
        }
        if let Some(mb) = self.shared_memory_mb {
            push("--shared-memory-mb", mb.to_string());
        }
        if let Some(dir) = &self.spill_dir {
            push("--spill-dir", dir.display().to_string());
        }
        if let Some(mb) = self.spill_limit_mb {
            push("--spill-limit-mb", mb.to_string());
        }
        if let Some(mb) = self.kv_quota_mb {
            push("--kv-quota-mb", mb.to_string());
        }
        args
    }
}

/// What a node offers.
#[derive(Debug, Clone, ClapArgs)]
pub struct CapacityArgs {
    /// CPU in millicores (default: all cores).
    #[arg(long)]
    pub cpu: Option<u64>,
    /// Memory in MB (default: physical memory).
    #[arg(long)]
    pub memory: Option<u64>,
    /// Custom resources as JSON, for example '{"gpu": 2}'.
    #[arg(long)]
    pub resources: Option<String>,
    /// Node labels, k=v (repeatable).
    #[arg(long = "labels", value_name = "K=V")]
    pub labels: Vec<String>,
}

impl CapacityArgs {
    /// The capacity these flags describe.
    pub fn amount(&self) -> anyhow::Result<Amount> {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get() as u64)
            .unwrap_or(1);
        let custom = match &self.resources {
            None => Default::default(),
            Some(json) => serde_json::from_str(json).with_context(|| {
                format!("--resources must be a JSON object of numbers, got {json}")
            })?,
        };
        Ok(Amount {
            cpu: self.cpu.unwrap_or(cores * 1000),
            memory: self.memory.unwrap_or_else(physical_memory_mb),
            custom,
        })
    }

    /// The labels as pairs.
    pub fn label_pairs(&self) -> anyhow::Result<Vec<(String, String)>> {
        self.labels
            .iter()
            .map(|label| match label.split_once('=') {
                Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
                _ => anyhow::bail!("--labels takes k=v, got {label:?}"),
            })
            .collect()
    }
}

/// Physical memory in MB, from /proc/meminfo.
pub fn physical_memory_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(1024)
}

/// Log to stderr at `info`, or as `RUST_LOG` says: a level (`debug`), or targets with levels
/// (`info,yr_datasystem::stream_service=debug`). A value that does not parse is reported and
/// the default is kept.
fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let configured = std::env::var("RUST_LOG").ok();
    let parsed = configured
        .as_deref()
        .map(str::parse::<tracing_subscriber::filter::Targets>);
    let filter = match &parsed {
        Some(Ok(targets)) => targets.clone(),
        _ => tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO),
    };
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(std::io::stderr)
                .with_filter(filter),
        )
        .try_init();
    if let (Some(value), Some(Err(error))) = (configured, parsed) {
        tracing::warn!(%value, %error, "RUST_LOG is not a level or a list of target=level; logging at info");
    }
}

async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    let mut int = match signal(SignalKind::interrupt()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
}

/// Run the master until SIGTERM/SIGINT.
pub fn run_master(args: &MasterArgs) -> anyhow::Result<()> {
    init_logging();
    args.security.install(args.security.token()?)?;
    let mut options = yr_master::MasterOptions::new(args.listen, args.data_dir.clone());
    options.metrics_listen = args.metrics_listen;
    options.node_timeout = Duration::from_secs_f64(args.node_timeout.max(0.1));
    options.metrics_public = args.security.metrics_public;
    options.meta = args.meta.backend();
    options.advertise = args.advertise.clone();
    options.leader_lease = Duration::from_secs_f64(args.leader_lease.max(1.0));
    runtime()?.block_on(yr_master::run(options, terminated()))?;
    Ok(())
}

/// Run a node until SIGTERM/SIGINT; then its instances get their shutdown hooks.
pub fn run_node(args: &NodeArgs) -> anyhow::Result<()> {
    init_logging();
    let token = args.security.token()?;
    // Drivers on this machine find the token beside the node's bus socket.
    if let Some(dir) = args.bus_socket.parent() {
        token.store(&yr_common::session::private_dir(dir)?)?;
    }
    args.security.install(token)?;
    let node_id = args
        .node_id
        .clone()
        .unwrap_or_else(|| format!("node-{}", yr_common::ids::random_hex(8)));
    crate::limits::check(&args.capacity, &args.data, &args.session_dir)?;
    let capacity = args.capacity.amount()?;
    let data = &args.data;
    let shared_memory_mb = data
        .shared_memory_mb
        .unwrap_or_else(|| crate::limits::default_shared_memory_mb(capacity.memory));
    let data_worker = yr_datasystem::DataWorker::open(&yr_datasystem::DataWorkerOptions {
        data_dir: data
            .data_dir
            .clone()
            .unwrap_or_else(|| args.session_dir.join("data")),
        l2_redis: data.l2_redis.clone(),
        shared_memory_bytes: shared_memory_mb.saturating_mul(1 << 20),
        pool_id: format!("{node_id}-{}", yr_common::ids::random_hex(8)),
        spill_dir: data.spill_dir.clone(),
        spill_limit_bytes: data.spill_limit_mb.map(|mb| mb.saturating_mul(1 << 20)),
        kv_quota_bytes: data.kv_quota_bytes(capacity.memory),
    })
    .context("cannot start the node's data worker")?;
    let options = yr_proxy::NodeOptions {
        node_id,
        master_addresses: args.master_address.clone(),
        listen: args.listen,
        fetch_binaries: args.fetch_binaries,
        // Only a node that listens on 0.0.0.0 advertises a host; one that listens on an
        // address advertises that address.
        advertise_host: match &args.advertise_host {
            Some(host) => host.clone(),
            None if args.listen.ip().is_unspecified() => crate::cluster::local_ip()?,
            None => args.listen.ip().to_string(),
        },
        bus_socket: args.bus_socket.clone(),
        metrics_listen: args.metrics_listen,
        metrics_public: args.security.metrics_public,
        capacity,
        labels: args.capacity.label_pairs()?,
        session_dir: args.session_dir.clone(),
        warm_pool_size: args.warm_pool,
        heartbeat: (
            Duration::from_secs(1),
            Duration::from_secs_f64(args.heartbeat_timeout.max(0.5)),
        ),
        create_rate: (args.create_rate, args.create_burst),
        data_worker,
    };
    runtime()?.block_on(yr_proxy::run(options, terminated()))?;
    Ok(())
}
