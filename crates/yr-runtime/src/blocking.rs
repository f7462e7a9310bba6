//! Blocking waits inside pool threads. A task that blocks in `get` or `wait` tells the pool
//! running it, so the pool can start another thread and nested calls cannot deadlock a bounded
//! pool.

use std::cell::RefCell;
use std::sync::Arc;

/// Told when a thread it owns blocks and unblocks.
pub trait BlockingObserver: Send + Sync {
    /// The current thread is about to block.
    fn enter(&self);
    /// The current thread stopped blocking.
    fn exit(&self);
}

/// Told when any thread of this process starts or stops waiting for objects (`get`, `wait`).
static OBJECT_WAITS: std::sync::OnceLock<Arc<dyn BlockingObserver>> = std::sync::OnceLock::new();

/// Make `observer` hear about every wait for objects in this process. Set once (a runtime sets
/// it to lend its CPU back to the node while it waits).
pub fn set_object_wait_observer(observer: Arc<dyn BlockingObserver>) {
    let _ = OBJECT_WAITS.set(observer);
}

/// Run `f`, a wait for objects (`get`, `wait`): a blocking wait that this thread's observer
/// hears about, and the process's object-wait observer too.
pub fn waiting_for_objects<R>(f: impl FnOnce() -> R) -> R {
    match OBJECT_WAITS.get() {
        None => blocking(f),
        Some(observer) => {
            observer.enter();
            let result = blocking(f);
            observer.exit();
            result
        }
    }
}

thread_local! {
    static OBSERVER: RefCell<Option<Arc<dyn BlockingObserver>>> = const { RefCell::new(None) };
}

/// Make `observer` hear about blocking waits on this thread.
pub fn set_observer(observer: Arc<dyn BlockingObserver>) {
    OBSERVER.with(|slot| *slot.borrow_mut() = Some(observer));
}

/// Run `f`, a blocking wait, telling this thread's observer.
pub fn blocking<R>(f: impl FnOnce() -> R) -> R {
    let observer = OBSERVER.with(|slot| slot.borrow().clone());
    match observer {
        None => f(),
        Some(observer) => {
            observer.enter();
            let result = f();
            observer.exit();
            result
        }
    }
}
