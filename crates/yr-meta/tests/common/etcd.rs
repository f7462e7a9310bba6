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
    pub peer_port: u16,
    child: Option<Child>,
    pub log: PathBuf,
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
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        self.kill();
    }
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
        for (i, (client, peer)) in ports.into_iter().enumerate() {
            let member = format!("m{i}");
            let log = dir.join(format!("{member}.log"));
            let log_file = std::fs::File::create(&log).expect("an etcd log file");
            let log_err = log_file.try_clone().expect("an etcd log file");
            let child = Command::new(&binary)
                .arg("--name")
                .arg(&member)
                .arg("--data-dir")
                .arg(dir.join(&member))
                .arg("--listen-client-urls")
                .arg(format!("http://127.0.0.1:{client}"))
                .arg("--advertise-client-urls")
                .arg(format!("http://127.0.0.1:{client}"))
                .arg("--listen-peer-urls")
                .arg(format!("http://127.0.0.1:{peer}"))
                .arg("--initial-advertise-peer-urls")
                .arg(format!("http://127.0.0.1:{peer}"))
                .arg("--initial-cluster")
                .arg(&initial_cluster)
                .arg("--initial-cluster-state")
                .arg("new")
                .arg("--initial-cluster-token")
                .arg(&token)
                // Quick elections on loopback, so that losing a member costs little time, and a
                // minimum lease TTL of one second.
                .arg("--heartbeat-interval")
                .arg("50")
                .arg("--election-timeout")
                .arg("500")
                .stdin(Stdio::null())
                .stdout(Stdio::from(log_file))
                .stderr(Stdio::from(log_err))
                .spawn()
                .unwrap_or_else(|err| panic!("cannot start {}: {err}", binary.display()));
            members.push(EtcdMember {
                name: member,
                client_port: client,
                peer_port: peer,
                child: Some(child),
                log,
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
            if health(member.client_port) {
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
