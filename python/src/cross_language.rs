//! Calls from Python to Rust code in another executable (docs/design/018): the functions of
//! `yr._yr` behind `yr.rust_function` and `yr.rust_instance_class`. The code is named by its
//! Rust path in a program built with the `yr` crate, which the node runs as the runtime; the
//! arguments are MessagePack ([`crate::msgpack`]), and so are the results, which `yr.get`
//! tells from pickles by their first bytes.

use pyo3::prelude::*;
use pyo3::types::PyList;
use yr_runtime::cross_language::{self, Executable};
use yr_runtime::function::{Arg, CreateSpec, MethodSpec, TaskSpec};

use crate::api::{options_from, refs, runtime};
use crate::errors::OrRaise;
use crate::msgpack;
use crate::values::ObjectRef;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(invoke_rust_function, m)?)?;
    m.add_function(wrap_pyfunction!(create_rust_instance, m)?)?;
    m.add_function(wrap_pyfunction!(invoke_rust_method, m)?)?;
    m.add_function(wrap_pyfunction!(msgpack::unpack_msgpack, m)?)?;
    m.add_function(wrap_pyfunction!(msgpack::pack_msgpack, m)?)?;
    Ok(())
}

/// The arguments of a call to `name`: a top-level `ObjectRef` is passed by reference (the
/// callee gets its value, which must be MessagePack: a result of Rust code), anything else is
/// encoded as MessagePack.
fn foreign_args(name: &str, args: &Bound<'_, PyList>) -> PyResult<Vec<Arg>> {
    args.iter()
        .enumerate()
        .map(|(index, arg)| match arg.downcast::<ObjectRef>() {
            Ok(reference) => Ok(Arg::Ref(reference.get().handle.clone())),
            Err(_) => Ok(Arg::from_value(msgpack::pack(
                &arg,
                &format!("argument {index} of {name}"),
            )?)),
        })
        .collect()
}

/// Call Rust function `name` (its path, `crate::function`) of the program at `executable`.
#[pyfunction]
#[pyo3(signature = (executable, name, args, return_nums, options = None))]
fn invoke_rust_function(
    py: Python<'_>,
    executable: &str,
    name: &str,
    args: &Bound<'_, PyList>,
    return_nums: usize,
    options: Option<&str>,
) -> PyResult<Vec<ObjectRef>> {
    let runtime = runtime(py)?;
    let prefix = "failed to invoke function";
    let task = TaskSpec {
        function: cross_language::function_entry(name, return_nums),
        args: foreign_args(name, args)?,
        options: options_from(options).py_err(py, prefix)?,
    };
    let executable = Executable::rust(executable);
    let returns = py
        .allow_threads(|| runtime.invoke_function_in(&executable, task))
        .py_err(py, prefix)?;
    Ok(refs(returns))
}

/// Create an instance of Rust class `class_name` with its constructor `constructor` (both
/// paths) in the program at `executable`. Returns the instance id.
#[pyfunction]
#[pyo3(signature = (executable, constructor, class_name, args, options = None))]
fn create_rust_instance(
    py: Python<'_>,
    executable: &str,
    constructor: &str,
    class_name: &str,
    args: &Bound<'_, PyList>,
    options: Option<&str>,
) -> PyResult<String> {
    let runtime = runtime(py)?;
    let prefix = "failed to create instance";
    let spec = CreateSpec {
        constructor: cross_language::constructor_entry(constructor, class_name),
        args: foreign_args(constructor, args)?,
        options: options_from(options).py_err(py, prefix)?,
        class_name: None,
    };
    let executable = Executable::rust(executable);
    let info = py
        .allow_threads(|| runtime.create_instance_in(&executable, spec))
        .py_err(py, prefix)?;
    Ok(info.instance_id)
}

/// Call method `name` (its path, `crate::Class::method`) of a Rust instance.
#[pyfunction]
#[pyo3(signature = (instance_id, name, class_name, args, return_nums = 1))]
fn invoke_rust_method(
    py: Python<'_>,
    instance_id: &str,
    name: &str,
    class_name: &str,
    args: &Bound<'_, PyList>,
    return_nums: usize,
) -> PyResult<Vec<ObjectRef>> {
    let runtime = runtime(py)?;
    let call = MethodSpec {
        method: cross_language::method_entry(name, class_name),
        args: foreign_args(name, args)?,
        options: Default::default(),
    };
    let returns = py
        .allow_threads(|| runtime.invoke_method(instance_id, call, return_nums))
        .py_err(py, "failed to invoke instance")?;
    Ok(refs(returns))
}
