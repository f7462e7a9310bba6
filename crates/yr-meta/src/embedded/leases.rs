//! Leases: granting, keeping alive and revoking them on the state, and the reaper task that
//! ends expired leases (deleting their keys in one revision) until the store closes.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::MetaError;
use crate::store::LeaseId;
use crate::wal::WalRecord;

use super::state::State;
use super::Inner;

#[derive(Clone, Debug)]
pub(super) struct Lease {
    pub(super) ttl: Duration,
    pub(super) deadline: Instant,
    pub(super) keys: BTreeSet<String>,
}

impl State {
    pub(super) fn grant_lease(
        &mut self,
        ttl: Duration,
        now: Instant,
    ) -> Result<LeaseId, MetaError> {
        if ttl.is_zero() {
            return Err(MetaError::InvalidArgument(
                "a lease TTL must be positive".to_string(),
            ));
        }
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let id = self.next_lease_id;
        self.log_record(&WalRecord {
            revision: self.revision,
            grant_lease: id,
            grant_ttl_ms: ttl_ms,
            ..Default::default()
        })?;
        self.next_lease_id += 1;
        self.leases.insert(
            id,
            Lease {
                ttl,
                deadline: now + ttl,
                keys: BTreeSet::new(),
            },
        );
        Ok(id)
    }

    pub(super) fn revoke_lease(&mut self, id: LeaseId) -> Result<(), MetaError> {
        let Some(lease) = self.leases.get(&id) else {
            return Err(MetaError::LeaseNotFound(id));
        };
        let revision = if lease.keys.is_empty() {
            self.revision
        } else {
            self.revision + 1
        };
        let lsn = self.log_record(&WalRecord {
            revision,
            end_lease: id,
            ..Default::default()
        })?;
        self.revision = revision;
        let events = self.end_lease(id, revision);
        self.emit(lsn, revision, events);
        Ok(())
    }

    pub(super) fn keep_alive(&mut self, id: LeaseId, now: Instant) -> Result<(), MetaError> {
        match self.leases.get_mut(&id) {
            Some(lease) if lease.deadline > now => {
                lease.deadline = now + lease.ttl;
                Ok(())
            }
            _ => Err(MetaError::LeaseNotFound(id)),
        }
    }
}

impl Inner {
    pub(super) fn start_reaper(self: &Arc<Self>) {
        if !self.reaper_started.swap(true, Ordering::SeqCst) {
            tokio::spawn(reap_leases(self.clone()));
        }
    }
}

/// Ends expired leases, deleting their keys, until the store closes.
async fn reap_leases(inner: Arc<Inner>) {
    loop {
        let next = {
            let state = inner.state.lock();
            if state.closed || state.failure.is_some() {
                return;
            }
            state.leases.values().map(|l| l.deadline).min()
        };
        let now = Instant::now();
        match next {
            Some(deadline) if deadline <= now => {
                let result = inner
                    .run(|state| {
                        let now = Instant::now();
                        let expired: Vec<LeaseId> = state
                            .leases
                            .iter()
                            .filter(|(_, l)| l.deadline <= now)
                            .map(|(id, _)| *id)
                            .collect();
                        for id in &expired {
                            state.revoke_lease(*id)?;
                        }
                        Ok(expired)
                    })
                    .await;
                match result {
                    Ok(expired) => {
                        for id in expired {
                            tracing::info!(
                                lease = id,
                                "meta store lease expired; its keys are deleted"
                            );
                        }
                    }
                    Err(err) => {
                        tracing::warn!(%err, "meta store could not end expired leases");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            _ => {
                let wait = next.map_or(Duration::from_secs(3600), |d| d - now);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = inner.lease_wakeup.notified() => {}
                }
            }
        }
    }
}
