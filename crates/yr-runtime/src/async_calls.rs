//! `async fn` functions and methods. A call of one is driven to completion on the thread that
//! runs the call (a thread of a stateless pool, or one of an instance's `concurrency` executor
//! threads), inside a process-wide tokio runtime, so that tokio's timers, IO and `spawn` work in
//! user code. An instance with `concurrency` N therefore runs up to N async calls at once, each
//! parked on its thread while it awaits, as the Python SDK's `async def` methods interleave on
//! their runtime's event loop (design 017).
//!
//! While a call awaits, its thread counts as waiting for objects: the pool that runs it may
//! start another thread, and a runtime lends its CPU back to the node, exactly as for a
//! blocking `get`, so that async calls which await the results of nested calls finish on a node
//! with few cores.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use yr_common::Result;

use crate::blocking::{self, ObjectWait};
use crate::error::RuntimeError;

/// Worker threads of the runtime that drives timers and IO for async user code (the futures
/// themselves run on their calls' threads).
const WORKER_THREADS: usize = 1;

fn runtime() -> Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    if let Some(runtime) = RUNTIME.get() {
        return Ok(runtime);
    }
    let built = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .thread_name("yr-async")
        .enable_all()
        .build()
        .map_err(|source| RuntimeError::AsyncRuntime { source })?;
    // Two threads may race to build it: the loser's runtime is dropped unused.
    Ok(RUNTIME.get_or_init(|| built))
}

/// Run `future`, the body of an `async fn` function or method, to completion on this thread.
/// 3012 if the process cannot start the runtime's thread.
///
/// ```
/// let four = yr_runtime::async_calls::block_on(async {
///     tokio::time::sleep(std::time::Duration::from_millis(1)).await;
///     2 + 2
/// });
/// assert_eq!(four.unwrap(), 4);
/// ```
pub fn block_on<F: Future>(future: F) -> Result<F::Output> {
    let runtime = runtime()?;
    Ok(runtime.handle().block_on(Awaiting {
        future: Box::pin(future),
        wait: None,
    }))
}

/// A future that counts as a wait for objects while it is pending.
/// (Boxed, so that it is `Unpin` without unsafe code: one allocation per call.)
struct Awaiting<F> {
    future: Pin<Box<F>>,
    wait: Option<ObjectWait>,
}

impl<F: Future> Future for Awaiting<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // Polled again: the wait (if any) is over.
        self.wait = None;
        let polled = self.future.as_mut().poll(cx);
        if polled.is_pending() {
            self.wait = Some(blocking::begin_object_wait());
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    struct Counting {
        entered: AtomicUsize,
        exited: AtomicUsize,
    }

    impl blocking::BlockingObserver for Counting {
        fn enter(&self) {
            self.entered.fetch_add(1, Ordering::SeqCst);
        }
        fn exit(&self) {
            self.exited.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_pending_future_counts_as_a_wait_until_it_is_polled_again() {
        let observer = Arc::new(Counting {
            entered: AtomicUsize::new(0),
            exited: AtomicUsize::new(0),
        });
        blocking::set_observer(observer.clone());
        let value = block_on(async {
            tokio::time::sleep(Duration::from_millis(2)).await;
            tokio::task::yield_now().await;
            7
        })
        .unwrap();
        assert_eq!(value, 7);
        let entered = observer.entered.load(Ordering::SeqCst);
        assert!(entered >= 1, "the sleep was a wait");
        assert_eq!(
            entered,
            observer.exited.load(Ordering::SeqCst),
            "every wait ended"
        );
    }

    #[test]
    fn tokio_spawn_works_inside_a_call() {
        let value = block_on(async { tokio::spawn(async { 5 }).await.unwrap() }).unwrap();
        assert_eq!(value, 5);
    }
}
