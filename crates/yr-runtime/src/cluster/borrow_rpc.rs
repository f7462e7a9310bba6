//! The wire side of distributed reference counting (the counting is `crate::borrows`): a
//! borrower's `ReleaseBorrowed` to its lenders (batched per lender), fire and forget on the IO
//! runtime, and the lender's sweep that drops the counts of borrowers that died without
//! releasing.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use yr_common::{ErrorCode, ObjectId};
use yr_proto::v1 as pb;

use super::{transport, Inner};
use crate::borrows::{self, BorrowMessenger};
use crate::object_store::local_owner_address;

/// How often a lender looks for counts whose borrowers are all gone.
const SWEEP_PERIOD: Duration = Duration::from_secs(2);

/// Releases waiting to be sent, by lender address.
type PendingReleases = Arc<Mutex<HashMap<String, Vec<pb::BorrowCount>>>>;

/// Sends a borrower's releases to its lenders.
pub(super) struct Messenger {
    inner: Weak<Inner>,
    /// Releases dropped in a burst go to their lender in one `ReleaseBorrowed`: the first queued
    /// for a lender schedules the send, which takes whatever queued for it by then.
    releases: PendingReleases,
}

impl Messenger {
    pub(super) fn new(inner: Weak<Inner>) -> Messenger {
        Messenger {
            inner,
            releases: PendingReleases::default(),
        }
    }
}

fn count(id: ObjectId, count: u64) -> pb::BorrowCount {
    pb::BorrowCount {
        id: id.to_bytes().to_vec().into(),
        count,
    }
}

fn update(objects: Vec<pb::BorrowCount>) -> pb::BorrowUpdate {
    pb::BorrowUpdate {
        borrower_address: local_owner_address(),
        objects,
    }
}

/// Send one release to `lender`; the error's text if it did not arrive.
async fn send(inner: &Inner, lender: &str, update: pb::BorrowUpdate) -> Result<(), String> {
    let mut client = inner
        .worker_client(lender)
        .await
        .map_err(|error| error.to_string())?;
    client
        .release_borrowed(update)
        .await
        .map(|_| ())
        .map_err(|status| status.message().to_string())
}

impl BorrowMessenger for Messenger {
    fn release(&self, lender: &str, id: ObjectId, released: u64) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let first = {
            let mut releases = self.releases.lock();
            let queued = releases.entry(lender.to_string()).or_default();
            queued.push(count(id, released));
            queued.len() == 1
        };
        if !first {
            return;
        }
        let lender = lender.to_string();
        let releases = self.releases.clone();
        let io = inner.io.clone();
        io.spawn(async move {
            // Let the rest of a burst of drops queue behind this one.
            tokio::task::yield_now().await;
            let objects = releases.lock().remove(&lender).unwrap_or_default();
            let batch = objects.len();
            if let Err(error) = send(&inner, &lender, update(objects)).await {
                // The lender is gone, and its objects with it.
                tracing::debug!(%lender, batch, %error, "cannot release borrowed objects");
            }
        });
    }
}

/// Fault tests: whether a borrower's fetch from its lender at `lender` fails as if the lender
/// were gone (`runtime::borrow_fetch=return`), so the borrower asks the owner instead. A small
/// function of its own: the fail point returns from it, not from the fetch.
pub(super) fn lender_unreachable(lender: &str) -> Option<yr_common::Error> {
    let _ = lender;
    fail::fail_point!("runtime::borrow_fetch", |_| Some(yr_common::Error::new(
        ErrorCode::GetOperationFailed,
        format!("cannot reach the lender at {lender} (a fail point); it may have exited"),
    )));
    None
}

/// Whether a process still serves its Worker service (its socket on this host, its TCP
/// listener on another).
async fn reachable(address: &str) -> bool {
    transport::connect(
        super::endpoints::worker_route(address),
        ErrorCode::GetOperationFailed,
    )
    .await
    .is_ok()
}

/// The lender's sweep: every [`SWEEP_PERIOD`] while this process lends objects, drop the counts
/// that have not changed for `borrows::STALE_AFTER` and whose known borrowers are all
/// unreachable (or that no borrower ever fetched: the reference was lost on the way).
pub(super) async fn sweep(inner: Weak<Inner>) {
    loop {
        borrows::lending().await;
        tokio::time::sleep(SWEEP_PERIOD).await;
        if inner.upgrade().is_none() {
            return;
        }
        let (stale_since, stale) = borrows::stale();
        let mut alive: HashMap<String, bool> = HashMap::new();
        for (id, borrowers) in stale {
            let mut any_alive = false;
            for borrower in borrowers {
                let is_alive = match alive.get(&borrower) {
                    Some(known) => *known,
                    None => {
                        let known = reachable(&borrower).await;
                        alive.insert(borrower, known);
                        known
                    }
                };
                if is_alive {
                    any_alive = true;
                    break;
                }
            }
            if !any_alive {
                borrows::forget_stale(id, stale_since);
            }
        }
    }
}
