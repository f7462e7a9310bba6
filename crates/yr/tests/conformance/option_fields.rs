//! Every `InvokeOptions` field, set to something other than its default, is either honoured or
//! refused with 1001 naming the field, on the backend under test (docs/invoke-options.md has
//! the table). The walk is driven by [`FIELDS`]: a new field does not compile until it is listed
//! there, and the test fails until it has a case here.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use yr::{
    Affinity, AffinityKind, AffinityType, Device, ErrorCode, FunctionGroupOptions, InvokeOptions,
    LabelOp, LabelOperator, PortForwarding, ResourceGroupOptions,
};

use crate::support::{
    self, assert_error, backend, call_err, get, get_err, Backend, Marker, TIMEOUT,
};

/// The name of every field of `InvokeOptions`. The destructuring is exhaustive: a field added
/// to `InvokeOptions` is a compile error here until it is listed.
macro_rules! field_names {
    ($($field:ident),* $(,)?) => {{
        let InvokeOptions { $($field: _),* } = InvokeOptions::default();
        [$(stringify!($field)),*]
    }};
}

fn fields() -> Vec<&'static str> {
    field_names!(
        cpu,
        cpu_limit,
        memory,
        mem_limit,
        concurrency,
        custom_resources,
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
        max_instances,
        recover_retry_times,
        need_order,
        name,
        namespace,
        resource_group_options,
        function_group_options,
        env_vars,
        retry_times,
        trace_id,
        alias_params,
        runtime_env,
        debug,
        preempted_allowed,
        instance_priority,
        schedule_timeout_ms,
        group_name,
        idle_timeout_s,
        is_delete_remote_tensor,
        bypass_datasystem,
        skip_serialize,
        port_forwardings,
        get_if_exists,
        priority,
        max_retry_time,
        timeout_s,
        always_local_mode,
    )
    .to_vec()
}

// ----- user code the cases call -------------------------------------------------------------

/// This process's id: the driver's in local mode, a runtime's on a cluster.
#[yr::invoke]
fn pid() -> u32 {
    std::process::id()
}

/// The value of the environment variable `name` where the call runs.
#[yr::invoke]
fn env_of(name: String) -> Option<String> {
    std::env::var(name).ok()
}

/// Marks `marker` "in" while it runs for `ms`; returns how many other calls were inside then.
#[yr::invoke]
fn inside(marker: String, ms: u64) -> usize {
    let lines = |marker: &str| {
        let lines = std::fs::read_to_string(marker).unwrap_or_default();
        let ins = lines.lines().filter(|l| *l == "in").count();
        let outs = lines.lines().filter(|l| *l == "out").count();
        ins - outs
    };
    support::record(&marker, "in");
    let others = lines(&marker) - 1;
    std::thread::sleep(Duration::from_millis(ms));
    let others = others.max(lines(&marker) - 1);
    support::record(&marker, "out");
    others
}

/// Returns `value` once `marker` has a line (at most 10 s).
#[yr::invoke]
fn when_marked(marker: String, value: i64) -> i64 {
    let deadline = Instant::now() + TIMEOUT;
    while std::fs::read_to_string(&marker)
        .unwrap_or_default()
        .is_empty()
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    value
}

/// In a cluster runtime: counts an attempt, then ends the runtime's process (1007 for the
/// call). In local mode it only counts.
#[yr::invoke]
fn end_runtime(marker: String) -> u32 {
    support::hit(&marker);
    if std::env::var("YR_RUNTIME_MODE").as_deref() == Ok("1") {
        std::process::exit(0);
    }
    0
}

/// An instance for the cases.
#[yr::instance]
pub struct Probe {
    calls: u64,
}

#[yr::instance]
impl Probe {
    pub fn new() -> Self {
        Probe { calls: 0 }
    }

    pub fn echo(&mut self, value: i64) -> i64 {
        self.calls += 1;
        value
    }

    pub fn calls(&self) -> u64 {
        self.calls
    }

    pub fn env_of(&self, name: String) -> Option<String> {
        std::env::var(name).ok()
    }

    /// Waits (at most 10 s) until `parties` calls have entered; whether they all did.
    pub fn meet(&self, marker: String, parties: usize) -> bool {
        support::hit(&marker);
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            let count = std::fs::read_to_string(&marker)
                .unwrap_or_default()
                .lines()
                .count();
            if count >= parties {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// The first call (counted in `marker`) aborts the runtime's process on a cluster.
    pub fn crash_once(&mut self, marker: String) -> u64 {
        self.calls += 1;
        if support::hit(&marker) == 1 && std::env::var("YR_RUNTIME_MODE").as_deref() == Ok("1") {
            std::process::abort();
        }
        self.calls
    }
}

// ----- what a case checks --------------------------------------------------------------------

/// The error a stateless call with `options` fails with (at submission or on `get`).
fn function_error(options: &InvokeOptions) -> yr::Error {
    call_err(yr::function(pid).options(options.clone()).invoke(()))
}

/// The error an instance created with `options` fails with (at creation or on its first call).
fn instance_error(options: &InvokeOptions) -> yr::Error {
    match yr::instance(Probe::new).options(options.clone()).invoke(()) {
        Err(error) => error,
        Ok(probe) => call_err(probe.method(Probe::echo).invoke((1,))),
    }
}

/// A stateless call with `options` runs.
fn function_runs(options: &InvokeOptions) {
    let ran = yr::function(pid)
        .options(options.clone())
        .invoke(())
        .unwrap();
    get(&ran);
}

/// An instance created with `options` runs calls; returns it.
fn instance_runs(options: &InvokeOptions) -> yr::InstanceHandle<Probe> {
    let probe = yr::instance(Probe::new)
        .options(options.clone())
        .invoke(())
        .unwrap();
    assert_eq!(get(&probe.method(Probe::echo).invoke((7,)).unwrap()), 7);
    probe
}

/// yr does not support `field` yet: both uses fail with 1001 naming it.
fn refused(field: &str, options: InvokeOptions) {
    for error in [function_error(&options), instance_error(&options)] {
        assert_error(
            &error,
            ErrorCode::ParamInvalid,
            &[field, "yr does not support"],
        );
    }
}

/// `field` means nothing for a stateless call: it fails with 1001 naming it.
fn refused_for_functions(field: &str, options: &InvokeOptions) {
    assert_error(
        &function_error(options),
        ErrorCode::ParamInvalid,
        &[field, "a stateless function call"],
    );
}

/// `field` means nothing for an instance: its creation fails with 1001 naming it.
fn refused_for_instances(field: &str, options: &InvokeOptions) {
    assert_error(&instance_error(options), ErrorCode::ParamInvalid, &[field]);
}

fn on_cluster() -> bool {
    backend() == Backend::Cluster
}

fn resource_affinity(affinity_type: AffinityType, op: LabelOp, values: &[&str]) -> Affinity {
    Affinity {
        affinity_kind: AffinityKind::Resource,
        affinity_type,
        label_operators: vec![LabelOperator {
            op,
            key: "conformance-zone".into(),
            values: values.iter().map(|v| v.to_string()).collect(),
        }],
        ..Default::default()
    }
}

// ----- the cases ---------------------------------------------------------------------------

/// The fields a check covers, and the check.
type Case = (&'static [&'static str], fn());

fn cases() -> Vec<Case> {
    vec![
        (&["cpu", "memory"], cpu_and_memory_are_placement_requests),
        (&["cpu_limit"], || {
            refused(
                "cpu_limit",
                InvokeOptions {
                    cpu_limit: 1_000,
                    ..Default::default()
                },
            )
        }),
        (&["mem_limit"], || {
            refused(
                "mem_limit",
                InvokeOptions {
                    mem_limit: 1_000,
                    ..Default::default()
                },
            )
        }),
        (&["concurrency"], concurrency_lets_calls_run_at_once),
        (
            &["custom_resources"],
            custom_resources_are_placement_requests,
        ),
        (
            &["custom_extensions"],
            custom_extensions_yr_knows_are_taken_others_refused,
        ),
        (&["pod_labels"], || {
            refused(
                "pod_labels",
                InvokeOptions {
                    pod_labels: BTreeMap::from([("app".into(), "web".into())]),
                    ..Default::default()
                },
            )
        }),
        (&["labels"], || {
            refused(
                "labels",
                InvokeOptions {
                    labels: vec!["team:a".into()],
                    ..Default::default()
                },
            )
        }),
        (&["affinity"], || {
            refused(
                "affinity",
                InvokeOptions {
                    affinity: BTreeMap::from([("k".into(), "v".into())]),
                    ..Default::default()
                },
            )
        }),
        (
            &["schedule_affinities", "schedule_timeout_ms"],
            required_resource_affinities_place_the_rest_are_refused,
        ),
        (&["preferred_priority"], || {
            refused(
                "preferred_priority",
                InvokeOptions {
                    preferred_priority: false,
                    ..Default::default()
                },
            )
        }),
        (&["required_priority"], || {
            refused(
                "required_priority",
                InvokeOptions {
                    required_priority: true,
                    ..Default::default()
                },
            )
        }),
        (&["preferred_anti_other_labels"], || {
            refused(
                "preferred_anti_other_labels",
                InvokeOptions {
                    preferred_anti_other_labels: true,
                    ..Default::default()
                },
            )
        }),
        (&["is_data_affinity"], || {
            refused(
                "is_data_affinity",
                InvokeOptions {
                    is_data_affinity: true,
                    ..Default::default()
                },
            )
        }),
        (&["device"], || {
            refused(
                "device",
                InvokeOptions {
                    device: Some(Device {
                        name: "NPU/Ascend910B4".into(),
                        batch_size: 1,
                    }),
                    ..Default::default()
                },
            )
        }),
        (&["max_invoke_latency_ms"], || {
            refused(
                "max_invoke_latency_ms",
                InvokeOptions {
                    max_invoke_latency_ms: 100,
                    ..Default::default()
                },
            )
        }),
        (&["min_instances"], || {
            refused(
                "min_instances",
                InvokeOptions {
                    min_instances: 1,
                    ..Default::default()
                },
            )
        }),
        (
            &["max_instances"],
            max_instances_bounds_the_calls_of_a_shape,
        ),
        (
            &["recover_retry_times"],
            recover_retry_times_restarts_a_crashed_instance,
        ),
        (&["need_order"], need_order_false_lets_ready_calls_overtake),
        (
            &["name", "namespace", "get_if_exists"],
            names_find_instances,
        ),
        (&["resource_group_options"], || {
            refused(
                "resource_group_options",
                InvokeOptions {
                    resource_group_options: ResourceGroupOptions {
                        resource_group_name: "rg".into(),
                        bundle_index: 0,
                    },
                    ..Default::default()
                },
            )
        }),
        (&["function_group_options"], || {
            refused(
                "function_group_options",
                InvokeOptions {
                    function_group_options: Some(FunctionGroupOptions::default()),
                    ..Default::default()
                },
            )
        }),
        (&["env_vars"], env_vars_reach_the_code),
        (
            &["retry_times", "max_retry_time"],
            retries_rerun_stateless_calls,
        ),
        (&["trace_id"], || {
            refused(
                "trace_id",
                InvokeOptions {
                    trace_id: "trace-1".into(),
                    ..Default::default()
                },
            )
        }),
        (&["alias_params"], || {
            refused(
                "alias_params",
                InvokeOptions {
                    alias_params: BTreeMap::from([("version".into(), "1".into())]),
                    ..Default::default()
                },
            )
        }),
        (&["runtime_env"], || {
            refused(
                "runtime_env",
                InvokeOptions {
                    runtime_env: BTreeMap::from([("pip".into(), "numpy".into())]),
                    ..Default::default()
                },
            )
        }),
        (&["debug"], || {
            refused(
                "debug",
                InvokeOptions {
                    debug: true,
                    ..Default::default()
                },
            )
        }),
        (&["preempted_allowed"], || {
            refused(
                "preempted_allowed",
                InvokeOptions {
                    preempted_allowed: true,
                    ..Default::default()
                },
            )
        }),
        (&["instance_priority"], || {
            refused(
                "instance_priority",
                InvokeOptions {
                    instance_priority: 1,
                    ..Default::default()
                },
            )
        }),
        (&["group_name"], || {
            refused(
                "group_name",
                InvokeOptions {
                    group_name: Some("gang".into()),
                    ..Default::default()
                },
            )
        }),
        (&["idle_timeout_s"], idle_instances_are_evicted),
        (&["is_delete_remote_tensor"], || {
            refused(
                "is_delete_remote_tensor",
                InvokeOptions {
                    is_delete_remote_tensor: true,
                    ..Default::default()
                },
            )
        }),
        (&["bypass_datasystem"], || {
            refused(
                "bypass_datasystem",
                InvokeOptions {
                    bypass_datasystem: true,
                    ..Default::default()
                },
            )
        }),
        (&["skip_serialize"], || {
            refused(
                "skip_serialize",
                InvokeOptions {
                    skip_serialize: true,
                    ..Default::default()
                },
            )
        }),
        (&["port_forwardings"], || {
            refused(
                "port_forwardings",
                InvokeOptions {
                    port_forwardings: vec![PortForwarding {
                        port: 8080,
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )
        }),
        (&["priority"], || {
            refused(
                "priority",
                InvokeOptions {
                    priority: 1,
                    ..Default::default()
                },
            )
        }),
        (&["timeout_s"], timeout_s_abandons_a_slow_call),
        (
            &["always_local_mode"],
            always_local_mode_runs_calls_in_this_process,
        ),
    ]
}

/// Cluster: placement reserves cpu and memory, and a request larger than every node fails
/// with 1006 naming it. Local mode has nothing to place: the calls run.
fn cpu_and_memory_are_placement_requests() {
    let huge = InvokeOptions {
        cpu: 16_000,
        memory: 1_048_576,
        ..Default::default()
    };
    if on_cluster() {
        let needles = ["cpu: 16000m", "memory: 1048576MB"];
        assert_error(
            &function_error(&huge),
            ErrorCode::ResourceConfigError,
            &needles,
        );
        assert_error(
            &instance_error(&huge),
            ErrorCode::ResourceConfigError,
            &needles,
        );
    } else {
        function_runs(&huge);
        instance_runs(&huge);
    }
}

fn custom_resources_are_placement_requests() {
    let options = InvokeOptions {
        custom_resources: BTreeMap::from([("conformance-gpu".into(), 1.0)]),
        ..Default::default()
    };
    if on_cluster() {
        let needles = ["conformance-gpu: 1"];
        assert_error(
            &function_error(&options),
            ErrorCode::ResourceConfigError,
            &needles,
        );
        assert_error(
            &instance_error(&options),
            ErrorCode::ResourceConfigError,
            &needles,
        );
    } else {
        function_runs(&options);
        instance_runs(&options);
    }
}

fn concurrency_lets_calls_run_at_once() {
    let marker = Marker::new("concurrency");
    let probe = instance_runs(&InvokeOptions {
        concurrency: 2,
        ..Default::default()
    });
    let calls: Vec<_> = (0..2)
        .map(|_| {
            probe
                .method(Probe::meet)
                .invoke((marker.path(), 2))
                .unwrap()
        })
        .collect();
    assert_eq!(yr::get_all(&calls, TIMEOUT).unwrap(), vec![true, true]);
}

fn custom_extensions_yr_knows_are_taken_others_refused() {
    // Concurrency (agreeing with the field), lifecycle and GRACEFUL_SHUTDOWN_TIME are taken
    // (the lifecycle suite checks the grace period and detached instances).
    let mut taken = InvokeOptions {
        concurrency: 2,
        ..Default::default()
    };
    taken
        .custom_extensions
        .insert("Concurrency".into(), "2".into());
    taken
        .custom_extensions
        .insert("GRACEFUL_SHUTDOWN_TIME".into(), "1".into());
    instance_runs(&taken);
    // Instance-only keys mean nothing for a stateless call.
    refused_for_functions("GRACEFUL_SHUTDOWN_TIME", &taken);
    let mut disagreeing = InvokeOptions::default();
    disagreeing
        .custom_extensions
        .insert("Concurrency".into(), "4".into());
    assert_error(
        &instance_error(&disagreeing),
        ErrorCode::ParamInvalid,
        &["Concurrency", "disagrees with concurrency = 1"],
    );
    for key in ["YR_Metrics", "DELEGATE_DIRECTORY_INFO", "anything"] {
        let mut options = InvokeOptions::default();
        options.custom_extensions.insert(key.into(), "x".into());
        refused(key, options);
    }
}

/// Required affinities on node labels: one that no node admits waits its
/// `schedule_timeout_ms` and fails with 1017 naming it; one every node admits runs. Local mode
/// has no nodes to choose: both run. Preferred and instance affinities are refused.
fn required_resource_affinities_place_the_rest_are_refused() {
    let nowhere = InvokeOptions {
        schedule_affinities: vec![resource_affinity(
            AffinityType::Required,
            LabelOp::In,
            &["nowhere"],
        )],
        schedule_timeout_ms: 300,
        ..Default::default()
    };
    let anywhere = InvokeOptions {
        schedule_affinities: vec![resource_affinity(
            AffinityType::RequiredAnti,
            LabelOp::In,
            &["nowhere"],
        )],
        ..Default::default()
    };
    if on_cluster() {
        let needles = [
            "within 300 ms",
            "does not admit required conformance-zone in [nowhere]",
        ];
        assert_error(
            &instance_error(&nowhere),
            ErrorCode::ScheduleCanceled,
            &needles,
        );
        assert_error(
            &function_error(&nowhere),
            ErrorCode::ScheduleCanceled,
            &needles,
        );
    } else {
        function_runs(&nowhere);
        instance_runs(&nowhere);
    }
    function_runs(&anywhere);
    instance_runs(&anywhere);
    refused(
        "affinity_type = Preferred",
        InvokeOptions {
            schedule_affinities: vec![resource_affinity(
                AffinityType::Preferred,
                LabelOp::Exists,
                &[],
            )],
            ..Default::default()
        },
    );
    let mut instance_kind = resource_affinity(AffinityType::Required, LabelOp::Exists, &[]);
    instance_kind.affinity_kind = AffinityKind::Instance;
    refused(
        "affinity_kind = Instance",
        InvokeOptions {
            schedule_affinities: vec![instance_kind],
            ..Default::default()
        },
    );
}

/// At most `max_instances` (× concurrency) calls of one shape run at once; instances have no
/// such bound (1001).
fn max_instances_bounds_the_calls_of_a_shape() {
    let options = InvokeOptions {
        max_instances: 1,
        ..Default::default()
    };
    let marker = Marker::new("max-instances");
    let calls: Vec<_> = (0..4)
        .map(|_| {
            yr::function(inside)
                .options(options.clone())
                .invoke((marker.path(), 50))
                .unwrap()
        })
        .collect();
    assert_eq!(yr::get_all(&calls, TIMEOUT).unwrap(), vec![0; 4]);
    let pids: Vec<_> = (0..3)
        .map(|_| {
            yr::function(pid)
                .options(options.clone())
                .invoke(())
                .unwrap()
        })
        .collect();
    let pids = yr::get_all(&pids, TIMEOUT).unwrap();
    assert!(pids.iter().all(|p| *p == pids[0]), "{pids:?}");
    refused_for_instances("max_instances", &options);
}

/// Cluster: a runtime that crashes is restarted and the call replayed. Local mode has no
/// runtime process to restart (a crash ends the driver): the instance runs.
fn recover_retry_times_restarts_a_crashed_instance() {
    let options = InvokeOptions {
        recover_retry_times: 1,
        ..Default::default()
    };
    let probe = instance_runs(&options);
    let marker = Marker::new("recover");
    let calls = get(&probe
        .method(Probe::crash_once)
        .invoke((marker.path(),))
        .unwrap());
    if on_cluster() {
        // The replay ran on a new runtime, whose state started afresh.
        assert_eq!((marker.count(), calls), (2, 1));
    } else {
        assert_eq!((marker.count(), calls), (1, 2));
    }
    function_runs(&options);
}

/// `need_order: Some(false)`: a call whose arguments are ready runs before an earlier call that
/// waits for its own. `Some(true)` with concurrency above 1 is refused, as is need_order on a
/// stateless call.
fn need_order_false_lets_ready_calls_overtake() {
    for ordered in [false, true] {
        let probe = instance_runs(&InvokeOptions {
            need_order: Some(ordered),
            ..Default::default()
        });
        let release = Marker::new("need-order");
        let late = yr::function(when_marked)
            .invoke((release.path(), 1))
            .unwrap();
        let first = probe.method(Probe::echo).invoke((&late,)).unwrap();
        let second = probe.method(Probe::echo).invoke((2,)).unwrap();
        let overtook = yr::wait(std::slice::from_ref(&second), 1, Duration::from_millis(500))
            .unwrap()
            .0
            .len()
            == 1;
        assert_eq!(overtook, !ordered, "need_order = {ordered:?}");
        support::record(&release.path(), "go");
        assert_eq!((get(&first), get(&second)), (1, 2));
    }
    refused_for_instances(
        "need_order",
        &InvokeOptions {
            need_order: Some(true),
            concurrency: 2,
            ..Default::default()
        },
    );
    refused_for_functions(
        "need_order",
        &InvokeOptions {
            need_order: Some(false),
            ..Default::default()
        },
    );
}

/// Named instances are found by name; creating one again (with or without get_if_exists)
/// returns the existing one. Stateless calls have no names (1001).
fn names_find_instances() {
    let name = support::unique("named");
    let options = InvokeOptions {
        name: Some(name.clone()),
        namespace: Some("conformance".into()),
        ..Default::default()
    };
    let first = instance_runs(&options);
    let again = yr::instance(Probe::new)
        .options(InvokeOptions {
            get_if_exists: true,
            ..options.clone()
        })
        .invoke(())
        .unwrap();
    assert_eq!(again.id(), first.id());
    assert_eq!(get(&again.method(Probe::calls).invoke(()).unwrap()), 1);
    let found = yr::get_instance::<Probe>(&name, "conformance", TIMEOUT).unwrap();
    assert_eq!(found.id(), first.id());
    refused_for_functions("name", &options);
    first.terminate_sync().unwrap();
}

/// Cluster: the runtime starts with `env_vars`. Local mode runs the code in the driver's
/// process: taken when the driver has them, refused (1001) otherwise.
fn env_vars_reach_the_code() {
    let variable = "CONFORMANCE_OPTION_ENV";
    let options = InvokeOptions {
        env_vars: BTreeMap::from([(variable.into(), "from-options".into())]),
        ..Default::default()
    };
    if !on_cluster() {
        std::env::remove_var(variable);
        assert_error(
            &function_error(&options),
            ErrorCode::ParamInvalid,
            &["env_vars", variable, "yr does not support"],
        );
        std::env::set_var(variable, "from-options");
    }
    let value = yr::function(env_of)
        .options(options.clone())
        .invoke((variable.to_string(),))
        .unwrap();
    assert_eq!(get(&value).as_deref(), Some("from-options"));
    let probe = instance_runs(&options);
    let value = probe
        .method(Probe::env_of)
        .invoke((variable.to_string(),))
        .unwrap();
    assert_eq!(get(&value).as_deref(), Some("from-options"));
    // Without the option the cluster's code does not see it.
    if on_cluster() {
        let value = yr::function(env_of)
            .invoke((variable.to_string(),))
            .unwrap();
        assert_eq!(get(&value), None);
    }
    std::env::remove_var(variable);
}

/// retry_times reruns failed calls (the functions suite has the details); max_retry_time
/// bounds the retries of codes yr always retries, such as a runtime that exits (1007, cluster
/// only: in local mode the call runs in the driver). Instances have neither (1001).
fn retries_rerun_stateless_calls() {
    let marker = Marker::new("max-retry");
    let options = InvokeOptions {
        max_retry_time: 1,
        ..Default::default()
    };
    let ended = yr::function(end_runtime)
        .options(options.clone())
        .invoke((marker.path(),))
        .unwrap();
    if on_cluster() {
        assert_error(&get_err(&ended), ErrorCode::InstanceExited, &[]);
        assert_eq!(marker.count(), 2, "one attempt and one retry");
    } else {
        get(&ended);
    }
    refused_for_instances("max_retry_time", &options);
    refused_for_instances(
        "retry_times",
        &InvokeOptions {
            retry_times: 1,
            ..Default::default()
        },
    );
}

/// An instance without calls for idle_timeout_s is evicted: its calls fail with 1013. Stateless
/// instances are released after Config::recycle_time instead (1001).
fn idle_instances_are_evicted() {
    let options = InvokeOptions {
        idle_timeout_s: 1,
        ..Default::default()
    };
    let probe = instance_runs(&options);
    let deadline = Instant::now() + TIMEOUT;
    let mut attempt = 0;
    let error = loop {
        // Each call that still runs makes the instance busy again: wait longer each time.
        attempt += 1;
        std::thread::sleep(Duration::from_millis(1_200 * attempt));
        let echoed = probe.method(Probe::echo).invoke((1,));
        match echoed.and_then(|echoed| yr::get(&echoed, TIMEOUT)) {
            Err(error) => break error,
            Ok(_) => assert!(
                Instant::now() < deadline,
                "the idle instance was not evicted"
            ),
        }
    };
    assert_error(&error, ErrorCode::InstanceEvicted, &["idle_timeout_s"]);
    refused_for_functions("idle_timeout_s", &options);
}

/// A stateless call not finished within timeout_s fails with 4005; instances have no create
/// timeout (1001).
fn timeout_s_abandons_a_slow_call() {
    let options = InvokeOptions {
        timeout_s: 1,
        ..Default::default()
    };
    let started = Instant::now();
    let slow = yr::function(support::slow)
        .options(options.clone())
        .invoke((1, 5_000))
        .unwrap();
    assert_error(
        &get_err(&slow),
        ErrorCode::GetOperationFailed,
        &["support::slow", "timeout_s of 1 s"],
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let fast = yr::function(support::add)
        .options(options.clone())
        .invoke((1, 2))
        .unwrap();
    assert_eq!(get(&fast), 3);
    refused_for_instances("timeout_s", &options);
}

/// The call runs on this process's thread pool, on a cluster too; instances cannot (1001).
fn always_local_mode_runs_calls_in_this_process() {
    let options = InvokeOptions {
        always_local_mode: true,
        ..Default::default()
    };
    let ran_in = yr::function(pid)
        .options(options.clone())
        .invoke(())
        .unwrap();
    assert_eq!(get(&ran_in), std::process::id());
    refused_for_instances("always_local_mode", &options);
}

#[test]
fn every_invoke_options_field_is_honoured_or_refused() {
    let cases = cases();
    for field in fields() {
        assert!(
            cases.iter().any(|(covered, _)| covered.contains(&field)),
            "InvokeOptions::{field} has no case: decide whether yr honours it (and test \
             that) or refuses it, here and in docs/invoke-options.md"
        );
    }
    for (covered, _) in &cases {
        for name in covered.iter() {
            assert!(
                fields().contains(name),
                "{name} is not a field of InvokeOptions"
            );
        }
    }
    for (covered, check) in cases {
        // A session per check: what one check leaves running (instances hold the node's
        // resources) is gone before the next.
        let _session = support::session();
        eprintln!("InvokeOptions::{}", covered.join(", "));
        check();
    }
}

#[test]
fn the_default_of_every_field_is_accepted_for_both_uses() {
    let _session = support::session();
    let defaults = InvokeOptions::default();
    function_runs(&defaults);
    instance_runs(&defaults);
}
