//! Stateful instances in local mode. Each instance owns an executor: one thread that runs calls
//! in submission order, or `concurrency` threads that share the queue. `&self` methods hold a
//! read lock on the state and `&mut self` methods a write lock, so concurrent calls are safe.
//! With `need_order = Some(false)` a call joins the queue once its own arguments are ready, so
//! it may overtake calls that wait for theirs. An instance without calls for `idle_timeout_s`
//! is evicted (1013). A runtime (cluster mode) runs its instance with the same executor.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex, RwLock};
use yr_common::{Error, ErrorCode};

use crate::dependencies;
use crate::function::{CreateSpec, InstanceState, MethodCall, MethodSpec, ShutdownFn};
use crate::object_store::ObjectHandle;
use crate::user_code;

enum Message {
    Call(MethodSpec, Vec<ObjectHandle>),
    Stop,
}

/// Told that an instance was evicted, and why.
pub type EvictionListener = Box<dyn FnOnce(Error) + Send>;

/// Where an instance is in its life.
#[derive(Clone, Debug)]
pub enum Phase {
    /// The constructor has not finished.
    Creating,
    /// Serving calls.
    Running,
    /// The constructor failed; every call fails with this error.
    Failed(Error),
    /// Terminating: the shutdown hook runs, calls are refused.
    Exiting,
    /// Gone.
    Exited,
}

/// A local instance.
pub struct LocalInstance {
    /// The instance id.
    pub id: String,
    /// The class's path (its constructor's: methods of this class are called on it).
    pub class: &'static str,
    /// The class as its users name it ([`CreateSpec::class`]).
    pub class_name: String,
    /// `(namespace, name)` for a named instance.
    pub name: Option<(String, String)>,
    sender: Sender<Message>,
    receiver: Receiver<Message>,
    phase: Mutex<Phase>,
    phase_changed: Condvar,
    state: RwLock<Option<Box<InstanceState>>>,
    shutdown: Option<ShutdownFn>,
    grace: Duration,
    threads: usize,
    /// Calls keep submission order (`need_order` is not `Some(false)`).
    ordered: bool,
    /// Evicted after this long without calls (`idle_timeout_s`; `None`: never).
    idle_timeout: Option<Duration>,
    /// Calls submitted and not finished.
    busy: AtomicUsize,
    /// When the last call finished (or the constructor).
    last_active: Mutex<Instant>,
    /// Why it exited, when not because it was terminated (1013 when evicted).
    exit_reason: Mutex<Option<Error>>,
    /// Told once when the instance is evicted for idleness.
    on_evicted: Mutex<Option<EvictionListener>>,
}

impl LocalInstance {
    /// Create the instance: its executor starts and runs the constructor first.
    pub fn start(
        id: String,
        name: Option<(String, String)>,
        spec: CreateSpec,
    ) -> Result<Arc<LocalInstance>, Error> {
        let (sender, receiver) = crossbeam_channel::unbounded();
        let instance = Arc::new(LocalInstance {
            id,
            class: spec.constructor.class,
            class_name: spec.class().to_string(),
            name,
            sender,
            receiver,
            phase: Mutex::new(Phase::Creating),
            phase_changed: Condvar::new(),
            state: RwLock::new(None),
            shutdown: spec.constructor.shutdown,
            grace: spec.options.graceful_shutdown_time(),
            threads: spec.options.concurrency.max(1) as usize,
            ordered: spec.options.calls_in_order(),
            idle_timeout: spec.options.idle_timeout(),
            busy: AtomicUsize::new(0),
            last_active: Mutex::new(Instant::now()),
            exit_reason: Mutex::new(None),
            on_evicted: Mutex::new(None),
        });
        let executor = instance.clone();
        std::thread::Builder::new()
            .name(format!("yr-instance-{}", instance.id))
            .spawn(move || executor.run_executor(spec))
            .map_err(|e| {
                Error::new(
                    ErrorCode::RuntimeManagerOperationError,
                    format!("could not start a thread for instance {}: {e}", instance.id),
                )
            })?;
        Ok(instance)
    }

    fn set_phase(&self, phase: Phase) {
        *self.phase.lock() = phase;
        self.phase_changed.notify_all();
    }

    fn run_executor(self: Arc<Self>, spec: CreateSpec) {
        dependencies::wait_ready(&spec.args);
        let constructed = dependencies::first_failure(&spec.args).and_then(|()| {
            user_code::run(spec.constructor.name, || {
                (spec.constructor.call)(&spec.args)
            })
        });
        match constructed {
            Ok(state) => {
                *self.state.write() = Some(state);
                *self.last_active.lock() = Instant::now();
                {
                    let mut phase = self.phase.lock();
                    if matches!(*phase, Phase::Creating) {
                        *phase = Phase::Running;
                    }
                }
                self.phase_changed.notify_all();
                for index in 1..self.threads {
                    let worker = self.clone();
                    let spawned = std::thread::Builder::new()
                        .name(format!("yr-instance-{}-{index}", self.id))
                        .spawn(move || worker.serve(false));
                    if let Err(e) = spawned {
                        tracing::warn!(instance = %self.id, error = %e, "fewer executor threads than concurrency");
                    }
                }
            }
            Err(error) => {
                let error = Error::new(
                    error.code(),
                    format!(
                        "instance {} could not be created: {}",
                        self.id,
                        error.message()
                    ),
                );
                let mut phase = self.phase.lock();
                if matches!(*phase, Phase::Creating) {
                    *phase = Phase::Failed(error);
                }
                drop(phase);
                self.phase_changed.notify_all();
            }
        }
        self.serve(true);
    }

    /// The next message: after a short spin (a wakeup costs more than it), a blocking wait,
    /// at most `limit`. `Ok(None)` when the limit passed.
    fn next_message(&self, limit: Option<Duration>) -> Result<Option<Message>, ()> {
        let mut received = None;
        crate::spin::spin_until(std::time::Duration::from_micros(300), || {
            match self.receiver.try_recv() {
                Ok(message) => received = Some(Ok(Some(message))),
                Err(crossbeam_channel::TryRecvError::Empty) => {}
                Err(crossbeam_channel::TryRecvError::Disconnected) => received = Some(Err(())),
            }
            received.is_some()
        });
        if let Some(received) = received {
            return received;
        }
        match limit {
            None => self.receiver.recv().map(Some).map_err(|_| ()),
            Some(limit) => match self.receiver.recv_timeout(limit) {
                Ok(message) => Ok(Some(message)),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => Ok(None),
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => Err(()),
            },
        }
    }

    /// Run calls until told to stop. The thread that `watches_idle` evicts the instance once
    /// it has had no call for its idle timeout.
    fn serve(self: &Arc<Self>, watches_idle: bool) {
        let mut idle = self.idle_timeout.filter(|_| watches_idle);
        loop {
            // While calls run (on other threads) or wait for their arguments, the instance is
            // not idle: look again a whole idle period later.
            let limit = idle.map(|idle| {
                if self.busy.load(Ordering::Acquire) > 0 {
                    idle
                } else {
                    idle.saturating_sub(self.last_active.lock().elapsed())
                }
            });
            match self.next_message(limit) {
                Ok(None) => {
                    if let Some(timeout) = idle {
                        if !self.evict_if_idle(timeout) {
                            idle = None;
                        }
                    }
                }
                Ok(Some(Message::Stop)) | Err(()) => break,
                Ok(Some(Message::Call(call, returns))) => {
                    self.run_call(call, returns);
                    *self.last_active.lock() = Instant::now();
                    self.busy.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
    }

    /// Evict the instance (1013) if it has had no call for `idle`: new calls are refused with
    /// 1013, its shutdown hook runs, and whoever asked (the runtime, to tell its node) hears.
    /// Returns whether to keep watching (false once it is not running any more).
    fn evict_if_idle(self: &Arc<Self>, idle: Duration) -> bool {
        if self.busy.load(Ordering::Acquire) > 0 || self.last_active.lock().elapsed() < idle {
            return true;
        }
        let error = Error::new(
            ErrorCode::InstanceEvicted,
            format!(
                "instance {} was evicted after {} s without calls (its idle_timeout_s); create \
                 it again, or give it a longer idle_timeout_s (0 = never evicted)",
                self.id,
                idle.as_secs()
            ),
        );
        if !matches!(self.phase(), Phase::Running) {
            return false;
        }
        tracing::info!(instance = %self.id, idle = ?idle, "evicting an idle instance");
        if self.end(false, Some(error.clone())) {
            if let Some(tell) = self.on_evicted.lock().take() {
                tell(error);
            }
        }
        false
    }

    /// Call `tell` once if the instance is evicted for idleness.
    pub fn on_evicted(&self, tell: EvictionListener) {
        *self.on_evicted.lock() = Some(tell);
    }

    fn run_call(&self, call: MethodSpec, returns: Vec<ObjectHandle>) {
        let refused = match &*self.phase.lock() {
            Phase::Failed(error) => Some(error.clone()),
            Phase::Exiting | Phase::Exited => Some(self.exited_error()),
            Phase::Creating | Phase::Running => None,
        };
        let result = match refused {
            Some(error) => Err(error),
            None => {
                dependencies::wait_ready(&call.args);
                dependencies::first_failure(&call.args).and_then(|()| {
                    user_code::run(call.method.name, || match call.method.call {
                        MethodCall::Shared(method) => match self.state.read().as_deref() {
                            Some(state) => method(state, &call.args),
                            None => Err(self.exited_error()),
                        },
                        MethodCall::Exclusive(method) => match self.state.write().as_deref_mut() {
                            Some(state) => method(state, &call.args),
                            None => Err(self.exited_error()),
                        },
                    })
                })
            }
        };
        match result {
            Ok(values) if values.len() == returns.len() => {
                for (handle, value) in returns.iter().zip(values.into_vec()) {
                    handle.complete(Arc::new(value));
                }
            }
            Ok(values) => {
                let error = Error::new(
                    ErrorCode::UserFunctionException,
                    format!(
                        "method {} returned {} values but the caller expects {}",
                        call.method.name,
                        values.len(),
                        returns.len()
                    ),
                );
                returns.iter().for_each(|h| {
                    h.fail(error.clone());
                });
            }
            Err(error) => returns.iter().for_each(|h| {
                h.fail(error.clone());
            }),
        }
    }

    fn exited_error(&self) -> Error {
        self.exit_reason
            .lock()
            .clone()
            .unwrap_or_else(|| crate::function::instance_exited(&self.id))
    }

    /// Queue a method call: now, or (calls not in order) once its arguments are ready. Fails
    /// with 1007 if the instance is exiting or gone (1013 if it was evicted).
    pub fn submit(
        self: &Arc<Self>,
        call: MethodSpec,
        returns: Vec<ObjectHandle>,
    ) -> Result<(), Error> {
        let phase = self.phase.lock();
        if matches!(*phase, Phase::Exiting | Phase::Exited) {
            return Err(self.exited_error());
        }
        self.busy.fetch_add(1, Ordering::AcqRel);
        if self.ordered {
            return self.sender.send(Message::Call(call, returns)).map_err(|_| {
                self.busy.fetch_sub(1, Ordering::AcqRel);
                self.exited_error()
            });
        }
        drop(phase);
        let instance: Weak<LocalInstance> = Arc::downgrade(self);
        let args = call.args.iter().flat_map(|a| a.dependencies()).cloned();
        let waiting: Vec<crate::function::Arg> = args.map(crate::function::Arg::Ref).collect();
        dependencies::when_ready(&waiting, move || {
            let Some(instance) = instance.upgrade() else {
                return;
            };
            // Under the phase lock: an exiting instance fails the call, a running one queues
            // it before any exit drains the queue.
            let phase = instance.phase.lock();
            let sent = !matches!(*phase, Phase::Exiting | Phase::Exited)
                && instance
                    .sender
                    .send(Message::Call(call, returns.clone()))
                    .is_ok();
            drop(phase);
            if !sent {
                instance.busy.fetch_sub(1, Ordering::AcqRel);
                let error = instance.exited_error();
                for handle in &returns {
                    handle.fail(error.clone());
                }
            }
        });
        Ok(())
    }

    /// Terminate: refuse new calls, fail queued ones with 1007, run the shutdown hook within the
    /// grace period. With `wait`, return once the instance has exited. Returns false if it was
    /// already exiting.
    pub fn terminate(self: &Arc<Self>, wait: bool) -> bool {
        self.end(wait, None)
    }

    /// Terminate, with `reason` as the error of later calls (1007 without one).
    fn end(self: &Arc<Self>, wait: bool, reason: Option<Error>) -> bool {
        {
            let mut phase = self.phase.lock();
            if matches!(*phase, Phase::Exiting | Phase::Exited) {
                drop(phase);
                if wait {
                    self.wait_exited(self.grace + Duration::from_secs(1));
                }
                return false;
            }
            if reason.is_some() {
                *self.exit_reason.lock() = reason;
            }
            *phase = Phase::Exiting;
        }
        self.phase_changed.notify_all();
        let instance = self.clone();
        let reaper = std::thread::Builder::new()
            .name(format!("yr-exit-{}", self.id))
            .spawn(move || instance.exit());
        if reaper.is_err() {
            // Without a thread for the hook, exit at once.
            self.fail_queued();
            self.set_phase(Phase::Exited);
        }
        if wait {
            self.wait_exited(self.grace + Duration::from_secs(1));
        }
        true
    }

    fn fail_queued(&self) {
        while let Ok(message) = self.receiver.try_recv() {
            if let Message::Call(_, returns) = message {
                self.busy.fetch_sub(1, Ordering::AcqRel);
                let error = self.exited_error();
                for handle in returns {
                    handle.fail(error.clone());
                }
            }
        }
    }

    fn exit(self: Arc<Self>) {
        self.fail_queued();
        for _ in 0..self.threads {
            let _ = self.sender.send(Message::Stop);
        }
        if let Some(hook) = self.shutdown {
            let (done_sender, done) = crossbeam_channel::bounded::<()>(1);
            let instance = self.clone();
            let grace = self.grace;
            let started = std::thread::Builder::new()
                .name(format!("yr-shutdown-{}", self.id))
                .spawn(move || {
                    let mut state = instance.state.write();
                    if let Some(state) = state.as_deref_mut() {
                        let _ = user_code::run("shutdown hook", || {
                            hook(state, grace);
                            Ok(())
                        });
                    }
                    let _ = done_sender.send(());
                });
            if started.is_ok() && done.recv_timeout(self.grace).is_err() {
                tracing::warn!(instance = %self.id, grace = ?self.grace, "shutdown hook exceeded its grace period");
            }
        }
        self.fail_queued();
        self.set_phase(Phase::Exited);
    }

    /// Wait until the instance has exited, at most `timeout`.
    pub fn wait_exited(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut phase = self.phase.lock();
        while !matches!(*phase, Phase::Exited) {
            if self
                .phase_changed
                .wait_until(&mut phase, deadline)
                .timed_out()
            {
                return false;
            }
        }
        true
    }

    /// Wait until the constructor has finished (or failed) and return the phase.
    pub fn wait_started(&self) -> Phase {
        let mut phase = self.phase.lock();
        while matches!(*phase, Phase::Creating) {
            self.phase_changed.wait(&mut phase);
        }
        phase.clone()
    }

    /// The instance's phase.
    pub fn phase(&self) -> Phase {
        self.phase.lock().clone()
    }
}
