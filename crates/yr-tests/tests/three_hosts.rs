//! Three machines, each a network namespace with its own address (`scripts/netns`): the master
//! and a node on host 0, a node on hosts 1 and 2, started with `yr start --host <address>` and
//! joined with the token in `YR_TOKEN`, as on real machines. A driver on every host makes real
//! calls across them: stateless tasks placed on another host, a stateful instance created from
//! one host on a second and called from the third by name, objects above 100 KiB passed both
//! ways, an instance that user code creates on a host this driver's binary never ran on
//! (started with the driver's runtime arguments), and KV. And `yr start --host 0.0.0.0`
//! advertises the host's own address.
//!
//! Needs root and `ip netns`; elsewhere the test says loudly that it was skipped
//! (`YR_TESTS_REQUIRE_NETNS=1` makes that a failure).
//!
//! Drivers are this test binary run again in a host (`scripts/netns exec`), with
//! `YR_HOSTS_DRIVER` naming its part; they print what they saw as `yr-hosts: key=value` lines.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Stdio};
use std::time::Duration;

use serde_bytes::ByteBuf;
use yr::InvokeOptions;
use yr_tests::hosts::{skip_or_fail, HostCluster, Hosts, Isolation};
use yr_tests::{
    exclusive, for_each_stdin_line, on_label, pattern, use_this_binary_as_runtime, weighted_sum,
    TIMEOUT,
};

/// Which part a driver process plays.
const DRIVER_VAR: &str = "YR_HOSTS_DRIVER";
/// The named instance the drivers share.
const KEEPER: &str = "keeper";
/// Above the 100 KiB that keeps a value inline.
const LARGE: usize = 300 * 1024;

/// A counter that says which host it runs on.
#[yr::instance]
pub struct Keeper {
    total: i64,
}

#[yr::instance]
impl Keeper {
    pub fn new() -> Self {
        Keeper { total: 0 }
    }

    pub fn add(&mut self, n: i64) -> i64 {
        self.total += n;
        self.total
    }

    pub fn host(&self) -> String {
        this_host()
    }

    /// Whether its runtime was started to run one test (`--exact`), as the driver's runtimes
    /// are, not the whole test binary.
    pub fn runs_one_test(&self) -> bool {
        std::env::args().any(|arg| arg == "--exact")
    }

    /// Echoes a large value back with its checksum.
    pub fn echo(&self, value: ByteBuf) -> (ByteBuf, u64) {
        let sum = weighted_sum(&value);
        (value, sum)
    }
}

/// The host a runtime runs on: its node was started there with `YR_NETNS_HOST`.
fn this_host() -> String {
    std::env::var("YR_NETNS_HOST")
        .map(|i| format!("h{i}"))
        .unwrap_or_else(|_| "unknown".into())
}

#[yr::invoke]
fn host_of_task() -> String {
    this_host()
}

/// Its host and the checksum of a large value.
#[yr::invoke]
fn checksum(value: ByteBuf) -> (String, u64) {
    (this_host(), weighted_sum(&value))
}

/// A large value made on its host.
#[yr::invoke]
fn make_large(seed: usize) -> (String, ByteBuf) {
    (this_host(), pattern(seed, LARGE))
}

/// From user code on one host: create an instance on `target` and call it. Returns
/// `here->there:total:runs_one_test`.
#[yr::invoke]
fn create_on(target: String) -> String {
    let instance = yr::instance(Keeper::new)
        .options(on(&target))
        .invoke(())
        .expect("create from user code");
    let there = yr::get(&instance.method(Keeper::host).invoke(()).unwrap(), TIMEOUT)
        .expect("the nested instance's host");
    let total = yr::get(&instance.method(Keeper::add).invoke((7,)).unwrap(), TIMEOUT)
        .expect("a call of the nested instance");
    let alone = yr::get(
        &instance.method(Keeper::runs_one_test).invoke(()).unwrap(),
        TIMEOUT,
    )
    .expect("the nested instance's arguments");
    format!("{}->{there}:{total}:{alone}", this_host())
}

/// Placement on host `host` (`h0`, `h1`, …) by the node label `yr start --labels` gave it.
fn on(host: &str) -> InvokeOptions {
    on_label("host", host)
}

fn report(key: &str, value: impl std::fmt::Display) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "yr-hosts: {key}={value}");
    let _ = out.flush();
}

fn get<T: serde::de::DeserializeOwned>(object: &yr::ObjectRef<T>, what: &str) -> T {
    yr::get(object, TIMEOUT).unwrap_or_else(|e| panic!("{what} on {}: {e}", this_host()))
}

/// What every driver does on its own host: tasks on each host, large values both ways, and KV
/// on its node.
fn tasks_objects_and_kv(me: &str) {
    for host in ["h0", "h1", "h2"] {
        let ran = get(
            &yr::function(host_of_task)
                .options(on(host))
                .invoke(())
                .unwrap(),
            "a task",
        );
        report(&format!("task-{host}"), ran);
    }
    // A large argument from here to the next host, by value (in the call) and by reference
    // (an object this driver put), and a large result from there.
    let next = match me {
        "h0" => "h1",
        "h1" => "h2",
        _ => "h0",
    };
    let seed = usize::from(me.as_bytes()[1]);
    let value = pattern(seed, LARGE);
    let expected = weighted_sum(&value);
    let (ran, sum) = get(
        &yr::function(checksum)
            .options(on(next))
            .invoke((value.clone(),))
            .unwrap(),
        "a large argument",
    );
    report("large-arg", format!("{ran}:{}", sum == expected));
    let put = yr::put(value).unwrap();
    let (ran, sum) = get(
        &yr::function(checksum)
            .options(on(next))
            .invoke((&put,))
            .unwrap(),
        "a large object by reference",
    );
    report("large-ref", format!("{ran}:{}", sum == expected));
    let (ran, made) = get(
        &yr::function(make_large)
            .options(on(next))
            .invoke((seed,))
            .unwrap(),
        "a large result",
    );
    report(
        "large-result",
        format!(
            "{ran}:{}",
            made.len() == LARGE && weighted_sum(&made) == expected
        ),
    );
    // KV through this host's node.
    let key = format!("kv-{me}");
    yr::kv_write(&key, format!("from {me}").as_bytes(), Default::default()).unwrap();
    let read = yr::kv_read(&[key.as_str()], TIMEOUT).unwrap();
    report("kv", String::from_utf8_lossy(&read[0]));
    yr::kv_del(&[key.as_str()]).unwrap();
}

/// The driver on host 0: creates the shared instance on host 1, then waits for stdin to close
/// (the others call it meanwhile) and reports its total.
fn owner() {
    // First of all, so that host 2's node learns of this binary from a runtime's create: user
    // code on host 1 creates an instance on host 2, started with the driver's arguments.
    report(
        "nested",
        get(
            &yr::function(create_on)
                .options(on("h1"))
                .invoke(("h2".to_string(),))
                .unwrap(),
            "a nested create",
        ),
    );
    let keeper = yr::instance(Keeper::new)
        .options(InvokeOptions {
            name: Some(KEEPER.into()),
            ..on("h1")
        })
        .invoke(())
        .unwrap();
    report(
        "keeper-host",
        get(&keeper.method(Keeper::host).invoke(()).unwrap(), "host"),
    );
    report(
        "keeper-add",
        get(&keeper.method(Keeper::add).invoke((5,)).unwrap(), "add"),
    );
    let value = pattern(11, LARGE);
    let (echoed, sum) = get(
        &keeper
            .method(Keeper::echo)
            .invoke((value.clone(),))
            .unwrap(),
        "echo",
    );
    report(
        "keeper-echo",
        echoed == value && sum == weighted_sum(&value),
    );
    tasks_objects_and_kv("h0");
    report("ready", true);
    // The others call the keeper now; stdin closes when they are done.
    for_each_stdin_line(|| {});
    report(
        "keeper-final",
        get(&keeper.method(Keeper::add).invoke((0,)).unwrap(), "add"),
    );
}

/// A driver on host 1 or 2: calls the keeper by name, and the rest.
fn caller(me: &str, add: i64) {
    let keeper = yr::get_instance::<Keeper>(KEEPER, "", TIMEOUT).unwrap();
    report(
        "keeper-host",
        get(&keeper.method(Keeper::host).invoke(()).unwrap(), "host"),
    );
    report(
        "keeper-add",
        get(&keeper.method(Keeper::add).invoke((add,)).unwrap(), "add"),
    );
    tasks_objects_and_kv(me);
}

fn run_driver(part: &str) {
    use_this_binary_as_runtime();
    let mut config = yr::Config::default();
    config.local_mode = false;
    yr::init(config).unwrap_or_else(|e| panic!("yr::init on {}: {e}", this_host()));
    match part {
        "owner" => owner(),
        "caller-h1" => caller("h1", 1),
        "caller-h2" => caller("h2", 10),
        other => panic!("{DRIVER_VAR}={other:?} names no part"),
    }
    yr::finalize().unwrap();
}

/// A driver process on `host` playing `part` in `test`, its stdout piped.
fn spawn_driver(hosts: &Hosts, test: &str, host: usize, part: &str) -> Child {
    let exe = std::env::current_exe().expect("this test binary");
    hosts
        .command(host, exe)
        .args([test, "--exact", "--nocapture", "--test-threads", "1"])
        .env(DRIVER_VAR, part)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start the {part} driver: {e}"))
}

/// The `yr-hosts:` lines of a driver's output until `until` (or the end), as key=value pairs.
fn read_reports(reader: &mut impl BufRead, until: Option<&str>) -> Vec<(String, String)> {
    let mut reports = Vec::new();
    let mut line = String::new();
    while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
        // libtest may have begun the line ("test … ... ") before the driver's first report.
        if let Some((key, value)) = line
            .trim_end()
            .split_once("yr-hosts: ")
            .and_then(|(_, report)| report.split_once('='))
        {
            reports.push((key.to_string(), value.to_string()));
            if Some(key) == until {
                break;
            }
        }
        line.clear();
    }
    reports
}

/// Wait for a driver to end (at most `timeout`) and check that it succeeded.
fn finish(mut child: Child, part: &str, timeout: Duration) {
    let mut status = None;
    yr_tests::wait_until(timeout, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    match status {
        Some(status) => assert!(status.success(), "the {part} driver failed: {status}"),
        None => {
            let _ = child.kill();
            panic!("the {part} driver did not end within {timeout:?}");
        }
    }
}

fn expect(reports: &[(String, String)], part: &str, expected: &[(&str, &str)]) {
    for (key, value) in expected {
        let seen = reports
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str());
        assert_eq!(
            seen,
            Some(*value),
            "the {part} driver's {key}; it reported {reports:?}"
        );
    }
}

#[test]
fn a_driver_on_every_host_calls_tasks_instances_objects_and_kv_across_hosts() {
    let _lock = exclusive();
    every_host_calls_every_other(
        "a_driver_on_every_host_calls_tasks_instances_objects_and_kv_across_hosts",
        Isolation::SharedFileSystem,
    );
}

/// The same with each host's processes unable to see the other hosts' directories, as on real
/// machines: calls and object fetches across hosts go over TCP (the runtimes' call listeners
/// and the owners' Worker services on their hosts' addresses), never through a Unix socket path
/// of another host.
#[test]
fn with_no_file_system_shared_a_driver_on_every_host_calls_across_hosts() {
    let _lock = exclusive();
    every_host_calls_every_other(
        "with_no_file_system_shared_a_driver_on_every_host_calls_across_hosts",
        Isolation::PrivateFileSystems,
    );
}

fn every_host_calls_every_other(test: &str, isolation: Isolation) {
    if let Ok(part) = std::env::var(DRIVER_VAR) {
        run_driver(&part);
        return;
    }
    let hosts = match Hosts::up(3, isolation) {
        Ok(hosts) => hosts,
        Err(why) => return skip_or_fail(test, &why),
    };
    let cluster = HostCluster::start(&hosts, |_| Vec::new());
    // Any host sees the three nodes, each at its own host's address.
    let status = cluster.status(&hosts, 2).expect("yr status on host 2");
    let mut addresses: Vec<String> = status["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|node| node["address"].as_str().unwrap_or_default().to_string())
        .collect();
    addresses.sort();
    assert_eq!(
        addresses,
        (0..3)
            .map(|i| format!("{}:22773", hosts.address(i)))
            .collect::<Vec<_>>(),
        "{status}"
    );

    let mut owner = spawn_driver(&hosts, test, 0, "owner");
    let mut owner_out = BufReader::new(owner.stdout.take().expect("the owner's stdout"));
    let mut owner_reports = read_reports(&mut owner_out, Some("ready"));
    let tasks_everywhere = [("task-h0", "h0"), ("task-h1", "h1"), ("task-h2", "h2")];
    expect(&owner_reports, "owner", &tasks_everywhere);
    expect(
        &owner_reports,
        "owner",
        &[
            ("nested", "h1->h2:7:true"),
            ("keeper-host", "h1"),
            ("keeper-add", "5"),
            ("keeper-echo", "true"),
            ("large-arg", "h1:true"),
            ("large-ref", "h1:true"),
            ("large-result", "h1:true"),
            ("kv", "from h0"),
            ("ready", "true"),
        ],
    );

    // Host 2 calls the instance that host 0 created on host 1, then host 1 does.
    let mut third = spawn_driver(&hosts, test, 2, "caller-h2");
    let third_reports = read_reports(
        &mut BufReader::new(third.stdout.take().expect("stdout")),
        None,
    );
    finish(third, "caller-h2", TIMEOUT);
    expect(&third_reports, "caller-h2", &tasks_everywhere);
    expect(
        &third_reports,
        "caller-h2",
        &[
            ("keeper-host", "h1"),
            ("keeper-add", "15"),
            ("large-arg", "h0:true"),
            ("large-ref", "h0:true"),
            ("large-result", "h0:true"),
            ("kv", "from h2"),
        ],
    );
    let mut second = spawn_driver(&hosts, test, 1, "caller-h1");
    let second_reports = read_reports(
        &mut BufReader::new(second.stdout.take().expect("stdout")),
        None,
    );
    finish(second, "caller-h1", TIMEOUT);
    expect(&second_reports, "caller-h1", &tasks_everywhere);
    expect(
        &second_reports,
        "caller-h1",
        &[
            ("keeper-host", "h1"),
            ("keeper-add", "16"),
            ("large-arg", "h2:true"),
            ("large-ref", "h2:true"),
            ("large-result", "h2:true"),
            ("kv", "from h1"),
        ],
    );

    // The owner sees every call the others made.
    drop(owner.stdin.take());
    owner_reports.extend(read_reports(&mut owner_out, None));
    finish(owner, "owner", TIMEOUT);
    expect(&owner_reports, "owner", &[("keeper-final", "16")]);
}

/// On machines with no route to a private address (these namespaces have none), `yr start
/// --host 0.0.0.0` advertises the address of the host's interface, not 127.0.0.1, which every
/// other host would take for itself.
#[test]
fn yr_start_on_every_interface_advertises_the_hosts_address() {
    let _lock = exclusive();
    let test = "yr_start_on_every_interface_advertises_the_hosts_address";
    let hosts = match Hosts::up(2, Isolation::SharedFileSystem) {
        Ok(hosts) => hosts,
        Err(why) => return skip_or_fail(test, &why),
    };
    let yr = yr_tests::yr_binary();
    let start = |index: usize, token: &str| {
        let mut command = hosts.command(index, &yr);
        command.args(["start", "--host", "0.0.0.0"]);
        if index == 0 {
            command.arg("--master");
        } else {
            command
                .args(["--master-address", &format!("{}:22770", hosts.address(0))])
                .env("YR_TOKEN", token);
        }
        let output = yr_tests::output_within(command, TIMEOUT);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "yr start on host {index}: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    };
    let started = start(0, "");
    assert!(
        started.contains(&format!("master:  {}:22770", hosts.address(0))),
        "{started}"
    );
    let token = std::fs::read_to_string(hosts.dir(0).join("sessions/latest/token")).unwrap();
    start(1, token.trim());
    let master = format!("{}:22770", hosts.address(0));
    let addresses = || -> Vec<String> {
        let mut command = hosts.command(1, &yr);
        command
            .args(["status", "--json", "--master-address", &master])
            .env("YR_TOKEN", token.trim());
        let output = yr_tests::output_within(command, TIMEOUT);
        let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
        let mut addresses: Vec<String> = status["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|node| node["address"].as_str().unwrap_or_default().to_string())
            .collect();
        addresses.sort();
        addresses
    };
    yr_tests::wait_until(TIMEOUT, || addresses().len() == 2);
    assert_eq!(
        addresses(),
        vec![
            format!("{}:22773", hosts.address(0)),
            format!("{}:22773", hosts.address(1)),
        ]
    );
}
