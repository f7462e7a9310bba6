//! `yr start`: start a master and a node (or a node that joins a cluster) in the background
//! under a session directory, or in the foreground with `--block` until a signal.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args as ClapArgs;
use yr_common::auth::ClusterToken;
use yr_common::session::{is_session_process, private_dir, sessions_root, SessionInfo};

use super::address::{connects, free_port, local_ip};
use super::{spawn, wait_ready, STOP_TIMEOUT};
use crate::daemon::{CapacityArgs, DataArgs, MetaStoreArgs, SecurityArgs};

/// The master's port when `--port` is not given.
const DEFAULT_PORT: u16 = 22770;

/// Flags of `yr start`.
#[derive(Debug, ClapArgs)]
pub struct StartArgs {
    /// Start the master and a node on this machine.
    #[arg(long, conflicts_with = "master_address")]
    pub master: bool,
    /// Start a node that joins the cluster whose master is at HOST:PORT (for a cluster on etcd
    /// with standby masters, all of them, comma-separated: the node follows the leader).
    #[arg(long, value_name = "HOST:PORT,...")]
    pub master_address: Option<String>,
    /// The master's port (default 22770; shifts up when taken). A second cluster on this
    /// machine needs both --port and --session-dir.
    #[arg(long)]
    pub port: Option<u16>,
    /// The node's bus port (shifts up when taken).
    #[arg(long, default_value_t = 22773)]
    pub node_port: u16,
    #[command(flatten)]
    pub capacity: CapacityArgs,
    /// Session directory, private to you (default: a new one under $TMPDIR/yr-<uid>/sessions,
    /// linked as `latest`).
    #[arg(long)]
    pub session_dir: Option<PathBuf>,
    /// Stay in the foreground; stop the cluster on SIGTERM/SIGINT or when this process dies.
    #[arg(long)]
    pub block: bool,
    /// A temporary cluster for one driver: not linked as `latest`.
    #[arg(long)]
    pub temporary: bool,
    /// Spare runtimes kept started per driver binary.
    #[arg(long, default_value_t = 2)]
    pub warm_pool: usize,
    #[command(flatten)]
    pub data: DataArgs,
    /// The address every component listens on and advertises. Default 127.0.0.1: nothing is
    /// reachable from other machines. Another address (or 0.0.0.0) opens the cluster to the
    /// network, still behind the cluster token; add --tls-cert/--tls-key/--tls-ca to encrypt.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// The cluster token of the cluster to join (with --master-address; default: YR_TOKEN).
    /// `yr start --master` generates one into the session directory.
    #[arg(
        long,
        value_name = "TOKEN",
        requires = "master_address",
        conflicts_with = "block"
    )]
    pub token: Option<String>,
    #[command(flatten)]
    pub security: SecurityArgs,
    /// With --master: where the master keeps the cluster's state (default: the embedded store
    /// in the session directory; --etcd for etcd).
    #[command(flatten)]
    pub meta: MetaStoreArgs,
}

fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{secs}-{}", std::process::id())
}

/// The directory of the latest session under `root` if one of its processes still runs.
fn running_session(root: &Path) -> Option<PathBuf> {
    let latest = root.join("latest");
    let session = SessionInfo::read(&latest).ok()?;
    let dir = latest.canonicalize().ok()?;
    session
        .processes
        .iter()
        .any(|(_, pid)| is_session_process(*pid, &dir))
        .then_some(dir)
}

/// `yr start`.
pub fn start(args: &StartArgs) -> anyhow::Result<ExitCode> {
    if !args.master && args.master_address.is_none() {
        bail!("say what to start: --master for a new cluster, or --master-address HOST:PORT to join one");
    }
    if !args.master && !args.meta.etcd.is_empty() {
        bail!("--etcd chooses the master's store: use it with --master (nodes that join reach the store through the master)");
    }
    let capacity = args.capacity.amount()?;
    let labels = args.capacity.label_pairs()?;
    let root = sessions_root()?;
    let running = running_session(&root);
    if let Some(running) = &running {
        if args.master && !args.temporary && (args.port.is_none() || args.session_dir.is_none()) {
            bail!(
                "a yr cluster is already running on this machine (session {}); stop it with \
                 `yr stop`, or start a second one with both --port and --session-dir",
                running.display()
            );
        }
    }
    let session = match &args.session_dir {
        Some(dir) => dir.clone(),
        None => root.join(timestamp()),
    };
    crate::limits::check(&args.capacity, &args.data, &session)?;
    let session = private_dir(&session)?;
    let session = session.canonicalize().unwrap_or(session);
    if running.as_deref() == Some(session.as_path()) {
        bail!(
            "{} is the session of the yr cluster running on this machine; give a second cluster \
             a --session-dir of its own",
            session.display()
        );
    }
    // The token: generated for a new cluster (or read from --token-file), given for one to
    // join. Either way it goes into the session directory (0600), where drivers on this
    // machine find it; the processes started here get it in their environment.
    let token = match (&args.master_address, &args.token) {
        (None, _) if args.security.token_file.is_some() => args.security.token()?,
        (None, _) => ClusterToken::generate()?,
        (Some(_), Some(text)) => ClusterToken::parse(text)?,
        (Some(_), None) => args.security.token().context(
            "joining a cluster needs its token: pass --token, set YR_TOKEN or --token-file (the \
             master's session directory holds it in the `token` file)",
        )?,
    };
    token.store(&session)?;
    let host = args.host;
    // What other machines are told: the host itself, or this machine's address for 0.0.0.0.
    let ip = if host.is_unspecified() {
        local_ip()?
    } else {
        host.to_string()
    };
    if !host.is_loopback() && args.security.tls_cert.is_none() {
        eprintln!(
            "yr start: listening on {host}: other machines can reach this cluster; they need its \
             token, but traffic is not encrypted (add --tls-cert/--tls-key/--tls-ca)"
        );
    }
    let mut children: Vec<(String, Child)> = Vec::new();
    let mut info = SessionInfo {
        session_dir: session.clone(),
        temporary: args.temporary,
        ..Default::default()
    };

    let master_address = match &args.master_address {
        Some(address) => address.clone(),
        None => {
            let port = free_port(host, args.port.unwrap_or(DEFAULT_PORT))?;
            let metrics = free_port(host, port.saturating_add(10))?;
            let mut master_args = vec![
                "--listen".into(),
                SocketAddr::new(host, port).to_string(),
                "--data-dir".into(),
                session.join("master").display().to_string(),
                "--metrics-listen".into(),
                format!("127.0.0.1:{metrics}"),
            ];
            master_args.extend(args.security.to_args());
            master_args.extend(args.meta.to_args());
            if !args.meta.etcd.is_empty() {
                // The leader's address in the election, as other machines reach it.
                master_args.extend(["--advertise".into(), format!("{ip}:{port}")]);
            }
            info.meta_store = args.meta.backend().describe(&session.join("master"));
            let mut child = spawn("master", &master_args, &session, args.block, &token)?;
            let local = if host.is_unspecified() {
                format!("127.0.0.1:{port}")
            } else {
                SocketAddr::new(host, port).to_string()
            };
            wait_ready("master", &mut child, &session, || connects(&local))?;
            info.processes.push(("master".into(), child.id()));
            info.metrics
                .push(("master".into(), format!("127.0.0.1:{metrics}")));
            children.push(("master".into(), child));
            info.master_address = format!("{ip}:{port}");
            local
        }
    };

    let node_port = free_port(host, args.node_port)?;
    let node_metrics = free_port(host, node_port.saturating_add(10))?;
    let node_id = format!("node-{}", yr_common::ids::random_hex(8));
    let bus_socket = session.join("bus.sock");
    let mut node_args = vec![
        "--master-address".into(),
        master_address.clone(),
        "--listen".into(),
        SocketAddr::new(host, node_port).to_string(),
        "--advertise-host".into(),
        ip.clone(),
        "--bus-socket".into(),
        bus_socket.display().to_string(),
        "--session-dir".into(),
        session.display().to_string(),
        "--node-id".into(),
        node_id.clone(),
        "--metrics-listen".into(),
        format!("127.0.0.1:{node_metrics}"),
        "--cpu".into(),
        capacity.cpu.to_string(),
        "--memory".into(),
        capacity.memory.to_string(),
        "--warm-pool".into(),
        args.warm_pool.to_string(),
    ];
    if !capacity.custom.is_empty() {
        node_args.push("--resources".into());
        node_args.push(serde_json::to_string(&capacity.custom)?);
    }
    for (k, v) in &labels {
        node_args.push("--labels".into());
        node_args.push(format!("{k}={v}"));
    }
    node_args.extend(args.data.to_node_args());
    node_args.extend(args.security.to_args());
    let mut node = spawn("node", &node_args, &session, args.block, &token)?;
    let socket = bus_socket.clone();
    wait_ready("node", &mut node, &session, || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    })?;
    info.processes.push(("node".into(), node.id()));
    info.metrics
        .push(("node".into(), format!("127.0.0.1:{node_metrics}")));
    children.push(("node".into(), node));
    info.bus_address = format!("unix:{}", bus_socket.display());
    info.node_address = format!("{ip}:{node_port}");
    info.node_id = node_id.clone();
    info.write(&session)
        .context("cannot write the session file")?;
    // A cluster that runs beside another one does not take the `latest` link from it.
    let linked = !args.temporary && running.is_none();
    if linked {
        let latest = root.join("latest");
        let _ = std::fs::remove_file(&latest);
        std::os::unix::fs::symlink(&session, &latest)
            .with_context(|| format!("cannot link {}", latest.display()))?;
    }

    let mut text = String::from("yr cluster started.\n");
    if args.master {
        text += &format!("  master:  {}\n", info.master_address);
    }
    text += &format!("  node:    {node_id} (bus {})\n", info.bus_address);
    text += &format!("  session: {}\n", session.display());
    if args.master && linked {
        text += "Drivers on this machine find the cluster by themselves (yr::init).\n";
    }
    if args.master {
        if host.is_loopback() {
            text += &format!(
                "It listens on {host} only; to let other machines join, start it with --host ADDR.\n"
            );
        } else {
            text += &format!(
                "Join another machine:  YR_TOKEN=<the token in {}/token> yr start --master-address {}\n",
                session.display(),
                info.master_address
            );
        }
    }
    if linked {
        text += "Stop it:  yr stop\n";
    } else {
        text += &format!("Stop it:  yr stop --session-dir {}\n", session.display());
    }
    // Nobody may be reading (`yr start | head`): the cluster runs all the same.
    let _ = std::io::stdout().write_all(text.as_bytes());

    if !args.block {
        return Ok(ExitCode::SUCCESS);
    }
    block_until_signal(&mut children);
    Ok(ExitCode::SUCCESS)
}

static STOP_REQUESTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP_REQUESTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

fn block_until_signal(children: &mut [(String, Child)]) {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    loop {
        if STOP_REQUESTED.load(std::sync::atomic::Ordering::SeqCst) {
            break;
        }
        if children
            .iter_mut()
            .any(|(_, c)| matches!(c.try_wait(), Ok(Some(_))))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for (_, child) in children.iter().rev() {
        // SAFETY: signalling our own children.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    for (_, child) in children.iter_mut().rev() {
        while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}
