//! Creating an instance: admit it to the table, reserve resources (here, or on the node the
//! master picks), make its code available, take a runtime, run its constructor, and tell its
//! subscribers. NEW → SCHEDULING → CREATING → RUNNING, or a failure state with the error
//! callers get.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use yr_common::{Error, ErrorCode, InvokeOptions};
use yr_proto::error_from_proto;
use yr_proto::v1 as pb;
use yr_proto::v1::InstanceState as S;

use super::Node;
use crate::error::ProxyError;
use crate::instance_table::{Admitted, Instance, Subscriber};
use crate::resources::Amount;

/// How long after taking a warm runtime the node starts its replacement, so that starting the
/// replacement process does not compete with this instance's start and first call (measured:
/// warm creation p50 4.0-4.5 ms with an immediate refill, 2.1-2.5 ms with this delay).
const WARM_POOL_REFILL_DELAY: Duration = Duration::from_millis(20);

/// The first and the longest wait between asking the master again for a node with room.
/// How long a create that needs the master's placement waits while no master leads (every
/// master says so: they cannot reach the meta store) before it fails with 3005. Longer than a
/// failover (a standby leads within 5 s of the leader's death), so an election never fails a
/// create; an etcd outage does, after this bound (docs/design/024-partitions-and-etcd-outage.md).
const LEADERLESS_BUDGET: Duration = Duration::from_secs(10);

const MASTER_ASK_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(2));

/// How long to wait for a runtime that failed to start to be reaped, for its stderr.
const REAP_WAIT: Duration = Duration::from_secs(2);

/// Where an instance runs.
enum Placement {
    /// Here; resources are reserved.
    Local,
    /// On another node.
    Remote { node_id: String, address: String },
}

impl Node {
    /// Handle a create: validate, record it and answer at once; the outcome is notified to
    /// `subscriber` later.
    pub fn create(
        self: &Arc<Self>,
        request: pb::CreateRequest,
        subscriber: Subscriber,
    ) -> Result<pb::CreateResponse, Error> {
        let options: InvokeOptions = rmp_serde::from_slice(&request.options)
            .map_err(|e| ProxyError::OptionsUndecodable(e.to_string()))?;
        crate::create_options::validate(&request, &options)?;
        // A create forwarded by another node was checked there, against its driver's functions;
        // the runtimes of an executable registered for calls across languages check the names.
        if !request.stateless
            && !request.function.is_empty()
            && request.creator_node_id.is_empty()
            && !request.rescheduled
            && self.code.knows_functions_of(&request.binary_hash)
            && !self.code.has_function(&request.function)
        {
            return Err(ProxyError::FunctionNotRegistered {
                function: request.function,
                node: self.settings.node_id.clone(),
            }
            .into());
        }
        // A client's create runs only a binary a driver registered here; the master's
        // re-create of a lost node's instance runs the binary its creator registered.
        if request.creator_node_id.is_empty() && !request.rescheduled {
            self.check_create_binary(&request)?;
        }
        let instance_id = if request.designated_instance_id.is_empty() {
            yr_common::ids::random_hex(20)
        } else {
            request.designated_instance_id.clone()
        };
        let record_stateless = request.stateless;
        let name = options.name.clone().unwrap_or_default();
        let namespace = if name.is_empty() {
            String::new()
        } else {
            options.namespace.clone().unwrap_or_default()
        };
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
            args: request.args,
            stateless: request.stateless,
            name,
            namespace,
            binary_path: request.binary_path,
            binary_hash: request.binary_hash,
            runtime_args: request.runtime_args,
            creator_node_id: request.creator_node_id,
            // A re-create after a node loss keeps the restarts used (the master counted this one).
            restarts: if request.rescheduled {
                request.restarts
            } else {
                0
            },
            ..Default::default()
        };
        let instance = Instance::new(
            record,
            options,
            subscriber.clone(),
            request.creator_node_address,
        );
        let admitted = self.instances.admit(instance, || {
            if self.limiter.lock().try_take() {
                return Ok(());
            }
            Err(ProxyError::CreateRateLimited {
                node: self.settings.node_id.clone(),
                rate: self.settings.create_rate.0,
            }
            .into())
        })?;
        if let Admitted::Existing {
            instance_id,
            class_name,
            record,
        } = admitted
        {
            if record.state == S::Running as i32 {
                self.notify_one(
                    &subscriber,
                    pb::InstanceNotify {
                        instance_id: instance_id.clone(),
                        state: S::Running as i32,
                        runtime_address: record.runtime_address,
                        error: None,
                    },
                );
            }
            return Ok(pb::CreateResponse {
                instance_id,
                existing: true,
                class_name,
            });
        }
        if let (true, Subscriber::Client(client_id)) = (record_stateless, &subscriber) {
            // It hears when other clients' creates wait for resources, to release its idle
            // instances at once; a new owner is told if they wait already.
            if self.bus.add_stateless_owner(*client_id) {
                self.bus
                    .push_pressure_to(*client_id, &self.scheduler.waiting_owners());
            }
        }
        self.creates.fetch_add(1, Ordering::Relaxed);
        self.spawn_start(instance_id.clone());
        Ok(pb::CreateResponse {
            instance_id,
            existing: false,
            class_name: request.class_name,
        })
    }

    pub(super) fn spawn_start(self: &Arc<Self>, instance_id: String) {
        let node = self.clone();
        let future: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
            Box::pin(async move { node.schedule_and_start(instance_id).await });
        tokio::spawn(future);
    }

    /// SCHEDULING → CREATING → RUNNING, or a failure state with the error callers get.
    async fn schedule_and_start(self: Arc<Self>, instance_id: String) {
        let outcome = match self.instances.transition(&instance_id, S::Scheduling, None) {
            Ok(()) => self.try_start(&instance_id).await,
            Err(error) => Err(error),
        };
        if let Err(error) = outcome {
            self.fail_instance(&instance_id, error).await;
        }
    }

    async fn try_start(self: &Arc<Self>, instance_id: &str) -> Result<(), Error> {
        let (request, timeout) = self
            .instances
            .with(instance_id, |i| {
                (Amount::of(&i.options), i.options.schedule_timeout())
            })
            .ok_or_else(|| gone(instance_id))?;
        if let Placement::Remote { node_id, address } =
            self.place(instance_id, &request, timeout).await?
        {
            return self.forward(instance_id, node_id, address).await;
        }
        self.instances.transition(instance_id, S::Creating, None)?;
        self.ensure_binary(instance_id).await?;
        let (binary_hash, init) = self
            .instances
            .with(instance_id, |instance| {
                let record = instance.record();
                (
                    record.binary_hash.clone(),
                    pb::InitCall {
                        instance_id: instance_id.to_string(),
                        function: record.function.clone(),
                        stateless: record.stateless,
                        args: record.args.clone(),
                        options: record.options.clone(),
                        job_id: record.job_id.clone(),
                    },
                )
            })
            .ok_or_else(|| gone(instance_id))?;
        let runtime_id = self.acquire_runtime(instance_id, &binary_hash).await?;
        let pid = self.runtimes.pid(&runtime_id).unwrap_or(0);
        let owned = self.instances.with_mut(instance_id, |instance| {
            if !instance.killing {
                instance.runtime_id = Some(runtime_id.clone());
                instance.set_runtime(String::new(), pid);
            }
            !instance.killing
        });
        if owned != Some(true) {
            // Killed while its runtime started: the kill found no runtime to end, so this
            // one would serve nobody and live on.
            self.runtimes.signal(&runtime_id, libc::SIGKILL);
            return Err(gone(instance_id));
        }
        // A node that fenced itself does not let an instance the master may re-create
        // elsewhere start serving here.
        self.pause_if_fenced(instance_id, &runtime_id);
        let (client_id, address, init_result) =
            self.runtimes
                .expect_init(&runtime_id)
                .ok_or_else(|| ProxyError::RuntimeStart {
                    runtime: runtime_id.clone(),
                    instance: instance_id.to_string(),
                    why: "ended before it started the instance".into(),
                })?;
        if init_call_lost() {
            return Err(ProxyError::ConstructorExited(instance_id.to_string()).into());
        }
        self.bus
            .send(client_id, 0, pb::bus_response::Body::Init(init));
        let result = match tokio::time::timeout(self.settings.init_timeout, init_result).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => return Err(ProxyError::ConstructorExited(instance_id.to_string()).into()),
            Err(_) => {
                return Err(ProxyError::ConstructorTimeout {
                    instance: instance_id.to_string(),
                    timeout: self.settings.init_timeout,
                }
                .into())
            }
        };
        if let Some(error) = result.error {
            return Err(error_from_proto(&error));
        }
        let killing = self
            .instances
            .with_mut(instance_id, |instance| {
                instance.set_runtime(address.clone(), 0);
                instance.killing
            })
            .ok_or_else(|| gone(instance_id))?;
        if killing {
            return Ok(());
        }
        self.instances.transition(instance_id, S::Running, None)?;
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

    /// Find where the instance runs: reserve resources here when they are free (the scheduler
    /// wakes the request when they are released), or take the master's choice of another
    /// node, asked at once and again with backoff. Waits up to `timeout` (then 1017 with the
    /// last reason); a request larger than every node fails at once with 1006; a kill cancels
    /// it (1017).
    async fn place(
        self: &Arc<Self>,
        instance_id: &str,
        request: &Amount,
        timeout: Duration,
    ) -> Result<Placement, Error> {
        let Some((killing, cancel, affinities, admits_here, owner)) =
            self.instances.with(instance_id, |i| {
                let owner = match i.subscribers.first() {
                    Some(Subscriber::Client(client_id)) => *client_id,
                    _ => 0,
                };
                (
                    i.killing,
                    i.cancel.clone(),
                    crate::create_options::required_affinities(&i.options),
                    crate::create_options::admits(self.master.labels(), &i.options),
                    owner,
                )
            })
        else {
            return Err(gone(instance_id));
        };
        if killing {
            return Err(gone(instance_id));
        }
        let deadline = Instant::now() + timeout;
        // A node whose labels do not admit the instance asks only the master.
        let mut ticket = admits_here.then(|| self.scheduler.request(request, owner));
        let mut last_reason: Option<Error> = None;
        let mut backoff = MASTER_ASK_BACKOFF.0;
        let mut next_ask = Instant::now();
        // Since when every master has said that none leads (they cannot reach the meta store).
        let mut leaderless_since: Option<Instant> = None;
        let outcome = loop {
            tokio::select! {
                biased;
                granted = async {
                    match &mut ticket {
                        Some(ticket) => (&mut ticket.granted).await,
                        None => std::future::pending().await,
                    }
                } => {
                    if granted.is_ok() {
                        // A kill that came first (the instance is gone, or going) never sees
                        // this grant: give it back here, or the node loses it for good.
                        let kept = self.instances.with_mut(instance_id, |i| {
                            if !i.killing {
                                i.allocated = Some(request.clone());
                            }
                            !i.killing
                        });
                        if kept == Some(true) {
                            return Ok(Placement::Local);
                        }
                        self.scheduler.release(request);
                        return Err(gone(instance_id));
                    }
                    break Err(gone(instance_id));
                }
                () = cancel.notified() => break Err(gone(instance_id)),
                () = tokio::time::sleep_until(deadline) => {
                    let free = self.scheduler.resources().allocatable;
                    let reason = match &last_reason {
                        Some(error) => format!("{}: {}", error.code(), error.message()),
                        None => format!("{}", ErrorCode::ResourceNotEnough),
                    };
                    break Err(ProxyError::ScheduleTimeout {
                        instance: instance_id.to_string(),
                        timeout_ms: timeout.as_millis(),
                        needs: request.to_string(),
                        node: self.settings.node_id.clone(),
                        free: free.to_string(),
                        reason,
                    }
                    .into());
                }
                () = tokio::time::sleep_until(next_ask) => {
                    let exclude = crate::create_options::exclude_here(admits_here, &self.settings.node_id);
                    match self.master.schedule(request, exclude, affinities.clone()).await {
                        Ok((node_id, address)) => break Ok(Placement::Remote { node_id, address }),
                        Err(error) if error.code() == ErrorCode::ResourceConfigError
                            && !request.fits_in(&self.scheduler.resources().capacity) =>
                        {
                            break Err(error);
                        }
                        Err(error) if error.code() == ErrorCode::EtcdOperationError => {
                            // No master leads: an election, or an outage of the meta store.
                            // Past the budget that covers a failover, the create fails (3005).
                            let since = *leaderless_since.get_or_insert_with(Instant::now);
                            if since.elapsed() >= LEADERLESS_BUDGET {
                                tracing::warn!(instance = %instance_id, error = %error, "no master led for the leaderless budget; the create fails");
                                break Err(error);
                            }
                            last_reason = Some(error);
                        }
                        Err(error) => {
                            leaderless_since = None;
                            last_reason = Some(error);
                        }
                    }
                    next_ask = Instant::now() + backoff;
                    backoff = (backoff * 2).min(MASTER_ASK_BACKOFF.1);
                }
            }
        };
        // Not placed here: give the place in the queue up (or what it was granted meanwhile).
        if let Some(ticket) = ticket {
            self.scheduler.withdraw(ticket.id, request);
        }
        outcome
    }

    /// Hand the instance to the node at `address`; relay its notifications to this node's
    /// subscribers until it ends.
    async fn forward(
        self: &Arc<Self>,
        instance_id: &str,
        node_id: String,
        address: String,
    ) -> Result<(), Error> {
        let request = self
            .instances
            .with_mut(instance_id, |instance| {
                instance.forward_to(&node_id, &address);
                let record = instance.record();
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
                    rescheduled: false,
                    restarts: 0,
                }
            })
            .ok_or_else(|| gone(instance_id))?;
        tracing::info!(instance = %instance_id, node = %node_id, "placing the instance on another node");
        // Fault tests: the other node cannot be reached.
        fail::fail_point!("proxy::forward", |_| Err(ProxyError::ForwardRefused {
            node: node_id.clone(),
            instance: instance_id.to_string(),
            message: "the node cannot be reached (a fail point)".to_string(),
            code: ErrorCode::InnerCommunication,
        }
        .into()));
        let channel = yr_transport::connect(&address, ErrorCode::InnerCommunication).await?;
        let mut client = pb::node_client::NodeClient::new(channel)
            .max_decoding_message_size(yr_transport::max_message_bytes())
            .max_encoding_message_size(yr_transport::max_message_bytes());
        let notifications = client
            .create(request)
            .await
            .map_err(|status| ProxyError::ForwardRefused {
                node: node_id.clone(),
                instance: instance_id.to_string(),
                message: status.message().to_string(),
                code: yr_transport::status_to_code(&status, ErrorCode::InnerCommunication),
            })?
            .into_inner();
        // A stopped node keeps its connections open: its loss comes from the meta store.
        let restarts = self
            .instances
            .with(instance_id, |instance| instance.record().restarts)
            .unwrap_or(0);
        let lost = self.fencing.forwarded_lost(&node_id, instance_id, restarts);
        tokio::spawn(self.clone().relay_forwarded(
            instance_id.to_string(),
            node_id,
            notifications,
            lost,
        ));
        Ok(())
    }

    /// A forwarded instance ended on the node that ran it.
    pub(super) fn forget_forwarded(&self, instance_id: &str) {
        if let Some(instance) = self.instances.remove(instance_id) {
            for waiter in instance.exit_waiters {
                let _ = waiter.send(());
            }
        }
    }

    /// Start idle runtimes of `binary_hash` until the warm pool is full.
    pub(super) fn fill_warm_pool(&self, binary_hash: &str) {
        let Some(spec) = self.code.binary(binary_hash) else {
            return;
        };
        if let Err(error) = self.runtimes.fill(binary_hash, &spec) {
            tracing::warn!(%error, "could not start a warm runtime");
        }
    }

    /// Take a runtime for `instance_id`: a warm one, or a new one. Waits until it is connected.
    async fn acquire_runtime(
        self: &Arc<Self>,
        instance_id: &str,
        binary_hash: &str,
    ) -> Result<String, Error> {
        let spec = self
            .code
            .binary(binary_hash)
            .ok_or_else(|| ProxyError::UnknownBinary {
                hash: binary_hash.to_string(),
                instance: instance_id.to_string(),
                node: self.settings.node_id.clone(),
            })?;
        // An instance with its own env_vars gets a runtime started for it, never a warm one.
        let env = self
            .instances
            .with(instance_id, |i| {
                crate::create_options::runtime_env(&i.options)
            })
            .unwrap_or_default();
        let taken = if env.is_empty() {
            self.runtimes.take(binary_hash, &spec, instance_id)?
        } else {
            let spec = crate::create_options::with_env(spec, &env);
            self.runtimes.take_new(binary_hash, &spec, instance_id)?
        };
        let node = self.clone();
        let hash = binary_hash.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(WARM_POOL_REFILL_DELAY).await;
            node.fill_warm_pool(&hash);
        });
        let runtime_id = taken.runtime_id;
        let Some(mut registration) = taken.registration else {
            return Ok(runtime_id);
        };
        let why = match tokio::time::timeout(self.settings.runtime_start_timeout, &mut registration)
            .await
        {
            Ok(Ok(Ok(()))) => return Ok(runtime_id),
            Ok(Ok(Err(stderr_tail))) => {
                format!(
                    "exited before it connected to the node; its stderr ends with:\n{stderr_tail}"
                )
            }
            Ok(Err(_)) => "ended before it connected to the node".to_string(),
            Err(_) => {
                self.runtimes.signal(&runtime_id, libc::SIGKILL);
                // The reaper reports the end with what the process printed.
                let tail = match tokio::time::timeout(REAP_WAIT, registration).await {
                    Ok(Ok(Err(tail))) => tail,
                    _ => yr_agent::tail(&self.agent.stderr_path(&runtime_id), 20),
                };
                format!(
                    "did not connect within {:?}; its stderr ends with:\n{tail}",
                    self.settings.runtime_start_timeout
                )
            }
        };
        Err(ProxyError::RuntimeStart {
            runtime: runtime_id,
            instance: instance_id.to_string(),
            why,
        }
        .into())
    }
}

/// Fault tests: whether the init call is lost, as if the runtime died before it answered. The
/// `proxy::init_call` fail point says so (`return`).
fn init_call_lost() -> bool {
    fail::fail_point!("proxy::init_call", |_| true);
    false
}

/// The error of an instance whose creation a kill cancelled.
pub(super) fn gone(instance_id: &str) -> Error {
    ProxyError::CreationCancelled(instance_id.to_string()).into()
}
