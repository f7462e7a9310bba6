//! The placement driver: creates that do not fit on their node, sent to the master's
//! `Schedule` RPC as that node's master link sends them (the asking node excluded, over the
//! asking node's channel), by a fixed number of concurrent workers for a fixed time.
//!
//! What is measured is the master's placement decision: `Schedule` answers with a node, and in
//! a real cluster the asking node then forwards the create to that node itself (the master
//! never calls nodes). The chosen simulated node accepts at once, as a node admitting the
//! create does: it sends the resource delta on its heartbeat stream (which replaces the
//! master's tentative reservation), and gives the resources back when the instance's lifetime
//! ends.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use yr_proto::v1 as pb;
use yr_proto::v1::master_client::MasterClient;

use crate::fleet::Fleet;

/// What each placement asks for and how long its instance lives.
#[derive(Clone, Debug)]
pub struct PlacementConfig {
    /// Concurrent requests in flight.
    pub concurrency: usize,
    /// How long to send them.
    pub duration: Duration,
    /// Millicores per instance.
    pub cpu_millicores: u64,
    /// MB per instance.
    pub memory_mb: u64,
    /// How long an instance holds its resources.
    pub lifetime: Duration,
}

/// What the driver saw.
#[derive(Debug, Default)]
pub struct PlacementResult {
    /// Requests the master placed.
    pub placed: u64,
    /// Requests it answered without a node, by error code.
    pub refused: BTreeMap<u32, u64>,
    /// Requests that failed as RPCs.
    pub rpc_errors: u64,
    /// Placements on a node id the fleet does not have.
    pub unknown_targets: u64,
    /// Latency of every answered request, in microseconds, sorted.
    pub latencies_us: Vec<u32>,
    /// How long the requests were sent for.
    pub elapsed: Duration,
}

impl PlacementResult {
    /// Placements per second.
    pub fn rate(&self) -> f64 {
        self.placed as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `q` quantile of the latency (0.5, 0.99), in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let rank = ((self.latencies_us.len() as f64 * q).ceil() as usize)
            .clamp(1, self.latencies_us.len());
        f64::from(self.latencies_us[rank - 1]) / 1000.0
    }
}

/// The most releases waiting for their instance's lifetime to end (a second of placements at
/// well above the rates measured).
const RELEASES_QUEUED: usize = 65_536;

struct Release {
    due: Instant,
    node: String,
}

/// Sends placements for `config.duration`; returns once every worker finished (the instances'
/// releases go on in the background while the fleet runs).
pub async fn drive(fleet: &Arc<Fleet>, config: &PlacementConfig) -> PlacementResult {
    // Bounded: when the releases fall this far behind, workers wait for room, which slows
    // the placements down rather than queueing without end.
    let (releases, mut due) = mpsc::channel::<Release>(RELEASES_QUEUED);
    {
        // Lifetimes are all the same, so releases come due in the order they were queued.
        let fleet = fleet.clone();
        let (cpu, memory) = (config.cpu_millicores, config.memory_mb);
        tokio::spawn(async move {
            while let Some(release) = due.recv().await {
                tokio::time::sleep_until(release.due).await;
                if let Some(node) = fleet.node(&release.node) {
                    node.release(cpu, memory, &fleet.stats);
                }
            }
        });
    }
    let start = Instant::now();
    let deadline = start + config.duration;
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..config.concurrency.max(1) {
        let fleet = fleet.clone();
        let config = config.clone();
        let releases = releases.clone();
        workers.spawn(async move { work(worker, &fleet, &config, deadline, releases).await });
    }
    drop(releases);
    let mut result = PlacementResult::default();
    while let Some(joined) = workers.join_next().await {
        let Ok(part) = joined else { continue };
        result.placed += part.placed;
        result.rpc_errors += part.rpc_errors;
        result.unknown_targets += part.unknown_targets;
        for (code, count) in part.refused {
            *result.refused.entry(code).or_default() += count;
        }
        result.latencies_us.extend(part.latencies_us);
    }
    result.elapsed = start.elapsed();
    result.latencies_us.sort_unstable();
    result
}

async fn work(
    worker: usize,
    fleet: &Arc<Fleet>,
    config: &PlacementConfig,
    deadline: Instant,
    releases: mpsc::Sender<Release>,
) -> PlacementResult {
    let mut result = PlacementResult::default();
    let mut random = XorShift(0x9e37_79b9_7f4a_7c15 ^ ((worker as u64 + 1) << 17));
    let nodes = fleet.nodes();
    if nodes.is_empty() {
        return result;
    }
    let request = pb::Resources {
        cpu_millicores: config.cpu_millicores,
        memory_mb: config.memory_mb,
        custom: Default::default(),
    };
    while Instant::now() < deadline {
        let index = (random.next() % nodes.len() as u64) as usize;
        let source = &nodes[index];
        let Some(channel) = fleet.channel(&source.current(), index) else {
            result.rpc_errors += 1;
            continue;
        };
        let mut client = MasterClient::new(channel);
        let sent = Instant::now();
        let reply = client
            .schedule(pb::ScheduleRequest {
                request: Some(request.clone()),
                exclude_nodes: vec![source.id.clone()],
                labels: Vec::new(),
                required_affinities: Vec::new(),
            })
            .await;
        let latency = sent.elapsed();
        match reply {
            Ok(reply) => {
                result
                    .latencies_us
                    .push(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX));
                let reply = reply.into_inner();
                if let Some(error) = reply.error {
                    *result.refused.entry(error.code).or_default() += 1;
                    continue;
                }
                match fleet.node(&reply.node_id) {
                    Some(target) => {
                        target.accept(config.cpu_millicores, config.memory_mb, &fleet.stats);
                        let _ = releases
                            .send(Release {
                                due: Instant::now() + config.lifetime,
                                node: reply.node_id,
                            })
                            .await;
                        result.placed += 1;
                    }
                    None => result.unknown_targets += 1,
                }
            }
            Err(status) => {
                result.rpc_errors += 1;
                tracing::debug!(%status, "a schedule request failed");
                // A master that fails every call must not spin this worker.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    result
}

/// A small xorshift generator: which node asks is spread evenly, reproducibly.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}
