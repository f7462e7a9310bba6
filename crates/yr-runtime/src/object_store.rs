//! The in-process object store: one [`ObjectSlot`] per object this process knows about, holding
//! the object's state (pending, ready or failed) and whoever waits for it. An [`ObjectHandle`]
//! is a counted reference to a slot; when the last handle drops, the object is freed.
//!
//! Every slot is also listed, weakly, in a process-wide index by id. The index lets a reference
//! that arrives serialized inside a value find its slot again, and lets `finalize` fail every
//! pending object.
//!
//! Spilling: when the node's shared memory has no room for a new region, this process gives up
//! its idle objects (`spill_idle`): those it owns whose value nobody reads now (the slot holds
//! the only `Arc` of the value: no `Buffer`, borrowed decode or send is using it), least
//! recently used first. Their payload becomes [`Payload::Spilled`], the object's id on the
//! node's disk; the next read brings it back into shared memory before anyone sees it, so a
//! reader never meets a spilled payload.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::Waker;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use yr_common::{Error, ErrorCode, ObjectId};

use crate::error::RuntimeError;
use crate::remote_value::RemoteValue;
use crate::shared_memory::{SharedMemory, SharedRegion, SpilledValue};

/// A value as stored: its serialized bytes and the references nested inside it, which stay alive
/// as long as the value does.
#[derive(Debug, Default)]
pub struct StoredValue {
    /// The MessagePack encoding of the value.
    pub bytes: Payload,
    /// Objects referenced from inside the value.
    pub nested: Vec<ObjectHandle>,
}

/// An encoding's bytes: in this process, or in the node's shared memory (read in place), or
/// spilled from there to the node's disk.
#[derive(Debug)]
pub enum Payload {
    /// In this process.
    Inline(Vec<u8>),
    /// A region of the node's shared memory.
    Shared(SharedRegion),
    /// On the node's disk. Only a slot holds such a payload, and it restores it before
    /// handing the value out, so readers never see one.
    Spilled(SpilledValue),
    /// Only on another node (a call's result held there for this process). Like a spilled
    /// payload, only a slot holds one, and it brings the value here before handing it out.
    Remote(RemoteValue),
}

impl Default for Payload {
    fn default() -> Self {
        Payload::Inline(Vec::new())
    }
}

impl From<Vec<u8>> for Payload {
    fn from(bytes: Vec<u8>) -> Self {
        Payload::Inline(bytes)
    }
}

impl std::ops::Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Payload::Inline(bytes) => bytes,
            Payload::Shared(region) => region.as_slice(),
            Payload::Spilled(_) | Payload::Remote(_) => &[],
        }
    }
}

/// How to cancel a request (`yr::cancel`'s flags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cancel {
    /// Also a request that already runs: its results fail now (and, for a descendant on a
    /// cluster, its runtime is ended).
    pub force: bool,
    /// Also the stateless calls the request submitted while it ran, and theirs
    /// ([`crate::children`]).
    pub recursive: bool,
    /// The request is cancelled because its parent was, recursively: a running one that runs
    /// alone in a runtime process is stopped by ending that process (with `force`).
    pub descendant: bool,
}

impl Cancel {
    /// A cancel as `yr::cancel` asks it, of the request named.
    ///
    /// ```
    /// use yr_runtime::object_store::Cancel;
    ///
    /// let how = Cancel::new(true, true);
    /// assert!(!how.descendant);
    /// assert!(how.for_children().descendant);
    /// ```
    pub const fn new(force: bool, recursive: bool) -> Cancel {
        Cancel {
            force,
            recursive,
            descendant: false,
        }
    }

    /// The same cancel, of the children of the request it names.
    pub const fn for_children(self) -> Cancel {
        Cancel {
            descendant: true,
            ..self
        }
    }
}

/// Cancels the request that will produce an object. Backends attach one to each pending result.
pub trait Canceller: Send + Sync {
    /// Cancel the request as `how` says.
    fn cancel(&self, how: Cancel);
}

enum Waiter {
    Waker(Waker),
    Callback(Box<dyn FnOnce() + Send>),
}

enum SlotState {
    Pending {
        waiters: Vec<Waiter>,
        canceller: Option<Arc<dyn Canceller>>,
    },
    Ready(Arc<StoredValue>),
    Failed(Error),
}

/// One object's state and the parties waiting for it.
pub struct ObjectSlot {
    id: ObjectId,
    /// The process that owns the object, for objects owned elsewhere; `None` when this process
    /// owns it.
    owner: Option<Box<str>>,
    /// For an object borrowed through another borrower (which sent it on): that process. It
    /// keeps its own borrow for this one; the value is fetched from it first, and this
    /// process's references are released to it. `None`: they go to the owner.
    lender: Option<Box<str>>,
    /// For a borrowed object: how many times a reference to it arrived from its lender (or
    /// owner), released to it when the slot is dropped (see `borrows`).
    received: AtomicU64,
    /// Set once the state leaves `Pending`; lets waiters spin without taking the lock.
    finished: AtomicBool,
    /// When the value was last read or made, on [`USE_CLOCK`]: the least recently used idle
    /// objects are spilled first.
    last_used: AtomicU64,
    state: Mutex<SlotState>,
    changed: Condvar,
}

/// How long a waiter spins before it sleeps. A call that finishes within this time saves the
/// sleep and the wake-up, which dominate a synchronous call's cost.
const SPIN_BEFORE_SLEEP: Duration = Duration::from_micros(500);

/// A counted reference to an object. Cloning is cheap; the object lives while any handle does.
pub type ObjectHandle = Arc<ObjectSlot>;

/// What a finished object holds.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// The value.
    Ready(Arc<StoredValue>),
    /// The error the request that should have produced it ended with.
    Failed(Error),
}

const SHARDS: usize = 16;

/// Ticks once per object use; orders objects for spilling.
static USE_CLOCK: AtomicU64 = AtomicU64::new(0);

fn now_used() -> u64 {
    USE_CLOCK.fetch_add(1, Ordering::Relaxed)
}

/// Bring a spilled value back into shared memory, in place. The value must be the slot's alone,
/// which it is: a value is spilled only then, and handed out only once restored.
fn restore_in_place(id: ObjectId, value: &mut Arc<StoredValue>) -> Result<(), Error> {
    if !matches!(value.bytes, Payload::Spilled(_)) {
        return Ok(());
    }
    let Some(stored) = Arc::get_mut(value) else {
        return Err(
            RuntimeError::Bug(format!("object {id} is spilled while a reader holds it")).into(),
        );
    };
    let Payload::Spilled(spilled) = &stored.bytes else {
        return Ok(());
    };
    let region = spilled.memory().clone().restore(spilled)?;
    if let Payload::Spilled(spilled) = std::mem::replace(&mut stored.bytes, Payload::Shared(region))
    {
        spilled.forget();
    }
    tracing::debug!(object = %id, "restored from the node's disk");
    Ok(())
}

/// Fetches a borrowed object's value from its owner and finishes its slot.
pub type RemoteFetcher = Box<dyn Fn(ObjectHandle) + Send + Sync>;

static REMOTE_FETCHER: parking_lot::RwLock<Option<RemoteFetcher>> = parking_lot::RwLock::new(None);
static LOCAL_OWNER: parking_lot::RwLock<String> = parking_lot::RwLock::new(String::new());

/// Install how borrowed objects are fetched (the cluster backend does this).
pub fn set_remote_fetcher(fetcher: Option<RemoteFetcher>) {
    *REMOTE_FETCHER.write() = fetcher;
}

/// Set the address at which this process serves the objects it owns.
pub fn set_local_owner_address(address: &str) {
    *LOCAL_OWNER.write() = address.to_string();
}

/// The address at which this process serves the objects it owns ("" in local mode).
pub fn local_owner_address() -> String {
    LOCAL_OWNER.read().clone()
}

struct Index {
    shards: [Mutex<HashMap<ObjectId, Weak<ObjectSlot>>>; SHARDS],
}

fn index() -> &'static Index {
    static INDEX: std::sync::OnceLock<Index> = std::sync::OnceLock::new();
    INDEX.get_or_init(|| Index {
        shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
    })
}

fn shard(id: ObjectId) -> &'static Mutex<HashMap<ObjectId, Weak<ObjectSlot>>> {
    let bytes = id.to_bytes();
    &index().shards[bytes[15] as usize % SHARDS]
}

impl ObjectSlot {
    fn register(slot: ObjectSlot) -> ObjectHandle {
        let id = slot.id;
        let handle = Arc::new(slot);
        shard(id).lock().insert(id, Arc::downgrade(&handle));
        handle
    }

    /// A new object that a request will produce later.
    pub fn pending() -> ObjectHandle {
        Self::register(ObjectSlot {
            id: ObjectId::generate(),
            owner: None,
            lender: None,
            received: AtomicU64::new(0),
            finished: AtomicBool::new(false),
            last_used: AtomicU64::new(now_used()),
            state: Mutex::new(SlotState::Pending {
                waiters: Vec::new(),
                canceller: None,
            }),
            changed: Condvar::new(),
        })
    }

    /// A new object that already has its value.
    pub fn ready(value: StoredValue) -> ObjectHandle {
        Self::register(ObjectSlot {
            id: ObjectId::generate(),
            owner: None,
            lender: None,
            received: AtomicU64::new(0),
            finished: AtomicBool::new(true),
            last_used: AtomicU64::new(now_used()),
            state: Mutex::new(SlotState::Ready(Arc::new(value))),
            changed: Condvar::new(),
        })
    }

    /// The live object with this id in this process, if any.
    pub fn lookup(id: ObjectId) -> Option<ObjectHandle> {
        shard(id).lock().get(&id).and_then(Weak::upgrade)
    }

    /// A failed placeholder for an id this process does not hold.
    pub fn missing(id: ObjectId) -> ObjectHandle {
        Arc::new(ObjectSlot {
            id,
            owner: None,
            lender: None,
            received: AtomicU64::new(0),
            finished: AtomicBool::new(true),
            last_used: AtomicU64::new(now_used()),
            state: Mutex::new(SlotState::Failed(Error::new(
                ErrorCode::GetOperationFailed,
                format!(
                    "object {id} is not held by this process: its last reference was dropped \
                     before it was read; keep an ObjectRef to it while it is in use"
                ),
            ))),
            changed: Condvar::new(),
        })
    }

    /// The object's id.
    pub fn id(&self) -> ObjectId {
        self.id
    }

    /// The address of the process that owns the object: another process's for a borrowed
    /// object, this process's (or "" in local mode) otherwise.
    pub fn owner_address(&self) -> String {
        match &self.owner {
            Some(owner) => owner.to_string(),
            None => local_owner_address(),
        }
    }

    /// Whether another process owns the object.
    pub fn is_borrowed(&self) -> bool {
        self.owner.is_some()
    }

    /// For a borrowed object, the process this one got it from and releases it to: its lender
    /// if a borrower sent it on, else its owner. `None` for an object this process owns.
    pub fn lender_address(&self) -> Option<&str> {
        self.lender.as_deref().or(self.owner.as_deref())
    }

    /// Where to fetch a borrowed object's value, in order: its lender (which holds the value
    /// for this process), then its owner (should the lender be gone).
    pub fn fetch_addresses(&self) -> Vec<String> {
        self.lender
            .iter()
            .chain(self.owner.iter())
            .map(|address| address.to_string())
            .collect()
    }

    /// Whether `address` is this borrowed object's lender (a borrower that sent it on), not its
    /// owner.
    pub fn is_lender(&self, address: &str) -> bool {
        self.lender.as_deref() == Some(address)
    }

    /// A reference to this borrowed object arrived from its lender (or owner); it is told to
    /// release it when the slot is dropped.
    pub(crate) fn note_received(&self) {
        self.received.fetch_add(1, Ordering::Relaxed);
    }

    /// The object `id` owned by the process at `owner`, sent by the borrower at `lender` (or
    /// by the owner itself: `None`): the live slot if this process has one, otherwise a new
    /// pending slot that the remote fetcher fills.
    pub fn borrowed(id: ObjectId, owner: &str, lender: Option<&str>) -> ObjectHandle {
        if let Some(handle) = Self::lookup(id) {
            return handle;
        }
        if owner.is_empty() || owner == local_owner_address() {
            return Self::missing(id);
        }
        let lender = lender.filter(|lender| !lender.is_empty() && *lender != owner);
        let handle = Self::register(ObjectSlot {
            id,
            owner: Some(owner.into()),
            lender: lender.map(Into::into),
            received: AtomicU64::new(0),
            finished: AtomicBool::new(false),
            last_used: AtomicU64::new(now_used()),
            state: Mutex::new(SlotState::Pending {
                waiters: Vec::new(),
                canceller: None,
            }),
            changed: Condvar::new(),
        });
        match REMOTE_FETCHER.read().as_ref() {
            Some(fetch) => fetch(handle.clone()),
            None => {
                handle.fail(Error::new(
                    ErrorCode::GetOperationFailed,
                    format!("object {id} is owned by {owner}, and this process is not connected to a cluster"),
                ));
            }
        }
        handle
    }

    /// Attach the canceller of the request that produces this object.
    pub fn set_canceller(&self, canceller: Arc<dyn Canceller>) {
        if let SlotState::Pending {
            canceller: slot, ..
        } = &mut *self.state.lock()
        {
            *slot = Some(canceller);
        }
    }

    /// Give the object its value. Returns false if it was already finished (for example
    /// cancelled), in which case the value is dropped.
    pub fn complete(&self, value: Arc<StoredValue>) -> bool {
        self.finish(SlotState::Ready(value))
    }

    /// Fail the object. Returns false if it was already finished.
    pub fn fail(&self, error: Error) -> bool {
        self.finish(SlotState::Failed(error))
    }

    /// Fail the object with `error`, then cancel the request that produces it (which then
    /// does not run, or is not retried; its later result is dropped). Returns false if the
    /// object was already finished.
    pub fn fail_and_cancel(&self, error: Error) -> bool {
        let canceller = match &*self.state.lock() {
            SlotState::Pending { canceller, .. } => canceller.clone(),
            _ => return false,
        };
        let failed = self.fail(error);
        if let Some(canceller) = canceller {
            canceller.cancel(Cancel::default());
        }
        failed
    }

    fn finish(&self, new_state: SlotState) -> bool {
        let waiters = {
            let mut state = self.state.lock();
            if !matches!(*state, SlotState::Pending { .. }) {
                return false;
            }
            let previous = std::mem::replace(&mut *state, new_state);
            self.finished.store(true, Ordering::Release);
            match previous {
                SlotState::Pending { waiters, .. } => waiters,
                _ => Vec::new(),
            }
        };
        self.changed.notify_all();
        for waiter in waiters {
            match waiter {
                Waiter::Waker(waker) => waker.wake(),
                Waiter::Callback(callback) => callback(),
            }
        }
        true
    }

    /// The outcome in `state`, if finished; a spilled value is restored first (a failed
    /// restore is this read's error, and the value stays on disk for the next).
    fn readable(&self, state: &mut SlotState) -> Option<Outcome> {
        match state {
            SlotState::Pending { .. } => None,
            SlotState::Ready(value) => {
                if let Err(error) = restore_in_place(self.id, value) {
                    return Some(Outcome::Failed(error));
                }
                self.last_used.store(now_used(), Ordering::Relaxed);
                Some(Outcome::Ready(value.clone()))
            }
            SlotState::Failed(error) => Some(Outcome::Failed(error.clone())),
        }
    }

    /// The error, if the object failed. Unlike [`ObjectSlot::outcome`] it never restores a
    /// spilled value.
    pub fn failure(&self) -> Option<Error> {
        match &*self.state.lock() {
            SlotState::Failed(error) => Some(error.clone()),
            _ => None,
        }
    }

    /// Whether the object has a value that lies in shared memory: this node's, spilled from
    /// there, or another node's. Unlike [`ObjectSlot::outcome`] it never restores or pulls
    /// a value.
    pub fn is_in_shared_memory(&self) -> bool {
        matches!(
            &*self.state.lock(),
            SlotState::Ready(value) if matches!(value.bytes, Payload::Shared(_) | Payload::Spilled(_) | Payload::Remote(_))
        )
    }

    /// Whether the object's value lies only on another node (not brought here yet).
    pub fn is_remote(&self) -> bool {
        matches!(
            &*self.state.lock(),
            SlotState::Ready(value) if matches!(value.bytes, Payload::Remote(_))
        )
    }

    /// The outcome, if the object is finished (a spilled value is restored first, a value on
    /// another node brought here).
    pub fn outcome(&self) -> Option<Outcome> {
        if let Err(error) = self.bring_here() {
            return Some(Outcome::Failed(error));
        }
        self.readable(&mut self.state.lock())
    }

    /// Bring a value that lies only on another node here (see `remote_value`), outside the
    /// slot's lock: a pull, or a recompute, takes a while. One reader brings it; the others
    /// wait for it. A failure is this read's error, and the next read tries again.
    fn bring_here(&self) -> Result<(), Error> {
        let value = match &*self.state.lock() {
            SlotState::Ready(value) if matches!(value.bytes, Payload::Remote(_)) => value.clone(),
            _ => return Ok(()),
        };
        let Payload::Remote(remote) = &value.bytes else {
            return Ok(());
        };
        let mut settled = remote.bringing();
        let current =
            |state: &SlotState| matches!(state, SlotState::Ready(now) if Arc::ptr_eq(now, &value));
        if *settled || !current(&self.state.lock()) {
            return Ok(());
        }
        let here = remote.bring_here(&mut settled, self.id, &value.nested)?;
        let mut state = self.state.lock();
        if current(&state) {
            *state = SlotState::Ready(here);
        }
        Ok(())
    }

    /// `outcome` as read under the lock, with a value that lies on another node brought here.
    fn brought_here(&self, outcome: Option<Outcome>) -> Option<Outcome> {
        match &outcome {
            Some(Outcome::Ready(value)) if matches!(value.bytes, Payload::Remote(_)) => {
                drop(outcome);
                self.outcome()
            }
            _ => outcome,
        }
    }

    /// Spill this object's value to the node's disk if it is idle: ready, in `memory`, owned by
    /// this process and read by nobody now. Returns the bytes given back, if it was spilled.
    fn spill_if_idle(&self, memory: &Arc<SharedMemory>) -> Result<Option<u64>, Error> {
        if self.owner.is_some() {
            return Ok(None);
        }
        // Never wait: the slot may be in use, perhaps by this very thread.
        let Some(mut state) = self.state.try_lock() else {
            return Ok(None);
        };
        let SlotState::Ready(value) = &mut *state else {
            return Ok(None);
        };
        let Some(stored) = Arc::get_mut(value) else {
            return Ok(None);
        };
        let size = match &stored.bytes {
            Payload::Shared(region) if region.is_in(memory) => region.as_slice().len() as u64,
            _ => return Ok(None),
        };
        let Payload::Shared(region) = std::mem::take(&mut stored.bytes) else {
            return Ok(None);
        };
        let (spilled, kept) = memory.spill(region, self.id);
        if let Some(region) = kept {
            stored.bytes = Payload::Shared(region);
        }
        match spilled? {
            Some(spilled) => {
                stored.bytes = Payload::Spilled(spilled);
                tracing::debug!(object = %self.id, size, "spilled to the node's disk");
                Ok(Some(size))
            }
            None => Ok(None),
        }
    }

    /// Whether the object is finished, with a value or an error.
    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    /// Wait until the object is finished or `deadline` passes (`None` waits forever).
    pub fn wait_until(&self, deadline: Option<Instant>) -> Option<Outcome> {
        let outcome = self.wait_as_held(deadline);
        self.brought_here(outcome)
    }

    /// [`ObjectSlot::wait_until`], without bringing a value that lies only on another node
    /// here: its outcome may hold a [`Payload::Remote`] (for an owner that passes the location
    /// on to a borrower, which reads it from there).
    pub fn wait_as_held(&self, deadline: Option<Instant>) -> Option<Outcome> {
        crate::spin::spin_until(SPIN_BEFORE_SLEEP, || self.is_finished());
        let mut state = self.state.lock();
        loop {
            if let Some(outcome) = self.readable(&mut state) {
                return Some(outcome);
            }
            match deadline {
                None => self.changed.wait(&mut state),
                Some(deadline) => {
                    if self.changed.wait_until(&mut state, deadline).timed_out() {
                        return self.readable(&mut state);
                    }
                }
            }
        }
    }

    /// The outcome if finished; otherwise `waker` is woken when it finishes.
    pub fn poll_outcome(&self, waker: &Waker) -> Option<Outcome> {
        let mut state = self.state.lock();
        if let SlotState::Pending { waiters, .. } = &mut *state {
            let known = waiters
                .iter()
                .any(|w| matches!(w, Waiter::Waker(existing) if existing.will_wake(waker)));
            if !known {
                waiters.push(Waiter::Waker(waker.clone()));
            }
            return None;
        }
        let outcome = self.readable(&mut state);
        drop(state);
        self.brought_here(outcome)
    }

    /// Run `callback` once the object is finished: now if it already is, otherwise on the thread
    /// that finishes it. Keep callbacks short.
    pub fn on_finished(&self, callback: Box<dyn FnOnce() + Send>) {
        let mut state = self.state.lock();
        if let SlotState::Pending { waiters, .. } = &mut *state {
            waiters.push(Waiter::Callback(callback));
            return;
        }
        drop(state);
        callback();
    }

    /// Cancel the request producing this object, if it is still pending and cancellable.
    /// Returns whether a canceller was asked.
    pub fn cancel(&self, how: Cancel) -> bool {
        let canceller = match &*self.state.lock() {
            SlotState::Pending { canceller, .. } => canceller.clone(),
            _ => None,
        };
        match canceller {
            Some(canceller) => {
                canceller.cancel(how);
                true
            }
            None => false,
        }
    }
}

impl Drop for ObjectSlot {
    fn drop(&mut self) {
        {
            let mut shard = shard(self.id).lock();
            if let Some(weak) = shard.get(&self.id) {
                if weak.strong_count() == 0 {
                    shard.remove(&self.id);
                }
            }
        }
        let received = *self.received.get_mut();
        if let Some(lender) = self.lender_address() {
            crate::borrows::on_borrowed_dropped(lender, self.id, received);
        }
    }
}

impl std::fmt::Debug for ObjectSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ObjectSlot({})", self.id)
    }
}

/// Fail every pending object in this process with `error`. Used by `finalize`.
pub fn fail_all_pending(error: &Error) {
    for shard in &index().shards {
        let slots: Vec<ObjectHandle> = shard.lock().values().filter_map(Weak::upgrade).collect();
        for slot in slots {
            slot.fail(error.clone());
        }
    }
}

/// Spill this process's idle objects in `memory`, least recently used first, until at least
/// `needed` bytes were given back or none is left. Returns the bytes given back (0: nothing
/// could be spilled). The first disk failure (4203, 4204, 4201) stops it and is returned.
pub(crate) fn spill_idle(memory: &Arc<SharedMemory>, needed: u64) -> Result<u64, Error> {
    let mut candidates: Vec<(u64, ObjectHandle)> = Vec::new();
    for shard in &index().shards {
        // Upgraded under the shard's lock, looked at after it: dropping a handle may free its
        // slot, which takes that lock.
        let slots: Vec<ObjectHandle> = shard.lock().values().filter_map(Weak::upgrade).collect();
        for slot in slots {
            if slot.owner.is_none() && slot.is_finished() {
                candidates.push((slot.last_used.load(Ordering::Relaxed), slot));
            }
        }
    }
    candidates.sort_by_key(|(used, _)| *used);
    let mut freed = 0;
    for (_, slot) in candidates {
        if freed >= needed {
            break;
        }
        if let Some(size) = slot.spill_if_idle(memory)? {
            freed += size;
        }
    }
    Ok(freed)
}

/// How many objects this process holds. For tests and metrics.
pub fn live_objects() -> usize {
    index()
        .shards
        .iter()
        .map(|shard| {
            shard
                .lock()
                .values()
                .filter(|w| w.strong_count() > 0)
                .count()
        })
        .sum()
}
