//! yr-netns: "machines" for multi-machine tests and benchmarks. Each host is a Linux network
//! namespace with an address of its own on a private bridge (10.77.0.0/24), made and removed by
//! `scripts/netns`. A [`Hosts`] guard creates them and removes them when dropped, killing every
//! process that still runs in them. [`Hosts::start_cluster`] runs `yr start` in them the way an
//! operator would on real machines: the master and a node on host 0, a node on every other host
//! joining it with `--master-address` and the cluster token in `YR_TOKEN`, each listening on its
//! host's address (`--host`).
//!
//! Each host has its own `TMPDIR` and `YR_SESSION_ROOT` (under `/tmp/yr-netns/h<i>`), so the
//! sessions and sockets of one host are never paths that another host uses, and a driver run
//! in host `i` finds host `i`'s node by itself. Processes still share the machine's file system
//! and process table; with [`Isolation::PrivateFileSystems`] every other host's directory is
//! hidden from a host's processes (`YR_NETNS_ISOLATE_FS=1`, see `scripts/netns`).
//!
//! [`Hosts::cut`] cuts a host off the others (its port on the bridge goes down, so packets are
//! dropped silently, as when a cable is pulled) and [`Hosts::restore`] undoes it.
//! [`Hosts::enter`] moves the calling thread into a host's network namespace, so that the
//! connections it makes are made from that host.
//!
//! This crate owns no yr behaviour; `yr-tests` (`yr_tests::hosts`) and `yr-bench`'s cross-host
//! cases use it. Namespaces need root and `ip`: without them [`Hosts::up`] says why.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The master's port on host 0 (`yr start`'s default: each host has its own ports).
pub const MASTER_PORT: u16 = 22770;

/// How long `yr start` on a host, and the nodes' registration, may take.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Why hosts cannot be made, or a step with them failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Network namespaces need root.
    #[error("network namespaces need root (this process runs as uid {0})")]
    NotRoot(u32),
    /// `ip netns` does not work here.
    #[error("`ip netns add` does not work here ({0}); it needs iproute2 and CAP_SYS_ADMIN")]
    NoIpNetns(String),
    /// A command run for the hosts failed or did not finish in time.
    #[error("{command} failed: {detail}")]
    Command {
        /// The command, as run.
        command: String,
        /// Its error output, or why it could not run.
        detail: String,
    },
    /// The cluster did not come up across the hosts.
    #[error("the cluster across the hosts did not come up: {0}")]
    Cluster(String),
}

impl Error {
    /// Whether this machine cannot make hosts at all (rather than a step having failed).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::NotRoot(_) | Error::NoIpNetns(_))
    }
}

/// The name of this run's set of hosts (`YR_NETNS_NAME`, default `yr`; see `scripts/netns`):
/// its namespaces are `<name>-hub` and `<name>-h<i>`, so runs with different names do not meet.
pub fn set_name() -> String {
    std::env::var("YR_NETNS_NAME").unwrap_or_else(|_| "yr".to_string())
}

/// The `scripts/netns` of this repository.
pub fn netns_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/netns")
}

/// What the hosts' processes share of the machine's file system.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isolation {
    /// Each host has its own directories, but a process could still reach a path of another
    /// host's (a Unix socket it was told about).
    SharedFileSystem,
    /// Every other host's directory is hidden from a host's processes
    /// (`YR_NETNS_ISOLATE_FS=1`), as on real machines.
    PrivateFileSystems,
}

/// `count` network namespaces made by `scripts/netns up`, removed (with every process left in
/// them) when dropped.
pub struct Hosts {
    count: usize,
    isolation: Isolation,
}

impl Hosts {
    /// Whether this machine can make hosts.
    pub fn available() -> Result<(), Error> {
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        if uid != 0 {
            return Err(Error::NotRoot(uid));
        }
        // Root in a container may still lack the right to make namespaces: make one to see.
        let probe = format!("yr-probe-{}", std::process::id());
        let made = Command::new("ip").args(["netns", "add", &probe]).output();
        let _ = Command::new("ip").args(["netns", "del", &probe]).output();
        match made {
            Ok(output) if output.status.success() => Ok(()),
            Ok(output) => Err(Error::NoIpNetns(
                String::from_utf8_lossy(&output.stderr).trim().to_string(),
            )),
            Err(error) => Err(Error::NoIpNetns(error.to_string())),
        }
    }

    /// Make `count` hosts, after removing any that a killed run left behind.
    pub fn up(count: usize, isolation: Isolation) -> Result<Hosts, Error> {
        Self::available()?;
        let _ = Hosts::down();
        run_script(&["up", &count.to_string()])?;
        Ok(Hosts { count, isolation })
    }

    /// Remove every host `scripts/netns up` made, with the processes in them (what dropping a
    /// [`Hosts`] does; for a signal handler that cannot reach the guard).
    pub fn down() -> Result<(), Error> {
        run_script(&["down"])
    }

    /// How many hosts there are.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Host `index`'s address.
    pub fn address(&self, index: usize) -> String {
        format!("10.77.0.{}", 10 + index)
    }

    /// Host `index`'s own directory (its `TMPDIR` and session root are inside).
    pub fn dir(&self, index: usize) -> PathBuf {
        let base = std::env::var_os("YR_NETNS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| match set_name().as_str() {
                "yr" => PathBuf::from("/tmp/yr-netns"),
                name => PathBuf::from(format!("/tmp/yr-netns-{name}")),
            });
        base.join(format!("h{index}"))
    }

    /// A command that runs `program` in host `index`, with the host's `TMPDIR` and
    /// `YR_SESSION_ROOT` (and only its own directory in sight with
    /// [`Isolation::PrivateFileSystems`]), stdin closed.
    pub fn command(&self, index: usize, program: impl AsRef<OsStr>) -> Command {
        assert!(index < self.count, "there is no host {index}");
        let mut command = Command::new(netns_script());
        command
            .arg("exec")
            .arg(index.to_string())
            .arg(program)
            .env(
                "YR_NETNS_ISOLATE_FS",
                match self.isolation {
                    Isolation::SharedFileSystem => "0",
                    Isolation::PrivateFileSystems => "1",
                },
            )
            .stdin(Stdio::null());
        command
    }

    /// Cuts host `index` off every other host: its port on the bridge (`<name>-h<index>` in
    /// the hub namespace) goes down. Its own interface stays up and keeps its address, so the
    /// host's processes see no error: their packets to the other hosts are lost, as theirs to
    /// it. Only the hosts' own namespaces are touched.
    pub fn cut(&self, index: usize) -> Result<(), Error> {
        self.set_link(index, "down")
    }

    /// Undoes [`Hosts::cut`]: host `index`'s port on the bridge comes up again.
    pub fn restore(&self, index: usize) -> Result<(), Error> {
        self.set_link(index, "up")
    }

    /// Cuts hosts `a` and `b` off each other only: each drops the other's packets (a blackhole
    /// route to the other's address in its namespace), while both still reach every other
    /// host. Connections between them hang, as across a broken switch port between two racks.
    pub fn cut_between(&self, a: usize, b: usize) -> Result<(), Error> {
        self.set_route(a, b, "add")?;
        self.set_route(b, a, "add")
    }

    /// Undoes [`Hosts::cut_between`].
    pub fn restore_between(&self, a: usize, b: usize) -> Result<(), Error> {
        self.set_route(a, b, "del")?;
        self.set_route(b, a, "del")
    }

    fn set_route(&self, from: usize, to: usize, action: &str) -> Result<(), Error> {
        assert!(
            from < self.count && to < self.count,
            "there is no such host"
        );
        let namespace = format!("{}-h{from}", set_name());
        let target = format!("{}/32", self.address(to));
        let mut command = Command::new("ip");
        command
            .args(["-n", &namespace, "route", action, "blackhole", &target])
            .stdin(Stdio::null());
        checked(command, Duration::from_secs(30))
    }

    fn set_link(&self, index: usize, state: &str) -> Result<(), Error> {
        assert!(index < self.count, "there is no host {index}");
        let name = set_name();
        let (hub, port) = (format!("{name}-hub"), format!("{name}-h{index}"));
        let mut command = Command::new("ip");
        command
            .args(["-n", &hub, "link", "set", &port, state])
            .stdin(Stdio::null());
        checked(command, Duration::from_secs(30))
    }

    /// Moves the calling thread into host `index`'s network namespace: every connection it
    /// makes from now on (and every thread it starts) is made from that host. The rest of the
    /// process stays where it is.
    pub fn enter(&self, index: usize) -> std::io::Result<()> {
        assert!(index < self.count, "there is no host {index}");
        let namespace = std::fs::File::open(format!("/var/run/netns/{}-h{index}", set_name()))?;
        // SAFETY: setns on a namespace file descriptor this thread holds open; it changes only
        // this thread's network namespace.
        let entered = unsafe {
            libc::setns(
                std::os::fd::AsRawFd::as_raw_fd(&namespace),
                libc::CLONE_NEWNET,
            )
        };
        if entered == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Runs `work` on a thread of this process that has entered host `index`'s network
    /// namespace ([`Hosts::enter`]). Returns what `work` returns; panics if the thread cannot
    /// enter the namespace.
    pub fn in_host<T: Send>(&self, index: usize, work: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    if let Err(error) = self.enter(index) {
                        panic!("cannot enter host {index}'s network namespace: {error}");
                    }
                    work()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        if std::env::var_os("YR_TESTS_KEEP").is_some() {
            eprintln!("yr-netns: kept the hosts (scripts/netns down removes them)");
            return;
        }
        if let Err(error) = Hosts::down() {
            eprintln!("yr-netns: {error}");
        }
    }
}

fn run_script(args: &[&str]) -> Result<(), Error> {
    let mut command = Command::new(netns_script());
    command.args(args).stdin(Stdio::null());
    checked(command, Duration::from_secs(60))
}

/// Run `command` (at most `timeout`) and fail with its error output unless it succeeds.
fn checked(command: Command, timeout: Duration) -> Result<(), Error> {
    let description = format!("{command:?}");
    let output = output_within(command, timeout)?;
    if output.status.success() {
        return Ok(());
    }
    Err(Error::Command {
        command: description,
        detail: String::from_utf8_lossy(&output.stderr).trim().to_string(),
    })
}

/// Run `command` to its end, at most `timeout` (then it is killed), with its output captured.
pub fn output_within(mut command: Command, timeout: Duration) -> Result<Output, Error> {
    let description = format!("{command:?}");
    let failed = |detail: String| Error::Command {
        command: description.clone(),
        detail,
    };
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(format!("cannot run it: {e}")))?;
    let pid = child.id();
    let (sender, receiver) = std::sync::mpsc::sync_channel(1);
    std::thread::spawn(move || {
        let _ = sender.send(child.wait_with_output());
    });
    match receiver.recv_timeout(timeout) {
        Ok(output) => output.map_err(|e| failed(e.to_string())),
        Err(_) => {
            // SAFETY: kill has no memory-safety preconditions; `pid` is the child started here,
            // not yet reaped (its waiter has not returned).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            Err(failed(format!("it did not finish within {timeout:?}")))
        }
    }
}

/// A cluster started with `yr start` across [`Hosts`] ([`Hosts::start_cluster`]). Its
/// processes stop with the hosts.
pub struct Cluster {
    /// The cluster token, as the other hosts were given it (`YR_TOKEN`).
    pub token: String,
    /// The master's address (`host:port` on host 0).
    pub master_address: String,
    /// The `yr` binary it was started with.
    pub yr: PathBuf,
}

impl Hosts {
    /// Start a cluster with the `yr` binary `yr`: the master and a node on host 0, a node on
    /// each other host, each listening on its host's address and labelled `host=h<i>`; then
    /// wait until the master lists every host's node as alive. `extra(i)` gives host `i`'s
    /// node more `yr start` flags.
    pub fn start_cluster(
        &self,
        yr: &Path,
        extra: impl Fn(usize) -> Vec<String>,
    ) -> Result<Cluster, Error> {
        let master_address = format!("{}:{MASTER_PORT}", self.address(0));
        let mut token = String::new();
        for index in 0..self.count {
            let mut command = self.command(index, yr);
            command.arg("start");
            if index == 0 {
                command.args(["--master", "--port", &MASTER_PORT.to_string()]);
            } else {
                command
                    .args(["--master-address", &master_address])
                    .env(yr_common::auth::TOKEN_ENV, &token);
            }
            command
                .args(["--host", &self.address(index)])
                .args(["--labels", &format!("host=h{index}")])
                .args(extra(index));
            let output = output_within(command, START_TIMEOUT)?;
            if !output.status.success() {
                return Err(Error::Cluster(format!(
                    "yr start on host {index} failed: {}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                )));
            }
            if index == 0 {
                // The operator copies the token from the master's session; the other hosts
                // get it in YR_TOKEN, never through a shared file.
                let file = self.dir(0).join("sessions/latest/token");
                token = std::fs::read_to_string(&file)
                    .map_err(|e| Error::Cluster(format!("cannot read {}: {e}", file.display())))?
                    .trim()
                    .to_string();
            }
        }
        let cluster = Cluster {
            token,
            master_address,
            yr: yr.to_path_buf(),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let status = self.status(&cluster, self.count - 1);
            let alive = status.as_ref().is_ok_and(|status| {
                status["nodes"].as_array().is_some_and(|nodes| {
                    nodes.iter().filter(|n| n["state"] == "alive").count() == self.count
                })
            });
            if alive {
                return Ok(cluster);
            }
            if Instant::now() >= deadline {
                return Err(Error::Cluster(format!(
                    "the master did not list {} alive nodes within {START_TIMEOUT:?}: {status:?}",
                    self.count
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `yr status --json` run on host `index` against `cluster`'s master, with the token in
    /// `YR_TOKEN`.
    pub fn status(&self, cluster: &Cluster, index: usize) -> Result<serde_json::Value, String> {
        let mut command = self.command(index, &cluster.yr);
        command
            .args([
                "status",
                "--json",
                "--master-address",
                &cluster.master_address,
            ])
            .env(yr_common::auth::TOKEN_ENV, &cluster.token);
        let output = output_within(command, Duration::from_secs(30)).map_err(|e| e.to_string())?;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        serde_json::from_slice(&output.stdout).map_err(|e| e.to_string())
    }
}
