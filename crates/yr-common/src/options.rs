//! [`InvokeOptions`]: how a stateless function call or a stateful instance is sized, scheduled,
//! named and retried, with openYuanrong's defaults and validation
//! ([`InvokeOptions::validate`]).
//!
//! Every field is either honoured on both backends or refused with 1001 ("yr does not support
//! … yet"): see [`support`] and `docs/invoke-options.md`. In local mode everything runs in the
//! driver process, so the fields that place an instance on a node (resources, affinities, the
//! schedule timeout) have nothing to place; each field's documentation says what local mode
//! does with it.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorCode, Result};
pub use support::{describe_affinity, unmet_affinity, LOADER_ENV_PREFIX, RESERVED_ENV_PREFIX};

/// Smallest CPU request, in millicores (function-system flag `min_instance_cpu_size`).
pub const MIN_CPU_MILLICORES: u32 = 300;
/// Largest CPU request, in millicores (function-system flag `max_instance_cpu_size`).
pub const MAX_CPU_MILLICORES: u32 = 16_000;
/// Default CPU request, in millicores.
pub const DEFAULT_CPU_MILLICORES: u32 = 500;
/// Smallest memory request, in MB (function-system flag `min_instance_memory_size`).
pub const MIN_MEMORY_MB: u32 = 128;
/// Largest memory request, in MB: 1 TiB (function-system flag `max_instance_memory_size`).
pub const MAX_MEMORY_MB: u32 = 1_048_576;
/// Default memory request, in MB.
pub const DEFAULT_MEMORY_MB: u32 = 500;
/// Smallest per-instance concurrency.
pub const MIN_CONCURRENCY: u32 = 1;
/// Largest per-instance concurrency.
pub const MAX_CONCURRENCY: u32 = 1000;
/// Default per-instance concurrency.
pub const DEFAULT_CONCURRENCY: u32 = 1;
/// Default time a heterogeneous call is expected to take, in milliseconds.
pub const DEFAULT_MAX_INVOKE_LATENCY_MS: u32 = 5000;
/// Default scheduling timeout of an instance, in milliseconds.
pub const DEFAULT_SCHEDULE_TIMEOUT_MS: u64 = 30_000;
/// Default idle time after which a stateful instance is evicted, in seconds.
pub const DEFAULT_IDLE_TIMEOUT_S: u64 = 300;
/// Default graceful-shutdown time of an instance.
pub const DEFAULT_GRACEFUL_SHUTDOWN_TIME: Duration = Duration::from_secs(30);
/// Largest value of the count-like options (`retry_times`, `recover_retry_times`,
/// `min_instances`, `max_instances`, `max_invoke_latency_ms`): openYuanrong's `0x7FFFFFFF`.
pub const MAX_OPTION_COUNT: u32 = i32::MAX as u32;
/// Most pod labels an instance may carry.
pub const MAX_POD_LABELS: usize = 5;
/// Longest pod-label key or value, in characters.
pub const MAX_POD_LABEL_LEN: usize = 63;

/// `custom_extensions` key: per-instance concurrency, an integer in [1, 1000]. The
/// [`InvokeOptions::concurrency`] field takes precedence.
pub const EXT_CONCURRENCY: &str = "Concurrency";
/// `custom_extensions` key: instance lifecycle; the only accepted value is
/// [`LIFECYCLE_DETACHED`].
pub const EXT_LIFECYCLE: &str = "lifecycle";
/// The value of [`EXT_LIFECYCLE`] that makes an instance outlive the job that created it.
pub const LIFECYCLE_DETACHED: &str = "detached";
/// `custom_extensions` key: graceful-shutdown time in whole seconds, ≥ 0 (0 = exit at once).
pub const EXT_GRACEFUL_SHUTDOWN_TIME: &str = "GRACEFUL_SHUTDOWN_TIME";
/// `custom_extensions` key: instance recover timeout in milliseconds, > 0 (default 600000).
pub const EXT_RECOVER_RETRY_TIMEOUT: &str = "RECOVER_RETRY_TIMEOUT";
/// `custom_extensions` key: quota of the delegated working directory in MB, in (0, 1048576)
/// or -1 for unmonitored (default 512).
pub const EXT_DELEGATE_DIRECTORY_QUOTA: &str = "DELEGATE_DIRECTORY_QUOTA";
/// `custom_extensions` key: custom directory under which the instance's working directory is
/// created.
pub const EXT_DELEGATE_DIRECTORY_INFO: &str = "DELEGATE_DIRECTORY_INFO";
/// `custom_extensions` key under which [`InvokeOptions::idle_timeout_s`] travels to the core.
pub const EXT_IDLE_TIMEOUT: &str = "idle_timeout";

/// Whether an [`Affinity`] matches resources (nodes/pods by label) or other instances.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AffinityKind {
    /// Match the labels of resources (pods or nodes).
    #[default]
    Resource,
    /// Match the labels of other instances.
    Instance,
}

/// How strongly an [`Affinity`] applies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AffinityType {
    /// Weak affinity: prefer matching targets, fall back to others.
    #[default]
    Preferred,
    /// Weak anti-affinity: prefer non-matching targets.
    PreferredAnti,
    /// Strong affinity: only matching targets; scheduling fails otherwise.
    Required,
    /// Strong anti-affinity: never matching targets; scheduling fails otherwise.
    RequiredAnti,
}

/// The operator of a [`LabelOperator`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LabelOp {
    /// The label `key` exists and its value is one of `values` (at least one value required).
    #[default]
    In,
    /// The label `key` is absent or its value is none of `values` (at least one value required).
    NotIn,
    /// The label `key` exists, whatever its value (`values` is ignored).
    Exists,
    /// The label `key` does not exist (`values` is ignored).
    NotExists,
}

/// One label condition of an [`Affinity`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LabelOperator {
    /// The operator.
    pub op: LabelOp,
    /// The label key; must not be empty.
    pub key: String,
    /// The values `In` / `NotIn` compare against; must not be empty for those operators.
    pub values: Vec<String>,
}

/// Where an [`Affinity`] is evaluated: per pod or per node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AffinityScope {
    /// Evaluate per pod (container).
    #[default]
    Pod,
    /// Evaluate per node.
    Node,
}

/// One scheduling affinity condition (openYuanrong's `yr.Affinity`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Affinity {
    /// Match resources or instances. Default [`AffinityKind::Resource`].
    pub affinity_kind: AffinityKind,
    /// Weak or strong, affinity or anti-affinity. Default [`AffinityType::Preferred`].
    pub affinity_type: AffinityType,
    /// The label conditions, all of which must hold; at least one.
    pub label_operators: Vec<LabelOperator>,
    /// Per pod or per node. Default [`AffinityScope::Pod`].
    pub affinity_scope: AffinityScope,
}

/// Placement in a resource group (openYuanrong's `ResourceGroupOptions`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ResourceGroupOptions {
    /// The resource group to schedule into; empty (default) = no resource group.
    pub resource_group_name: String,
    /// The bundle of the group to schedule into: -1 (default) = any bundle, else
    /// `[0, number of bundles)`. Ignored while `resource_group_name` is empty. Values below -1
    /// are rejected by [`InvokeOptions::validate`]; an index past the last bundle is rejected at
    /// scheduling time.
    pub bundle_index: i32,
}

impl Default for ResourceGroupOptions {
    fn default() -> Self {
        ResourceGroupOptions {
            resource_group_name: String::new(),
            bundle_index: -1,
        }
    }
}

/// The affinity of the instances inside one bundle of a function group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SchedulingAffinityType {
    /// Strong affinity inside each bundle (the only type openYuanrong supports).
    #[default]
    RequiredAffinityInEachBundle,
}

/// Options of a function group (collective / NPU jobs; openYuanrong's `FunctionGroupOptions`).
/// `None` fields fall back to the enclosing [`InvokeOptions`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FunctionGroupOptions {
    /// CPU per instance in millicores, [300, 16000].
    pub cpu: Option<u32>,
    /// Memory per instance in MB, [128, 1048576].
    pub memory: Option<u32>,
    /// Custom resources per instance, as [`InvokeOptions::custom_resources`].
    pub resources: BTreeMap<String, f64>,
    /// Affinity of the instances inside each bundle.
    pub scheduling_affinity_type: Option<SchedulingAffinityType>,
    /// Number of instances in each bundle; the group size must be divisible by it.
    pub scheduling_affinity_each_bundle_size: Option<u32>,
    /// Seconds to keep rescheduling while resources are short: -1 = forever, else
    /// `[0, 2147483647]`.
    pub timeout_s: Option<i64>,
    /// Per-instance concurrency, [1, 1000].
    pub concurrency: Option<u32>,
    /// Restarts of a failed member instance. Default 0.
    pub recover_retry_times: u32,
}

/// The heterogeneous device model a function runs on (openYuanrong's `Device`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Device {
    /// The device model name, for example `NPU/Ascend910B4`; must not be empty.
    pub name: String,
    /// Requests batched per call; ≥ 1. Default 1.
    pub batch_size: u32,
}

impl Default for Device {
    fn default() -> Self {
        Device {
            name: String::new(),
            batch_size: 1,
        }
    }
}

/// The transport protocol of a [`PortForwarding`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PortProtocol {
    /// TCP (default).
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

/// A port of the instance to expose.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct PortForwarding {
    /// The instance's port, 1–65535.
    pub port: u16,
    /// TCP or UDP. Default TCP.
    pub protocol: PortProtocol,
}

/// How a stateless function call or a stateful instance is sized, scheduled, named and retried:
/// every field of openYuanrong's `InvokeOptions` (Python `yr.InvokeOptions`) plus the C++ extras
/// `priority`, `max_retry_time`, `timeout` and `always_local_mode`.
///
/// Fields are public; start from [`Default`] (openYuanrong's defaults) and check with
/// [`InvokeOptions::validate`]. Every field is either honoured or, set to anything but its
/// default, refused with [`ErrorCode::ParamInvalid`] naming it (`docs/invoke-options.md`). In
/// local mode ([`crate::Config::local_mode`]) the fields that choose where something runs have
/// nothing to choose; each field says what local mode does.
///
/// ```
/// use yr_common::{ErrorCode, InvokeOptions};
///
/// let opts = InvokeOptions { cpu: 1000, ..Default::default() };
/// assert_eq!(opts.memory, 500);
/// assert!(opts.validate().is_ok());
///
/// let bad = InvokeOptions { cpu: 100, ..Default::default() };
/// assert_eq!(bad.validate().unwrap_err().code(), ErrorCode::ResourceConfigError);
///
/// let unsupported = InvokeOptions { trace_id: "t".into(), ..Default::default() };
/// let error = unsupported.validate().unwrap_err();
/// assert_eq!(error.code(), ErrorCode::ParamInvalid);
/// assert!(error.message().contains("trace_id: yr does not support tracing yet"));
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct InvokeOptions {
    /// CPU request in millicores, reserved on the node that runs the instance. Default 500;
    /// valid `[300, 16000]` (else [`ErrorCode::ResourceConfigError`]). Local mode: nothing to
    /// place.
    pub cpu: u32,
    /// Container CPU limit in millicores. Refused unless 0: yr does not support container
    /// limits yet.
    pub cpu_limit: u32,
    /// Memory request in MB, reserved like `cpu`. Default 500; valid `[128, 1048576]` (1 TiB)
    /// (else [`ErrorCode::ResourceConfigError`]). Local mode: nothing to place.
    pub memory: u32,
    /// Container memory limit in MB. Refused unless 0: yr does not support container limits
    /// yet.
    pub mem_limit: u32,
    /// How many calls one instance runs at once. Default 1; valid `[1, 1000]`. Honoured on
    /// both backends.
    pub concurrency: u32,
    /// Extra resources by name, e.g. `"NPU/Ascend910B4/count": 1.0` or `"ssd": 1.0`, reserved
    /// like `cpu` on nodes that have them. Default empty; names must not be empty, amounts
    /// must be finite and ≥ 0. Local mode: nothing to place.
    pub custom_resources: BTreeMap<String, f64>,
    /// Extensions sent with the create. Honoured keys: `Concurrency` (must equal
    /// `concurrency`), `lifecycle` (only `detached`: the instance outlives its job),
    /// `GRACEFUL_SHUTDOWN_TIME` (whole seconds ≥ 0, default 30: the shutdown hook's grace
    /// period); the last two only for instances. Every other key (`RECOVER_RETRY_TIMEOUT`,
    /// `DELEGATE_DIRECTORY_INFO`, `DELEGATE_DIRECTORY_QUOTA`, `YR_Metrics`, …) is refused.
    /// Default empty.
    pub custom_extensions: BTreeMap<String, String>,
    /// Kubernetes pod labels. Refused unless empty: yr does not run on Kubernetes yet. At most
    /// 5; keys 1–63 and values 0–63 characters of letters, digits and `-`, not starting or
    /// ending with `-`.
    pub pod_labels: BTreeMap<String, String>,
    /// Instance labels, each `"key:value"` or `"key"`, matched by other instances'
    /// affinities. Refused unless empty: yr does not support instance labels yet (to place by
    /// node labels, use `schedule_affinities` of kind [`AffinityKind::Resource`]).
    pub labels: Vec<String>,
    /// Legacy affinity map. Refused unless empty; use `schedule_affinities`.
    pub affinity: BTreeMap<String, String>,
    /// Scheduling affinity conditions, see [`Affinity`]. Honoured: kind
    /// [`AffinityKind::Resource`] with type [`AffinityType::Required`] or
    /// [`AffinityType::RequiredAnti`], on node labels (`yr start --labels`); every one must
    /// admit the node. Refused: instance affinities and preferred ones. Default empty. Local
    /// mode: nothing to place.
    pub schedule_affinities: Vec<Affinity>,
    /// Match multiple weak affinities in order. Default `true`; refused when `false` (yr does
    /// not support preferred affinities yet).
    pub preferred_priority: bool,
    /// Match multiple strong affinities in order (any one may hold). Default `false`; refused
    /// when `true` (every required affinity must hold).
    pub required_priority: bool,
    /// Fail instead of falling back when no weak (anti-)affinity holds. Default `false`;
    /// refused when `true`.
    pub preferred_anti_other_labels: bool,
    /// Prefer nodes that hold the call's object arguments. Default `false`; refused when
    /// `true` (yr does not support data-locality scheduling yet).
    pub is_data_affinity: bool,
    /// Heterogeneous device model the function runs on. Default `None`; refused when set.
    pub device: Option<Device>,
    /// Expected completion time of a heterogeneous call in milliseconds. Default 5000; valid
    /// `[0, 2147483647]`; refused unless 5000.
    pub max_invoke_latency_ms: u32,
    /// Minimum number of instances of a stateless function. Default 0; refused unless 0.
    pub min_instances: u32,
    /// Most instances of a stateless function of this shape (0, default = no limit; with
    /// `Config::max_task_instance_num` the lower wins); local mode runs at most
    /// `max_instances × concurrency` such calls at once. Valid `[0, 2147483647]`, and ≥
    /// `min_instances`. Refused for instances.
    pub max_instances: u32,
    /// How many times a crashed instance (or stateless instance) is restarted, its calls in
    /// flight replayed (at-least-once). Default 0 = never; valid `[0, 2147483647]`. Local
    /// mode: no runtime process to restart.
    pub recover_retry_times: u32,
    /// Whether calls to an instance keep submission order: `None` (default) and `Some(true)`
    /// keep it (`Some(true)` needs `concurrency` 1); `Some(false)` sends each call once its
    /// own arguments are ready. Refused for stateless calls.
    pub need_order: Option<bool>,
    /// Name of a named instance; its id is `namespace-name` (or `name` without namespace).
    /// Creating an instance whose name exists returns the existing one. `None` (default) =
    /// anonymous; must not be empty. Refused for stateless calls.
    pub name: Option<String>,
    /// Namespace of a named instance; requires `name`; must not be empty. `None` (default) =
    /// no namespace.
    pub namespace: Option<String>,
    /// Placement in a resource group. Refused unless the default (no group, `bundle_index`
    /// -1): yr does not support resource groups yet.
    pub resource_group_options: ResourceGroupOptions,
    /// Function-group (collective job) options. Refused unless `None`.
    pub function_group_options: Option<FunctionGroupOptions>,
    /// Environment variables of the instance's runtime process. Default empty; names must be
    /// non-empty without `=` or NUL, and must not start with `YR_` (yr's own) or `LD_` (the
    /// dynamic loader's: set those in the node's environment). Local mode (and
    /// `always_local_mode`): the call runs in the driver, so they are refused unless the
    /// driver's environment has them already.
    pub env_vars: BTreeMap<String, String>,
    /// How many times a failed stateless call is retried (see the error table's retry
    /// policy). Default 0; valid `[0, 2147483647]`. Refused for instances (use
    /// `recover_retry_times`).
    pub retry_times: u32,
    /// Trace id of the call. Refused unless empty: yr does not support tracing yet.
    pub trace_id: String,
    /// Parameters of a rule alias. Refused unless empty.
    pub alias_params: BTreeMap<String, String>,
    /// Runtime environment (`conda`, `pip`, `working_dir`, `env_vars`, `shared_dir`). Refused
    /// unless empty; use `env_vars` for environment variables.
    pub runtime_env: BTreeMap<String, String>,
    /// Start the instance as a debug instance. Default `false`; refused when `true`.
    pub debug: bool,
    /// Whether a higher-priority instance may preempt this one. Default `false`; refused when
    /// `true` (yr does not support preemption yet).
    pub preempted_allowed: bool,
    /// Instance priority for preemption. Default 0; refused unless 0.
    pub instance_priority: u32,
    /// How long placement waits for room, in milliseconds, before failing the create with
    /// [`ErrorCode::ScheduleCanceled`]. Default 30000; must be > 0. Local mode: nothing to
    /// wait for.
    pub schedule_timeout_ms: u64,
    /// Gang group the instance belongs to. `None` (default); refused when set.
    pub group_name: Option<String>,
    /// Seconds an instance may go without calls before it is evicted (its calls then fail
    /// with [`ErrorCode::InstanceEvicted`]); 0 = never. Default 300. Honoured on both
    /// backends; refused for stateless calls unless 300 (stateless instances go after
    /// `Config::recycle_time`).
    pub idle_timeout_s: u64,
    /// Delete the remote tensor after it is fetched. Default `false`; refused when `true`.
    pub is_delete_remote_tensor: bool,
    /// Send arguments and results inline instead of through the data system. Default
    /// `false`; refused when `true`.
    pub bypass_datasystem: bool,
    /// Pass arguments without serializing them. Default `false`; refused when `true`.
    pub skip_serialize: bool,
    /// Ports of the instance to expose. Default empty; ports must not be 0; refused unless
    /// empty.
    pub port_forwardings: Vec<PortForwarding>,
    /// Return the existing named instance; requires `name`. Default `false`. yr (like
    /// openYuanrong) returns the existing instance of a name either way. Refused for
    /// stateless calls.
    pub get_if_exists: bool,
    /// Priority of a stateless task in its queue (C++ `priority`). Default 0; refused unless
    /// 0.
    pub priority: u32,
    /// Bound on the retries of a stateless call on codes that are always retried (C++
    /// `maxRetryTime`): -1 (default) = 64, else ≥ 0. Refused for instances.
    pub max_retry_time: i64,
    /// A stateless call not finished this many seconds after it was submitted fails with
    /// [`ErrorCode::GetOperationFailed`] and is cancelled (C++ `timeout`): -1 (default) =
    /// none, else > 0. Refused for instances (yr has no create timeout yet).
    pub timeout_s: i64,
    /// Run the stateless call on this process's thread pool even in cluster mode (C++
    /// `alwaysLocalMode`). Default `false`. Refused for instances.
    pub always_local_mode: bool,
}

impl Default for InvokeOptions {
    fn default() -> Self {
        InvokeOptions {
            cpu: DEFAULT_CPU_MILLICORES,
            cpu_limit: 0,
            memory: DEFAULT_MEMORY_MB,
            mem_limit: 0,
            concurrency: DEFAULT_CONCURRENCY,
            custom_resources: BTreeMap::new(),
            custom_extensions: BTreeMap::new(),
            pod_labels: BTreeMap::new(),
            labels: Vec::new(),
            affinity: BTreeMap::new(),
            schedule_affinities: Vec::new(),
            preferred_priority: true,
            required_priority: false,
            preferred_anti_other_labels: false,
            is_data_affinity: false,
            device: None,
            max_invoke_latency_ms: DEFAULT_MAX_INVOKE_LATENCY_MS,
            min_instances: 0,
            max_instances: 0,
            recover_retry_times: 0,
            need_order: None,
            name: None,
            namespace: None,
            resource_group_options: ResourceGroupOptions::default(),
            function_group_options: None,
            env_vars: BTreeMap::new(),
            retry_times: 0,
            trace_id: String::new(),
            alias_params: BTreeMap::new(),
            runtime_env: BTreeMap::new(),
            debug: false,
            preempted_allowed: false,
            instance_priority: 0,
            schedule_timeout_ms: DEFAULT_SCHEDULE_TIMEOUT_MS,
            group_name: None,
            idle_timeout_s: DEFAULT_IDLE_TIMEOUT_S,
            is_delete_remote_tensor: false,
            bypass_datasystem: false,
            skip_serialize: false,
            port_forwardings: Vec::new(),
            get_if_exists: false,
            priority: 0,
            max_retry_time: -1,
            timeout_s: -1,
            always_local_mode: false,
        }
    }
}

impl InvokeOptions {
    /// The default options, allocated once for the process and shared: a call without options
    /// of its own takes a reference to these rather than a fresh `InvokeOptions` (some 700
    /// bytes to allocate, compare and free per call), and the checks of its options pass at
    /// once ([`InvokeOptions::check_for_method`]).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use yr_common::InvokeOptions;
    ///
    /// let shared = InvokeOptions::shared_default();
    /// assert_eq!(**shared, InvokeOptions::default());
    /// assert!(Arc::ptr_eq(shared, InvokeOptions::shared_default()));
    /// ```
    pub fn shared_default() -> &'static Arc<InvokeOptions> {
        static DEFAULT: OnceLock<Arc<InvokeOptions>> = OnceLock::new();
        DEFAULT.get_or_init(|| Arc::new(InvokeOptions::default()))
    }

    /// Whether these are [`InvokeOptions::shared_default`] itself (not merely equal to it).
    pub(crate) fn is_shared_default(&self) -> bool {
        std::ptr::eq(self, &**InvokeOptions::shared_default())
    }
}

fn param_invalid(message: impl Into<String>) -> Error {
    Error::new(ErrorCode::ParamInvalid, message)
}

fn check_cpu(field: &str, cpu: u32) -> Result<()> {
    if (MIN_CPU_MILLICORES..=MAX_CPU_MILLICORES).contains(&cpu) {
        return Ok(());
    }
    Err(Error::new(
        ErrorCode::ResourceConfigError,
        format!(
            "Required CPU resource size {cpu} millicores ({field}) is invalid. Valid value range \
             is [{MIN_CPU_MILLICORES}, {MAX_CPU_MILLICORES}] millicores"
        ),
    ))
}

fn check_memory(field: &str, memory: u32) -> Result<()> {
    if (MIN_MEMORY_MB..=MAX_MEMORY_MB).contains(&memory) {
        return Ok(());
    }
    Err(Error::new(
        ErrorCode::ResourceConfigError,
        format!(
            "Required memory resource size {memory} MB ({field}) is invalid. Valid value range \
             is [{MIN_MEMORY_MB}, {MAX_MEMORY_MB}] MB"
        ),
    ))
}

fn check_concurrency(field: &str, concurrency: u32) -> Result<()> {
    if (MIN_CONCURRENCY..=MAX_CONCURRENCY).contains(&concurrency) {
        return Ok(());
    }
    Err(param_invalid(format!(
        "{field} {concurrency} is invalid. Valid value range is \
         [{MIN_CONCURRENCY}, {MAX_CONCURRENCY}]"
    )))
}

fn check_resources(field: &str, resources: &BTreeMap<String, f64>) -> Result<()> {
    for (name, amount) in resources {
        if name.trim().is_empty() {
            return Err(param_invalid(format!(
                "{field} has a resource with an empty name. Resource names must not be empty"
            )));
        }
        if !amount.is_finite() || *amount < 0.0 {
            return Err(param_invalid(format!(
                "{field}[\"{name}\"] = {amount} is invalid. Valid value range is [0, +inf) \
                 (a finite number)"
            )));
        }
    }
    Ok(())
}

fn check_count(field: &str, value: u32) -> Result<()> {
    if value <= MAX_OPTION_COUNT {
        return Ok(());
    }
    Err(param_invalid(format!(
        "{field} {value} is invalid. Valid value range is [0, {MAX_OPTION_COUNT}]"
    )))
}

fn check_not_empty(field: &str, value: &Option<String>) -> Result<()> {
    match value {
        Some(text) if text.is_empty() => Err(param_invalid(format!(
            "{field} is an empty string. Give a non-empty {field} or leave it unset (None)"
        ))),
        _ => Ok(()),
    }
}

fn is_pod_label_text(text: &str) -> bool {
    text.len() <= MAX_POD_LABEL_LEN
        && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !text.starts_with('-')
        && !text.ends_with('-')
}

fn check_pod_labels(pod_labels: &BTreeMap<String, String>) -> Result<()> {
    if pod_labels.len() > MAX_POD_LABELS {
        return Err(param_invalid(format!(
            "pod_labels has {} labels. At most {MAX_POD_LABELS} are allowed",
            pod_labels.len()
        )));
    }
    for (key, value) in pod_labels {
        if key.is_empty() || !is_pod_label_text(key) {
            return Err(param_invalid(format!(
                "pod_labels key \"{key}\" is invalid. Keys must be 1-{MAX_POD_LABEL_LEN} \
                 letters, digits or '-', not starting or ending with '-'"
            )));
        }
        if !is_pod_label_text(value) {
            return Err(param_invalid(format!(
                "pod_labels[\"{key}\"] = \"{value}\" is invalid. Values must be \
                 0-{MAX_POD_LABEL_LEN} letters, digits or '-', not starting or ending with '-'"
            )));
        }
    }
    Ok(())
}

fn check_affinities(affinities: &[Affinity]) -> Result<()> {
    for (index, affinity) in affinities.iter().enumerate() {
        if affinity.label_operators.is_empty() {
            return Err(param_invalid(format!(
                "schedule_affinities[{index}] has no label_operators. Give at least one"
            )));
        }
        for (op_index, operator) in affinity.label_operators.iter().enumerate() {
            let at = format!("schedule_affinities[{index}].label_operators[{op_index}]");
            if operator.key.is_empty() {
                return Err(param_invalid(format!(
                    "{at} has an empty key. Label keys must not be empty"
                )));
            }
            if matches!(operator.op, LabelOp::In | LabelOp::NotIn) && operator.values.is_empty() {
                return Err(param_invalid(format!(
                    "{at} ({:?} \"{}\") has no values. {:?} needs at least one value",
                    operator.op, operator.key, operator.op
                )));
            }
        }
    }
    Ok(())
}

fn check_function_group(options: &FunctionGroupOptions) -> Result<()> {
    if let Some(cpu) = options.cpu {
        check_cpu("function_group_options.cpu", cpu)?;
    }
    if let Some(memory) = options.memory {
        check_memory("function_group_options.memory", memory)?;
    }
    check_resources("function_group_options.resources", &options.resources)?;
    if let Some(concurrency) = options.concurrency {
        check_concurrency("function_group_options.concurrency", concurrency)?;
    }
    if let Some(timeout) = options.timeout_s {
        if timeout != -1 && !(0..=i64::from(i32::MAX)).contains(&timeout) {
            return Err(param_invalid(format!(
                "function_group_options.timeout_s {timeout} is invalid. Valid values are -1 \
                 (wait forever) or [0, {}] seconds",
                i32::MAX
            )));
        }
    }
    if options.scheduling_affinity_each_bundle_size == Some(0) {
        return Err(param_invalid(
            "function_group_options.scheduling_affinity_each_bundle_size 0 is invalid. \
             Valid value range is [1, 2147483647], or leave it unset (None)",
        ));
    }
    check_count(
        "function_group_options.recover_retry_times",
        options.recover_retry_times,
    )
}

fn check_extensions(extensions: &BTreeMap<String, String>) -> Result<()> {
    if let Some(value) = extensions.get(EXT_CONCURRENCY) {
        match value.trim().parse::<u32>() {
            Ok(concurrency) => {
                check_concurrency("custom_extensions[\"Concurrency\"]", concurrency)?
            }
            Err(_) => {
                return Err(param_invalid(format!(
                    "custom_extensions[\"{EXT_CONCURRENCY}\"] = \"{value}\" is invalid. It must \
                     be an integer in [{MIN_CONCURRENCY}, {MAX_CONCURRENCY}]"
                )))
            }
        }
    }
    if let Some(value) = extensions.get(EXT_LIFECYCLE) {
        if value != LIFECYCLE_DETACHED {
            return Err(param_invalid(format!(
                "custom_extensions[\"{EXT_LIFECYCLE}\"] = \"{value}\" is invalid. The only \
                 accepted value is \"{LIFECYCLE_DETACHED}\""
            )));
        }
    }
    if let Some(value) = extensions.get(EXT_GRACEFUL_SHUTDOWN_TIME) {
        if value.trim().parse::<u64>().is_err() {
            return Err(param_invalid(format!(
                "custom_extensions[\"{EXT_GRACEFUL_SHUTDOWN_TIME}\"] = \"{value}\" is invalid. \
                 It must be a whole number of seconds in [0, {}]",
                u64::MAX
            )));
        }
    }
    if let Some(value) = extensions.get(EXT_RECOVER_RETRY_TIMEOUT) {
        if !matches!(value.trim().parse::<u64>(), Ok(ms) if ms > 0) {
            return Err(param_invalid(format!(
                "custom_extensions[\"{EXT_RECOVER_RETRY_TIMEOUT}\"] = \"{value}\" is invalid. \
                 It must be a whole number of milliseconds in [1, {}]",
                u64::MAX
            )));
        }
    }
    if let Some(value) = extensions.get(EXT_DELEGATE_DIRECTORY_QUOTA) {
        let valid = matches!(
            value.trim().parse::<i64>(),
            Ok(mb) if mb == -1 || (mb > 0 && mb < i64::from(MAX_MEMORY_MB))
        );
        if !valid {
            return Err(param_invalid(format!(
                "custom_extensions[\"{EXT_DELEGATE_DIRECTORY_QUOTA}\"] = \"{value}\" is \
                 invalid. It must be -1 (unmonitored) or an integer number of MB in \
                 (0, {MAX_MEMORY_MB})"
            )));
        }
    }
    Ok(())
}

impl InvokeOptions {
    /// Checks the options against openYuanrong's rules. Out-of-range `cpu` or `memory` fail
    /// with [`ErrorCode::ResourceConfigError`]; every other violation fails with
    /// [`ErrorCode::ParamInvalid`]. The message names the field, the bad value and the valid
    /// range. Fields that local mode ignores are checked too, so options that pass here work
    /// in both modes.
    ///
    /// Then it refuses (1001) every field set to something yr does not support yet (see
    /// [`support`]). A default value is never refused.
    pub fn validate(&self) -> Result<()> {
        self.check_values()?;
        support::check_supported(self)
    }

    /// The checks of [`InvokeOptions::validate`] on the values alone.
    fn check_values(&self) -> Result<()> {
        check_cpu("cpu", self.cpu)?;
        if self.cpu_limit != 0 && self.cpu_limit < self.cpu {
            return Err(param_invalid(format!(
                "cpu_limit {} millicores is invalid. It must be 0 (same as cpu) or at least \
                 cpu ({} millicores), up to {MAX_CPU_MILLICORES}",
                self.cpu_limit, self.cpu
            )));
        }
        check_memory("memory", self.memory)?;
        if self.mem_limit != 0 && self.mem_limit < self.memory {
            return Err(param_invalid(format!(
                "mem_limit {} MB is invalid. It must be 0 (same as memory) or at least memory \
                 ({} MB), up to {MAX_MEMORY_MB}",
                self.mem_limit, self.memory
            )));
        }
        check_concurrency("concurrency", self.concurrency)?;
        check_resources("custom_resources", &self.custom_resources)?;
        check_extensions(&self.custom_extensions)?;
        check_pod_labels(&self.pod_labels)?;
        for label in &self.labels {
            let key = label.split_once(':').map_or(label.as_str(), |(key, _)| key);
            if key.trim().is_empty() {
                return Err(param_invalid(format!(
                    "labels entry \"{label}\" is invalid. Labels must be \"key:value\" or \
                     \"key\" with a non-empty key"
                )));
            }
        }
        check_affinities(&self.schedule_affinities)?;
        if let Some(device) = &self.device {
            if device.name.is_empty() {
                return Err(param_invalid(
                    "device.name is empty. Give the device model, e.g. \"NPU/Ascend910B4\", or \
                     leave device unset (None)",
                ));
            }
            if device.batch_size == 0 {
                return Err(param_invalid(
                    "device.batch_size 0 is invalid. Valid value range is [1, 4294967295]",
                ));
            }
        }
        check_count("max_invoke_latency_ms", self.max_invoke_latency_ms)?;
        check_count("min_instances", self.min_instances)?;
        check_count("max_instances", self.max_instances)?;
        if self.max_instances != 0 && self.min_instances > self.max_instances {
            return Err(param_invalid(format!(
                "min_instances {} is invalid. It must not exceed max_instances ({}); valid \
                 range is [0, max_instances]",
                self.min_instances, self.max_instances
            )));
        }
        check_count("recover_retry_times", self.recover_retry_times)?;
        check_count("retry_times", self.retry_times)?;
        check_not_empty("name", &self.name)?;
        check_not_empty("namespace", &self.namespace)?;
        check_not_empty("group_name", &self.group_name)?;
        if self.namespace.is_some() && self.name.is_none() {
            return Err(param_invalid(
                "namespace is set but name is not. A namespace only applies to a named \
                 instance: set name too",
            ));
        }
        if self.get_if_exists && self.name.is_none() {
            return Err(param_invalid(
                "get_if_exists is true but name is not set. get_if_exists needs a named \
                 instance: set name",
            ));
        }
        if self.resource_group_options.bundle_index < -1 {
            return Err(param_invalid(format!(
                "resource_group_options.bundle_index {} is invalid. Valid values are -1 (any \
                 bundle) or [0, number of bundles)",
                self.resource_group_options.bundle_index
            )));
        }
        if let Some(group) = &self.function_group_options {
            check_function_group(group)?;
        }
        for name in self.env_vars.keys() {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return Err(param_invalid(format!(
                    "env_vars name \"{}\" is invalid. Names must be non-empty and contain \
                     neither '=' nor NUL",
                    name.escape_debug()
                )));
            }
        }
        if self.schedule_timeout_ms == 0 {
            return Err(param_invalid(format!(
                "schedule_timeout_ms 0 is invalid. Valid value range is [1, {}] milliseconds",
                u64::MAX
            )));
        }
        for forwarding in &self.port_forwardings {
            if forwarding.port == 0 {
                return Err(param_invalid(
                    "port_forwardings has port 0. Valid value range is [1, 65535]",
                ));
            }
        }
        if self.max_retry_time < -1 {
            return Err(param_invalid(format!(
                "max_retry_time {} is invalid. Valid values are -1 (unbounded) or [0, {}]",
                self.max_retry_time,
                i64::MAX
            )));
        }
        if self.timeout_s != -1 && self.timeout_s <= 0 {
            return Err(param_invalid(format!(
                "timeout_s {} is invalid. Valid values are -1 (no timeout) or [1, {}] seconds",
                self.timeout_s,
                i64::MAX
            )));
        }
        Ok(())
    }

    /// The graceful-shutdown time: `custom_extensions["GRACEFUL_SHUTDOWN_TIME"]` seconds, or
    /// 30 s when it is absent or not a whole number (which [`InvokeOptions::validate`]
    /// rejects).
    pub fn graceful_shutdown_time(&self) -> Duration {
        self.custom_extensions
            .get(EXT_GRACEFUL_SHUTDOWN_TIME)
            .and_then(|value| value.trim().parse::<u64>().ok())
            .map_or(DEFAULT_GRACEFUL_SHUTDOWN_TIME, Duration::from_secs)
    }

    /// The scheduling timeout, `schedule_timeout_ms` as a [`Duration`].
    pub fn schedule_timeout(&self) -> Duration {
        Duration::from_millis(self.schedule_timeout_ms)
    }

    /// The create/call timeout, `timeout_s` as a [`Duration`]; `None` when it is -1 (or not
    /// positive).
    pub fn timeout(&self) -> Option<Duration> {
        u64::try_from(self.timeout_s)
            .ok()
            .filter(|secs| *secs > 0)
            .map(Duration::from_secs)
    }

    /// Whether the instance is detached (`custom_extensions["lifecycle"] == "detached"`): it
    /// outlives the job that created it.
    pub fn is_detached(&self) -> bool {
        self.custom_extensions
            .get(EXT_LIFECYCLE)
            .is_some_and(|value| value == LIFECYCLE_DETACHED)
    }

    /// The instance id of a named instance: `namespace-name` when a namespace is set, else
    /// `name`; `None` for an anonymous instance.
    pub fn instance_id_for_name(&self) -> Option<String> {
        let name = self.name.as_ref()?;
        Some(match self.namespace.as_deref() {
            Some(namespace) if !namespace.is_empty() => format!("{namespace}-{name}"),
            _ => name.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // These tests check the rules on values (`check_values`); which fields yr refuses because
    // it does not support them yet is tested in `support_tests`.
    fn expect_err(opts: &InvokeOptions, code: ErrorCode, needles: &[&str]) {
        let err = opts.check_values().expect_err("options should be rejected");
        assert_eq!(err.code(), code, "wrong code for {err}");
        for needle in needles {
            assert!(
                err.message().contains(needle),
                "message {:?} should contain {:?}",
                err.message(),
                needle
            );
        }
    }

    fn ok(opts: &InvokeOptions) {
        if let Err(err) = opts.check_values() {
            panic!("options should be valid, got {err}");
        }
    }

    #[test]
    fn defaults_match_openyuanrong() {
        let opts = InvokeOptions::default();
        assert_eq!(opts.cpu, 500);
        assert_eq!(opts.cpu_limit, 0);
        assert_eq!(opts.memory, 500);
        assert_eq!(opts.mem_limit, 0);
        assert_eq!(opts.concurrency, 1);
        assert!(opts.preferred_priority);
        assert!(!opts.required_priority);
        assert!(!opts.preferred_anti_other_labels);
        assert_eq!(opts.max_invoke_latency_ms, 5000);
        assert_eq!(opts.min_instances, 0);
        assert_eq!(opts.max_instances, 0);
        assert_eq!(opts.recover_retry_times, 0);
        assert_eq!(opts.need_order, None);
        assert_eq!(opts.name, None);
        assert_eq!(opts.namespace, None);
        assert_eq!(opts.resource_group_options.bundle_index, -1);
        assert!(opts.resource_group_options.resource_group_name.is_empty());
        assert_eq!(opts.function_group_options, None);
        assert_eq!(opts.retry_times, 0);
        assert_eq!(opts.schedule_timeout_ms, 30_000);
        assert_eq!(opts.idle_timeout_s, 300);
        assert_eq!(opts.max_retry_time, -1);
        assert_eq!(opts.timeout_s, -1);
        assert!(!opts.always_local_mode);
        assert!(!opts.get_if_exists);
        assert_eq!(opts.device, None);
        assert_eq!(Device::default().batch_size, 1);
        ok(&opts);
    }

    #[test]
    fn clone_and_debug() {
        let opts = InvokeOptions {
            cpu: 1000,
            name: Some("a".into()),
            ..Default::default()
        };
        let copy = opts.clone();
        assert_eq!(copy, opts);
        assert!(format!("{opts:?}").contains("cpu: 1000"));
    }

    #[test]
    fn cpu_bounds() {
        for cpu in [300, 500, 16_000] {
            ok(&InvokeOptions {
                cpu,
                ..Default::default()
            });
        }
        for cpu in [0, 100, 299, 16_001] {
            expect_err(
                &InvokeOptions {
                    cpu,
                    ..Default::default()
                },
                ErrorCode::ResourceConfigError,
                &[
                    &format!("Required CPU resource size {cpu} millicores"),
                    "Valid value range is [300, 16000] millicores",
                ],
            );
        }
    }

    #[test]
    fn memory_bounds() {
        for memory in [128, 1_048_576] {
            ok(&InvokeOptions {
                memory,
                ..Default::default()
            });
        }
        for memory in [0, 127, 1_048_577] {
            expect_err(
                &InvokeOptions {
                    memory,
                    ..Default::default()
                },
                ErrorCode::ResourceConfigError,
                &[&format!("{memory} MB"), "[128, 1048576] MB"],
            );
        }
    }

    #[test]
    fn limits_must_cover_requests() {
        ok(&InvokeOptions {
            cpu: 1000,
            cpu_limit: 1000,
            memory: 1000,
            mem_limit: 2000,
            ..Default::default()
        });
        expect_err(
            &InvokeOptions {
                cpu: 1000,
                cpu_limit: 999,
                ..Default::default()
            },
            ErrorCode::ParamInvalid,
            &["cpu_limit 999", "at least cpu (1000"],
        );
        expect_err(
            &InvokeOptions {
                memory: 1000,
                mem_limit: 999,
                ..Default::default()
            },
            ErrorCode::ParamInvalid,
            &["mem_limit 999", "at least memory (1000"],
        );
    }

    #[test]
    fn concurrency_bounds() {
        for concurrency in [1, 1000] {
            ok(&InvokeOptions {
                concurrency,
                ..Default::default()
            });
        }
        for concurrency in [0, 1001] {
            expect_err(
                &InvokeOptions {
                    concurrency,
                    ..Default::default()
                },
                ErrorCode::ParamInvalid,
                &[&format!("concurrency {concurrency}"), "[1, 1000]"],
            );
        }
    }

    #[test]
    fn custom_resources() {
        let mut opts = InvokeOptions::default();
        opts.custom_resources
            .insert("NPU/Ascend910B4/count".into(), 1.0);
        opts.custom_resources.insert("ssd".into(), 0.0);
        ok(&opts);
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            let mut opts = InvokeOptions::default();
            opts.custom_resources.insert("gpu".into(), bad);
            expect_err(
                &opts,
                ErrorCode::ParamInvalid,
                &["custom_resources", "[0, +inf)"],
            );
        }
        let mut opts = InvokeOptions::default();
        opts.custom_resources.insert(String::new(), 1.0);
        expect_err(&opts, ErrorCode::ParamInvalid, &["empty name"]);
    }

    #[test]
    fn labels() {
        ok(&InvokeOptions {
            labels: vec!["zone:a".into(), "gpu".into(), "k:".into()],
            ..Default::default()
        });
        for bad in ["", ":value", " :v"] {
            expect_err(
                &InvokeOptions {
                    labels: vec![bad.into()],
                    ..Default::default()
                },
                ErrorCode::ParamInvalid,
                &["labels", "non-empty key"],
            );
        }
    }

    #[test]
    fn pod_labels() {
        let mut opts = InvokeOptions::default();
        opts.pod_labels.insert("app".into(), "web-1".into());
        opts.pod_labels.insert("empty".into(), String::new());
        opts.pod_labels.insert("k".repeat(63), "v".repeat(63));
        ok(&opts);

        let mut opts = InvokeOptions::default();
        for i in 0..6 {
            opts.pod_labels.insert(format!("k{i}"), "v".into());
        }
        expect_err(&opts, ErrorCode::ParamInvalid, &["6 labels", "At most 5"]);

        for (key, value) in [
            ("", "v"),
            ("-k", "v"),
            ("k-", "v"),
            ("k_1", "v"),
            (&"k".repeat(64) as &str, "v"),
        ] {
            let mut opts = InvokeOptions::default();
            opts.pod_labels.insert(key.into(), value.into());
            expect_err(&opts, ErrorCode::ParamInvalid, &["pod_labels key", "1-63"]);
        }
        for value in ["-v", "v.v", &"v".repeat(64) as &str] {
            let mut opts = InvokeOptions::default();
            opts.pod_labels.insert("k".into(), value.into());
            expect_err(
                &opts,
                ErrorCode::ParamInvalid,
                &["pod_labels[\"k\"]", "0-63"],
            );
        }
    }

    #[test]
    fn schedule_affinities() {
        let good = Affinity {
            affinity_kind: AffinityKind::Instance,
            affinity_type: AffinityType::RequiredAnti,
            label_operators: vec![
                LabelOperator {
                    op: LabelOp::In,
                    key: "zone".into(),
                    values: vec!["a".into()],
                },
                LabelOperator {
                    op: LabelOp::Exists,
                    key: "gpu".into(),
                    values: vec![],
                },
            ],
            affinity_scope: AffinityScope::Node,
        };
        ok(&InvokeOptions {
            schedule_affinities: vec![good.clone()],
            ..Default::default()
        });
        let mut no_values = good.clone();
        no_values.label_operators[0].values.clear();
        expect_err(
            &InvokeOptions {
                schedule_affinities: vec![no_values],
                ..Default::default()
            },
            ErrorCode::ParamInvalid,
            &[
                "schedule_affinities[0].label_operators[0]",
                "at least one value",
            ],
        );
        let mut empty_key = good.clone();
        empty_key.label_operators[1].key.clear();
        expect_err(
            &InvokeOptions {
                schedule_affinities: vec![empty_key],
                ..Default::default()
            },
            ErrorCode::ParamInvalid,
            &["label_operators[1]", "empty key"],
        );
        expect_err(
            &InvokeOptions {
                schedule_affinities: vec![Affinity::default()],
                ..Default::default()
            },
            ErrorCode::ParamInvalid,
            &["no label_operators"],
        );
    }

    #[test]
    fn names_and_namespaces() {
        ok(&InvokeOptions {
            name: Some("actor".into()),
            namespace: Some("ns".into()),
            get_if_exists: true,
            ..Default::default()
        });
        expect_err(
            &InvokeOptions {
                namespace: Some("ns".into()),
                ..Default::default()
            },
            ErrorCode::ParamInvalid,
            &["namespace is set but name is not"],
        );
        expect_err(
            &InvokeOptions {
                get_if_exists: true,
                ..Default::default()
            },
            ErrorCode::ParamInvalid,
            &["get_if_exists", "set name"],
        );
        expect_err(
            &InvokeOptions {
                name: Some(String::new()),
                ..Default::default()
            },
            ErrorCode::ParamInvalid,
            &["name is an empty string"],
        );
        expect_err(
            &InvokeOptions {
                name: Some("a".into()),
                namespace: Some(String::new()),
                ..Default::default()
            },
            ErrorCode::ParamInvalid,
            &["namespace is an empty string"],
        );
        expect_err(
            &InvokeOptions {
                group_name: Some(String::new()),
                ..Default::default()
            },
            ErrorCode::ParamInvalid,
            &["group_name is an empty string"],
        );
    }

    #[test]
    fn instance_id_for_name() {
        let mut opts = InvokeOptions::default();
        assert_eq!(opts.instance_id_for_name(), None);
        opts.name = Some("actor".into());
        assert_eq!(opts.instance_id_for_name().as_deref(), Some("actor"));
        opts.namespace = Some("ns".into());
        assert_eq!(opts.instance_id_for_name().as_deref(), Some("ns-actor"));
    }

    #[test]
    fn bundle_index() {
        for bundle_index in [-1, 0, 7] {
            let mut opts = InvokeOptions::default();
            opts.resource_group_options.resource_group_name = "rg".into();
            opts.resource_group_options.bundle_index = bundle_index;
            ok(&opts);
        }
        let mut opts = InvokeOptions::default();
        opts.resource_group_options.bundle_index = -2;
        expect_err(
            &opts,
            ErrorCode::ParamInvalid,
            &[
                "bundle_index -2",
                "-1 (any bundle) or [0, number of bundles)",
            ],
        );
    }

    #[test]
    fn timeouts_and_retry_bounds() {
        ok(&InvokeOptions {
            schedule_timeout_ms: 1,
            timeout_s: 1,
            max_retry_time: 0,
            ..Default::default()
        });
        expect_err(
            &InvokeOptions {
                schedule_timeout_ms: 0,
                ..Default::default()
            },
            ErrorCode::ParamInvalid,
            &["schedule_timeout_ms 0", "[1, "],
        );
        for timeout_s in [0, -2] {
            expect_err(
                &InvokeOptions {
                    timeout_s,
                    ..Default::default()
                },
                ErrorCode::ParamInvalid,
                &[&format!("timeout_s {timeout_s}"), "-1 (no timeout) or [1, "],
            );
        }
        expect_err(
            &InvokeOptions {
                max_retry_time: -2,
                ..Default::default()
            },
            ErrorCode::ParamInvalid,
            &["max_retry_time -2", "-1 (unbounded) or [0, "],
        );
        expect_err(
            &InvokeOptions {
                retry_times: MAX_OPTION_COUNT + 1,
                ..Default::default()
            },
            ErrorCode::ParamInvalid,
            &["retry_times 2147483648", "[0, 2147483647]"],
        );
        ok(&InvokeOptions {
            retry_times: MAX_OPTION_COUNT,
            ..Default::default()
        });
        expect_err(
            &InvokeOptions {
                min_instances: 3,
                max_instances: 2,
                ..Default::default()
            },
            ErrorCode::ParamInvalid,
            &["min_instances 3", "max_instances (2)"],
        );
        ok(&InvokeOptions {
            min_instances: 3,
            max_instances: 0,
            ..Default::default()
        });
    }

    #[test]
    fn duration_helpers() {
        let opts = InvokeOptions::default();
        assert_eq!(opts.schedule_timeout(), Duration::from_secs(30));
        assert_eq!(opts.timeout(), None);
        assert_eq!(opts.graceful_shutdown_time(), Duration::from_secs(30));
        let mut opts = InvokeOptions {
            timeout_s: 5,
            ..Default::default()
        };
        assert_eq!(opts.timeout(), Some(Duration::from_secs(5)));
        opts.custom_extensions
            .insert(EXT_GRACEFUL_SHUTDOWN_TIME.into(), "0".into());
        assert_eq!(opts.graceful_shutdown_time(), Duration::ZERO);
        opts.custom_extensions
            .insert(EXT_GRACEFUL_SHUTDOWN_TIME.into(), "12".into());
        assert_eq!(opts.graceful_shutdown_time(), Duration::from_secs(12));
    }

    #[test]
    fn custom_extensions() {
        let mut opts = InvokeOptions::default();
        assert!(!opts.is_detached());
        opts.custom_extensions
            .insert(EXT_LIFECYCLE.into(), LIFECYCLE_DETACHED.into());
        opts.custom_extensions
            .insert(EXT_GRACEFUL_SHUTDOWN_TIME.into(), "0".into());
        opts.custom_extensions
            .insert(EXT_CONCURRENCY.into(), "1000".into());
        opts.custom_extensions
            .insert(EXT_RECOVER_RETRY_TIMEOUT.into(), "600000".into());
        opts.custom_extensions
            .insert(EXT_DELEGATE_DIRECTORY_QUOTA.into(), "-1".into());
        opts.custom_extensions
            .insert("YR_Metrics".into(), "{}".into());
        ok(&opts);
        assert!(opts.is_detached());

        let cases: [(&str, &str, &[&str]); 9] = [
            (
                EXT_GRACEFUL_SHUTDOWN_TIME,
                "-1",
                &["GRACEFUL_SHUTDOWN_TIME", "[0, "],
            ),
            (
                EXT_GRACEFUL_SHUTDOWN_TIME,
                "abc",
                &["\"abc\"", "whole number of seconds"],
            ),
            (EXT_CONCURRENCY, "0", &["Concurrency", "[1, 1000]"]),
            (EXT_CONCURRENCY, "1001", &["1001", "[1, 1000]"]),
            (EXT_CONCURRENCY, "many", &["\"many\"", "[1, 1000]"]),
            (EXT_LIFECYCLE, "detatched", &["lifecycle", "\"detached\""]),
            (
                EXT_RECOVER_RETRY_TIMEOUT,
                "0",
                &["RECOVER_RETRY_TIMEOUT", "[1, "],
            ),
            (
                EXT_DELEGATE_DIRECTORY_QUOTA,
                "0",
                &["DELEGATE_DIRECTORY_QUOTA", "(0, 1048576)"],
            ),
            (
                EXT_DELEGATE_DIRECTORY_QUOTA,
                "1048576",
                &["-1 (unmonitored)"],
            ),
        ];
        for (key, value, needles) in cases {
            let mut opts = InvokeOptions::default();
            opts.custom_extensions.insert(key.into(), value.into());
            expect_err(&opts, ErrorCode::ParamInvalid, needles);
        }
    }

    #[test]
    fn function_group_options() {
        let group = FunctionGroupOptions {
            cpu: Some(1000),
            memory: Some(1024),
            concurrency: Some(2),
            timeout_s: Some(-1),
            scheduling_affinity_each_bundle_size: Some(4),
            scheduling_affinity_type: Some(SchedulingAffinityType::RequiredAffinityInEachBundle),
            ..Default::default()
        };
        ok(&InvokeOptions {
            function_group_options: Some(group.clone()),
            ..Default::default()
        });
        let bad_cpu = FunctionGroupOptions {
            cpu: Some(100),
            ..group.clone()
        };
        expect_err(
            &InvokeOptions {
                function_group_options: Some(bad_cpu),
                ..Default::default()
            },
            ErrorCode::ResourceConfigError,
            &["function_group_options.cpu", "[300, 16000]"],
        );
        let bad_timeout = FunctionGroupOptions {
            timeout_s: Some(-5),
            ..group.clone()
        };
        expect_err(
            &InvokeOptions {
                function_group_options: Some(bad_timeout),
                ..Default::default()
            },
            ErrorCode::ParamInvalid,
            &["function_group_options.timeout_s -5", "-1 (wait forever)"],
        );
        let bad_concurrency = FunctionGroupOptions {
            concurrency: Some(0),
            ..group
        };
        expect_err(
            &InvokeOptions {
                function_group_options: Some(bad_concurrency),
                ..Default::default()
            },
            ErrorCode::ParamInvalid,
            &["function_group_options.concurrency 0", "[1, 1000]"],
        );
    }

    #[test]
    fn misc_fields() {
        expect_err(
            &InvokeOptions {
                device: Some(Device::default()),
                ..Default::default()
            },
            ErrorCode::ParamInvalid,
            &["device.name"],
        );
        ok(&InvokeOptions {
            device: Some(Device {
                name: "NPU/Ascend910B4".into(),
                batch_size: 1,
            }),
            ..Default::default()
        });
        expect_err(
            &InvokeOptions {
                port_forwardings: vec![PortForwarding {
                    port: 0,
                    protocol: PortProtocol::Udp,
                }],
                ..Default::default()
            },
            ErrorCode::ParamInvalid,
            &["port 0", "[1, 65535]"],
        );
        let mut opts = InvokeOptions::default();
        opts.env_vars.insert("A=B".into(), "x".into());
        expect_err(&opts, ErrorCode::ParamInvalid, &["env_vars name \"A=B\""]);
        let mut opts = InvokeOptions::default();
        opts.env_vars.insert("OMP_NUM_THREADS".into(), "4".into());
        ok(&opts);
    }
}
