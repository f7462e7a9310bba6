//! `yr-bench`: yr's microbenchmarks, with the case names of Ray's `ray microbenchmark` so the
//! figures can be put side by side. Each case prints `<case name> per second <N> +- <sd>`.
//!
//! ```text
//! cargo run --release -p yr-bench -- --local            # every case, local mode
//! cargo run --release -p yr-bench -- --local --case actor   # cases whose name contains "actor"
//! ```

use std::time::Instant;

use clap::Parser;
use serde_bytes::ByteBuf;
use yr::{InstanceHandle, ObjectRef, FOREVER};

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
}

/// Runs `step` (which performs `ops_per_step` operations) repeatedly for the trial length,
/// several trials, and prints the rate.
fn timeit(
    args: &Args,
    name: &str,
    ops_per_step: f64,
    mut step: impl FnMut() -> yr::Result<()>,
) -> anyhow::Result<()> {
    if let Some(filter) = &args.case {
        if !name.contains(filter.as_str()) {
            return Ok(());
        }
    }
    step()?; // warm up
    let mut rates = Vec::with_capacity(args.trials);
    for _ in 0..args.trials {
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

fn in_threads(clients: usize, work: impl Fn() -> yr::Result<()> + Sync) -> yr::Result<()> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients).map(|_| scope.spawn(&work)).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Ok(())))
            .collect::<yr::Result<Vec<()>>>()
    })?;
    Ok(())
}

fn actors(n: usize) -> yr::Result<Vec<InstanceHandle<Actor>>> {
    let actors: Vec<_> = (0..n)
        .map(|_| yr::instance(Actor::new).invoke(()))
        .collect::<yr::Result<_>>()?;
    for actor in &actors {
        actor.method(Actor::peek).invoke(())?.get(FOREVER)?;
    }
    Ok(actors)
}

fn run(args: &Args) -> anyhow::Result<()> {
    const BATCH: usize = 1000;
    let n = args.clients;

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
    let chunk = ByteBuf::from(vec![1u8; CHUNK]);
    let gigabytes = CHUNK as f64 / 1e9;
    timeit(args, "single client put gigabytes", gigabytes, || {
        yr::put(&chunk).map(drop)
    })?;
    timeit(
        args,
        "multi client put gigabytes",
        n as f64 * gigabytes,
        || in_threads(n, || yr::put(&chunk).map(drop)),
    )?;
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

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut config = yr::Config::default();
    config.local_mode = args.local || config.local_mode;
    if !config.local_mode {
        eprintln!("yr-bench: running against a cluster; pass --local for local mode");
    }
    yr::init(config)?;
    let result = run(&args);
    yr::finalize()?;
    result
}
