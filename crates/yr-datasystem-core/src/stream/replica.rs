//! A stream's copy on its backup node (docs/design/025-stream-home-failover.md): what the
//! home sends ([`ReplicaUpdate`]), how the backup keeps it ([`Replica`]), and how the store
//! turns a replica into a stream that lives here when the backup takes the home over
//! ([`StreamStore::adopt`]), and lets the producers and consumers of the lost home resume on
//! it ([`StreamStore::resume_producer`], [`StreamStore::resume_consumer`]).
//!
//! Updates commute: elements are kept by id, the low-water mark and producers' batch numbers
//! only grow, subscriptions are a union. So updates of concurrent sends may arrive in any
//! order, and a full snapshot may overtake an increment, with the same result.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use yr_common::{Error, Result};

use super::state::{insert_sorted, ConsumerState, Stream, StreamState, Subscription};
use super::{ProducerConfig, StreamError, StreamStore, SubscriptionConfig, SubscriptionType};

/// What the home tells its backup about one stream: a batch it appended, a subscription it
/// created, or everything it holds (a snapshot, when the backup changed).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReplicaUpdate {
    /// The stream's configuration (set by snapshots and creates).
    pub config: Option<ProducerConfig>,
    /// The home's lowest element not reclaimed: the backup drops everything below.
    pub low: u64,
    /// The id of the first element of `elements`.
    pub first_id: u64,
    /// Elements with ids `first_id..`; a snapshot's holes (reclaimed or never kept) are empty
    /// and listed in `holes`.
    pub elements: Vec<Bytes>,
    /// Ids among `elements` that are not elements (a snapshot's gaps).
    pub holes: Vec<u64>,
    /// One past the highest id the home gave (a snapshot's; increments imply it).
    pub next_id: u64,
    /// Producers and the number of the last batch of theirs that the home appended.
    pub producers: Vec<(u64, u64)>,
    /// Subscriptions: name, type, and the first id they get.
    pub subscriptions: Vec<(String, SubscriptionType, u64)>,
}

impl ReplicaUpdate {
    /// This update as parts of at most about `max_bytes` of elements each (one element may
    /// exceed it alone), which the backup may apply in any order with the same result.
    pub fn split(self, max_bytes: usize) -> Vec<ReplicaUpdate> {
        let total: usize = self.elements.iter().map(Bytes::len).sum();
        if total <= max_bytes {
            return vec![self];
        }
        let mut parts = Vec::new();
        let mut part = ReplicaUpdate {
            elements: Vec::new(),
            ..self.clone()
        };
        let mut bytes = 0;
        for (offset, element) in self.elements.into_iter().enumerate() {
            if bytes > 0 && bytes + element.len() > max_bytes {
                let next_first = self.first_id + offset as u64;
                let full = std::mem::replace(
                    &mut part,
                    ReplicaUpdate {
                        config: None,
                        low: self.low,
                        first_id: next_first,
                        elements: Vec::new(),
                        holes: self.holes.clone(),
                        next_id: self.next_id,
                        producers: Vec::new(),
                        subscriptions: Vec::new(),
                    },
                );
                parts.push(full);
                bytes = 0;
            }
            bytes += element.len();
            part.elements.push(element);
        }
        parts.push(part);
        parts
    }
}

/// A backup's copy of one stream.
#[derive(Clone, Debug, Default)]
pub struct Replica {
    /// The configuration, once an update carried it.
    pub config: Option<ProducerConfig>,
    /// Elements the home acknowledged and has not reclaimed, by id.
    pub elements: BTreeMap<u64, Bytes>,
    /// Every id below is reclaimed at the home.
    pub low: u64,
    /// One past the highest id seen.
    pub next_id: u64,
    /// The last batch number of each producer.
    pub producers: HashMap<u64, u64>,
    /// Subscriptions: type and first id.
    pub subscriptions: HashMap<String, (SubscriptionType, u64)>,
    /// The bytes of `elements`.
    pub bytes: usize,
}

impl Replica {
    /// Merge `update` in (in any order with other updates).
    pub fn apply(&mut self, update: ReplicaUpdate) {
        if update.config.is_some() {
            self.config = update.config;
        }
        self.low = self.low.max(update.low);
        self.next_id = self
            .next_id
            .max(update.next_id)
            .max(update.first_id + update.elements.len() as u64);
        for (offset, value) in update.elements.into_iter().enumerate() {
            let id = update.first_id + offset as u64;
            if id < self.low || update.holes.binary_search(&id).is_ok() {
                continue;
            }
            let length = value.len();
            if self.elements.insert(id, value).is_none() {
                self.bytes += length;
            }
        }
        while let Some(entry) = self.elements.first_entry() {
            if *entry.key() >= self.low {
                break;
            }
            self.bytes -= entry.remove().len();
        }
        for (producer, batch) in update.producers {
            let last = self.producers.entry(producer).or_default();
            *last = (*last).max(batch);
        }
        for (name, kind, start) in update.subscriptions {
            self.subscriptions.entry(name).or_insert((kind, start));
        }
    }
}

/// What [`StreamStore::send_batch`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sent {
    /// Appended with ids `first_id..`; the stream's lowest id not reclaimed is `low`, and
    /// `kept` says whether the elements stay (they do not without subscriptions).
    Appended {
        /// The first element's id.
        first_id: u64,
        /// The lowest id not reclaimed, after the append.
        low: u64,
        /// Whether the elements were kept.
        kept: bool,
    },
    /// The producer's batch of that number was appended before (a retry): nothing appended.
    Duplicate,
}

impl StreamStore {
    /// Everything stream `name` holds here, as one update (None if it does not live here);
    /// without its elements unless `with_elements`.
    pub fn snapshot(&self, name: &str, with_elements: bool) -> Option<ReplicaUpdate> {
        let stream = self.stream(name)?;
        let state = stream.state.lock();
        let (first_id, elements, holes) = if with_elements {
            (
                state.first_id,
                state.elements.iter().cloned().collect(),
                state.holes.iter().copied().collect(),
            )
        } else {
            (state.next_id, Vec::new(), Vec::new())
        };
        let mut update = ReplicaUpdate {
            config: Some(state.config.clone()),
            low: state.first_id,
            first_id,
            elements,
            holes,
            next_id: state.next_id,
            producers: state.producers.iter().map(|(p, b)| (*p, *b)).collect(),
            subscriptions: Vec::new(),
        };
        for (name, subscription) in &state.subscriptions {
            update
                .subscriptions
                .push((name.clone(), subscription.kind, subscription.start));
        }
        for (name, (kind, start)) in &state.awaiting {
            update.subscriptions.push((name.clone(), *kind, *start));
        }
        Some(update)
    }

    /// Make `replica` a stream that lives here, unless one of that name does. Its
    /// subscriptions wait up to `grace` for their consumers to resume
    /// ([`StreamStore::resume_consumer`]); until then no element is reclaimed.
    pub fn adopt(&self, name: &str, replica: Replica, grace: Duration) -> Result<()> {
        self.check_open()?;
        let mut streams = self.inner.streams.lock();
        if streams.contains_key(name) {
            return Ok(());
        }
        let config = replica.config.unwrap_or_default();
        let mut state = StreamState::new(config);
        let next_id = replica.next_id.max(1);
        let first = replica
            .elements
            .keys()
            .next()
            .copied()
            .unwrap_or(next_id)
            .max(replica.low);
        state.first_id = first;
        state.next_id = next_id.max(first);
        let mut elements = replica.elements.into_iter().peekable();
        for id in first..state.next_id {
            match elements.next_if(|(at, _)| *at == id) {
                Some((_, value)) => {
                    state.bytes += value.len();
                    state.elements.push_back(value);
                }
                None => {
                    state.elements.push_back(Bytes::new());
                    state.holes.push_back(id);
                }
            }
        }
        state.producers = replica.producers;
        state.awaiting = replica.subscriptions;
        state.awaiting_until = Instant::now().checked_add(grace);
        streams.insert(
            name.to_string(),
            std::sync::Arc::new(Stream {
                name: name.to_string(),
                state: Mutex::new(state),
                changed: Condvar::new(),
            }),
        );
        Ok(())
    }

    /// Give up stream `name` here: it lives on another node now. Every call on it, and every
    /// call waiting, fails as on a removed stream.
    pub fn forget(&self, name: &str) {
        let Some(stream) = self.inner.streams.lock().remove(name) else {
            return;
        };
        stream.state.lock().removed = true;
        stream.changed.notify_all();
    }

    /// The names of the streams that live here.
    pub fn names(&self) -> Vec<String> {
        self.inner.streams.lock().keys().cloned().collect()
    }

    /// Producer `id` of a lost home carries on here, with `config` if its stream is new here.
    pub fn resume_producer(&self, name: &str, id: u64, config: &ProducerConfig) -> Result<()> {
        self.check_open()?;
        loop {
            let stream = self.stream_or_create(name, config);
            let mut state = stream.state.lock();
            if state.removed {
                continue;
            }
            state.producers.entry(id).or_insert(0);
            return Ok(());
        }
    }

    /// Consumer `id` of a lost home carries on here in `subscription`, having received every
    /// element up to `last_received`: it gets the elements after that (its stream must live
    /// here). In a `RoundRobin` subscription, the first consumer to resume gets every element
    /// the subscription had not acked (at least once), and the others get new elements.
    pub fn resume_consumer(
        &self,
        name: &str,
        id: u64,
        subscription: &SubscriptionConfig,
        last_received: u64,
    ) -> Result<()> {
        self.check_open()?;
        subscription.validate()?;
        let stream = self.stream_or_create(name, &ProducerConfig::default());
        let mut state = stream.state.lock();
        if state.removed {
            return Err(Self::closed_error(name, "consumer", id));
        }
        if state.consumers.contains_key(&id) {
            return Ok(());
        }
        let sub_name = &subscription.subscription_name;
        let mut consumer = ConsumerState {
            last_received,
            ..ConsumerState::default()
        };
        match state.subscriptions.get_mut(sub_name) {
            Some(existing) => {
                if existing.kind != subscription.subscription_type {
                    return Err(wrong_type(name, sub_name, existing.kind));
                }
                existing.consumers.push(id);
            }
            None => {
                let (kind, start) = state.awaiting.remove(sub_name).unwrap_or((
                    subscription.subscription_type,
                    last_received.saturating_add(1),
                ));
                if kind != subscription.subscription_type {
                    return Err(wrong_type(name, sub_name, kind));
                }
                let from = start
                    .max(last_received.saturating_add(1))
                    .max(state.first_id);
                for at in from..state.next_id {
                    if state.holes.binary_search(&at).is_err() {
                        insert_sorted(&mut consumer.pending, at);
                    }
                }
                state.subscriptions.insert(
                    sub_name.clone(),
                    Subscription {
                        kind,
                        consumers: vec![id],
                        turn: 0,
                        start,
                    },
                );
            }
        }
        state.consumers.insert(id, (sub_name.clone(), consumer));
        state.reclaim();
        drop(state);
        stream.changed.notify_all();
        Ok(())
    }
}

fn wrong_type(name: &str, subscription: &str, kind: SubscriptionType) -> Error {
    StreamError::InvalidArgument(format!(
        "subscription {subscription:?} of stream {name:?} is of type {kind:?}; resume it with \
         that type"
    ))
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::SubscriptionConfig;

    fn sub(name: &str) -> SubscriptionConfig {
        SubscriptionConfig::new(name, SubscriptionType::Stream)
    }

    fn values(elements: &[crate::stream::Element]) -> Vec<Bytes> {
        elements.iter().map(|e| e.value.clone()).collect()
    }

    #[test]
    fn updates_commute_and_the_low_water_mark_drops_reclaimed_elements() {
        let first = ReplicaUpdate {
            low: 1,
            first_id: 1,
            elements: vec!["a".into(), "b".into()],
            producers: vec![(7, 1)],
            ..ReplicaUpdate::default()
        };
        let second = ReplicaUpdate {
            low: 2,
            first_id: 3,
            elements: vec!["c".into()],
            producers: vec![(7, 2)],
            subscriptions: vec![("s".into(), SubscriptionType::Stream, 1)],
            ..ReplicaUpdate::default()
        };
        let mut one = Replica::default();
        one.apply(first.clone());
        one.apply(second.clone());
        let mut other = Replica::default();
        other.apply(second);
        other.apply(first);
        for replica in [&one, &other] {
            assert_eq!(replica.elements.keys().copied().collect::<Vec<_>>(), [2, 3]);
            assert_eq!(replica.bytes, 2);
            assert_eq!(replica.next_id, 4);
            assert_eq!(replica.producers[&7], 2);
        }
    }

    #[test]
    fn a_large_update_splits_into_parts_that_add_up_to_it() {
        let update = ReplicaUpdate {
            config: Some(ProducerConfig::default()),
            low: 3,
            first_id: 3,
            elements: (0..10u8).map(|i| Bytes::from(vec![i; 4])).collect(),
            next_id: 13,
            producers: vec![(1, 2)],
            subscriptions: vec![("s".into(), SubscriptionType::Stream, 3)],
            ..ReplicaUpdate::default()
        };
        let parts = update.clone().split(10);
        assert_eq!(parts.len(), 5);
        assert!(parts.iter().all(|p| p.elements.len() == 2));
        let mut whole = Replica::default();
        whole.apply(update);
        let mut pieces = Replica::default();
        for part in parts.into_iter().rev() {
            pieces.apply(part);
        }
        assert_eq!(pieces.elements, whole.elements);
        assert_eq!(pieces.next_id, 13);
        assert_eq!(pieces.producers, whole.producers);
        assert_eq!(pieces.subscriptions, whole.subscriptions);
    }

    #[test]
    fn an_adopted_stream_resumes_its_consumer_after_what_it_received_and_dedups_batches() {
        let home = StreamStore::new();
        let c = home.create_consumer("s", &sub("a")).unwrap();
        let p = home
            .create_producer("s", &ProducerConfig::default())
            .unwrap();
        let mut backup = Replica::default();
        backup.apply(home.snapshot("s", true).unwrap());
        for batch in 1..=3u64 {
            let elements: Vec<Bytes> = vec![Bytes::from(vec![batch as u8; 2]); 2];
            let sent = home
                .send_batch("s", p, batch, elements.clone(), Duration::ZERO)
                .unwrap();
            let Sent::Appended { first_id, low, .. } = sent else {
                panic!("{sent:?}");
            };
            backup.apply(ReplicaUpdate {
                low,
                first_id,
                elements,
                producers: vec![(p, batch)],
                ..ReplicaUpdate::default()
            });
        }
        // The consumer received and acked the first batch, and received the second.
        assert_eq!(home.receive("s", c, 2, Duration::ZERO).unwrap().len(), 2);
        home.ack("s", c, 2).unwrap();
        assert_eq!(home.receive("s", c, 2, Duration::ZERO).unwrap().len(), 2);
        // The home is lost: the backup adopts, the consumer resumes after id 4.
        let taken = StreamStore::new();
        taken.adopt("s", backup, Duration::from_secs(60)).unwrap();
        taken
            .resume_producer("s", p, &ProducerConfig::default())
            .unwrap();
        // The producer's retry of batch 3 (its ack was lost) is not appended again.
        assert_eq!(
            taken
                .send_batch("s", p, 3, vec!["again".into()], Duration::ZERO)
                .unwrap(),
            Sent::Duplicate
        );
        taken
            .send_batch("s", p, 4, vec!["new".into()], Duration::ZERO)
            .unwrap();
        taken.resume_consumer("s", c, &sub("a"), 4).unwrap();
        let got = taken.receive("s", c, 0, Duration::ZERO).unwrap();
        assert_eq!(got.iter().map(|e| e.id).collect::<Vec<_>>(), [5, 6, 7]);
        assert_eq!(
            values(&got),
            [
                Bytes::from(vec![3u8; 2]),
                Bytes::from(vec![3u8; 2]),
                "new".into()
            ]
        );
        taken.ack("s", c, 7).unwrap();
        assert_eq!(taken.used_bytes("s"), 0);
    }

    #[test]
    fn a_hole_left_by_an_unreplicated_batch_is_never_delivered() {
        // Batches 1 and 3 reached the backup; batch 2 (id 2) never did, so it was never
        // acknowledged, and its producer sends it again to the new home.
        let mut replica = Replica::default();
        for (id, value) in [(1, "a"), (3, "c")] {
            replica.apply(ReplicaUpdate {
                low: 1,
                first_id: id,
                elements: vec![value.into()],
                subscriptions: vec![("s".into(), SubscriptionType::Stream, 1)],
                ..ReplicaUpdate::default()
            });
        }
        let store = StreamStore::new();
        store.adopt("x", replica, Duration::from_secs(60)).unwrap();
        store.resume_consumer("x", 9, &sub("s"), 0).unwrap();
        let got = store.receive("x", 9, 0, Duration::ZERO).unwrap();
        assert_eq!(got.iter().map(|e| e.id).collect::<Vec<_>>(), [1, 3]);
        // A snapshot of the adopted stream carries the hole to the next backup.
        let mut next = Replica::default();
        next.apply(store.snapshot("x", true).unwrap());
        assert_eq!(next.elements.keys().copied().collect::<Vec<_>>(), [1, 3]);
        // Once acked, the hole is reclaimed with its neighbours.
        store.ack("x", 9, 3).unwrap();
        assert_eq!(store.used_bytes("x"), 0);
        assert_eq!(store.snapshot("x", true).unwrap().holes, Vec::<u64>::new());
    }

    #[test]
    fn awaited_subscriptions_hold_elements_until_their_grace_ends() {
        let mut replica = Replica::default();
        replica.apply(ReplicaUpdate {
            low: 1,
            first_id: 1,
            elements: vec!["a".into()],
            subscriptions: vec![("s".into(), SubscriptionType::Stream, 1)],
            ..ReplicaUpdate::default()
        });
        let store = StreamStore::new();
        store
            .adopt("held", replica.clone(), Duration::from_secs(60))
            .unwrap();
        let p = store
            .create_producer("held", &ProducerConfig::default())
            .unwrap();
        store
            .send("held", p, vec!["b".into()], Duration::ZERO)
            .unwrap();
        assert_eq!(store.used_bytes("held"), 2);
        store.adopt("gone", replica, Duration::ZERO).unwrap();
        let p = store
            .create_producer("gone", &ProducerConfig::default())
            .unwrap();
        store
            .send("gone", p, vec!["b".into()], Duration::ZERO)
            .unwrap();
        assert_eq!(store.used_bytes("gone"), 0);
    }
}
