//! Hosts for multi-machine tests: each "machine" is a Linux network namespace with an address of
//! its own on a private bridge (10.77.0.0/24), made and removed by `scripts/netns`. A
//! [`Hosts`] guard creates them and removes them when dropped (also when the test panics),
//! killing every process that still runs in them. [`HostCluster`] runs `yr start` in them the
//! way an operator would on real machines: the master and a node on host 0, a node on every
//! other host joining it with `--master-address` and the cluster token in `YR_TOKEN`, each
//! listening on its host's address (`--host`).
//!
//! Each host has its own `TMPDIR` and `YR_SESSION_ROOT` (under `/tmp/yr-netns/h<i>`), so the
//! sessions and sockets of one host are never paths that another host uses, and a driver run
//! in host `i` finds host `i`'s node by itself. Processes still share the machine's file system
//! and process table; with [`Isolation::PrivateFileSystems`] every other host's directory is
//! hidden from a host's processes (`YR_NETNS_ISOLATE_FS=1`, see `scripts/netns`).
//!
//! A test cuts a host off the others with [`Hosts::cut`] (its port on the bridge goes down, so
//! its packets to the other hosts, and theirs to it, are dropped silently, as when a cable is
//! pulled: open connections hang rather than fail) and restores it with [`Hosts::restore`].
//! [`Hosts::in_host`] runs code of the test process itself inside a host's network namespace
//! (a thread of its own enters it), for example to read the master's meta store on host 0.
//!
//! Namespaces need root and `ip`. Without them [`Hosts::up`] says why ([`Unavailable`]), and a
//! test reports itself skipped, loudly, with [`skip_or_fail`]; `YR_TESTS_REQUIRE_NETNS=1`
//! (CI, as root) turns that skip into a failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::{output_within, wait_until, yr_binary, START_TIMEOUT};

/// The master's port on host 0 (`yr start`'s default: each host has its own ports).
pub const MASTER_PORT: u16 = 22770;

/// Set to 1 where multi-machine tests must run (CI runs as root): a missing `ip netns` fails.
pub const REQUIRE_VAR: &str = "YR_TESTS_REQUIRE_NETNS";

/// Why the hosts cannot be made on this machine.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    /// Network namespaces need root.
    #[error("network namespaces need root (this test runs as uid {0})")]
    NotRoot(u32),
    /// `ip netns` does not work here.
    #[error("`ip netns add` does not work here ({0}); it needs iproute2 and CAP_SYS_ADMIN")]
    NoIpNetns(String),
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

/// Say loudly that `test` was skipped because `why`, and return; or panic when
/// [`REQUIRE_VAR`] says the hosts must be available. The notice goes straight to the process's
/// standard error, past libtest's capture, so it shows even when the test "passes".
pub fn skip_or_fail(test: &str, why: &Unavailable) {
    use std::io::Write;
    if std::env::var(REQUIRE_VAR).as_deref() == Ok("1") {
        panic!("{test} cannot run: {why} ({REQUIRE_VAR}=1)");
    }
    let rule = "=".repeat(72);
    let _ = write!(
        std::io::stderr().lock(),
        "\n{rule}\nSKIPPED {test}: {why}.\nIt needs root and `ip netns`: run it as root (CI \
         does), or set {REQUIRE_VAR}=1 to make this a failure.\n{rule}\n\n"
    );
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
    pub fn available() -> Result<(), Unavailable> {
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        if uid != 0 {
            return Err(Unavailable::NotRoot(uid));
        }
        // Root in a container may still lack the right to make namespaces: make one to see.
        let probe = format!("yr-probe-{}", std::process::id());
        let made = Command::new("ip").args(["netns", "add", &probe]).output();
        let _ = Command::new("ip").args(["netns", "del", &probe]).output();
        match made {
            Ok(output) if output.status.success() => Ok(()),
            Ok(output) => Err(Unavailable::NoIpNetns(
                String::from_utf8_lossy(&output.stderr).trim().to_string(),
            )),
            Err(error) => Err(Unavailable::NoIpNetns(error.to_string())),
        }
    }

    /// Make `count` hosts, after removing any that a killed run left behind.
    pub fn up(count: usize, isolation: Isolation) -> Result<Hosts, Unavailable> {
        Self::available()?;
        let _ = run_script(&["down"]);
        let output = run_script(&["up", &count.to_string()]);
        assert!(
            output.status.success(),
            "scripts/netns up {count} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(Hosts { count, isolation })
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
    pub fn command(&self, index: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
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
}

impl Hosts {
    /// Cuts host `index` off every other host: its port on the bridge (`<name>-h<index>` in
    /// the hub namespace) goes down. Its own interface stays up and keeps its address, so the
    /// host's processes see no error: their packets to the other hosts are lost, as theirs to
    /// it. Only the test's own namespaces are touched.
    pub fn cut(&self, index: usize) {
        self.set_link(index, "down");
    }

    /// Undoes [`Hosts::cut`]: host `index`'s port on the bridge comes up again.
    pub fn restore(&self, index: usize) {
        self.set_link(index, "up");
    }

    /// Cuts hosts `a` and `b` off each other only: each drops the other's packets (a blackhole
    /// route to the other's address in its namespace), while both still reach every other
    /// host. Connections between them hang, as across a broken switch port between two racks.
    pub fn cut_between(&self, a: usize, b: usize) {
        self.set_route(a, b, "add");
        self.set_route(b, a, "add");
    }

    /// Undoes [`Hosts::cut_between`].
    pub fn restore_between(&self, a: usize, b: usize) {
        self.set_route(a, b, "del");
        self.set_route(b, a, "del");
    }

    fn set_route(&self, from: usize, to: usize, action: &str) {
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
        let output = output_within(command, Duration::from_secs(30));
        assert!(
            output.status.success(),
            "ip -n {namespace} route {action} blackhole {target} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn set_link(&self, index: usize, state: &str) {
        assert!(index < self.count, "there is no host {index}");
        let name = set_name();
        let (hub, port) = (format!("{name}-hub"), format!("{name}-h{index}"));
        let mut command = Command::new("ip");
        command
            .args(["-n", &hub, "link", "set", &port, state])
            .stdin(Stdio::null());
        let output = output_within(command, Duration::from_secs(30));
        assert!(
            output.status.success(),
            "ip -n {hub} link set {port} {state} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Runs `work` on a thread of this process that has entered host `index`'s network
    /// namespace, so that every connection it makes (and every thread it starts) is made from
    /// that host. Returns what `work` returns.
    pub fn in_host<T: Send>(&self, index: usize, work: impl FnOnce() -> T + Send) -> T {
        assert!(index < self.count, "there is no host {index}");
        let path = format!("/var/run/netns/{}-h{index}", set_name());
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    let namespace = std::fs::File::open(&path)
                        .unwrap_or_else(|e| panic!("cannot open {path}: {e}"));
                    // SAFETY: setns on a namespace file descriptor this thread holds open; it
                    // changes only this thread's network namespace.
                    let entered = unsafe {
                        libc::setns(
                            std::os::fd::AsRawFd::as_raw_fd(&namespace),
                            libc::CLONE_NEWNET,
                        )
                    };
                    assert_eq!(
                        entered,
                        0,
                        "cannot enter {path}: {}",
                        std::io::Error::last_os_error()
                    );
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
            eprintln!("yr-tests: kept the hosts (scripts/netns down removes them)");
            return;
        }
        let output = run_script(&["down"]);
        if !output.status.success() {
            eprintln!(
                "yr-tests: scripts/netns down failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

fn run_script(args: &[&str]) -> Output {
    let mut command = Command::new(netns_script());
    command.args(args).stdin(Stdio::null());
    output_within(command, Duration::from_secs(60))
}

/// A cluster started with `yr start` across [`Hosts`]: the master and a node on host 0, a node
/// on each other host. Each node has the label `host=h<i>`. Stopped with the hosts.
pub struct HostCluster {
    token: String,
    master_address: String,
}

impl HostCluster {
    /// Start it and wait until the master lists every host's node as alive. `extra(i)` gives
    /// host `i`'s node more `yr start` flags.
    pub fn start(hosts: &Hosts, extra: impl Fn(usize) -> Vec<String>) -> HostCluster {
        let yr = yr_binary();
        let master_address = format!("{}:{MASTER_PORT}", hosts.address(0));
        let mut token = String::new();
        for index in 0..hosts.count() {
            let mut command = hosts.command(index, &yr);
            command.arg("start");
            if index == 0 {
                command.args(["--master", "--port", &MASTER_PORT.to_string()]);
            } else {
                command
                    .args(["--master-address", &master_address])
                    .env(yr_common::auth::TOKEN_ENV, &token);
            }
            command
                .args(["--host", &hosts.address(index)])
                .args(["--labels", &format!("host=h{index}")])
                .args(extra(index));
            let output = output_within(command, START_TIMEOUT);
            assert!(
                output.status.success(),
                "yr start on host {index} failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            if index == 0 {
                // The operator copies the token from the master's session; the other hosts
                // get it in YR_TOKEN, never through a shared file.
                let file = hosts.dir(0).join("sessions/latest/token");
                token = std::fs::read_to_string(&file)
                    .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()))
                    .trim()
                    .to_string();
            }
        }
        // This process reads the master's meta store from host 0 with it.
        if let Ok(parsed) = yr_common::auth::ClusterToken::parse(&token) {
            yr_transport::install(yr_transport::Credentials::with_token(parsed));
        }
        let cluster = HostCluster {
            token,
            master_address,
        };
        let mut last = None;
        let all_alive = wait_until(START_TIMEOUT, || {
            let status = cluster.status(hosts, hosts.count() - 1);
            let alive = status.as_ref().is_ok_and(|status| {
                status["nodes"].as_array().is_some_and(|nodes| {
                    nodes.iter().filter(|n| n["state"] == "alive").count() == hosts.count()
                })
            });
            last = Some(status);
            alive
        });
        assert!(
            all_alive,
            "the master did not list {} alive nodes within {START_TIMEOUT:?}: {last:?}",
            hosts.count()
        );
        cluster
    }

    /// The cluster token, as the other hosts were given it.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The master's address (`host:port` on host 0).
    pub fn master_address(&self) -> &str {
        &self.master_address
    }

    /// The record of `instance_id` in the master's meta store, read from host 0.
    pub fn stored_instance(
        &self,
        hosts: &Hosts,
        instance_id: &str,
    ) -> Result<Option<yr_proto::v1::InstanceRecord>, String> {
        hosts.in_host(0, || {
            crate::stored_record(&self.master_address, instance_id)
        })
    }

    /// Follow the record of `instance_id` in the master's meta store from now on, from host 0
    /// (see [`crate::watch_record`]).
    pub fn watch_instance(&self, hosts: &Hosts, instance_id: &str) -> crate::RecordHistory {
        hosts.in_host(0, || crate::watch_record(&self.master_address, instance_id))
    }

    /// `yr status --json` run on host `index` against the master, with the token in
    /// `YR_TOKEN`.
    pub fn status(&self, hosts: &Hosts, index: usize) -> Result<serde_json::Value, String> {
        let mut command = hosts.command(index, yr_binary());
        command
            .args(["status", "--json", "--master-address", &self.master_address])
            .env(yr_common::auth::TOKEN_ENV, &self.token);
        let output = output_within(command, Duration::from_secs(30));
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        serde_json::from_slice(&output.stdout).map_err(|e| e.to_string())
    }
}
