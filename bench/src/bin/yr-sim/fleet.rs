//! Simulated nodes: each registers with the master as a node does (its own node id and
//! incarnation, capacity, allocatable, labels), keeps a `NodeHeartbeat` stream with a beat
//! every `beat` (its own timer, phases spread across the interval), reports resource deltas on
//! that stream when it accepts or releases a placement, and follows the leader the way
//! `yr_proxy`'s master link does (a standby's "the leader is at X" at once, an election every
//! 200 ms, an unreachable master with backoff). It runs no runtimes, serves no Node service and
//! has no data worker.
//!
//! Nodes are tokio tasks multiplexed over a few gRPC channels per master (node `i` uses channel
//! `i % channels`), each channel one authenticated HTTP/2 connection carrying many nodes'
//! streams.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use yr_common::backoff::Backoff;
use yr_common::ErrorCode;
use yr_proto::v1 as pb;
use yr_proto::v1::master_client::MasterClient;

/// How soon a node asks again while a standby says that no master leads (the node's
/// `ELECTION_RETRY`).
const ELECTION_RETRY: Duration = Duration::from_millis(200);

/// How many times a node registers at once after its incarnation was refused as lost.
const LOST_REGISTRATIONS: usize = 3;

/// The most updates (beats and resource deltas) queued on one node's heartbeat stream.
const UPDATES_QUEUED: usize = 1024;

/// What the simulated fleet looks like.
#[derive(Clone, Debug)]
pub struct FleetConfig {
    /// How many nodes.
    pub nodes: usize,
    /// The masters' addresses (one, or a leader and its standbys).
    pub masters: Vec<String>,
    /// Channels (HTTP/2 connections) per master.
    pub channels: usize,
    /// The heartbeat interval of each node.
    pub beat: Duration,
    /// Each node's CPU capacity, in millicores.
    pub cpu_millicores: u64,
    /// Each node's memory capacity, in MB.
    pub memory_mb: u64,
    /// Prefix of the node ids (`<prefix>-<i>`).
    pub id_prefix: String,
}

/// Counters across the fleet.
#[derive(Debug, Default)]
pub struct FleetStats {
    /// Registrations the master accepted.
    pub registrations: AtomicU64,
    /// Beats sent on heartbeat streams.
    pub beats: AtomicU64,
    /// Resource deltas sent on heartbeat streams.
    pub deltas: AtomicU64,
    /// `reregister` commands from the master (it did not know the node as alive).
    pub reregister_commands: AtomicU64,
    /// Registrations refused because the master had declared the incarnation lost.
    pub incarnations_lost: AtomicU64,
    /// Sessions that ended (stream broke, registration failed, master unreachable).
    pub session_failures: AtomicU64,
    /// Nodes registered at least once.
    pub registered_nodes: AtomicUsize,
}

/// One simulated node.
pub struct SimNode {
    /// Its id.
    pub id: String,
    index: usize,
    incarnation: AtomicU64,
    /// The master its calls go to now.
    current: Mutex<String>,
    /// Its heartbeat stream's sender while a session is up.
    updates: Mutex<Option<mpsc::Sender<pb::NodeUpdate>>>,
    /// Resources its accepted placements hold: (millicores, MB).
    used: Mutex<(u64, u64)>,
    /// When it last registered.
    registered_at: Mutex<Option<Instant>>,
}

impl SimNode {
    /// The master its calls go to now.
    pub fn current(&self) -> String {
        self.current.lock().clone()
    }

    /// When the node last registered.
    pub fn registered_at(&self) -> Option<Instant> {
        *self.registered_at.lock()
    }

    /// Accepts a placement of `cpu` millicores and `memory` MB, as a node admitting a create
    /// does: its allocatable shrinks, and it tells the master (which drops its tentative
    /// reservations for the node).
    pub fn accept(&self, cpu: u64, memory: u64, stats: &FleetStats) {
        {
            let mut used = self.used.lock();
            used.0 += cpu;
            used.1 += memory;
        }
        self.send_delta(-(cpu as i64), -(memory as i64), stats);
    }

    /// Releases what [`SimNode::accept`] took (the instance exited).
    pub fn release(&self, cpu: u64, memory: u64, stats: &FleetStats) {
        {
            let mut used = self.used.lock();
            used.0 = used.0.saturating_sub(cpu);
            used.1 = used.1.saturating_sub(memory);
        }
        self.send_delta(cpu as i64, memory as i64, stats);
    }

    fn send_delta(&self, cpu: i64, memory: i64, stats: &FleetStats) {
        if let Some(sender) = self.updates.lock().as_ref() {
            let update = pb::NodeUpdate {
                node_id: self.id.clone(),
                delta: Some(pb::ResourceDelta {
                    cpu_millicores: cpu,
                    memory_mb: memory,
                    custom: HashMap::new(),
                }),
                beat: 0,
            };
            // A full stream means the master stopped reading this node: the delta is lost, as
            // a real node's would be, and its next registration reports its resources anew.
            if sender.try_send(update).is_ok() {
                stats.deltas.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// What a failed session says about where to go next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Followed {
    Leader,
    Election,
    Next,
}

/// A running fleet of simulated nodes.
pub struct Fleet {
    config: FleetConfig,
    nodes: Vec<Arc<SimNode>>,
    by_id: HashMap<String, usize>,
    channels: HashMap<String, Vec<Channel>>,
    /// The fleet's counters.
    pub stats: Arc<FleetStats>,
    tasks: Mutex<JoinSet<()>>,
}

impl Fleet {
    /// Makes the nodes and their channels, and starts every node (registration, heartbeats).
    pub fn start(config: FleetConfig) -> anyhow::Result<Arc<Fleet>> {
        let mut channels = HashMap::new();
        for master in &config.masters {
            let per_master = (0..config.channels.max(1))
                .map(|_| {
                    yr_transport::connect_lazy_with(master, ErrorCode::InnerCommunication, |e| {
                        e.http2_keep_alive_interval(Duration::from_secs(1))
                            .keep_alive_timeout(Duration::from_secs(2))
                            .keep_alive_while_idle(true)
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            channels.insert(master.clone(), per_master);
        }
        let first = config.masters.first().cloned().unwrap_or_default();
        let nodes: Vec<Arc<SimNode>> = (0..config.nodes)
            .map(|index| {
                Arc::new(SimNode {
                    id: format!("{}-{index}", config.id_prefix),
                    index,
                    incarnation: AtomicU64::new(1),
                    current: Mutex::new(first.clone()),
                    updates: Mutex::new(None),
                    used: Mutex::new((0, 0)),
                    registered_at: Mutex::new(None),
                })
            })
            .collect();
        let by_id = nodes
            .iter()
            .enumerate()
            .map(|(index, node)| (node.id.clone(), index))
            .collect();
        let fleet = Arc::new(Fleet {
            config,
            nodes,
            by_id,
            channels,
            stats: Arc::new(FleetStats::default()),
            tasks: Mutex::new(JoinSet::new()),
        });
        {
            let mut tasks = fleet.tasks.lock();
            for node in &fleet.nodes {
                let fleet = fleet.clone();
                let node = node.clone();
                tasks.spawn(async move { fleet.run_node(node).await });
            }
        }
        Ok(fleet)
    }

    /// The nodes.
    pub fn nodes(&self) -> &[Arc<SimNode>] {
        &self.nodes
    }

    /// The node with id `id`.
    pub fn node(&self, id: &str) -> Option<&Arc<SimNode>> {
        self.by_id.get(id).map(|&index| &self.nodes[index])
    }

    /// The channel node `index` uses to reach `master`.
    pub fn channel(&self, master: &str, index: usize) -> Option<Channel> {
        let channels = self.channels.get(master)?;
        channels.get(index % channels.len()).cloned()
    }

    /// How many nodes registered after `since`.
    pub fn registered_since(&self, since: Instant) -> usize {
        self.nodes
            .iter()
            .filter(|node| node.registered_at().is_some_and(|at| at >= since))
            .count()
    }

    /// Stops every node (their streams close).
    pub fn shutdown(&self) {
        self.tasks.lock().abort_all();
        for node in &self.nodes {
            *node.updates.lock() = None;
        }
    }

    /// One node's life: sessions with the master it points at, following the leader.
    async fn run_node(self: Arc<Self>, node: Arc<SimNode>) {
        let mut backoff = Backoff::reconnect();
        loop {
            let address = node.current();
            let status = self.session(&node, &address, &mut backoff).await;
            *node.updates.lock() = None;
            self.stats.session_failures.fetch_add(1, Ordering::Relaxed);
            let delay = match self.follow(&node, &address, status.as_ref()) {
                Followed::Leader => Duration::ZERO,
                Followed::Election => ELECTION_RETRY,
                Followed::Next => backoff.next_delay(),
            };
            tokio::time::sleep(delay).await;
        }
    }

    /// Points the node where a failed call says (the master link's rule).
    fn follow(&self, node: &SimNode, failed_at: &str, status: Option<&tonic::Status>) -> Followed {
        let mut current = node.current.lock();
        match status.and_then(yr_transport::leader_redirect) {
            Some(Some(leader)) if leader != failed_at && self.channels.contains_key(&leader) => {
                *current = leader;
                Followed::Leader
            }
            Some(_) => Followed::Election,
            None => {
                let masters = &self.config.masters;
                let next = match masters.iter().position(|a| a == failed_at) {
                    Some(index) => masters[(index + 1) % masters.len()].clone(),
                    None => masters.first().cloned().unwrap_or_default(),
                };
                *current = next;
                Followed::Next
            }
        }
    }

    /// One registration and heartbeat stream, until it breaks; the master's status when it
    /// answered with one.
    async fn session(
        &self,
        node: &Arc<SimNode>,
        address: &str,
        backoff: &mut Backoff,
    ) -> Option<tonic::Status> {
        let channel = self.channel(address, node.index)?;
        let mut client = MasterClient::new(channel);
        if let Err(status) = self.register(node, &mut client).await {
            return status;
        }
        backoff.reset();
        let (sender, receiver) = mpsc::channel(UPDATES_QUEUED);
        *node.updates.lock() = Some(sender.clone());
        let mut commands = match client.node_heartbeat(ReceiverStream::new(receiver)).await {
            Ok(response) => response.into_inner(),
            Err(status) => return Some(status),
        };
        let beat = self.config.beat;
        // Phases spread evenly over one interval, so that beats arrive as a steady flow.
        let phase = beat.mul_f64(node.index as f64 / self.config.nodes.max(1) as f64);
        let node_id = node.id.clone();
        let stats = self.stats.clone();
        let beats = tokio::spawn(async move {
            // Numbered, as a real node's: the master acknowledges each one (the node's lease).
            let mut number = 0;
            let mut ticker = tokio::time::interval_at(Instant::now() + phase, beat);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                number += 1;
                let update = pb::NodeUpdate {
                    node_id: node_id.clone(),
                    delta: None,
                    beat: number,
                };
                if sender.send(update).await.is_err() {
                    return;
                }
                stats.beats.fetch_add(1, Ordering::Relaxed);
                ticker.tick().await;
            }
        });
        let status = loop {
            match commands.next().await {
                Some(Ok(command)) if command.reregister => {
                    self.stats
                        .reregister_commands
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(node = %node.id, "the master asked the node to register again");
                    break None;
                }
                Some(Ok(_)) => {}
                Some(Err(status)) => break Some(status),
                None => break None,
            }
        };
        beats.abort();
        status
    }

    /// Registers the node as its incarnation; a new incarnation if the master declared the
    /// current one lost.
    async fn register(
        &self,
        node: &SimNode,
        client: &mut MasterClient<Channel>,
    ) -> Result<(), Option<tonic::Status>> {
        let capacity = pb::Resources {
            cpu_millicores: self.config.cpu_millicores,
            memory_mb: self.config.memory_mb,
            custom: HashMap::new(),
        };
        for _ in 0..LOST_REGISTRATIONS {
            let incarnation = node.incarnation.load(Ordering::Relaxed);
            let (cpu_used, memory_used) = *node.used.lock();
            let info = pb::NodeInfo {
                node_id: node.id.clone(),
                // Never dialled: the master only hands a node's address to other nodes.
                address: format!("127.0.0.1:{}", 40000 + node.index % 20000),
                bus_address: String::new(),
                capacity: Some(capacity.clone()),
                allocatable: Some(pb::Resources {
                    cpu_millicores: capacity.cpu_millicores.saturating_sub(cpu_used),
                    memory_mb: capacity.memory_mb.saturating_sub(memory_used),
                    custom: HashMap::new(),
                }),
                labels: HashMap::from([("yr-sim".to_string(), "true".to_string())]),
                state: String::new(),
                incarnation,
            };
            let reply = client
                .register_node(pb::RegisterNodeRequest { node: Some(info) })
                .await
                .map_err(Some)?
                .into_inner();
            if !reply.incarnation_lost {
                let first = node.registered_at.lock().replace(Instant::now()).is_none();
                if first {
                    self.stats.registered_nodes.fetch_add(1, Ordering::Relaxed);
                }
                self.stats.registrations.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            self.stats.incarnations_lost.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(node = %node.id, incarnation, "the master declared this incarnation lost; registering as a new one");
            node.incarnation.fetch_add(1, Ordering::Relaxed);
        }
        Err(None)
    }
}
