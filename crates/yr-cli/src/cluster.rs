//! `yr start`, `yr stop` and `yr status`: run a cluster's processes in the background under a
//! session directory, stop them gracefully, and show what the master knows.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args as ClapArgs;
use yr_common::session::{
    is_session_process, private_dir, sessions_root, SessionInfo, ENV_SESSION_DIR,
};
use yr_proto::v1 as pb;

use crate::daemon::{CapacityArgs, DataArgs, MetaStoreArgs, SecurityArgs};
use yr_common::auth::ClusterToken;

/// How long components may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `yr stop` waits for a graceful stop before killing.
const STOP_TIMEOUT: Duration = Duration::from_secs(40);
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

/// Flags of `yr stop`.
#[derive(Debug, ClapArgs)]
pub struct StopArgs {
    /// Kill at once instead of letting instances run their shutdown hooks.
    #[arg(long)]
    pub force: bool,
    /// The session to stop (default: the latest).
    #[arg(long)]
    pub session_dir: Option<PathBuf>,
}

/// Flags of `yr status`.
#[derive(Debug, ClapArgs)]
pub struct StatusArgs {
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// The master to ask (default: the latest session's); several, comma-separated, for a
    /// cluster with standby masters: a standby's answer is followed to the leader.
    #[arg(long, value_name = "HOST:PORT,...")]
    pub master_address: Option<String>,
}

fn free_port(host: std::net::IpAddr, start: u16) -> anyhow::Result<u16> {
    (start..start.saturating_add(200))
        .find(|port| TcpListener::bind((host, *port)).is_ok())
        .with_context(|| format!("no free port in {start}..{}", start.saturating_add(200)))
}

/// This machine's address as other machines see it, for a component that listens on 0.0.0.0:
/// the source address of its route to a private address, else the first address of an
/// interface that is up and not loopback. Never 127.0.0.1, which every other machine would
/// take for itself (a node advertising it would have other nodes forward to themselves).
pub fn local_ip() -> anyhow::Result<String> {
    // Not a listener: an unconnected UDP socket that "connects" (no packet is sent) only to
    // learn which local address the kernel routes a private address from; 0.0.0.0 lets the
    // kernel choose that address.
    let routed = UdpSocket::bind("0.0.0.0:0")
        .and_then(|socket| {
            socket.connect("10.255.255.255:1")?;
            socket.local_addr()
        })
        .map(|address| address.ip())
        .ok()
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified());
    routed
        .or_else(first_interface_address)
        .map(|ip| ip.to_string())
        .context(
            "cannot tell this machine's address (no route to a private address and no interface \
             up but loopback); give the address other machines reach it at with --host ADDR",
        )
}

/// The first IPv4 address (else IPv6) of an interface that is up and not loopback.
fn first_interface_address() -> Option<std::net::IpAddr> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list that freeifaddrs releases below; it is
    // only read in between.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return None;
    }
    let mut found: Vec<std::net::IpAddr> = Vec::new();
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: `entry` is a node of the list getifaddrs returned, not freed yet.
        let interface = unsafe { &*entry };
        entry = interface.ifa_next;
        let flags = interface.ifa_flags;
        if interface.ifa_addr.is_null()
            || flags & libc::IFF_UP as libc::c_uint == 0
            || flags & libc::IFF_LOOPBACK as libc::c_uint != 0
        {
            continue;
        }
        // SAFETY: ifa_addr is non-null and points at a sockaddr whose family says its type.
        let family = i32::from(unsafe { (*interface.ifa_addr).sa_family });
        if family == libc::AF_INET {
            // SAFETY: an AF_INET address is a sockaddr_in.
            let address = unsafe { &*(interface.ifa_addr as *const libc::sockaddr_in) };
            found.push(std::net::Ipv4Addr::from(u32::from_be(address.sin_addr.s_addr)).into());
        } else if family == libc::AF_INET6 {
            // SAFETY: an AF_INET6 address is a sockaddr_in6.
            let address = unsafe { &*(interface.ifa_addr as *const libc::sockaddr_in6) };
            let ip = std::net::Ipv6Addr::from(address.sin6_addr.s6_addr);
            // Link-local addresses need a scope other machines do not have.
            if ip.segments()[0] & 0xffc0 != 0xfe80 {
                found.push(ip.into());
            }
        }
    }
    // SAFETY: `list` came from getifaddrs and is released once; nothing refers to it after.
    unsafe { libc::freeifaddrs(list) };
    found
        .iter()
        .find(|ip| ip.is_ipv4())
        .or_else(|| found.first())
        .copied()
}

fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{secs}-{}", std::process::id())
}

fn spawn(
    role: &str,
    args: &[String],
    session: &Path,
    attached: bool,
    token: &ClusterToken,
) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("cannot find the yr executable")?;
    let logs = private_dir(&session.join("logs"))?;
    let log = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(logs.join(format!("{role}.log")))
            .with_context(|| format!("cannot create the {role} log"))?
    };
    let mut command = Command::new(exe);
    command
        .arg(role)
        .args(args)
        .env(yr_common::auth::TOKEN_ENV, token.as_str())
        // The mark `yr stop` checks before it signals this process.
        .env(ENV_SESSION_DIR, session)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid and prctl are async-signal-safe; they detach the child from this terminal
    // and, when attached, make it die with this process.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(move || {
            libc::setsid();
            if attached {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            }
            Ok(())
        });
    }
    command
        .spawn()
        .with_context(|| format!("cannot start the {role}"))
}

fn wait_ready(
    role: &str,
    child: &mut Child,
    session: &Path,
    ready: impl Fn() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if ready() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(session.join("logs").join(format!("{role}.log")))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "the {role} exited during start ({status}); its log ends with:\n{}",
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!(
        "the {role} did not become ready within {START_TIMEOUT:?}; see {}/logs/{role}.log",
        session.display()
    )
}

fn connects(address: &str) -> bool {
    address
        .parse::<SocketAddr>()
        .ok()
        .map(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_millis(200)).is_ok())
        .unwrap_or(false)
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

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

/// The session in `dir` (default: the latest), and the directory it really is in.
fn read_session(dir: Option<&Path>) -> anyhow::Result<(PathBuf, SessionInfo)> {
    let dir = match dir {
        Some(dir) => dir.to_path_buf(),
        None => sessions_root()?.join("latest"),
    };
    let session = SessionInfo::read(&dir).with_context(|| {
        format!(
            "no yr cluster was started on this machine (cannot read {}/session.json)",
            dir.display()
        )
    })?;
    Ok((dir.canonicalize().unwrap_or(dir), session))
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

/// `yr stop`.
pub fn stop(args: &StopArgs) -> anyhow::Result<ExitCode> {
    let (dir, session) = read_session(args.session_dir.as_deref())?;
    let signal = if args.force {
        libc::SIGKILL
    } else {
        libc::SIGTERM
    };
    // The node first, so its instances run their shutdown hooks while the master still serves.
    let mut order = session.processes.clone();
    order.sort_by_key(|(role, _)| if role == "node" { 0 } else { 1 });
    for (role, pid) in &order {
        if !alive(*pid) {
            continue;
        }
        // A stale or planted session file may name any process: signal only yr processes that
        // carry this session's mark.
        if !is_session_process(*pid, &dir) {
            eprintln!(
                "yr stop: pid {pid} (the {role} in {}) is not a yr process of this session; not \
                 signalling it",
                dir.join(SessionInfo::FILE).display()
            );
            continue;
        }
        // SAFETY: signalling a process this session started (checked just above).
        unsafe {
            libc::kill(*pid as libc::pid_t, signal);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while alive(*pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        // Checked again: in 40 s the pid may have gone to another process.
        if alive(*pid) && is_session_process(*pid, &dir) {
            eprintln!(
                "yr stop: the {role} ({pid}) did not stop within {STOP_TIMEOUT:?}; killing it"
            );
            // SAFETY: as above.
            unsafe {
                libc::kill(*pid as libc::pid_t, libc::SIGKILL);
            }
        }
        let _ = writeln!(std::io::stdout(), "stopped the {role} ({pid})");
    }
    let latest = sessions_root()?.join("latest");
    if latest.canonicalize().ok().as_deref() == Some(dir.as_path()) {
        let _ = std::fs::remove_file(latest);
    }
    // Runtimes killed with their node left their sockets.
    yr_common::sockets::sweep_dead();
    Ok(ExitCode::SUCCESS)
}

/// `yr status`.
pub fn status(args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let (address, session_dir) = match &args.master_address {
        Some(address) => (address.clone(), None),
        None => {
            let (_, session) = read_session(None)?;
            if session.master_address.is_empty() {
                bail!("this machine runs a node only; pass --master-address");
            }
            (session.master_address, Some(session.session_dir))
        }
    };
    let token = ClusterToken::resolve(None, session_dir.as_deref())?.context(
        "no cluster token to show the status with: set YR_TOKEN to the token in the cluster's \
         session directory (the `token` file)",
    )?;
    let mut credentials = (*yr_transport::current()).clone();
    credentials.token = Some(token);
    yr_transport::install(credentials);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let addresses: Vec<String> = address
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_string)
        .collect();
    let status = runtime.block_on(leader_status(&addresses))?;
    // Written through a handle whose errors end the command: a reader that went away
    // (`yr status | head`) ends it quietly (see main).
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.json {
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&status_json(&status))?
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    if !status.meta_store.is_empty() {
        writeln!(out, "Meta store: {}", status.meta_store)?;
    }
    if !status.leader.is_empty() {
        writeln!(out, "Masters")?;
        writeln!(out, "  {:<22} leader", status.leader)?;
        for master in status.masters.iter().filter(|m| **m != status.leader) {
            writeln!(out, "  {master:<22} standby")?;
        }
    }
    writeln!(out, "Nodes")?;
    writeln!(
        out,
        "  {:<20} {:<22} {:<10} {:>18} {:>18}",
        "ID", "ADDRESS", "STATE", "CAPACITY cpu/mem", "ALLOCATABLE cpu/mem"
    )?;
    for node in &status.nodes {
        let cap = node.capacity.clone().unwrap_or_default();
        let free = node.allocatable.clone().unwrap_or_default();
        writeln!(
            out,
            "  {:<20} {:<22} {:<10} {:>18} {:>18}",
            node.node_id,
            node.address,
            node.state,
            format!("{}m/{}MB", cap.cpu_millicores, cap.memory_mb),
            format!("{}m/{}MB", free.cpu_millicores, free.memory_mb)
        )?;
    }
    let mut by_state = std::collections::BTreeMap::<String, usize>::new();
    for instance in &status.instances {
        let state = pb::InstanceState::try_from(instance.state)
            .map(|s| s.as_str_name())
            .unwrap_or("UNKNOWN");
        *by_state.entry(state.to_string()).or_default() += 1;
    }
    writeln!(out, "Instances by state")?;
    if by_state.is_empty() {
        writeln!(out, "  (none)")?;
    }
    for (state, count) in by_state {
        writeln!(out, "  {state:<16} {count}")?;
    }
    let mut by_class = std::collections::BTreeMap::<&str, usize>::new();
    for instance in &status.instances {
        if !instance.class_name.is_empty() {
            *by_class.entry(instance.class_name.as_str()).or_default() += 1;
        }
    }
    if !by_class.is_empty() {
        writeln!(out, "Instances by class")?;
        for (class, count) in by_class {
            writeln!(out, "  {class:<40} {count}")?;
        }
    }
    writeln!(out, "Registered functions")?;
    if status.functions.is_empty() {
        writeln!(out, "  (none)")?;
    }
    for function in &status.functions {
        writeln!(out, "  {function}")?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// The status from the leading master: asks `addresses` in turn, following a standby's answer
/// to the leader it names (and waiting a moment while an election is under way).
async fn leader_status(addresses: &[String]) -> anyhow::Result<pb::ClusterStatusResponse> {
    const ELECTION_WAIT: Duration = Duration::from_secs(10);
    let deadline = Instant::now() + ELECTION_WAIT;
    let mut queue: std::collections::VecDeque<String> = addresses.iter().cloned().collect();
    let mut last_error = anyhow::anyhow!("no master address to ask");
    let mut followed = 0;
    while let Some(address) = queue.pop_front() {
        let answer = async {
            let channel =
                yr_transport::connect(&address, yr_common::ErrorCode::InnerCommunication).await?;
            Ok::<_, yr_common::Error>(
                pb::master_client::MasterClient::new(channel)
                    .cluster_status(pb::ClusterStatusRequest {})
                    .await,
            )
        }
        .await;
        let status = match answer {
            Ok(Ok(response)) => return Ok(response.into_inner()),
            Ok(Err(status)) => status,
            Err(error) => {
                last_error = anyhow::anyhow!("{error}");
                continue;
            }
        };
        if yr_transport::refused(&address) {
            bail!("{}", yr_transport::token_refused(&address));
        }
        let code = yr_transport::status_to_code(&status, yr_common::ErrorCode::InnerCommunication);
        last_error = anyhow::anyhow!(
            "{}",
            yr_common::Error::new(
                code,
                format!(
                    "the master at {address} failed the status call: {}",
                    status.message()
                )
            )
        );
        match yr_transport::leader_redirect(&status) {
            Some(Some(leader)) if followed < 4 => {
                followed += 1;
                queue.push_front(leader);
            }
            Some(_) if Instant::now() < deadline => {
                // No master leads yet: ask this one again shortly.
                tokio::time::sleep(Duration::from_millis(250)).await;
                queue.push_back(address);
            }
            _ => {}
        }
    }
    Err(last_error)
}

fn status_json(status: &pb::ClusterStatusResponse) -> serde_json::Value {
    let resources = |r: &Option<pb::Resources>| {
        let r = r.clone().unwrap_or_default();
        serde_json::json!({"cpu_millicores": r.cpu_millicores, "memory_mb": r.memory_mb, "custom": r.custom})
    };
    serde_json::json!({
        "nodes": status.nodes.iter().map(|n| serde_json::json!({
            "id": n.node_id, "address": n.address, "state": n.state,
            "incarnation": n.incarnation,
            "capacity": resources(&n.capacity), "allocatable": resources(&n.allocatable),
            "labels": n.labels,
        })).collect::<Vec<_>>(),
        "instances": status.instances.iter().map(|i| serde_json::json!({
            "id": i.instance_id, "function": i.function, "class": i.class_name,
            "node": i.node_id, "job": i.job_id,
            "state": pb::InstanceState::try_from(i.state).map(|s| s.as_str_name()).unwrap_or("UNKNOWN"),
        })).collect::<Vec<_>>(),
        "functions": status.functions,
        "meta_store": status.meta_store,
        "leader": status.leader,
        "standbys": status.masters.iter().filter(|m| **m != status.leader).collect::<Vec<_>>(),
    })
}
