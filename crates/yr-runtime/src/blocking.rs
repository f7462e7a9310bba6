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
