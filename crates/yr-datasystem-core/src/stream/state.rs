//! The state of one stream under its lock: its subscriptions and consumers, the elements not
//! yet reclaimed, dealing elements to consumers, reclaiming what every subscription acked; and
//! the store's map of streams.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use yr_common::Error;

use super::{ProducerConfig, SubscriptionType};

/// One consumer's share of its subscription.
#[derive(Debug, Default)]
pub(super) struct ConsumerState {
    /// Dealt to this consumer, not received yet (ascending ids).
    pub(super) pending: VecDeque<u64>,
    /// Received, not acked yet (ascending ids).
    pub(super) unacked: VecDeque<u64>,
    /// The highest id received.
    pub(super) last_received: u64,
}

impl ConsumerState {
    /// The lowest id this consumer still holds.
    fn low(&self) -> Option<u64> {
        match (self.unacked.front(), self.pending.front()) {
            (Some(a), Some(b)) => Some(*a.min(b)),
            (a, b) => a.or(b).copied(),
        }
    }
}

/// Wait for `changed` until `deadline` (`None`: forever). Returns whether the deadline passed.
pub(super) fn wait_changed<T>(
    changed: &Condvar,
    state: &mut parking_lot::MutexGuard<'_, T>,
    deadline: Option<Instant>,
) -> bool {
    match deadline {
        Some(deadline) => changed.wait_until(state, deadline).timed_out(),
        None => {
            changed.wait(state);
            false
        }
    }
}

pub(super) fn insert_sorted(queue: &mut VecDeque<u64>, id: u64) {
    match queue.back() {
        Some(back) if *back > id => {
            let at = queue.partition_point(|x| *x < id);
            queue.insert(at, id);
        }
        _ => queue.push_back(id),
    }
}

#[derive(Debug)]
pub(super) struct Subscription {
    pub(super) kind: SubscriptionType,
    /// Its consumers, in the order they joined; elements are dealt to them in turn.
    pub(super) consumers: Vec<u64>,
    /// The next consumer (index into `consumers`) to deal to.
    pub(super) turn: usize,
    /// The first element id it gets.
    pub(super) start: u64,
}

#[derive(Debug)]
pub(super) struct StreamState {
    pub(super) config: ProducerConfig,
    /// Elements not reclaimed yet: ids `first_id..next_id`.
    pub(super) elements: VecDeque<Bytes>,
    pub(super) first_id: u64,
    pub(super) next_id: u64,
    pub(super) bytes: usize,
    /// Ids in `first_id..next_id` that hold no element (an adopted stream's gaps: batches the
    /// lost home appended but never replicated, so never acknowledged), ascending.
    pub(super) holes: VecDeque<u64>,
    /// Producers, with the number of the last batch of theirs appended (0: none numbered).
    pub(super) producers: HashMap<u64, u64>,
    pub(super) subscriptions: HashMap<String, Subscription>,
    pub(super) consumers: HashMap<u64, (String, ConsumerState)>,
    /// Subscriptions ever created (for `retain_for_num_consumers`).
    pub(super) subscriptions_created: u32,
    pub(super) removed: bool,
    /// An adopted stream's subscriptions whose consumers have not resumed yet (type, first
    /// id); nothing is reclaimed until they do or `awaiting_until` passes.
    pub(super) awaiting: HashMap<String, (SubscriptionType, u64)>,
    pub(super) awaiting_until: Option<Instant>,
}

impl StreamState {
    pub(super) fn new(config: ProducerConfig) -> Self {
        StreamState {
            config,
            elements: VecDeque::new(),
            first_id: 1,
            next_id: 1,
            bytes: 0,
            holes: VecDeque::new(),
            producers: HashMap::new(),
            subscriptions: HashMap::new(),
            consumers: HashMap::new(),
            subscriptions_created: 0,
            removed: false,
            awaiting: HashMap::new(),
            awaiting_until: None,
        }
    }

    pub(super) fn retaining(&self) -> bool {
        self.subscriptions_created < self.config.retain_for_num_consumers
    }

    /// Deal `id` to the next consumer of every subscription.
    pub(super) fn deal(&mut self, id: u64) {
        for subscription in self.subscriptions.values_mut() {
            if subscription.consumers.is_empty() {
                continue;
            }
            let index = subscription.turn % subscription.consumers.len();
            subscription.turn = index + 1;
            let consumer = subscription.consumers[index];
            if let Some((_, state)) = self.consumers.get_mut(&consumer) {
                insert_sorted(&mut state.pending, id);
            }
        }
    }

    /// Drop the elements every subscription is done with.
    pub(super) fn reclaim(&mut self) {
        if self.retaining() {
            return;
        }
        if !self.awaiting.is_empty() {
            if self
                .awaiting_until
                .is_none_or(|until| Instant::now() < until)
            {
                return;
            }
            self.awaiting.clear();
        }
        let low = self
            .consumers
            .values()
            .filter_map(|(_, state)| state.low())
            .min()
            .unwrap_or(self.next_id);
        while self.first_id < low {
            match self.elements.pop_front() {
                Some(element) => {
                    self.bytes -= element.len();
                    if self.holes.front() == Some(&self.first_id) {
                        self.holes.pop_front();
                    }
                    self.first_id += 1;
                }
                None => break,
            }
        }
    }
}

#[derive(Debug)]
pub(super) struct Stream {
    pub(super) name: String,
    pub(super) state: Mutex<StreamState>,
    /// Elements arrived, room was freed, or the stream or store changed.
    pub(super) changed: Condvar,
}

#[derive(Debug, Default)]
pub(super) struct StoreInner {
    pub(super) streams: Mutex<HashMap<String, Arc<Stream>>>,
    pub(super) next_id: AtomicU64,
    pub(super) closed: Mutex<Option<Error>>,
    /// Receives waiting for elements.
    pub(super) receives_waiting: yr_common::Waiting,
    /// Sends waiting for room.
    pub(super) sends_waiting: yr_common::Waiting,
}
