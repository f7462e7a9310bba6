//! The seam between the client core and where calls run. Local mode runs them on thread pools in
//! this process; the cluster backend sends them to the node. Both finish the same object slots,
//! with the same error codes, so the public API behaves the same on either.

use std::time::Duration;

use yr_common::Result;

use crate::cross_language::{self, Executable};
use crate::function::{CreateSpec, MethodSpec, TaskSpec};
use crate::object_store::ObjectHandle;

/// A named instance, as listed by `list_named_instances`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedInstance {
    /// The name given at creation.
    pub name: String,
    /// The namespace given at creation ("" for none).
    pub namespace: String,
    /// The instance id (`namespace-name`, or `name` without a namespace).
    pub instance_id: String,
}

/// What the client core knows about an instance it holds a handle to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceInfo {
    /// The instance id.
    pub instance_id: String,
    /// The class's path, for example `my_crate::Counter`.
    pub class: String,
}

/// Where calls run.
pub trait Backend: Send + Sync {
    /// A short name for logs: "local" or "cluster".
    fn name(&self) -> &'static str;

    /// Run a stateless call; finish `returns` with its results or its error.
    fn submit_task(&self, task: TaskSpec, returns: Vec<ObjectHandle>) -> Result<()>;

    /// Create an instance. Returns its id at once; a constructor failure surfaces on the
    /// instance's calls.
    fn create_instance(&self, spec: CreateSpec) -> Result<InstanceInfo>;

    /// Run a stateless call of code in `executable` (a call across languages); finish
    /// `returns` as [`Backend::submit_task`] does. Only a cluster runs other executables: 4006
    /// elsewhere.
    fn submit_task_in(
        &self,
        executable: &Executable,
        task: TaskSpec,
        returns: Vec<ObjectHandle>,
    ) -> Result<()> {
        let _ = returns;
        Err(cross_language::needs_cluster(
            executable,
            &format!("function `{}`", task.function.name),
        ))
    }

    /// Create an instance of a class in `executable` (a call across languages), as
    /// [`Backend::create_instance`] does. Only a cluster runs other executables: 4006
    /// elsewhere.
    fn create_instance_in(
        &self,
        executable: &Executable,
        spec: CreateSpec,
    ) -> Result<InstanceInfo> {
        Err(cross_language::needs_cluster(
            executable,
            &format!("class `{}`", spec.class()),
        ))
    }

    /// Call a method of an instance; finish `returns` with its results or its error.
    fn submit_method(
        &self,
        instance_id: &str,
        call: MethodSpec,
        returns: Vec<ObjectHandle>,
    ) -> Result<()>;

    /// Stop an instance: run its shutdown hook within its grace period, fail its pending calls.
    /// With `wait`, return once it has exited.
    fn terminate_instance(&self, instance_id: &str, wait: bool) -> Result<()>;

    /// The named instance `namespace`/`name`, waiting up to `timeout` for it to appear.
    fn get_named_instance(
        &self,
        name: &str,
        namespace: &str,
        timeout: Duration,
    ) -> Result<InstanceInfo>;

    /// Every named instance, in every namespace.
    fn list_named_instances(&self) -> Result<Vec<NamedInstance>>;

    /// Send no more calls. `finalize` calls this before it fails pending calls with 9000, so
    /// that a call queued behind one that fails then does not run after all.
    fn stop_sending(&self) {}

    /// Release everything this job created. Called once by `finalize`.
    fn shutdown(&self);
}
