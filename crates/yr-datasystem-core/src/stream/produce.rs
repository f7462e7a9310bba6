//! The producer side of [`StreamStore`]: creating a producer, sending elements (waiting for
//! room up to a timeout, 4202 after it), and closing a producer.

use std::time::{Duration, Instant};

use bytes::Bytes;
use yr_common::Result;

use super::state::wait_changed;
use super::{validate_stream_name, ProducerConfig, Sent, StreamError, StreamStore};

impl StreamStore {
    /// A new producer of stream `name` (created if it does not exist). The first producer's
    /// configuration is the stream's.
    pub fn create_producer(&self, name: &str, config: &ProducerConfig) -> Result<u64> {
        self.check_open()?;
        validate_stream_name(name)?;
        config.validate()?;
        loop {
            let stream = self.stream_or_create(name, config);
            let mut state = stream.state.lock();
            if state.removed {
                continue;
            }
            if state.producers.is_empty() {
                state.config = config.clone();
            }
            let id = self.new_id();
            state.producers.insert(id, 0);
            return Ok(id);
        }
    }

    /// Append `elements` from `producer`, all at once, waiting up to `timeout` for room (4202
    /// after it). 4298 if the producer is closed.
    pub fn send(
        &self,
        name: &str,
        producer: u64,
        elements: Vec<Bytes>,
        timeout: Duration,
    ) -> Result<()> {
        self.send_batch(name, producer, 0, elements, timeout)
            .map(|_| ())
    }

    /// [`StreamStore::send`] of the producer's batch number `batch` (from 1; 0: unnumbered): a
    /// batch whose number is not above the last one appended is a retry, and is not appended
    /// again. Says what it appended, for the stream's backup.
    pub fn send_batch(
        &self,
        name: &str,
        producer: u64,
        batch: u64,
        elements: Vec<Bytes>,
        timeout: Duration,
    ) -> Result<Sent> {
        self.check_open()?;
        let stream = self
            .stream(name)
            .ok_or_else(|| Self::closed_error(name, "producer", producer))?;
        let wanted: usize = elements.iter().map(Bytes::len).sum();
        let deadline = Instant::now().checked_add(timeout);
        let mut state = stream.state.lock();
        loop {
            self.check_open()?;
            match state.producers.get(&producer) {
                Some(_) if state.removed => {
                    return Err(Self::closed_error(name, "producer", producer))
                }
                Some(last) if batch != 0 && batch <= *last => return Ok(Sent::Duplicate),
                Some(_) => {}
                None => return Err(Self::closed_error(name, "producer", producer)),
            }
            let max = state.config.max_stream_size;
            if state.bytes == 0 || state.bytes.saturating_add(wanted) <= max {
                break;
            }
            let waiting = self.inner.sends_waiting.enter();
            let timed_out = wait_changed(&stream.changed, &mut state, deadline);
            drop(waiting);
            if timed_out
                && state.bytes != 0
                && state.bytes.saturating_add(wanted) > state.config.max_stream_size
            {
                return Err(StreamError::Full {
                    stream: name.to_string(),
                    used: state.bytes,
                    max: state.config.max_stream_size,
                    wanted,
                    timeout,
                }
                .into());
            }
        }
        let keep =
            !state.subscriptions.is_empty() || state.retaining() || !state.awaiting.is_empty();
        if batch != 0 {
            state.producers.insert(producer, batch);
        }
        let first_id = state.next_id;
        for element in elements {
            let id = state.next_id;
            state.next_id += 1;
            state.bytes += element.len();
            state.elements.push_back(element);
            if keep {
                state.deal(id);
            }
        }
        state.reclaim();
        let low = state.first_id;
        drop(state);
        stream.changed.notify_all();
        Ok(Sent::Appended {
            first_id,
            low,
            kept: keep,
        })
    }

    /// Close `producer`. Returns whether that removed the stream (`auto_clean_up`).
    pub fn close_producer(&self, name: &str, producer: u64) -> Result<bool> {
        self.check_open()?;
        let stream = self
            .stream(name)
            .ok_or_else(|| Self::closed_error(name, "producer", producer))?;
        let mut state = stream.state.lock();
        if state.producers.remove(&producer).is_none() {
            return Err(Self::closed_error(name, "producer", producer));
        }
        let removed = self.remove_if_unused(&stream, &mut state);
        drop(state);
        stream.changed.notify_all();
        Ok(removed)
    }
}
