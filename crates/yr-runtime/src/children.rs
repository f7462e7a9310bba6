//! The stateless calls a running call submitted (its children), so that a recursive `cancel`
//! reaches them (design 017). A stateless call runs with its [`Children`] as the thread's
//! current parent; every stateless call submitted on that thread meanwhile is recorded there.
//! Cancelling the parent with `recursive` cancels each child that is still pending, and each of
//! them its own children, in this process or (through its runtime) in another.
//!
//! Only calls submitted on the thread that runs the parent are its children: a thread the user
//! code starts itself, or a task it spawns on tokio, submits calls with no parent. Instances
//! and method calls are never children: `cancel` concerns stateless calls alone.

use std::cell::RefCell;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use crate::object_store::{Cancel, Canceller};

/// Below this many children the list is not pruned of finished ones.
const PRUNE_FLOOR: usize = 64;

thread_local! {
    static CURRENT: RefCell<Option<Arc<Children>>> = const { RefCell::new(None) };
}

/// The children of one call.
#[derive(Default)]
pub struct Children {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Every child's canceller while the child lives (a child that finished is dropped by its
    /// backend, so its entry no longer upgrades).
    calls: Vec<Weak<dyn Canceller>>,
    /// Set once the parent was cancelled recursively: children submitted later are cancelled
    /// as they are submitted.
    cancelled: Option<Cancel>,
    /// How many entries the list had after it was last pruned.
    pruned_to: usize,
}

impl Children {
    /// The children of a new call: none yet.
    pub fn new() -> Arc<Children> {
        Arc::new(Children::default())
    }

    /// Run `f` (the parent's user code) with these as the thread's current children, so that
    /// the stateless calls it submits are recorded here. Nests: the previous parent is restored
    /// afterwards.
    ///
    /// ```
    /// use yr_runtime::children::{self, Children};
    ///
    /// let parent = Children::new();
    /// assert!(!children::has_parent());
    /// parent.run_as_parent(|| assert!(children::has_parent()));
    /// assert!(!children::has_parent());
    /// ```
    pub fn run_as_parent<R>(self: &Arc<Self>, f: impl FnOnce() -> R) -> R {
        struct Restore(Option<Arc<Children>>);
        impl Drop for Restore {
            fn drop(&mut self) {
                let previous = self.0.take();
                CURRENT.with(|current| *current.borrow_mut() = previous);
            }
        }
        let previous = CURRENT.with(|current| current.borrow_mut().replace(self.clone()));
        let _restore = Restore(previous);
        f()
    }

    /// Cancel every child that is still pending, as descendants of a cancelled call
    /// ([`Cancel::for_children`]); children submitted from now on are cancelled at once.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use yr_runtime::children::{self, Children};
    /// use yr_runtime::object_store::{Cancel, Canceller};
    ///
    /// struct Call;
    /// impl Canceller for Call {
    ///     fn cancel(&self, how: Cancel) {
    ///         assert!(how.descendant);
    ///     }
    /// }
    ///
    /// let parent = Children::new();
    /// let child: Arc<dyn Canceller> = Arc::new(Call);
    /// parent.run_as_parent(|| children::record(child.clone()));
    /// assert_eq!(parent.live(), 1);
    /// parent.cancel(Cancel::new(true, true));
    /// assert_eq!(parent.live(), 0, "cancelled children are forgotten");
    /// ```
    pub fn cancel(&self, how: Cancel) {
        let how = how.for_children();
        let calls: Vec<Arc<dyn Canceller>> = {
            let mut state = self.state.lock();
            state.cancelled = Some(how);
            state
                .calls
                .drain(..)
                .filter_map(|call| call.upgrade())
                .collect()
        };
        // No lock held: cancelling a child may record or cancel others.
        for call in calls {
            call.cancel(how);
        }
    }

    /// How many children are recorded and still alive (see [`Children::cancel`]'s example).
    pub fn live(&self) -> usize {
        self.state
            .lock()
            .calls
            .iter()
            .filter(|call| call.strong_count() > 0)
            .count()
    }

    fn add(&self, call: Weak<dyn Canceller>) -> Option<Cancel> {
        let mut state = self.state.lock();
        if let Some(how) = state.cancelled {
            return Some(how);
        }
        state.calls.push(call);
        if state.calls.len() >= (state.pruned_to * 2).max(PRUNE_FLOOR) {
            state.calls.retain(|call| call.strong_count() > 0);
            state.pruned_to = state.calls.len();
        }
        None
    }
}

/// Whether this thread runs a stateless call now, whose children are recorded (see
/// [`Children::run_as_parent`]'s example).
pub fn has_parent() -> bool {
    CURRENT.with(|current| current.borrow().is_some())
}

/// Record `call`, a stateless call just submitted, as a child of the call this thread runs (if
/// any). If that parent was cancelled recursively already, `call` is cancelled now (see
/// [`Children::cancel`]'s example).
pub fn record(call: Arc<dyn Canceller>) {
    let parent = CURRENT.with(|current| current.borrow().clone());
    let Some(parent) = parent else {
        return;
    };
    if let Some(how) = parent.add(Arc::downgrade(&call)) {
        call.cancel(how);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[derive(Default)]
    struct Recorded {
        cancels: Mutex<Vec<Cancel>>,
        children: Arc<Children>,
        ran: AtomicUsize,
    }

    impl Canceller for Recorded {
        fn cancel(&self, how: Cancel) {
            self.cancels.lock().push(how);
            if how.recursive {
                self.children.cancel(how);
            }
        }
    }

    fn call() -> Arc<Recorded> {
        Arc::new(Recorded::default())
    }

    #[test]
    fn calls_submitted_while_a_parent_runs_are_its_children_and_others_are_not() {
        let parent = Children::new();
        let outside = call();
        record(outside.clone());
        let inside = call();
        parent.run_as_parent(|| record(inside.clone()));
        assert_eq!(parent.live(), 1);
        parent.cancel(Cancel::new(true, true));
        assert_eq!(inside.cancels.lock().len(), 1);
        assert!(outside.cancels.lock().is_empty());
    }

    #[test]
    fn a_recursive_cancel_reaches_grandchildren_as_descendants() {
        let parent = Children::new();
        let child = call();
        let grandchild = call();
        parent.run_as_parent(|| record(child.clone()));
        child.children.run_as_parent(|| {
            child.ran.fetch_add(1, Ordering::SeqCst);
            record(grandchild.clone())
        });
        parent.cancel(Cancel::new(true, true));
        let seen = grandchild.cancels.lock().clone();
        assert_eq!(seen.len(), 1);
        assert!(seen[0].force && seen[0].recursive && seen[0].descendant);
        assert!(child.cancels.lock()[0].descendant);
    }

    #[test]
    fn a_child_submitted_after_its_parent_was_cancelled_is_cancelled_at_once() {
        let parent = Children::new();
        parent.cancel(Cancel::new(false, true));
        let late = call();
        parent.run_as_parent(|| record(late.clone()));
        assert_eq!(late.cancels.lock().len(), 1);
        assert!(!late.cancels.lock()[0].force);
    }

    #[test]
    fn finished_children_are_pruned_and_nesting_restores_the_outer_parent() {
        let outer = Children::new();
        let inner = Children::new();
        outer.run_as_parent(|| {
            for _ in 0..(PRUNE_FLOOR * 3) {
                record(call()); // dropped at once: a finished child
            }
            inner.run_as_parent(|| record(call()));
            let kept = call();
            record(kept.clone());
            assert_eq!(outer.live(), 1);
            assert!(outer.state.lock().calls.len() < PRUNE_FLOOR * 2);
            drop(kept);
        });
        assert!(!has_parent());
    }
}
