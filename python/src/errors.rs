//! The core's errors as Python exceptions. The classes live in `yr.exception`; this module
//! hands each error's code, module, message and payload (a pickled remote exception) to
//! `yr.exception._from_core`, which picks the class, and raises what it returns.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::PyBytes;
use yr_common::Error;

fn from_core(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    static FROM_CORE: GILOnceCell<PyObject> = GILOnceCell::new();
    Ok(FROM_CORE
        .get_or_try_init(py, || {
            py.import("yr.exception")?
                .getattr("_from_core")
                .map(Bound::unbind)
        })?
        .bind(py))
}

/// The Python exception for `error`, with `prefix` ("failed to get object", …) in its message
/// as openYuanrong words it.
pub fn to_py(py: Python<'_>, error: &Error, prefix: &str) -> PyErr {
    let made = from_core(py).and_then(|make| {
        make.call1((
            error.code().number(),
            error.module_code().number(),
            error.message(),
            PyBytes::new(py, error.payload()),
            prefix,
        ))
    });
    match made {
        Ok(exception) => PyErr::from_value(exception),
        // `yr.exception` itself failed to import: still say what happened.
        Err(cause) => {
            let err = PyRuntimeError::new_err(format!("{prefix}: {error}"));
            err.set_cause(py, Some(cause));
            err
        }
    }
}

/// A converter of `yr_common::Result` into `PyResult`, with the operation's prefix.
pub trait OrRaise<T> {
    fn py_err(self, py: Python<'_>, prefix: &str) -> PyResult<T>;
}

impl<T> OrRaise<T> for yr_common::Result<T> {
    fn py_err(self, py: Python<'_>, prefix: &str) -> PyResult<T> {
        self.map_err(|error| to_py(py, &error, prefix))
    }
}
