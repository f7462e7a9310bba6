//! `yr-sim`: the master at scale, with simulated nodes. For each fleet size it starts a real
//! `yr master` (the built `yr` binary next to this one, or `$YR_BIN`), registers that many
//! simulated nodes with it from this one process (real gRPC with the cluster token: each node
//! has its own id, incarnation and heartbeat timer; no runtimes, no data worker; see
//! [`fleet`]), and measures:
//!
//! - registration: how long until every node registered;
//! - idle: the master's CPU (from `/proc/<pid>/stat`, % of one core) and RSS while the nodes
//!   only beat, the beats per second it absorbs, and whether any node was falsely declared lost;
//! - placement: creates that need the master (its `Schedule` RPC, the decision only; see
//!   [`placement`]): placements per second, latency p50 and p99, and the master's CPU and RSS
//!   meanwhile;
//! - failover (`--failover`): two masters on one etcd, the nodes knowing both; the leader is
//!   SIGKILLed, and the figures are the time until the standby leads and until every node
//!   registered with it again.
//!
//! ```text
//! cargo build --release -p yr-cli -p yr-bench
//! chrt -r 1 target/release/yr-sim --nodes 100,1000,5000 --failover
//! ```
//!
//! Each line of progress goes to stderr; the results go to stdout as a table (and with
//! `--json FILE`, to that file).

mod fleet;
mod placement;
mod process;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use serde::Serialize;
use tokio::time::Instant;

use fleet::{Fleet, FleetConfig};
use placement::PlacementConfig;
use process::{Etcd, Master, ProcSample};

#[derive(Parser, Debug, Clone)]
#[command(
    version,
    about = "Measure a real yr master with many simulated nodes (registration, heartbeats, \
             placement, failover)"
)]
struct Args {
    /// Fleet sizes to measure, comma-separated; each runs against a fresh master.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,5000")]
    nodes: Vec<usize>,
    /// Simulated nodes per gRPC channel (HTTP/2 connection) to each master.
    #[arg(long, default_value_t = 100)]
    nodes_per_channel: usize,
    /// Milliseconds between a node's heartbeats (a real node beats every 500 ms).
    #[arg(long, default_value_t = 500)]
    beat_ms: u64,
    /// The master's node timeout in seconds (`yr master --node-timeout`).
    #[arg(long, default_value_t = 5.0)]
    node_timeout: f64,
    /// Seconds of the idle measure (heartbeats only).
    #[arg(long, default_value_t = 10.0)]
    idle_seconds: f64,
    /// Seconds of the placement measure.
    #[arg(long, default_value_t = 10.0)]
    place_seconds: f64,
    /// Schedule requests in flight at once during the placement measure.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Milliseconds an accepted placement holds its node's resources.
    #[arg(long, default_value_t = 1000)]
    lifetime_ms: u64,
    /// Each simulated node's CPU capacity, in millicores.
    #[arg(long, default_value_t = 64_000)]
    node_cpu: u64,
    /// Each simulated node's memory capacity, in MB.
    #[arg(long, default_value_t = 262_144)]
    node_memory: u64,
    /// Millicores each placement asks for.
    #[arg(long, default_value_t = 100)]
    request_cpu: u64,
    /// MB each placement asks for.
    #[arg(long, default_value_t = 128)]
    request_memory: u64,
    /// Also measure failover: two masters on one etcd (started here), SIGKILL the leader.
    #[arg(long)]
    failover: bool,
    /// Seconds the fleet may take to register (and to register again after a failover).
    #[arg(long, default_value_t = 120.0)]
    register_deadline: f64,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Where masters, etcd and their logs live (a fresh temp directory by default; removed
    /// at the end unless given).
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
}

/// The results for one fleet size.
#[derive(Debug, Default, Serialize)]
struct SizeReport {
    nodes: usize,
    /// Seconds until every node registered.
    register_seconds: f64,
    /// Nodes registered at the end of the idle measure (master's count of alive nodes).
    alive_after_idle: f64,
    idle_cpu_percent: f64,
    idle_rss_mb: f64,
    /// Beats sent per second during the idle measure.
    heartbeats_per_second: f64,
    placements_per_second: f64,
    placement_p50_ms: f64,
    placement_p99_ms: f64,
    placements: u64,
    placement_refusals: u64,
    placement_rpc_errors: u64,
    placement_cpu_percent: f64,
    placement_rss_mb: f64,
    /// Nodes the master declared lost (its counter) over the whole run: false losses.
    nodes_lost: f64,
    /// `reregister` commands the nodes received, and incarnations refused as lost.
    reregister_commands: u64,
    incarnations_lost: u64,
    alive_at_end: f64,
    failover: Option<FailoverReport>,
}

/// The results of one failover.
#[derive(Debug, Default, Serialize)]
struct FailoverReport {
    /// Seconds from the leader's SIGKILL until the standby says it leads.
    standby_leads_seconds: f64,
    /// Seconds from the SIGKILL until every node registered with the new leader.
    all_registered_seconds: f64,
    /// Nodes registered with the new leader by the deadline.
    registered: usize,
    /// Nodes the new leader declared lost.
    nodes_lost: f64,
    /// Incarnations the new leader refused as lost.
    incarnations_lost: u64,
}

fn main() -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .try_init();
    let args = Args::parse();
    if args.nodes.is_empty() || args.nodes.contains(&0) {
        bail!("--nodes needs one or more fleet sizes above 0");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let token = yr_common::auth::ClusterToken::generate().context("cannot make a cluster token")?;
    yr_transport::install(yr_transport::Credentials::with_token(token.clone()));
    let (work_dir, remove) = match &args.work_dir {
        Some(dir) => (dir.clone(), false),
        None => (
            std::env::temp_dir().join(format!("yr-sim-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&work_dir)?;
    eprintln!(
        "yr-sim: work directory {} ({} cores online)",
        work_dir.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let etcd = if args.failover {
        Some(Etcd::start(&work_dir.join("etcd")).await?)
    } else {
        None
    };
    let mut reports = Vec::new();
    for &nodes in &args.nodes {
        let mut report = measure(&args, token.as_str(), nodes, &work_dir).await?;
        if let Some(etcd) = &etcd {
            report.failover = Some(failover(&args, token.as_str(), nodes, &work_dir, etcd).await?);
        }
        print_report(&report);
        reports.push(report);
    }
    drop(etcd);
    print_table(&args, &reports);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&reports)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if remove {
        let _ = std::fs::remove_dir_all(&work_dir);
    }
    Ok(())
}

fn fleet_config(args: &Args, nodes: usize, masters: Vec<String>, prefix: &str) -> FleetConfig {
    FleetConfig {
        nodes,
        masters,
        channels: nodes.div_ceil(args.nodes_per_channel.max(1)),
        beat: Duration::from_millis(args.beat_ms.max(1)),
        cpu_millicores: args.node_cpu,
        memory_mb: args.node_memory,
        id_prefix: prefix.to_string(),
    }
}

/// Waits until `count()` reaches `nodes`, printing progress every second.
async fn wait_registered(
    what: &str,
    nodes: usize,
    deadline: Duration,
    count: impl Fn() -> usize,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut last_print = start;
    loop {
        let registered = count();
        if registered >= nodes {
            return Ok(start.elapsed());
        }
        if start.elapsed() > deadline {
            bail!("{what}: only {registered} of {nodes} nodes registered within {deadline:?}");
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            eprintln!("  {what}: {registered}/{nodes} registered");
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Registration, idle and placement at one fleet size, on a fresh master.
async fn measure(
    args: &Args,
    token: &str,
    nodes: usize,
    work_dir: &std::path::Path,
) -> anyhow::Result<SizeReport> {
    eprintln!("== {nodes} simulated nodes");
    let node_timeout = Duration::from_secs_f64(args.node_timeout.max(0.1));
    let mut master = Master::start(
        &work_dir.join(format!("master-{nodes}")),
        token,
        node_timeout,
        &[],
    )
    .await?;
    let pid = master.pid().context("the master is not running")?;
    let fleet = Fleet::start(fleet_config(
        args,
        nodes,
        vec![master.address.clone()],
        "sim",
    ))?;
    let mut report = SizeReport {
        nodes,
        ..SizeReport::default()
    };
    let deadline = Duration::from_secs_f64(args.register_deadline);
    let elapsed = wait_registered("registration", nodes, deadline, || {
        fleet.stats.registered_nodes.load(Ordering::Relaxed)
    })
    .await?;
    report.register_seconds = elapsed.as_secs_f64();
    eprintln!(
        "  all {nodes} registered in {:.2} s",
        report.register_seconds
    );

    // Idle: heartbeats only, after a beat interval for every stream to be open.
    tokio::time::sleep(Duration::from_millis(args.beat_ms.max(500) * 2)).await;
    eprintln!("  idle for {:.0} s", args.idle_seconds);
    let beats_before = fleet.stats.beats.load(Ordering::Relaxed);
    let cpu_before = ProcSample::take(pid)?;
    let idle_start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.idle_seconds)).await;
    let cpu_after = ProcSample::take(pid)?;
    let beats = fleet.stats.beats.load(Ordering::Relaxed) - beats_before;
    report.heartbeats_per_second = beats as f64 / idle_start.elapsed().as_secs_f64();
    report.idle_cpu_percent = cpu_after.cpu_percent_since(&cpu_before);
    report.idle_rss_mb = process::rss_mb(pid)?;
    report.alive_after_idle = master.metric("yr_master_nodes", Some("\"alive\"")).await?;
    eprintln!(
        "  idle: master CPU {:.1}% of a core, RSS {:.1} MB, {:.0} beats/s, {} alive",
        report.idle_cpu_percent,
        report.idle_rss_mb,
        report.heartbeats_per_second,
        report.alive_after_idle
    );

    eprintln!(
        "  placing for {:.0} s ({} in flight)",
        args.place_seconds, args.concurrency
    );
    let config = PlacementConfig {
        concurrency: args.concurrency,
        duration: Duration::from_secs_f64(args.place_seconds),
        cpu_millicores: args.request_cpu,
        memory_mb: args.request_memory,
        lifetime: Duration::from_millis(args.lifetime_ms),
    };
    let cpu_before = ProcSample::take(pid)?;
    let result = placement::drive(&fleet, &config).await;
    let cpu_after = ProcSample::take(pid)?;
    report.placement_cpu_percent = cpu_after.cpu_percent_since(&cpu_before);
    report.placement_rss_mb = process::rss_mb(pid)?;
    report.placements = result.placed;
    report.placement_refusals = result.refused.values().sum();
    report.placement_rpc_errors = result.rpc_errors + result.unknown_targets;
    report.placements_per_second = result.rate();
    report.placement_p50_ms = result.quantile_ms(0.5);
    report.placement_p99_ms = result.quantile_ms(0.99);
    if !result.refused.is_empty() {
        eprintln!("  refusals by code: {:?}", result.refused);
    }
    eprintln!(
        "  placement: {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, master CPU {:.1}%",
        report.placements_per_second,
        report.placement_p50_ms,
        report.placement_p99_ms,
        report.placement_cpu_percent
    );

    // After the load, one node timeout more: a node whose beats the load delayed is lost now.
    tokio::time::sleep(node_timeout + Duration::from_secs(1)).await;
    report.nodes_lost = master.metric("yr_master_nodes_lost", None).await?;
    report.alive_at_end = master.metric("yr_master_nodes", Some("\"alive\"")).await?;
    report.reregister_commands = fleet.stats.reregister_commands.load(Ordering::Relaxed);
    report.incarnations_lost = fleet.stats.incarnations_lost.load(Ordering::Relaxed);
    fleet.shutdown();
    master.stop();
    Ok(report)
}

/// Failover at one fleet size: masters A (leading) and B (standing by) on `etcd`; every node
/// knows both. A is SIGKILLed once all nodes registered with it.
async fn failover(
    args: &Args,
    token: &str,
    nodes: usize,
    work_dir: &std::path::Path,
    etcd: &Etcd,
) -> anyhow::Result<FailoverReport> {
    eprintln!("  failover with {nodes} nodes");
    let node_timeout = Duration::from_secs_f64(args.node_timeout.max(0.1));
    let prefix = format!("/yr-sim-{nodes}-{}/", std::process::id());
    let etcd_args = vec![
        "--etcd".to_string(),
        etcd.endpoint.clone(),
        "--etcd-prefix".to_string(),
        prefix,
        "--leader-lease".to_string(),
        "2".to_string(),
    ];
    let dir = work_dir.join(format!("failover-{nodes}"));
    let mut first = Master::start(&dir.join("a"), token, node_timeout, &etcd_args).await?;
    let lead_deadline = Instant::now() + Duration::from_secs(30);
    while !first.leads().await {
        if Instant::now() > lead_deadline {
            bail!(
                "the first master did not lead within 30 s; see {}",
                first.log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = Master::start(&dir.join("b"), token, node_timeout, &etcd_args).await?;
    let fleet = Fleet::start(fleet_config(
        args,
        nodes,
        vec![first.address.clone(), second.address.clone()],
        "fo",
    ))?;
    let deadline = Duration::from_secs_f64(args.register_deadline);
    wait_registered("registration with the leader", nodes, deadline, || {
        fleet.stats.registered_nodes.load(Ordering::Relaxed)
    })
    .await?;
    // A few beats on every stream before the kill.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let lost_before = fleet.stats.incarnations_lost.load(Ordering::Relaxed);
    let killed = Instant::now();
    first.kill();
    let leads = loop {
        if second.leads().await {
            break killed.elapsed();
        }
        if killed.elapsed() > deadline {
            bail!(
                "the standby did not lead within {deadline:?}; see {}",
                second.log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!(
        "  standby leads {:.2} s after the SIGKILL",
        leads.as_secs_f64()
    );
    let all = wait_registered("registration with the new leader", nodes, deadline, || {
        fleet.registered_since(killed)
    })
    .await;
    let report = FailoverReport {
        standby_leads_seconds: leads.as_secs_f64(),
        all_registered_seconds: match &all {
            Ok(_) => killed.elapsed().as_secs_f64(),
            Err(_) => f64::NAN,
        },
        registered: fleet.registered_since(killed),
        nodes_lost: 0.0,
        incarnations_lost: fleet.stats.incarnations_lost.load(Ordering::Relaxed) - lost_before,
    };
    let all_seconds = match all {
        Ok(_) => killed.elapsed(),
        Err(error) => {
            eprintln!("  {error}");
            killed.elapsed()
        }
    };
    // Then one node timeout more, for any late loss to show.
    tokio::time::sleep(node_timeout + Duration::from_secs(1)).await;
    let nodes_lost = second
        .metric("yr_master_nodes_lost", None)
        .await
        .unwrap_or(f64::NAN);
    eprintln!(
        "  every node registered with the new leader {:.2} s after the SIGKILL; {} lost",
        all_seconds.as_secs_f64(),
        nodes_lost
    );
    fleet.shutdown();
    let mut second = second;
    second.stop();
    Ok(FailoverReport {
        nodes_lost,
        ..report
    })
}

fn print_report(report: &SizeReport) {
    eprintln!(
        "  {} nodes: {} lost, {} alive at the end, {} reregister commands, {} incarnations refused",
        report.nodes,
        report.nodes_lost,
        report.alive_at_end,
        report.reregister_commands,
        report.incarnations_lost
    );
}

fn print_table(args: &Args, reports: &[SizeReport]) {
    println!(
        "beat {} ms, node timeout {} s, {} placements in flight, {} ms instance lifetime",
        args.beat_ms, args.node_timeout, args.concurrency, args.lifetime_ms
    );
    println!(
        "| nodes | register (s) | idle CPU (% core) | idle RSS (MB) | heartbeats/s | lost | placements/s | p50 (ms) | p99 (ms) | placing CPU (% core) | placing RSS (MB) | standby leads (s) | all re-registered (s) | lost after failover |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in reports {
        let (leads, all, lost) = match &r.failover {
            Some(f) => (
                format!("{:.2}", f.standby_leads_seconds),
                format!("{:.2}", f.all_registered_seconds),
                format!("{}", f.nodes_lost),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "| {} | {:.2} | {:.1} | {:.1} | {:.0} | {} | {:.0} | {:.2} | {:.2} | {:.1} | {:.1} | {leads} | {all} | {lost} |",
            r.nodes,
            r.register_seconds,
            r.idle_cpu_percent,
            r.idle_rss_mb,
            r.heartbeats_per_second,
            r.nodes_lost,
            r.placements_per_second,
            r.placement_p50_ms,
            r.placement_p99_ms,
            r.placement_cpu_percent,
            r.placement_rss_mb,
        );
    }
}
