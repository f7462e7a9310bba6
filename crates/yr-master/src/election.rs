//! Leader election among masters that share one etcd and prefix.
//!
//! The leader holds one key, [`LEADER_KEY`], bound to an etcd lease of [`Election::ttl`] and
//! valued with its address. A master campaigns with one transaction: "if the key is absent, put
//! it on my lease". The one whose transaction succeeds leads; the key's mod revision at that
//! write names its term ([`Term`]). The leader renews the lease about four times per TTL; when
//! it cannot renew in time (measured on a [`Clock`] by [`LeaseTimer`]), when etcd says the lease
//! ended, or when the key no longer carries its term's mod revision, the term is over. A master
//! that dies stops renewing: etcd deletes the key when the lease ends, and the standbys, which
//! watch the key, campaign again at once.
//!
//! Every write the leader makes goes through a [`FencedStore`](crate::fenced::FencedStore),
//! which puts "the leader key's mod revision is still my term's" into the same etcd
//! transaction. A deposed leader (paused past its lease, then resumed) therefore cannot write,
//! whatever it still believes.
//!
//! Every master, leader or standby, also keeps a key under [`MEMBER_PREFIX`] on a lease of its
//! own, so that `yr status` lists the standbys.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use yr_master::election::Election;
//! let store: Arc<dyn yr_meta::MetaStore> = Arc::new(yr_meta::EmbeddedStore::in_memory());
//! let first = Election::new(store.clone(), "127.0.0.1:1".into(), Duration::from_secs(2));
//! let second = Election::new(store, "127.0.0.1:2".into(), Duration::from_secs(2));
//! let term = first.try_acquire().await?.expect("the first master leads");
//! assert!(second.try_acquire().await?.is_none());
//! assert_eq!(second.leader_hint().as_deref(), Some("127.0.0.1:1"));
//! first.resign(term).await;
//! assert!(second.try_acquire().await?.is_some());
//! # Ok::<(), yr_meta::MetaError>(())
//! # }).unwrap();
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{watch, Notify};
use yr_common::Clock;
use yr_meta::{Compare, LeaseId, MetaError, MetaStore, TxnOp, WatchEvent};

/// The key the leader holds on its lease; its value is the leader's address.
pub const LEADER_KEY: &str = "/yr/master/leader";

/// The prefix of the masters' membership keys (`/yr/master/member/<address>`), each on its
/// master's own lease.
pub const MEMBER_PREFIX: &str = "/yr/master/member/";

/// The default lease TTL: 2 s, etcd's minimum with its default election timeout. A dead
/// leader's key goes within this (plus etcd's expiry check, 0.5 s), which keeps the takeover
/// under 5 s.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(2);

/// A won election: the lease that holds [`LEADER_KEY`] and the key's mod revision at the win.
/// Writes fenced by the term compare that mod revision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Term {
    /// The lease the leader key is bound to.
    pub lease: LeaseId,
    /// The leader key's mod revision when this term began.
    pub mod_revision: u64,
}

/// Why a term ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TermEnd {
    /// The master is shutting down (it resigned).
    Stopped,
    /// The leadership is gone: the lease ended or could not be renewed in time, the key moved,
    /// or a write was fenced. The reason is for the log.
    Lost(String),
}

/// Until when a lease held by this process is surely still alive in etcd, measured on a
/// [`Clock`]: a renewal sent at `t` keeps the lease until at least `t + ttl`. The holder steps
/// down a quarter TTL before that, so it stops acting before etcd can give the key to another.
///
/// ```
/// use std::time::Duration;
/// use yr_common::{Clock, ManualClock};
/// use yr_master::election::LeaseTimer;
/// let clock = ManualClock::new();
/// let mut timer = LeaseTimer::new(Duration::from_secs(2), clock.now());
/// clock.advance(Duration::from_millis(1400));
/// assert!(!timer.expired(clock.now()));
/// clock.advance(Duration::from_millis(200));
/// assert!(timer.expired(clock.now()));
/// timer.renewed(clock.now());
/// assert!(!timer.expired(clock.now()));
/// ```
#[derive(Clone, Debug)]
pub struct LeaseTimer {
    ttl: Duration,
    valid_until: Instant,
}

impl LeaseTimer {
    /// A timer for a lease of `ttl` granted (or last renewed) at `granted_at`.
    pub fn new(ttl: Duration, granted_at: Instant) -> LeaseTimer {
        LeaseTimer {
            ttl,
            valid_until: granted_at + ttl,
        }
    }

    /// A renewal sent at `sent_at` succeeded.
    pub fn renewed(&mut self, sent_at: Instant) {
        self.valid_until = self.valid_until.max(sent_at + self.ttl);
    }

    /// Whether the holder must consider the lease gone at `now` (a quarter TTL early).
    pub fn expired(&self, now: Instant) -> bool {
        now + self.ttl / 4 >= self.valid_until
    }
}

/// One master's side of the election.
pub struct Election {
    store: Arc<dyn MetaStore>,
    address: String,
    ttl: Duration,
    clock: Arc<dyn Clock>,
    leader: Mutex<Option<String>>,
}

impl Election {
    /// This master (reachable at `address`) in the election on `store`, with leases of `ttl`.
    pub fn new(store: Arc<dyn MetaStore>, address: String, ttl: Duration) -> Election {
        Self::with_clock(store, address, ttl, yr_common::clock::system())
    }

    /// [`Election::new`], measuring the lease on `clock`.
    pub fn with_clock(
        store: Arc<dyn MetaStore>,
        address: String,
        ttl: Duration,
        clock: Arc<dyn Clock>,
    ) -> Election {
        Election {
            store,
            address,
            ttl,
            clock,
            leader: Mutex::new(None),
        }
    }

    /// This master's address, the value of the leader key while it leads.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The lease TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The leader as last seen, if any (this master's own address while it leads).
    pub fn leader_hint(&self) -> Option<String> {
        self.leader.lock().clone()
    }

    /// One attempt to lead: puts the leader key on a new lease if nobody holds it. `None` when
    /// another master leads (its address is then the [`leader_hint`](Self::leader_hint)).
    pub async fn try_acquire(&self) -> Result<Option<Term>, MetaError> {
        let lease = self.store.grant_lease(self.ttl).await?;
        let outcome = self
            .store
            .txn(
                vec![Compare::Version {
                    key: LEADER_KEY.to_string(),
                    version: 0,
                }],
                vec![TxnOp::Put {
                    key: LEADER_KEY.to_string(),
                    value: Bytes::from(self.address.clone()),
                    lease: Some(lease),
                }],
                vec![TxnOp::Get {
                    key: LEADER_KEY.to_string(),
                }],
            )
            .await;
        let response = match outcome {
            Ok(response) => response,
            Err(err) => {
                let _ = self.store.revoke_lease(lease).await;
                return Err(err);
            }
        };
        let current = response.results.into_iter().next().flatten();
        if response.succeeded {
            let Some(kv) = current else {
                let _ = self.store.revoke_lease(lease).await;
                return Err(MetaError::Unavailable(
                    "the store answered the leader key's put without the written record".into(),
                ));
            };
            *self.leader.lock() = Some(self.address.clone());
            return Ok(Some(Term {
                lease,
                mod_revision: kv.mod_revision,
            }));
        }
        let _ = self.store.revoke_lease(lease).await;
        *self.leader.lock() = current.map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
        Ok(None)
    }

    /// Campaigns until this master leads (`Some(term)`) or `stop` turns true (`None`). Between
    /// attempts it watches the leader key and tries again as soon as the key is deleted (at
    /// the latest one TTL later).
    pub async fn campaign(&self, stop: &mut watch::Receiver<bool>) -> Option<Term> {
        let mut reported = false;
        loop {
            if *stop.borrow() {
                return None;
            }
            let start = self.store.current_revision().await;
            match self.try_acquire().await {
                Ok(Some(term)) => return Some(term),
                Ok(None) => {
                    if !reported {
                        tracing::info!(
                            leader = self.leader_hint().unwrap_or_default(),
                            "standing by: another master leads"
                        );
                        reported = true;
                    }
                }
                Err(err) => tracing::warn!(error = %err, "cannot campaign for leadership yet"),
            }
            let watch = match start {
                Ok(revision) => self.store.watch_prefix(LEADER_KEY, revision).await.ok(),
                Err(_) => None,
            };
            let retry = tokio::time::sleep(self.ttl);
            tokio::pin!(retry);
            match watch {
                Some(mut events) => loop {
                    tokio::select! {
                        _ = crate::stopped(stop) => return None,
                        _ = &mut retry => break,
                        event = events.recv() => match event {
                            Some(WatchEvent::Delete { .. }) | None => break,
                            Some(WatchEvent::Put(kv)) if kv.key == LEADER_KEY => {
                                *self.leader.lock() =
                                    Some(String::from_utf8_lossy(&kv.value).into_owned());
                            }
                            Some(WatchEvent::Put(_)) => {}
                        },
                    }
                },
                None => tokio::select! {
                    _ = crate::stopped(stop) => return None,
                    _ = &mut retry => {}
                },
            }
        }
    }

    /// Holds `term`: renews its lease about four times per TTL and checks that the leader key
    /// still carries the term, until `stop` turns true ([`TermEnd::Stopped`]; the caller then
    /// resigns) or the leadership is gone ([`TermEnd::Lost`]), also when `fenced` is notified
    /// (the term's [`FencedStore`](crate::fenced::FencedStore) refused a write).
    pub async fn hold(
        &self,
        term: Term,
        fenced: &Notify,
        stop: &mut watch::Receiver<bool>,
    ) -> TermEnd {
        let mut timer = LeaseTimer::new(self.ttl, self.clock.now());
        let period = self.ttl / 4;
        loop {
            tokio::select! {
                _ = crate::stopped(stop) => return TermEnd::Stopped,
                _ = fenced.notified() => {
                    return TermEnd::Lost("a write was fenced: another master leads".into())
                }
                _ = tokio::time::sleep(period) => {}
            }
            let sent = self.clock.now();
            match tokio::time::timeout(self.ttl / 2, self.renew(term)).await {
                Ok(Ok(())) => timer.renewed(sent),
                Ok(Err(Renewal::Lost(reason))) => return TermEnd::Lost(reason),
                Ok(Err(Renewal::Failed(err))) => {
                    tracing::warn!(error = %err, "cannot renew the leader lease yet")
                }
                Err(_) => tracing::warn!("renewing the leader lease timed out"),
            }
            if timer.expired(self.clock.now()) {
                return TermEnd::Lost(format!(
                    "the leader lease could not be renewed within its TTL ({:?})",
                    self.ttl
                ));
            }
        }
    }

    async fn renew(&self, term: Term) -> Result<(), Renewal> {
        match self.store.keep_alive(term.lease).await {
            Ok(()) => {}
            Err(MetaError::LeaseNotFound(_)) => {
                return Err(Renewal::Lost("the leader lease ended".into()))
            }
            Err(err) => return Err(Renewal::Failed(err)),
        }
        match self.store.get(LEADER_KEY).await {
            Ok(Some(kv)) if kv.mod_revision == term.mod_revision => Ok(()),
            Ok(Some(kv)) => {
                let leader = String::from_utf8_lossy(&kv.value).into_owned();
                *self.leader.lock() = Some(leader.clone());
                Err(Renewal::Lost(format!("the leader key now names {leader}")))
            }
            Ok(None) => Err(Renewal::Lost("the leader key is gone".into())),
            Err(err) => Err(Renewal::Failed(err)),
        }
    }

    /// Gives the leadership up at once (revokes the term's lease, which deletes the key), so a
    /// standby need not wait for the lease to run out.
    pub async fn resign(&self, term: Term) {
        if let Err(err) = self.store.revoke_lease(term.lease).await {
            tracing::warn!(error = %err, "cannot revoke the leader lease; it runs out by itself");
        }
        let mut leader = self.leader.lock();
        if leader.as_deref() == Some(self.address.as_str()) {
            *leader = None;
        }
    }

    /// Forgets this master as the leader (its term ended).
    pub fn deposed(&self) {
        let mut leader = self.leader.lock();
        if leader.as_deref() == Some(self.address.as_str()) {
            *leader = None;
        }
    }

    /// Keeps this master's membership key (`MEMBER_PREFIX + address`) on a lease of its own
    /// until `stop` turns true, then revokes it.
    pub async fn keep_membership(&self, mut stop: watch::Receiver<bool>) {
        let key = format!("{MEMBER_PREFIX}{}", self.address);
        let mut lease: Option<LeaseId> = None;
        loop {
            let current = match lease {
                Some(current) => match self.store.keep_alive(current).await {
                    Ok(()) => Some(current),
                    Err(err) => {
                        tracing::debug!(error = %err, "membership lease not renewed; granting anew");
                        None
                    }
                },
                None => None,
            };
            lease = match current {
                Some(current) => Some(current),
                None => self.join(&key).await,
            };
            tokio::select! {
                _ = crate::stopped(&mut stop) => break,
                _ = tokio::time::sleep(self.ttl / 3) => {}
            }
        }
        if let Some(lease) = lease {
            let _ = self.store.revoke_lease(lease).await;
        }
    }

    async fn join(&self, key: &str) -> Option<LeaseId> {
        let lease = self.store.grant_lease(self.ttl).await.ok()?;
        match self
            .store
            .put(key, Bytes::from(self.address.clone()), Some(lease))
            .await
        {
            Ok(_) => Some(lease),
            Err(err) => {
                tracing::debug!(error = %err, "cannot write the membership key yet");
                let _ = self.store.revoke_lease(lease).await;
                None
            }
        }
    }

    /// The masters with a live membership key, sorted.
    pub async fn members(&self) -> Vec<String> {
        let mut members: Vec<String> = match self.store.range(MEMBER_PREFIX).await {
            Ok(kvs) => kvs
                .into_iter()
                .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
                .collect(),
            Err(err) => {
                tracing::warn!(error = %err, "cannot list the masters");
                Vec::new()
            }
        };
        members.sort();
        members.dedup();
        members
    }
}

enum Renewal {
    Lost(String),
    Failed(MetaError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use yr_common::ManualClock;

    #[test]
    fn a_lease_is_given_up_a_quarter_ttl_before_it_could_end() {
        let clock = ManualClock::new();
        let ttl = Duration::from_secs(2);
        let mut timer = LeaseTimer::new(ttl, clock.now());
        clock.advance(Duration::from_millis(1499));
        assert!(!timer.expired(clock.now()));
        clock.advance(Duration::from_millis(1));
        assert!(timer.expired(clock.now()));
        // A renewal counts from when it was sent, not from when it was answered.
        let sent = clock.now();
        clock.advance(Duration::from_millis(400));
        timer.renewed(sent);
        clock.advance(Duration::from_millis(1099));
        assert!(!timer.expired(clock.now()));
        clock.advance(Duration::from_millis(1));
        assert!(timer.expired(clock.now()));
        // An older renewal answered late never shortens the lease.
        timer.renewed(sent - Duration::from_secs(1));
        assert!(timer.expired(clock.now()));
    }

    #[tokio::test]
    async fn one_master_leads_and_the_next_takes_over_when_it_resigns() {
        let store: Arc<dyn MetaStore> = Arc::new(yr_meta::EmbeddedStore::in_memory());
        let a = Election::new(store.clone(), "a:1".into(), Duration::from_secs(2));
        let b = Election::new(store.clone(), "b:1".into(), Duration::from_secs(2));
        let term = a.try_acquire().await.unwrap().expect("a leads");
        assert_eq!(b.try_acquire().await.unwrap(), None);
        assert_eq!(b.leader_hint().as_deref(), Some("a:1"));
        let (_stop_tx, mut stop) = watch::channel(false);
        let campaign = tokio::spawn(async move { b.campaign(&mut stop).await.map(|t| (t, b)) });
        a.resign(term).await;
        let (b_term, b) = tokio::time::timeout(Duration::from_secs(5), campaign)
            .await
            .expect("b campaigns at once when the key goes")
            .unwrap()
            .expect("b leads");
        assert!(b_term.mod_revision > term.mod_revision);
        assert_eq!(b.leader_hint().as_deref(), Some("b:1"));
        // a's old term is over: the key carries b's revision.
        assert!(matches!(a.renew(term).await, Err(Renewal::Lost(_))));
    }

    #[tokio::test]
    async fn a_fenced_write_ends_the_term() {
        let store: Arc<dyn MetaStore> = Arc::new(yr_meta::EmbeddedStore::in_memory());
        let a = Election::new(store, "a:1".into(), Duration::from_secs(2));
        let term = a.try_acquire().await.unwrap().expect("a leads");
        let (_stop_tx, mut stop) = watch::channel(false);
        let fenced = Notify::new();
        fenced.notify_one();
        let end = tokio::time::timeout(Duration::from_secs(5), a.hold(term, &fenced, &mut stop))
            .await
            .expect("the term ends");
        assert!(matches!(end, TermEnd::Lost(reason) if reason.contains("fenced")));
    }
}
