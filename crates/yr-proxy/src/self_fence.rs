//! Self-fencing: the node pauses the instances the master could re-create elsewhere before the
//! master can declare the node lost (docs/design/024-partitions-and-etcd-outage.md).
//!
//! The leader acknowledges each numbered beat it accepted (`MasterCommand.beat`), and tells
//! the node its node timeout at registration (`RegisterNodeResponse.node_timeout_ms`). It
//! declares a node lost no earlier than `node_timeout` after it *received* the node's last beat
//! (a new leader: no earlier than `node_timeout` plus a grace after it took over), and a beat
//! is received after it is sent. So once the master accepted something the node sent at
//! instant `sent`, the node is not declared lost before `sent + node_timeout`: that is its
//! [`Lease`]. The node fences itself at `sent + node_timeout - margin` ([`Lease::fence_at`]),
//! the margin covering the liveness pass and the moment the pause takes.
//!
//! The master link owns the [`BeatLog`] (when each recent beat was sent) and the [`Leases`]
//! (the newest lease, published on a `watch`). [`guard`] follows the leases and calls
//! [`Fence::fence`] when the newest runs out, [`Fence::unfence`] when a newer one comes. Only
//! a leader answers beats (a standby refuses the heartbeat stream). While no master leads, the
//! link asks every master it knows: when all of them answer that they do not lead, no master
//! leads, and the lease is extended as long as it has not run out
//! ([`Leases::extend_while_no_master_leads`]). One standby's "no master leads" alone proves
//! nothing (a master cut off from etcd says so while another may lead); all of them do.
//!
//! The instants are [`tokio::time::Instant`]s, so the tests drive them with paused time.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// How many beats' send instants the log keeps: an acknowledgement of an older beat is ignored
/// (the lease only grows shorter for it, which is safe).
pub const BEATS_REMEMBERED: usize = 64;

/// The most the node fences itself before its lease ends.
pub const MAX_MARGIN: Duration = Duration::from_secs(1);

/// When the node sent its recent beats.
#[derive(Debug)]
pub struct BeatLog {
    next: u64,
    sent: VecDeque<(u64, Instant)>,
}

impl Default for BeatLog {
    fn default() -> Self {
        BeatLog::new()
    }
}

impl BeatLog {
    /// An empty log; the first beat is number 1 (0 means "not a beat" on the wire).
    pub fn new() -> BeatLog {
        BeatLog {
            next: 1,
            sent: VecDeque::with_capacity(BEATS_REMEMBERED),
        }
    }

    /// A beat is sent at `now`: its number.
    pub fn send(&mut self, now: Instant) -> u64 {
        let beat = self.next;
        self.next += 1;
        if self.sent.len() == BEATS_REMEMBERED {
            self.sent.pop_front();
        }
        self.sent.push_back((beat, now));
        beat
    }

    /// Beat `beat` was acknowledged: when it was sent, or `None` for a beat the log does not
    /// hold (forgotten, or never sent). It and every older beat leave the log.
    pub fn acked(&mut self, beat: u64) -> Option<Instant> {
        let mut found = None;
        while let Some(&(number, sent)) = self.sent.front() {
            if number > beat {
                break;
            }
            self.sent.pop_front();
            if number == beat {
                found = Some(sent);
            }
        }
        found
    }
}

/// The master accepted something this node sent at `sent` (a beat, or a registration): it
/// does not declare the node lost before `sent + node_timeout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// When the node sent what the master accepted.
    pub sent: Instant,
    /// The master's node timeout.
    pub node_timeout: Duration,
}

impl Lease {
    /// How long before the lease ends the node fences itself: a third of the node timeout, at
    /// most [`MAX_MARGIN`].
    pub fn margin(node_timeout: Duration) -> Duration {
        (node_timeout / 3).min(MAX_MARGIN)
    }

    /// When the node fences itself unless a newer lease comes.
    pub fn fence_at(&self) -> Instant {
        self.sent + self.node_timeout - Lease::margin(self.node_timeout)
    }
}

/// The newest lease, published to [`guard`].
#[derive(Debug)]
pub struct Leases {
    newest: watch::Sender<Option<Lease>>,
}

impl Default for Leases {
    fn default() -> Self {
        Leases::new()
    }
}

impl Leases {
    /// No lease yet: a node the master never accepted is not fenced (the master cannot declare
    /// lost what it never knew).
    pub fn new() -> Leases {
        Leases {
            newest: watch::channel(None).0,
        }
    }

    /// The master accepted `lease`; it replaces the newest if it runs longer.
    pub fn renew(&self, lease: Lease) {
        self.newest.send_if_modified(|newest| match newest {
            Some(current) if current.fence_at() >= lease.fence_at() => false,
            _ => {
                *newest = Some(lease);
                true
            }
        });
    }

    /// Every master the node knows refused questions sent at `sent` as not leading, and `now`
    /// is after the last answer. No master that led after `sent` can declare the node lost
    /// before `sent + node_timeout` (a new leader waits at least the node timeout after it
    /// took over). And none declared it lost before: that needs the node silent for the node
    /// timeout at a leader, so it cannot happen while the newest lease still runs. So a lease
    /// that still runs at `now` is extended from `sent`, with its node timeout; an expired one
    /// is not (the node may have been declared lost meanwhile: only a leader's answer lifts a
    /// fence). True if the lease was extended.
    ///
    /// This keeps an etcd outage, in which every master steps down, from pausing instances
    /// that no one can move while it lasts.
    pub fn extend_while_no_master_leads(&self, sent: Instant, now: Instant) -> bool {
        self.newest.send_if_modified(|newest| match newest {
            Some(current) if current.fence_at() > now => {
                let lease = Lease {
                    sent,
                    node_timeout: current.node_timeout,
                };
                if lease.fence_at() > current.fence_at() {
                    *newest = Some(lease);
                    true
                } else {
                    false
                }
            }
            _ => false,
        })
    }

    /// The newest lease and its changes.
    pub fn subscribe(&self) -> watch::Receiver<Option<Lease>> {
        self.newest.subscribe()
    }
}

/// What the node does when its lease runs out, and when a newer one comes.
pub trait Fence: Send + Sync + 'static {
    /// The lease `expired` ran out: pause what the master could re-create elsewhere.
    fn fence(&self, expired: Lease);
    /// A newer lease came after a fence: resume what was paused.
    fn unfence(&self, lease: Lease);
}

/// Follows `leases` and fences `fence` when the newest runs out, unfences it when a newer one
/// comes. Ends when the leases' owner is dropped.
pub async fn guard(mut leases: watch::Receiver<Option<Lease>>, fence: impl Fence) {
    let mut fenced = false;
    loop {
        let newest = *leases.borrow_and_update();
        let Some(lease) = newest else {
            if leases.changed().await.is_err() {
                return;
            }
            continue;
        };
        if lease.fence_at() <= Instant::now() {
            if !fenced {
                fence.fence(lease);
                fenced = true;
            }
            if leases.changed().await.is_err() {
                return;
            }
            continue;
        }
        if fenced {
            fence.unfence(lease);
            fenced = false;
        }
        tokio::select! {
            () = tokio::time::sleep_until(lease.fence_at()) => {}
            changed = leases.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use parking_lot::Mutex;

    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(1500);

    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Event {
        Fence(Instant),
        Unfence(Instant),
    }

    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Event>>>);

    impl Fence for Recorder {
        fn fence(&self, _: Lease) {
            self.0.lock().push(Event::Fence(Instant::now()));
        }
        fn unfence(&self, _: Lease) {
            self.0.lock().push(Event::Unfence(Instant::now()));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_lease_that_still_runs_is_extended_while_no_master_leads() {
        let leases = Leases::new();
        let start = Instant::now();
        // No lease yet: nothing to extend.
        assert!(!leases.extend_while_no_master_leads(start, start));
        leases.renew(Lease {
            sent: start,
            node_timeout: TIMEOUT,
        });
        let fence_at = leases.subscribe().borrow().unwrap().fence_at();
        // Every master said it does not lead, to questions sent 500 ms later: extended.
        tokio::time::advance(Duration::from_millis(600)).await;
        let asked = start + Duration::from_millis(500);
        assert!(leases.extend_while_no_master_leads(asked, Instant::now()));
        let extended = leases.subscribe().borrow().unwrap();
        assert_eq!(extended.sent, asked);
        assert_eq!(extended.fence_at(), fence_at + Duration::from_millis(500));
        // An older question does not shorten it.
        assert!(!leases.extend_while_no_master_leads(start, Instant::now()));
        // Once the lease ran out, the answers do not lift the fence: only a leader's may.
        tokio::time::advance(TIMEOUT).await;
        let late = Instant::now();
        assert!(!leases.extend_while_no_master_leads(late, late));
        assert_eq!(leases.subscribe().borrow().unwrap().sent, asked);
    }

    impl Recorder {
        fn events(&self) -> Vec<Event> {
            self.0.lock().clone()
        }
    }

    fn start() -> (Arc<Leases>, Recorder) {
        let leases = Arc::new(Leases::new());
        let recorder = Recorder::default();
        tokio::spawn(guard(leases.subscribe(), recorder.clone()));
        (leases, recorder)
    }

    #[test]
    fn the_margin_is_a_third_of_the_timeout_and_at_most_a_second() {
        assert_eq!(Lease::margin(TIMEOUT), Duration::from_millis(500));
        assert_eq!(
            Lease::margin(Duration::from_secs(3)),
            Duration::from_secs(1)
        );
        assert_eq!(
            Lease::margin(Duration::from_secs(30)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn the_log_gives_each_acknowledged_beat_its_send_instant_once() {
        let start = Instant::now();
        let mut log = BeatLog::new();
        let first = log.send(start);
        let second = log.send(start + Duration::from_millis(500));
        let third = log.send(start + Duration::from_secs(1));
        assert_eq!((first, second, third), (1, 2, 3));
        assert_eq!(log.acked(2), Some(start + Duration::from_millis(500)));
        // An older beat's acknowledgement after a newer one's, or one again, is not news.
        assert_eq!(log.acked(1), None);
        assert_eq!(log.acked(2), None);
        assert_eq!(log.acked(3), Some(start + Duration::from_secs(1)));
        // A beat never sent.
        assert_eq!(log.acked(99), None);
    }

    #[test]
    fn the_log_remembers_only_the_last_beats() {
        let start = Instant::now();
        let mut log = BeatLog::new();
        for i in 0..(BEATS_REMEMBERED as u64 + 10) {
            log.send(start + Duration::from_millis(i));
        }
        assert_eq!(log.acked(10), None, "forgotten");
        assert_eq!(log.acked(11), Some(start + Duration::from_millis(10)));
    }

    #[test]
    fn a_lease_only_grows() {
        let now = Instant::now();
        let leases = Leases::new();
        let newer = Lease {
            sent: now + Duration::from_secs(1),
            node_timeout: TIMEOUT,
        };
        leases.renew(newer);
        leases.renew(Lease {
            sent: now,
            node_timeout: TIMEOUT,
        });
        assert_eq!(*leases.subscribe().borrow(), Some(newer));
    }

    #[tokio::test(start_paused = true)]
    async fn no_lease_no_fence() {
        let (_leases, recorder) = start();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(recorder.events(), Vec::new());
    }

    #[tokio::test(start_paused = true)]
    async fn acknowledged_beats_keep_the_node_unfenced_and_silence_fences_it_before_the_master_can_declare_it_lost(
    ) {
        let (leases, recorder) = start();
        let beat = Duration::from_millis(500);
        let mut last_sent = Instant::now();
        for _ in 0..20 {
            last_sent = Instant::now();
            leases.renew(Lease {
                sent: last_sent,
                node_timeout: TIMEOUT,
            });
            tokio::time::sleep(beat).await;
        }
        assert_eq!(recorder.events(), Vec::new());
        // Silence: the fence comes a margin before the master could declare the node lost.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let events = recorder.events();
        assert_eq!(events.len(), 1, "{events:?}");
        let Event::Fence(at) = events[0] else {
            panic!("{events:?}")
        };
        assert_eq!(at, last_sent + TIMEOUT - Duration::from_millis(500));
        assert!(at < last_sent + TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_newer_lease_after_a_fence_unfences_once() {
        let (leases, recorder) = start();
        let first = Instant::now();
        leases.renew(Lease {
            sent: first,
            node_timeout: TIMEOUT,
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            recorder.events(),
            vec![Event::Fence(first + Duration::from_secs(1))]
        );
        // A master answers again (a failover that did not declare the node lost).
        let again = Instant::now();
        leases.renew(Lease {
            sent: again - Duration::from_millis(10),
            node_timeout: TIMEOUT,
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            recorder.events(),
            vec![
                Event::Fence(first + Duration::from_secs(1)),
                Event::Unfence(again)
            ]
        );
        // An acknowledgement that comes too late to extend the lease does not unfence.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let late = Instant::now();
        leases.renew(Lease {
            sent: late - Duration::from_secs(2),
            node_timeout: TIMEOUT,
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(recorder.events().len(), 3, "{:?}", recorder.events());
        assert!(matches!(recorder.events()[2], Event::Fence(_)));
    }
}
