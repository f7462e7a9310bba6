//! The entry points through which the core runs Python code. The core finds entry points by
//! name in its static registry; Python has four, registered here like the Rust macros register
//! theirs: one for every stateless function, one constructor (with the shutdown hook) for every
//! class, one method that takes the instance alone and one `async def` method that shares it. Which Python function, class or method a call means travels in its first
//! argument, a descriptor pickled by the driver (its code's content hash and a reference to
//! the pickled code), and `yr._dispatch` runs it: the same path in local mode (a pool thread
//! of the driver) and in a runtime process.
//!
//! `yr._dispatch` answers `(True, results)` or `(False, code, message, payload)`: user
//! exceptions are caught and encoded there, with the pickled exception as the payload.
//!
//! A caller in another language (design 018) sends the same entries a MessagePack descriptor
//! instead (the module and name of a function or class, or a method's name), told apart by its
//! first bytes (a pickle starts with `0x80 0x05`): its arguments are MessagePack too, decoded
//! here, and the results go back as MessagePack.

use std::time::Duration;

use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::{PyBytes, PyList};
use yr_common::{Error, ErrorCode, Result};
use yr_runtime::function::{
    Arg, ArgBytes, ConstructorEntry, FunctionEntry, InstanceState, MethodCall, MethodEntry, Returns,
};

use yr_runtime::cross_language::python::{ASYNC_METHOD, CLASS, CONSTRUCTOR, FUNCTION, METHOD};

use crate::msgpack;
use crate::values::{encoded, module_attribute, pack};

/// The entry of a stateless Python call returning `return_nums` values.
pub fn function_entry(return_nums: usize) -> FunctionEntry {
    FunctionEntry {
        name: FUNCTION,
        call: run_function,
        return_nums,
    }
}

/// The constructor entry of every Python class.
pub const CONSTRUCTOR_ENTRY: ConstructorEntry = ConstructorEntry {
    name: CONSTRUCTOR,
    class: CLASS,
    call: construct,
    shutdown: Some(shutdown),
};

/// The method entry of every Python class. Methods take the instance exclusively: calls run one
/// at a time, in order.
pub const METHOD_ENTRY: MethodEntry = MethodEntry {
    name: METHOD,
    class: CLASS,
    call: MethodCall::Exclusive(run_method),
};

yr_runtime::inventory::submit! {
    FunctionEntry { name: FUNCTION, call: run_function, return_nums: 1 }
}
/// The method entry of every `async def` method: it shares the instance, so with
/// `concurrency` N the instance's N executor threads each queue a call for the runtime's
/// event loop, which runs them as interleaving tasks ([`crate::async_calls`]).
pub const ASYNC_METHOD_ENTRY: MethodEntry = MethodEntry {
    name: ASYNC_METHOD,
    class: CLASS,
    call: MethodCall::Shared(crate::async_calls::run),
};

yr_runtime::inventory::submit! { CONSTRUCTOR_ENTRY }
yr_runtime::inventory::submit! { METHOD_ENTRY }
yr_runtime::inventory::submit! { ASYNC_METHOD_ENTRY }

/// A Python instance's state: the object its class's constructor made.
pub(crate) struct PyInstance(pub(crate) PyObject);

/// A function of `yr._dispatch`, looked up once.
pub(crate) fn dispatch<'py>(
    py: Python<'py>,
    cell: &'static GILOnceCell<PyObject>,
    name: &str,
) -> PyResult<&'py Bound<'py, PyAny>> {
    module_attribute(py, cell, "yr._dispatch", name)
}

static CALL_FUNCTION: GILOnceCell<PyObject> = GILOnceCell::new();
static CONSTRUCT: GILOnceCell<PyObject> = GILOnceCell::new();
static CALL_METHOD: GILOnceCell<PyObject> = GILOnceCell::new();
static SHUTDOWN: GILOnceCell<PyObject> = GILOnceCell::new();
static CALL_NAMED_FUNCTION: GILOnceCell<PyObject> = GILOnceCell::new();
static CONSTRUCT_NAMED: GILOnceCell<PyObject> = GILOnceCell::new();
static CALL_NAMED_METHOD: GILOnceCell<PyObject> = GILOnceCell::new();

/// A failure of yr's own Python code (not the user's): a bug, 3003.
pub(crate) fn dispatch_failed(py: Python<'_>, error: PyErr) -> Error {
    let traceback = error
        .traceback(py)
        .and_then(|tb| tb.format().ok())
        .unwrap_or_default();
    Error::new(
        ErrorCode::InnerSystemError,
        format!("yr's Python call dispatch failed: {error}\n{traceback}"),
    )
}

/// The arguments' pickled bytes, for `yr._dispatch`: inline ones copied, objects read in place.
/// The arguments stay alive for the call, so references inside them resolve while they are
/// unpickled.
fn arg_bytes<'py>(py: Python<'py>, args: &[Arg]) -> Result<Bound<'py, PyList>> {
    let mut all = Vec::with_capacity(args.len());
    for arg in args {
        let bytes = match arg.bytes()? {
            ArgBytes::Borrowed(bytes) => PyBytes::new(py, bytes).into_any(),
            ArgBytes::Shared(value) => encoded(py, &value).map_err(|e| dispatch_failed(py, e))?,
        };
        all.push(bytes);
    }
    PyList::new(py, all).map_err(|e| dispatch_failed(py, e))
}

/// Turn `yr._dispatch`'s answer into the call's outcome: `(True, value)` gives `value`, `(False,
/// code, message, payload)` the error.
pub(crate) fn answer<'py>(
    py: Python<'py>,
    answer: PyResult<Bound<'py, PyAny>>,
) -> Result<Bound<'py, PyAny>> {
    let answer = answer.map_err(|e| dispatch_failed(py, e))?;
    let ok: bool = answer
        .get_item(0)
        .and_then(|ok| ok.extract())
        .map_err(|e| dispatch_failed(py, e))?;
    if ok {
        return answer.get_item(1).map_err(|e| dispatch_failed(py, e));
    }
    let (_, code, message, payload): (bool, u32, String, Vec<u8>) =
        answer.extract().map_err(|e| dispatch_failed(py, e))?;
    let code = ErrorCode::from_number(code).unwrap_or(ErrorCode::UserFunctionException);
    Err(Error::new(code, message).with_payload(payload))
}

/// A call from another language: its descriptor and arguments, decoded from MessagePack;
/// `None` for a call from Python (a pickled descriptor). Undecodable values are 4003.
fn foreign_call<'py>(
    py: Python<'py>,
    args: &[Arg],
) -> Result<Option<(Bound<'py, PyAny>, Bound<'py, PyList>)>> {
    let Some((first, rest)) = args.split_first() else {
        return Ok(None);
    };
    let descriptor = first.bytes()?;
    if msgpack::is_pickle(&descriptor) {
        return Ok(None);
    }
    let descriptor = msgpack::unpack(py, &descriptor)?;
    let mut values = Vec::with_capacity(rest.len());
    for arg in rest {
        values.push(msgpack::unpack(py, &arg.bytes()?)?);
    }
    let values = PyList::new(py, values).map_err(|e| dispatch_failed(py, e))?;
    Ok(Some((descriptor, values)))
}

/// How a call's results are encoded: pickled for a caller in Python, MessagePack for one in
/// another language.
#[derive(Clone, Copy)]
pub(crate) enum Encoding {
    Pickle,
    MessagePack,
}

/// The results a call returned (a list), encoded for its caller. A result that cannot be
/// encoded fails the call with 2002.
pub(crate) fn returns(
    py: Python<'_>,
    results: Bound<'_, PyAny>,
    encoding: Encoding,
) -> Result<Returns> {
    let results = results
        .downcast_into::<PyList>()
        .map_err(|e| dispatch_failed(py, e.into()))?;
    let mut values = Vec::with_capacity(results.len());
    for (index, result) in results.iter().enumerate() {
        let what = format!("result {index} of the call");
        let value = match encoding {
            Encoding::MessagePack => {
                msgpack::pack(&result, &what).map_err(|e| e.value(py).to_string())
            }
            Encoding::Pickle => pack(&result).map_err(|e| {
                let type_name = result
                    .get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default();
                format!(
                    "{what} (a {type_name}) cannot be pickled: {e}; return values that \
                     cloudpickle can serialize"
                )
            }),
        };
        values
            .push(value.map_err(|message| Error::new(ErrorCode::UserFunctionException, message))?);
    }
    Ok(Returns::Many(values))
}

fn run_function(args: &[Arg]) -> Result<Returns> {
    crate::gil::with_gil(|py| {
        if let Some((descriptor, values)) = foreign_call(py, args)? {
            let called = dispatch(py, &CALL_NAMED_FUNCTION, "call_named_function")
                .and_then(|f| f.call1((descriptor, values)));
            let results = answer(py, called)?;
            return returns(py, results, Encoding::MessagePack);
        }
        let bytes = arg_bytes(py, args)?;
        let called = dispatch(py, &CALL_FUNCTION, "call_function").and_then(|f| f.call1((bytes,)));
        let results = answer(py, called)?;
        returns(py, results, Encoding::Pickle)
    })
}

fn construct(args: &[Arg]) -> Result<Box<InstanceState>> {
    crate::gil::with_gil(|py| {
        let made = match foreign_call(py, args)? {
            Some((descriptor, values)) => dispatch(py, &CONSTRUCT_NAMED, "construct_named")
                .and_then(|f| f.call1((descriptor, values))),
            None => {
                let bytes = arg_bytes(py, args)?;
                dispatch(py, &CONSTRUCT, "construct").and_then(|f| f.call1((bytes,)))
            }
        };
        let instance = answer(py, made)?;
        Ok(Box::new(PyInstance(instance.unbind())) as Box<InstanceState>)
    })
}

pub(crate) fn instance(state: &InstanceState) -> Result<&PyInstance> {
    state.downcast_ref::<PyInstance>().ok_or_else(|| {
        Error::new(
            ErrorCode::InnerSystemError,
            "a Python method was called on an instance that is not a Python object",
        )
    })
}

fn run_method(state: &mut InstanceState, args: &[Arg]) -> Result<Returns> {
    let instance = instance(state)?;
    crate::gil::with_gil(|py| {
        if let Some((descriptor, values)) = foreign_call(py, args)? {
            let called = dispatch(py, &CALL_NAMED_METHOD, "call_named_method")
                .and_then(|f| f.call1((instance.0.bind(py), descriptor, values)));
            let results = answer(py, called)?;
            return returns(py, results, Encoding::MessagePack);
        }
        let bytes = arg_bytes(py, args)?;
        let called = dispatch(py, &CALL_METHOD, "call_method")
            .and_then(|f| f.call1((instance.0.bind(py), bytes)));
        let results = answer(py, called)?;
        returns(py, results, Encoding::Pickle)
    })
}

fn shutdown(state: &mut InstanceState, grace: Duration) {
    let Ok(instance) = instance(state) else {
        return;
    };
    crate::gil::with_gil(|py| {
        let done = dispatch(py, &SHUTDOWN, "shutdown")
            .and_then(|f| f.call1((instance.0.bind(py), grace.as_secs_f64())));
        if let Err(error) = done {
            tracing::warn!(%error, "the Python instance's shutdown hook failed");
        }
    });
}
