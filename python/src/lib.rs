//! yr-python: the `yr._yr` extension module, the binding of yr's Python SDK over the client core
//! (`yr-runtime`). It owns the crossing between Python and the core: Python values as the
//! core's values (pickled bytes with the object references captured while pickling,
//! [`values`]), `ObjectRef`, the core's errors as `yr.exception` classes ([`errors`]), and the
//! static entry points through which the core runs Python functions and instances ([`calls`]),
//! and calls across languages: Rust code called from Python ([`cross_language`]) and values as
//! MessagePack ([`msgpack`]), and streams ([`streams`]).
//! It does not own any semantics: lifecycle, objects, calls, retries and both backends are the
//! core's, and the decorators, `Config` and exception classes are the pure-Python package
//! `yr` (docs/design/016-python-sdk.md).
//!
//! The GIL is released around every wait and every call into the core that may block.

mod api;
mod async_calls;
mod callbacks;
mod calls;
mod cross_language;
mod errors;
mod gil;
mod msgpack;
mod streams;
mod values;

use pyo3::prelude::*;

/// The `yr._yr` module.
#[pymodule]
fn _yr(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<values::ObjectRef>()?;
    m.add_class::<values::SharedBytes>()?;
    m.add_class::<values::PreparedValue>()?;
    m.add_function(wrap_pyfunction!(values::prepare, m)?)?;
    m.add_class::<async_calls::AsyncReply>()?;
    m.add_function(wrap_pyfunction!(async_calls::async_wake_fd, m)?)?;
    m.add_function(wrap_pyfunction!(async_calls::take_async_calls, m)?)?;
    m.add_function(wrap_pyfunction!(values::ref_by_id, m)?)?;
    api::register(m)?;
    cross_language::register(m)?;
    streams::register(m)?;
    Ok(())
}
