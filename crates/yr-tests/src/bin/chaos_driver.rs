//! Helper of the chaos soak (`tests/chaos.rs`, docs/design/027-chaos-soak.md): a driver that
//! runs a seeded workload of tasks, stateful instances, objects, KV and streams against its
//! host's node until its stdin closes, and reports every operation's outcome as a
//! [`yr_tests::chaos::OpReport`] line. It checks every value it gets back: a wrong value or an
//! operation that outlives [`OP_DEADLINE`] is reported as such (a hang also ends the driver).
//!
//! When its node dies under it (3006: the bus is gone), it finalizes and connects again once the
//! node is back; its instances are created anew. At the end it kills its instances, deletes its
//! KV keys and finalizes, so that the node's memory can be checked against its baseline.
//!
//! Stateful instances write `<YR_CHAOS_DIR>/<label>.<pid>` when constructed (also when a restart
//! constructs them again), so that the test can check that no instance runs in two processes.
//! Its runtimes re-execute this binary: `yr::init` serves there and never returns.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_bytes::ByteBuf;
use yr::InvokeOptions;
use yr_tests::chaos::{
    now_ms, OpKind, OpReport, Outcome, DIR_VAR, DRIVER_VAR, HOSTS_VAR, LARGE, OP_DEADLINE,
    REPORT_PREFIX, SEED_VAR,
};
use yr_tests::{on_label, pattern, weighted_sum};

/// How long a KV read waits for its key.
const KV_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the driver tries to connect again after its node died.
const RECONNECT_BOUND: Duration = OP_DEADLINE;

/// Stateful instances each driver keeps.
const ACTOR_SLOTS: usize = 3;

/// KV keys each driver writes and reads.
const KV_KEYS: usize = 6;

#[yr::invoke]
fn square(x: i64) -> i64 {
    x * x
}

#[yr::invoke]
fn make_large(seed: usize) -> ByteBuf {
    pattern(seed, LARGE)
}

#[yr::invoke]
fn checksum(value: ByteBuf) -> u64 {
    weighted_sum(&value)
}

/// A stateful instance: a running total. Its constructor marks its process.
#[yr::instance]
pub struct Keeper {
    value: i64,
}

#[yr::instance]
impl Keeper {
    pub fn new(label: String, dir: String) -> Self {
        let path = std::path::Path::new(&dir).join(format!("{label}.{}", std::process::id()));
        let _ = std::fs::write(path, b"");
        Keeper { value: 0 }
    }

    /// Add `n`: this runtime's pid and the new total.
    pub fn add(&mut self, n: i64) -> (u32, i64) {
        self.value += n;
        (std::process::id(), self.value)
    }
}

/// The message of the last error an operation got, for its report.
static LAST_ERROR: Mutex<String> = Mutex::new(String::new());

/// What the watchdog sees: the operation running now and since when.
static CURRENT: Mutex<Option<(Instant, OpKind, String)>> = Mutex::new(None);

fn emit(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// One stateful instance of the driver and what its calls showed so far.
struct Actor {
    handle: yr::InstanceHandle<Keeper>,
    label: String,
    /// The runtime that served the last call, and the total it returned.
    current: Option<(u32, i64)>,
    /// Runtimes that served it earlier: none may serve it again.
    abandoned: Vec<u32>,
    /// The sum of the arguments of calls that failed since the last one that succeeded (they
    /// may or may not have run).
    unsure: i64,
    /// When a call last succeeded (ms since the epoch): a call's failure may come from any
    /// fault since.
    last_ok_ms: u64,
}

/// What a KV key may hold: the values of the writes that may have landed, and since when.
struct KvKey {
    possible: Vec<Vec<u8>>,
    written_ms: u64,
}

struct Driver {
    index: usize,
    hosts: usize,
    dir: String,
    rng: StdRng,
    seq: u64,
    actors: Vec<Option<Actor>>,
    generation: u64,
    kv: HashMap<String, KvKey>,
    /// Set when an operation found the bus gone: connect again before the next.
    lost_bus: bool,
}

/// Placement on host `h<host>` (required: the call waits for it while that host is gone), or
/// wherever the master chooses.
fn place(host: Option<usize>) -> InvokeOptions {
    match host {
        Some(host) => on_label("host", &format!("h{host}")),
        None => InvokeOptions::default(),
    }
}

/// Where `host` places, for messages.
fn where_(host: Option<usize>) -> String {
    host.map_or_else(|| "any host".to_string(), |host| format!("h{host}"))
}

/// The outcome of `result` got by an operation that started at `started`: an error that came
/// only at the deadline is a hang; a value is checked by `check`.
fn judge<T>(
    result: yr::Result<T>,
    started: Instant,
    check: impl FnOnce(T) -> Result<(), String>,
) -> Outcome {
    match result {
        Ok(value) => match check(value) {
            Ok(()) => Outcome::Ok,
            Err(why) => Outcome::Wrong(why),
        },
        Err(error) if started.elapsed() + Duration::from_secs(1) >= OP_DEADLINE => {
            Outcome::Hang(format!("{}: {}", error.code().number(), error.message()))
        }
        Err(error) => {
            *LAST_ERROR.lock().unwrap_or_else(|e| e.into_inner()) = error.message().to_string();
            Outcome::Code(error.code().number())
        }
    }
}

fn expect_eq<T: PartialEq + std::fmt::Debug>(got: T, expected: T) -> Result<(), String> {
    if got == expected {
        Ok(())
    } else {
        Err(format!("expected {expected:?} got {got:?}"))
    }
}

impl Driver {
    fn report(&mut self, kind: OpKind, since_ms: u64, outcome: Outcome, detail: String) {
        if outcome == Outcome::Code(3006) || outcome == Outcome::Code(9000) {
            self.lost_bus = true;
        }
        self.seq += 1;
        let detail = match outcome {
            Outcome::Code(_) => format!(
                "{detail} error: {}",
                LAST_ERROR.lock().unwrap_or_else(|e| e.into_inner())
            ),
            _ => detail,
        };
        let report = OpReport {
            driver: self.index,
            seq: self.seq,
            kind,
            since_ms,
            end_ms: now_ms(),
            outcome,
            detail,
        };
        emit(&report.line());
    }

    fn begin(&self, kind: OpKind, what: &str) -> (Instant, u64) {
        *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), kind, what.to_string()));
        (Instant::now(), now_ms())
    }

    /// A host for placement (one time in three, none: the master chooses).
    fn host(&mut self) -> Option<usize> {
        let host = self.rng.gen_range(0..self.hosts + self.hosts / 2);
        (host < self.hosts).then_some(host)
    }

    fn task(&mut self) {
        let x = self.rng.gen_range(-1_000_000..1_000_000i64);
        let host = self.host();
        let detail = format!("square({x}) on {}", where_(host));
        let (started, since) = self.begin(OpKind::Task, &detail);
        let result = yr::function(square)
            .options(place(host))
            .invoke((x,))
            .and_then(|object| yr::get(&object, OP_DEADLINE));
        let outcome = judge(result, started, |got| expect_eq(got, x * x));
        self.report(OpKind::Task, since, outcome, detail);
    }

    fn large_task(&mut self) {
        let seed = self.rng.gen_range(0..1_000_000usize);
        let host = self.host();
        let expected = weighted_sum(&pattern(seed, LARGE));
        if self.rng.gen_bool(0.5) {
            let detail = format!("make_large({seed}) on {}", where_(host));
            let (started, since) = self.begin(OpKind::LargeTask, &detail);
            let result = yr::function(make_large)
                .options(place(host))
                .invoke((seed,))
                .and_then(|object| yr::get(&object, OP_DEADLINE));
            let outcome = judge(result, started, |got| {
                expect_eq((got.len(), weighted_sum(&got)), (LARGE, expected))
            });
            self.report(OpKind::LargeTask, since, outcome, detail);
        } else {
            let detail = format!("checksum(&put(pattern {seed})) on {}", where_(host));
            let (started, since) = self.begin(OpKind::LargeTask, &detail);
            let result = yr::put(pattern(seed, LARGE)).and_then(|object| {
                let sum = yr::function(checksum)
                    .options(place(host))
                    .invoke((&object,))?;
                yr::get(&sum, OP_DEADLINE)
            });
            let outcome = judge(result, started, |got| expect_eq(got, expected));
            self.report(OpKind::LargeTask, since, outcome, detail);
        }
    }

    fn put(&mut self, large: bool) {
        let seed = self.rng.gen_range(0..1_000_000usize);
        let len = if large {
            LARGE
        } else {
            self.rng.gen_range(1..4096)
        };
        let kind = if large { OpKind::LargePut } else { OpKind::Put };
        let detail = format!("put {len} bytes of pattern {seed}");
        let value = pattern(seed, len);
        let (started, since) = self.begin(kind, &detail);
        let result = yr::put(value.clone()).and_then(|object| yr::get(&object, OP_DEADLINE));
        let outcome = judge(result, started, |got| {
            if got == value {
                Ok(())
            } else {
                Err(format!("{} bytes came back, not the {len} put", got.len()))
            }
        });
        self.report(kind, since, outcome, detail);
    }

    /// Create a stateful instance in `slot` and call it once.
    fn create(&mut self, slot: usize) {
        self.generation += 1;
        let label = format!("d{}-a{slot}-g{}", self.index, self.generation);
        let retries = if self.rng.gen_bool(0.5) { 2 } else { 0 };
        let host = self.host();
        let n = self.rng.gen_range(1..100i64);
        let detail = format!("{label} recover_retry_times={retries} on {}", where_(host));
        let (started, since) = self.begin(OpKind::Create, &detail);
        let options = InvokeOptions {
            recover_retry_times: retries,
            ..place(host)
        };
        let created = yr::instance(Keeper::new)
            .options(options)
            .invoke((label.clone(), self.dir.clone()));
        let result = created.and_then(|handle| {
            let first = yr::get(&handle.method(Keeper::add).invoke((n,))?, OP_DEADLINE)?;
            Ok((handle, first))
        });
        let mut made = None;
        let outcome = judge(result, started, |(handle, (pid, value))| {
            made = Some(Actor {
                handle,
                label: label.clone(),
                current: Some((pid, value)),
                abandoned: Vec::new(),
                unsure: 0,
                last_ok_ms: now_ms(),
            });
            expect_eq(value, n)
        });
        let detail = format!(
            "{detail} id={}",
            made.as_ref().map(|a| a.handle.id()).unwrap_or("")
        );
        self.report(OpKind::Create, since, outcome.clone(), detail);
        if outcome == Outcome::Ok {
            self.actors[slot] = made;
        }
    }

    /// 1 to 4 calls of the instance in `slot`, submitted together, resolved in order.
    fn calls(&mut self, slot: usize) {
        let Some(mut actor) = self.actors[slot].take() else {
            return self.create(slot);
        };
        let count = self.rng.gen_range(1..=4);
        let args: Vec<i64> = (0..count).map(|_| self.rng.gen_range(1..100)).collect();
        let detail = format!("{} id={} add{args:?}", actor.label, actor.handle.id());
        let (started, _) = self.begin(OpKind::Call, &detail);
        let submitted: Vec<_> = args
            .iter()
            .map(|n| actor.handle.method(Keeper::add).invoke((*n,)))
            .collect();
        let mut fatal = false;
        for (n, call) in args.iter().zip(submitted) {
            let result = call.and_then(|object| yr::get(&object, OP_DEADLINE));
            let since = actor.last_ok_ms;
            let outcome = judge(result, started, |(pid, value)| actor.check(*n, pid, value));
            if outcome == Outcome::Ok {
                actor.last_ok_ms = now_ms();
            }
            if outcome == Outcome::Code(1007) || outcome == Outcome::Code(2002) {
                // Exited, or its runtime crashed with no restarts left.
                fatal = true;
            }
            if matches!(outcome, Outcome::Code(_)) {
                actor.unsure += n;
            }
            self.report(OpKind::Call, since, outcome, format!("{detail} n={n}"));
        }
        if fatal {
            // FATAL: a new instance takes the slot.
            let _ = actor.handle.terminate();
        } else {
            self.actors[slot] = Some(actor);
        }
    }

    fn kv(&mut self) {
        let key = format!("chaos-d{}-k{}", self.index, self.rng.gen_range(0..KV_KEYS));
        if self.rng.gen_bool(0.5) || !self.kv.contains_key(&key) {
            let value = format!("{key}={}", self.seq).into_bytes();
            let detail = format!("write {key}");
            let (started, since) = self.begin(OpKind::Kv, &detail);
            let result = yr::kv_write(&key, &value, Default::default());
            let outcome = judge(result, started, |()| Ok(()));
            let entry = self.kv.entry(key.clone()).or_insert(KvKey {
                possible: Vec::new(),
                written_ms: since,
            });
            if outcome == Outcome::Ok {
                entry.possible = vec![value];
            } else {
                entry.possible.push(value);
            }
            entry.written_ms = since;
            self.report(OpKind::Kv, since, outcome, detail);
        }
        let detail = format!("read {key}");
        let (started, _) = self.begin(OpKind::Kv, &detail);
        let result = yr::kv_read(&[key.as_str()], KV_READ_TIMEOUT);
        let Some(entry) = self.kv.get(&key) else {
            return;
        };
        let since = entry.written_ms;
        let outcome = judge(result, started, |mut values| {
            let got = values.pop().unwrap_or_default();
            if entry.possible.contains(&got) {
                Ok(())
            } else {
                Err(format!(
                    "read {:?}, written {:?}",
                    String::from_utf8_lossy(&got),
                    entry
                        .possible
                        .iter()
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .collect::<Vec<_>>()
                ))
            }
        });
        self.report(OpKind::Kv, since, outcome, detail);
    }

    fn stream(&mut self) {
        let name = format!("chaos-d{}-s{}", self.index, self.seq);
        let count = self.rng.gen_range(1..=20u32);
        let detail = format!("{name} {count} elements");
        let (started, since) = self.begin(OpKind::Stream, &detail);
        let result = (|| {
            let subscription = yr::SubscriptionConfig::new("chaos", yr::SubscriptionType::Stream);
            let consumer = yr::create_stream_consumer(&name, subscription)?;
            let producer = yr::create_stream_producer(&name, yr::ProducerConfig::default())?;
            for i in 0..count {
                producer.send(&i.to_le_bytes(), Duration::from_secs(30))?;
            }
            let mut got = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(60);
            while got.len() < count as usize && Instant::now() < deadline {
                let elements = consumer.receive(Duration::from_secs(1), 0)?;
                for element in &elements {
                    let bytes: [u8; 4] = element.value.as_slice().try_into().unwrap_or_default();
                    got.push(u32::from_le_bytes(bytes));
                }
                if let Some(last) = elements.last() {
                    consumer.ack(last.id)?;
                }
            }
            producer.close()?;
            consumer.close()?;
            yr::delete_stream(&name)?;
            Ok(got)
        })();
        let outcome = judge(result, started, |got| {
            expect_eq(got, (0..count).collect::<Vec<_>>())
        });
        self.report(OpKind::Stream, since, outcome, detail);
    }

    /// After the bus was lost: finalize, and init again once the node is back.
    fn reconnect(&mut self) {
        let (started, _) = self.begin(OpKind::Create, "connect again after the node was lost");
        for actor in self.actors.iter_mut() {
            *actor = None;
        }
        let _ = yr::finalize();
        let mut last = None;
        while started.elapsed() < RECONNECT_BOUND {
            match yr::init(config()) {
                Ok(_) => {
                    self.lost_bus = false;
                    emit(&format!(
                        "{REPORT_PREFIX}reconnected {} after {:?}",
                        self.index,
                        started.elapsed()
                    ));
                    return;
                }
                Err(error) => last = Some(error),
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        hang(&format!(
            "the driver could not connect again within {RECONNECT_BOUND:?}: {last:?}"
        ));
    }

    fn step(&mut self) {
        if self.lost_bus {
            self.reconnect();
        }
        match self.rng.gen_range(0..100) {
            0..=19 => self.task(),
            20..=29 => self.large_task(),
            30..=39 => self.put(false),
            40..=47 => self.put(true),
            48..=77 => {
                let slot = self.rng.gen_range(0..ACTOR_SLOTS);
                self.calls(slot);
            }
            78..=91 => self.kv(),
            _ => self.stream(),
        }
        *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Kill the instances and delete the keys, so that the node's memory returns to baseline.
    fn clean_up(&mut self) {
        if self.lost_bus {
            self.reconnect();
        }
        let step = |what: &str, started: Instant, result: yr::Result<()>| {
            emit(&format!(
                "{REPORT_PREFIX}cleanup {what} {} ms {}",
                started.elapsed().as_millis(),
                result.map_or_else(|e| format!("code {}", e.code().number()), |()| "ok".into())
            ));
        };
        for actor in self.actors.iter_mut().filter_map(Option::take) {
            let started = Instant::now();
            step(
                &format!("terminate {}", actor.handle.id()),
                started,
                actor.handle.terminate_sync(),
            );
        }
        let keys: Vec<&str> = self.kv.keys().map(String::as_str).collect();
        let started = Instant::now();
        step("kv_del", started, yr::kv_del(&keys));
    }
}

impl Actor {
    /// Whether `add(n)` may have returned `(pid, value)` after what the instance showed so far.
    fn check(&mut self, n: i64, pid: u32, value: i64) -> Result<(), String> {
        if self.abandoned.contains(&pid) {
            return Err(format!(
                "runtime {pid}, which an earlier call left, served {} again: the instance ran \
                 in two places",
                self.label
            ));
        }
        let base = match self.current {
            Some((current, total)) if current == pid => total,
            Some((current, _)) => {
                // A restart: the constructor's state, then the calls replayed before this one.
                self.abandoned.push(current);
                0
            }
            None => 0,
        };
        let (low, high) = (base + n, base + n + self.unsure);
        self.current = Some((pid, value));
        self.unsure = 0;
        if (low..=high).contains(&value) {
            Ok(())
        } else {
            Err(format!(
                "{} on runtime {pid} returned {value}, not within {low}..={high}",
                self.label
            ))
        }
    }
}

/// Report a hang of the operation running now and end the driver.
fn hang(why: &str) -> ! {
    let current = CURRENT.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let (kind, what) = current
        .map(|(_, kind, what)| (kind, what))
        .unwrap_or((OpKind::Task, String::new()));
    let index = std::env::var(DRIVER_VAR)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    emit(
        &OpReport {
            driver: index,
            seq: u64::MAX,
            kind,
            since_ms: now_ms(),
            end_ms: now_ms(),
            outcome: Outcome::Hang(why.to_string()),
            detail: what,
        }
        .line(),
    );
    std::process::exit(2);
}

fn config() -> yr::Config {
    let mut config = yr::Config::default();
    config.local_mode = false;
    config
}

fn env_number(name: &str) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| {
            eprintln!("chaos_driver: {name} must be set to a number");
            std::process::exit(3)
        })
}

fn main() {
    // First of all: in a runtime this serves the node and never returns.
    if let Err(error) = yr::init(config()) {
        eprintln!("chaos_driver: yr::init failed: {error}");
        std::process::exit(3);
    }
    let seed = env_number(SEED_VAR);
    let index = env_number(DRIVER_VAR) as usize;
    let hosts = env_number(HOSTS_VAR) as usize;
    let dir = std::env::var(DIR_VAR).unwrap_or_else(|_| {
        eprintln!("chaos_driver: {DIR_VAR} must be set");
        std::process::exit(3)
    });
    // The watchdog: an operation past its deadline is a hang, whatever call it is stuck in.
    std::thread::spawn(|| loop {
        std::thread::sleep(Duration::from_secs(1));
        let stuck = CURRENT
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|(started, _, _)| {
                started.elapsed() > OP_DEADLINE + Duration::from_secs(30)
            });
        if stuck {
            hang("no answer within the operation's deadline");
        }
    });
    // The test closes stdin when the soak's time is up.
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    std::thread::spawn(move || {
        yr_tests::for_each_stdin_line(|| {});
        stopping.store(true, Ordering::SeqCst);
    });
    let mut driver = Driver {
        index,
        hosts,
        dir,
        rng: StdRng::seed_from_u64(seed ^ (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        seq: 0,
        actors: (0..ACTOR_SLOTS).map(|_| None).collect(),
        generation: 0,
        kv: HashMap::new(),
        lost_bus: false,
    };
    while !stop.load(Ordering::SeqCst) {
        driver.step();
    }
    driver.clean_up();
    let started = Instant::now();
    let finalized = yr::finalize();
    emit(&format!(
        "{REPORT_PREFIX}done {index} {} (finalize {} ms: {finalized:?})",
        driver.seq,
        started.elapsed().as_millis()
    ));
}
