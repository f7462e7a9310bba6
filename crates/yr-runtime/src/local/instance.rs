//! Stateful instances in local mode. Each instance owns an executor: one thread that runs calls
//! in submission order, or `concurrency` threads that share the queue. `&self` methods hold a
//! read lock on the state and `&mut self` methods a write lock, so concurrent calls are safe.

use std::sync::Arc;
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
    /// The class's path.
    pub class: &'static str,
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
            name,
            sender,
            receiver,
            phase: Mutex::new(Phase::Creating),
            phase_changed: Condvar::new(),
            state: RwLock::new(None),
            shutdown: spec.constructor.shutdown,
            grace: spec.options.graceful_shutdown_time(),
            threads: spec.options.concurrency.max(1) as usize,
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
                        .spawn(move || worker.serve());
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
        self.serve();
    }

    fn next_message(&self) -> Result<Message, crossbeam_channel::RecvError> {
        let mut received = None;
        crate::spin::spin_until(std::time::Duration::from_micros(300), || {
            match self.receiver.try_recv() {
                Ok(message) => received = Some(Ok(message)),
                Err(crossbeam_channel::TryRecvError::Empty) => {}
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    received = Some(Err(crossbeam_channel::RecvError))
                }
            }
            received.is_some()
        });
        received.unwrap_or_else(|| self.receiver.recv())
    }

    fn serve(&self) {
        while let Ok(message) = self.next_message() {
            match message {
                Message::Stop => break,
                Message::Call(call, returns) => self.run_call(call, returns),
            }
        }
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
        crate::function::instance_exited(&self.id)
    }

    /// Queue a method call. Fails with 1007 if the instance is exiting or gone.
    pub fn submit(&self, call: MethodSpec, returns: Vec<ObjectHandle>) -> Result<(), Error> {
        let phase = self.phase.lock();
        if matches!(*phase, Phase::Exiting | Phase::Exited) {
            return Err(self.exited_error());
        }
        self.sender
            .send(Message::Call(call, returns))
            .map_err(|_| self.exited_error())
    }

    /// Terminate: refuse new calls, fail queued ones with 1007, run the shutdown hook within the
    /// grace period. With `wait`, return once the instance has exited. Returns false if it was
    /// already exiting.
    pub fn terminate(self: &Arc<Self>, wait: bool) -> bool {
        {
            let mut phase = self.phase.lock();
            if matches!(*phase, Phase::Exiting | Phase::Exited) {
                drop(phase);
                if wait {
                    self.wait_exited(self.grace + Duration::from_secs(1));
                }
                return false;
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
