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

/// A wait for objects that ends when dropped: what [`waiting_for_objects`] does around a
/// closure, for waits that are not one call (an `async fn` call parked between polls). Made by
/// [`begin_object_wait`], whose example shows it.
#[must_use = "the wait ends when this is dropped"]
pub struct ObjectWait {
    thread: Option<Arc<dyn BlockingObserver>>,
    process: Option<&'static Arc<dyn BlockingObserver>>,
}

/// Tell this thread's observer and the process's object-wait observer that this thread waits
/// for objects until the returned guard is dropped (on the same thread).
///
/// ```
/// let wait = yr_runtime::blocking::begin_object_wait();
/// drop(wait); // the wait is over
/// ```
pub fn begin_object_wait() -> ObjectWait {
    let process = OBJECT_WAITS.get();
    if let Some(observer) = process {
        observer.enter();
    }
    let thread = OBSERVER.with(|slot| slot.borrow().clone());
    if let Some(observer) = &thread {
        observer.enter();
    }
    ObjectWait { thread, process }
}

impl Drop for ObjectWait {
    fn drop(&mut self) {
        if let Some(observer) = &self.thread {
            observer.exit();
        }
        if let Some(observer) = self.process {
            observer.exit();
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
