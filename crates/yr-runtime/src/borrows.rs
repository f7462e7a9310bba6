//! Distributed reference counting: which of this process's objects other processes borrow.
//!
//! The owner keeps, per object it sent out, a count of the references sent and not yet released,
//! the borrowers that fetched it, and a strong handle while the count is above 0 ([`LentTable`]).
//! A borrower counts on its borrowed slot how many times it received the reference; when the
//! slot is dropped it tells the owner to release that many (`ReleaseBorrowed`). A borrower that
//! forwards a borrowed reference first has the owner add one (`AddBorrowed`), holding its own
//! slot until the owner answered, so the count never reaches 0 while the reference travels.
//!
//! An object whose last borrower released it lingers [`RELEASE_LINGER`] before it goes, for a
//! forwarder's `AddBorrowed` still on its way.
//!
//! A borrower that dies without releasing is covered by the owner's sweep: a count unchanged for
//! [`STALE_AFTER`] whose every known borrower is unreachable is dropped. Local mode has no
//! borrowers: nothing is counted when this process serves no Worker address.
//!
//! The RPCs themselves are the backend's ([`BorrowMessenger`]); this module only counts.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use yr_common::ObjectId;

use crate::object_store::{local_owner_address, ObjectHandle};

/// How long a count must stay unchanged before the owner checks whether its borrowers are
/// alive. It also bounds how long a reference may travel unreceived (an argument of a call
/// that failed before its runtime decoded it) before nobody known holds it.
pub const STALE_AFTER: Duration = Duration::from_secs(20);

/// How long an owner keeps an object after the last borrower released it. A third process
/// that got a forwarded reference may release it before the forwarder's `AddBorrowed` reached
/// the owner (the two travel on different connections); the add finds the object within this
/// time and counts it, instead of the object being freed under the forwarder.
pub const RELEASE_LINGER: Duration = Duration::from_secs(1);

/// Sends borrowers' messages to owners. Installed by the cluster backend.
pub trait BorrowMessenger: Send + Sync {
    /// Tell `owner` that this process dropped `count` references to `id`. Fire and forget.
    fn release(&self, owner: &str, id: ObjectId, count: u64);
    /// Tell the owner of `handle` (a borrowed object) that one more reference to it was sent
    /// on; `handle` is kept until the owner answered.
    fn add(&self, handle: ObjectHandle);
}

static MESSENGER: RwLock<Option<Arc<dyn BorrowMessenger>>> = RwLock::new(None);

/// Install how borrowers reach owners (`None` to remove).
pub fn set_messenger(messenger: Option<Arc<dyn BorrowMessenger>>) {
    *MESSENGER.write() = messenger;
}

struct Lent {
    handle: ObjectHandle,
    /// References sent out and not yet released.
    count: u64,
    /// Worker addresses of the processes that fetched the object and have not released it.
    borrowers: HashSet<String>,
    changed: Instant,
}

/// The owner's table of objects lent to other processes.
#[derive(Default)]
pub struct LentTable {
    objects: HashMap<ObjectId, Lent>,
}

impl LentTable {
    /// `count` more references to `handle` were sent out (or forwarded by a borrower).
    pub fn sent(&mut self, handle: &ObjectHandle, count: u64, now: Instant) {
        let lent = self.objects.entry(handle.id()).or_insert_with(|| Lent {
            handle: handle.clone(),
            count: 0,
            borrowers: HashSet::new(),
            changed: now,
        });
        lent.count += count;
        lent.changed = now;
    }

    /// `borrower` fetched the object `id`.
    pub fn fetched(&mut self, id: ObjectId, borrower: &str, now: Instant) {
        if let Some(lent) = self.objects.get_mut(&id) {
            if !borrower.is_empty() && lent.borrowers.insert(borrower.to_string()) {
                lent.changed = now;
            }
        }
    }

    /// `count` references to `id` were released (by `borrower`, if known). Returns the handle
    /// the table no longer keeps, to be dropped by the caller outside any lock.
    pub fn released(
        &mut self,
        id: ObjectId,
        borrower: Option<&str>,
        count: u64,
        now: Instant,
    ) -> Option<ObjectHandle> {
        let lent = self.objects.get_mut(&id)?;
        if count > lent.count {
            tracing::debug!(object = %id, count, held = lent.count, "released more than sent");
        }
        lent.count = lent.count.saturating_sub(count);
        if let Some(borrower) = borrower {
            lent.borrowers.remove(borrower);
        }
        lent.changed = now;
        if lent.count == 0 {
            return self.objects.remove(&id).map(|lent| lent.handle);
        }
        None
    }

    /// Objects whose count has not changed for `stale_after`, with their known borrowers.
    pub fn stale(&self, now: Instant, stale_after: Duration) -> Vec<(ObjectId, Vec<String>)> {
        self.objects
            .iter()
            .filter(|(_, lent)| now.duration_since(lent.changed) >= stale_after)
            .map(|(id, lent)| (*id, lent.borrowers.iter().cloned().collect()))
            .collect()
    }

    /// Stop keeping `id` if it is still stale (nothing changed since `stale_since`).
    pub fn forget_stale(&mut self, id: ObjectId, stale_since: Instant) -> Option<ObjectHandle> {
        match self.objects.get(&id) {
            Some(lent) if lent.changed <= stale_since => self.objects.remove(&id).map(|l| l.handle),
            _ => None,
        }
    }

    /// References to `id` sent out and not yet released.
    pub fn count(&self, id: ObjectId) -> u64 {
        self.objects.get(&id).map_or(0, |lent| lent.count)
    }

    /// How many objects the table keeps.
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    /// Whether the table keeps no object.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }
}

static LENT: Mutex<Option<LentTable>> = Mutex::new(None);

fn with_table<R>(f: impl FnOnce(&mut LentTable) -> R) -> R {
    f(LENT.lock().get_or_insert_with(LentTable::default))
}

/// A reference to `handle` is about to be sent to another process: the owner counts it; a
/// borrower has the owner count it.
pub fn on_send(handle: &ObjectHandle) {
    if local_owner_address().is_empty() {
        return;
    }
    if handle.is_borrowed() {
        if let Some(messenger) = MESSENGER.read().clone() {
            messenger.add(handle.clone());
        }
        return;
    }
    with_table(|table| table.sent(handle, 1, Instant::now()));
}

/// A reference counted by [`on_send`] was not sent after all.
pub fn on_send_undone(handle: &ObjectHandle) {
    if local_owner_address().is_empty() {
        return;
    }
    if handle.is_borrowed() {
        if let Some(messenger) = MESSENGER.read().clone() {
            messenger.release(&handle.owner_address(), handle.id(), 1);
        }
        return;
    }
    release_one_sent(handle.id());
}

/// A reference to `handle` arrived from another process: a borrowed slot counts it, to release
/// it later; an object this process owns came back, so the sender's count is released here.
pub fn on_receive(handle: &ObjectHandle) {
    if handle.is_borrowed() {
        handle.note_received();
        return;
    }
    release_one_sent(handle.id());
}

/// One reference to this process's object `id` that was counted as sent is not out any more.
fn release_one_sent(id: ObjectId) {
    let dropped = with_table(|table| table.released(id, None, 1, Instant::now()));
    drop(dropped);
}

/// A borrowed slot that received `count` references was dropped: tell the owner.
pub(crate) fn on_borrowed_dropped(owner: &str, id: ObjectId, count: u64) {
    if count == 0 {
        return;
    }
    if let Some(messenger) = MESSENGER.read().clone() {
        messenger.release(owner, id, count);
    }
}

/// The owner's side of `GetObject`: `borrower` fetched `id`.
pub fn on_fetched(id: ObjectId, borrower: &str) {
    with_table(|table| table.fetched(id, borrower, Instant::now()));
}

/// The owner's side of `ReleaseBorrowed`.
pub fn on_released(id: ObjectId, borrower: &str, count: u64) {
    let borrower = Some(borrower).filter(|b| !b.is_empty());
    let Some(handle) = with_table(|table| table.released(id, borrower, count, Instant::now()))
    else {
        return;
    };
    tracing::debug!(object = %id, "the last borrower released it");
    // Kept a moment longer: a forwarder's `AddBorrowed` may still be on its way (see
    // [`RELEASE_LINGER`]); if it lands meanwhile, `on_added` finds the object and counts again.
    if let Ok(io) = tokio::runtime::Handle::try_current() {
        io.spawn(async move {
            tokio::time::sleep(RELEASE_LINGER).await;
            drop(handle);
        });
    }
}

/// The owner's side of `AddBorrowed`: the live object `id` was forwarded `count` times.
pub fn on_added(id: ObjectId, count: u64) {
    if let Some(handle) = crate::object_store::ObjectSlot::lookup(id) {
        if !handle.is_borrowed() {
            with_table(|table| table.sent(&handle, count, Instant::now()));
        }
    }
}

/// Objects lent out whose count has not changed for [`STALE_AFTER`], with their borrowers,
/// and the instant they were found stale (for [`forget_stale`]).
pub fn stale() -> (Instant, Vec<(ObjectId, Vec<String>)>) {
    let now = Instant::now();
    let stale_since = now.checked_sub(STALE_AFTER).unwrap_or(now);
    (
        stale_since,
        with_table(|table| table.stale(now, STALE_AFTER)),
    )
}

/// Stop keeping `id` for its borrowers, whom the caller found gone, unless its count changed
/// since `stale_since`.
pub fn forget_stale(id: ObjectId, stale_since: Instant) {
    let dropped = with_table(|table| table.forget_stale(id, stale_since));
    if dropped.is_some() {
        tracing::info!(
            object = %id,
            "no borrower of the object is reachable: the references they held are dropped"
        );
    }
    drop(dropped);
}

/// References to `id` this process lent and that are not yet released. For tests.
pub fn lent_count(id: ObjectId) -> u64 {
    with_table(|table| table.count(id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::object_store::{ObjectSlot, StoredValue};

    fn object() -> ObjectHandle {
        ObjectSlot::ready(StoredValue::default())
    }

    #[test]
    fn object_is_kept_until_every_sent_reference_is_released() {
        let mut table = LentTable::default();
        let handle = object();
        let (id, weak) = (handle.id(), Arc::downgrade(&handle));
        let now = Instant::now();
        table.sent(&handle, 1, now);
        table.sent(&handle, 2, now);
        drop(handle);
        assert_eq!(table.count(id), 3);
        assert!(table.released(id, Some("b1"), 2, now).is_none());
        assert!(weak.upgrade().is_some(), "one reference is still out");
        let last = table.released(id, Some("b2"), 1, now);
        assert!(last.is_some());
        drop(last);
        assert!(
            weak.upgrade().is_none(),
            "the last release frees the object"
        );
        assert!(table.is_empty());
    }

    #[test]
    fn releasing_more_than_sent_or_unknown_objects_is_harmless() {
        let mut table = LentTable::default();
        let now = Instant::now();
        assert!(table.released(ObjectId::generate(), None, 5, now).is_none());
        let handle = object();
        table.sent(&handle, 1, now);
        assert!(table.released(handle.id(), None, 4, now).is_some());
        assert_eq!(table.count(handle.id()), 0);
    }

    #[test]
    fn stale_objects_name_their_borrowers_and_a_change_saves_them() {
        let mut table = LentTable::default();
        let start = Instant::now();
        let handle = object();
        table.sent(&handle, 2, start);
        table.fetched(handle.id(), "borrower-a", start);
        table.fetched(handle.id(), "borrower-b", start);
        table.released(handle.id(), Some("borrower-b"), 1, start);
        let later = start + Duration::from_secs(30);
        assert!(table.stale(start, Duration::from_secs(20)).is_empty());
        let stale = table.stale(later, Duration::from_secs(20));
        assert_eq!(stale, vec![(handle.id(), vec!["borrower-a".to_string()])]);
        // A send after the object was found stale keeps it.
        let found_at = later - Duration::from_secs(20);
        table.sent(&handle, 1, later);
        assert!(table.forget_stale(handle.id(), found_at).is_none());
        assert_eq!(table.count(handle.id()), 2);
        // Unchanged since, it goes.
        let much_later = later + Duration::from_secs(30);
        assert!(table
            .forget_stale(handle.id(), much_later - Duration::from_secs(20))
            .is_some());
        assert!(table.is_empty());
    }
}
