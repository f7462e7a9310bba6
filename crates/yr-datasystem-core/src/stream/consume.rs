//! The consumer side of [`StreamStore`]: creating a consumer in a subscription, receiving
//! elements (waiting up to a timeout), acknowledging them, and closing a consumer (handing what
//! it held to the subscription's other consumers).

use std::time::{Duration, Instant};

use yr_common::Result;

use super::state::{insert_sorted, wait_changed, ConsumerState, Subscription};
use super::{
    validate_stream_name, Element, ProducerConfig, StreamError, StreamStore, SubscriptionConfig,
    SubscriptionType, MAX_RECEIVE_BYTES,
};

impl StreamStore {
    /// A new consumer of stream `name` (created if it does not exist) in `subscription`. 1001
    /// if a [`SubscriptionType::Stream`] subscription of that name already has its consumer,
    /// or the name is taken by a subscription of the other type.
    pub fn create_consumer(&self, name: &str, subscription: &SubscriptionConfig) -> Result<u64> {
        self.check_open()?;
        validate_stream_name(name)?;
        subscription.validate()?;
        loop {
            let stream = self.stream_or_create(name, &ProducerConfig::default());
            let mut state = stream.state.lock();
            if state.removed {
                continue;
            }
            if state.awaiting.contains_key(&subscription.subscription_name) {
                // The subscription of an adopted stream: this consumer carries it on.
                drop(state);
                let id = self.new_id();
                self.resume_consumer(name, id, subscription, 0)?;
                return Ok(id);
            }
            let id = self.new_id();
            let sub_name = &subscription.subscription_name;
            let start = match state.subscriptions.get_mut(sub_name) {
                Some(existing) => {
                    if existing.kind != subscription.subscription_type {
                        return Err(StreamError::InvalidArgument(format!(
                            "subscription {sub_name:?} of stream {name:?} is of type {:?}, not \
                             {:?}; use its type or another name",
                            existing.kind, subscription.subscription_type
                        ))
                        .into());
                    }
                    if existing.kind == SubscriptionType::Stream {
                        return Err(StreamError::InvalidArgument(format!(
                            "subscription {sub_name:?} of stream {name:?} already has its \
                             consumer; use another subscription name, or a RoundRobin \
                             subscription to share elements between consumers"
                        ))
                        .into());
                    }
                    existing.consumers.push(id);
                    None
                }
                None => {
                    let start = if state.retaining() {
                        state.first_id
                    } else {
                        state.next_id
                    };
                    state.subscriptions_created = state.subscriptions_created.saturating_add(1);
                    state.subscriptions.insert(
                        sub_name.clone(),
                        Subscription {
                            kind: subscription.subscription_type,
                            consumers: vec![id],
                            turn: 0,
                            start,
                        },
                    );
                    Some(start)
                }
            };
            let mut consumer = ConsumerState::default();
            if let Some(start) = start {
                consumer.pending = (start..state.next_id).collect();
            }
            state.consumers.insert(id, (sub_name.clone(), consumer));
            state.reclaim();
            return Ok(id);
        }
    }

    /// Up to `expect_num` elements for `consumer` (0: all that are ready, up to 16 MiB), waiting
    /// up to `timeout` until `expect_num` (0: one) are ready. A timeout is not an error: it
    /// returns what is ready.
    pub fn receive(
        &self,
        name: &str,
        consumer: u64,
        expect_num: usize,
        timeout: Duration,
    ) -> Result<Vec<Element>> {
        self.check_open()?;
        let stream = self
            .stream(name)
            .ok_or_else(|| Self::closed_error(name, "consumer", consumer))?;
        let deadline = Instant::now().checked_add(timeout);
        let wanted = expect_num.max(1);
        let mut state = stream.state.lock();
        loop {
            self.check_open()?;
            if state.removed {
                return Err(Self::closed_error(name, "consumer", consumer));
            }
            let ready = match state.consumers.get(&consumer) {
                Some((_, consumer)) => consumer.pending.len(),
                None => return Err(Self::closed_error(name, "consumer", consumer)),
            };
            if ready >= wanted {
                break;
            }
            let waiting = self.inner.receives_waiting.enter();
            let timed_out = wait_changed(&stream.changed, &mut state, deadline);
            drop(waiting);
            if timed_out {
                break;
            }
        }
        let state = &mut *state;
        let Some((_, consumer_state)) = state.consumers.get_mut(&consumer) else {
            return Err(Self::closed_error(name, "consumer", consumer));
        };
        let limit = if expect_num == 0 {
            usize::MAX
        } else {
            expect_num
        };
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while out.len() < limit {
            let Some(&id) = consumer_state.pending.front() else {
                break;
            };
            let index = usize::try_from(id - state.first_id).unwrap_or(usize::MAX);
            let Some(value) = state.elements.get(index) else {
                // Reclaimed cannot happen while pending; skip defensively.
                consumer_state.pending.pop_front();
                continue;
            };
            if expect_num == 0 && !out.is_empty() && bytes + value.len() > MAX_RECEIVE_BYTES {
                break;
            }
            bytes += value.len();
            out.push(Element {
                id,
                value: value.clone(),
            });
            consumer_state.pending.pop_front();
            insert_sorted(&mut consumer_state.unacked, id);
            consumer_state.last_received = consumer_state.last_received.max(id);
        }
        Ok(out)
    }

    /// Acknowledge every element up to `id` that `consumer` received; their memory is
    /// reclaimed once every subscription acked them. 1001 for an id it has not received.
    pub fn ack(&self, name: &str, consumer: u64, id: u64) -> Result<()> {
        self.check_open()?;
        let stream = self
            .stream(name)
            .ok_or_else(|| Self::closed_error(name, "consumer", consumer))?;
        let mut state = stream.state.lock();
        let Some((_, consumer_state)) = state.consumers.get_mut(&consumer) else {
            return Err(Self::closed_error(name, "consumer", consumer));
        };
        if id == 0 || id > consumer_state.last_received {
            return Err(StreamError::InvalidArgument(format!(
                "consumer {consumer} of stream {name:?} cannot ack element {id}: the last element \
                 it received is {}; ack the id of an element receive returned",
                consumer_state.last_received
            ))
            .into());
        }
        while consumer_state.unacked.front().is_some_and(|x| *x <= id) {
            consumer_state.unacked.pop_front();
        }
        state.reclaim();
        drop(state);
        stream.changed.notify_all();
        Ok(())
    }

    /// Close `consumer`, acking what it received. In a shared subscription, what it held goes
    /// to the other consumers; the last consumer's close ends the subscription. Returns
    /// whether that removed the stream (`auto_clean_up`).
    pub fn close_consumer(&self, name: &str, consumer: u64) -> Result<bool> {
        self.check_open()?;
        let stream = self
            .stream(name)
            .ok_or_else(|| Self::closed_error(name, "consumer", consumer))?;
        let mut state = stream.state.lock();
        let Some((subscription_name, consumer_state)) = state.consumers.remove(&consumer) else {
            return Err(Self::closed_error(name, "consumer", consumer));
        };
        let mut orphans: Vec<u64> = Vec::new();
        let mut remaining = Vec::new();
        if let Some(subscription) = state.subscriptions.get_mut(&subscription_name) {
            subscription.consumers.retain(|c| *c != consumer);
            if subscription.consumers.is_empty() {
                state.subscriptions.remove(&subscription_name);
            } else {
                // Received but unacked elements count as acked (openYuanrong: closing acks);
                // those not received yet go to the others.
                orphans.extend(consumer_state.pending.iter().copied());
                remaining = subscription.consumers.clone();
            }
        }
        for (i, id) in orphans.into_iter().enumerate() {
            let to = remaining[i % remaining.len()];
            if let Some((_, other)) = state.consumers.get_mut(&to) {
                insert_sorted(&mut other.pending, id);
            }
        }
        state.reclaim();
        let removed = self.remove_if_unused(&stream, &mut state);
        drop(state);
        stream.changed.notify_all();
        Ok(removed)
    }
}
