//! Distributed reference counting: which objects this process sent to other processes, and
//! keeps for them.
//!
//! Every process that sends a reference counts it ([`LentTable`]): the owner for its own
//! objects, a borrower for a borrowed reference it sends on (it is then the receiver's
//! *lender*). A table entry keeps a strong handle while its count is above 0: the owner keeps
//! its object, a lender keeps its borrowed slot, and with it its own borrow from whoever lent
//! to it. A receiver counts on its borrowed slot how many references arrived from its lender
//! and, when the slot is dropped, tells the lender to release that many (`ReleaseBorrowed`). A
//! reference that arrives for an object already held through another lender (or owned here)
//! is given back to its sender at once.
//!
//! So every reference is released to the process that counted it, which counted it before it
//! sent it: no count can fall to 0 while a reference travels, and no timing is involved.
//!
//! A borrower that dies without releasing is covered by the lender's sweep: a count unchanged
//! for [`STALE_AFTER`] whose every known borrower is unreachable is dropped. Local mode has no
//! borrowers: nothing is counted when this process serves no Worker address.
//!
//! The RPCs themselves are the backend's ([`BorrowMessenger`]); this module only counts.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use yr_common::ObjectId;

use crate::object_store::{local_owner_address, ObjectHandle};

/// How long a count must stay unchanged before its lender checks whether its borrowers are
/// alive. It also bounds how long a reference may travel unreceived (an argument of a call
/// that failed before its runtime decoded it) before nobody known holds it.
pub const STALE_AFTER: Duration = Duration::from_secs(20);

/// Sends borrowers' messages to their lenders. Installed by the cluster backend.
pub trait BorrowMessenger: Send + Sync {
    /// Tell `lender` that this process dropped `count` references to `id` it got from it. Fire
    /// and forget.
    fn release(&self, lender: &str, id: ObjectId, count: u64);
}

static MESSENGER: RwLock<Option<Arc<dyn BorrowMessenger>>> = RwLock::new(None);

/// Install how borrowers reach their lenders (`None` to remove).
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

/// The table of objects this process sent to other processes (owned or borrowed).
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

/// Rung when the lent table stops being empty: the lender's sweep sleeps on it meanwhile, so a
/// process that lends nothing does not wake up for it.
static LENT_SOMETHING: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Wait until this process lends something (at once if it does now).
pub async fn lending() {
    if with_table(|table| table.is_empty()) {
        LENT_SOMETHING.notified().await;
    }
}

fn with_table<R>(f: impl FnOnce(&mut LentTable) -> R) -> R {
    f(LENT.lock().get_or_insert_with(LentTable::default))
}

/// A reference to `handle` is about to be sent to another process: counted here, whether this
/// process owns the object or sends a borrowed reference on.
pub fn on_send(handle: &ObjectHandle) {
    if local_owner_address().is_empty() {
        return;
    }
    let was_empty = with_table(|table| {
        let was_empty = table.is_empty();
        table.sent(handle, 1, Instant::now());
        was_empty
    });
    if was_empty {
        LENT_SOMETHING.notify_one();
    }
}

/// A reference counted by [`on_send`] was not sent after all.
pub fn on_send_undone(handle: &ObjectHandle) {
    if local_owner_address().is_empty() {
        return;
    }
    release_one_sent(handle.id());
}

/// A reference to `handle` arrived from the process at `sender` (which counted it). A borrowed
/// slot whose lender is `sender` counts it, to release it when dropped; a reference this
/// process already holds otherwise (its own object, or one borrowed from another lender) is
/// given back to `sender` at once.
pub fn on_receive(handle: &ObjectHandle, sender: &str) {
    if handle.lender_address() == Some(sender) {
        handle.note_received();
        return;
    }
    if sender.is_empty() || sender == local_owner_address() {
        release_one_sent(handle.id());
        return;
    }
    if let Some(messenger) = MESSENGER.read().clone() {
        messenger.release(sender, handle.id(), 1);
    }
}

/// One reference to `id` that this process counted as sent is not out any more.
fn release_one_sent(id: ObjectId) {
    let dropped = with_table(|table| table.released(id, None, 1, Instant::now()));
    drop(dropped);
}

/// A borrowed slot that received `count` references from `lender` was dropped: tell it.
pub(crate) fn on_borrowed_dropped(lender: &str, id: ObjectId, count: u64) {
    if count == 0 {
        return;
    }
    if let Some(messenger) = MESSENGER.read().clone() {
        messenger.release(lender, id, count);
    }
}

/// The lender's side of `GetObject`: `borrower` fetched `id`.
pub fn on_fetched(id: ObjectId, borrower: &str) {
    with_table(|table| table.fetched(id, borrower, Instant::now()));
}

/// The lender's side of `ReleaseBorrowed`: `borrower` dropped `count` references to `id`.
pub fn on_released(id: ObjectId, borrower: &str, count: u64) {
    let borrower = Some(borrower).filter(|b| !b.is_empty());
    let released = with_table(|table| table.released(id, borrower, count, Instant::now()));
    if released.is_some() {
        tracing::debug!(object = %id, "the last borrower released it");
    }
    // Dropped outside the table's lock: a borrowed slot's drop releases it to its own lender.
    drop(released);
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
        // Routine: borrowers are released stateless instances and finished runtimes.
        tracing::debug!(
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
