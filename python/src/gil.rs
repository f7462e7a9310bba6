//! Entering Python from yr's own threads (executor threads, pool threads, the callback thread).
//! `Python::with_gil` on a thread that Python does not know makes a new thread state and
//! deletes it when the GIL is released, and each new thread state maps its first frame chunk
//! (16 KiB) and unmaps it on delete: two system calls and a TLB shootdown of every thread of
//! the process per call, more than a small call's own work. [`with_gil`] gives such a thread
//! one thread state that lives as long as the thread, so each entry only takes and releases
//! the GIL.

use std::cell::Cell;

use pyo3::ffi;
use pyo3::prelude::*;

/// Marks a thread whose thread state yr keeps; deletes the thread state when the thread exits.
struct KeptThreadState;

impl Drop for KeptThreadState {
    fn drop(&mut self) {
        // SAFETY: this thread took one `PyGILState_Ensure` count in `keep_thread_state` and
        // never gave it back. Taking the GIL with it (count 2), then giving back both counts
        // (the second while holding the GIL) deletes the thread state and releases the GIL,
        // as a thread that leaves Python does. pyo3's `PyGILState_Ensure` hangs this thread
        // instead of unwinding if the interpreter is shutting down.
        unsafe {
            if ffi::Py_IsInitialized() == 0 {
                return;
            }
            let _ = ffi::PyGILState_Ensure();
            ffi::PyGILState_Release(ffi::PyGILState_STATE::PyGILState_LOCKED);
            ffi::PyGILState_Release(ffi::PyGILState_STATE::PyGILState_UNLOCKED);
        }
    }
}

thread_local! {
    static KEPT: Cell<bool> = const { Cell::new(false) };
    static KEEPER: Cell<Option<KeptThreadState>> = const { Cell::new(None) };
}

/// Give this thread a thread state that lasts until the thread exits, if it has none: a
/// Python thread has its own, and a thread that holds the GIL is left alone.
fn keep_thread_state() {
    if KEPT.with(Cell::get) {
        return;
    }
    KEPT.with(|kept| kept.set(true));
    // SAFETY: with no thread state for this thread, this thread cannot hold the GIL.
    // `PyGILState_Ensure` makes the thread state (count 1) and takes the GIL;
    // `PyEval_SaveThread` releases the GIL and keeps the thread state, so the count stays 1
    // and later `PyGILState_Ensure`/`Release` pairs (pyo3's `with_gil`) only take and
    // release the GIL.
    unsafe {
        if !ffi::PyGILState_GetThisThreadState().is_null() {
            return;
        }
        let _ = ffi::PyGILState_Ensure();
        ffi::PyEval_SaveThread();
    }
    KEEPER.with(|keeper| keeper.set(Some(KeptThreadState)));
}

/// `Python::with_gil` for a thread of yr's: its thread state is made once and kept.
pub fn with_gil<F, R>(f: F) -> R
where
    F: for<'py> FnOnce(Python<'py>) -> R,
{
    keep_thread_state();
    Python::with_gil(f)
}
