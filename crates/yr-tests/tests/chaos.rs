//! The chaos soak (docs/design/027-chaos-soak.md): a seeded workload on a real multi-host
//! cluster while a seeded schedule of faults hits it.
//!
//! Four network-namespace hosts (`scripts/netns`): etcd on host 3 (a machine of its own, never
//! faulted), masters on hosts 0 and 1 (one leads through etcd, the other stands by), a node on
//! each of hosts 0, 1 and 2, and drivers (`src/bin/chaos_driver.rs`) on hosts 0 and 2. For
//! `YR_CHAOS_MINUTES` (default 2) the test injects faults at seeded times: SIGKILL of a
//! runtime, SIGKILL of a node (started again), SIGKILL of the leading master (started again as a
//! standby), and a host's link cut for a few seconds. Then it checks:
//!
//! - every operation the drivers ran ended with the right value or with an error code that
//!   [`yr_tests::chaos::ACCEPTED`] allows after a fault that overlapped it; never a wrong value,
//!   never a hang;
//! - no instance ran in two places: a runtime an instance left never served it again (the
//!   drivers check), and once the cluster settles no instance id has two live processes;
//! - memory is back at its baseline: each node's shared memory in use, and its RSS within a
//!   bound, once the drivers released everything;
//! - no process is leaked: after the masters and nodes are stopped, nothing the soak started
//!   (or that they started: runtimes) is alive, and the hosts hold no process.
//!
//! `YR_CHAOS_SEED=<n>` replays a seed's workload and fault schedule; the seed (from the clock
//! unless given) is printed first and in every failure. `cargo test --workspace`, and so
//! `scripts/test`, runs it for 2 minutes; `YR_CHAOS_MINUTES=10 cargo test -p yr-tests --test
//! chaos -- --nocapture` is the full soak. Needs root and `ip netns` (it skips loudly
//! otherwise; `YR_TESTS_REQUIRE_NETNS=1` makes that a failure), and etcd.

#[path = "../../yr-meta/tests/common/etcd.rs"]
mod etcd;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use yr_tests::chaos::{
    accepted_by, now_ms, Fault, FaultKind, OpKind, OpReport, Outcome, ACCEPTED, DIR_VAR,
    DRIVER_VAR, HOSTS_VAR, REPORT_PREFIX, SEED_VAR,
};
use yr_tests::hosts::{set_name, skip_or_fail, Hosts, Isolation};
use yr_tests::{
    alive, children_of, exclusive, master_status, metric_at, signal, wait_until, yr_binary, TempDir,
};

/// Hosts with a node.
const NODE_HOSTS: usize = 3;
/// The host etcd runs on (never faulted).
const ETCD_HOST: usize = 3;
/// The hosts with a master.
const MASTER_HOSTS: [usize; 2] = [0, 1];
/// The hosts with a driver.
const DRIVER_HOSTS: [usize; 2] = [0, 2];
const MASTER_PORT: u16 = 22770;
const NODE_PORT: u16 = 22773;
const NODE_METRICS_PORT: u16 = 22783;
const ETCD_PORT: u16 = 2379;
const ETCD_PEER_PORT: u16 = 2380;
/// The master's node timeout, in seconds.
const NODE_TIMEOUT: &str = "3";

/// How long the cluster may take to be whole again after a fault (a node back and listed
/// alive, a leader elected): generous, it only bounds a hang.
const RECOVERY_BOUND: Duration = Duration::from_secs(90);
/// How long the drivers may take to finish after their stdin closes.
const DRIVER_END_BOUND: Duration = Duration::from_secs(300);
/// How long since the last cut before two live processes of one instance are a finding: a
/// fenced copy on a host that was cut off dies once its node registers again.
const SETTLE: Duration = Duration::from_secs(30);
/// How much a node's RSS may grow over the soak.
const RSS_SLACK_KB: u64 = 256 * 1024;
/// How much shared memory a node may still use after the drivers released everything.
const SHARED_MEMORY_SLACK: f64 = 1024.0 * 1024.0;

/// A process of the soak: its child handle (dropped when it exits).
struct Proc {
    child: Option<Child>,
}

impl Proc {
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait for the exit; SIGKILL after `bound`. Whether it exited by itself.
    fn stop(&mut self, bound: Duration) -> bool {
        let Some(child) = self.child.as_mut() else {
            return true;
        };
        signal(child.id(), libc::SIGTERM);
        let exited = wait_until(bound, || matches!(child.try_wait(), Ok(Some(_))));
        self.kill();
        exited
    }
}

/// The cluster of the soak and every process it started.
struct Soak {
    seed: u64,
    hosts: Hosts,
    dir: TempDir,
    token: String,
    etcd: Proc,
    masters: Vec<Proc>,
    nodes: Vec<Proc>,
    /// Every pid the soak started or saw among the nodes' children.
    started: BTreeSet<u32>,
}

impl Soak {
    fn address(&self, host: usize) -> String {
        self.hosts.address(host)
    }

    fn master_addresses(&self) -> Vec<String> {
        MASTER_HOSTS
            .iter()
            .map(|host| format!("{}:{MASTER_PORT}", self.address(*host)))
            .collect()
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .unwrap_or_else(|e| panic!("seed {}: cannot open the log {name}: {e}", self.seed))
    }

    fn spawn(&mut self, host: usize, name: &str, mut command: std::process::Command) -> Proc {
        let log = self.log(name);
        let err = log.try_clone().expect("a log handle");
        let child =
            command.stdout(log).stderr(err).spawn().unwrap_or_else(|e| {
                panic!("seed {}: cannot start {name} on h{host}: {e}", self.seed)
            });
        self.started.insert(child.id());
        Proc { child: Some(child) }
    }

    fn start_etcd(&mut self) {
        let data = self.dir.path().join("etcd");
        let client = format!(
            "http://{}:{ETCD_PORT},http://127.0.0.1:{ETCD_PORT}",
            self.address(ETCD_HOST)
        );
        let peer = format!("http://127.0.0.1:{ETCD_PEER_PORT}");
        let mut command = self.hosts.command(ETCD_HOST, "etcd");
        command
            .args(["--name", "m0", "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("m0={peer}")])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"]);
        self.etcd = self.spawn(ETCD_HOST, "etcd", command);
        let healthy = self.hosts.in_host(ETCD_HOST, || {
            wait_until(RECOVERY_BOUND, || etcd::health(ETCD_PORT))
        });
        assert!(healthy, "seed {}: etcd did not become healthy", self.seed);
    }

    fn start_master(&mut self, index: usize) {
        let host = MASTER_HOSTS[index];
        let address = format!("{}:{MASTER_PORT}", self.address(host));
        let mut command = self.hosts.command(host, yr_binary());
        command
            .arg("master")
            .args(["--listen", &address, "--advertise", &address])
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("master{index}")))
            .args(["--node-timeout", NODE_TIMEOUT])
            .args([
                "--etcd",
                &format!("{}:{ETCD_PORT}", self.address(ETCD_HOST)),
                "--etcd-prefix",
                "/yr/chaos",
            ])
            .env(yr_common::auth::TOKEN_ENV, &self.token)
            .env("RUST_BACKTRACE", "1");
        let proc = self.spawn(host, &format!("master{index}"), command);
        self.masters[index] = proc;
    }

    fn bus_socket(&self, host: usize) -> PathBuf {
        self.hosts.dir(host).join("bus.sock")
    }

    fn node_id(host: usize) -> String {
        format!("chaos-h{host}")
    }

    fn start_node(&mut self, host: usize) {
        let address = self.address(host);
        let session = self.hosts.dir(host).join("session");
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
            .recursive(true)
            .create(&session)
            .expect("the node's session directory");
        let mut command = self.hosts.command(host, yr_binary());
        command
            .arg("node")
            .args(["--master-address", &self.master_addresses().join(",")])
            .args(["--listen", &format!("{address}:{NODE_PORT}")])
            .args(["--advertise-host", &address])
            .arg("--bus-socket")
            .arg(self.bus_socket(host))
            .arg("--session-dir")
            .arg(&session)
            .args(["--node-id", &Self::node_id(host)])
            .args([
                "--metrics-listen",
                &format!("127.0.0.1:{NODE_METRICS_PORT}"),
            ])
            .args(["--cpu", "16000", "--memory", "8192", "--warm-pool", "1"])
            .args(["--labels", &format!("host=h{host}")])
            .env(yr_common::auth::TOKEN_ENV, &self.token)
            .env("RUST_BACKTRACE", "1");
        let proc = self.spawn(host, &format!("node{host}"), command);
        self.nodes[host] = proc;
    }

    /// What the leading master says, asked from the etcd host (never cut off).
    fn status(&self) -> Result<yr_proto::v1::ClusterStatusResponse, String> {
        let addresses = self.master_addresses();
        self.hosts.in_host(ETCD_HOST, || {
            let mut errors = Vec::new();
            for address in &addresses {
                match master_status(address) {
                    Ok(status) if !status.leader.is_empty() => return Ok(status),
                    Ok(_) => errors.push(format!("{address}: no leader")),
                    Err(error) => errors.push(format!("{address}: {error}")),
                }
            }
            Err(errors.join("; "))
        })
    }

    /// Wait until a master leads and lists every node alive (and, with `both_masters`, the
    /// other master stands by); panics with the seed after [`RECOVERY_BOUND`].
    fn wait_whole(&self, why: &str, after: &Before) {
        let mut last = None;
        let whole = wait_until(RECOVERY_BOUND, || {
            let status = self.status();
            let ok = status.as_ref().is_ok_and(|status| {
                (0..NODE_HOSTS).all(|host| {
                    status.nodes.iter().any(|n| {
                        n.node_id == Self::node_id(host)
                            && n.state == "alive"
                            && after.restarted_node != Some((host, n.incarnation))
                    })
                }) && status.masters.len() == MASTER_HOSTS.len()
            });
            last = Some(status);
            ok
        });
        assert!(
            whole,
            "seed {}: the cluster was not whole again within {RECOVERY_BOUND:?} after {why}; \
             last status: {last:?}; logs in {}",
            self.seed,
            self.dir.display()
        );
    }

    /// Every runtime process running now (the nodes' children), remembered for the leak check.
    fn runtimes(&mut self) -> Vec<(usize, u32)> {
        let mut found = Vec::new();
        for (host, node) in self.nodes.iter().enumerate() {
            if let Some(pid) = node.pid() {
                found.extend(children_of(pid).into_iter().map(|child| (host, child)));
            }
        }
        self.started.extend(found.iter().map(|(_, pid)| *pid));
        found
    }

    /// Node `host`'s anonymous resident memory (its heap: the shared memory it maps is checked
    /// through its own metric).
    /// How many file descriptors node `host` has open.
    fn node_fds(&self, host: usize) -> Option<usize> {
        let pid = self.nodes[host].pid()?;
        Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
    }

    fn node_rss_kb(&self, host: usize) -> Option<u64> {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.nodes[host].pid()?)).ok()?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("RssAnon:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
    }

    fn shared_memory_used(&self, host: usize) -> Option<f64> {
        self.hosts.in_host(host, || {
            metric_at(
                &format!("127.0.0.1:{NODE_METRICS_PORT}"),
                "yr_shared_memory_used_bytes",
            )
        })
    }
}

/// What must have changed before the cluster counts as whole again after a fault.
#[derive(Default)]
struct Before {
    /// A node that was started again, and its incarnation before: it registers anew.
    restarted_node: Option<(usize, u64)>,
}

/// A driver process and the reports it printed so far.
struct Driver {
    host: usize,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

fn spawn_driver(soak: &mut Soak, index: usize, host: usize) -> Driver {
    let log = soak.log(&format!("driver{index}"));
    let mut child = soak
        .hosts
        .command(host, env!("CARGO_BIN_EXE_chaos_driver"))
        .env(SEED_VAR, soak.seed.to_string())
        .env(DRIVER_VAR, index.to_string())
        .env(HOSTS_VAR, NODE_HOSTS.to_string())
        .env(DIR_VAR, soak.dir.path().join("marks"))
        .env(
            "YR_SERVER_ADDRESS",
            format!("unix:{}", soak.bus_socket(host).display()),
        )
        .env(yr_common::auth::TOKEN_ENV, &soak.token)
        .env("YR_LOCAL_MODE", "false")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("seed {}: cannot start driver {index}: {e}", soak.seed));
    soak.started.insert(child.id());
    let stdout = child.stdout.take().expect("the driver's stdout");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let seen = lines.clone();
    let mut copy = soak.log(&format!("driver{index}-reports"));
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = writeln!(copy, "{line}");
            if line.contains(REPORT_PREFIX) {
                seen.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        }
    });
    Driver {
        host,
        stdin: child.stdin.take(),
        child,
        lines,
        reader: Some(reader),
    }
}

/// The seed: `YR_CHAOS_SEED`, or one from the clock.
fn seed() -> u64 {
    match std::env::var("YR_CHAOS_SEED") {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("YR_CHAOS_SEED={text:?} is not a number")),
        Err(_) => now_ms() ^ u64::from(std::process::id()).rotate_left(32),
    }
}

fn minutes() -> f64 {
    std::env::var("YR_CHAOS_MINUTES")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(2.0)
}

/// Instance labels with two live processes now (from the marks the constructors wrote).
fn instances_in_two_places(marks: &Path) -> Vec<(String, Vec<u32>)> {
    let mut live: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for entry in std::fs::read_dir(marks).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some((label, pid)) = name.rsplit_once('.') {
            if let Ok(pid) = pid.parse::<u32>() {
                // A runtime of the driver's binary (not another process that reused the pid).
                if alive(pid) && yr_tests::command_line(pid).contains("chaos_driver") {
                    live.entry(label.to_string()).or_default().push(pid);
                }
            }
        }
    }
    live.into_iter()
        .filter(|(_, pids)| pids.len() > 1)
        .collect()
}

/// Inject one fault chosen by `rng`; returns it once the cluster is whole again.
fn inject(soak: &mut Soak, rng: &mut StdRng) -> Fault {
    let roll = rng.gen_range(0..100);
    let host = rng.gen_range(0..NODE_HOSTS);
    let pause = Duration::from_millis(rng.gen_range(500..3_000));
    let pick = rng.gen_range(0..1_000usize);
    let start_ms = now_ms();
    let (kind, host) = match roll {
        0..=34 => {
            let runtimes: Vec<u32> = soak
                .runtimes()
                .into_iter()
                .filter(|(h, _)| *h == host)
                .map(|(_, pid)| pid)
                .collect();
            if let Some(pid) = runtimes.get(pick % runtimes.len().max(1)) {
                eprintln!("chaos: SIGKILL runtime {pid} on h{host}");
                signal(*pid, libc::SIGKILL);
            }
            (FaultKind::RuntimeKill, host)
        }
        35..=59 => {
            eprintln!("chaos: SIGKILL node on h{host}, back in {pause:?}");
            let incarnation = soak
                .status()
                .ok()
                .and_then(|status| yr_tests::node_incarnation(&status, &Soak::node_id(host)));
            soak.nodes[host].kill();
            std::thread::sleep(pause);
            soak.start_node(host);
            soak.wait_whole(
                "a node's SIGKILL",
                &Before {
                    restarted_node: incarnation.map(|i| (host, i)),
                },
            );
            (FaultKind::NodeKill, host)
        }
        60..=74 => {
            let leader = soak.status().map(|s| s.leader).unwrap_or_default();
            let index = soak
                .master_addresses()
                .iter()
                .position(|a| *a == leader)
                .unwrap_or(0);
            eprintln!("chaos: SIGKILL the leading master {leader}, back as a standby in {pause:?}");
            soak.masters[index].kill();
            std::thread::sleep(pause);
            soak.start_master(index);
            // Either master may lead next (the restarted one too, once the dead leader's lease
            // expired); only a live one answers as the leader.
            soak.wait_whole("the leading master's SIGKILL", &Before::default());
            (FaultKind::MasterKill, MASTER_HOSTS[index])
        }
        _ => {
            let cut = Duration::from_millis(rng.gen_range(1_000..8_000));
            eprintln!("chaos: cut h{host} for {cut:?}");
            soak.hosts.cut(host).expect("cut the host's link");
            std::thread::sleep(cut);
            soak.hosts.restore(host).expect("restore the host's link");
            soak.wait_whole("a cut link's restore", &Before::default());
            (FaultKind::Cut, host)
        }
    };
    Fault {
        kind,
        host,
        start_ms,
        end_ms: now_ms(),
    }
}

#[test]
fn a_seeded_workload_survives_killed_runtimes_nodes_and_masters_and_cut_links() {
    let test = "a_seeded_workload_survives_killed_runtimes_nodes_and_masters_and_cut_links";
    let _lock = exclusive();
    let seed = seed();
    let soak_for = Duration::from_secs_f64(minutes() * 60.0);
    eprintln!("chaos: seed {seed} (replay with YR_CHAOS_SEED={seed}), {soak_for:?} of faults");
    // A set of hosts of its own (unless the run names one): another test's hosts, named `yr`,
    // never touch it.
    if std::env::var_os("YR_NETNS_NAME").is_none() {
        std::env::set_var("YR_NETNS_NAME", "yrc");
    }
    let hosts = match Hosts::up(NODE_HOSTS + 1, Isolation::SharedFileSystem) {
        Ok(hosts) => hosts,
        Err(why) => return skip_or_fail(test, &why),
    };
    let token = yr_common::auth::ClusterToken::generate().expect("a cluster token");
    yr_transport::install(yr_transport::Credentials::with_token(token.clone()));
    let mut soak = Soak {
        seed,
        hosts,
        dir: TempDir::new("chaos"),
        token: token.as_str().to_string(),
        etcd: Proc { child: None },
        masters: MASTER_HOSTS.iter().map(|_| Proc { child: None }).collect(),
        nodes: (0..NODE_HOSTS).map(|_| Proc { child: None }).collect(),
        started: BTreeSet::new(),
    };
    let marks = soak.dir.path().join("marks");
    std::fs::create_dir_all(&marks).expect("the marks directory");
    eprintln!("chaos: logs in {}", soak.dir.display());

    soak.start_etcd();
    for index in 0..MASTER_HOSTS.len() {
        soak.start_master(index);
    }
    let led = wait_until(RECOVERY_BOUND, || {
        soak.status()
            .is_ok_and(|status| status.masters.len() == MASTER_HOSTS.len())
    });
    assert!(led, "seed {seed}: no master led within {RECOVERY_BOUND:?}");
    for host in 0..NODE_HOSTS {
        soak.start_node(host);
    }
    soak.wait_whole("the start", &Before::default());
    let baseline_shm: Vec<f64> = (0..NODE_HOSTS)
        .map(|host| soak.shared_memory_used(host).unwrap_or(0.0))
        .collect();

    let mut drivers: Vec<Driver> = DRIVER_HOSTS
        .iter()
        .enumerate()
        .map(|(index, host)| spawn_driver(&mut soak, index, *host))
        .collect();

    // The faults, at seeded times, until the soak's time is up.
    let mut rng = StdRng::seed_from_u64(seed);
    let mut faults: Vec<Fault> = Vec::new();
    let mut two_places = Vec::new();
    let started = Instant::now();
    let mut baseline_rss: Vec<Option<u64>> = (0..NODE_HOSTS).map(|_| None).collect();
    while started.elapsed() < soak_for {
        let gap = Duration::from_millis(rng.gen_range(4_000..12_000));
        let next = Instant::now() + gap;
        while Instant::now() < next {
            std::thread::sleep(Duration::from_millis(200));
            soak.runtimes();
            for driver in &mut drivers {
                if let Ok(Some(status)) = driver.child.try_wait() {
                    panic!(
                        "seed {seed}: driver on h{} ended early ({status}); its last reports: \
                         {:?}",
                        driver.host,
                        last_lines(driver, 10)
                    );
                }
            }
        }
        // Baselines once the workload warmed up (runtimes started), before the first fault.
        for (host, rss) in baseline_rss.iter_mut().enumerate() {
            if rss.is_none() {
                *rss = soak.node_rss_kb(host);
            }
        }
        let settled = faults
            .iter()
            .rev()
            .find(|f| f.kind == FaultKind::Cut)
            .is_none_or(|cut| now_ms().saturating_sub(cut.end_ms) > SETTLE.as_millis() as u64);
        if settled {
            two_places.extend(instances_in_two_places(&marks));
        }
        eprintln!(
            "chaos: nodes' RssAnon {:?} kB, open files {:?}",
            (0..NODE_HOSTS)
                .map(|host| soak.node_rss_kb(host))
                .collect::<Vec<_>>(),
            (0..NODE_HOSTS)
                .map(|host| soak.node_fds(host))
                .collect::<Vec<_>>()
        );
        if std::env::var_os("YR_CHAOS_NO_FAULTS").is_some() {
            continue;
        }
        let fault = inject(&mut soak, &mut rng);
        eprintln!(
            "chaos: {} on h{} from {} to {} ({} ms)",
            fault.kind.name(),
            fault.host,
            fault.start_ms,
            fault.end_ms,
            fault.end_ms - fault.start_ms
        );
        if matches!(fault.kind, FaultKind::NodeKill) {
            // A restarted node's RSS starts again.
            baseline_rss[fault.host] = None;
        }
        faults.push(fault);
    }

    // The end: the drivers release everything and finish.
    for driver in &mut drivers {
        drop(driver.stdin.take());
    }
    for driver in &mut drivers {
        let mut status = None;
        wait_until(DRIVER_END_BOUND, || {
            status = driver.child.try_wait().ok().flatten();
            status.is_some()
        });
        if status.is_none() {
            let _ = driver.child.kill();
            let _ = driver.child.wait();
        }
        if let Some(reader) = driver.reader.take() {
            let _ = reader.join();
        }
        assert!(
            status.is_some_and(|s| s.success()),
            "seed {seed}: driver on h{} did not finish within {DRIVER_END_BOUND:?} ({status:?}); \
             its last reports: {:?}",
            driver.host,
            last_lines(driver, 10)
        );
    }

    let rss_now = |soak: &Soak| {
        (0..NODE_HOSTS)
            .map(|host| soak.node_rss_kb(host))
            .collect::<Vec<_>>()
    };
    eprintln!(
        "chaos: the drivers finished; nodes' RssAnon {:?} kB, open files {:?}",
        rss_now(&soak),
        (0..NODE_HOSTS)
            .map(|host| soak.node_fds(host))
            .collect::<Vec<_>>()
    );
    for driver in &drivers {
        for line in driver
            .lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            if line.contains("cleanup ") || line.contains("done ") {
                eprintln!("chaos: h{}: {line}", driver.host);
            }
        }
    }

    // Judge every operation.
    let mut counts: BTreeMap<(OpKind, String), usize> = BTreeMap::new();
    let mut findings = Vec::new();
    let mut rules_used: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut accepted = Vec::new();
    for driver in &drivers {
        let host = driver.host;
        for line in driver
            .lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let Some(report) = OpReport::parse(line) else {
                continue;
            };
            let outcome = match &report.outcome {
                Outcome::Ok => "ok".to_string(),
                Outcome::Code(code) => {
                    match accepted_by(&report, host, &faults) {
                        Some(rule) => {
                            *rules_used.entry(rule.why).or_default() += 1;
                            accepted.push(format!("h{host} {line}"));
                        }
                        None => findings
                            .push(format!("code {code} with no fault that accepts it: {line}")),
                    }
                    format!("code {code}")
                }
                Outcome::Wrong(_) => {
                    findings.push(format!("a wrong value: {line}"));
                    "WRONG".to_string()
                }
                Outcome::Hang(_) => {
                    findings.push(format!("a hang: {line}"));
                    "HANG".to_string()
                }
            };
            *counts.entry((report.kind, outcome)).or_default() += 1;
        }
    }
    let mut fault_counts: BTreeMap<&str, usize> = BTreeMap::new();
    for fault in &faults {
        *fault_counts.entry(fault.kind.name()).or_default() += 1;
    }
    eprintln!("chaos: seed {seed}, {:?}", started.elapsed());
    eprintln!("chaos: faults {fault_counts:?}");
    for ((kind, outcome), count) in &counts {
        eprintln!("chaos: {:<10} {outcome:<10} {count}", kind.name());
    }
    for (why, count) in &rules_used {
        eprintln!("chaos: accepted {count} by: {why}");
    }
    // Each accepted failure, for whoever tightens the table.
    for line in &accepted {
        eprintln!("chaos: accepted: {line}");
    }
    assert!(
        ACCEPTED.iter().all(|rule| !rule.codes.is_empty()),
        "every rule names its codes"
    );
    assert!(
        counts
            .keys()
            .any(|(kind, outcome)| *kind == OpKind::Call && outcome == "ok"),
        "seed {seed}: the workload ran: {counts:?}"
    );

    // No instance in two places, once the cluster settled.
    let settled = wait_until(SETTLE, || instances_in_two_places(&marks).is_empty());
    if !settled {
        two_places.extend(instances_in_two_places(&marks));
    }
    for (label, pids) in &two_places {
        findings.push(format!(
            "instance {label} runs in processes {pids:?} at once"
        ));
    }

    // Memory back at baseline: the drivers released everything.
    for (host, baseline) in baseline_shm.iter().enumerate() {
        let mut used = None;
        let back = wait_until(Duration::from_secs(60), || {
            used = soak.shared_memory_used(host);
            used.is_some_and(|used| used <= baseline + SHARED_MEMORY_SLACK)
        });
        if !back {
            findings.push(format!(
                "node on h{host} still uses {used:?} bytes of shared memory (baseline {baseline})"
            ));
        }
    }
    eprintln!(
        "chaos: shared memory checked; nodes' RssAnon {:?} kB",
        rss_now(&soak)
    );
    for (host, baseline) in baseline_rss.iter().enumerate() {
        let (Some(baseline), Some(now)) = (baseline, soak.node_rss_kb(host)) else {
            continue;
        };
        eprintln!("chaos: node on h{host} RSS {baseline} kB before, {now} kB after");
        if now > baseline + RSS_SLACK_KB {
            findings.push(format!(
                "node on h{host} RSS grew from {baseline} kB to {now} kB"
            ));
        }
    }

    // No leaked process: stop the nodes and masters, then nothing the soak started is alive.
    soak.runtimes();
    for host in 0..NODE_HOSTS {
        if !soak.nodes[host].stop(Duration::from_secs(60)) {
            findings.push(format!(
                "node on h{host} did not stop on SIGTERM within 60 s"
            ));
        }
    }
    for master in &mut soak.masters {
        master.stop(Duration::from_secs(30));
    }
    soak.etcd.stop(Duration::from_secs(30));
    let mut leaked = Vec::new();
    wait_until(Duration::from_secs(30), || {
        leaked = soak
            .started
            .iter()
            .copied()
            .filter(|pid| alive(*pid))
            .collect();
        leaked.is_empty()
    });
    for pid in leaked {
        findings.push(format!(
            "process {pid} ({}) outlived the soak",
            yr_tests::command_line(pid)
        ));
    }
    for host in 0..=ETCD_HOST {
        let output = std::process::Command::new("ip")
            .args(["netns", "pids", &format!("{}-h{host}", set_name())])
            .output();
        if let Ok(output) = output {
            let pids = String::from_utf8_lossy(&output.stdout).trim().to_string();
            if !pids.is_empty() {
                findings.push(format!("host h{host} still runs processes {pids}"));
            }
        }
    }

    assert!(
        findings.is_empty(),
        "seed {seed} (replay: YR_CHAOS_SEED={seed}): {} findings; logs in {}:\n{}",
        findings.len(),
        soak.dir.display(),
        findings.join("\n")
    );
}

fn last_lines(driver: &Driver, count: usize) -> Vec<String> {
    let lines = driver.lines.lock().unwrap_or_else(|e| e.into_inner());
    lines.iter().rev().take(count).rev().cloned().collect()
}
