//! The cluster backend: this process (a driver, or a runtime running an instance) talks to its
//! node over the Bus stream for control (create, kill, lookups) and streams calls straight to
//! the runtimes of the instances it calls (direct routing). It serves the objects it owns on its
//! own Worker service.

mod borrow_rpc;
mod bus;
mod call_channel;
pub mod convert;
mod data_channel;
mod discovery;
pub mod endpoints;
mod executables;
pub mod kv;
pub mod memory;
mod remote_instance;
pub mod runtime_mode;
mod shared_memory;
mod stateless;
pub mod stream;
use yr_transport as transport;
mod worker;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tonic::transport::Channel;
use yr_common::{ids, Config, Error, ErrorCode, InvokeOptions};
use yr_proto::error_from_proto;
use yr_proto::v1 as pb;
use yr_proto::v1::worker_client::WorkerClient;

use crate::backend::{Backend, InstanceInfo, NamedInstance};
use crate::cross_language::Executable;
use crate::dependencies;
use crate::error::RuntimeError;
use crate::function::{CreateSpec, MethodSpec, TaskSpec};
use crate::object_store::{self, ObjectHandle};
use bus::Bus;
use convert::args_to_proto;
pub use discovery::find_node;
use executables::Binary;
use remote_instance::{InstanceObserver, OutCall, Relocate, RemoteInstance};
use stateless::StatelessSubmitter;

/// How long `finalize` waits for the node to release the job's instances.
const FINALIZE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a create waits for the node's acknowledgement.
const CREATE_ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// The state shared by the backend, its IO tasks and its Worker service.
pub struct Inner {
    io: tokio::runtime::Handle,
    bus: Arc<Bus>,
    job_id: String,
    /// This process's own binary, which its creates name unless they call across languages.
    own_binary: Arc<Binary>,
    /// Executables registered with the node for calls across languages.
    executables: Mutex<HashMap<Executable, Arc<Binary>>>,
    /// In a runtime: the instance it runs, parent of the instances it creates.
    parent_instance_id: Mutex<String>,
    instances: Mutex<HashMap<String, Arc<RemoteInstance>>>,
    stateless: StatelessSubmitter,
    channels: Mutex<HashMap<String, Channel>>,
    /// Set while the node is reachable; the error once the bus is gone.
    lost: Mutex<Option<Error>>,
    pub runtime: OnceLock<Arc<runtime_mode::RuntimeMode>>,
    /// The node's data worker: KV and shared memory.
    data: data_channel::DataChannel,
    /// This process's Worker socket; a runtime's call socket sits beside it.
    socket: std::path::PathBuf,
}

/// The cluster backend.
pub struct ClusterBackend {
    inner: Arc<Inner>,
    io_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    shutdown_io: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    /// Runs the stateless calls with `always_local_mode`; started by the first.
    local_pool: OnceLock<crate::local::pool::Pool>,
    local_pool_size: usize,
}

fn io_runtime() -> Result<
    (
        tokio::runtime::Handle,
        std::thread::JoinHandle<()>,
        tokio::sync::oneshot::Sender<()>,
    ),
    Error,
> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| RuntimeError::Start {
            what: "yr's IO runtime".to_string(),
            source,
        })?;
    let handle = runtime.handle().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("yr-io".into())
        .spawn(move || {
            crate::shared_memory::mark_io_thread();
            runtime.block_on(async {
                let _ = stopped.await;
            });
            runtime.shutdown_timeout(Duration::from_millis(100));
        })
        .map_err(|source| RuntimeError::Start {
            what: "yr's IO thread".to_string(),
            source,
        })?;
    Ok((handle, thread, stop))
}

/// This process's binary key: a runtime is told it by its node (`YR_BINARY_HASH`), a driver
/// computes it.
fn own_binary_hash(binary: &std::path::Path, is_runtime: bool) -> String {
    if is_runtime {
        if let Ok(hash) = std::env::var("YR_BINARY_HASH") {
            return hash;
        }
    }
    yr_common::binary_hash(binary)
}

/// Install the cluster token this process presents (and checks on its own sockets):
/// `Config::token` (or `YR_TOKEN`), else the token file beside the node's bus socket, which
/// `yr start` writes into the session directory. 1014 if there is none.
fn install_token(config: &Config, node_address: &str) -> Result<(), Error> {
    let token = match &config.token {
        Some(token) => token.clone(),
        None => {
            let session_dir = match transport::Address::parse(node_address)? {
                transport::Address::Unix(socket) => {
                    socket.parent().map(std::path::Path::to_path_buf)
                }
                transport::Address::Tcp(_) => None,
            };
            yr_common::auth::ClusterToken::resolve(None, session_dir.as_deref())
                .map_err(Error::from)?
                .ok_or_else(|| {
                    Error::new(
                        ErrorCode::AuthorizeFailed,
                        format!(
                            "no cluster token to connect to the node at {node_address}: set \
                             YR_TOKEN (or Config::token) to the token in the cluster's session \
                             directory (the `token` file)"
                        ),
                    )
                })?
        }
    };
    let mut credentials = (*yr_transport::current()).clone();
    credentials.token = Some(token);
    // TCP connections of a TLS cluster (to other nodes' data workers) need this process's
    // certificate: a runtime has its node's, a driver elsewhere sets Config::tls or YR_TLS_*.
    let tls = match &config.tls {
        Some(files) => Some(
            yr_transport::Tls::load(&files.certificate, &files.private_key, &files.ca)
                .map_err(Error::from)?
                .with_server_name(files.server_name.clone()),
        ),
        None => yr_transport::Tls::from_env().map_err(Error::from)?,
    };
    if let Some(tls) = tls {
        credentials.tls = Some(std::sync::Arc::new(tls));
    }
    yr_transport::install(credentials);
    Ok(())
}

/// How runtimes of this driver start, when not as its own executable re-executed: set by an
/// SDK whose driver is an interpreter ([`set_runtime_command`]).
static RUNTIME_COMMAND: OnceLock<(std::path::PathBuf, Vec<String>)> = OnceLock::new();

/// Runtimes of this driver run `executable` with `args` (for example a virtual environment's
/// `python` link, which the resolved executable would lose, and `-m yr._runtime`). The node
/// still checks that `executable` is the file this process runs. Set once, before `init`;
/// later calls change nothing and return false.
pub fn set_runtime_command(executable: std::path::PathBuf, args: Vec<String>) -> bool {
    RUNTIME_COMMAND.set((executable, args)).is_ok()
}

/// The executable runtimes of this process's creates run and their extra arguments: the command
/// an SDK set, else this process's own executable with `YR_RUNTIME_ARGS` (test harness
/// filters). A runtime (`is_runtime`) passes on the arguments its node started it with, so that
/// an instance it creates on a node where no driver registered the binary starts the same way
/// (not with none, which would run a whole test binary).
fn runtime_command(is_runtime: bool) -> Result<(std::path::PathBuf, Vec<String>), Error> {
    if let Some(command) = RUNTIME_COMMAND.get() {
        return Ok(command.clone());
    }
    let binary = std::env::current_exe().map_err(|e| {
        Error::new(
            ErrorCode::IncorrectInitUsage,
            format!("cannot find this executable: {e}"),
        )
    })?;
    let args = if is_runtime {
        std::env::args_os()
            .skip(1)
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect()
    } else {
        std::env::var("YR_RUNTIME_ARGS")
            .map(|a| a.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default()
    };
    Ok((binary, args))
}

/// The session directory of the node this process last connected to (see [`session_dir`]).
static SESSION_DIR: Mutex<Option<std::path::PathBuf>> = Mutex::new(None);

/// The session directory of the node this process is (or was last) connected to: its logs,
/// its `session.json` (addresses, including the `/metrics` endpoints) and its token. `None`
/// before a cluster `init`, or for a node reached over TCP.
///
/// ```no_run
/// yr_runtime::init(yr_common::Config::default()).unwrap();
/// let dir = yr_runtime::cluster::session_dir().expect("a node on this machine");
/// println!("logs: {}", dir.join("logs").display());
/// ```
pub fn session_dir() -> Option<std::path::PathBuf> {
    SESSION_DIR.lock().clone()
}

impl ClusterBackend {
    /// Connect to the node, as a driver or (with `runtime`) as a runtime.
    pub fn connect(
        config: &Config,
        job_id: &str,
        runtime: Option<runtime_mode::RuntimeEnv>,
    ) -> Result<ClusterBackend, Error> {
        let node_address = match &runtime {
            Some(env) => env.bus_address.clone(),
            None => find_node(config)?,
        };
        install_token(config, &node_address)?;
        *SESSION_DIR.lock() = match transport::Address::parse(&node_address) {
            Ok(transport::Address::Unix(socket)) => socket.parent().map(Into::into),
            _ => None,
        };
        let (io, io_thread, shutdown_io) = io_runtime()?;
        let (binary, runtime_args) = runtime_command(runtime.is_some())?;
        let own_hash = own_binary_hash(&binary, runtime.is_some());
        let socket = yr_common::sockets::new_worker_socket()?;
        // Clean up after processes that died without removing their sockets; off the way.
        // Drivers only: the sweep reads the whole socket directory (two files per live
        // process), so a runtime doing it at start would make each create cost more the more
        // instances live; the node removes the sockets of runtimes that end.
        if runtime.is_none() {
            let _ = std::thread::Builder::new()
                .name("yr-sweep".to_string())
                .spawn(yr_common::sockets::sweep_dead);
        }
        let unix_address = format!("unix:{}", socket.display());
        // Callers on other hosts reach this process over TCP on its host's advertised address;
        // on a single-machine cluster there is none, and nothing more is bound.
        let own_host = endpoints::find_own_host(&node_address);
        endpoints::set_own_host(own_host.clone());
        call_channel::set_io(Some(io.clone()));
        let (worker_tcp, calls_tcp) = match &own_host {
            Some(host) => {
                let host = host.clone();
                let for_calls = runtime.is_some();
                io.block_on_in_thread(async move { bind_tcp(&host, for_calls).await })
            }
            None => (None, None),
        };
        let address_of = |listener: &Option<tokio::net::TcpListener>| {
            listener
                .as_ref()
                .and_then(|l| l.local_addr().ok())
                .map(|a| a.to_string())
        };
        let worker_address = endpoints::compose(
            &unix_address,
            address_of(&worker_tcp).as_deref(),
            address_of(&calls_tcp).as_deref(),
        );
        let cell: Arc<OnceLock<Weak<Inner>>> = Arc::new(OnceLock::new());
        let connect_code = if runtime.is_some() {
            ErrorCode::RequestBetweenRuntimeBus
        } else {
            ErrorCode::InitConnectionFailed
        };
        let register = pb::RegisterClient {
            kind: if runtime.is_some() {
                pb::ClientKind::Runtime
            } else {
                pb::ClientKind::Driver
            } as i32,
            job_id: job_id.to_string(),
            runtime_id: runtime
                .as_ref()
                .map(|r| r.runtime_id.clone())
                .unwrap_or_default(),
            listen_address: worker_address.clone(),
            binary_path: binary.display().to_string(),
            binary_hash: own_hash.clone(),
            pid: std::process::id(),
            instance_id: String::new(),
            runtime_args: runtime_args.clone(),
            functions: crate::function::registered_names()
                .into_iter()
                .map(str::to_string)
                .collect(),
        };
        let is_runtime = runtime.is_some();
        let push_cell = cell.clone();
        let closed_cell = cell.clone();
        let listen_at = socket.clone();
        let listener = io.block_on_in_thread(async move {
            tokio::net::UnixListener::bind(&listen_at).map_err(|source| {
                Error::from(RuntimeError::Start {
                    what: format!("listening on {}", listen_at.display()),
                    source,
                })
            })
        })?;
        let bus = io.block_on_in_thread(Bus::connect(
            node_address.clone(),
            connect_code,
            Arc::new(move |push| {
                if let Some(inner) = push_cell.get().and_then(Weak::upgrade) {
                    inner.on_push(push);
                }
            }),
            Box::new(move |error| {
                if let Some(inner) = closed_cell.get().and_then(Weak::upgrade) {
                    inner.on_bus_lost(error, is_runtime);
                }
            }),
        ))?;
        let inner = Arc::new(Inner {
            io: io.clone(),
            bus,
            job_id: job_id.to_string(),
            own_binary: Arc::new(Binary {
                path: binary.display().to_string(),
                hash: own_hash,
                args: runtime_args,
            }),
            executables: Mutex::new(HashMap::new()),
            parent_instance_id: Mutex::new(String::new()),
            instances: Mutex::new(HashMap::new()),
            stateless: StatelessSubmitter::new(config.recycle_time, config.max_task_instance_num),
            channels: Mutex::new(HashMap::new()),
            lost: Mutex::new(None),
            runtime: OnceLock::new(),
            data: data_channel::DataChannel::new(io.clone(), node_address.clone()),
            socket: socket.clone(),
        });
        // Large values go to the node's shared memory; without it they stay inline.
        if let Err(error) = shared_memory::connect(inner.data.clone()) {
            tracing::warn!(%error, "the node's shared memory is not usable; large objects stay in this process");
            crate::shared_memory::install(None);
        }
        let _ = cell.set(Arc::downgrade(&inner));
        if let Some(env) = runtime {
            let _ = inner
                .runtime
                .set(runtime_mode::RuntimeMode::new(env, Arc::downgrade(&inner)));
        }
        // Everything a call may need is in place before the node can name this process to
        // callers: the Worker service, the owner address, fetching and borrow counting, and
        // in a runtime the call socket.
        if let Some(runtime) = inner.runtime.get() {
            call_channel::serve(&worker_address, runtime.clone())?;
            if let Some(calls_tcp) = calls_tcp {
                io.spawn(call_channel::serve_tcp(calls_tcp, runtime.clone()));
            }
        }
        let worker_service = || {
            yr_proto::v1::worker_server::WorkerServer::new(worker::WorkerService)
                .max_decoding_message_size(yr_transport::max_message_bytes())
                .max_encoding_message_size(yr_transport::max_message_bytes())
        };
        let service = worker_service();
        io.spawn(async move {
            let incoming = yr_transport::incoming_unix(listener);
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await
            {
                tracing::error!(error = %e, "the worker service stopped");
            }
        });
        if let Some(worker_tcp) = worker_tcp {
            let service = worker_service();
            io.spawn(async move {
                let incoming = yr_transport::incoming_tcp(worker_tcp);
                if let Err(e) = tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(incoming)
                    .await
                {
                    tracing::error!(error = %e, "the worker service's TCP listener stopped");
                }
            });
        }
        object_store::set_local_owner_address(&worker_address);
        let fetch_inner = Arc::downgrade(&inner);
        object_store::set_remote_fetcher(Some(Box::new(move |handle: ObjectHandle| {
            if let Some(inner) = fetch_inner.upgrade() {
                inner.fetch_remote(handle);
            }
        })));
        // Borrowers reach owners through this process's IO runtime; the owner's sweep drops the
        // counts of borrowers that died without releasing.
        crate::borrows::set_messenger(Some(Arc::new(borrow_rpc::Messenger::new(Arc::downgrade(
            &inner,
        )))));
        // Register only now: the node may push (an init call) right after.
        if let Err(error) = inner.bus.register(register, connect_code) {
            object_store::set_remote_fetcher(None);
            object_store::set_local_owner_address("");
            crate::borrows::set_messenger(None);
            inner.remove_sockets();
            return Err(error);
        }
        io.spawn(borrow_rpc::sweep(Arc::downgrade(&inner)));
        // Release idle stateless instances, looking while there are any.
        let recycle_inner = Arc::downgrade(&inner);
        let period = (config.recycle_time / 2).max(Duration::from_millis(100));
        let instance_added = inner.stateless.instance_added();
        io.spawn(async move {
            loop {
                let none = recycle_inner
                    .upgrade()
                    .is_some_and(|inner| !inner.stateless.has_instances());
                if none {
                    instance_added.notified().await;
                }
                tokio::time::sleep(period).await;
                let Some(inner) = recycle_inner.upgrade() else {
                    return;
                };
                for id in inner.stateless.recycle_idle() {
                    inner.kill(&id, false);
                }
            }
        });
        Ok(ClusterBackend {
            inner,
            io_thread: Mutex::new(Some(io_thread)),
            shutdown_io: Mutex::new(Some(shutdown_io)),
            local_pool: OnceLock::new(),
            local_pool_size: crate::local::pool_size(config),
        })
    }

    /// The state shared with the IO tasks.
    pub fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// Create an instance whose runtime runs `binary`: this process's own, or an executable
    /// registered for calls across languages.
    fn create_with_binary(
        &self,
        spec: CreateSpec,
        binary: Arc<Binary>,
    ) -> yr_common::Result<InstanceInfo> {
        let inner = &self.inner;
        inner.check_connected()?;
        let id = spec
            .options
            .instance_id_for_name()
            .unwrap_or_else(|| ids::random_hex(20));
        let class = spec.class().to_string();
        // A named instance this process already knows keeps its connection and queued calls.
        let instance = {
            let mut instances = inner.instances.lock();
            match instances.get(&id) {
                Some(existing) if !existing.is_failed() => existing.clone(),
                _ => {
                    let instance = RemoteInstance::new(id.clone(), inner.io.clone(), None);
                    if !spec.options.calls_in_order() {
                        instance.set_unordered();
                    }
                    instances.insert(id.clone(), instance.clone());
                    instance
                }
            }
        };
        let args = spec.args;
        let deps_ready = args
            .iter()
            .flat_map(|a| a.dependencies())
            .all(|h| h.is_finished());
        let send = {
            let inner = inner.clone();
            let options = spec.options.clone();
            let constructor = spec.constructor;
            let class = class.clone();
            let id = id.clone();
            let binary = binary.clone();
            move |args: Vec<crate::function::Arg>| -> Result<pb::CreateRequest, Error> {
                dependencies::first_failure(&args)?;
                let args = args_to_proto(&args)?;
                inner.create_request(
                    constructor.name,
                    &class,
                    false,
                    args,
                    &options,
                    &id,
                    &binary,
                )
            }
        };
        if deps_ready {
            // A dependency that failed already fails the instance, not the invoke: the failure
            // surfaces on the first call, as it does when the dependency fails later.
            if let Err(error) = dependencies::first_failure(&args) {
                instance.on_failed(error);
                return Ok(InstanceInfo {
                    instance_id: id,
                    class: class.to_string(),
                });
            }
            let request = send(args)?;
            let reply = inner
                .bus
                .request_blocking(pb::bus_request::Body::Create(request), CREATE_ACK_TIMEOUT);
            match reply {
                Ok(pb::bus_response::Body::Create(ack)) => {
                    tracing::debug!(?ack, class, "create acknowledged");
                    if ack.existing && !ack.class_name.is_empty() && ack.class_name != class {
                        return Err(Error::new(
                            ErrorCode::InstanceDuplicated,
                            format!(
                                "the name of instance {id} is taken by an instance of {}; choose another name or kill it first",
                                ack.class_name
                            ),
                        ));
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    let mut instances = inner.instances.lock();
                    if instances
                        .get(&id)
                        .is_some_and(|i| Arc::ptr_eq(i, &instance))
                    {
                        instances.remove(&id);
                    }
                    return Err(error);
                }
            }
        } else {
            // Send the create once its arguments exist; a failure surfaces on the first call.
            let failed = instance.clone();
            let bus = inner.bus.clone();
            let args = Arc::new(Mutex::new(Some(args)));
            let waiting = args
                .lock()
                .as_ref()
                .map(|a| {
                    a.iter()
                        .flat_map(|x| x.dependencies())
                        .cloned()
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            let fake: Vec<crate::function::Arg> =
                waiting.into_iter().map(crate::function::Arg::Ref).collect();
            dependencies::when_ready(&fake, move || {
                let Some(args) = args.lock().take() else {
                    return;
                };
                match send(args) {
                    Err(error) => failed.on_failed(error),
                    Ok(request) => {
                        let failed = failed.clone();
                        bus.send_request(
                            pb::bus_request::Body::Create(request),
                            Box::new(move |reply| {
                                if let Err(error) = reply {
                                    failed.on_failed(error);
                                }
                            }),
                        );
                    }
                }
            });
        }
        Ok(InstanceInfo {
            instance_id: id,
            class: class.to_string(),
        })
    }
}

/// Bind this process's TCP listeners on `host` (port 0): the Worker service's, and with
/// `for_calls` a runtime's call listener. A host this machine cannot bind (an address behind
/// NAT) leaves the process without them: callers on other hosts then fail to connect (3001),
/// and the warning says why.
async fn bind_tcp(
    host: &str,
    for_calls: bool,
) -> (
    Option<tokio::net::TcpListener>,
    Option<tokio::net::TcpListener>,
) {
    let bind = |what: &'static str| async move {
        let ip: std::net::IpAddr = match host.parse() {
            Ok(ip) => ip,
            Err(error) => {
                tracing::warn!(%host, %error, "the advertised host is not an IP address; no TCP {what}");
                return None;
            }
        };
        match tokio::net::TcpListener::bind((ip, 0)).await {
            Ok(listener) => Some(listener),
            Err(error) => {
                tracing::warn!(%host, %error, "cannot listen on the advertised host; callers on other hosts cannot reach this process's {what}");
                None
            }
        }
    };
    let worker = bind("Worker service").await;
    let calls = if for_calls && worker.is_some() {
        bind("call listener").await
    } else {
        None
    };
    (worker, calls)
}

/// Running a future to completion from a non-IO thread.
trait BlockOnInThread {
    fn block_on_in_thread<F: std::future::Future + Send + 'static>(&self, future: F) -> F::Output
    where
        F::Output: Send + 'static;
}

impl BlockOnInThread for tokio::runtime::Handle {
    fn block_on_in_thread<F: std::future::Future + Send + 'static>(&self, future: F) -> F::Output
    where
        F::Output: Send + 'static,
    {
        let (sender, receiver) = crossbeam_channel::bounded(1);
        self.spawn(async move {
            let _ = sender.send(future.await);
        });
        receiver
            .recv()
            .expect("the IO runtime runs until the backend is dropped")
    }
}

impl Inner {
    fn check_connected(&self) -> Result<(), Error> {
        match &*self.lost.lock() {
            Some(error) => Err(error.clone()),
            None => Ok(()),
        }
    }

    /// Remove this process's socket files (the node also does, for processes that crash).
    pub(crate) fn remove_sockets(&self) {
        yr_common::sockets::remove(&self.socket);
    }

    fn on_bus_lost(&self, error: Error, is_runtime: bool) {
        tracing::warn!(%error, "lost the node");
        *self.lost.lock() = Some(error.clone());
        let instances: Vec<Arc<RemoteInstance>> = self.instances.lock().values().cloned().collect();
        for instance in instances {
            instance.on_failed(error.clone());
        }
        if is_runtime {
            // A runtime without its node has no one to serve: exit rather than linger.
            self.remove_sockets();
            std::process::exit(1);
        }
    }

    fn on_push(self: &Arc<Self>, push: pb::bus_response::Body) {
        match push {
            pb::bus_response::Body::Notify(notify) => self.on_notify(notify),
            pb::bus_response::Body::SpillAsk(ask) => {
                shared_memory::answer_spill_ask(self.bus.clone(), ask);
            }
            pb::bus_response::Body::Pressure(pressure) => {
                for id in self.stateless.set_pressure(pressure.creates_waiting) {
                    self.kill(&id, false);
                }
            }
            other => {
                if let Some(runtime) = self.runtime.get() {
                    runtime.on_push(other);
                }
            }
        }
    }

    fn on_notify(&self, notify: pb::InstanceNotify) {
        let instance = self.instances.lock().get(&notify.instance_id).cloned();
        let Some(instance) = instance else { return };
        match pb::InstanceState::try_from(notify.state) {
            Ok(pb::InstanceState::Running) => instance.on_running(notify.runtime_address),
            Ok(pb::InstanceState::Failed) => instance.on_restarting(),
            Ok(pb::InstanceState::Scheduling) | Ok(pb::InstanceState::Creating) => {}
            _ => {
                let error = notify
                    .error
                    .as_ref()
                    .map(error_from_proto)
                    .unwrap_or_else(|| {
                        Error::new(
                            ErrorCode::InstanceExited,
                            format!("instance {} has exited", notify.instance_id),
                        )
                    });
                instance.on_failed(error);
            }
        }
    }

    fn channel(&self, address: &str) -> Option<Channel> {
        self.channels.lock().get(address).cloned()
    }

    /// A client of the Worker service of the process at `address` (its Unix socket on this
    /// host, its TCP listener on another), on a cached connection.
    async fn worker_client(&self, address: &str) -> Result<WorkerClient<Channel>, Error> {
        let channel = match self.channel(address) {
            Some(channel) => channel,
            None => {
                let route = endpoints::worker_route(address);
                let channel = transport::connect(route, ErrorCode::GetOperationFailed).await?;
                self.channels
                    .lock()
                    .insert(address.to_string(), channel.clone());
                channel
            }
        };
        Ok(WorkerClient::new(channel).max_decoding_message_size(yr_transport::max_message_bytes()))
    }

    fn fetch_remote(self: &Arc<Self>, handle: ObjectHandle) {
        let inner = self.clone();
        self.io.spawn(async move {
            // The lender holds the value for this process; the owner is asked if it is gone.
            let mut result = Err(Error::new(
                ErrorCode::GetOperationFailed,
                format!("object {} names no process to fetch it from", handle.id()),
            ));
            for address in handle.fetch_addresses() {
                if handle.is_lender(&address) {
                    if let Some(error) = borrow_rpc::lender_unreachable(&address) {
                        result = Err(error);
                        continue;
                    }
                }
                result = inner.fetch_from(&handle, &address).await;
                if result.is_ok() {
                    break;
                }
            }
            match result {
                Ok(value) => {
                    handle.complete(Arc::new(value));
                }
                Err(error) => {
                    handle.fail(error);
                }
            }
        });
    }

    /// Fetch `handle`'s value from the process at `address` (its lender or owner).
    async fn fetch_from(
        &self,
        handle: &ObjectHandle,
        address: &str,
    ) -> Result<object_store::StoredValue, Error> {
        let mut client = self.worker_client(address).await?;
        // A location can go stale between the answer and this process's reference to it (the
        // owner spilled the object meanwhile): ask again, and the owner restores it first.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let reply = client
                .get_object(pb::GetObjectRequest {
                    id: handle.id().to_bytes().to_vec().into(),
                    timeout_ms: u64::MAX / 2,
                    pool_id: shared_memory::pool_id(),
                    borrower_address: object_store::local_owner_address(),
                })
                .await
                .map_err(|status| {
                    Error::new(
                        yr_transport::status_to_code(&status, ErrorCode::GetOperationFailed),
                        format!(
                            "cannot fetch object {} from the process at {address}, which sent \
                             it: {}; it may have exited",
                            handle.id(),
                            status.message()
                        ),
                    )
                })?
                .into_inner();
            let value = match (reply.value, reply.error) {
                (_, Some(error)) => return Err(error_from_proto(&error)),
                (None, None) => {
                    return Err(Error::new(
                        ErrorCode::GetOperationFailed,
                        format!(
                            "the process at {address} sent no value for object {}",
                            handle.id()
                        ),
                    ))
                }
                (Some(value), None) => value,
            };
            let Some(location) = &value.shared else {
                return convert::value_from_proto(value);
            };
            match shared_memory::open_location(&self.data, location).await {
                Err(error) if attempts < 3 && error.code() == ErrorCode::GetOperationFailed => {
                    continue
                }
                opened => {
                    return opened
                        .and_then(|payload| convert::value_with_payload(payload, &value.nested))
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn create_request(
        &self,
        spec_function: &str,
        class: &str,
        stateless: bool,
        args: Vec<pb::Arg>,
        options: &InvokeOptions,
        id: &str,
        binary: &Binary,
    ) -> Result<pb::CreateRequest, Error> {
        let options = rmp_serde::to_vec_named(options).map_err(|e| {
            Error::new(
                ErrorCode::ParamInvalid,
                format!("cannot encode the invoke options: {e}"),
            )
        })?;
        Ok(pb::CreateRequest {
            function: spec_function.to_string(),
            stateless,
            args,
            options: options.into(),
            job_id: self.job_id.clone(),
            class_name: class.to_string(),
            parent_instance_id: self.parent_instance_id.lock().clone(),
            binary_path: binary.path.clone(),
            binary_hash: binary.hash.clone(),
            runtime_args: binary.args.clone(),
            designated_instance_id: id.to_string(),
            creator_node_id: String::new(),
            creator_node_address: String::new(),
            rescheduled: false,
            restarts: 0,
        })
    }

    /// Ask the node for a stateless instance of `options`' shape, running `binary`.
    fn create_stateless(
        self: &Arc<Self>,
        options: &InvokeOptions,
        binary: &Binary,
        observer: Arc<dyn InstanceObserver>,
    ) -> Result<Arc<RemoteInstance>, Error> {
        self.check_connected()?;
        let id = format!("stateless-{}", ids::random_hex(16));
        let instance = RemoteInstance::new(id.clone(), self.io.clone(), Some(observer));
        self.instances.lock().insert(id.clone(), instance.clone());
        let request = self.create_request("", "", true, Vec::new(), options, &id, binary)?;
        let failed = instance.clone();
        self.bus.send_request(
            pb::bus_request::Body::Create(request),
            Box::new(move |reply| {
                if let Err(error) = reply {
                    failed.on_failed(error);
                }
            }),
        );
        Ok(instance)
    }

    fn kill(&self, instance_id: &str, wait: bool) {
        self.bus.send_request(
            pb::bus_request::Body::Kill(pb::KillRequest {
                instance_id: instance_id.to_string(),
                wait,
                job_id: String::new(),
                force: false,
            }),
            Box::new(|_| {}),
        );
    }

    fn instance(self: &Arc<Self>, instance_id: &str) -> Result<Arc<RemoteInstance>, Error> {
        if instance_id.is_empty() {
            return Err(Error::new(
                ErrorCode::InstanceIdEmpty,
                "the instance id is empty; pass the id of a created instance",
            ));
        }
        if let Some(instance) = self.instances.lock().get(instance_id) {
            return Ok(instance.clone());
        }
        // A handle this process did not create: ask the node where the instance runs.
        let reply = self.bus.request_blocking(
            pb::bus_request::Body::GetNamed(pb::GetNamedRequest {
                name: String::new(),
                namespace: String::new(),
                timeout_ms: 0,
                instance_id: instance_id.to_string(),
                moved_from: String::new(),
            }),
            bus::REQUEST_TIMEOUT,
        )?;
        let pb::bus_response::Body::GetNamed(found) = reply else {
            return Err(RuntimeError::UnexpectedAnswer {
                request: "an instance lookup",
                answer: format!("{reply:?}"),
            }
            .into());
        };
        Ok(self.track(found))
    }

    fn track(self: &Arc<Self>, found: pb::GetNamedResponse) -> Arc<RemoteInstance> {
        let mut instances = self.instances.lock();
        if let Some(existing) = instances.get(&found.instance_id) {
            return existing.clone();
        }
        let instance = RemoteInstance::new(found.instance_id.clone(), self.io.clone(), None);
        if !found.notifies {
            instance.set_relocator(Some(Arc::new(Relocator {
                inner: Arc::downgrade(self),
            })));
        }
        instances.insert(found.instance_id.clone(), instance.clone());
        drop(instances);
        if found.state == pb::InstanceState::Running as i32 && !found.runtime_address.is_empty() {
            instance.on_running(found.runtime_address);
        }
        instance
    }
}

/// How long a node follows a looked-up instance whose caller lost its runtime: less than
/// calls wait for a restart, so the node's answer (or its timeout, 3001) comes first.
const RELOCATE_WAIT: Duration = Duration::from_secs(80);

/// Asks this process's node where an instance looked up on another node runs now that the
/// caller's connection to it broke (the node follows its record: design 023).
struct Relocator {
    inner: Weak<Inner>,
}

impl Relocate for Relocator {
    fn relocate(&self, instance: Arc<RemoteInstance>, moved_from: String) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        tracing::debug!(instance = %instance.id, %moved_from, "lost the runtime of a looked-up instance; asking where it runs now");
        inner.bus.send_request(
            pb::bus_request::Body::GetNamed(pb::GetNamedRequest {
                name: String::new(),
                namespace: String::new(),
                timeout_ms: RELOCATE_WAIT.as_millis() as u64,
                instance_id: instance.id.clone(),
                moved_from,
            }),
            Box::new(move |reply| match reply {
                Ok(pb::bus_response::Body::GetNamed(found)) => {
                    instance.relocated(found.runtime_address, found.notifies)
                }
                Ok(other) => instance.on_failed(
                    RuntimeError::UnexpectedAnswer {
                        request: "an instance's new address",
                        answer: format!("{other:?}"),
                    }
                    .into(),
                ),
                Err(error) => instance.on_failed(error),
            }),
        );
    }
}

impl Backend for ClusterBackend {
    fn name(&self) -> &'static str {
        "cluster"
    }

    fn submit_task(&self, task: TaskSpec, returns: Vec<ObjectHandle>) -> yr_common::Result<()> {
        self.inner.check_connected()?;
        if task.options.always_local_mode {
            // On this process's own thread pool, in its environment.
            crate::local::check_env_vars_here(&task.options)?;
            let pool = self
                .local_pool
                .get_or_init(|| crate::local::pool::Pool::new("yr-local", self.local_pool_size));
            crate::local::task::LocalTask::submit(pool, task, returns);
            return Ok(());
        }
        StatelessSubmitter::submit(&self.inner, task, self.inner.own_binary.clone(), returns)
    }

    fn submit_task_in(
        &self,
        executable: &Executable,
        task: TaskSpec,
        returns: Vec<ObjectHandle>,
    ) -> yr_common::Result<()> {
        self.inner.check_connected()?;
        let binary = self.inner.binary_of(executable)?;
        StatelessSubmitter::submit(&self.inner, task, binary, returns)
    }

    fn create_instance(&self, spec: CreateSpec) -> yr_common::Result<InstanceInfo> {
        self.create_with_binary(spec, self.inner.own_binary.clone())
    }

    fn create_instance_in(
        &self,
        executable: &Executable,
        spec: CreateSpec,
    ) -> yr_common::Result<InstanceInfo> {
        self.inner.check_connected()?;
        let binary = self.inner.binary_of(executable)?;
        self.create_with_binary(spec, binary)
    }

    fn submit_method(
        &self,
        instance_id: &str,
        call: MethodSpec,
        returns: Vec<ObjectHandle>,
    ) -> yr_common::Result<()> {
        self.inner.check_connected()?;
        let instance = self.inner.instance(instance_id)?;
        instance.submit(OutCall::new(
            pb::CallKind::Method,
            call.method.name,
            call.args,
            returns,
        ))
    }

    fn terminate_instance(&self, instance_id: &str, wait: bool) -> yr_common::Result<()> {
        let inner = &self.inner;
        inner.check_connected()?;
        let instance = inner.instance(instance_id)?;
        if instance.is_terminating() {
            // Terminating twice is harmless.
            return Ok(());
        }
        instance.mark_terminating();
        let request = pb::bus_request::Body::Kill(pb::KillRequest {
            instance_id: instance_id.to_string(),
            wait,
            job_id: String::new(),
            force: false,
        });
        if wait {
            inner.bus.request_blocking(request, FINALIZE_TIMEOUT)?;
        } else {
            inner.bus.send_request(request, Box::new(|_| {}));
        }
        Ok(())
    }

    fn get_named_instance(
        &self,
        name: &str,
        namespace: &str,
        timeout: Duration,
    ) -> yr_common::Result<InstanceInfo> {
        let inner = &self.inner;
        inner.check_connected()?;
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let reply = inner.bus.request_blocking(
            pb::bus_request::Body::GetNamed(pb::GetNamedRequest {
                name: name.to_string(),
                namespace: namespace.to_string(),
                timeout_ms,
                instance_id: String::new(),
                moved_from: String::new(),
            }),
            timeout.saturating_add(bus::REQUEST_TIMEOUT),
        )?;
        let pb::bus_response::Body::GetNamed(found) = reply else {
            return Err(RuntimeError::UnexpectedAnswer {
                request: "get_instance",
                answer: format!("{reply:?}"),
            }
            .into());
        };
        let class = found.class_name.clone();
        let instance = inner.track(found);
        Ok(InstanceInfo {
            instance_id: instance.id.clone(),
            class,
        })
    }

    fn list_named_instances(&self) -> yr_common::Result<Vec<NamedInstance>> {
        let inner = &self.inner;
        inner.check_connected()?;
        let reply = inner.bus.request_blocking(
            pb::bus_request::Body::ListNamed(pb::ListNamedRequest {}),
            bus::REQUEST_TIMEOUT,
        )?;
        let pb::bus_response::Body::ListNamed(list) = reply else {
            return Err(RuntimeError::UnexpectedAnswer {
                request: "list_named_instances",
                answer: format!("{reply:?}"),
            }
            .into());
        };
        Ok(list
            .instances
            .into_iter()
            .map(|n| NamedInstance {
                name: n.name,
                namespace: n.namespace,
                instance_id: n.instance_id,
            })
            .collect())
    }

    fn stop_sending(&self) {
        self.inner.stateless.stop_sending();
        let instances: Vec<Arc<RemoteInstance>> =
            self.inner.instances.lock().values().cloned().collect();
        for instance in instances {
            instance.stop_sending();
        }
    }

    fn shutdown(&self) {
        let inner = &self.inner;
        if inner.check_connected().is_ok() && inner.runtime.get().is_none() {
            let _ = inner.bus.request_blocking(
                pb::bus_request::Body::Kill(pb::KillRequest {
                    instance_id: String::new(),
                    wait: true,
                    job_id: inner.job_id.clone(),
                    force: false,
                }),
                FINALIZE_TIMEOUT,
            );
        }
        if let Some(pool) = self.local_pool.get() {
            pool.shutdown();
        }
        object_store::set_remote_fetcher(None);
        crate::borrows::set_messenger(None);
        object_store::set_local_owner_address("");
        inner.remove_sockets();
        crate::shared_memory::install(None);
        if let Some(stop) = self.shutdown_io.lock().take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.io_thread.lock().take() {
            let _ = thread.join();
        }
        discovery::stop_own_cluster();
    }
}
