//! The functions of `yr._yr` that `yr`'s pure-Python layer calls: lifecycle, objects, calls and
//! instances, each a thin step into `yr_runtime` with the GIL released while the core waits or
//! talks to the node. Arguments arrive checked by the Python layer where openYuanrong checks
//! them in Python (`timeout` ranges, `None` for `put`); everything else the core checks.

use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use yr_common::{Config, Error, ErrorCode, InvokeOptions};
use yr_runtime::function::{Arg, CreateSpec, MethodSpec, TaskSpec};
use yr_runtime::kv::{CacheType, Existence, SetParam, WriteMode};
use yr_runtime::object_store::{ObjectHandle, Outcome};

use crate::calls::{function_entry, ASYNC_METHOD_ENTRY, CONSTRUCTOR_ENTRY, METHOD_ENTRY};
use crate::errors::{to_py, OrRaise};
use crate::values::{pack, unpack, ObjectRef, PreparedValue};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(init, m)?)?;
    m.add_function(wrap_pyfunction!(serve, m)?)?;
    m.add_function(wrap_pyfunction!(finalize, m)?)?;
    m.add_function(wrap_pyfunction!(is_initialized, m)?)?;
    m.add_function(wrap_pyfunction!(put, m)?)?;
    m.add_function(wrap_pyfunction!(get, m)?)?;
    m.add_function(wrap_pyfunction!(wait, m)?)?;
    m.add_function(wrap_pyfunction!(cancel, m)?)?;
    m.add_function(wrap_pyfunction!(invoke_function, m)?)?;
    m.add_function(wrap_pyfunction!(create_instance, m)?)?;
    m.add_function(wrap_pyfunction!(invoke_method, m)?)?;
    m.add_function(wrap_pyfunction!(terminate_instance, m)?)?;
    m.add_function(wrap_pyfunction!(get_named_instance, m)?)?;
    m.add_function(wrap_pyfunction!(list_named_instances, m)?)?;
    m.add_function(wrap_pyfunction!(validate_options, m)?)?;
    m.add_function(wrap_pyfunction!(call_options, m)?)?;
    m.add_class::<CallOptions>()?;
    m.add_function(wrap_pyfunction!(default_options, m)?)?;
    m.add_function(wrap_pyfunction!(kv_write, m)?)?;
    m.add_function(wrap_pyfunction!(kv_read, m)?)?;
    m.add_function(wrap_pyfunction!(kv_read_range, m)?)?;
    m.add_function(wrap_pyfunction!(kv_del, m)?)?;
    m.add_function(wrap_pyfunction!(kv_exist, m)?)?;
    Ok(())
}

pub(crate) fn runtime(py: Python<'_>) -> PyResult<Arc<yr_runtime::Runtime>> {
    yr_runtime::current().py_err(py, "yr is not running")
}

/// A `Duration` from seconds; `None` waits forever.
fn duration(seconds: Option<f64>) -> Duration {
    match seconds {
        Some(s) if s.is_finite() && s >= 0.0 => Duration::from_secs_f64(s),
        _ => Duration::MAX,
    }
}

/// The core's `Config` from the fields `yr.Config` checked: the defaults (and `YR_*`
/// environment variables), overridden by each field given.
fn config_from(fields: &Bound<'_, PyDict>) -> PyResult<Config> {
    let mut config = Config::default();
    for (key, value) in fields.iter() {
        let key: String = key.extract()?;
        match key.as_str() {
            "local_mode" => config.local_mode = value.extract()?,
            "server_address" => config.server_address = Some(value.extract()?),
            "ds_address" => config.ds_address = Some(value.extract()?),
            "job_id" => config.job_id = Some(value.extract()?),
            "ns" => config.namespace = Some(value.extract()?),
            "log_level" => config.log_level = value.extract()?,
            "log_dir" => config.log_dir = Some(value.extract::<String>()?.into()),
            "working_dir" => config.working_dir = Some(value.extract::<String>()?.into()),
            "recycle_time" => config.recycle_time = duration(Some(value.extract()?)),
            "rpc_timeout" => config.rpc_timeout = duration(Some(value.extract()?)),
            "max_task_instance_num" => config.max_task_instance_num = value.extract()?,
            "local_thread_pool_size" => config.local_thread_pool_size = value.extract()?,
            "tls" => {
                let tls: &Bound<'_, PyDict> = value.downcast()?;
                let path = |name: &str| -> PyResult<std::path::PathBuf> {
                    Ok(tls
                        .get_item(name)?
                        .map(|v| v.extract::<String>())
                        .transpose()?
                        .unwrap_or_default()
                        .into())
                };
                config.tls = Some(yr_common::config::TlsFiles {
                    certificate: path("certificate")?,
                    private_key: path("private_key")?,
                    ca: path("ca")?,
                    server_name: tls
                        .get_item("server_name")?
                        .map(|v| v.extract::<Option<String>>())
                        .transpose()?
                        .flatten(),
                });
            }
            "deployment" => {
                let deployment: &Bound<'_, PyDict> = value.downcast()?;
                let number = |name: &str| -> PyResult<Option<u64>> {
                    Ok(deployment
                        .get_item(name)?
                        .map(|v| v.extract::<Option<u64>>())
                        .transpose()?
                        .flatten())
                };
                config.deployment = Some(yr_common::config::Deployment {
                    cpu_millicores: number("cpu_millicores")?,
                    memory_mb: number("memory_mb")?,
                    shared_memory_mb: number("shared_memory_mb")?,
                    spill_dir: deployment
                        .get_item("spill_dir")?
                        .map(|v| v.extract::<Option<String>>())
                        .transpose()?
                        .flatten()
                        .map(Into::into),
                    spill_limit_mb: number("spill_limit_mb")?,
                });
            }
            "token" => {
                let text: String = value.extract()?;
                let token = yr_common::auth::ClusterToken::parse(&text)
                    .map_err(Error::from)
                    .py_err(fields.py(), "failed to init")?;
                config.token = Some(token);
            }
            _ => {
                return Err(to_py(
                    fields.py(),
                    &Error::new(
                        ErrorCode::ParamInvalid,
                        format!("yr.Config has no field {key:?} that yr's core takes"),
                    ),
                    "failed to init",
                ))
            }
        }
    }
    Ok(config)
}

/// Initialize yr in this driver. Runtimes of this driver run `executable` (the interpreter, as
/// `sys.executable` names it) with `-m yr._runtime`.
#[pyfunction]
fn init(py: Python<'_>, fields: &Bound<'_, PyDict>, executable: String) -> PyResult<String> {
    let config = config_from(fields)?;
    yr_runtime::cluster::set_runtime_command(
        executable.into(),
        vec!["-m".to_string(), "yr._runtime".to_string()],
    );
    let info = py
        .allow_threads(|| yr_runtime::init(config))
        .py_err(py, "failed to init")?;
    Ok(info.job_id)
}

/// Serve as a runtime the node started (`python -m yr._runtime`); never returns there. In any
/// other process it is a usage error.
#[pyfunction]
fn serve(py: Python<'_>) -> PyResult<()> {
    if yr_runtime::cluster::runtime_mode::RuntimeEnv::from_env().is_none() {
        return Err(to_py(
            py,
            &Error::new(
                ErrorCode::IncorrectInitUsage,
                "yr._runtime runs only in a runtime process a node started; use yr.init in a \
                 driver",
            ),
            "failed to start the runtime",
        ));
    }
    py.allow_threads(|| yr_runtime::init(Config::default()))
        .py_err(py, "failed to start the runtime")?;
    Ok(())
}

#[pyfunction]
fn finalize(py: Python<'_>) -> PyResult<()> {
    py.allow_threads(yr_runtime::finalize)
        .py_err(py, "failed to finalize")
}

#[pyfunction]
fn is_initialized() -> bool {
    yr_runtime::is_initialized()
}

/// Store `value` as a new object of this process.
#[pyfunction]
fn put(py: Python<'_>, value: &Bound<'_, PyAny>) -> PyResult<ObjectRef> {
    let runtime = runtime(py)?;
    let value = pack(value)?;
    Ok(ObjectRef::new(runtime.put(value)))
}

fn handles(refs: &Bound<'_, PyList>) -> PyResult<Vec<ObjectHandle>> {
    refs.iter()
        .map(|r| Ok(r.downcast::<ObjectRef>()?.get().handle.clone()))
        .collect()
}

/// The values of `refs`, waiting at most `timeout` seconds in all (`None`: forever). A failed
/// object raises its error; with `allow_partial`, failed and unfinished ones are `None`.
#[pyfunction]
#[pyo3(signature = (refs, timeout, allow_partial = false))]
fn get<'py>(
    py: Python<'py>,
    refs: &Bound<'py, PyList>,
    timeout: Option<f64>,
    allow_partial: bool,
) -> PyResult<Bound<'py, PyList>> {
    let runtime = runtime(py)?;
    let handles = handles(refs)?;
    let outcomes = py
        .allow_threads(|| runtime.get(&handles, duration(timeout), allow_partial))
        .py_err(py, "failed to get object")?;
    let mut values = Vec::with_capacity(outcomes.len());
    for outcome in outcomes {
        values.push(match outcome {
            Some(Outcome::Ready(value)) => unpack(py, &value)?,
            Some(Outcome::Failed(_)) | None if allow_partial => py.None().into_bound(py),
            Some(Outcome::Failed(error)) => return Err(to_py(py, &error, "failed to get object")),
            None => py.None().into_bound(py),
        });
    }
    PyList::new(py, values)
}

/// Wait until `wait_num` of `refs` are finished or `timeout` seconds pass (`None`: forever).
/// Returns the indices of the finished and the unfinished ones.
#[pyfunction]
fn wait(
    py: Python<'_>,
    refs: &Bound<'_, PyList>,
    wait_num: usize,
    timeout: Option<f64>,
) -> PyResult<(Vec<usize>, Vec<usize>)> {
    let runtime = runtime(py)?;
    let handles = handles(refs)?;
    py.allow_threads(|| runtime.wait(&handles, wait_num, duration(timeout)))
        .py_err(py, "failed to wait for objects")
}

/// Cancel the stateless calls producing `refs`; with `recursive`, also the calls they
/// submitted (the core's `cancel_all`).
#[pyfunction]
#[pyo3(signature = (refs, force, recursive = false))]
fn cancel(py: Python<'_>, refs: &Bound<'_, PyList>, force: bool, recursive: bool) -> PyResult<()> {
    let runtime = runtime(py)?;
    let handles = handles(refs)?;
    py.allow_threads(|| runtime.cancel_all(&handles, force, recursive))
        .py_err(py, "failed to cancel")
}

/// A call's arguments: a top-level `ObjectRef` is passed by reference (the callee gets its
/// value), a `PreparedValue` as the value it holds, anything else pickled.
fn call_args(args: &Bound<'_, PyList>) -> PyResult<Vec<Arg>> {
    args.iter()
        .map(|arg| {
            if let Ok(reference) = arg.downcast::<ObjectRef>() {
                return Ok(Arg::Ref(reference.get().handle.clone()));
            }
            if let Ok(prepared) = arg.downcast::<PreparedValue>() {
                return Ok(Arg::Value(prepared.get().value()));
            }
            Ok(Arg::from_value(pack(&arg)?))
        })
        .collect()
}

/// `InvokeOptions` from their JSON (field names of the core's `InvokeOptions`), validated as
/// the Rust SDK validates them (1001 and friends).
pub(crate) fn options_from(options: Option<&str>) -> Result<Arc<InvokeOptions>, Error> {
    let options: InvokeOptions = match options {
        None => InvokeOptions::default(),
        Some(json) => serde_json::from_str(json).map_err(|e| {
            Error::new(
                ErrorCode::ParamInvalid,
                format!("invalid InvokeOptions: {e}; check the field's type and range"),
            )
        })?,
    };
    options.validate()?;
    Ok(Arc::new(options))
}

/// Check options (as JSON), raising what the core would raise.
#[pyfunction]
fn validate_options(py: Python<'_>, options: &str) -> PyResult<()> {
    options_from(Some(options))
        .map(|_| ())
        .py_err(py, "invalid options")
}

/// A proxy's options, read and checked once, for all its calls: equal options are then the same
/// `Arc`, which the core recognizes without comparing them field by field.
#[pyclass(module = "yr._yr", name = "CallOptions", frozen)]
pub struct CallOptions {
    options: Arc<InvokeOptions>,
}

/// The options of many calls, from their JSON (raising what the core raises for them).
#[pyfunction]
fn call_options(py: Python<'_>, options: &str) -> PyResult<CallOptions> {
    let options = options_from(Some(options)).py_err(py, "invalid options")?;
    Ok(CallOptions { options })
}

/// The default `InvokeOptions` as JSON: the fields the core has, by its names.
#[pyfunction]
fn default_options() -> String {
    serde_json::to_string(&InvokeOptions::default()).unwrap_or_else(|_| "{}".to_string())
}

pub(crate) fn refs(handles: Vec<ObjectHandle>) -> Vec<ObjectRef> {
    handles.into_iter().map(ObjectRef::new).collect()
}

/// Submit a stateless call. `args[0]` is the function's descriptor.
#[pyfunction]
fn invoke_function(
    py: Python<'_>,
    args: &Bound<'_, PyList>,
    return_nums: usize,
    options: &CallOptions,
) -> PyResult<Vec<ObjectRef>> {
    let runtime = runtime(py)?;
    let task = TaskSpec {
        function: function_entry(return_nums),
        args: call_args(args)?,
        options: options.options.clone(),
    };
    let returns = py
        .allow_threads(|| runtime.invoke_function(task))
        .py_err(py, "failed to invoke function")?;
    Ok(refs(returns))
}

/// Create an instance. `args[0]` is the class's descriptor; `class_name` its
/// `module.QualName`, which `yr status` shows and a named create compares. Returns the
/// instance id.
#[pyfunction]
#[pyo3(signature = (args, options, class_name = None))]
fn create_instance(
    py: Python<'_>,
    args: &Bound<'_, PyList>,
    options: &CallOptions,
    class_name: Option<String>,
) -> PyResult<String> {
    let runtime = runtime(py)?;
    let spec = CreateSpec {
        constructor: CONSTRUCTOR_ENTRY,
        args: call_args(args)?,
        options: options.options.clone(),
        class_name,
    };
    let info = py
        .allow_threads(|| runtime.create_instance(spec))
        .py_err(py, "failed to create instance")?;
    Ok(info.instance_id)
}

/// Call a method. `args[0]` is the method's descriptor. An `is_async` method shares the
/// instance with other calls (its coroutines interleave on the runtime's event loop); any
/// other takes it alone, in order. `options`: this call's (the core honours `timeout_s` and
/// refuses the fields that belong to the instance with 1001).
#[pyfunction]
#[pyo3(signature = (instance_id, args, return_nums, is_async = false, options = None))]
fn invoke_method(
    py: Python<'_>,
    instance_id: &str,
    args: &Bound<'_, PyList>,
    return_nums: usize,
    is_async: bool,
    options: Option<&CallOptions>,
) -> PyResult<Vec<ObjectRef>> {
    let runtime = runtime(py)?;
    let call = MethodSpec {
        method: if is_async {
            ASYNC_METHOD_ENTRY
        } else {
            METHOD_ENTRY
        },
        args: call_args(args)?,
        options: options.map(|o| o.options.clone()).unwrap_or_default(),
    };
    let returns = py
        .allow_threads(|| runtime.invoke_method(instance_id, call, return_nums))
        .py_err(py, "failed to invoke instance")?;
    Ok(refs(returns))
}

/// Terminate an instance (running its shutdown hook); with `wait`, until it has exited.
#[pyfunction]
fn terminate_instance(py: Python<'_>, instance_id: &str, wait: bool) -> PyResult<()> {
    let runtime = runtime(py)?;
    py.allow_threads(|| runtime.terminate_instance(instance_id, wait))
        .py_err(py, "failed to kill instance")
}

/// The id of the named instance, waiting up to `timeout` seconds for it to appear.
#[pyfunction]
fn get_named_instance(
    py: Python<'_>,
    name: &str,
    namespace: &str,
    timeout: f64,
) -> PyResult<String> {
    let runtime = runtime(py)?;
    let info = py
        .allow_threads(|| runtime.get_named_instance(name, namespace, duration(Some(timeout))))
        .py_err(py, "failed to get instance")?;
    Ok(info.instance_id)
}

/// Every named instance: `(name, namespace, instance_id)`.
#[pyfunction]
fn list_named_instances(py: Python<'_>) -> PyResult<Vec<(String, String, String)>> {
    let runtime = runtime(py)?;
    let named = py
        .allow_threads(|| runtime.list_named_instances())
        .py_err(py, "failed to list named instances")?;
    Ok(named
        .into_iter()
        .map(|n| (n.name, n.namespace, n.instance_id))
        .collect())
}

/// The KV write parameters from `yr.SetParam`'s numbers (openYuanrong's enum values); another
/// number is 1001.
fn set_param(
    existence: u8,
    write_mode: u8,
    ttl_second: u64,
    cache_type: u8,
) -> Result<SetParam, Error> {
    let invalid = |what: &str, value: u8| {
        Error::new(
            ErrorCode::ParamInvalid,
            format!("{what} {value} is not one of yr's values; use the yr.{what} enum"),
        )
    };
    Ok(SetParam {
        existence: match existence {
            0 => Existence::None,
            1 => Existence::NX,
            other => return Err(invalid("ExistenceOpt", other)),
        },
        write_mode: match write_mode {
            0 => WriteMode::NoneL2Cache,
            1 => WriteMode::WriteThroughL2Cache,
            2 => WriteMode::WriteBackL2Cache,
            3 => WriteMode::NoneL2CacheEvict,
            other => return Err(invalid("WriteMode", other)),
        },
        ttl_second,
        cache_type: match cache_type {
            0 => CacheType::Memory,
            1 => CacheType::Disk,
            other => return Err(invalid("CacheType", other)),
        },
    })
}

/// Write `value` under `key` (the core checks sizes: 1001; NX on an existing key: 4206; the
/// node's quota: 4202).
#[pyfunction]
fn kv_write(
    py: Python<'_>,
    key: &str,
    value: &[u8],
    existence: u8,
    write_mode: u8,
    ttl_second: u64,
    cache_type: u8,
) -> PyResult<()> {
    let runtime = runtime(py)?;
    let param = set_param(existence, write_mode, ttl_second, cache_type)
        .py_err(py, "failed to write kv")?;
    py.allow_threads(|| runtime.kv().set(key, value, &param))
        .py_err(py, "failed to write kv")
}

/// The values of `keys`, waiting up to `timeout` seconds (`None`: forever) for missing ones.
#[pyfunction]
fn kv_read<'py>(
    py: Python<'py>,
    keys: Vec<String>,
    timeout: Option<f64>,
) -> PyResult<Vec<Bound<'py, PyBytes>>> {
    let runtime = runtime(py)?;
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let values = py
        .allow_threads(|| runtime.kv().get(&keys, duration(timeout)))
        .py_err(py, "failed to read kv")?;
    Ok(values.iter().map(|v| PyBytes::new(py, v)).collect())
}

/// `size` bytes of `key`'s value from `offset` (`size` 0: to the end).
#[pyfunction]
fn kv_read_range<'py>(
    py: Python<'py>,
    key: &str,
    offset: u64,
    size: u64,
    timeout: Option<f64>,
) -> PyResult<Bound<'py, PyBytes>> {
    let runtime = runtime(py)?;
    let value = py
        .allow_threads(|| runtime.kv().get_range(key, offset, size, duration(timeout)))
        .py_err(py, "failed to read kv")?;
    Ok(PyBytes::new(py, &value))
}

/// Delete `keys` (a missing key is no error).
#[pyfunction]
fn kv_del(py: Python<'_>, keys: Vec<String>) -> PyResult<()> {
    let runtime = runtime(py)?;
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    py.allow_threads(|| runtime.kv().del(&keys))
        .py_err(py, "failed to delete kv")
}

/// Whether each of `keys` exists.
#[pyfunction]
fn kv_exist(py: Python<'_>, keys: Vec<String>) -> PyResult<Vec<bool>> {
    let runtime = runtime(py)?;
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    py.allow_threads(|| runtime.kv().exist(&keys))
        .py_err(py, "failed to check kv")
}
