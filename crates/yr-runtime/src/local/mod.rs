//! Local mode: everything runs in the driver's process. Stateless calls run on a bounded pool,
//! each instance on its own executor, and objects live in the in-process store. The semantics
//! and error codes are the cluster's.

pub(crate) mod instance;
pub(crate) mod pool;
pub(crate) mod task;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use yr_common::{ids, Config, Error, ErrorCode, InvokeOptions, Result};

use crate::backend::{Backend, InstanceInfo, NamedInstance};
use crate::function::{CreateSpec, MethodSpec, TaskSpec};
use crate::object_store::ObjectHandle;
use instance::{LocalInstance, Phase};
use pool::Pool;
use task::LocalTask;

/// How long `finalize` waits for instances' shutdown hooks in total.
const FINALIZE_GRACE: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Instances {
    by_id: HashMap<String, Arc<LocalInstance>>,
    /// `(namespace, name)` → instance id, for live named instances.
    by_name: HashMap<(String, String), String>,
}

/// The local-mode backend.
pub struct LocalBackend {
    pool: Pool,
    instances: Mutex<Instances>,
    named_changed: Condvar,
}

impl LocalBackend {
    /// A backend whose stateless pool has `config.local_thread_pool_size` threads (0: one per
    /// core, at least 4).
    pub fn new(config: &Config) -> LocalBackend {
        LocalBackend {
            pool: Pool::new("yr-local", pool_size(config)),
            instances: Mutex::new(Instances::default()),
            named_changed: Condvar::new(),
        }
    }

    fn instance(&self, instance_id: &str) -> Result<Arc<LocalInstance>> {
        if instance_id.is_empty() {
            return Err(Error::new(
                ErrorCode::InstanceIdEmpty,
                "the instance id is empty; pass the id of a created instance",
            ));
        }
        self.instances
            .lock()
            .by_id
            .get(instance_id)
            .cloned()
            .ok_or_else(|| not_found(instance_id))
    }

    fn forget_name(&self, instance: &LocalInstance) {
        if let Some(key) = &instance.name {
            let mut instances = self.instances.lock();
            if instances.by_name.get(key) == Some(&instance.id) {
                instances.by_name.remove(key);
            }
        }
    }
}

/// A call that runs in this process (local mode, or `always_local_mode`) runs in the
/// driver's environment: its `env_vars` are honoured when that environment has them already,
/// and refused (1001) otherwise, rather than ignored.
pub(crate) fn check_env_vars_here(options: &InvokeOptions) -> Result<()> {
    for (name, value) in &options.env_vars {
        let current = std::env::var_os(name);
        if current.as_deref() == Some(std::ffi::OsStr::new(value)) {
            continue;
        }
        let now = match current {
            None => "unset".to_string(),
            Some(other) => format!("{:?}", other.to_string_lossy()),
        };
        return Err(Error::new(
            ErrorCode::ParamInvalid,
            format!(
                "env_vars[\"{name}\"] = {value:?}: this call runs in the driver's process \
                 (local mode or always_local_mode), where {name} is {now}, and yr does not \
                 support giving such a call its own environment yet; set {name}={value} in the \
                 driver's environment, or run the call on a cluster"
            ),
        ));
    }
    Ok(())
}

/// The size of a local thread pool for `config.local_thread_pool_size` (0: one thread per
/// core, at least 4).
pub(crate) fn pool_size(config: &Config) -> usize {
    match config.local_thread_pool_size {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(4)
            .max(4),
        n => n,
    }
}

fn not_found(instance_id: &str) -> Error {
    Error::new(
        ErrorCode::InstanceNotFound,
        format!(
            "instance {instance_id} is not found: it was never created in this job or it was \
             killed; check the id"
        ),
    )
}

fn info(instance: &LocalInstance) -> InstanceInfo {
    InstanceInfo {
        instance_id: instance.id.clone(),
        class: instance.class_name.clone(),
    }
}

impl Backend for LocalBackend {
    fn name(&self) -> &'static str {
        "local"
    }

    fn submit_task(&self, task: TaskSpec, returns: Vec<ObjectHandle>) -> Result<()> {
        check_env_vars_here(&task.options)?;
        LocalTask::submit(&self.pool, task, returns);
        Ok(())
    }

    fn create_instance(&self, spec: CreateSpec) -> Result<InstanceInfo> {
        check_env_vars_here(&spec.options)?;
        let name = spec.options.name.clone().map(|name| {
            let namespace = spec.options.namespace.clone().unwrap_or_default();
            (namespace, name)
        });
        let mut instances = self.instances.lock();
        if let Some(key) = &name {
            // An instance that exited (evicted when idle) no longer holds its name.
            if let Some(existing) = instances
                .by_name
                .get(key)
                .and_then(|id| instances.by_id.get(id))
                .filter(|existing| !matches!(existing.phase(), Phase::Exiting | Phase::Exited))
            {
                if existing.class_name != spec.class() {
                    return Err(Error::new(
                        ErrorCode::InstanceDuplicated,
                        format!(
                            "the name {:?} in namespace {:?} is taken by an instance of {}; \
                             choose another name or kill instance {} first",
                            key.1, key.0, existing.class_name, existing.id
                        ),
                    ));
                }
                return Ok(info(existing));
            }
        }
        let id = spec
            .options
            .instance_id_for_name()
            .unwrap_or_else(|| ids::random_hex(20));
        let instance = LocalInstance::start(id.clone(), name.clone(), spec)?;
        instances.by_id.insert(id.clone(), instance.clone());
        if let Some(key) = name {
            instances.by_name.insert(key, id);
            self.named_changed.notify_all();
        }
        Ok(info(&instance))
    }

    fn submit_method(
        &self,
        instance_id: &str,
        call: MethodSpec,
        returns: Vec<ObjectHandle>,
    ) -> Result<()> {
        let instance = self.instance(instance_id)?;
        if call.method.class != instance.class {
            return Err(Error::new(
                ErrorCode::ParamInvalid,
                format!(
                    "method {} does not belong to instance {} of {}",
                    call.method.name, instance.id, instance.class
                ),
            ));
        }
        instance.submit(call, returns)
    }

    fn terminate_instance(&self, instance_id: &str, wait: bool) -> Result<()> {
        let instance = self.instance(instance_id)?;
        self.forget_name(&instance);
        instance.terminate(wait);
        Ok(())
    }

    fn get_named_instance(
        &self,
        name: &str,
        namespace: &str,
        timeout: Duration,
    ) -> Result<InstanceInfo> {
        let deadline = Instant::now().checked_add(timeout);
        let key = (namespace.to_string(), name.to_string());
        let mut instances = self.instances.lock();
        loop {
            if let Some(instance) = instances
                .by_name
                .get(&key)
                .and_then(|id| instances.by_id.get(id))
            {
                if !matches!(instance.phase(), Phase::Exiting | Phase::Exited) {
                    return Ok(info(instance));
                }
            }
            // A blocking wait: a pool thread waiting here tells its pool.
            let timed_out = crate::blocking::blocking(|| match deadline {
                Some(deadline) => self
                    .named_changed
                    .wait_until(&mut instances, deadline)
                    .timed_out(),
                None => {
                    self.named_changed.wait(&mut instances);
                    false
                }
            });
            if timed_out {
                return Err(Error::new(
                    ErrorCode::InstanceNotFound,
                    format!(
                        "failed to get instance {name:?} in namespace {namespace:?} within {timeout:?}: \
                         no live instance has that name; create it first or check the namespace"
                    ),
                ));
            }
        }
    }

    fn list_named_instances(&self) -> Result<Vec<NamedInstance>> {
        let instances = self.instances.lock();
        let mut named: Vec<NamedInstance> = instances
            .by_name
            .iter()
            .map(|((namespace, name), id)| NamedInstance {
                name: name.clone(),
                namespace: namespace.clone(),
                instance_id: id.clone(),
            })
            .collect();
        named.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        Ok(named)
    }

    fn shutdown(&self) {
        let all: Vec<Arc<LocalInstance>> = {
            let mut instances = self.instances.lock();
            instances.by_name.clear();
            instances.by_id.drain().map(|(_, i)| i).collect()
        };
        for instance in &all {
            instance.terminate(false);
        }
        let deadline = Instant::now() + FINALIZE_GRACE;
        for instance in &all {
            let left = deadline.saturating_duration_since(Instant::now());
            instance.wait_exited(left);
        }
        self.pool.shutdown();
    }
}
