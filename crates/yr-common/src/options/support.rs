//! Which [`InvokeOptions`] fields yr honours, and the refusal of the others.
//!
//! Every field is either honoured on both backends (local mode and a cluster) or refused with
//! [`ErrorCode::ParamInvalid`] (1001) and a message that names the field and says that yr does
//! not support it yet. A default value is never refused: a program that leaves a field alone
//! runs. `docs/invoke-options.md` has the table; [`check_supported`] destructures the options
//! exhaustively, so a new field does not compile until it is decided here.
//!
//! Some fields apply to one kind of use only: [`InvokeOptions::check_for_function`] refuses
//! those that mean nothing for a stateless call, [`InvokeOptions::check_for_instance`] those
//! that mean nothing for an instance.

use std::collections::HashMap;

use super::{
    Affinity, AffinityKind, AffinityType, InvokeOptions, LabelOp, DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_INVOKE_LATENCY_MS, EXT_CONCURRENCY, EXT_DELEGATE_DIRECTORY_INFO,
    EXT_DELEGATE_DIRECTORY_QUOTA, EXT_GRACEFUL_SHUTDOWN_TIME, EXT_IDLE_TIMEOUT, EXT_LIFECYCLE,
    EXT_RECOVER_RETRY_TIMEOUT,
};
use crate::error::{Error, ErrorCode, Result};

/// The prefix of environment variables yr sets for its runtimes itself; `env_vars` may not
/// name them.
pub const RESERVED_ENV_PREFIX: &str = "YR_";

/// The prefix of the dynamic loader's variables (`LD_PRELOAD`, `LD_LIBRARY_PATH`, …), which
/// change what code a runtime runs: a driver may start only registered binaries
/// (docs/security.md), so `env_vars` may not name them either. A node started with them passes
/// them on to its runtimes.
pub const LOADER_ENV_PREFIX: &str = "LD_";

/// The refusal of a field yr does not support yet: 1001, naming the field and what to do.
fn unsupported(field: &str, what: &str, instead: &str) -> Error {
    Error::new(
        ErrorCode::ParamInvalid,
        format!("{field}: yr does not support {what} yet; {instead}"),
    )
}

/// The refusal of a field that means nothing where it is used (a stateless call or an
/// instance): 1001, naming the field.
fn not_for(field: &str, use_: &str, why: &str) -> Error {
    Error::new(
        ErrorCode::ParamInvalid,
        format!("{field} does not apply to {use_}: {why}"),
    )
}

/// Refuse every field that is set to something yr does not honour yet. Called by
/// [`InvokeOptions::validate`] after the values themselves were checked.
pub(crate) fn check_supported(options: &InvokeOptions) -> Result<()> {
    // Destructured exhaustively: a new field must be decided here (and in
    // docs/invoke-options.md, and in the conformance test that walks every field).
    let InvokeOptions {
        // Honoured: a cluster places and accounts for them (master and node); local mode runs
        // everything in the driver's process, where there is nothing to place.
        cpu: _,
        cpu_limit,
        memory: _,
        mem_limit,
        // Honoured: the executors of instances and stateless instances, on both backends.
        concurrency,
        // Honoured like cpu.
        custom_resources: _,
        custom_extensions,
        pod_labels,
        labels,
        affinity,
        schedule_affinities,
        preferred_priority,
        required_priority,
        preferred_anti_other_labels,
        is_data_affinity,
        device,
        max_invoke_latency_ms,
        min_instances,
        // Honoured for stateless calls: the most instances (local mode: calls at once, times
        // concurrency) of one shape. Refused for instances by check_for_instance.
        max_instances: _,
        // Honoured on a cluster (the node restarts the runtime and callers replay); local
        // mode has no runtime process to restart.
        recover_retry_times: _,
        // Honoured: Some(false) sends each call as soon as its own arguments are ready;
        // None and Some(true) keep submission order (checked by check_for_instance).
        need_order: _,
        // Honoured: named instances on both backends (get_if_exists: the existing instance is
        // returned; it always is, as in openYuanrong).
        name: _,
        namespace: _,
        resource_group_options,
        function_group_options,
        // Honoured: the runtime's environment on a cluster; local mode checks the driver's.
        env_vars,
        // Honoured: stateless retries on both backends (crate yr-runtime, retry.rs).
        retry_times: _,
        trace_id,
        alias_params,
        runtime_env,
        debug,
        preempted_allowed,
        instance_priority,
        // Honoured on a cluster (the node's placement waits this long, then 1017); local mode
        // places nothing.
        schedule_timeout_ms: _,
        group_name,
        // Honoured: an instance idle this long is evicted (1013) on both backends.
        idle_timeout_s: _,
        is_delete_remote_tensor,
        bypass_datasystem,
        skip_serialize,
        port_forwardings,
        get_if_exists: _,
        priority,
        // Honoured: stateless retries, as retry_times.
        max_retry_time: _,
        // Honoured: a stateless call not finished within it fails with 4005, both backends.
        timeout_s: _,
        // Honoured: the call runs on this process's thread pool, both backends.
        always_local_mode: _,
    } = options;

    if *cpu_limit != 0 {
        return Err(unsupported(
            "cpu_limit",
            "container CPU limits (cpu is what placement reserves; runtimes are plain \
             processes without a limit)",
            "leave cpu_limit 0",
        ));
    }
    if *mem_limit != 0 {
        return Err(unsupported(
            "mem_limit",
            "container memory limits (memory is what placement reserves; runtimes are plain \
             processes without a limit)",
            "leave mem_limit 0",
        ));
    }
    check_extensions(custom_extensions, *concurrency)?;
    if !pod_labels.is_empty() {
        return Err(unsupported(
            "pod_labels",
            "Kubernetes pods",
            "leave pod_labels empty",
        ));
    }
    if !labels.is_empty() {
        return Err(unsupported(
            "labels",
            "instance labels (they are matched by instance affinities, which yr does not \
             support either)",
            "leave labels empty; to place an instance by its node's labels (yr start --labels \
             k=v), use schedule_affinities with AffinityKind::Resource and \
             AffinityType::Required or RequiredAnti",
        ));
    }
    if !affinity.is_empty() {
        return Err(unsupported(
            "affinity",
            "the legacy affinity map",
            "use schedule_affinities with AffinityKind::Resource and AffinityType::Required or \
             RequiredAnti",
        ));
    }
    for (index, affinity) in schedule_affinities.iter().enumerate() {
        check_affinity(index, affinity)?;
    }
    if !*preferred_priority {
        return Err(unsupported(
            "preferred_priority = false",
            "preferred affinities, the only ones it applies to",
            "leave preferred_priority true",
        ));
    }
    if *required_priority {
        return Err(unsupported(
            "required_priority = true",
            "ordered matching of required affinities (every required affinity must hold)",
            "leave required_priority false",
        ));
    }
    if *preferred_anti_other_labels {
        return Err(unsupported(
            "preferred_anti_other_labels = true",
            "preferred anti-affinities, the only ones it applies to",
            "leave preferred_anti_other_labels false",
        ));
    }
    if *is_data_affinity {
        return Err(unsupported(
            "is_data_affinity = true",
            "data-locality scheduling",
            "leave is_data_affinity false",
        ));
    }
    if device.is_some() {
        return Err(unsupported(
            "device",
            "heterogeneous (NPU/GPU) functions",
            "leave device unset (None); ask for devices with custom_resources",
        ));
    }
    if *max_invoke_latency_ms != DEFAULT_MAX_INVOKE_LATENCY_MS {
        return Err(unsupported(
            "max_invoke_latency_ms",
            "heterogeneous (NPU/GPU) functions, the only ones it applies to",
            &format!("leave max_invoke_latency_ms {DEFAULT_MAX_INVOKE_LATENCY_MS}"),
        ));
    }
    if *min_instances != 0 {
        return Err(unsupported(
            "min_instances",
            "keeping stateless instances warm ahead of calls",
            "leave min_instances 0 (the node's warm pool, yr start --warm-pool, keeps \
             runtimes ready)",
        ));
    }
    if resource_group_options.resource_group_name.is_empty() {
        if resource_group_options.bundle_index != -1 {
            return Err(unsupported(
                "resource_group_options.bundle_index",
                "resource groups",
                "leave bundle_index -1",
            ));
        }
    } else {
        return Err(unsupported(
            "resource_group_options.resource_group_name",
            "resource groups",
            "leave resource_group_name empty",
        ));
    }
    if function_group_options.is_some() {
        return Err(unsupported(
            "function_group_options",
            "function groups",
            "leave function_group_options unset (None)",
        ));
    }
    if let Some(name) = env_vars
        .keys()
        .find(|name| name.starts_with(RESERVED_ENV_PREFIX))
    {
        return Err(Error::new(
            ErrorCode::ParamInvalid,
            format!(
                "env_vars name \"{}\" is invalid: names starting with {RESERVED_ENV_PREFIX} \
                 belong to yr, which sets them for its runtimes itself; choose another name",
                name.escape_debug()
            ),
        ));
    }
    if let Some(name) = env_vars
        .keys()
        .find(|name| name.starts_with(LOADER_ENV_PREFIX))
    {
        return Err(unsupported(
            &format!("env_vars[\"{}\"]", name.escape_debug()),
            "the dynamic loader's variables in env_vars (they change what code a runtime runs, \
             and a driver may start only registered binaries)",
            "set it in the environment of the node (yr start), whose runtimes inherit it",
        ));
    }
    if !trace_id.is_empty() {
        return Err(unsupported("trace_id", "tracing", "leave trace_id empty"));
    }
    if !alias_params.is_empty() {
        return Err(unsupported(
            "alias_params",
            "function aliases",
            "leave alias_params empty",
        ));
    }
    if !runtime_env.is_empty() {
        return Err(unsupported(
            "runtime_env",
            "runtime environments (conda, pip, working_dir, shared_dir)",
            "leave runtime_env empty; set environment variables with env_vars",
        ));
    }
    if *debug {
        return Err(unsupported(
            "debug = true",
            "debug instances",
            "leave debug false",
        ));
    }
    if *preempted_allowed {
        return Err(unsupported(
            "preempted_allowed = true",
            "priority preemption",
            "leave preempted_allowed false",
        ));
    }
    if *instance_priority != 0 {
        return Err(unsupported(
            "instance_priority",
            "priority preemption",
            "leave instance_priority 0",
        ));
    }
    if group_name.is_some() {
        return Err(unsupported(
            "group_name",
            "gang groups",
            "leave group_name unset (None)",
        ));
    }
    if *is_delete_remote_tensor {
        return Err(unsupported(
            "is_delete_remote_tensor = true",
            "remote tensors",
            "leave is_delete_remote_tensor false",
        ));
    }
    if *bypass_datasystem {
        return Err(unsupported(
            "bypass_datasystem = true",
            "choosing how values travel per call (values up to 100 KiB travel inline, larger \
             ones through the node's shared memory)",
            "leave bypass_datasystem false",
        ));
    }
    if *skip_serialize {
        return Err(unsupported(
            "skip_serialize = true",
            "passing arguments unserialized",
            "leave skip_serialize false",
        ));
    }
    if !port_forwardings.is_empty() {
        return Err(unsupported(
            "port_forwardings",
            "exposing an instance's ports",
            "leave port_forwardings empty",
        ));
    }
    if *priority != 0 {
        return Err(unsupported(
            "priority",
            "task priorities (stateless calls run in the order they become ready)",
            "leave priority 0",
        ));
    }
    Ok(())
}

fn check_extensions(
    extensions: &std::collections::BTreeMap<String, String>,
    concurrency: u32,
) -> Result<()> {
    for (key, value) in extensions {
        match key.as_str() {
            EXT_CONCURRENCY => {
                // Its value was checked; it must agree with the field, which is what yr uses.
                if value.trim().parse::<u32>().ok() != Some(concurrency) {
                    return Err(Error::new(
                        ErrorCode::ParamInvalid,
                        format!(
                            "custom_extensions[\"{EXT_CONCURRENCY}\"] = \"{value}\" disagrees \
                             with concurrency = {concurrency}; yr takes the concurrency field: \
                             set concurrency to {value} and leave the extension out"
                        ),
                    ));
                }
            }
            EXT_LIFECYCLE | EXT_GRACEFUL_SHUTDOWN_TIME => {}
            EXT_RECOVER_RETRY_TIMEOUT => {
                return Err(unsupported(
                    "custom_extensions[\"RECOVER_RETRY_TIMEOUT\"]",
                    "a recover timeout",
                    "leave the key out",
                ))
            }
            EXT_DELEGATE_DIRECTORY_INFO | EXT_DELEGATE_DIRECTORY_QUOTA => {
                return Err(unsupported(
                    &format!("custom_extensions[\"{key}\"]"),
                    "delegated working directories",
                    "leave the key out",
                ))
            }
            EXT_IDLE_TIMEOUT => {
                return Err(Error::new(
                    ErrorCode::ParamInvalid,
                    format!(
                        "custom_extensions[\"{EXT_IDLE_TIMEOUT}\"] is not taken: set the \
                         idle_timeout_s field instead (it is {DEFAULT_IDLE_TIMEOUT_S} s by \
                         default)"
                    ),
                ))
            }
            _ => {
                return Err(unsupported(
                    &format!("custom_extensions[\"{}\"]", key.escape_debug()),
                    "this extension (yr honours only the keys Concurrency, lifecycle and \
                     GRACEFUL_SHUTDOWN_TIME)",
                    "leave the key out",
                ))
            }
        }
    }
    Ok(())
}

fn check_affinity(index: usize, affinity: &Affinity) -> Result<()> {
    let field = format!("schedule_affinities[{index}]");
    if affinity.affinity_kind != AffinityKind::Resource {
        return Err(unsupported(
            &format!("{field}.affinity_kind = Instance"),
            "instance affinities",
            "use AffinityKind::Resource, which matches the labels of nodes (yr start --labels \
             k=v)",
        ));
    }
    if matches!(
        affinity.affinity_type,
        AffinityType::Preferred | AffinityType::PreferredAnti
    ) {
        return Err(unsupported(
            &format!("{field}.affinity_type = {:?}", affinity.affinity_type),
            "preferred (weak) affinities",
            "use AffinityType::Required or RequiredAnti",
        ));
    }
    Ok(())
}

impl Affinity {
    /// Whether a node with `labels` meets every label condition of this affinity.
    pub fn conditions_hold(&self, labels: &HashMap<String, String>) -> bool {
        self.label_operators.iter().all(|condition| {
            let value = labels.get(&condition.key);
            match condition.op {
                LabelOp::In => value.is_some_and(|v| condition.values.contains(v)),
                LabelOp::NotIn => value.is_none_or(|v| !condition.values.contains(v)),
                LabelOp::Exists => value.is_some(),
                LabelOp::NotExists => value.is_none(),
            }
        })
    }

    /// Whether a node with `labels` may take an instance with this (required) affinity: its
    /// conditions hold, or for an anti-affinity, they do not all hold.
    pub fn admits(&self, labels: &HashMap<String, String>) -> bool {
        let holds = self.conditions_hold(labels);
        match self.affinity_type {
            AffinityType::Required | AffinityType::Preferred => holds,
            AffinityType::RequiredAnti | AffinityType::PreferredAnti => !holds,
        }
    }
}

/// The first of `affinities` that a node with `labels` does not satisfy, described for a
/// message; `None` when the node satisfies them all.
pub fn unmet_affinity(affinities: &[Affinity], labels: &HashMap<String, String>) -> Option<String> {
    affinities
        .iter()
        .find(|affinity| !affinity.admits(labels))
        .map(describe_affinity)
}

/// An affinity as a message shows it, e.g. `required zone in [a, b] and gpu exists`.
pub fn describe_affinity(affinity: &Affinity) -> String {
    let kind = match affinity.affinity_type {
        AffinityType::Required => "required",
        AffinityType::RequiredAnti => "required-anti",
        AffinityType::Preferred => "preferred",
        AffinityType::PreferredAnti => "preferred-anti",
    };
    let conditions: Vec<String> = affinity
        .label_operators
        .iter()
        .map(|condition| match condition.op {
            LabelOp::In => format!("{} in [{}]", condition.key, condition.values.join(", ")),
            LabelOp::NotIn => {
                format!("{} not in [{}]", condition.key, condition.values.join(", "))
            }
            LabelOp::Exists => format!("{} exists", condition.key),
            LabelOp::NotExists => format!("{} does not exist", condition.key),
        })
        .collect();
    format!("{kind} {}", conditions.join(" and "))
}

impl InvokeOptions {
    /// Refuse (1001) what means nothing for a stateless call: names, instance-only
    /// extensions, call ordering, the idle timeout of instances. The options must have passed
    /// [`InvokeOptions::validate`].
    pub fn check_for_function(&self) -> Result<()> {
        const USE: &str = "a stateless function call";
        if self.name.is_some() || self.namespace.is_some() || self.get_if_exists {
            return Err(not_for(
                "name (and namespace, get_if_exists)",
                USE,
                "only instances have names; leave them unset",
            ));
        }
        if self.need_order.is_some() {
            return Err(not_for(
                "need_order",
                USE,
                "it orders the calls of one instance; leave it unset (None)",
            ));
        }
        if self.idle_timeout_s != DEFAULT_IDLE_TIMEOUT_S {
            return Err(not_for(
                "idle_timeout_s",
                USE,
                "stateless instances are released after Config::recycle_time; leave it \
                 at its default",
            ));
        }
        for key in [EXT_LIFECYCLE, EXT_GRACEFUL_SHUTDOWN_TIME] {
            if self.custom_extensions.contains_key(key) {
                return Err(not_for(
                    &format!("custom_extensions[\"{key}\"]"),
                    USE,
                    "it applies to instances (their lifetime and shutdown hook); leave the key \
                     out",
                ));
            }
        }
        Ok(())
    }

    /// Refuse (1001) what means nothing for an instance: stateless retries and timeouts, the
    /// stateless instance limit, local execution, and ordered calls with concurrency above 1.
    /// The options must have passed [`InvokeOptions::validate`].
    pub fn check_for_instance(&self) -> Result<()> {
        const USE: &str = "an instance";
        if self.retry_times != 0 || self.max_retry_time != -1 {
            return Err(not_for(
                "retry_times (and max_retry_time)",
                USE,
                "they retry stateless calls; use recover_retry_times to restart a failed \
                 instance",
            ));
        }
        if self.timeout_s != -1 {
            return Err(unsupported(
                "timeout_s on an instance",
                "a create timeout",
                "leave timeout_s -1; schedule_timeout_ms bounds the wait for resources",
            ));
        }
        if self.max_instances != 0 {
            return Err(not_for(
                "max_instances",
                USE,
                "it bounds the instances of a stateless function; leave it 0",
            ));
        }
        if self.always_local_mode {
            return Err(unsupported(
                "always_local_mode on an instance",
                "running an instance in the driver's process on a cluster",
                "leave always_local_mode false",
            ));
        }
        if self.need_order == Some(true) && self.concurrency > 1 {
            return Err(Error::new(
                ErrorCode::ParamInvalid,
                format!(
                    "need_order = true is invalid with concurrency {}: an instance that runs \
                     calls at once cannot run them in order; set concurrency 1 or leave \
                     need_order unset",
                    self.concurrency
                ),
            ));
        }
        Ok(())
    }

    /// Refuse (1001) what means nothing for one call of an instance's method: everything but
    /// `timeout_s` (a method call not finished within it fails with 4005) belongs to the
    /// instance (set it when creating the instance) or to stateless calls. The message names
    /// every field that is set. The options must have passed [`InvokeOptions::validate`].
    ///
    /// ```
    /// use yr_common::{ErrorCode, InvokeOptions};
    ///
    /// let timed = InvokeOptions { timeout_s: 5, ..Default::default() };
    /// timed.check_for_method().unwrap();
    /// let sized = InvokeOptions { cpu: 1000, retry_times: 2, ..Default::default() };
    /// let error = sized.check_for_method().unwrap_err();
    /// assert_eq!(error.code(), ErrorCode::ParamInvalid);
    /// assert!(error.message().contains("cpu, retry_times"), "{error}");
    /// ```
    pub fn check_for_method(&self) -> Result<()> {
        // The common case, on every method call's path: no options of its own.
        if self.is_shared_default() {
            return Ok(());
        }
        let honoured = InvokeOptions {
            timeout_s: self.timeout_s,
            ..InvokeOptions::default()
        };
        if *self == honoured {
            return Ok(());
        }
        // The fields that differ from the defaults, by name (the serialized form names them all).
        let fields = |options: &InvokeOptions| match serde_json::to_value(options) {
            Ok(serde_json::Value::Object(fields)) => fields,
            _ => serde_json::Map::new(),
        };
        let set = fields(self);
        let defaults = fields(&honoured);
        let mut names: Vec<&str> = set
            .iter()
            .filter(|(name, value)| defaults.get(name.as_str()) != Some(value))
            .map(|(name, _)| name.as_str())
            .collect();
        names.sort_unstable();
        let names = if names.is_empty() {
            "a field".to_string()
        } else {
            names.join(", ")
        };
        Err(not_for(
            &names,
            "a method call",
            "a method call honours timeout_s only; set resources, concurrency, names and \
             extensions when creating the instance (yr::instance(..).options), and \
             recover_retry_times there to restart a failed instance",
        ))
    }

    /// [`InvokeOptions::validate`], then [`InvokeOptions::check_for_function`] or
    /// [`InvokeOptions::check_for_instance`].
    pub fn validate_for(&self, stateless: bool) -> Result<()> {
        self.validate()?;
        if stateless {
            self.check_for_function()
        } else {
            self.check_for_instance()
        }
    }

    /// Whether calls to the instance keep submission order: not when `need_order` is
    /// `Some(false)`.
    pub fn calls_in_order(&self) -> bool {
        self.need_order != Some(false)
    }

    /// The idle time after which an instance is evicted; `None` when `idle_timeout_s` is 0.
    pub fn idle_timeout(&self) -> Option<std::time::Duration> {
        (self.idle_timeout_s > 0).then(|| std::time::Duration::from_secs(self.idle_timeout_s))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::options::{
        AffinityScope, Device, FunctionGroupOptions, LabelOperator, PortForwarding,
        ResourceGroupOptions,
    };

    fn refused(options: InvokeOptions, needles: &[&str]) {
        let error = options
            .validate()
            .expect_err("the options should be refused");
        assert_eq!(error.code(), ErrorCode::ParamInvalid, "{error}");
        for needle in needles {
            assert!(
                error.message().contains(needle),
                "{:?} should contain {needle:?}",
                error.message()
            );
        }
    }

    fn required(affinity_type: AffinityType, op: LabelOp, values: &[&str]) -> Affinity {
        Affinity {
            affinity_kind: AffinityKind::Resource,
            affinity_type,
            label_operators: vec![LabelOperator {
                op,
                key: "zone".into(),
                values: values.iter().map(|v| v.to_string()).collect(),
            }],
            affinity_scope: AffinityScope::Node,
        }
    }

    #[test]
    fn defaults_are_supported_for_both_uses() {
        let options = InvokeOptions::default();
        options.validate_for(true).unwrap();
        options.validate_for(false).unwrap();
    }

    #[test]
    fn unsupported_fields_are_refused_naming_the_field() {
        let cases: Vec<(InvokeOptions, &str)> = vec![
            (
                InvokeOptions {
                    cpu: 1000,
                    cpu_limit: 2000,
                    ..Default::default()
                },
                "cpu_limit",
            ),
            (
                InvokeOptions {
                    mem_limit: 1000,
                    ..Default::default()
                },
                "mem_limit",
            ),
            (
                InvokeOptions {
                    pod_labels: BTreeMap::from([("app".into(), "web".into())]),
                    ..Default::default()
                },
                "pod_labels",
            ),
            (
                InvokeOptions {
                    labels: vec!["a:b".into()],
                    ..Default::default()
                },
                "labels",
            ),
            (
                InvokeOptions {
                    affinity: BTreeMap::from([("a".into(), "b".into())]),
                    ..Default::default()
                },
                "affinity",
            ),
            (
                InvokeOptions {
                    preferred_priority: false,
                    ..Default::default()
                },
                "preferred_priority",
            ),
            (
                InvokeOptions {
                    required_priority: true,
                    ..Default::default()
                },
                "required_priority",
            ),
            (
                InvokeOptions {
                    preferred_anti_other_labels: true,
                    ..Default::default()
                },
                "preferred_anti_other_labels",
            ),
            (
                InvokeOptions {
                    is_data_affinity: true,
                    ..Default::default()
                },
                "is_data_affinity",
            ),
            (
                InvokeOptions {
                    device: Some(Device {
                        name: "NPU/x".into(),
                        batch_size: 1,
                    }),
                    ..Default::default()
                },
                "device",
            ),
            (
                InvokeOptions {
                    max_invoke_latency_ms: 1,
                    ..Default::default()
                },
                "max_invoke_latency_ms",
            ),
            (
                InvokeOptions {
                    min_instances: 1,
                    ..Default::default()
                },
                "min_instances",
            ),
            (
                InvokeOptions {
                    resource_group_options: ResourceGroupOptions {
                        resource_group_name: "rg".into(),
                        bundle_index: -1,
                    },
                    ..Default::default()
                },
                "resource_group_name",
            ),
            (
                InvokeOptions {
                    function_group_options: Some(FunctionGroupOptions::default()),
                    ..Default::default()
                },
                "function_group_options",
            ),
            (
                InvokeOptions {
                    trace_id: "t".into(),
                    ..Default::default()
                },
                "trace_id",
            ),
            (
                InvokeOptions {
                    alias_params: BTreeMap::from([("a".into(), "b".into())]),
                    ..Default::default()
                },
                "alias_params",
            ),
            (
                InvokeOptions {
                    runtime_env: BTreeMap::from([("pip".into(), "x".into())]),
                    ..Default::default()
                },
                "runtime_env",
            ),
            (
                InvokeOptions {
                    debug: true,
                    ..Default::default()
                },
                "debug",
            ),
            (
                InvokeOptions {
                    preempted_allowed: true,
                    ..Default::default()
                },
                "preempted_allowed",
            ),
            (
                InvokeOptions {
                    instance_priority: 1,
                    ..Default::default()
                },
                "instance_priority",
            ),
            (
                InvokeOptions {
                    group_name: Some("g".into()),
                    ..Default::default()
                },
                "group_name",
            ),
            (
                InvokeOptions {
                    is_delete_remote_tensor: true,
                    ..Default::default()
                },
                "is_delete_remote_tensor",
            ),
            (
                InvokeOptions {
                    bypass_datasystem: true,
                    ..Default::default()
                },
                "bypass_datasystem",
            ),
            (
                InvokeOptions {
                    skip_serialize: true,
                    ..Default::default()
                },
                "skip_serialize",
            ),
            (
                InvokeOptions {
                    port_forwardings: vec![PortForwarding {
                        port: 80,
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                "port_forwardings",
            ),
            (
                InvokeOptions {
                    priority: 1,
                    ..Default::default()
                },
                "priority",
            ),
        ];
        for (options, field) in cases {
            refused(options, &[field, "yr does not support"]);
        }
    }

    #[test]
    fn extensions_yr_does_not_honour_are_refused() {
        for key in [
            "RECOVER_RETRY_TIMEOUT",
            "DELEGATE_DIRECTORY_INFO",
            "YR_Metrics",
            "team",
        ] {
            let mut options = InvokeOptions::default();
            let value = if key == "RECOVER_RETRY_TIMEOUT" {
                "1000"
            } else {
                "x"
            };
            options.custom_extensions.insert(key.into(), value.into());
            refused(options, &[key, "yr does not support"]);
        }
        let mut options = InvokeOptions::default();
        options
            .custom_extensions
            .insert("idle_timeout".into(), "5".into());
        refused(options, &["idle_timeout_s"]);
        let mut options = InvokeOptions {
            concurrency: 4,
            ..Default::default()
        };
        options
            .custom_extensions
            .insert("Concurrency".into(), "8".into());
        refused(options.clone(), &["disagrees with concurrency = 4"]);
        options
            .custom_extensions
            .insert("Concurrency".into(), "4".into());
        options
            .custom_extensions
            .insert("lifecycle".into(), "detached".into());
        options
            .custom_extensions
            .insert("GRACEFUL_SHUTDOWN_TIME".into(), "3".into());
        options.validate_for(false).unwrap();
    }

    #[test]
    fn required_resource_affinities_are_supported_and_the_rest_refused() {
        for affinity_type in [AffinityType::Required, AffinityType::RequiredAnti] {
            InvokeOptions {
                schedule_affinities: vec![required(affinity_type, LabelOp::Exists, &[])],
                ..Default::default()
            }
            .validate()
            .unwrap();
        }
        refused(
            InvokeOptions {
                schedule_affinities: vec![required(AffinityType::Preferred, LabelOp::Exists, &[])],
                ..Default::default()
            },
            &[
                "schedule_affinities[0].affinity_type = Preferred",
                "preferred",
            ],
        );
        let mut instance = required(AffinityType::Required, LabelOp::Exists, &[]);
        instance.affinity_kind = AffinityKind::Instance;
        refused(
            InvokeOptions {
                schedule_affinities: vec![instance],
                ..Default::default()
            },
            &[
                "schedule_affinities[0].affinity_kind",
                "instance affinities",
            ],
        );
    }

    #[test]
    fn affinities_match_node_labels() {
        let labels: HashMap<String, String> =
            HashMap::from([("zone".to_string(), "a".to_string())]);
        let empty = HashMap::new();
        let in_a = required(AffinityType::Required, LabelOp::In, &["a", "b"]);
        assert!(in_a.admits(&labels) && !in_a.admits(&empty));
        let not_in_a = required(AffinityType::Required, LabelOp::NotIn, &["a"]);
        assert!(!not_in_a.admits(&labels) && not_in_a.admits(&empty));
        let exists = required(AffinityType::Required, LabelOp::Exists, &[]);
        assert!(exists.admits(&labels) && !exists.admits(&empty));
        let not_exists = required(AffinityType::Required, LabelOp::NotExists, &[]);
        assert!(!not_exists.admits(&labels) && not_exists.admits(&empty));
        let anti = required(AffinityType::RequiredAnti, LabelOp::In, &["a"]);
        assert!(!anti.admits(&labels) && anti.admits(&empty));
        assert_eq!(
            unmet_affinity(&[exists.clone(), anti.clone()], &labels).as_deref(),
            Some("required-anti zone in [a]")
        );
        assert_eq!(unmet_affinity(&[exists, in_a], &labels), None);
    }

    #[test]
    fn fields_of_instances_are_refused_on_stateless_calls() {
        let cases: Vec<(InvokeOptions, &str)> = vec![
            (
                InvokeOptions {
                    name: Some("n".into()),
                    ..Default::default()
                },
                "name",
            ),
            (
                InvokeOptions {
                    need_order: Some(false),
                    ..Default::default()
                },
                "need_order",
            ),
            (
                InvokeOptions {
                    idle_timeout_s: 5,
                    ..Default::default()
                },
                "idle_timeout_s",
            ),
        ];
        for (options, field) in cases {
            options.validate_for(false).unwrap();
            let error = options.validate_for(true).unwrap_err();
            assert_eq!(error.code(), ErrorCode::ParamInvalid);
            assert!(error.message().starts_with(field), "{error}");
            assert!(
                error.message().contains("a stateless function call"),
                "{error}"
            );
        }
    }

    #[test]
    fn fields_of_stateless_calls_are_refused_on_instances() {
        let cases: Vec<(InvokeOptions, &str)> = vec![
            (
                InvokeOptions {
                    retry_times: 1,
                    ..Default::default()
                },
                "retry_times",
            ),
            (
                InvokeOptions {
                    max_retry_time: 3,
                    ..Default::default()
                },
                "retry_times",
            ),
            (
                InvokeOptions {
                    timeout_s: 5,
                    ..Default::default()
                },
                "timeout_s",
            ),
            (
                InvokeOptions {
                    max_instances: 2,
                    ..Default::default()
                },
                "max_instances",
            ),
            (
                InvokeOptions {
                    always_local_mode: true,
                    ..Default::default()
                },
                "always_local_mode",
            ),
            (
                InvokeOptions {
                    need_order: Some(true),
                    concurrency: 2,
                    ..Default::default()
                },
                "need_order",
            ),
        ];
        for (options, field) in cases {
            let error = options.validate_for(false).unwrap_err();
            assert_eq!(error.code(), ErrorCode::ParamInvalid);
            assert!(error.message().contains(field), "{error}");
        }
        InvokeOptions {
            need_order: Some(true),
            ..Default::default()
        }
        .validate_for(false)
        .unwrap();
    }

    #[test]
    fn a_method_call_takes_timeout_s_and_refuses_the_rest_by_name() {
        InvokeOptions::default().check_for_method().unwrap();
        InvokeOptions {
            timeout_s: 3,
            ..Default::default()
        }
        .check_for_method()
        .unwrap();
        let mut extended = InvokeOptions::default();
        extended
            .custom_extensions
            .insert("Concurrency".into(), "2".into());
        let cases = [
            (
                InvokeOptions {
                    concurrency: 4,
                    timeout_s: 3,
                    ..Default::default()
                },
                "concurrency does not apply to a method call",
            ),
            (
                InvokeOptions {
                    retry_times: 1,
                    max_retry_time: 3,
                    ..Default::default()
                },
                "max_retry_time, retry_times",
            ),
            (extended, "custom_extensions"),
            (
                InvokeOptions {
                    name: Some("n".into()),
                    ..Default::default()
                },
                "name",
            ),
        ];
        for (options, needle) in cases {
            let error = options.check_for_method().unwrap_err();
            assert_eq!(error.code(), ErrorCode::ParamInvalid);
            assert!(error.message().contains(needle), "{error}");
            assert!(error.message().contains("timeout_s only"), "{error}");
        }
    }

    #[test]
    fn env_vars_may_not_name_yr_s_own_variables() {
        let mut options = InvokeOptions::default();
        options.env_vars.insert("YR_RUNTIME_ID".into(), "x".into());
        refused(
            options,
            &["env_vars name \"YR_RUNTIME_ID\"", "belong to yr"],
        );
        let mut options = InvokeOptions::default();
        options
            .env_vars
            .insert("LD_PRELOAD".into(), "/tmp/x.so".into());
        refused(
            options,
            &["env_vars[\"LD_PRELOAD\"]", "yr does not support"],
        );
    }
}
