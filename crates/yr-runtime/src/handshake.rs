//! The synchronization cores of the call channel's poller and of spinning, kept small and apart
//! so that `loom` can check every interleaving of them (`cargo test -p yr-runtime --features
//! loom --lib handshake`; docs/design/013-fail-points-and-clock.md). Built with the `loom`
//! feature, the atomics and locks here are loom's; otherwise std's.
//!
//! - [`Doorbell`]: work handed to a thread that sleeps when it has none (the poller and the
//!   writers that defer frames to it). The sleeper announces its sleep, then looks once more;
//!   a producer queues, then looks at the announcement. With both in sequentially consistent
//!   order, a producer either sees the announcement and rings, or queued before the last look:
//!   no wakeup is lost.
//! - [`SpinSlots`]: how many threads may spin at once.

#[cfg(feature = "loom")]
use loom::sync::{
    atomic::{AtomicBool, AtomicUsize, Ordering},
    Mutex,
};
#[cfg(not(feature = "loom"))]
use std::sync::{
    atomic::{AtomicBool, AtomicUsize, Ordering},
    Mutex,
};

/// Items handed to one owner thread that sleeps while it has none.
#[derive(Debug)]
pub(crate) struct Doorbell<T> {
    queue: Mutex<Vec<T>>,
    sleeping: AtomicBool,
}

impl<T> Doorbell<T> {
    pub(crate) fn new() -> Doorbell<T> {
        Doorbell {
            queue: Mutex::new(Vec::new()),
            sleeping: AtomicBool::new(false),
        }
    }

    /// Hand `item` to the owner. Returns whether the owner may be asleep: then the caller
    /// must ring (wake it through whatever it sleeps on).
    pub(crate) fn push(&self, item: T) -> bool {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(item);
        self.sleeping.load(Ordering::SeqCst)
    }

    /// Everything handed over so far.
    pub(crate) fn take(&self) -> Vec<T> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Whether nothing waits.
    pub(crate) fn is_empty(&self) -> bool {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// The owner's sleep: announce it, look once more, and `sleep` only if nothing came in
    /// meanwhile (a push after that look sees the announcement and rings). `None` when it
    /// did not sleep.
    pub(crate) fn sleep_unless_pending<R>(&self, sleep: impl FnOnce() -> R) -> Option<R> {
        self.sleeping.store(true, Ordering::SeqCst);
        let slept = self.is_empty().then(sleep);
        self.sleeping.store(false, Ordering::SeqCst);
        slept
    }
}

/// Admission to spinning: at most `max` threads hold a slot at once.
#[derive(Debug)]
pub(crate) struct SpinSlots {
    spinning: AtomicUsize,
}

/// A held spin slot, given back on drop.
pub(crate) struct SpinSlot<'a> {
    slots: &'a SpinSlots,
}

impl SpinSlots {
    pub(crate) fn new() -> SpinSlots {
        SpinSlots {
            spinning: AtomicUsize::new(0),
        }
    }

    /// A slot, if fewer than `max` are held.
    pub(crate) fn enter(&self, max: usize) -> Option<SpinSlot<'_>> {
        self.spinning
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| SpinSlot { slots: self })
    }

    /// Slots held now.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.spinning.load(Ordering::Acquire)
    }
}

impl Drop for SpinSlot<'_> {
    fn drop(&mut self) {
        self.slots.spinning.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(all(test, feature = "loom"))]
mod loom_tests {
    //! Every interleaving, by loom. A lost wakeup shows as a deadlock: the owner asleep for
    //! good with work queued and every producer done.

    use super::*;
    use loom::sync::{Arc, Condvar};
    use loom::thread;

    /// Every interleaving with up to three preemptions (as tokio checks its own), which
    /// covers the announce/look/push/ring orders and ends in seconds.
    fn model(f: impl Fn() + Sync + Send + 'static) {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(3);
        builder.check(f);
    }

    /// What the poller sleeps on (its eventfd): rings count until the sleeper takes them.
    struct Bell {
        rings: Mutex<u64>,
        rung: Condvar,
    }

    impl Bell {
        fn new() -> Bell {
            Bell {
                rings: Mutex::new(0),
                rung: Condvar::new(),
            }
        }

        fn ring(&self) {
            *self.rings.lock().unwrap() += 1;
            self.rung.notify_one();
        }

        fn wait(&self) {
            let mut rings = self.rings.lock().unwrap();
            while *rings == 0 {
                rings = self.rung.wait(rings).unwrap();
            }
            *rings = 0;
        }
    }

    /// The poller's loop over `producers` producers of one item each.
    fn owner_receives_everything(producers: usize) {
        model(move || {
            let doorbell = Arc::new(Doorbell::new());
            let bell = Arc::new(Bell::new());
            let handles: Vec<_> = (0..producers)
                .map(|item| {
                    let doorbell = doorbell.clone();
                    let bell = bell.clone();
                    thread::spawn(move || {
                        if doorbell.push(item) {
                            bell.ring();
                        }
                    })
                })
                .collect();
            let mut received = Vec::new();
            while received.len() < producers {
                received.extend(doorbell.take());
                if received.len() < producers {
                    doorbell.sleep_unless_pending(|| bell.wait());
                }
            }
            received.sort_unstable();
            assert_eq!(received, (0..producers).collect::<Vec<_>>());
            for handle in handles {
                handle.join().unwrap();
            }
        });
    }

    #[test]
    fn loom_doorbell_loses_no_wakeup_with_one_producer() {
        owner_receives_everything(1);
    }

    #[test]
    fn loom_doorbell_loses_no_wakeup_with_two_producers() {
        owner_receives_everything(2);
    }

    /// The check has teeth: a sleeper that looks before it announces its sleep loses the
    /// wakeup of a push in between, and loom finds that interleaving (a deadlock).
    #[test]
    #[should_panic]
    fn loom_a_sleeper_that_looks_before_it_announces_loses_a_wakeup() {
        model(|| {
            let doorbell = Arc::new(Doorbell::new());
            let bell = Arc::new(Bell::new());
            let producer = {
                let doorbell = doorbell.clone();
                let bell = bell.clone();
                thread::spawn(move || {
                    if doorbell.push(0) {
                        bell.ring();
                    }
                })
            };
            let mut received = doorbell.take();
            while received.is_empty() {
                // The wrong order: look, then announce.
                if doorbell.is_empty() {
                    doorbell.sleeping.store(true, Ordering::SeqCst);
                    bell.wait();
                    doorbell.sleeping.store(false, Ordering::SeqCst);
                }
                received = doorbell.take();
            }
            producer.join().unwrap();
        });
    }

    #[test]
    fn loom_spin_slots_admit_at_most_max_and_all_come_back() {
        model(|| {
            let slots = Arc::new(SpinSlots::new());
            let inside = Arc::new(AtomicUsize::new(0));
            let handles: Vec<_> = (0..2)
                .map(|_| {
                    let slots = slots.clone();
                    let inside = inside.clone();
                    thread::spawn(move || {
                        if let Some(_slot) = slots.enter(1) {
                            let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                            assert!(now <= 1, "{now} threads spin with a limit of 1");
                            inside.fetch_sub(1, Ordering::SeqCst);
                        }
                    })
                })
                .collect();
            for handle in handles {
                handle.join().unwrap();
            }
            assert_eq!(slots.held(), 0);
        });
    }
}

#[cfg(all(test, not(feature = "loom")))]
mod tests {
    use super::*;

    #[test]
    fn a_doorbell_rings_only_for_a_sleeper_and_hands_over_in_order() {
        let doorbell = Doorbell::new();
        assert!(!doorbell.push(1), "nobody sleeps: no ring");
        let mut rang = false;
        // Work is pending: the owner does not sleep.
        assert!(doorbell.sleep_unless_pending(|| ()).is_none());
        assert_eq!(doorbell.take(), vec![1]);
        doorbell.sleep_unless_pending(|| rang = doorbell.push(2));
        assert!(rang, "a push during the sleep rings");
        assert_eq!(doorbell.take(), vec![2]);
    }

    #[test]
    fn spin_slots_are_limited_and_come_back() {
        let slots = SpinSlots::new();
        let first = slots.enter(2).expect("a slot");
        let second = slots.enter(2).expect("a second slot");
        assert!(slots.enter(2).is_none());
        drop(first);
        assert!(slots.enter(2).is_some());
        drop(second);
        assert_eq!(slots.held(), 0);
        assert!(slots.enter(0).is_none(), "0 turns spinning off");
    }
}
