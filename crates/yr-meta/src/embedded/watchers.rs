//! The write-ahead log's appends and the watchers: [`Watcher`] delivers whole revisions of
//! events; the state appends a write's record, keeps its events pending until the record is
//! synced, then publishes them to the watchers and remembers them in the history for watches
//! that resume.

use tokio::sync::mpsc;

use crate::error::MetaError;
use crate::store::WatchEvent;
use crate::wal::WalRecord;

use super::state::State;

pub(super) struct Watcher {
    pub(super) prefix: String,
    /// Deliver only revisions after this one.
    start_after: u64,
    /// The last revision delivered.
    delivered: u64,
    tx: mpsc::Sender<WatchEvent>,
}

impl Watcher {
    /// Delivers the matching events of one revision; false if the watcher is gone or dropped.
    fn deliver(&mut self, revision: u64, events: &[WatchEvent]) -> bool {
        if self.tx.is_closed() {
            return false;
        }
        if revision <= self.start_after {
            return true;
        }
        let matching: Vec<&WatchEvent> = events
            .iter()
            .filter(|e| e.key().starts_with(&self.prefix))
            .collect();
        if matching.is_empty() {
            return true;
        }
        if self.tx.capacity() < matching.len() {
            tracing::warn!(
                prefix = %self.prefix,
                revision,
                resume_after = self.delivered.max(self.start_after),
                "meta store watcher fell too far behind and was dropped; it must watch again from the last revision it received"
            );
            return false;
        }
        for event in matching {
            if self.tx.try_send(event.clone()).is_err() {
                return false;
            }
        }
        self.delivered = revision;
        true
    }
}

impl State {
    /// Appends `record` to the log (if durable) and returns its sequence number.
    pub(super) fn log_record(&mut self, record: &WalRecord) -> Result<u64, MetaError> {
        if let Some(log) = &mut self.log {
            log.append(record)?;
        }
        self.appended_lsn += 1;
        if self.log.is_none() {
            self.synced_lsn = self.appended_lsn;
        }
        Ok(self.appended_lsn)
    }

    /// Publishes the events of record `lsn` now if it is durable, or once it is synced.
    pub(super) fn emit(&mut self, lsn: u64, revision: u64, events: Vec<WatchEvent>) {
        if events.is_empty() {
            return;
        }
        if lsn <= self.synced_lsn {
            self.publish(revision, events);
        } else {
            self.pending.push_back((lsn, revision, events));
        }
    }

    /// Publishes the events of every record up to `lsn`.
    pub(super) fn publish_synced(&mut self, lsn: u64) {
        while self.pending.front().is_some_and(|(l, _, _)| *l <= lsn) {
            let (_, revision, events) = self.pending.pop_front().expect("checked");
            self.publish(revision, events);
        }
    }

    fn publish(&mut self, revision: u64, events: Vec<WatchEvent>) {
        self.watchers.retain_mut(|w| w.deliver(revision, &events));
        self.remember(revision, events);
    }

    pub(super) fn remember(&mut self, revision: u64, events: Vec<WatchEvent>) {
        self.history.push_back((revision, events));
        while self.history.len() > self.options.history_limit {
            if let Some((old, _)) = self.history.pop_front() {
                self.compacted_revision = old;
            }
        }
    }

    pub(super) fn watch(
        &mut self,
        prefix: &str,
        after_revision: u64,
    ) -> Result<mpsc::Receiver<WatchEvent>, MetaError> {
        if after_revision != 0 && after_revision < self.compacted_revision {
            return Err(MetaError::Compacted {
                revision: after_revision,
                compacted_revision: self.compacted_revision,
            });
        }
        let start_after = if after_revision == 0 {
            self.revision
        } else {
            after_revision
        };
        let backlog: Vec<&WatchEvent> = self
            .history
            .iter()
            .filter(|(revision, _)| *revision > start_after)
            .flat_map(|(_, events)| events.iter())
            .filter(|e| e.key().starts_with(prefix))
            .collect();
        let (tx, rx) = mpsc::channel(self.options.watch_buffer.max(1) + backlog.len());
        let mut delivered = start_after;
        for event in backlog {
            delivered = event.revision();
            tx.try_send(event.clone())
                .expect("the channel has room for the backlog");
        }
        self.watchers.push(Watcher {
            prefix: prefix.to_string(),
            start_after,
            delivered,
            tx,
        });
        Ok(rx)
    }
}
