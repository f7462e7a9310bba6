//! The node's proxy: the local scheduler, each instance's state machine (single writer of its
//! record), the warm pool of runtimes, heartbeats, and routing of create/kill/notify between
//! drivers, runtimes and other nodes. Calls themselves go straight from callers to runtimes.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;
use yr_agent::{RuntimeEvent, RuntimeManager, RuntimeSpec};
use yr_common::auth::PeerCredentials;
use yr_common::{Error, ErrorCode, InvokeOptions};
use yr_meta::MetaStore;
use yr_proto::v1 as pb;
use yr_proto::v1::InstanceState as S;
use yr_runtime::cluster::convert::error_to_proto;

use crate::fencing::Fencing;
use crate::master_link::MasterLink;
use crate::rate_limit::TokenBucket;
use crate::record_writer::{instance_key, named_key, RecordWriter};
use crate::resources::{Amount, LocalResources};
use crate::state_machine;

/// How long after taking a warm runtime the node starts its replacement.
const WARM_POOL_REFILL_DELAY: Duration = Duration::from_millis(20);

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

/// Messages a bus session may have waiting for its client. A client that falls this far behind
/// has its session ended (it sees the stream close, 3006) rather than the node buffering
/// without bound.
pub const BUS_QUEUE: usize = 65_536;

/// The sending side of a bus session, and the signal that ends the session.
pub struct Outbound {
    /// Messages for the client.
    pub sender: mpsc::Sender<Result<pb::BusResponse, Status>>,
    /// Notified when the client fell [`BUS_QUEUE`] messages behind.
    pub overflowed: Arc<tokio::sync::Notify>,
}

impl Outbound {
    /// Queue `response`; false if the session is gone. A full queue ends the session.
    fn push(&self, response: pb::BusResponse) -> bool {
        match self.sender.try_send(Ok(response)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::error!(
                    "a bus client fell {BUS_QUEUE} messages behind; ending its session"
                );
                self.overflowed.notify_one();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// A driver or runtime connected to the bus.
pub struct Client {
    kind: pb::ClientKind,
    job_id: String,
    sender: Outbound,
    runtime_id: String,
    /// The client's process id, from the connection's peer credentials (0 over TCP: a
    /// process on another machine holds nothing in this node's shared memory).
    pid: u32,
    /// Where the client listens, if on a Unix socket; removed when it leaves.
    socket: Option<PathBuf>,
}

/// Who hears about an instance's state.
#[derive(Clone)]
pub enum Subscriber {
    /// A bus client.
    Client(u64),
    /// A proxy on another node, through a Node.Create stream.
    Remote(mpsc::UnboundedSender<Result<pb::InstanceNotify, Status>>),
}

struct RuntimeSlot {
    client_id: Option<u64>,
    address: String,
    binary_hash: String,
    instance_id: Option<String>,
    last_ack: Instant,
    registered: Vec<oneshot::Sender<()>>,
    init: Option<oneshot::Sender<pb::InitResult>>,
    hung: bool,
}

struct Instance {
    record: pb::InstanceRecord,
    options: InvokeOptions,
    runtime_id: Option<String>,
    subscribers: Vec<Subscriber>,
    allocated: Option<Amount>,
    exit_waiters: Vec<oneshot::Sender<()>>,
    killing: bool,
    /// Set when another node runs the instance: that node's address.
    forwarded_to: Option<String>,
    /// The node that asked for this instance, if another node did.
    creator_address: String,
}

/// Where an instance runs.
enum Placement {
    /// Here; resources are reserved.
    Local,
    /// On another node.
    Remote { node_id: String, address: String },
}

#[derive(Default)]
struct State {
    clients: HashMap<u64, Client>,
    runtimes: HashMap<String, RuntimeSlot>,
    instances: HashMap<String, Instance>,
    named: HashMap<(String, String), String>,
    binaries: HashMap<String, RuntimeSpec>,
    functions: BTreeSet<String>,
}

/// The node's proxy.
pub struct Node {
    settings: NodeSettings,
    agent: RuntimeManager,
    meta: Arc<dyn MetaStore>,
    master: Arc<MasterLink>,
    resources: Mutex<LocalResources>,
    state: Mutex<State>,
    limiter: Mutex<TokenBucket>,
    /// The only writer of instance records.
    records: Arc<RecordWriter>,
    /// This node's incarnation, and losses of the nodes it forwarded instances to.
    fencing: Arc<Fencing>,
    next_client: AtomicU64,
    creates: AtomicU64,
    /// Told the process id of each client that disconnects (the data worker drops its
    /// shared-memory references).
    client_gone: std::sync::OnceLock<Box<dyn Fn(u32) + Send + Sync>>,
}

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
        events: mpsc::UnboundedSender<RuntimeEvent>,
        fencing: Arc<Fencing>,
    ) -> Arc<Node> {
        let agent = RuntimeManager::new(
            yr_agent::RuntimeManagerOptions {
                log_dir: settings.session_dir.join("logs"),
                bus_address: settings.bus_address.clone(),
                node_id: settings.node_id.clone(),
                credentials_env: runtime_credentials_env(),
            },
            events,
        );
        let (rate, burst) = settings.create_rate;
        Arc::new(Node {
            agent,
            meta: meta.clone(),
            master,
            resources: Mutex::new(LocalResources::new(capacity)),
            state: Mutex::new(State::default()),
            limiter: Mutex::new(TokenBucket::new(rate, burst)),
            records: RecordWriter::new(meta.clone(), fencing.clone()),
            fencing,
            next_client: AtomicU64::new(1),
            creates: AtomicU64::new(0),
            client_gone: std::sync::OnceLock::new(),
            settings,
        })
    }

    /// The node's settings.
    pub fn settings(&self) -> &NodeSettings {
        &self.settings
    }

    /// The local resources.
    pub fn resources(&self) -> LocalResources {
        self.resources.lock().clone()
    }

    // ----- bus clients -------------------------------------------------------------------

    /// Run `gone` with the process id of each client that disconnects. Set once.
    pub fn on_client_gone(&self, gone: Box<dyn Fn(u32) + Send + Sync>) {
        let _ = self.client_gone.set(gone);
    }

    /// A new bus session from `peer` (its Unix peer credentials; `None` over TCP); returns
    /// its id.
    pub fn connect_client(&self, sender: Outbound, peer: Option<PeerCredentials>) -> u64 {
        let id = self.next_client.fetch_add(1, Ordering::Relaxed);
        self.state.lock().clients.insert(
            id,
            Client {
                kind: pb::ClientKind::Driver,
                job_id: String::new(),
                sender,
                runtime_id: String::new(),
                pid: peer.map(|p| p.pid).unwrap_or(0),
                socket: None,
            },
        );
        id
    }

    fn send(&self, client_id: u64, message_id: u64, body: pb::bus_response::Body) {
        let state = self.state.lock();
        if let Some(client) = state.clients.get(&client_id) {
            client.sender.push(pb::BusResponse {
                message_id,
                body: Some(body),
            });
        }
    }

    /// Push `body` (message id 0) on the Bus session of process `pid`. False if no connected
    /// process has that id.
    pub fn push_to_process(&self, pid: u32, body: pb::bus_response::Body) -> bool {
        if pid == 0 {
            return false;
        }
        let state = self.state.lock();
        let Some(client) = state.clients.values().find(|client| client.pid == pid) else {
            return false;
        };
        client.sender.push(pb::BusResponse {
            message_id: 0,
            body: Some(body),
        })
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
        self.send(client_id, message_id, body);
    }

    /// A client registered. Nothing it claims about itself is taken on trust: its pid comes
    /// from the connection, a runtime must be one this node started (the same process), and a
    /// driver's binary must be the executable the driver process runs, hashed here (1014 or
    /// 1001 otherwise, and nothing is registered).
    pub fn register(
        self: &Arc<Self>,
        client_id: u64,
        register: pb::RegisterClient,
    ) -> Result<pb::RegisterReply, Error> {
        let kind = pb::ClientKind::try_from(register.kind).map_err(|_| {
            Error::new(
                ErrorCode::ParamInvalid,
                format!("unknown client kind {} in a registration", register.kind),
            )
        })?;
        let pid = self
            .state
            .lock()
            .clients
            .get(&client_id)
            .map(|c| c.pid)
            .unwrap_or(0);
        match kind {
            pb::ClientKind::Runtime => self.check_runtime(&register.runtime_id, pid)?,
            pb::ClientKind::Driver if pid != 0 => check_driver_binary(&register, pid)?,
            pb::ClientKind::Driver => self.check_remote_driver(&register)?,
        }
        let mut warm_binary = None;
        {
            let mut state = self.state.lock();
            if let Some(client) = state.clients.get_mut(&client_id) {
                client.kind = kind;
                client.job_id = register.job_id.clone();
                client.runtime_id = register.runtime_id.clone();
                client.socket = register
                    .listen_address
                    .strip_prefix("unix:")
                    .map(PathBuf::from);
            }
            match kind {
                pb::ClientKind::Runtime => {
                    if let Some(slot) = state.runtimes.get_mut(&register.runtime_id) {
                        slot.client_id = Some(client_id);
                        slot.address = register.listen_address.clone();
                        slot.last_ack = Instant::now();
                        for waiter in slot.registered.drain(..) {
                            let _ = waiter.send(());
                        }
                    }
                }
                // A remote driver uses a binary a local driver registered; it changes nothing.
                pb::ClientKind::Driver if pid == 0 => {
                    state.functions.extend(register.functions.iter().cloned());
                }
                pb::ClientKind::Driver => {
                    let spec = RuntimeSpec {
                        binary_path: PathBuf::from(&register.binary_path),
                        args: register.runtime_args.clone(),
                        job_id: register.job_id.clone(),
                        env: vec![("YR_BINARY_HASH".into(), register.binary_hash.clone())],
                    };
                    state.binaries.insert(register.binary_hash.clone(), spec);
                    state.functions.extend(register.functions.iter().cloned());
                    warm_binary = Some(register.binary_hash.clone());
                }
            }
        }
        if kind == pb::ClientKind::Driver {
            self.records.write_functions(register.functions.clone());
        }
        if let Some(hash) = warm_binary {
            self.fill_warm_pool(&hash);
        }
        Ok(pb::RegisterReply {
            node_id: self.settings.node_id.clone(),
            session_dir: self.settings.session_dir.display().to_string(),
        })
    }

    /// A driver on another machine (over TCP) registers: its binary must be one a driver on
    /// this machine registered, since the node cannot verify a remote process's executable.
    fn check_remote_driver(&self, register: &pb::RegisterClient) -> Result<(), Error> {
        if self
            .state
            .lock()
            .binaries
            .contains_key(&register.binary_hash)
        {
            return Ok(());
        }
        Err(Error::new(
            ErrorCode::AuthorizeFailed,
            format!(
                "a driver connected over TCP registered binary {:?} ({:?}), which no driver on \
                 node {} registered; the node runs only executables that a driver on its own \
                 machine runs",
                register.binary_path, register.binary_hash, self.settings.node_id
            ),
        ))
    }

    /// A runtime registers: it must be a runtime this node started, in the same process.
    fn check_runtime(&self, runtime_id: &str, pid: u32) -> Result<(), Error> {
        match self.agent.pid(runtime_id) {
            Some(started) if started == pid && pid != 0 => Ok(()),
            _ => Err(Error::new(
                ErrorCode::AuthorizeFailed,
                format!(
                    "process {pid} registered as runtime {runtime_id:?}, which node {} did not \
                     start in that process; only runtimes the node starts register as runtimes",
                    self.settings.node_id
                ),
            )),
        }
    }

    /// Whether a create from a bus client names a binary registered on this node by a driver
    /// (or fetched for an instance placed here). A client cannot make the node run anything
    /// else.
    fn check_create_binary(&self, request: &pb::CreateRequest) -> Result<(), Error> {
        if self
            .state
            .lock()
            .binaries
            .contains_key(&request.binary_hash)
        {
            return Ok(());
        }
        Err(Error::new(
            ErrorCode::ParamInvalid,
            format!(
                "the create names binary {:?}, which no driver registered on node {}; create \
                 instances from a driver (or runtime) connected to this node",
                request.binary_hash, self.settings.node_id
            ),
        ))
    }

    /// A bus session ended.
    pub fn disconnect_client(self: &Arc<Self>, client_id: u64) {
        let (client, orphaned_job, last_of_process) = {
            let mut state = self.state.lock();
            let Some(client) = state.clients.remove(&client_id) else {
                return;
            };
            // A process's objects go when its last session does.
            let last_of_process = !state.clients.values().any(|c| c.pid == client.pid);
            let job_still_connected = state
                .clients
                .values()
                .any(|c| c.kind == pb::ClientKind::Driver && c.job_id == client.job_id);
            let orphaned = client.kind == pb::ClientKind::Driver && !job_still_connected;
            (client, orphaned, last_of_process)
        };
        if client.pid != 0 && last_of_process {
            if let Some(gone) = self.client_gone.get() {
                gone(client.pid);
            }
        }
        if let Some(socket) = &client.socket {
            // So that crashed processes leave no socket files behind.
            yr_common::sockets::remove(socket);
        }
        if orphaned_job {
            tracing::info!(job = %client.job_id, "the driver of job left; releasing its instances");
            let node = self.clone();
            tokio::spawn(async move { node.kill_job(&client.job_id, false).await });
        }
    }

    /// A runtime answered a heartbeat.
    pub fn heartbeat_ack(&self, client_id: u64) {
        let mut state = self.state.lock();
        let runtime_id = state.clients.get(&client_id).map(|c| c.runtime_id.clone());
        if let Some(slot) = runtime_id.and_then(|id| state.runtimes.get_mut(&id)) {
            slot.last_ack = Instant::now();
        }
    }

    /// A runtime answered its init call.
    pub fn init_result(&self, client_id: u64, result: pb::InitResult) {
        let mut state = self.state.lock();
        let runtime_id = state.clients.get(&client_id).map(|c| c.runtime_id.clone());
        if let Some(slot) = runtime_id.and_then(|id| state.runtimes.get_mut(&id)) {
            if let Some(waiter) = slot.init.take() {
                let _ = waiter.send(result);
            }
        }
    }

    // ----- warm pool -----------------------------------------------------------------------

    fn fill_warm_pool(self: &Arc<Self>, binary_hash: &str) {
        let (missing, spec) = {
            let state = self.state.lock();
            let idle = state
                .runtimes
                .values()
                .filter(|r| r.binary_hash == binary_hash && r.instance_id.is_none() && !r.hung)
                .count();
            let Some(spec) = state.binaries.get(binary_hash).cloned() else {
                return;
            };
            (self.settings.warm_pool_size.saturating_sub(idle), spec)
        };
        for _ in 0..missing {
            if let Err(error) = self.start_runtime(binary_hash, &spec) {
                tracing::warn!(%error, "could not start a warm runtime");
                return;
            }
        }
    }

    fn start_runtime(&self, binary_hash: &str, spec: &RuntimeSpec) -> Result<String, Error> {
        let (runtime_id, _pid) = self.agent.spawn(spec)?;
        self.state.lock().runtimes.insert(
            runtime_id.clone(),
            RuntimeSlot {
                client_id: None,
                address: String::new(),
                binary_hash: binary_hash.to_string(),
                instance_id: None,
                last_ack: Instant::now(),
                registered: Vec::new(),
                init: None,
                hung: false,
            },
        );
        Ok(runtime_id)
    }

    /// Take a runtime for `instance_id`: a warm one, or a new one. Waits until it is connected.
    async fn acquire_runtime(
        self: &Arc<Self>,
        instance_id: &str,
        binary_hash: &str,
    ) -> Result<String, Error> {
        let (runtime_id, registered) = {
            let mut state = self.state.lock();
            let warm = state
                .runtimes
                .iter()
                .filter(|(_, r)| r.binary_hash == binary_hash && r.instance_id.is_none() && !r.hung)
                .min_by_key(|(_, r)| r.client_id.is_none())
                .map(|(id, _)| id.clone());
            let runtime_id = match warm {
                Some(id) => id,
                None => {
                    let spec = state.binaries.get(binary_hash).cloned().ok_or_else(|| {
                        Error::new(
                            ErrorCode::UserCodeLoad,
                            format!("the binary {binary_hash} of instance {instance_id} is not known to node {}", self.settings.node_id),
                        )
                    })?;
                    drop(state);
                    let id = self.start_runtime(binary_hash, &spec)?;
                    state = self.state.lock();
                    id
                }
            };
            let Some(slot) = state.runtimes.get_mut(&runtime_id) else {
                return Err(Error::new(
                    ErrorCode::RuntimeManagerOperationError,
                    format!("runtime {runtime_id} ended before it was used"),
                ));
            };
            slot.instance_id = Some(instance_id.to_string());
            let registered = if slot.client_id.is_some() {
                None
            } else {
                let (sender, receiver) = oneshot::channel();
                slot.registered.push(sender);
                Some(receiver)
            };
            (runtime_id, registered)
        };
        // Refill the warm pool a little later, so that starting the replacement process does
        // not compete with this instance's start and first call (measured: warm creation p50
        // 4.0-4.5 ms with an immediate refill, 2.1-2.5 ms with this delay).
        let node = self.clone();
        let hash = binary_hash.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(WARM_POOL_REFILL_DELAY).await;
            node.fill_warm_pool(&hash);
        });
        if let Some(registered) = registered {
            let outcome =
                tokio::time::timeout(self.settings.runtime_start_timeout, registered).await;
            if !matches!(outcome, Ok(Ok(()))) {
                self.agent.signal(&runtime_id, libc::SIGKILL);
                let why = match outcome {
                    Ok(_) => "exited before it connected to the node".to_string(),
                    Err(_) => format!(
                        "did not connect within {:?}",
                        self.settings.runtime_start_timeout
                    ),
                };
                // Let the reaper finish writing what the process printed.
                tokio::time::sleep(Duration::from_millis(20)).await;
                let tail = yr_agent::tail(&self.agent.stderr_path(&runtime_id), 20);
                return Err(Error::new(
                    ErrorCode::RuntimeManagerOperationError,
                    format!(
                        "the runtime {runtime_id} of instance {instance_id} failed to start: it {why}; its stderr ends with:\n{tail}"
                    ),
                ));
            }
        }
        Ok(runtime_id)
    }

    // ----- records -------------------------------------------------------------------------

    /// Move `instance_id` to `to`, persisting the record with a compare-and-swap.
    fn transition(
        self: &Arc<Self>,
        instance_id: &str,
        to: S,
        error: Option<&Error>,
    ) -> Result<(), Error> {
        let record = {
            let mut state = self.state.lock();
            let Some(instance) = state.instances.get_mut(instance_id) else {
                return Err(Error::new(
                    ErrorCode::InstanceNotFound,
                    format!("instance {instance_id} is not on this node"),
                ));
            };
            let from = S::try_from(instance.record.state).unwrap_or(S::New);
            state_machine::check(instance_id, from, to)?;
            instance.record.state = to as i32;
            instance.record.error = error.map(error_to_proto);
            instance.record.clone()
        };
        self.persist(record);
        Ok(())
    }

    /// Persist the instance's latest record. One writer per instance writes the changes in
    /// order, never an older state over a newer one, and retries until the meta store answers
    /// (a master outage delays records; it does not lose them).
    fn persist(self: &Arc<Self>, record: pb::InstanceRecord) {
        let forwarded = self
            .state
            .lock()
            .instances
            .get(&record.instance_id)
            .is_some_and(|i| i.forwarded_to.is_some());
        if forwarded {
            // The node that runs it owns its record.
            return;
        }
        self.records.write(record);
    }

    fn notify(&self, instance_id: &str, notify: pb::InstanceNotify) {
        let subscribers = self
            .state
            .lock()
            .instances
            .get(instance_id)
            .map(|i| i.subscribers.clone())
            .unwrap_or_default();
        for subscriber in subscribers {
            match subscriber {
                Subscriber::Client(client_id) => {
                    self.send(client_id, 0, pb::bus_response::Body::Notify(notify.clone()));
                }
                Subscriber::Remote(sender) => {
                    let _ = sender.send(Ok(notify.clone()));
                }
            }
        }
    }

    // ----- create --------------------------------------------------------------------------

    /// Handle a create: validate, record it and answer at once; the outcome is notified to
    /// `subscriber` later.
    pub fn create(
        self: &Arc<Self>,
        request: pb::CreateRequest,
        subscriber: Subscriber,
    ) -> Result<pb::CreateResponse, Error> {
        let options: InvokeOptions = rmp_serde::from_slice(&request.options).map_err(|e| {
            Error::new(
                ErrorCode::ParamInvalid,
                format!("the create's options cannot be decoded: {e}"),
            )
        })?;
        options.validate()?;
        // A create forwarded by another node was checked there, against its driver's functions.
        if !request.stateless && !request.function.is_empty() && request.creator_node_id.is_empty()
        {
            let known = self.state.lock().functions.contains(&request.function);
            if !known {
                return Err(Error::new(
                    ErrorCode::FunctionMetaNotFound,
                    format!(
                        "function {} is not registered on node {}; annotate it with #[yr::instance] in the driver's binary",
                        request.function, self.settings.node_id
                    ),
                ));
            }
        }
        // A client's create runs only a binary a driver registered here.
        if request.creator_node_id.is_empty() {
            self.check_create_binary(&request)?;
        }
        let instance_id = if request.designated_instance_id.is_empty() {
            yr_common::ids::random_hex(20)
        } else {
            request.designated_instance_id.clone()
        };
        let name = options
            .name
            .clone()
            .map(|n| (options.namespace.clone().unwrap_or_default(), n));
        {
            let mut state = self.state.lock();
            if let Some(key) = &name {
                if let Some(existing) = state.named.get(key).cloned() {
                    if let Some(instance) = state.instances.get_mut(&existing) {
                        instance.subscribers.push(subscriber.clone());
                        let class = instance.record.class_name.clone();
                        let record = instance.record.clone();
                        drop(state);
                        if record.state == S::Running as i32 {
                            self.notify_one(
                                &subscriber,
                                pb::InstanceNotify {
                                    instance_id: existing.clone(),
                                    state: S::Running as i32,
                                    runtime_address: record.runtime_address,
                                    error: None,
                                },
                            );
                        }
                        return Ok(pb::CreateResponse {
                            instance_id: existing,
                            existing: true,
                            class_name: class,
                        });
                    }
                }
            }
            if state.instances.contains_key(&instance_id) {
                return Err(Error::new(
                    ErrorCode::InstanceDuplicated,
                    format!("you are not allowed to create instance with the same instance id {instance_id}, please kill it first"),
                ));
            }
            if !self.limiter.lock().try_take() {
                return Err(Error::new(
                    ErrorCode::CreateRateLimited,
                    format!(
                        "create rate limited on local node {}: more than {} creates per second; retry later",
                        self.settings.node_id, self.settings.create_rate.0
                    ),
                ));
            }
            let record = pb::InstanceRecord {
                instance_id: instance_id.clone(),
                function: request.function.clone(),
                class_name: request.class_name.clone(),
                state: S::New as i32,
                node_id: self.settings.node_id.clone(),
                job_id: request.job_id.clone(),
                parent_instance_id: request.parent_instance_id.clone(),
                detached: options.is_detached(),
                options: request.options.clone(),
                args: request.args.clone(),
                stateless: request.stateless,
                name: name.as_ref().map(|n| n.1.clone()).unwrap_or_default(),
                namespace: name.as_ref().map(|n| n.0.clone()).unwrap_or_default(),
                binary_path: request.binary_path.clone(),
                binary_hash: request.binary_hash.clone(),
                runtime_args: request.runtime_args.clone(),
                creator_node_id: request.creator_node_id.clone(),
                ..Default::default()
            };
            if let Some(key) = name.clone() {
                self.records.write_name(&key.0, &key.1, &instance_id);
                state.named.insert(key, instance_id.clone());
            }
            state.instances.insert(
                instance_id.clone(),
                Instance {
                    record,
                    options,
                    runtime_id: None,
                    subscribers: vec![subscriber],
                    allocated: None,
                    exit_waiters: Vec::new(),
                    killing: false,
                    forwarded_to: None,
                    creator_address: request.creator_node_address.clone(),
                },
            );
        }
        self.creates.fetch_add(1, Ordering::Relaxed);
        self.spawn_start(instance_id.clone());
        Ok(pb::CreateResponse {
            instance_id,
            existing: false,
            class_name: request.class_name,
        })
    }

    fn notify_one(&self, subscriber: &Subscriber, notify: pb::InstanceNotify) {
        match subscriber {
            Subscriber::Client(client_id) => {
                self.send(*client_id, 0, pb::bus_response::Body::Notify(notify))
            }
            Subscriber::Remote(sender) => {
                let _ = sender.send(Ok(notify));
            }
        }
    }

    fn spawn_start(self: &Arc<Self>, instance_id: String) {
        let node = self.clone();
        let future: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
            Box::pin(async move { node.schedule_and_start(instance_id).await });
        tokio::spawn(future);
    }

    /// SCHEDULING → CREATING → RUNNING, or a failure state with the error callers get.
    async fn schedule_and_start(self: Arc<Self>, instance_id: String) {
        let _ = self.transition(&instance_id, S::Scheduling, None);
        let outcome = self.try_start(&instance_id).await;
        if let Err(error) = outcome {
            self.fail_instance(&instance_id, error).await;
        }
    }

    async fn try_start(self: &Arc<Self>, instance_id: &str) -> Result<(), Error> {
        let (request, timeout) = {
            let state = self.state.lock();
            let instance = state
                .instances
                .get(instance_id)
                .ok_or_else(|| gone(instance_id))?;
            (
                Amount::of(&instance.options),
                instance.options.schedule_timeout(),
            )
        };
        if let Placement::Remote { node_id, address } =
            self.place(instance_id, &request, timeout).await?
        {
            return self.forward(instance_id, node_id, address).await;
        }
        self.transition(instance_id, S::Creating, None)?;
        self.ensure_binary(instance_id).await?;
        let (binary_hash, init) = {
            let state = self.state.lock();
            let instance = state
                .instances
                .get(instance_id)
                .ok_or_else(|| gone(instance_id))?;
            (
                instance.record.binary_hash.clone(),
                pb::InitCall {
                    instance_id: instance_id.to_string(),
                    function: instance.record.function.clone(),
                    stateless: instance.record.stateless,
                    args: instance.record.args.clone(),
                    options: instance.record.options.clone(),
                    job_id: instance.record.job_id.clone(),
                },
            )
        };
        let runtime_id = self.acquire_runtime(instance_id, &binary_hash).await?;
        let (client_id, address, init_result) = {
            let mut state = self.state.lock();
            if let Some(instance) = state.instances.get_mut(instance_id) {
                instance.runtime_id = Some(runtime_id.clone());
                instance.record.runtime_pid = self.agent.pid(&runtime_id).unwrap_or(0);
            }
            let slot = state.runtimes.get_mut(&runtime_id).ok_or_else(|| {
                Error::new(
                    ErrorCode::RuntimeManagerOperationError,
                    format!("runtime {runtime_id} ended before it started instance {instance_id}"),
                )
            })?;
            let (sender, receiver) = oneshot::channel();
            slot.init = Some(sender);
            (slot.client_id.unwrap_or(0), slot.address.clone(), receiver)
        };
        self.send(client_id, 0, pb::bus_response::Body::Init(init));
        let result = match tokio::time::timeout(self.settings.init_timeout, init_result).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => {
                return Err(Error::new(
                    ErrorCode::UserFunctionException,
                    format!(
                        "the runtime of instance {instance_id} exited while its constructor ran"
                    ),
                ))
            }
            Err(_) => {
                return Err(Error::new(
                    ErrorCode::InnerCommunication,
                    format!(
                        "the constructor of instance {instance_id} did not finish within {:?}",
                        self.settings.init_timeout
                    ),
                ))
            }
        };
        if let Some(error) = result.error {
            return Err(yr_runtime::cluster::convert::error_from_proto(&error));
        }
        {
            let mut state = self.state.lock();
            let instance = state
                .instances
                .get_mut(instance_id)
                .ok_or_else(|| gone(instance_id))?;
            instance.record.runtime_address = address.clone();
            if instance.killing {
                return Ok(());
            }
        }
        self.transition(instance_id, S::Running, None)?;
        self.notify(
            instance_id,
            pb::InstanceNotify {
                instance_id: instance_id.to_string(),
                state: S::Running as i32,
                runtime_address: address,
                error: None,
            },
        );
        Ok(())
    }

    /// Find where the instance runs: reserve resources here if they are free, else take the
    /// master's choice of another node. Waits up to `timeout` (then 1017 with the last reason);
    /// a request larger than every node fails at once with 1006.
    async fn place(
        self: &Arc<Self>,
        instance_id: &str,
        request: &Amount,
        timeout: Duration,
    ) -> Result<Placement, Error> {
        let deadline = Instant::now() + timeout;
        let mut last_reason = None;
        let mut next_master_ask = Instant::now();
        loop {
            if self.killing(instance_id) {
                return Err(Error::new(
                    ErrorCode::ScheduleCanceled,
                    format!("the creation of instance {instance_id} was cancelled by a kill"),
                ));
            }
            if self.resources.lock().try_allocate(request) {
                if let Some(instance) = self.state.lock().instances.get_mut(instance_id) {
                    instance.allocated = Some(request.clone());
                }
                self.master.resources_changed(request.delta(true));
                return Ok(Placement::Local);
            }
            if Instant::now() >= next_master_ask {
                next_master_ask = Instant::now() + Duration::from_millis(200);
                match self
                    .master
                    .schedule(request, vec![self.settings.node_id.clone()])
                    .await
                {
                    Ok((node_id, address)) => return Ok(Placement::Remote { node_id, address }),
                    Err(error) if error.code() == ErrorCode::ResourceConfigError => {
                        let fits_here = request.fits_in(&self.resources.lock().capacity);
                        if !fits_here {
                            return Err(error);
                        }
                        last_reason = Some(error);
                    }
                    Err(error) => last_reason = Some(error),
                }
            }
            if Instant::now() >= deadline {
                let free = self.resources.lock().allocatable.clone();
                let reason = match last_reason {
                    Some(error) => format!("{}: {}", error.code(), error.message()),
                    None => format!("{}", ErrorCode::ResourceNotEnough),
                };
                return Err(Error::new(
                    ErrorCode::ScheduleCanceled,
                    format!(
                        "the instance {instance_id} cannot be scheduled within {} ms: it needs {request}, node {} has {free} free; last reason: {reason}; free resources or raise schedule_timeout_ms",
                        timeout.as_millis(),
                        self.settings.node_id
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Hand the instance to the node at `address`; relay its notifications to this node's
    /// subscribers until it ends.
    async fn forward(
        self: &Arc<Self>,
        instance_id: &str,
        node_id: String,
        address: String,
    ) -> Result<(), Error> {
        let request = {
            let mut state = self.state.lock();
            let instance = state
                .instances
                .get_mut(instance_id)
                .ok_or_else(|| gone(instance_id))?;
            instance.forwarded_to = Some(address.clone());
            instance.record.node_id = node_id.clone();
            let record = &instance.record;
            pb::CreateRequest {
                function: record.function.clone(),
                stateless: record.stateless,
                args: record.args.clone(),
                options: record.options.clone(),
                job_id: record.job_id.clone(),
                class_name: record.class_name.clone(),
                parent_instance_id: record.parent_instance_id.clone(),
                binary_path: record.binary_path.clone(),
                binary_hash: record.binary_hash.clone(),
                runtime_args: record.runtime_args.clone(),
                designated_instance_id: instance_id.to_string(),
                creator_node_id: self.settings.node_id.clone(),
                creator_node_address: self.settings.node_address.clone(),
            }
        };
        tracing::info!(instance = %instance_id, node = %node_id, "placing the instance on another node");
        let channel =
            yr_runtime::cluster::transport::connect(&address, ErrorCode::InnerCommunication)
                .await?;
        let mut client = pb::node_client::NodeClient::new(channel)
            .max_decoding_message_size(yr_transport::max_message_bytes())
            .max_encoding_message_size(yr_transport::max_message_bytes());
        let mut notifications = client
            .create(request)
            .await
            .map_err(|status| {
                Error::new(
                    status_code(&status),
                    format!(
                        "node {node_id} refused instance {instance_id}: {}",
                        status.message()
                    ),
                )
            })?
            .into_inner();
        let node = self.clone();
        let id = instance_id.to_string();
        // A stopped node keeps its connections open: its loss comes from the meta store.
        let lost = self.fencing.forwarded_lost(&node_id, instance_id);
        tokio::spawn(async move {
            use tokio_stream::StreamExt;
            tokio::pin!(lost);
            loop {
                let next = tokio::select! {
                    next = notifications.next() => next,
                    error = &mut lost => {
                        node.notify(&id, error_notify(&id, S::Fatal, &error));
                        node.forget_forwarded(&id);
                        return;
                    }
                };
                match next {
                    Some(Ok(notify)) => {
                        let state = S::try_from(notify.state).unwrap_or(S::Fatal);
                        if let Some(instance) = node.state.lock().instances.get_mut(&id) {
                            instance.record.state = notify.state;
                            instance.record.runtime_address = notify.runtime_address.clone();
                        }
                        node.notify(&id, notify.clone());
                        if matches!(state, S::Exited | S::Fatal) {
                            node.forget_forwarded(&id);
                            return;
                        }
                    }
                    Some(Err(_)) | None => {
                        let error = Error::new(
                            ErrorCode::InstanceExited,
                            format!(
                                "instance {id} ran on node {node_id}, which is no longer reachable"
                            ),
                        );
                        node.notify(&id, error_notify(&id, S::Fatal, &error));
                        node.forget_forwarded(&id);
                        return;
                    }
                }
            }
        });
        Ok(())
    }

    /// Make sure this node can start the instance's binary: known already, the same file on
    /// this machine, or fetched by content key from the node that created it (2001 if not).
    async fn ensure_binary(self: &Arc<Self>, instance_id: &str) -> Result<(), Error> {
        let (hash, path, args, job_id, creator) = {
            let state = self.state.lock();
            let instance = state
                .instances
                .get(instance_id)
                .ok_or_else(|| gone(instance_id))?;
            let record = &instance.record;
            if state.binaries.contains_key(&record.binary_hash) {
                return Ok(());
            }
            (
                record.binary_hash.clone(),
                PathBuf::from(&record.binary_path),
                record.runtime_args.clone(),
                record.job_id.clone(),
                instance.creator_address.clone(),
            )
        };
        let hash_env = hash.clone();
        let spec = |binary_path: PathBuf| RuntimeSpec {
            binary_path,
            args: args.clone(),
            job_id: job_id.clone(),
            env: vec![("YR_BINARY_HASH".into(), hash_env.clone())],
        };
        // Hashing a large binary takes seconds on a busy machine: the worker's other tasks (the
        // heartbeats to the master among them) move to another thread meanwhile.
        if !self.settings.fetch_binaries
            && path.is_file()
            && tokio::task::block_in_place(|| yr_runtime::cluster::binary_hash(&path)) == hash
        {
            self.state.lock().binaries.insert(hash, spec(path));
            return Ok(());
        }
        let fetched = self.fetch_binary(&hash, &creator).await.map_err(|reason| {
            Error::new(
                ErrorCode::UserCodeLoad,
                format!(
                    "the code of instance {instance_id} (binary {hash}) is not on node {} and could not be fetched from {creator}: {reason}",
                    self.settings.node_id
                ),
            )
        })?;
        self.state.lock().binaries.insert(hash, spec(fetched));
        Ok(())
    }

    async fn fetch_binary(&self, hash: &str, creator: &str) -> Result<PathBuf, String> {
        use std::os::unix::fs::PermissionsExt;
        use tokio::io::AsyncWriteExt;
        use tokio_stream::StreamExt;
        if creator.is_empty() {
            return Err("no node to fetch it from".into());
        }
        if !valid_binary_hash(hash) {
            return Err(format!("{hash:?} is not a binary content key"));
        }
        let dir = self.settings.session_dir.join("binaries");
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| e.to_string())?;
        let target = dir.join(hash);
        if target.is_file() {
            return Ok(target);
        }
        let channel = yr_runtime::cluster::transport::connect(creator, ErrorCode::UserCodeLoad)
            .await
            .map_err(|e| e.message().to_string())?;
        let mut client = pb::node_client::NodeClient::new(channel)
            .max_decoding_message_size(yr_transport::max_message_bytes());
        let mut chunks = client
            .fetch_binary(pb::FetchBinaryRequest {
                hash: hash.to_string(),
            })
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        let partial = dir.join(format!("{hash}.part-{}", yr_common::ids::random_hex(6)));
        let mut file = tokio::fs::File::create(&partial)
            .await
            .map_err(|e| e.to_string())?;
        let mut size = 0usize;
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|s| s.message().to_string())?;
            size += chunk.data.len();
            file.write_all(&chunk.data)
                .await
                .map_err(|e| e.to_string())?;
        }
        file.sync_all().await.map_err(|e| e.to_string())?;
        drop(file);
        if size == 0 {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err("the creator node sent an empty binary".into());
        }
        tokio::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755))
            .await
            .map_err(|e| e.to_string())?;
        tokio::fs::rename(&partial, &target)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(
            hash,
            bytes = size,
            from = creator,
            "fetched a driver binary"
        );
        Ok(target)
    }

    /// The path of a binary this node knows, for FetchBinary.
    pub fn binary_path(&self, hash: &str) -> Option<PathBuf> {
        self.state
            .lock()
            .binaries
            .get(hash)
            .map(|spec| spec.binary_path.clone())
    }

    fn forget_forwarded(&self, instance_id: &str) {
        let mut state = self.state.lock();
        if let Some(instance) = state.instances.remove(instance_id) {
            for waiter in instance.exit_waiters {
                let _ = waiter.send(());
            }
            if !instance.record.name.is_empty() {
                let key = (
                    instance.record.namespace.clone(),
                    instance.record.name.clone(),
                );
                if state.named.get(&key).map(String::as_str) == Some(instance_id) {
                    state.named.remove(&key);
                }
            }
        }
    }

    fn killing(&self, instance_id: &str) -> bool {
        self.state
            .lock()
            .instances
            .get(instance_id)
            .map(|i| i.killing)
            .unwrap_or(true)
    }

    fn release(&self, instance_id: &str) {
        let allocated = self
            .state
            .lock()
            .instances
            .get_mut(instance_id)
            .and_then(|i| i.allocated.take());
        if let Some(amount) = allocated {
            self.resources.lock().release(&amount);
            self.master.resources_changed(amount.delta(false));
        }
    }

    /// The instance failed: FATAL (or FAILED and restarted with `recover_retry_times`).
    async fn fail_instance(self: &Arc<Self>, instance_id: &str, error: Error) {
        let (runtime_id, can_recover, killing) = {
            let mut state = self.state.lock();
            let Some(instance) = state.instances.get_mut(instance_id) else {
                return;
            };
            let can_recover = instance.record.restarts < instance.options.recover_retry_times
                && !instance.killing
                && instance.record.state == S::Running as i32;
            (instance.runtime_id.take(), can_recover, instance.killing)
        };
        if let Some(runtime_id) = runtime_id {
            self.agent.signal(&runtime_id, libc::SIGKILL);
        }
        self.release(instance_id);
        if killing {
            self.finish_exit(instance_id, &error);
            return;
        }
        if can_recover {
            tracing::info!(instance = %instance_id, %error, "restarting the instance (recover_retry_times)");
            if let Some(instance) = self.state.lock().instances.get_mut(instance_id) {
                instance.record.restarts += 1;
            }
            let _ = self.transition(instance_id, S::Failed, Some(&error));
            self.notify(instance_id, error_notify(instance_id, S::Failed, &error));
            self.spawn_start(instance_id.to_string());
            return;
        }
        tracing::info!(instance = %instance_id, %error, "instance failed");
        let _ = self.transition(instance_id, S::Fatal, Some(&error));
        self.notify(instance_id, error_notify(instance_id, S::Fatal, &error));
        self.kill_children(instance_id);
    }

    // ----- runtime events --------------------------------------------------------------------

    /// A runtime process ended.
    pub async fn on_runtime_exit(self: &Arc<Self>, event: RuntimeEvent) {
        let (instance_id, hung, init, registered) = {
            let mut state = self.state.lock();
            let Some(mut slot) = state.runtimes.remove(&event.runtime_id) else {
                return;
            };
            (
                slot.instance_id.take(),
                slot.hung,
                slot.init.take(),
                slot.client_id.is_some(),
            )
        };
        drop(init);
        let Some(instance_id) = instance_id else {
            if !event.cause.is_clean_exit() {
                tracing::warn!(runtime = %event.runtime_id, cause = %event.cause, stderr = %event.stderr_tail, "a warm runtime ended");
            }
            return;
        };
        let (killing, state_now) = {
            let state = self.state.lock();
            match state.instances.get(&instance_id) {
                // Only the instance's current runtime speaks for it: a runtime the node killed
                // itself (a failed constructor, a restart) or that never connected (its start
                // failure is reported where it was awaited) is not news.
                Some(instance)
                    if instance.runtime_id.as_deref() == Some(event.runtime_id.as_str()) =>
                {
                    (instance.killing, instance.record.state)
                }
                Some(instance) if instance.killing && instance.runtime_id.is_none() => {
                    (true, instance.record.state)
                }
                _ => return,
            }
        };
        if killing {
            self.release(&instance_id);
            self.finish_exit(&instance_id, &exited_error(&instance_id));
            return;
        }
        if state_now == S::Fatal as i32 {
            // The instance already failed (for example its constructor), and this is the node
            // killing its runtime: callers keep the first error.
            return;
        }
        let error = if hung {
            Error::new(
                ErrorCode::UserFunctionException,
                format!(
                    "the runtime of instance {instance_id} stopped answering heartbeats for {:?} and was killed; check the user code for a hang",
                    self.settings.heartbeat_timeout
                ),
            )
        } else if event.cause.is_clean_exit() && state_now == S::Running as i32 {
            Error::new(
                ErrorCode::InstanceExited,
                format!(
                    "instance {instance_id} exited (its runtime {} ); create it again to call it",
                    event.cause
                ),
            )
        } else if !registered {
            Error::new(
                ErrorCode::RuntimeManagerOperationError,
                format!(
                    "the runtime of instance {instance_id} failed to start: it {}; its stderr ends with:\n{}",
                    event.cause, event.stderr_tail
                ),
            )
        } else {
            Error::new(
                ErrorCode::UserFunctionException,
                format!(
                    "the runtime of instance {instance_id} crashed: it {}; its stderr ends with:\n{}",
                    event.cause, event.stderr_tail
                ),
            )
        };
        self.fail_instance(&instance_id, error).await;
    }

    /// Send heartbeats; kill runtimes that stopped answering.
    pub fn heartbeat_round(&self) {
        let mut hung = Vec::new();
        let mut beats = Vec::new();
        {
            let mut state = self.state.lock();
            for (runtime_id, slot) in state.runtimes.iter_mut() {
                let Some(client_id) = slot.client_id else {
                    continue;
                };
                if slot.last_ack.elapsed() > self.settings.heartbeat_timeout && !slot.hung {
                    slot.hung = true;
                    hung.push(runtime_id.clone());
                } else {
                    beats.push(client_id);
                }
            }
        }
        for client_id in beats {
            self.send(
                client_id,
                0,
                pb::bus_response::Body::Heartbeat(pb::Heartbeat {}),
            );
        }
        for runtime_id in hung {
            tracing::warn!(runtime = %runtime_id, "runtime missed its heartbeats; killing it");
            self.agent.signal(&runtime_id, libc::SIGCONT);
            self.agent.signal(&runtime_id, libc::SIGKILL);
        }
    }

    // ----- kill ------------------------------------------------------------------------------

    /// Kill an instance: shutdown hook within its grace period, then the process.
    pub async fn kill(self: &Arc<Self>, instance_id: &str, wait: bool) -> Result<(), Error> {
        if instance_id.is_empty() {
            return Err(Error::new(
                ErrorCode::InstanceIdEmpty,
                "the instance id is empty; pass the id of a created instance",
            ));
        }
        let forwarded = self
            .state
            .lock()
            .instances
            .get(instance_id)
            .and_then(|i| i.forwarded_to.clone());
        if let Some(address) = forwarded {
            return self.kill_remote(&address, instance_id, wait).await;
        }
        let found = {
            let mut state = self.state.lock();
            let state = &mut *state;
            match state.instances.get_mut(instance_id) {
                None => None,
                Some(instance) => {
                    let (sender, receiver) = oneshot::channel();
                    instance.exit_waiters.push(sender);
                    let already = instance.killing;
                    instance.killing = true;
                    let runtime_id = instance.runtime_id.clone();
                    let grace = instance.options.graceful_shutdown_time();
                    let terminal = matches!(
                        S::try_from(instance.record.state),
                        Ok(S::Fatal) | Ok(S::ScheduleFailed)
                    );
                    let client = runtime_id
                        .as_ref()
                        .and_then(|id| state.runtimes.get(id))
                        .and_then(|slot| slot.client_id)
                        .filter(|_| !already);
                    Some((
                        runtime_id.map(|id| (id, client)),
                        grace,
                        (receiver, terminal, already),
                    ))
                }
            }
        };
        let Some((runtime, grace, exited)) = found else {
            return self.kill_elsewhere(instance_id, wait).await;
        };
        let (receiver, terminal, already) = exited;
        if !already {
            if self.transition(instance_id, S::Exiting, None).is_err() && !terminal {
                tracing::debug!(instance = %instance_id, "kill of an instance that is still being created");
            }
            match runtime {
                Some((runtime_id, client)) => {
                    if let Some(client_id) = client {
                        self.send(
                            client_id,
                            0,
                            pb::bus_response::Body::Shutdown(pb::Shutdown {
                                grace_period_ms: grace.as_millis() as u64,
                            }),
                        );
                    }
                    let node = self.clone();
                    let instance_id = instance_id.to_string();
                    tokio::spawn(async move {
                        tokio::time::sleep(grace + Duration::from_secs(1)).await;
                        if node.agent.signal(&runtime_id, libc::SIGKILL) {
                            tracing::info!(instance = %instance_id, "runtime outlived its grace period; killed");
                        }
                    });
                }
                None => {
                    self.release(instance_id);
                    self.finish_exit(instance_id, &exited_error(instance_id));
                }
            }
        }
        if wait {
            let _ = tokio::time::timeout(grace + Duration::from_secs(5), receiver).await;
        }
        Ok(())
    }

    /// Kill an instance that another node runs, found through the meta store.
    async fn kill_elsewhere(&self, instance_id: &str, wait: bool) -> Result<(), Error> {
        let not_found = || {
            Error::new(
                ErrorCode::InstanceNotFound,
                format!("instance {instance_id} is not found: it was never created or it was killed; check the id"),
            )
        };
        let record = match self.meta.get(&instance_key(instance_id)).await {
            Ok(Some(kv)) => pb::InstanceRecord::decode(kv.value).map_err(|_| not_found())?,
            Ok(None) => return Err(not_found()),
            Err(error) => return Err(error.into()),
        };
        if record.node_id == self.settings.node_id {
            return Err(not_found());
        }
        let node = match self.meta.get(&format!("/yr/node/{}", record.node_id)).await {
            Ok(Some(kv)) => pb::NodeInfo::decode(kv.value).map_err(|_| not_found())?,
            Ok(None) => return Err(not_found()),
            Err(error) => return Err(error.into()),
        };
        self.kill_remote(&node.address, instance_id, wait).await
    }

    async fn kill_remote(&self, address: &str, instance_id: &str, wait: bool) -> Result<(), Error> {
        let channel =
            yr_runtime::cluster::transport::connect(address, ErrorCode::InnerCommunication).await?;
        pb::node_client::NodeClient::new(channel)
            .kill(pb::KillRequest {
                instance_id: instance_id.to_string(),
                wait,
                job_id: String::new(),
                force: false,
            })
            .await
            .map(|_| ())
            .map_err(|status| {
                Error::new(
                    ErrorCode::InnerCommunication,
                    format!(
                        "the node at {address} did not kill instance {instance_id}: {}",
                        status.message()
                    ),
                )
            })
    }

    /// EXITING → EXITED: delete the record, tell everyone, wake the waiters.
    fn finish_exit(self: &Arc<Self>, instance_id: &str, error: &Error) {
        let instance = {
            let mut state = self.state.lock();
            let instance = state.instances.remove(instance_id);
            if let Some(instance) = &instance {
                if !instance.record.name.is_empty() {
                    let key = (
                        instance.record.namespace.clone(),
                        instance.record.name.clone(),
                    );
                    if state.named.get(&key).map(String::as_str) == Some(instance_id) {
                        state.named.remove(&key);
                    }
                }
            }
            instance
        };
        let Some(mut instance) = instance else { return };
        let notify = error_notify(instance_id, S::Exited, error);
        for subscriber in &instance.subscribers {
            self.notify_one(subscriber, notify.clone());
        }
        for waiter in instance.exit_waiters.drain(..) {
            let _ = waiter.send(());
        }
        if instance.forwarded_to.is_none() {
            self.records.delete(instance_id);
        }
        if !instance.record.name.is_empty() {
            self.records
                .delete_name(&instance.record.namespace, &instance.record.name);
        }
        self.kill_children(instance_id);
    }

    /// The ids of instances that are not detached and match `belongs`.
    fn attached_instances(&self, belongs: impl Fn(&pb::InstanceRecord) -> bool) -> Vec<String> {
        self.state
            .lock()
            .instances
            .values()
            .filter(|i| !i.record.detached && belongs(&i.record))
            .map(|i| i.record.instance_id.clone())
            .collect()
    }

    fn kill_children(self: &Arc<Self>, parent: &str) {
        let children = self.attached_instances(|record| record.parent_instance_id == parent);
        for child in children {
            let node = self.clone();
            tokio::spawn(async move {
                let _ = node.kill(&child, false).await;
            });
        }
    }

    /// Kill every instance of `job_id` that is not detached (`finalize`, or the driver left).
    pub async fn kill_job(self: &Arc<Self>, job_id: &str, wait: bool) {
        let ids = self.attached_instances(|record| record.job_id == job_id);
        let mut waits = Vec::new();
        for id in ids {
            let node = self.clone();
            waits.push(tokio::spawn(async move { node.kill(&id, wait).await }));
        }
        for handle in waits {
            let _ = handle.await;
        }
    }

    // ----- lookups -----------------------------------------------------------------------------

    /// Find an instance by name (waiting up to the timeout) or id; subscribe the asker.
    pub async fn lookup(
        self: &Arc<Self>,
        client_id: u64,
        request: pb::GetNamedRequest,
    ) -> Result<pb::GetNamedResponse, Error> {
        let deadline = Instant::now() + Duration::from_millis(request.timeout_ms.min(86_400_000));
        loop {
            {
                let mut state = self.state.lock();
                let id = if request.instance_id.is_empty() {
                    state
                        .named
                        .get(&(request.namespace.clone(), request.name.clone()))
                        .cloned()
                } else {
                    Some(request.instance_id.clone())
                };
                if let Some(instance) = id.and_then(|id| state.instances.get_mut(&id)) {
                    if !instance.killing {
                        instance.subscribers.push(Subscriber::Client(client_id));
                        return Ok(pb::GetNamedResponse {
                            instance_id: instance.record.instance_id.clone(),
                            class_name: instance.record.class_name.clone(),
                            runtime_address: instance.record.runtime_address.clone(),
                            state: instance.record.state,
                        });
                    }
                }
            }
            if let Some(found) = self.lookup_elsewhere(&request).await {
                return Ok(found);
            }
            if Instant::now() >= deadline {
                let what = if request.instance_id.is_empty() {
                    format!(
                        "named {:?} in namespace {:?}",
                        request.name, request.namespace
                    )
                } else {
                    request.instance_id.clone()
                };
                return Err(Error::new(
                    ErrorCode::InstanceNotFound,
                    format!("failed to get instance {what}: no live instance; create it first or check the name and namespace"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A running instance that another node owns, from the meta store.
    async fn lookup_elsewhere(
        &self,
        request: &pb::GetNamedRequest,
    ) -> Option<pb::GetNamedResponse> {
        let id = if request.instance_id.is_empty() {
            let kv = self
                .meta
                .get(&named_key(&request.namespace, &request.name))
                .await
                .ok()??;
            String::from_utf8(kv.value.to_vec()).ok()?
        } else {
            request.instance_id.clone()
        };
        let kv = self.meta.get(&instance_key(&id)).await.ok()??;
        let record = pb::InstanceRecord::decode(kv.value).ok()?;
        (record.state == S::Running as i32 && record.node_id != self.settings.node_id).then_some(
            pb::GetNamedResponse {
                instance_id: record.instance_id,
                class_name: record.class_name,
                runtime_address: record.runtime_address,
                state: record.state,
            },
        )
    }

    /// Every named instance on this node.
    pub fn list_named(&self) -> pb::ListNamedResponse {
        let state = self.state.lock();
        let mut instances: Vec<pb::NamedInstance> = state
            .named
            .iter()
            .map(|((namespace, name), id)| pb::NamedInstance {
                name: name.clone(),
                namespace: namespace.clone(),
                instance_id: id.clone(),
            })
            .collect();
        instances.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        pb::ListNamedResponse { instances }
    }

    /// Instances by state, for metrics.
    pub fn instance_counts(&self) -> Vec<(String, usize)> {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for instance in self.state.lock().instances.values() {
            let name = S::try_from(instance.record.state)
                .map(|s| s.as_str_name())
                .unwrap_or("UNKNOWN");
            *counts.entry(name.to_string()).or_default() += 1;
        }
        let mut counts: Vec<_> = counts.into_iter().collect();
        counts.sort();
        counts
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
        let ids: Vec<String> = self.state.lock().instances.keys().cloned().collect();
        let mut waits = Vec::new();
        for id in ids {
            let node = self.clone();
            waits.push(tokio::spawn(async move { node.kill(&id, true).await }));
        }
        for handle in waits {
            let _ = handle.await;
        }
        self.stop();
    }

    // ----- fencing ---------------------------------------------------------------------------

    /// The master declared this node lost: fail every instance that runs here with `error`
    /// (1007). Instances forwarded to other nodes are theirs and stay.
    pub fn fence_local_instances(self: &Arc<Self>, error: &Error) {
        let ids: Vec<String> = self
            .state
            .lock()
            .instances
            .iter()
            .filter(|(_, instance)| instance.forwarded_to.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            self.on_fenced(&id, error);
        }
    }

    /// `instance_id`'s record is not this node's to write any more (the master wrote it FATAL,
    /// or another incarnation of this node owns it): fail the instance with `error` (1007) for
    /// good (no restart), kill its runtime and tell its subscribers FATAL. The instance leaves
    /// the node once its runtime is gone; its record stays as its owner wrote it.
    pub fn on_fenced(self: &Arc<Self>, instance_id: &str, error: &Error) {
        let runtime_id = {
            let mut state = self.state.lock();
            let Some(instance) = state.instances.get_mut(instance_id) else {
                return;
            };
            let ended = matches!(
                S::try_from(instance.record.state),
                Ok(S::Fatal | S::Exited | S::Evicted | S::ScheduleFailed)
            );
            if instance.forwarded_to.is_some() || instance.killing || ended {
                return;
            }
            instance.killing = true;
            instance.runtime_id.take()
        };
        tracing::warn!(instance = %instance_id, %error, "instance fenced: failing it and killing its runtime");
        let _ = self.transition(instance_id, S::Fatal, Some(error));
        self.notify(instance_id, error_notify(instance_id, S::Fatal, error));
        // Released now, so that a registration that follows reports the room.
        self.release(instance_id);
        match runtime_id {
            // Its exit ends the instance here (killing, no runtime).
            Some(runtime_id) => {
                self.agent.signal(&runtime_id, libc::SIGKILL);
            }
            // Not started yet: it leaves now, as after a kill (a start in progress finds it
            // gone).
            None => self.finish_exit(instance_id, error),
        }
        self.kill_children(instance_id);
    }
}

fn status_code(_status: &Status) -> ErrorCode {
    ErrorCode::InnerCommunication
}

fn gone(instance_id: &str) -> Error {
    Error::new(
        ErrorCode::ScheduleCanceled,
        format!("the creation of instance {instance_id} was cancelled: it was killed"),
    )
}

fn exited_error(instance_id: &str) -> Error {
    Error::new(
        ErrorCode::InstanceExited,
        format!("instance occurs fatal error, cause by: (instance {instance_id} has been killed or exited.)"),
    )
}

/// Whether `hash` looks like a binary content key (`<32 hex>-<hex length>`), so it is safe as a
/// file name.
fn valid_binary_hash(hash: &str) -> bool {
    match hash.split_once('-') {
        Some((digest, length)) => {
            digest.len() == 32
                && !length.is_empty()
                && length.len() <= 16
                && digest
                    .bytes()
                    .chain(length.bytes())
                    .all(|b| b.is_ascii_hexdigit())
        }
        None => false,
    }
}

/// A driver on this machine registers its binary: it must be the executable that the driver
/// process (`pid`, from the connection) runs, and its content key is computed here. So the node
/// runs only code a driver of the cluster runs itself, never a path a client merely names.
fn check_driver_binary(register: &pb::RegisterClient, pid: u32) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt;
    let path = std::path::Path::new(&register.binary_path);
    let refused = |why: String| {
        Error::new(
            ErrorCode::AuthorizeFailed,
            format!(
                "driver binary {:?} refused: {why}; a driver registers the executable it runs",
                register.binary_path
            ),
        )
    };
    let named = std::fs::metadata(path).map_err(|e| refused(format!("cannot read it: {e}")))?;
    if !named.is_file() {
        return Err(refused("it is not a file".into()));
    }
    let running = std::fs::metadata(format!("/proc/{pid}/exe"))
        .map_err(|e| refused(format!("cannot read process {pid}'s executable: {e}")))?;
    if (running.dev(), running.ino()) != (named.dev(), named.ino()) {
        return Err(refused(format!(
            "process {pid} does not run that executable"
        )));
    }
    // Off the worker's other tasks (see `ensure_binary`).
    let hash = tokio::task::block_in_place(|| yr_runtime::cluster::binary_hash(path));
    if hash.is_empty() || hash != register.binary_hash {
        return Err(refused(format!(
            "its content key is {hash:?}, not the {:?} the driver sent (was it rebuilt?)",
            register.binary_hash
        )));
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_content_keys_are_binary_file_names() {
        assert!(valid_binary_hash("0123456789abcdef0123456789abcdef-1f00"));
        assert!(!valid_binary_hash("../../etc/passwd"));
        assert!(!valid_binary_hash("0123456789abcdef0123456789abcdef-"));
        assert!(!valid_binary_hash("0123456789abcdef0123456789abcdef-../x"));
        assert!(!valid_binary_hash(""));
    }

    #[test]
    fn a_driver_registers_only_the_executable_it_runs() {
        let me = std::env::current_exe().expect("this test's executable");
        let mut register = pb::RegisterClient {
            binary_path: me.display().to_string(),
            binary_hash: yr_runtime::cluster::binary_hash(&me),
            ..Default::default()
        };
        let pid = std::process::id();
        assert!(check_driver_binary(&register, pid).is_ok());
        register.binary_path = "/bin/sh".into();
        register.binary_hash = yr_runtime::cluster::binary_hash(std::path::Path::new("/bin/sh"));
        let error = check_driver_binary(&register, pid).expect_err("not this process's binary");
        assert_eq!(error.code(), ErrorCode::AuthorizeFailed);
        register.binary_path = me.display().to_string();
        register.binary_hash = "0123456789abcdef0123456789abcdef-1".into();
        assert!(
            check_driver_binary(&register, pid).is_err(),
            "a wrong content key"
        );
    }
}
