//! Prefix watches of an [`EtcdStore`]: an etcd watch from `after_revision + 1` whose events a
//! task forwards, in revision order, into a bounded channel (it waits for the receiver rather
//! than queueing; etcd holds the backlog). When the stream breaks (a member went away, a
//! connection dropped), the task opens the watch again after the last revision it delivered,
//! with backoff (50 ms doubling to 2 s), so the receiver sees every event once. If etcd has
//! compacted that revision, the channel closes, and a new watch from it fails with
//! [`MetaError::Compacted`].

use std::time::Duration;

use etcd_client::{EventType, GetOptions, WatchOptions, WatchStream, Watcher};
use tokio::sync::mpsc;

use super::retry::{with_retry, Retry};
use super::EtcdStore;
use crate::error::MetaError;
use crate::store::{MetaStore, WatchEvent};

/// Events a watch may have waiting for its receiver.
const WATCH_BUFFER: usize = 1024;
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How long to wait for etcd to say which revision it compacted.
const COMPACTION_ANSWER: Duration = Duration::from_secs(3);

/// Starts a watch of `prefix` (the caller's form) for events after `after_revision` (0: from
/// now on).
pub(super) async fn start(
    store: EtcdStore,
    prefix: &str,
    after_revision: u64,
) -> Result<mpsc::Receiver<WatchEvent>, MetaError> {
    let etcd_prefix = store.etcd_key(prefix);
    // "From now on" is after the current revision: the watch then starts at a revision of its
    // own, which it resumes after if its stream breaks before any event.
    let after = if after_revision == 0 {
        store.current_revision().await?
    } else {
        after_revision
    };
    let (watcher, stream) = open(&store, &etcd_prefix, after).await?;
    let (tx, rx) = mpsc::channel(WATCH_BUFFER);
    tokio::spawn(follow(store, etcd_prefix, after, watcher, stream, tx));
    Ok(rx)
}

/// Opens an etcd watch of `etcd_prefix` for events after `after`, or fails with
/// [`MetaError::Compacted`] if etcd no longer has them.
async fn open(
    store: &EtcdStore,
    etcd_prefix: &str,
    after: u64,
) -> Result<(Watcher, WatchStream), MetaError> {
    let current = store.current_revision().await?;
    let start = i64::try_from(after.saturating_add(1)).unwrap_or(i64::MAX);
    if after < current {
        // A read at the first revision the watch needs fails if etcd compacted it; a watch
        // would only say so later, after it was created.
        let probe = with_retry(
            store.budget,
            Retry::Idempotent,
            store.context("watch", None),
            || {
                let mut kv = store.kv.clone();
                let key = etcd_prefix.to_string();
                async move {
                    kv.get(
                        key,
                        Some(
                            GetOptions::new()
                                .with_prefix()
                                .with_count_only()
                                .with_revision(start),
                        ),
                    )
                    .await
                }
            },
        )
        .await;
        match probe {
            Ok(_) => {}
            Err(MetaError::Etcd(message)) if message.contains("compacted") => {
                return Err(MetaError::Compacted {
                    revision: after,
                    compacted_revision: compacted_revision(store, etcd_prefix, start)
                        .await
                        .unwrap_or(after.saturating_add(1)),
                });
            }
            Err(err) => return Err(err),
        }
    }
    with_retry(
        store.budget,
        Retry::Idempotent,
        store.context("watch", None),
        || {
            let mut client = store.watch.clone();
            let key = etcd_prefix.to_string();
            async move {
                client
                    .watch(
                        key,
                        Some(WatchOptions::new().with_prefix().with_start_revision(start)),
                    )
                    .await
            }
        },
    )
    .await
}

/// The revision etcd compacted, as a watch from `start` reports it.
async fn compacted_revision(store: &EtcdStore, etcd_prefix: &str, start: i64) -> Option<u64> {
    let mut client = store.watch.clone();
    let ask = async {
        let (_watcher, mut stream) = client
            .watch(
                etcd_prefix.to_string(),
                Some(WatchOptions::new().with_prefix().with_start_revision(start)),
            )
            .await
            .ok()?;
        while let Ok(Some(response)) = stream.message().await {
            if response.compact_revision() > 0 {
                return u64::try_from(response.compact_revision()).ok();
            }
            if response.canceled() {
                return None;
            }
        }
        None
    };
    tokio::time::timeout(COMPACTION_ANSWER, ask)
        .await
        .ok()
        .flatten()
}

/// Forwards the watch's events until the receiver goes away or etcd compacted what the watch
/// still needs; reopens the watch when its stream breaks.
async fn follow(
    store: EtcdStore,
    etcd_prefix: String,
    after: u64,
    mut watcher: Watcher,
    mut stream: WatchStream,
    tx: mpsc::Sender<WatchEvent>,
) {
    let mut last = after;
    loop {
        let message = tokio::select! {
            () = tx.closed() => {
                let _ = watcher.cancel().await;
                return;
            }
            message = stream.message() => message,
        };
        match message {
            Ok(Some(response)) if response.compact_revision() > 0 => {
                tracing::warn!(
                    prefix = %etcd_prefix,
                    last,
                    compacted = response.compact_revision(),
                    "etcd compacted revisions this watch still needed; closing it"
                );
                return;
            }
            Ok(Some(response)) if response.canceled() => {
                tracing::warn!(
                    prefix = %etcd_prefix,
                    last,
                    reason = response.cancel_reason(),
                    "etcd cancelled a watch; opening it again"
                );
            }
            Ok(Some(response)) => {
                for event in response.events() {
                    let Some(kv) = event.kv() else { continue };
                    let event = match event.event_type() {
                        EventType::Put => match store.kv_from_etcd(kv) {
                            Some(kv) => WatchEvent::Put(kv),
                            None => continue,
                        },
                        EventType::Delete => match store.key_from_etcd(kv.key()) {
                            Some(key) => WatchEvent::Delete {
                                key,
                                revision: u64::try_from(kv.mod_revision()).unwrap_or(0),
                            },
                            None => continue,
                        },
                    };
                    let revision = event.revision();
                    if tx.send(event).await.is_err() {
                        let _ = watcher.cancel().await;
                        return;
                    }
                    last = last.max(revision);
                }
                continue;
            }
            Ok(None) => {
                tracing::info!(prefix = %etcd_prefix, last, "etcd ended a watch stream; opening it again");
            }
            Err(err) => {
                tracing::warn!(prefix = %etcd_prefix, last, error = %err, "etcd watch stream failed; opening it again");
            }
        }
        // Reopen after the last revision delivered, with backoff, while someone listens.
        let mut backoff = FIRST_BACKOFF;
        loop {
            tokio::select! {
                () = tx.closed() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            match open(&store, &etcd_prefix, last).await {
                Ok((new_watcher, new_stream)) => {
                    watcher = new_watcher;
                    stream = new_stream;
                    tracing::info!(prefix = %etcd_prefix, last, "etcd watch resumed");
                    break;
                }
                Err(err @ MetaError::Compacted { .. }) => {
                    tracing::warn!(prefix = %etcd_prefix, error = %err, "cannot resume an etcd watch; closing it");
                    return;
                }
                Err(err) => {
                    tracing::warn!(prefix = %etcd_prefix, last, error = %err, "cannot reopen an etcd watch yet");
                }
            }
        }
    }
}
