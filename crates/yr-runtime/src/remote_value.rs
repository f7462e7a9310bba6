//! Values whose only copy is on another node: a call's result above the inline threshold for a
//! caller on another node stays in the executing node's shared memory, held there for this
//! process (design 026), and its slot holds a [`RemoteValue`], its location. The first read
//! brings it here ([`RemoteValue::bring_here`]): this node pulls it through the other node's
//! data port (which then drops its hold), or, when that node lost it, the value is recomputed
//! from its [`Lineage`] (a stateless call's function, arguments and options). A remote value
//! dropped unread asks the holding node to drop its hold.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use yr_common::{Error, ErrorCode, ObjectId};
use yr_proto::v1 as pb;

use crate::object_store::{Payload, StoredValue};

/// How a value lost with its node is made again: the call that produced it.
pub trait Lineage: Send + Sync {
    /// Run the call again and wait for its result number `index`, brought to this node.
    /// `lost` says why the value could not be pulled. 4005 when it cannot be recomputed (an
    /// argument is gone too, or the attempts are spent), saying why.
    fn recompute(&self, index: usize, lost: &Error) -> Result<Arc<StoredValue>, Error>;
}

/// What happens when a remote value cannot be pulled.
pub enum Recovery {
    /// Result `index` of a call with this lineage: recomputed.
    Recompute(Arc<dyn Lineage>, usize),
    /// Not recomputed, for this reason (shown in the 4005).
    Not(&'static str),
}

/// Why a value without lineage is not recomputed: it is an instance method's result.
pub const STATEFUL: &str = "it is the result of an instance method, which is not recomputed \
     (its instance's state may differ now)";

/// The location of a value held on another node for this process, and how to recover it.
pub struct RemoteValue {
    location: pb::SharedLocation,
    recovery: Recovery,
    /// Held while one reader brings the value here; true once the holding node's hold is no
    /// longer this value's to drop (pulled with it, or lost with the node).
    settled: Mutex<bool>,
}

impl std::fmt::Debug for RemoteValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RemoteValue({} bytes at {})",
            self.location.size, self.location.node_address
        )
    }
}

/// What pulls values held on other nodes into this node and drops such holds (the cluster
/// backend installs one).
pub trait RemotePuller: Send + Sync {
    /// Pull the value at `location` into this node's shared memory, and drop the holding
    /// node's hold. Blocks.
    fn pull(&self, location: &pb::SharedLocation) -> Result<Payload, Error>;
    /// Ask the holding node to drop its hold on the value at `location`. Must not block.
    fn drop_hold(&self, location: &pb::SharedLocation);
}

static PULLER: parking_lot::RwLock<Option<Arc<dyn RemotePuller>>> = parking_lot::RwLock::new(None);

/// Install how remote values are pulled (the cluster backend does this; `None` on finalize).
pub fn set_puller(puller: Option<Arc<dyn RemotePuller>>) {
    *PULLER.write() = puller;
}

fn puller() -> Option<Arc<dyn RemotePuller>> {
    PULLER.read().clone()
}

impl RemoteValue {
    /// The value at `location`, recovered as `recovery` says if it cannot be pulled.
    pub fn new(location: pb::SharedLocation, recovery: Recovery) -> RemoteValue {
        RemoteValue {
            location,
            recovery,
            settled: Mutex::new(false),
        }
    }

    /// Where the value lies.
    pub fn location(&self) -> &pb::SharedLocation {
        &self.location
    }

    /// Taken by the reader that brings the value here; others wait for it.
    pub(crate) fn bringing(&self) -> MutexGuard<'_, bool> {
        self.settled.lock()
    }

    /// The value of object `id` here, with the references `nested` in it: pulled into this
    /// node, or recomputed when the holding node lost it. Called with [`Self::bringing`] held.
    pub(crate) fn bring_here(
        &self,
        settled: &mut bool,
        id: ObjectId,
        nested: &[crate::object_store::ObjectHandle],
    ) -> Result<Arc<StoredValue>, Error> {
        let Some(puller) = puller() else {
            return Err(Error::new(
                ErrorCode::Finalized,
                format!("object {id} lies on another node, and yr is not connected to a cluster"),
            ));
        };
        let lost = match puller.pull(&self.location) {
            Ok(payload) => {
                *settled = true;
                return Ok(Arc::new(StoredValue {
                    bytes: payload,
                    nested: nested.to_vec(),
                }));
            }
            Err(error) => error,
        };
        tracing::debug!(object = %id, node = %self.location.node_address, error = %lost, "a result held on another node cannot be pulled");
        match &self.recovery {
            Recovery::Recompute(lineage, index) => {
                let value = lineage.recompute(*index, &lost)?;
                *settled = true;
                Ok(value)
            }
            Recovery::Not(why) => Err(Error::new(
                ErrorCode::GetOperationFailed,
                format!(
                    "object {id} was lost: its only copy was held by the node at {}, which \
                     cannot serve it ({}); it is not recomputed because {why}",
                    self.location.node_address,
                    lost.message()
                ),
            )),
        }
    }
}

impl Drop for RemoteValue {
    fn drop(&mut self) {
        if !*self.settled.get_mut() {
            if let Some(puller) = puller() {
                puller.drop_hold(&self.location);
            }
        }
    }
}

/// The most lineage records an owner keeps at once.
pub const MAX_LINEAGE_RECORDS: usize = 10_000;
/// The most bytes of inline arguments the lineage records of an owner keep at once.
pub const MAX_LINEAGE_BYTES: usize = 64 << 20;

static LINEAGE_RECORDS: AtomicUsize = AtomicUsize::new(0);
static LINEAGE_BYTES: AtomicUsize = AtomicUsize::new(0);

/// The room one lineage record takes in the owner's bound, given back when dropped.
#[derive(Debug)]
pub struct LineageBudget {
    bytes: usize,
}

/// Why a result keeps no lineage: the owner keeps enough already.
pub const LINEAGE_FULL: &str = "its owner kept no lineage for it: it already keeps the lineage \
     of 10,000 results or 64 MiB of their arguments (drop references to results you no longer \
     need)";

impl LineageBudget {
    /// Room for a record whose inline arguments take `bytes`, if the bound allows.
    pub fn take(bytes: usize) -> Option<LineageBudget> {
        let records = LINEAGE_RECORDS.fetch_add(1, Ordering::AcqRel);
        let total = LINEAGE_BYTES.fetch_add(bytes, Ordering::AcqRel);
        if records >= MAX_LINEAGE_RECORDS || total + bytes > MAX_LINEAGE_BYTES {
            LINEAGE_RECORDS.fetch_sub(1, Ordering::AcqRel);
            LINEAGE_BYTES.fetch_sub(bytes, Ordering::AcqRel);
            return None;
        }
        Some(LineageBudget { bytes })
    }

    /// Lineage records kept now. For tests and metrics.
    pub fn records() -> usize {
        LINEAGE_RECORDS.load(Ordering::Acquire)
    }
}

impl Drop for LineageBudget {
    fn drop(&mut self) {
        LINEAGE_RECORDS.fetch_sub(1, Ordering::AcqRel);
        LINEAGE_BYTES.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_owner_keeps_lineage_within_its_bound_of_records_and_argument_bytes() {
        // Arguments above the byte bound never fit.
        assert!(LineageBudget::take(MAX_LINEAGE_BYTES + 1).is_none());
        let half = LineageBudget::take(MAX_LINEAGE_BYTES / 2).expect("room");
        assert!(LineageBudget::take(MAX_LINEAGE_BYTES / 2 + 1).is_none());
        drop(half);
        // At most MAX_LINEAGE_RECORDS records; room comes back as records are dropped.
        let mut kept: Vec<LineageBudget> = (0..MAX_LINEAGE_RECORDS)
            .map(|_| LineageBudget::take(0).expect("room"))
            .collect();
        assert_eq!(LineageBudget::records(), MAX_LINEAGE_RECORDS);
        assert!(LineageBudget::take(0).is_none());
        kept.pop();
        assert!(LineageBudget::take(0).is_some());
        drop(kept);
        assert_eq!(LineageBudget::records(), 0);
    }
}
