//! yr's callback thread: runs the Python callbacks registered on objects
//! (`ObjectRef.on_complete`, `as_future`, `await`). An object finishes on whichever thread
//! produced it (a pool thread, the IO thread that read a result); that thread only queues the
//! callback, so it never waits for the GIL, which the Python thread holding it may keep while it
//! asks the same IO thread for something. The queue holds one entry per registered callback of
//! a finished object, so it is bounded by the callbacks the program registered.

use std::sync::OnceLock;

use crossbeam_channel::{unbounded, Sender};
use pyo3::prelude::*;

/// Where finished objects queue their callbacks; starts the thread on first use.
pub fn sender() -> Sender<PyObject> {
    static SENDER: OnceLock<Sender<PyObject>> = OnceLock::new();
    SENDER
        .get_or_init(|| {
            let (sender, receiver) = unbounded::<PyObject>();
            let started = std::thread::Builder::new()
                .name("yr-py-callbacks".to_string())
                .spawn(move || {
                    for callback in receiver {
                        crate::gil::with_gil(|py| {
                            if let Err(error) = callback.call0(py) {
                                error.print(py);
                            }
                        });
                    }
                });
            if let Err(error) = started {
                tracing::error!(%error, "cannot start yr's Python callback thread; callbacks will not run");
            }
            sender
        })
        .clone()
}
