//! The cross-host cases: two "machines" made of network namespaces (`yr-netns`, the hosts of
//! the multi-machine tests), a cluster across them, and yr's cross-host paths measured beside
//! plain TCP between the same two namespaces, in the same run:
//!
//! - `cross-host get gigabytes`: a driver on host 0 gets 256 MiB objects that an instance on
//!   host 1 puts (pulled through the data ports into host 0's shared memory, read in place),
//!   against `raw TCP stream gigabytes between hosts` (the same bytes, one connection, 4 MiB
//!   writes, timed to the receiver's acknowledgement), and the same bytes split over 4
//!   connections at once (`raw TCP stream gigabytes between hosts, 4 connections`), as many as
//!   a pull of a large object uses at most (one per two CPUs);
//! - `cross-host 1:1 actor call round trip`: sync calls of a small method of an instance on
//!   host 1 from the driver on host 0 (p50, p99), against `raw TCP ping-pong round trip between
//!   hosts` (a 64-byte message echoed over one connection with `TCP_NODELAY`, blocking reads),
//!   and the same with reads that spin (`raw TCP ping-pong round trip between hosts, spinning
//!   reads`: non-blocking, yielding the CPU until the message is in, as yr's call reader does
//!   for its first 50 µs), the floor of a round trip without the wakeups.
//!
//! The bench makes hosts `yr-h0` and `yr-h1` (`scripts/netns up 2`; `<name>-h0` and
//! `<name>-h1` with `YR_NETNS_NAME`), starts `yr start --master` and a node on host 0 and a
//! node on host 1 (each on its host's address, labelled `host=h<i>`), and runs the yr measures
//! in a child, itself run again in host 0 (`--host-driver`) with every other host's directory
//! hidden (`Isolation::PrivateFileSystems`, so that nothing crosses between the hosts but the
//! network), which prints its samples as one JSON line. The raw TCP ends are threads of this
//! process that entered the two namespaces. The hosts, and every process in them, are removed
//! at the end, on failure, and on SIGINT or SIGTERM. Without root or `ip netns` the cases are
//! skipped with a message saying why.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use yr::FOREVER;
use yr_netns::{Hosts, Isolation};

use crate::{far_get_rates, print_rates, quantile, selected, yr_binary, Actor, Args};

/// The case names, as `--case` selects them.
const GET: &str = "cross-host get gigabytes";
const STREAM: &str = "raw TCP stream gigabytes between hosts";
const CALL: &str = "cross-host 1:1 actor call round trip";
const PING: &str = "raw TCP ping-pong round trip between hosts";
const PARALLEL_STREAMS: &str = "raw TCP stream gigabytes between hosts, 4 connections";
const SPIN: &str = "raw TCP ping-pong round trip between hosts, spinning reads";

/// Bytes of each object and of each raw stream trial.
const SIZE: usize = 256 << 20;
/// Connections of the parallel raw stream: as many as a pull of a large object uses at most
/// (`yr_datasystem`'s transfer reads one range per two CPUs, at most 4; one on 2 CPUs).
const PARALLEL: usize = 4;
/// Bytes of each write and read of the raw stream.
const CHUNK: usize = 4 << 20;
/// Bytes of each ping-pong message.
const PING_BYTES: usize = 64;
/// Round trips before the sampled ones, on each side.
const WARM_UP: usize = 200;
/// How long the driver in host 0 may take.
const DRIVER_TIMEOUT: Duration = Duration::from_secs(600);
/// What the driver in host 0 prints its samples after.
const REPORT: &str = "yr-bench-host-driver: ";

/// What the driver in host 0 measured.
#[derive(serde::Serialize, serde::Deserialize)]
struct DriverReport {
    /// GB/s of each get after the warm-up one.
    get: Vec<f64>,
    /// Microseconds of each sampled call round trip.
    call: Vec<f64>,
}

/// The cross-host cases, when selected.
pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    if ![GET, STREAM, CALL, PING, SPIN]
        .iter()
        .any(|case| selected(args, case))
    {
        return Ok(());
    }
    if let Err(why) = Hosts::available() {
        println!(
            "cross-host cases skipped: {why}. They make two hosts out of network namespaces: \
             run yr-bench as root on a machine with iproute2."
        );
        return Ok(());
    }
    let yr = yr_binary(GET)?;
    // Caught before the hosts exist, so that no signal falls between making them and watching.
    let _interrupted = RemoveHostsOnSignal::install()?;
    // Private file systems: nothing reaches the other host through a path (a Unix socket),
    // only through the network, as between real machines.
    let hosts = Hosts::up(2, Isolation::PrivateFileSystems)?;
    // Host 1's node has room for the instances; both nodes hold two objects at once.
    let cluster = hosts.start_cluster(&yr, |index| {
        let cpu = if index == 0 { "1000" } else { "4000" };
        [
            "--cpu",
            cpu,
            "--warm-pool",
            "1",
            "--shared-memory-mb",
            "2048",
        ]
        .map(String::from)
        .to_vec()
    })?;
    // What is measured: the transfers, the round trips, or both (0 skips a side).
    let trials = if [GET, STREAM, PARALLEL_STREAMS]
        .iter()
        .any(|case| selected(args, case))
    {
        args.gigabyte_trials
    } else {
        0
    };
    let samples = if [CALL, PING, SPIN].iter().any(|case| selected(args, case)) {
        args.rtt_samples
    } else {
        0
    };
    let raw = raw_tcp(&hosts, trials, samples)?;
    let mut driver = hosts.command(0, std::env::current_exe()?);
    driver
        .arg("--host-driver")
        .args(["--gigabyte-trials", &trials.to_string()])
        .args(["--rtt-samples", &samples.to_string()])
        .env(yr_common::auth::TOKEN_ENV, &cluster.token);
    let output = yr_netns::output_within(driver, DRIVER_TIMEOUT)?;
    let report = String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| line.strip_prefix(REPORT).map(str::to_string));
    let Some(report) = report.filter(|_| output.status.success()) else {
        anyhow::bail!(
            "the driver in host 0 failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let yr: DriverReport = serde_json::from_str(&report)?;
    if [GET, STREAM, PARALLEL_STREAMS]
        .iter()
        .any(|case| selected(args, case))
    {
        print_rates(GET, &yr.get);
        print_rates(STREAM, &raw.stream);
        print_rates(PARALLEL_STREAMS, &raw.parallel);
        println!(
            "cross-host get / raw TCP stream between hosts {:.2} (goal >= 0.80)",
            mean(&yr.get) / mean(&raw.stream)
        );
        println!(
            "cross-host get / raw TCP stream between hosts, 4 connections {:.2}",
            mean(&yr.get) / mean(&raw.parallel)
        );
    }
    if samples > 0 {
        let (mut call, mut ping, mut spin) = (yr.call, raw.ping, raw.spin);
        call.sort_by(f64::total_cmp);
        ping.sort_by(f64::total_cmp);
        spin.sort_by(f64::total_cmp);
        for (name, samples) in [(CALL, &call), (PING, &ping), (SPIN, &spin)] {
            println!(
                "{name} p50 us {:.1} p99 us {:.1} ({} samples)",
                quantile(samples, 0.5),
                quantile(samples, 0.99),
                samples.len()
            );
        }
        println!(
            "cross-host call / raw TCP ping-pong between hosts p50 {:.2} p99 {:.2} (goal <= 2)",
            quantile(&call, 0.5) / quantile(&ping, 0.5),
            quantile(&call, 0.99) / quantile(&ping, 0.99)
        );
        println!(
            "cross-host call / raw TCP ping-pong between hosts, spinning reads p50 {:.2} p99 {:.2}",
            quantile(&call, 0.5) / quantile(&spin, 0.5),
            quantile(&call, 0.99) / quantile(&spin, 0.99)
        );
    }
    Ok(())
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// Placement on host `host` (`h0`, `h1`) by the label its node was started with.
fn on_host(host: &str) -> yr::InvokeOptions {
    yr::InvokeOptions {
        cpu: 300,
        schedule_affinities: vec![yr::Affinity {
            affinity_kind: yr::AffinityKind::Resource,
            affinity_type: yr::AffinityType::Required,
            label_operators: vec![yr::LabelOperator {
                op: yr::LabelOp::In,
                key: "host".into(),
                values: vec![host.into()],
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// `--host-driver`: the yr side, run in host 0 against host 0's node (found through the host's
/// session root). Prints a [`DriverReport`] line.
pub(crate) fn driver(args: &Args) -> anyhow::Result<()> {
    yr::init(yr::Config::default())?;
    let measured = (|| -> yr::Result<DriverReport> {
        let get = match args.gigabyte_trials {
            0 => Vec::new(),
            trials => far_get_rates(on_host("h1"), SIZE, trials)?,
        };
        let mut call = Vec::with_capacity(args.rtt_samples);
        if args.rtt_samples > 0 {
            let actor = yr::instance(Actor::new).options(on_host("h1")).invoke(())?;
            for _ in 0..WARM_UP {
                actor.method(Actor::ping).invoke(())?.get(FOREVER)?;
            }
            for _ in 0..args.rtt_samples {
                let started = Instant::now();
                actor.method(Actor::ping).invoke(())?.get(FOREVER)?;
                call.push(started.elapsed().as_secs_f64() * 1e6);
            }
            actor.terminate()?;
        }
        Ok(DriverReport { get, call })
    })();
    yr::finalize()?;
    println!("{REPORT}{}", serde_json::to_string(&measured?)?);
    Ok(())
}

/// What plain TCP between the hosts measured.
struct RawTcp {
    /// GB/s of each stream trial, one connection.
    stream: Vec<f64>,
    /// GB/s of each trial over [`PARALLEL`] connections.
    parallel: Vec<f64>,
    /// Microseconds of each sampled ping-pong round trip, blocking reads.
    ping: Vec<f64>,
    /// The same with spinning reads.
    spin: Vec<f64>,
}

/// The raw TCP measures: a receiver and echo server on a thread in host 1, a sender and pinger
/// on a thread in host 0. `trials` of the streams and `samples` of the ping-pongs; 0 skips
/// them.
fn raw_tcp(hosts: &Hosts, trials: usize, samples: usize) -> anyhow::Result<RawTcp> {
    let address: SocketAddr = format!("{}:0", hosts.address(1)).parse()?;
    std::thread::scope(|scope| {
        let (bound, port) = std::sync::mpsc::sync_channel(1);
        let server = scope.spawn(move || -> anyhow::Result<()> {
            hosts.enter(1)?;
            let listener = TcpListener::bind(address)?;
            // The sender learns where to connect, or the server's failure.
            let _ = bound.send(listener.local_addr());
            if trials > 0 {
                receive(&listener, trials, 1)?;
                receive(&listener, trials, PARALLEL)?;
            }
            if samples > 0 {
                echo(&listener, Reads::Blocking)?;
                echo(&listener, Reads::Spinning)?;
            }
            Ok(())
        });
        let client = scope.spawn(move || -> anyhow::Result<RawTcp> {
            hosts.enter(0)?;
            let server = port.recv()??;
            let mut raw = RawTcp {
                stream: Vec::new(),
                parallel: Vec::new(),
                ping: Vec::new(),
                spin: Vec::new(),
            };
            if trials > 0 {
                raw.stream = send(server, trials, 1)?;
                raw.parallel = send(server, trials, PARALLEL)?;
            }
            if samples > 0 {
                raw.ping = ping(server, samples, Reads::Blocking)?;
                raw.spin = ping(server, samples, Reads::Spinning)?;
            }
            Ok(raw)
        });
        let measured = client
            .join()
            .map_err(|_| anyhow::anyhow!("the raw TCP sender panicked"))?;
        let served = server
            .join()
            .map_err(|_| anyhow::anyhow!("the raw TCP receiver panicked"))?;
        served?;
        measured
    })
}

/// Receives `trials + 1` rounds of [`SIZE`] bytes split over `connections` connections, each
/// connection answering its share with one byte once it has all of it.
fn receive(listener: &TcpListener, trials: usize, connections: usize) -> anyhow::Result<()> {
    let streams = (0..connections)
        .map(|_| listener.accept().map(|(stream, _)| stream))
        .collect::<std::io::Result<Vec<_>>>()?;
    std::thread::scope(|scope| {
        let readers: Vec<_> = streams
            .into_iter()
            .map(|mut stream| {
                scope.spawn(move || -> anyhow::Result<()> {
                    let mut buffer = vec![0u8; CHUNK];
                    for _ in 0..=trials {
                        let mut left = SIZE / connections;
                        while left > 0 {
                            let read = stream.read(&mut buffer[..CHUNK.min(left)])?;
                            anyhow::ensure!(read > 0, "the raw TCP sender closed mid-stream");
                            left -= read;
                        }
                        stream.write_all(&[1])?;
                    }
                    Ok(())
                })
            })
            .collect();
        readers.into_iter().try_for_each(|reader| {
            reader
                .join()
                .map_err(|_| anyhow::anyhow!("a raw TCP reader panicked"))?
        })
    })
}

/// GB/s of `trials` rounds of [`SIZE`] bytes split over `connections` connections (after one
/// warm-up round), each timed from the first write to the last acknowledgement.
fn send(server: SocketAddr, trials: usize, connections: usize) -> anyhow::Result<Vec<f64>> {
    let streams = (0..connections)
        .map(|_| {
            let stream = TcpStream::connect(server)?;
            stream.set_nodelay(true)?;
            Ok(stream)
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let chunk = vec![7u8; CHUNK];
    let mut rates = Vec::with_capacity(trials);
    for _ in 0..=trials {
        let started = Instant::now();
        std::thread::scope(|scope| {
            let writers: Vec<_> = streams
                .iter()
                .map(|stream| {
                    let chunk = &chunk;
                    scope.spawn(move || -> std::io::Result<()> {
                        let mut stream = stream;
                        let mut left = SIZE / connections;
                        while left > 0 {
                            let part = CHUNK.min(left);
                            stream.write_all(&chunk[..part])?;
                            left -= part;
                        }
                        stream.read_exact(&mut [0u8])
                    })
                })
                .collect();
            writers.into_iter().try_for_each(|writer| {
                writer
                    .join()
                    .map_err(|_| anyhow::anyhow!("a raw TCP writer panicked"))?
                    .map_err(anyhow::Error::from)
            })
        })?;
        rates.push(SIZE as f64 / started.elapsed().as_secs_f64() / 1e9);
    }
    rates.remove(0); // warm-up
    Ok(rates)
}

/// How a ping-pong end waits for the next message.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reads {
    /// In `read`, asleep in the kernel until the message arrives.
    Blocking,
    /// Non-blocking reads, yielding the CPU between them.
    Spinning,
}

/// Echoes every [`PING_BYTES`] message of one connection until it closes.
fn echo(listener: &TcpListener, reads: Reads) -> anyhow::Result<()> {
    let (mut stream, _) = listener.accept()?;
    stream.set_nodelay(true)?;
    stream.set_nonblocking(reads == Reads::Spinning)?;
    let mut message = [0u8; PING_BYTES];
    while read_message(&mut stream, &mut message)? {
        write_message(&mut stream, &message)?;
    }
    Ok(())
}

/// Microseconds of `samples` round trips of a [`PING_BYTES`] message (after [`WARM_UP`]).
fn ping(server: SocketAddr, samples: usize, reads: Reads) -> anyhow::Result<Vec<f64>> {
    let mut stream = TcpStream::connect(server)?;
    stream.set_nodelay(true)?;
    stream.set_nonblocking(reads == Reads::Spinning)?;
    let mut message = [5u8; PING_BYTES];
    let mut round_trips = Vec::with_capacity(samples);
    for sample in 0..WARM_UP + samples {
        let started = Instant::now();
        write_message(&mut stream, &message)?;
        anyhow::ensure!(
            read_message(&mut stream, &mut message)?,
            "the raw TCP echo closed"
        );
        if sample >= WARM_UP {
            round_trips.push(started.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok(round_trips)
}

/// Reads one whole message, yielding while a non-blocking socket has none. False when the
/// peer closed the connection between messages.
fn read_message(stream: &mut TcpStream, message: &mut [u8]) -> std::io::Result<bool> {
    let mut filled = 0;
    while filled < message.len() {
        match stream.read(&mut message[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(read) => filled += read,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::yield_now()
            }
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(true)
}

/// Writes one whole message, yielding while a non-blocking socket has no room.
fn write_message(stream: &mut TcpStream, message: &[u8]) -> std::io::Result<()> {
    let mut written = 0;
    while written < message.len() {
        match stream.write(&message[written..]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(wrote) => written += wrote,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::yield_now()
            }
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// Removes the hosts, with every process in them, when this process gets SIGINT or SIGTERM
/// while the cross-host cases run, then exits (130). Dropping it stops the watch; the cases
/// run last, since the signals stay caught after it.
struct RemoveHostsOnSignal {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl RemoveHostsOnSignal {
    fn install() -> anyhow::Result<RemoveHostsOnSignal> {
        use tokio::signal::unix::{signal, SignalKind};
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // Registered here, so a signal from now on is caught.
        let (mut interrupt, mut terminate) = runtime.block_on(async {
            Ok::<_, std::io::Error>((
                signal(SignalKind::interrupt())?,
                signal(SignalKind::terminate())?,
            ))
        })?;
        std::thread::Builder::new()
            .name("yr-bench-hosts-signal".into())
            .spawn(move || {
                let caught = runtime.block_on(async {
                    tokio::select! {
                        _ = interrupt.recv() => true,
                        _ = terminate.recv() => true,
                        _ = stopped => false,
                    }
                });
                if caught {
                    eprintln!("yr-bench: interrupted; removing the hosts");
                    if let Err(error) = Hosts::down() {
                        eprintln!("yr-bench: {error}");
                    }
                    std::process::exit(130);
                }
            })?;
        Ok(RemoveHostsOnSignal { stop: Some(stop) })
    }
}

impl Drop for RemoveHostsOnSignal {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
