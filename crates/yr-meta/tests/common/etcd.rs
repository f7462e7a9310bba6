//! Real etcd processes for tests: a single member, or a cluster of members, on free loopback
//! ports with their data in a temp dir, ready when their `/health` says so, killed on drop.
//! Uses only std, so other crates' tests include it with `#[path]`.
//!
//! etcd is Debian's `etcd-server` (`scripts/test` installs it). Without it the tests fail and
//! say so: they never skip.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a member may take to answer `/health` (generous: CI machines are shared).
const READY_DEADLINE: Duration = Duration::from_secs(60);

/// One etcd member.
pub struct EtcdMember {
    pub name: String,
    pub client_port: u16,
    /// Where `/health` answers over plain HTTP: the client port, or a metrics port of its own
    /// when the client port speaks TLS.
    pub health_port: u16,
    pub peer_port: u16,
    child: Option<Child>,
    pub log: PathBuf,
    /// The binary and arguments it was started with, to start it again on its data dir.
    command: (PathBuf, Vec<String>),
}

impl EtcdMember {
    /// `127.0.0.1:<client port>`, the form `--etcd` and `EtcdOptions` take.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// Kills the member at once (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The member's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the member again (after [`EtcdMember::kill`]) on the same ports and data dir,
    /// appending to its log, and waits until it is healthy.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Some(spawn_member(
            &self.command.0,
            &self.command.1,
            &self.log,
            true,
        ));
        let started = Instant::now();
        while !health(self.health_port) {
            assert!(
                started.elapsed() < READY_DEADLINE,
                "etcd member {} not healthy {READY_DEADLINE:?} after its restart",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn spawn_member(binary: &Path, args: &[String], log: &Path, append: bool) -> Child {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(append)
        .write(true)
        .truncate(!append)
        .open(log)
        .expect("an etcd log file");
    let log_err = log_file.try_clone().expect("an etcd log file");
    Command::new(binary)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log_file))
        .stderr(Stdio::from(log_err))
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start {}: {err}", binary.display()))
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The PEM files of an etcd member that serves TLS: its certificate and key, and the CA its
/// clients' certificates must chain to.
pub struct ServerTls {
    pub certificate: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// A set of etcd members forming one cluster, with their data dirs (removed on drop).
pub struct Etcd {
    pub members: Vec<EtcdMember>,
    dir: PathBuf,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn etcd_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("YR_ETCD") {
        return PathBuf::from(path);
    }
    for dir in std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
    {
        let candidate = dir.join("etcd");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "etcd is not installed: these tests start real etcd processes. Install Debian's \
         etcd-server (`apt-get install etcd-server`; scripts/test installs it), or point YR_ETCD \
         at an etcd binary"
    );
}

impl Etcd {
    /// One member, ready.
    pub fn single(name: &str) -> Etcd {
        Etcd::cluster(name, 1)
    }

    /// `size` members on 127.0.0.1 forming one cluster, all ready.
    pub fn cluster(name: &str, size: usize) -> Etcd {
        Etcd::start(name, size, None)
    }

    /// One member whose clients must speak TLS and show a certificate that `tls.ca` signed
    /// (`--client-cert-auth`), ready.
    pub fn single_tls(name: &str, tls: &ServerTls) -> Etcd {
        Etcd::start(name, 1, Some(tls))
    }

    fn start(name: &str, size: usize, tls: Option<&ServerTls>) -> Etcd {
        let binary = etcd_binary();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("yr-etcd-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temp dir for etcd");
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("yr-test-{name}-{nanos}");
        let mut members = Vec::new();
        let scheme = if tls.is_some() { "https" } else { "http" };
        for (i, (client, peer)) in ports.into_iter().enumerate() {
            let member = format!("m{i}");
            let log = dir.join(format!("{member}.log"));
            let mut args: Vec<String> = vec![
                "--name".into(),
                member.clone(),
                "--data-dir".into(),
                dir.join(&member).display().to_string(),
                "--listen-client-urls".into(),
                format!("{scheme}://127.0.0.1:{client}"),
                "--advertise-client-urls".into(),
                format!("{scheme}://127.0.0.1:{client}"),
                "--listen-peer-urls".into(),
                format!("http://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls".into(),
                format!("http://127.0.0.1:{peer}"),
                "--initial-cluster".into(),
                initial_cluster.clone(),
                "--initial-cluster-state".into(),
                "new".into(),
                "--initial-cluster-token".into(),
                token.clone(),
                // Quick elections on loopback, so that losing a member costs little time, and a
                // minimum lease TTL of one second.
                "--heartbeat-interval".into(),
                "50".into(),
                "--election-timeout".into(),
                "500".into(),
            ];
            let mut health_port = client;
            if let Some(tls) = tls {
                health_port = free_port();
                args.extend([
                    "--cert-file".into(),
                    tls.certificate.display().to_string(),
                    "--key-file".into(),
                    tls.key.display().to_string(),
                    "--trusted-ca-file".into(),
                    tls.ca.display().to_string(),
                    "--client-cert-auth".into(),
                    "--listen-metrics-urls".into(),
                    format!("http://127.0.0.1:{health_port}"),
                ]);
            }
            let child = spawn_member(&binary, &args, &log, false);
            members.push(EtcdMember {
                name: member,
                client_port: client,
                health_port,
                peer_port: peer,
                child: Some(child),
                log,
                command: (binary.clone(), args),
            });
        }
        let etcd = Etcd { members, dir };
        for member in &etcd.members {
            etcd.wait_healthy(member);
        }
        etcd
    }

    fn wait_healthy(&self, member: &EtcdMember) {
        let started = Instant::now();
        loop {
            if health(member.health_port) {
                return;
            }
            if started.elapsed() > READY_DEADLINE {
                let log = std::fs::read_to_string(&member.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                panic!(
                    "etcd member {} (client port {}) not healthy after {READY_DEADLINE:?}; its log \
                     ends:\n{}",
                    member.name,
                    member.client_port,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The client endpoints of the members, for `EtcdOptions::new`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdMember::endpoint).collect()
    }

    /// The endpoint of the first member.
    pub fn endpoint(&self) -> String {
        self.members[0].endpoint()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for member in &mut self.members {
            member.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether the member at `port` answers `GET /health` with `"health":"true"`.
pub fn health(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let request =
        format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200") && response.contains("\"health\":\"true\"")
}
