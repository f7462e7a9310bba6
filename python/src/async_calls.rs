//! `async def` methods, run on the runtime's event loop without taking the GIL on the executor
//! thread. The core runs a shared method on one of the instance's `concurrency` executor
//! threads and wants its result there; the coroutine must run on the process's one event loop
//! (so that the instance's coroutines interleave, and tasks they start keep running). The
//! executor thread queues the call here, wakes the loop through a socket the loop watches
//! (`loop.add_reader`), and waits for the answer on a channel. The loop thread takes the queued
//! calls (`_take_async_calls`), runs each as a task (`yr._dispatch`), and sends each answer back
//! through its `AsyncReply`. Handing a coroutine over with `asyncio.run_coroutine_threadsafe`
//! instead costs the executor thread the GIL twice and about 35 µs of CPU per call, several
//! times the call itself.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::{PyBytes, PyList};
use yr_common::{Error, ErrorCode, Result};
use yr_runtime::function::{Arg, ArgBytes, InstanceState, Returns};
use yr_runtime::object_store::StoredValue;

use crate::calls::{answer, dispatch_failed, instance, returns, Encoding};
use crate::values::encoded;

/// An argument the loop thread reads after the executor thread handed it over.
enum OwnedArg {
    Inline(Vec<u8>),
    Shared(Arc<StoredValue>),
}

/// A call waiting for the event loop.
struct AsyncCall {
    /// The instance's Python object (`PyObject*`), alive while its executor thread waits for
    /// `reply`: that thread holds the instance's state, which holds the object.
    instance: usize,
    args: Vec<OwnedArg>,
    reply: Sender<Result<Returns>>,
}

/// The queue of calls and the socket pair that wakes the loop.
struct Handoff {
    calls: (Sender<AsyncCall>, Receiver<AsyncCall>),
    wake: UnixStream,
    woken: UnixStream,
}

fn handoff() -> Result<&'static Handoff> {
    static HANDOFF: OnceLock<std::result::Result<Handoff, String>> = OnceLock::new();
    HANDOFF
        .get_or_init(|| {
            let (wake, woken) = UnixStream::pair().map_err(|e| e.to_string())?;
            wake.set_nonblocking(true).map_err(|e| e.to_string())?;
            woken.set_nonblocking(true).map_err(|e| e.to_string())?;
            Ok(Handoff {
                calls: unbounded(),
                wake,
                woken,
            })
        })
        .as_ref()
        .map_err(|e| {
            Error::new(
                ErrorCode::InnerSystemError,
                format!("cannot make the socket pair that wakes the event loop: {e}"),
            )
        })
}

/// Start the event loop (`yr._dispatch._event_loop`), which watches the wake socket; once.
fn ensure_loop() -> Result<()> {
    static STARTED: OnceLock<()> = OnceLock::new();
    if STARTED.get().is_some() {
        return Ok(());
    }
    static EVENT_LOOP: GILOnceCell<PyObject> = GILOnceCell::new();
    crate::gil::with_gil(|py| {
        crate::calls::dispatch(py, &EVENT_LOOP, "_event_loop")
            .and_then(|start| start.call0())
            .map(drop)
            .map_err(|e| dispatch_failed(py, e))
    })?;
    let _ = STARTED.set(());
    Ok(())
}

/// The shared method entry of `async def` methods: queue the call for the event loop and wait
/// for its answer, without the GIL.
pub fn run(state: &InstanceState, args: &[Arg]) -> Result<Returns> {
    let instance = instance(state)?.0.as_ptr() as usize;
    let handoff = handoff()?;
    ensure_loop()?;
    let args = args
        .iter()
        .map(|arg| {
            Ok(match arg.bytes()? {
                ArgBytes::Borrowed(bytes) => OwnedArg::Inline(bytes.to_vec()),
                ArgBytes::Shared(value) => OwnedArg::Shared(value),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let (reply, answer) = bounded(1);
    let call = AsyncCall {
        instance,
        args,
        reply,
    };
    if handoff.calls.0.send(call).is_err() {
        return Err(Error::new(
            ErrorCode::InnerSystemError,
            "the event loop's call queue is closed",
        ));
    }
    // A full socket buffer means wakes are pending already: the loop drains every call.
    if let Err(error) = (&handoff.wake).write(&[1]) {
        if error.kind() != ErrorKind::WouldBlock {
            return Err(Error::new(
                ErrorCode::InnerSystemError,
                format!("cannot wake the event loop: {error}"),
            ));
        }
    }
    answer.recv().unwrap_or_else(|_| {
        Err(Error::new(
            ErrorCode::InnerSystemError,
            "the event loop dropped an async method call without answering it; see the \
             runtime's log",
        ))
    })
}

/// Where an async call's answer goes: `send((True, results))` or `send((False, code, message,
/// payload))`, as `yr._dispatch` answers every call.
#[pyclass(module = "yr._yr", name = "AsyncReply", frozen)]
pub struct AsyncReply {
    sender: Sender<Result<Returns>>,
}

#[pymethods]
impl AsyncReply {
    /// Send the call's answer to the executor thread waiting for it (the results are pickled
    /// here, on the loop thread).
    fn send(&self, py: Python<'_>, answer_: Bound<'_, PyAny>) {
        let result =
            answer(py, Ok(answer_)).and_then(|results| returns(py, results, Encoding::Pickle));
        let _ = self.sender.try_send(result);
    }
}

/// The socket the event loop watches for queued async calls (`loop.add_reader`).
#[pyfunction]
#[pyo3(name = "_async_wake_fd")]
pub fn async_wake_fd(py: Python<'_>) -> PyResult<i32> {
    handoff()
        .map(|h| h.woken.as_raw_fd())
        .map_err(|e| crate::errors::to_py(py, &e, "cannot run async methods"))
}

/// Take the queued async calls: `(reply, instance, args)` for each, the arguments as pickled
/// bytes (read in place when large), the first of them the call's descriptor.
#[pyfunction]
#[pyo3(name = "_take_async_calls")]
pub fn take_async_calls(py: Python<'_>) -> PyResult<Vec<(AsyncReply, PyObject, PyObject)>> {
    let handoff =
        handoff().map_err(|e| crate::errors::to_py(py, &e, "cannot run async methods"))?;
    let mut drained = [0u8; 256];
    while matches!((&handoff.woken).read(&mut drained), Ok(n) if n > 0) {}
    let mut taken = Vec::new();
    while let Ok(call) = handoff.calls.1.try_recv() {
        // SAFETY: `call.instance` is the instance's `PyObject*`, which the instance's state
        // holds while the executor thread that sent this call waits for its reply; this
        // thread holds the GIL and takes its own reference.
        let instance =
            unsafe { Bound::from_borrowed_ptr(py, call.instance as *mut pyo3::ffi::PyObject) };
        let mut args = Vec::with_capacity(call.args.len());
        for arg in &call.args {
            args.push(match arg {
                OwnedArg::Inline(bytes) => PyBytes::new(py, bytes).into_any(),
                OwnedArg::Shared(value) => encoded(py, value)?,
            });
        }
        taken.push((
            AsyncReply { sender: call.reply },
            instance.unbind(),
            PyList::new(py, args)?.into_any().unbind(),
        ));
    }
    Ok(taken)
}
