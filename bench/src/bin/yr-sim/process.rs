//! The real processes a simulation runs against: `yr master` (started from the built `yr`
//! binary, with its /metrics public on a port of its own) and, for failover, one etcd member.
//! Also what the simulator reads of them: CPU time and RSS from `/proc/<pid>/`, and the
//! master's Prometheus counters.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// How long a master or etcd may take to come up.
const READY_DEADLINE: Duration = Duration::from_secs(30);

/// A free loopback port (bound and released; the race with other processes is accepted).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The `yr` binary: `$YR_BIN`, or `yr` next to this program.
pub fn yr_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    std::env::var_os("YR_BIN")
        .map(PathBuf::from)
        .or_else(|| exe.parent().map(|d| d.join("yr")))
        .filter(|p| p.is_file())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "the `yr` binary is not next to yr-sim; build it (`cargo build --release -p yr-cli`) \
                 or set YR_BIN"
            )
        })
}

/// One `yr master` process.
pub struct Master {
    /// Its gRPC address (Master service), `127.0.0.1:<port>`.
    pub address: String,
    /// Its health and metrics address.
    pub metrics: String,
    child: Option<Child>,
    /// Its log file.
    pub log: PathBuf,
}

impl Master {
    /// Starts `yr master` with its state in `dir`, the cluster token `token` (in `YR_TOKEN`),
    /// the node timeout `node_timeout`, and `extra` flags (`--etcd ...`). Returns once its
    /// metrics endpoint answers.
    pub async fn start(
        dir: &Path,
        token: &str,
        node_timeout: Duration,
        extra: &[String],
    ) -> anyhow::Result<Master> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot make the master's directory {}", dir.display()))?;
        let address = format!("127.0.0.1:{}", free_port()?);
        let metrics = format!("127.0.0.1:{}", free_port()?);
        let log = dir.join("master.log");
        let log_file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let child = Command::new(yr_binary()?)
            .arg("master")
            .args(["--listen", &address])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--metrics-listen", &metrics, "--metrics-public"])
            .args(["--node-timeout", &node_timeout.as_secs_f64().to_string()])
            .args(extra)
            .env(yr_common::auth::TOKEN_ENV, token)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_file.try_clone()?))
            .stderr(Stdio::from(log_file))
            .spawn()
            .context("cannot start `yr master`")?;
        let mut master = Master {
            address,
            metrics,
            child: Some(child),
            log,
        };
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            if master.metrics_text().await.is_ok() {
                return Ok(master);
            }
            if let Some(child) = master.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "`yr master` exited ({status}) before it served; see {}",
                        master.log.display()
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "`yr master` did not serve within {READY_DEADLINE:?}; see {}",
                    master.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The master's /metrics text.
    pub async fn metrics_text(&self) -> anyhow::Result<String> {
        http_get(&self.metrics, "/metrics").await
    }

    /// The value of the metric `name` (a counter's `_total` sample too; labelled samples
    /// summed, or only those whose labels contain `label` when given).
    pub async fn metric(&self, name: &str, label: Option<&str>) -> anyhow::Result<f64> {
        Ok(metric(&self.metrics_text().await?, name, label))
    }

    /// Whether the master says it leads.
    pub async fn leads(&self) -> bool {
        matches!(self.metric("yr_master_leader", None).await, Ok(v) if v >= 1.0)
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, a grace period, then SIGKILL.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: kill(2) on our own child's pid has no memory effects.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The value of metric `name` in a Prometheus text exposition.
pub fn metric(text: &str, name: &str, label: Option<&str>) -> f64 {
    let total = format!("{name}_total");
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let metric_name = series.split('{').next()?;
            if metric_name != name && metric_name != total {
                return None;
            }
            if let Some(label) = label {
                if !series.contains(label) {
                    return None;
                }
            }
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

/// The body of a GET of `path` at `address` (yr's own HTTP client, with the cluster token);
/// anything but 200 is an error.
async fn http_get(address: &str, path: &str) -> anyhow::Result<String> {
    let (status, body) = yr_transport::http::fetch(address, path, Duration::from_secs(5)).await?;
    if !status.is_success() {
        bail!("GET {path} at {address}: {status}");
    }
    Ok(body)
}

/// CPU time and memory of a process, read from /proc.
#[derive(Clone, Copy, Debug)]
pub struct ProcSample {
    at: Instant,
    /// utime + stime, in clock ticks.
    ticks: u64,
}

impl ProcSample {
    /// The process's CPU time now.
    pub fn take(pid: u32) -> anyhow::Result<ProcSample> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
        // Fields after the command name (which may hold spaces) in parentheses: state is
        // field 3, utime 14 and stime 15.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .context("a malformed /proc/<pid>/stat")?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| -> anyhow::Result<u64> {
            fields
                .get(n - 3)
                .and_then(|f| f.parse().ok())
                .with_context(|| format!("/proc/{pid}/stat has no field {n}"))
        };
        Ok(ProcSample {
            at: Instant::now(),
            ticks: field(14)? + field(15)?,
        })
    }

    /// The CPU used since `earlier`, as a percentage of one core.
    pub fn cpu_percent_since(&self, earlier: &ProcSample) -> f64 {
        // SAFETY: sysconf has no memory effects.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let seconds = self.at.duration_since(earlier.at).as_secs_f64();
        if seconds <= 0.0 {
            return 0.0;
        }
        (self.ticks.saturating_sub(earlier.ticks)) as f64 / per_second / seconds * 100.0
    }
}

/// The resident set size of a process, in MB (VmRSS).
pub fn rss_mb(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let kb = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .context("no VmRSS in /proc/<pid>/status")?;
    Ok(kb / 1024.0)
}

/// One etcd member on loopback ports, its data in `dir`; killed on drop.
pub struct Etcd {
    /// `127.0.0.1:<client port>`.
    pub endpoint: String,
    child: Option<Child>,
}

impl Etcd {
    /// Starts `etcd` (`$YR_ETCD`, else from `PATH`: Debian's `etcd-server`) and waits for its
    /// `/health`.
    pub async fn start(dir: &Path) -> anyhow::Result<Etcd> {
        std::fs::create_dir_all(dir)?;
        let binary = std::env::var_os("YR_ETCD")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("etcd"));
        let client = free_port()?;
        let peer = free_port()?;
        let log = std::fs::File::create(dir.join("etcd.log"))?;
        let child = Command::new(&binary)
            .args(["--name", "sim"])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .args(["--initial-cluster", &format!("sim=http://127.0.0.1:{peer}")])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {} (install Debian's etcd-server, or set YR_ETCD)",
                    binary.display()
                )
            })?;
        let etcd = Etcd {
            endpoint: format!("127.0.0.1:{client}"),
            child: Some(child),
        };
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            if let Ok(body) = http_get(&etcd.endpoint, "/health").await {
                if body.contains("\"health\":\"true\"") {
                    return Ok(etcd);
                }
            }
            if Instant::now() > deadline {
                bail!("etcd did not become healthy within {READY_DEADLINE:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::metric;

    #[test]
    fn reads_counters_and_labelled_gauges() {
        let text = "# HELP x\nyr_master_nodes_lost_total 3\nyr_master_nodes{state=\"alive\"} 5\n\
                    yr_master_nodes{state=\"lost\"} 2\nyr_master_leader 1\n";
        assert_eq!(metric(text, "yr_master_nodes_lost", None), 3.0);
        assert_eq!(metric(text, "yr_master_nodes", Some("\"alive\"")), 5.0);
        assert_eq!(metric(text, "yr_master_nodes", None), 7.0);
        assert_eq!(metric(text, "yr_master_leader", None), 1.0);
    }
}
