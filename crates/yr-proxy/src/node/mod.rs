//! The node: the components that make a yr node, and the flows between them.
//!
//! Each piece of state has one owner: the [`ClientBus`] owns the connected drivers and runtimes,
//! the [`InstanceTable`] each instance and its state machine, the [`Scheduler`] the node's
//! resources and the requests waiting for them, the [`RecordWriter`] what is persisted, and the
//! agent's [`RuntimePool`] and [`CodeCatalog`] the runtime processes and the code they run.
//! `Node` holds them and runs the flows that involve several: registration here, creation in
//! [`create`], the binaries instances run in [`executables`], kills in [`stop`], runtime events
//! in [`runtimes`], lookups in [`lookup`], the self-fence's pauses in [`pause`].

mod create;
mod executables;
mod forwarded;
mod lookup;
mod pause;
mod register;
mod runtimes;
mod stop;

pub use stop::KillReach;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use yr_agent::{CodeCatalog, RuntimeEvent, RuntimeManager, RuntimePool};
use yr_common::auth::PeerCredentials;
use yr_common::Error;
use yr_meta::MetaStore;
use yr_proto::error_to_proto;
use yr_proto::v1 as pb;
use yr_proto::v1::InstanceState as S;

use crate::client_bus::{ClientBus, Outbound};
use crate::fencing::Fencing;
use crate::instance_table::{InstanceTable, Subscriber};
use crate::master_link::MasterLink;
use crate::rate_limit::TokenBucket;
use crate::record_writer::RecordWriter;
use crate::resources::{Amount, LocalResources};
use crate::scheduler::Scheduler;

/// How a node behaves.
#[derive(Clone, Debug)]
pub struct NodeSettings {
    /// The node's id.
    pub node_id: String,
    /// Where drivers and runtimes connect.
    pub bus_address: String,
    /// Where other nodes reach this one (Node service, `host:port`).
    pub node_address: String,
    /// Fetch drivers' binaries from their node even when the same path exists here.
    pub fetch_binaries: bool,
    /// Session directory (logs).
    pub session_dir: PathBuf,
    /// Spare runtimes kept per driver binary.
    pub warm_pool_size: usize,
    /// How often runtimes are sent a heartbeat.
    pub heartbeat_interval: Duration,
    /// A runtime that has not answered for this long is hung.
    pub heartbeat_timeout: Duration,
    /// How long a started runtime may take to connect.
    pub runtime_start_timeout: Duration,
    /// How long an instance's constructor may take.
    pub init_timeout: Duration,
    /// Creates per second and burst (token bucket).
    pub create_rate: (f64, f64),
}

/// The node.
pub struct Node {
    settings: NodeSettings,
    bus: ClientBus,
    instances: InstanceTable,
    scheduler: Scheduler,
    records: Arc<RecordWriter>,
    /// This node's incarnation, and losses of the nodes it forwarded instances to.
    fencing: Arc<Fencing>,
    runtimes: RuntimePool,
    code: CodeCatalog,
    agent: Arc<RuntimeManager>,
    meta: Arc<dyn MetaStore>,
    master: Arc<MasterLink>,
    limiter: Mutex<TokenBucket>,
    /// When the last heartbeat round ran.
    heartbeat_rounds: runtimes::HeartbeatRounds,
    creates: AtomicU64,
    /// Named-instance lookups waiting for a name not created yet.
    lookups_waiting: yr_common::Waiting,
    /// Told the process id of each client that disconnects (the data worker drops its
    /// shared-memory references).
    client_gone: OnceLock<Box<dyn Fn(u32) + Send + Sync>>,
    /// Whether the node fenced itself (its lease with the master ran out), and its counts.
    self_fence: pause::SelfFenced,
}

/// A notification that `instance_id` is in `state` because of `error`.
fn error_notify(instance_id: &str, state: S, error: &Error) -> pb::InstanceNotify {
    pb::InstanceNotify {
        instance_id: instance_id.to_string(),
        state: state as i32,
        runtime_address: String::new(),
        error: Some(error_to_proto(error)),
    }
}

impl Node {
    /// A node; `events` is where its runtime manager reports ended runtimes.
    pub fn new(
        settings: NodeSettings,
        capacity: Amount,
        meta: Arc<dyn MetaStore>,
        master: Arc<MasterLink>,
        events: tokio::sync::mpsc::UnboundedSender<RuntimeEvent>,
        fencing: Arc<Fencing>,
    ) -> Arc<Node> {
        let agent = Arc::new(RuntimeManager::new(
            yr_agent::RuntimeManagerOptions {
                log_dir: settings.session_dir.join("logs"),
                bus_address: settings.bus_address.clone(),
                node_id: settings.node_id.clone(),
                credentials_env: runtime_env(&settings.node_address),
            },
            events,
        ));
        let records = RecordWriter::new(meta.clone(), fencing.clone());
        let link = master.clone();
        let (rate, burst) = settings.create_rate;
        Arc::new_cyclic(|node: &std::sync::Weak<Node>| {
            let node = node.clone();
            let pressure = move |waiting_owners: Vec<u64>| {
                if let Some(node) = node.upgrade() {
                    node.bus.push_pressure(&waiting_owners);
                }
            };
            Node {
                bus: ClientBus::new(),
                instances: InstanceTable::new(records.clone()),
                scheduler: Scheduler::new(
                    capacity,
                    Box::new(move |delta| link.resources_changed(delta)),
                    Box::new(pressure),
                ),
                records,
                fencing,
                runtimes: RuntimePool::new(agent.clone(), settings.warm_pool_size),
                code: CodeCatalog::new(),
                agent,
                meta,
                master,
                limiter: Mutex::new(TokenBucket::new(rate, burst)),
                heartbeat_rounds: runtimes::HeartbeatRounds::new(yr_common::clock::system()),
                creates: AtomicU64::new(0),
                lookups_waiting: yr_common::Waiting::default(),
                client_gone: OnceLock::new(),
                self_fence: pause::SelfFenced::default(),
                settings,
            }
        })
    }

    /// The node's settings.
    pub fn settings(&self) -> &NodeSettings {
        &self.settings
    }

    /// The local resources.
    pub fn resources(&self) -> LocalResources {
        self.scheduler.resources()
    }

    /// Run `gone` with the process id of each client that disconnects. Set once.
    pub fn on_client_gone(&self, gone: Box<dyn Fn(u32) + Send + Sync>) {
        let _ = self.client_gone.set(gone);
    }

    /// A new bus session from `peer` (its Unix peer credentials; `None` over TCP); returns
    /// its id.
    pub fn connect_client(&self, sender: Outbound, peer: Option<PeerCredentials>) -> u64 {
        self.bus.connect(sender, peer)
    }

    /// Push `body` (message id 0) on the Bus session of process `pid`. False if no connected
    /// process has that id.
    pub fn push_to_process(&self, pid: u32, body: pb::bus_response::Body) -> bool {
        self.bus.push_to_process(pid, body)
    }

    /// Answer request `message_id` of `client_id` with `result`.
    pub fn reply(
        &self,
        client_id: u64,
        message_id: u64,
        result: Result<pb::bus_response::Body, Error>,
    ) {
        let body = match result {
            Ok(body) => body,
            Err(error) => pb::bus_response::Body::Error(error_to_proto(&error)),
        };
        self.bus.send(client_id, message_id, body);
    }

    /// A bus session ended: its process's objects go with its last session, its socket file
    /// goes, and the attached instances of a job whose last driver left are killed.
    pub fn disconnect_client(self: &Arc<Self>, client_id: u64) {
        let Some(departure) = self.bus.disconnect(client_id) else {
            return;
        };
        if departure.pid != 0 && departure.last_of_process {
            if let Some(gone) = self.client_gone.get() {
                gone(departure.pid);
            }
        }
        if let Some(socket) = &departure.socket {
            // So that crashed processes leave no socket files behind.
            yr_common::sockets::remove(socket);
        }
        if let Some(job_id) = departure.orphaned_job {
            tracing::info!(job = %job_id, "the driver of job left; releasing its instances");
            let node = self.clone();
            tokio::spawn(async move { node.kill_job(&job_id, false).await });
        }
    }

    /// Tell every subscriber of `instance_id`.
    fn notify(&self, instance_id: &str, notify: pb::InstanceNotify) {
        for subscriber in self.instances.subscribers(instance_id) {
            self.notify_one(&subscriber, notify.clone());
        }
    }

    fn notify_one(&self, subscriber: &Subscriber, notify: pb::InstanceNotify) {
        match subscriber {
            Subscriber::Client(client_id) => {
                self.bus
                    .send(*client_id, 0, pb::bus_response::Body::Notify(notify));
            }
            Subscriber::Remote(sender) => {
                let _ = sender.send(Ok(notify));
            }
        }
    }

    /// The path of a binary this node knows, for FetchBinary.
    pub fn binary_path(&self, hash: &str) -> Option<PathBuf> {
        self.code.binary(hash).map(|spec| spec.binary_path)
    }

    /// Instances by state, for metrics.
    pub fn instance_counts(&self) -> Vec<(String, usize)> {
        self.instances.counts()
    }

    /// Illegal state transitions refused (3010), for metrics.
    pub fn illegal_transitions(&self) -> u64 {
        self.instances.illegal_transitions()
    }

    /// Named-instance lookups waiting for their name, for metrics.
    pub fn waiting_lookups(&self) -> usize {
        self.lookups_waiting.count()
    }

    /// Create requests waiting for resources, for metrics.
    pub fn pending_creates(&self) -> usize {
        self.scheduler.waiting()
    }

    /// Runtime processes running.
    pub fn runtime_count(&self) -> usize {
        self.agent.running()
    }

    /// Creates handled.
    pub fn creates(&self) -> u64 {
        self.creates.load(Ordering::Relaxed)
    }

    /// Stop: kill every runtime.
    pub fn stop(&self) {
        self.agent.kill_all();
    }

    /// Gracefully stop every instance (shutdown hooks), then every runtime.
    pub async fn drain(self: &Arc<Self>) {
        let mut waits = Vec::new();
        for id in self.instances.ids() {
            let node = self.clone();
            waits.push(tokio::spawn(async move { node.kill(&id, true).await }));
        }
        for handle in waits {
            let _ = handle.await;
        }
        self.stop();
    }
}

/// The environment that gives runtimes this node's credentials (its token and TLS files) and
/// the host it advertises (`YR_HOST`, unless loopback), on which runtimes listen for callers on
/// other hosts.
fn runtime_env(node_address: &str) -> Vec<(String, String)> {
    let mut env = runtime_credentials_env();
    if let Some(host) = yr_transport::host_of(node_address) {
        if !yr_transport::is_loopback_host(host) {
            env.push(("YR_HOST".to_string(), host.to_string()));
        }
    }
    env
}

/// The environment that gives runtimes this node's credentials: its token and TLS files.
fn runtime_credentials_env() -> Vec<(String, String)> {
    let credentials = yr_transport::current();
    let mut env = Vec::new();
    if let Some(token) = &credentials.token {
        env.push((
            yr_common::auth::TOKEN_ENV.to_string(),
            token.as_str().to_string(),
        ));
    }
    if let Some(tls) = &credentials.tls {
        env.extend(tls.env());
    }
    env
}
