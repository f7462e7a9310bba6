//! `yr-bench`: yr's microbenchmarks, with the case names of Ray's `ray microbenchmark` so the
//! figures can be put side by side. Each case prints `<case name> per second <N> +- <sd>`.
//!
//! ```text
//! cargo run --release -p yr-bench -- --local            # every case, local mode
//! cargo run --release -p yr-bench -- --local --case actor   # cases whose name contains "actor"
//! cargo build --release -p yr-cli -p yr-bench && target/release/yr-bench   # against a cluster
//! ```
//!
//! `1:1 stream elements (1 KiB)` (with its MB/s) measures streams: one producer, one consumer.
//!
//! Against a cluster (no `--local`), three measures beyond Ray's cases are printed:
//! - `instance creation from the warm pool`: the latency from `yr::instance(..).invoke()` to the
//!   result of the instance's first method call, on the cluster the driver uses (whose warm
//!   pool is refilled between samples), with a plain call round trip alongside;
//! - `instance creation, cold`: the same latency on a cluster this program starts with
//!   `yr start --master --warm-pool 0`, so each instance waits for a new runtime process;
//! - `idle node process RSS`: VmRSS of the session's `yr node` process;
//! - `instance creation burst of N`: creates per second when N instances are created at once
//!   and each is then called once, all N alive at the end, on a cluster this program starts with
//!   room for them (`--cpu 1000000 --memory 2000000`); the rate per create of a burst of 3,000
//!   should be that of a burst of 1,000 (nothing on the create path grows with live instances);
//! - `cross-node get gigabytes`: on a two-node cluster this program starts, GB/s of 256 MiB
//!   objects that node 1 holds and a driver on node 0 gets (pulled in chunks, then read in
//!   place), with `loopback TCP gigabytes` (the same bytes over a plain loopback TCP socket)
//!   measured right after as the limit; and `cross-node 1:1 actor calls with a 16 MiB result
//!   gigabytes`, an instance on node 1 returning 16 MiB results to the driver on node 0, read
//!   in place with `get_buffer`;
//! - the cross-host cases (`cross_host`): on two hosts made of network namespaces,
//!   `cross-host get gigabytes` beside `raw TCP stream gigabytes between hosts`, and
//!   `cross-host 1:1 actor call round trip` beside `raw TCP ping-pong round trip between hosts`,
//!   with their ratios. They need root and `ip netns`, and are skipped with a message without.

mod cross_host;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_bytes::ByteBuf;
use yr::{InstanceHandle, ObjectRef, FOREVER};
use yr_common::session::{latest_session, sessions_root, SessionInfo};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "yr microbenchmarks (the cases of Ray's `ray microbenchmark`)"
)]
struct Args {
    /// Run in local mode (everything in this process) instead of against a cluster.
    #[arg(long)]
    local: bool,
    /// Only run cases whose name contains this text.
    #[arg(long)]
    case: Option<String>,
    /// Seconds to measure each case, per trial.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Trials per case; the figure is their mean and standard deviation.
    #[arg(long, default_value_t = 3)]
    trials: usize,
    /// Clients and instances for the multi-client and n:n cases.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Trials of the `put gigabytes` cases (100 MiB per put); 0 skips them.
    #[arg(long, default_value_t = 3)]
    gigabyte_trials: usize,
    /// Samples of each instance-creation measure (cluster only).
    #[arg(long, default_value_t = 40)]
    create_samples: usize,
    /// Milliseconds to wait between warm-pool samples, so the node refills its warm pool.
    #[arg(long, default_value_t = 500)]
    refill_ms: u64,
    /// Skip the cold-creation measure (it starts a second cluster with `--warm-pool 0`).
    #[arg(long)]
    no_cold: bool,
    /// Burst sizes of `instance creation burst` (each on a fresh cluster); `--burst-sizes ""`
    /// skips it.
    #[arg(long, default_value = "1000,3000", value_parser = burst_sizes)]
    burst_sizes: BurstSizes,
    /// Round trips sampled by each cross-host round-trip case.
    #[arg(long, default_value_t = 5000)]
    rtt_samples: usize,
    /// Run the yr side of the cross-host cases (started by yr-bench itself in host 0).
    #[arg(long, hide = true)]
    host_driver: bool,
}

#[yr::invoke]
fn noop() {}

#[yr::invoke]
fn small_value() -> u8 {
    0
}

#[yr::instance]
struct Actor {
    calls: u64,
}

#[yr::instance]
impl Actor {
    fn new() -> Self {
        Actor { calls: 0 }
    }

    fn ping(&mut self) {
        self.calls += 1;
    }

    fn ping_arg(&mut self, value: u64) -> u64 {
        self.calls += value;
        self.calls
    }

    fn peek(&self) -> u64 {
        self.calls
    }

    fn length(&mut self, bytes: ByteBuf) -> u64 {
        bytes.len() as u64
    }

    fn make(&mut self, len: usize) -> ByteBuf {
        ByteBuf::from(vec![1u8; len])
    }
}

/// Makes large objects on its node, for the cross-node transfer measure.
#[yr::instance]
struct Far {
    value: ByteBuf,
    kept: Vec<ObjectRef<ByteBuf>>,
}

#[yr::instance]
impl Far {
    fn new(len: u64) -> Self {
        Far {
            value: ByteBuf::from(vec![7u8; len as usize]),
            kept: Vec::new(),
        }
    }

    /// A new object (a copy of this instance's value) on this node, and the seconds its put
    /// took.
    fn make(&mut self) -> yr::Result<(ObjectRef<ByteBuf>, f64)> {
        let value = self.value.clone();
        let start = Instant::now();
        let object = yr::put(value)?;
        let seconds = start.elapsed().as_secs_f64();
        self.kept.clear();
        self.kept.push(object.clone());
        Ok((object, seconds))
    }

    /// A new value of `len` bytes, returned as the call's result.
    fn result(&mut self, len: u64) -> ByteBuf {
        ByteBuf::from(vec![7u8; len as usize])
    }
}

/// Runs `step` (which performs `ops_per_step` operations) repeatedly for the trial length,
/// several trials, and prints the rate.
fn timeit(
    args: &Args,
    name: &str,
    ops_per_step: f64,
    step: impl FnMut() -> yr::Result<()>,
) -> anyhow::Result<()> {
    timeit_trials(args, args.trials, name, ops_per_step, step)
}

/// [`timeit`] with its own number of trials.
fn timeit_trials(
    args: &Args,
    trials: usize,
    name: &str,
    ops_per_step: f64,
    mut step: impl FnMut() -> yr::Result<()>,
) -> anyhow::Result<()> {
    if !selected(args, name) || trials == 0 {
        return Ok(());
    }
    step()?; // warm up
    let mut rates = Vec::with_capacity(trials);
    for _ in 0..trials {
        let start = Instant::now();
        let mut steps = 0u64;
        while start.elapsed().as_secs_f64() < args.seconds {
            step()?;
            steps += 1;
        }
        rates.push(steps as f64 * ops_per_step / start.elapsed().as_secs_f64());
    }
    let mean = rates.iter().sum::<f64>() / rates.len() as f64;
    let variance = rates.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / rates.len() as f64;
    println!("{name} per second {mean:.2} +- {:.2}", variance.sqrt());
    Ok(())
}

fn selected(args: &Args, name: &str) -> bool {
    args.case
        .as_ref()
        .is_none_or(|filter| name.contains(filter.as_str()))
}

fn in_threads(clients: usize, work: impl Fn() -> yr::Result<()> + Sync) -> yr::Result<()> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients).map(|_| scope.spawn(&work)).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(yr::Error::new(
                        yr::ErrorCode::InnerSystemError,
                        "a benchmark client thread panicked",
                    ))
                })
            })
            .collect::<yr::Result<Vec<()>>>()
    })?;
    Ok(())
}

/// The smallest CPU request (300 millicores), so that the actors fit on a 2-core node beside
/// the stateless pool (Ray's benchmark actors ask for no CPU).
fn small_instance() -> yr::InvokeOptions {
    yr::InvokeOptions {
        cpu: 300,
        ..Default::default()
    }
}

fn actors(n: usize) -> yr::Result<Vec<InstanceHandle<Actor>>> {
    let actors: Vec<_> = (0..n)
        .map(|_| {
            yr::instance(Actor::new)
                .options(small_instance())
                .invoke(())
        })
        .collect::<yr::Result<_>>()?;
    for actor in &actors {
        actor.method(Actor::peek).invoke(())?.get(FOREVER)?;
    }
    Ok(actors)
}

/// `1:1 stream`: one producer thread sends 1 KiB elements as fast as the stream takes them
/// (default `ProducerConfig`: 5 ms flush delay, 1 MiB pages, 100 MiB stream); one consumer
/// receives whatever is ready and acks each batch. Prints elements/s and MB/s.
fn stream_throughput(args: &Args) -> anyhow::Result<()> {
    const ELEMENT: usize = 1024;
    let name = "1:1 stream elements (1 KiB)";
    if !selected(args, name) || args.trials == 0 {
        return Ok(());
    }
    let mut rates = Vec::with_capacity(args.trials);
    for trial in 0..args.trials {
        let stream = format!("yr-bench-stream-{}-{trial}", std::process::id());
        let subscription = yr::SubscriptionConfig::new("bench", yr::SubscriptionType::Stream);
        let consumer = yr::create_stream_consumer(&stream, subscription)?;
        let producer = yr::create_stream_producer(&stream, yr::ProducerConfig::default())?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sender = {
            let stop = stop.clone();
            std::thread::spawn(move || -> yr::Result<u64> {
                let element = vec![7u8; ELEMENT];
                let mut sent = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    producer.send(&element, FOREVER)?;
                    sent += 1;
                }
                producer.close()?;
                Ok(sent)
            })
        };
        let start = Instant::now();
        let mut received = 0u64;
        while start.elapsed().as_secs_f64() < args.seconds {
            let elements = consumer.receive(Duration::from_millis(100), 0)?;
            if let Some(last) = elements.last() {
                received += elements.len() as u64;
                consumer.ack(last.id)?;
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Drain, so the producer's close finds room.
        let drain = std::thread::spawn(move || {
            while let Ok(elements) = consumer.receive(Duration::from_millis(200), 0) {
                match elements.last() {
                    Some(last) => {
                        let _ = consumer.ack(last.id);
                    }
                    None => break,
                }
            }
            consumer.close()
        });
        sender
            .join()
            .map_err(|_| anyhow::anyhow!("the stream producer thread panicked"))??;
        drain
            .join()
            .map_err(|_| anyhow::anyhow!("the stream consumer thread panicked"))??;
        yr::delete_stream(&stream)?;
        rates.push(received as f64 / elapsed);
    }
    let mean = rates.iter().sum::<f64>() / rates.len() as f64;
    let sd = (rates.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / rates.len() as f64).sqrt();
    println!("{name} per second {mean:.2} +- {sd:.2}");
    let mb = ELEMENT as f64 / 1e6;
    println!(
        "1:1 stream megabytes (1 KiB elements) per second {:.2} +- {:.2}",
        mean * mb,
        sd * mb
    );
    Ok(())
}

fn run(args: &Args) -> anyhow::Result<()> {
    const BATCH: usize = 1000;
    let n = args.clients;
    stream_throughput(args)?;

    timeit(args, "single client get calls (Plasma Store)", 1.0, {
        let value = yr::put(0u64)?;
        move || yr::get(&value, FOREVER).map(drop)
    })?;
    timeit(args, "single client put calls (Plasma Store)", 1.0, || {
        yr::put(0u64).map(drop)
    })?;
    timeit(
        args,
        "multi client put calls (Plasma Store)",
        (n * BATCH) as f64,
        || {
            in_threads(n, || {
                for _ in 0..BATCH {
                    yr::put(0u64)?;
                }
                Ok(())
            })
        },
    )?;
    const CHUNK: usize = 100 << 20;
    let chunk = if args.gigabyte_trials > 0
        && (selected(args, "single client put gigabytes")
            || selected(args, "multi client put gigabytes"))
    {
        ByteBuf::from(vec![1u8; CHUNK])
    } else {
        ByteBuf::new()
    };
    let gigabytes = CHUNK as f64 / 1e9;
    timeit_trials(
        args,
        args.gigabyte_trials,
        "single client put gigabytes",
        gigabytes,
        || yr::put(&chunk).map(drop),
    )?;
    timeit_trials(
        args,
        args.gigabyte_trials,
        "multi client put gigabytes",
        n as f64 * gigabytes,
        || in_threads(n, || yr::put(&chunk).map(drop)),
    )?;
    // The limit for put bandwidth: copying the same bytes once in this process.
    let mut copy = if args.gigabyte_trials > 0 && selected(args, "memcpy gigabytes") {
        vec![0u8; CHUNK]
    } else {
        Vec::new()
    };
    timeit_trials(
        args,
        args.gigabyte_trials,
        "memcpy gigabytes",
        gigabytes,
        || {
            copy.copy_from_slice(&chunk);
            std::hint::black_box(&copy);
            Ok(())
        },
    )?;
    drop(copy);
    // Zero-copy reads: the same cost for 1 MB and 1 GB.
    for (name, size) in [
        ("single client get buffer 1 MB", 1usize << 20),
        ("single client get buffer 1 GB", 1 << 30),
    ] {
        if args.gigabyte_trials == 0 || !selected(args, name) {
            continue;
        }
        let object = yr::put(ByteBuf::from(vec![1u8; size]))?;
        timeit(args, name, 1.0, || {
            let buffer = yr::get_buffer(&object, FOREVER)?;
            std::hint::black_box(buffer.bytes().map(|b| b.len()));
            Ok(())
        })?;
    }
    drop(chunk);
    timeit(args, "single client get object containing 10k refs", 1.0, {
        let refs: Vec<ObjectRef<u8>> = (0..10_000)
            .map(|_| yr::put(0u8))
            .collect::<yr::Result<_>>()?;
        let container = yr::put(refs)?;
        move || yr::get(&container, FOREVER).map(drop)
    })?;
    timeit(args, "single client wait 1k refs", 1.0, || {
        let refs: Vec<ObjectRef<()>> = (0..1000)
            .map(|_| yr::function(noop).invoke(()))
            .collect::<yr::Result<_>>()?;
        yr::wait(&refs, refs.len(), FOREVER).map(drop)
    })?;
    timeit(args, "single client tasks and get batch", 1.0, || {
        let refs: Vec<ObjectRef<u8>> = (0..BATCH)
            .map(|_| yr::function(small_value).invoke(()))
            .collect::<yr::Result<_>>()?;
        yr::get_all(&refs, FOREVER).map(drop)
    })?;
    timeit(args, "single client tasks sync", 1.0, || {
        yr::function(noop).invoke(())?.get(FOREVER)
    })?;
    timeit(args, "single client tasks async", BATCH as f64, || {
        let refs: Vec<ObjectRef<()>> = (0..BATCH)
            .map(|_| yr::function(noop).invoke(()))
            .collect::<yr::Result<_>>()?;
        yr::get_all(&refs, FOREVER).map(drop)
    })?;
    timeit(args, "multi client tasks async", (n * BATCH) as f64, || {
        in_threads(n, || {
            let refs: Vec<ObjectRef<()>> = (0..BATCH)
                .map(|_| yr::function(noop).invoke(()))
                .collect::<yr::Result<_>>()?;
            yr::get_all(&refs, FOREVER).map(drop)
        })
    })?;

    const ACTOR_CASES: [&str; 7] = [
        "1:1 actor calls sync",
        "1:1 actor calls async",
        "1:n actor calls async",
        "n:n actor calls async",
        "n:n actor calls with arg async",
        "1:1 actor calls with a 16 MiB argument gigabytes",
        "1:1 actor calls with a 16 MiB result gigabytes",
    ];
    if !ACTOR_CASES.iter().any(|case| selected(args, case)) {
        return Ok(());
    }
    let one = actors(1)?;
    timeit(args, "1:1 actor calls sync", 1.0, || {
        one[0].method(Actor::ping).invoke(())?.get(FOREVER)
    })?;
    timeit(args, "1:1 actor calls async", BATCH as f64, || {
        let refs: Vec<ObjectRef<()>> = (0..BATCH)
            .map(|_| one[0].method(Actor::ping).invoke(()))
            .collect::<yr::Result<_>>()?;
        yr::get_all(&refs, FOREVER).map(drop)
    })?;
    // Large values: an argument passed directly (the actor decodes it: one copy), and a
    // result read in place with `get_buffer`. Compare with "memcpy gigabytes".
    const LARGE: usize = 16 << 20;
    let large = if selected(args, "1:1 actor calls with a 16 MiB argument gigabytes") {
        ByteBuf::from(vec![1u8; LARGE])
    } else {
        ByteBuf::new()
    };
    timeit(
        args,
        "1:1 actor calls with a 16 MiB argument gigabytes",
        LARGE as f64 / 1e9,
        || {
            one[0]
                .method(Actor::length)
                .invoke((&large,))?
                .get(FOREVER)
                .map(drop)
        },
    )?;
    drop(large);
    timeit(
        args,
        "1:1 actor calls with a 16 MiB result gigabytes",
        LARGE as f64 / 1e9,
        || {
            let made = one[0].method(Actor::make).invoke((LARGE,))?;
            let buffer = yr::get_buffer(&made, FOREVER)?;
            std::hint::black_box(buffer.bytes().map(|b| b.len()));
            Ok(())
        },
    )?;
    let many = actors(n)?;
    timeit(args, "1:n actor calls async", (n * BATCH) as f64, || {
        let refs: Vec<ObjectRef<()>> = (0..n * BATCH)
            .map(|i| many[i % n].method(Actor::ping).invoke(()))
            .collect::<yr::Result<_>>()?;
        yr::get_all(&refs, FOREVER).map(drop)
    })?;
    timeit(args, "n:n actor calls async", (n * BATCH) as f64, || {
        in_threads(n, || {
            let refs: Vec<ObjectRef<()>> = (0..BATCH)
                .map(|i| many[i % n].method(Actor::ping).invoke(()))
                .collect::<yr::Result<_>>()?;
            yr::get_all(&refs, FOREVER).map(drop)
        })
    })?;
    timeit(
        args,
        "n:n actor calls with arg async",
        (n * BATCH) as f64,
        || {
            in_threads(n, || {
                let refs: Vec<ObjectRef<u64>> = (0..BATCH)
                    .map(|i| many[i % n].method(Actor::ping_arg).invoke((1u64,)))
                    .collect::<yr::Result<_>>()?;
                yr::get_all(&refs, FOREVER).map(drop)
            })
        },
    )?;
    for actor in one.iter().chain(&many) {
        actor.terminate()?;
    }
    Ok(())
}

// ----- cluster-only measures ----------------------------------------------------------------

/// The `p`-quantile (0..=1) of `sorted`, nearest rank.
fn quantile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Latencies in milliseconds of `samples` instance creations, each measured from
/// `yr::instance(..).invoke()` to the result of the instance's first method call; and of a
/// second call on the same instance (one call round trip). `pause` comes before each sample.
fn creation_latencies(samples: usize, pause: Duration) -> yr::Result<(Vec<f64>, Vec<f64>)> {
    let mut creations = Vec::with_capacity(samples);
    let mut calls = Vec::with_capacity(samples);
    for _ in 0..samples {
        std::thread::sleep(pause);
        let start = Instant::now();
        let actor = yr::instance(Actor::new)
            .options(small_instance())
            .invoke(())?;
        actor.method(Actor::peek).invoke(())?.get(FOREVER)?;
        creations.push(start.elapsed().as_secs_f64() * 1e3);
        let start = Instant::now();
        actor.method(Actor::peek).invoke(())?.get(FOREVER)?;
        calls.push(start.elapsed().as_secs_f64() * 1e3);
        actor.terminate_sync()?;
    }
    creations.sort_by(f64::total_cmp);
    calls.sort_by(f64::total_cmp);
    Ok((creations, calls))
}

fn print_creation(name: &str, creations: &[f64], calls: &[f64]) {
    println!(
        "{name} p50 ms {:.2} p99 ms {:.2} (create to first method result, {} samples; \
         a call round trip alone: p50 ms {:.3})",
        quantile(creations, 0.5),
        quantile(creations, 0.99),
        creations.len(),
        quantile(calls, 0.5),
    );
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn node_alive(session: &SessionInfo) -> bool {
    session
        .processes
        .iter()
        .any(|(role, pid)| role == "node" && process_alive(*pid))
}

/// The session of the cluster this driver uses: the one whose bus address is
/// `YR_SERVER_ADDRESS`, else the latest one on this machine if it runs, else the temporary one
/// `yr::init` started for this process.
fn current_session() -> Option<SessionInfo> {
    let root = sessions_root().ok()?;
    let mut candidates: Vec<PathBuf> = vec![root.join("latest")];
    let prefix = format!("yr-temporary-{}-", std::process::id());
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        candidates.extend(
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .map(|e| e.path()),
        );
    }
    if let Ok(address) = std::env::var("YR_SERVER_ADDRESS") {
        if let Ok(entries) = std::fs::read_dir(&root) {
            candidates.extend(entries.flatten().map(|e| e.path()));
        }
        return candidates
            .iter()
            .filter_map(|dir| SessionInfo::read(dir).ok())
            .find(|s| s.bus_address == address);
    }
    if let Some(latest) = latest_session().filter(node_alive) {
        return Some(latest);
    }
    candidates
        .iter()
        .skip(1)
        .filter_map(|dir| SessionInfo::read(dir).ok())
        .find(node_alive)
}

/// VmRSS of `pid` in MB (10^6 bytes).
fn rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024.0 / 1e6)
}

fn print_rss(label: &str, session: Option<&SessionInfo>) {
    let Some(session) = session else {
        println!("{label} MB unknown (the cluster's session was not found)");
        return;
    };
    for (role, pid) in &session.processes {
        let name = if role == "node" {
            label.to_string()
        } else {
            label.replace("node", role)
        };
        match rss_mb(*pid) {
            Some(mb) => println!("{name} MB {mb:.1} (pid {pid})"),
            None => println!("{name} MB unknown (pid {pid} not readable)"),
        }
    }
}

/// `instance creation, cold`: on a cluster started here with `--warm-pool 0`, so that every
/// instance waits for a new runtime process.
fn cold_creation(args: &Args, config: &yr::Config) -> anyhow::Result<()> {
    let name = "instance creation, cold";
    if !selected(args, name) || args.no_cold {
        return Ok(());
    }
    let yr_bin = yr_binary(name)?;
    let dir = std::env::temp_dir().join(format!("yr-bench-cold-{}", std::process::id()));
    let status = std::process::Command::new(&yr_bin)
        .args([
            "start",
            "--master",
            "--temporary",
            "--warm-pool",
            "0",
            "--session-dir",
        ])
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "{name}: `yr start --warm-pool 0` failed");
    let result = (|| -> anyhow::Result<()> {
        let session = SessionInfo::read(&dir)?;
        let mut cold = config.clone();
        cold.server_address = Some(session.bus_address.clone());
        yr::init(cold)?;
        let measured = creation_latencies(args.create_samples, Duration::from_millis(100));
        yr::finalize()?;
        let (creations, calls) = measured?;
        print_creation(
            &format!("{name} (yr start --warm-pool 0)"),
            &creations,
            &calls,
        );
        Ok(())
    })();
    let _ = std::process::Command::new(&yr_bin)
        .args(["stop", "--session-dir"])
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .status();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Sizes of `--burst-sizes`: a comma-separated list, possibly empty.
#[derive(Clone, Debug)]
struct BurstSizes(Vec<usize>);

fn burst_sizes(text: &str) -> Result<BurstSizes, String> {
    text.split(',')
        .map(str::trim)
        .filter(|size| !size.is_empty())
        .map(|size| {
            size.parse::<usize>()
                .map_err(|_| format!("{size:?} is not a number of instances"))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(BurstSizes)
}

/// `instance creation burst of N`: on a cluster started here with room for every instance, N
/// creates in one burst, then one call on each; creates per second from the first create to the
/// last call's result. Each burst size runs on a fresh cluster.
fn creation_burst(args: &Args, config: &yr::Config) -> anyhow::Result<()> {
    let name = "instance creation burst";
    if !selected(args, name) {
        return Ok(());
    }
    let yr_bin = yr_binary(name)?;
    for &size in &args.burst_sizes.0 {
        let dir = std::env::temp_dir().join(format!("yr-bench-burst-{}", std::process::id()));
        let status = std::process::Command::new(&yr_bin)
            .args([
                "start",
                "--master",
                "--temporary",
                "--cpu",
                "1000000",
                "--memory",
                "2000000",
                "--session-dir",
            ])
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "{name}: `yr start` failed");
        let result = (|| -> anyhow::Result<f64> {
            let session = SessionInfo::read(&dir)?;
            let mut burst = config.clone();
            burst.server_address = Some(session.bus_address.clone());
            yr::init(burst)?;
            let measured = (|| -> yr::Result<f64> {
                let start = Instant::now();
                let actors = (0..size)
                    .map(|_| {
                        yr::instance(Actor::new)
                            .options(small_instance())
                            .invoke(())
                    })
                    .collect::<yr::Result<Vec<_>>>()?;
                let calls = actors
                    .iter()
                    .map(|actor| actor.method(Actor::peek).invoke(()))
                    .collect::<yr::Result<Vec<_>>>()?;
                for call in &calls {
                    call.get(FOREVER)?;
                }
                Ok(size as f64 / start.elapsed().as_secs_f64())
            })();
            yr::finalize()?;
            Ok(measured?)
        })();
        let _ = std::process::Command::new(&yr_bin)
            .args(["stop", "--session-dir"])
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&dir);
        println!("{name} of {size} per second {:.1}", result?);
    }
    Ok(())
}

/// The `yr` binary next to this one, or `$YR_BIN`.
fn yr_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    std::env::var_os("YR_BIN")
        .map(PathBuf::from)
        .or_else(|| exe.parent().map(|d| d.join("yr")))
        .filter(|p| p.is_file())
        .ok_or_else(|| {
            anyhow::anyhow!("{name}: the `yr` binary is not next to yr-bench; set YR_BIN")
        })
}

/// `cross-node get gigabytes`: on a two-node cluster started here (two node processes on this
/// machine, talking TCP over loopback), a driver on node 0 gets 256 MiB objects that an
/// instance on node 1 puts; each is pulled in chunks into node 0's shared memory and read in
/// place. Beside it, the same bytes over a plain loopback TCP connection.
fn cross_node(args: &Args, config: &yr::Config) -> anyhow::Result<()> {
    let name = "cross-node get gigabytes";
    if !selected(args, name) || args.gigabyte_trials == 0 {
        return Ok(());
    }
    const SIZE: usize = 256 << 20;
    let yr_bin = yr_binary(name)?;
    let root = std::env::temp_dir().join(format!("yr-bench-two-{}", std::process::id()));
    let dirs = [root.join("node0"), root.join("node1")];
    let start = |extra: &[&str], dir: &Path| -> anyhow::Result<()> {
        let status = std::process::Command::new(&yr_bin)
            .arg("start")
            .args(extra)
            .args([
                "--temporary",
                "--warm-pool",
                "1",
                "--shared-memory-mb",
                "2048",
            ])
            .arg("--session-dir")
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .status()?;
        anyhow::ensure!(
            status.success(),
            "{name}: `yr start {}` failed",
            extra.join(" ")
        );
        Ok(())
    };
    let result = (|| -> anyhow::Result<()> {
        start(&["--master", "--cpu", "1000"], &dirs[0])?;
        let first = SessionInfo::read(&dirs[0])?;
        // The second node joins with the first one's cluster token.
        let token_file = dirs[0].join(yr_common::auth::TOKEN_FILE);
        let token_file = token_file.display().to_string();
        start(
            &[
                "--master-address",
                &first.master_address,
                "--cpu",
                "4000",
                "--token-file",
                &token_file,
            ],
            &dirs[1],
        )?;
        let mut two = config.clone();
        two.server_address = Some(first.bus_address.clone());
        yr::init(two)?;
        // Too big for node 0 (1000 millicores): it runs on node 1.
        let options = yr::InvokeOptions {
            cpu: 2_000,
            ..Default::default()
        };
        let measured = (|| -> yr::Result<(Vec<f64>, Vec<f64>)> {
            let rates = far_get_rates(options.clone(), SIZE, args.gigabyte_trials)?;
            // Results of 16 MiB from node 1, read here in place with `get_buffer`.
            const RESULT: usize = 16 << 20;
            let far = yr::instance(Far::new).options(options).invoke((0u64,))?;
            let mut results = Vec::new();
            for _ in 0..=args.gigabyte_trials {
                let started = Instant::now();
                let mut calls = 0;
                while started.elapsed().as_secs_f64() < args.seconds {
                    let made = far.method(Far::result).invoke((RESULT as u64,))?;
                    let buffer = yr::get_buffer(&made, FOREVER)?;
                    std::hint::black_box(buffer.bytes().map(|b| b.len()));
                    calls += 1;
                }
                results.push((calls * RESULT) as f64 / started.elapsed().as_secs_f64() / 1e9);
            }
            results.remove(0); // warm-up
            far.terminate()?;
            Ok((rates, results))
        })();
        yr::finalize()?;
        let (measured, results) = measured?;
        print_rates(name, &measured);
        print_rates(
            "cross-node 1:1 actor calls with a 16 MiB result gigabytes",
            &results,
        );
        print_rates(
            "loopback TCP gigabytes",
            &loopback_tcp(SIZE, args.gigabyte_trials)?,
        );
        Ok(())
    })();
    for dir in dirs.iter().rev() {
        let _ = std::process::Command::new(&yr_bin)
            .args(["stop", "--session-dir"])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .status();
    }
    let _ = std::fs::remove_dir_all(&root);
    result
}

/// GB/s of `trials` gets of `size`-byte objects that a [`Far`] instance placed by `options`
/// puts (after one warm-up get); each is pulled to this driver's node and read in place. The
/// instance is terminated at the end.
fn far_get_rates(options: yr::InvokeOptions, size: usize, trials: usize) -> yr::Result<Vec<f64>> {
    let far = yr::instance(Far::new)
        .options(options)
        .invoke((size as u64,))?;
    let mut rates = Vec::with_capacity(trials + 1);
    for _ in 0..=trials {
        let (object, _put_seconds) = yr::get(&far.method(Far::make).invoke(())?, FOREVER)?;
        // The pull starts as the reference arrives, a few microseconds before this.
        let started = Instant::now();
        let buffer = yr::get_buffer(&object, FOREVER)?;
        std::hint::black_box(buffer.bytes().map(|b| b.len()));
        rates.push(size as f64 / started.elapsed().as_secs_f64() / 1e9);
    }
    rates.remove(0); // warm-up
    far.terminate()?;
    Ok(rates)
}

/// GB/s of `size` bytes sent over a loopback TCP connection in 4 MiB writes, `trials` times.
fn loopback_tcp(size: usize, trials: usize) -> anyhow::Result<Vec<f64>> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut stream, _) = listener.accept()?;
        let mut buffer = vec![0u8; 4 << 20];
        while stream.read(&mut buffer)? > 0 {}
        Ok(())
    });
    let mut stream = std::net::TcpStream::connect(address)?;
    stream.set_nodelay(true)?;
    let chunk = vec![7u8; 4 << 20];
    let mut rates = Vec::new();
    for _ in 0..trials {
        let started = Instant::now();
        let mut sent = 0;
        while sent < size {
            stream.write_all(&chunk)?;
            sent += chunk.len();
        }
        // A 1-byte round trip would need a protocol; the receiver's window bounds the error.
        rates.push(size as f64 / started.elapsed().as_secs_f64() / 1e9);
    }
    drop(stream);
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("the loopback reader panicked"))??;
    Ok(rates)
}

fn print_rates(name: &str, rates: &[f64]) {
    let mean = rates.iter().sum::<f64>() / rates.len().max(1) as f64;
    let variance =
        rates.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / rates.len().max(1) as f64;
    println!("{name} per second {mean:.2} +- {:.2}", variance.sqrt());
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.host_driver {
        return cross_host::driver(&args);
    }
    let mut config = yr::Config::default();
    config.local_mode = args.local || config.local_mode;
    if !config.local_mode {
        eprintln!("yr-bench: running against a cluster; pass --local for local mode");
    }
    yr::init(config.clone())?;
    let cluster = !config.local_mode;
    let session = if cluster { current_session() } else { None };
    if cluster && selected(&args, "idle node process RSS") {
        // Let the warm pool start, so the node is idle.
        std::thread::sleep(Duration::from_secs(2));
        print_rss("idle node process RSS", session.as_ref());
    }
    let mut result = run(&args);
    if cluster && result.is_ok() {
        let name = "instance creation from the warm pool";
        if selected(&args, name) {
            result = creation_latencies(args.create_samples, Duration::from_millis(args.refill_ms))
                .map(|(creations, calls)| print_creation(name, &creations, &calls))
                .map_err(Into::into);
        }
    }
    if cluster && selected(&args, "node process RSS after the run") {
        std::thread::sleep(Duration::from_secs(1));
        print_rss("node process RSS after the run", session.as_ref());
    }
    yr::finalize()?;
    result?;
    if cluster {
        cold_creation(&args, &config)?;
        creation_burst(&args, &config)?;
        cross_node(&args, &config)?;
        // Last: it catches SIGINT and SIGTERM for the rest of the run.
        cross_host::run(&args)?;
    }
    Ok(())
}
