//! Reference counting between processes, seen from one process with a recording messenger in
//! place of the RPCs: what an owner counts when it sends and gets references back, what a
//! borrower counts when it forwards a borrowed reference (it becomes the receiver's lender), and
//! whom a borrower releases to. One test: the counting state is process-wide.

use std::sync::Arc;

use parking_lot::Mutex;
use yr_common::ObjectId;
use yr_proto::v1 as pb;
use yr_runtime::borrows::{self, BorrowMessenger};
use yr_runtime::cluster::convert::{reference_from_proto, reference_to_proto};
use yr_runtime::object_store::{self, ObjectSlot, StoredValue};

#[derive(Default)]
struct Recorder {
    released: Mutex<Vec<(String, ObjectId, u64)>>,
}

struct Recording(Arc<Recorder>);

impl BorrowMessenger for Recording {
    fn release(&self, lender: &str, id: ObjectId, count: u64) {
        self.0.released.lock().push((lender.to_string(), id, count));
    }
}

const THIS: &str = "unix:/nonexistent/this.sock";
const OWNER: &str = "unix:/nonexistent/owner.sock";
const OTHER_BORROWER: &str = "unix:/nonexistent/other-borrower.sock";
const THIRD: &str = "unix:/nonexistent/third.sock";

fn from_owner(id: ObjectId) -> pb::ObjectRefInfo {
    pb::ObjectRefInfo {
        id: id.to_bytes().to_vec().into(),
        owner_address: OWNER.to_string(),
        lender_address: String::new(),
    }
}

fn from_borrower(id: ObjectId, lender: &str) -> pb::ObjectRefInfo {
    pb::ObjectRefInfo {
        lender_address: lender.to_string(),
        ..from_owner(id)
    }
}

fn released(recorder: &Recorder) -> Vec<(String, ObjectId, u64)> {
    std::mem::take(&mut *recorder.released.lock())
}

#[test]
fn owners_count_sends_and_borrowers_release_what_they_received() {
    object_store::set_local_owner_address(THIS);
    let recorder = Arc::new(Recorder::default());
    borrows::set_messenger(Some(Arc::new(Recording(recorder.clone()))));

    // An owner keeps a sent object after dropping its own handle, until every send is released.
    let object = ObjectSlot::ready(StoredValue::default());
    let id = object.id();
    reference_to_proto(&object);
    let sent_twice = reference_to_proto(&object);
    assert_eq!(borrows::lent_count(id), 2);
    drop(object);
    assert!(ObjectSlot::lookup(id).is_some(), "borrowers still hold it");
    // One reference comes back to its owner: that send is no longer out.
    let back = reference_from_proto(&sent_twice).unwrap();
    assert_eq!(borrows::lent_count(id), 1);
    drop(back);
    borrows::on_released(id, "unix:/nonexistent/borrower.sock", 1);
    assert_eq!(borrows::lent_count(id), 0);
    assert!(
        ObjectSlot::lookup(id).is_none(),
        "the last release frees it"
    );

    // A borrower receives the same reference three times into one slot.
    let borrowed_id = ObjectId::generate();
    let first = reference_from_proto(&from_owner(borrowed_id)).unwrap();
    let second = reference_from_proto(&from_owner(borrowed_id)).unwrap();
    let third = reference_from_proto(&from_owner(borrowed_id)).unwrap();
    assert!(Arc::ptr_eq(&first, &second));
    assert_eq!(first.fetch_addresses(), vec![OWNER.to_string()]);
    // The same object sent by another borrower is held already: given back to it at once.
    let again = reference_from_proto(&from_borrower(borrowed_id, OTHER_BORROWER)).unwrap();
    assert!(Arc::ptr_eq(&first, &again));
    assert_eq!(
        released(&recorder),
        vec![(OTHER_BORROWER.to_string(), borrowed_id, 1)]
    );
    // Forwarding it counts the send here: this process is the receiver's lender, and keeps
    // its own borrow (the slot) until the receiver releases, whatever it drops meanwhile.
    let forwarded = reference_to_proto(&third);
    assert_eq!(forwarded.lender_address, THIS);
    assert_eq!(forwarded.owner_address, OWNER);
    assert_eq!(borrows::lent_count(borrowed_id), 1);
    drop((first, second, third, again));
    assert!(ObjectSlot::lookup(borrowed_id).is_some());
    assert!(
        released(&recorder).is_empty(),
        "nothing goes to the owner yet"
    );
    // The receiver releases to this process; the slot goes, and its three to the owner.
    borrows::on_released(borrowed_id, THIRD, 1);
    assert!(ObjectSlot::lookup(borrowed_id).is_none());
    assert_eq!(
        released(&recorder),
        vec![(OWNER.to_string(), borrowed_id, 3)]
    );

    // A reference received from a lender is fetched from it first, then from the owner, and
    // released to it.
    let lent_id = ObjectId::generate();
    let lent = reference_from_proto(&from_borrower(lent_id, OTHER_BORROWER)).unwrap();
    assert_eq!(
        lent.fetch_addresses(),
        vec![OTHER_BORROWER.to_string(), OWNER.to_string()]
    );
    drop(lent);
    assert_eq!(
        released(&recorder),
        vec![(OTHER_BORROWER.to_string(), lent_id, 1)]
    );

    borrows::set_messenger(None);
    object_store::set_local_owner_address("");
}
