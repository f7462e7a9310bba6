//! The wire side of distributed reference counting (the counting is `crate::borrows`): a
//! borrower's `ReleaseBorrowed` and `AddBorrowed` to owners, fire and forget on the IO runtime,
//! and the owner's sweep that drops the counts of borrowers that died without releasing.

use std::collections::HashMap;
use std::sync::Weak;
use std::time::Duration;

use yr_common::{ErrorCode, ObjectId};
use yr_proto::v1 as pb;

use super::{transport, Inner};
use crate::borrows::{self, BorrowMessenger};
use crate::object_store::{local_owner_address, ObjectHandle};

/// How often the owner looks for counts whose borrowers are all gone.
const SWEEP_PERIOD: Duration = Duration::from_secs(2);

/// Sends a borrower's updates to owners.
pub(super) struct Messenger {
    pub(super) inner: Weak<Inner>,
}

fn update(id: ObjectId, count: u64) -> pb::BorrowUpdate {
    pb::BorrowUpdate {
        borrower_address: local_owner_address(),
        objects: vec![pb::BorrowCount {
            id: id.to_bytes().to_vec().into(),
            count,
        }],
    }
}

/// Which of the two borrow updates to send.
#[derive(Clone, Copy)]
enum UpdateKind {
    Release,
    Add,
}

/// Send one borrow update to `owner`; the error's text if it did not arrive.
async fn send(
    inner: &Inner,
    owner: &str,
    kind: UpdateKind,
    update: pb::BorrowUpdate,
) -> Result<(), String> {
    let mut client = inner
        .worker_client(owner)
        .await
        .map_err(|error| error.to_string())?;
    let sent = match kind {
        UpdateKind::Release => client.release_borrowed(update).await,
        UpdateKind::Add => client.add_borrowed(update).await,
    };
    sent.map(|_| ())
        .map_err(|status| status.message().to_string())
}

impl BorrowMessenger for Messenger {
    fn release(&self, owner: &str, id: ObjectId, count: u64) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let owner = owner.to_string();
        let update = update(id, count);
        let io = inner.io.clone();
        io.spawn(async move {
            if let Err(error) = send(&inner, &owner, UpdateKind::Release, update).await {
                // The owner is gone, and its objects with it.
                tracing::debug!(object = %id, %owner, %error, "cannot release a borrowed object");
            }
        });
    }

    fn add(&self, handle: ObjectHandle) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let owner = handle.owner_address();
        let update = update(handle.id(), 1);
        let io = inner.io.clone();
        io.spawn(async move {
            if let Err(error) = send(&inner, &owner, UpdateKind::Add, update).await {
                let id = handle.id();
                tracing::debug!(object = %id, %owner, %error, "cannot count a forwarded reference");
            }
            // Only now may this process's own borrow go: the owner counts the forwarded one.
            drop(handle);
        });
    }
}

/// Whether a process still serves its Worker socket.
async fn reachable(address: &str) -> bool {
    transport::connect(address, ErrorCode::GetOperationFailed)
        .await
        .is_ok()
}

/// The owner's sweep: every [`SWEEP_PERIOD`], drop the counts that have not changed for
/// `borrows::STALE_AFTER` and whose known borrowers are all unreachable (or that no borrower
/// ever fetched: the reference was lost on the way).
pub(super) async fn sweep(inner: Weak<Inner>) {
    loop {
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
