//! Waiting for a call's dependencies: the objects passed as arguments or nested inside them.
//! A call runs once all are finished; if one failed, the call fails with 4306 instead.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use yr_common::{Error, Result};

use crate::function::{dependency_failed, Arg};
use crate::object_store::ObjectHandle;

/// Run `then` once every dependency of `args` is finished: at once if they are, otherwise on
/// the thread that finishes the last one.
pub fn when_ready(args: &[Arg], then: impl FnOnce() + Send + 'static) {
    let pending: Vec<&ObjectHandle> = args
        .iter()
        .flat_map(Arg::dependencies)
        .filter(|handle| !handle.is_finished())
        .collect();
    if pending.is_empty() {
        then();
        return;
    }
    let remaining = Arc::new(AtomicUsize::new(pending.len()));
    let then = Arc::new(Mutex::new(Some(then)));
    for handle in pending {
        let remaining = remaining.clone();
        let then = then.clone();
        handle.on_finished(Box::new(move || {
            if remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                if let Some(then) = then.lock().take() {
                    then();
                }
            }
        }));
    }
}

/// The 4306 error for the first failed dependency of `args`, if any. Dependencies must be
/// finished.
pub fn first_failure(args: &[Arg]) -> Result<(), Error> {
    for handle in args.iter().flat_map(Arg::dependencies) {
        if let Some(error) = handle.failure() {
            return Err(dependency_failed(handle, &error));
        }
    }
    Ok(())
}

/// Block until every dependency of `args` is finished. For executors that own their thread.
pub fn wait_ready(args: &[Arg]) {
    for handle in args.iter().flat_map(Arg::dependencies) {
        handle.wait_until(None);
    }
}
