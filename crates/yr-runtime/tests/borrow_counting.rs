//! Reference counting between processes, seen from one process with a recording messenger in
//! place of the RPCs: what an owner counts when it sends and gets references back, and what a
//! borrower tells owners when it drops or forwards a borrowed reference. One test: the counting
//! state is process-wide.

use std::sync::Arc;

use parking_lot::Mutex;
use yr_common::ObjectId;
use yr_proto::v1 as pb;
use yr_runtime::borrows::{self, BorrowMessenger};
use yr_runtime::cluster::convert::{reference_from_proto, reference_to_proto};
use yr_runtime::object_store::{self, ObjectHandle, ObjectSlot, StoredValue};

#[derive(Default)]
struct Recorder {
    released: Mutex<Vec<(String, ObjectId, u64)>>,
    added: Mutex<Vec<ObjectId>>,
}

struct Recording(Arc<Recorder>);

impl BorrowMessenger for Recording {
    fn release(&self, owner: &str, id: ObjectId, count: u64) {
        self.0.released.lock().push((owner.to_string(), id, count));
    }

    fn add(&self, handle: ObjectHandle) {
        self.0.added.lock().push(handle.id());
    }
}

const OWNER: &str = "unix:/nonexistent/owner.sock";

fn from_owner(id: ObjectId) -> pb::ObjectRefInfo {
    pb::ObjectRefInfo {
        id: id.to_bytes().to_vec().into(),
        owner_address: OWNER.to_string(),
    }
}

#[test]
fn owners_count_sends_and_borrowers_release_what_they_received() {
    object_store::set_local_owner_address("unix:/nonexistent/this.sock");
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

    // A borrower receives the same reference three times into one slot, and releases three.
    let borrowed_id = ObjectId::generate();
    let first = reference_from_proto(&from_owner(borrowed_id)).unwrap();
    let second = reference_from_proto(&from_owner(borrowed_id)).unwrap();
    let third = reference_from_proto(&from_owner(borrowed_id)).unwrap();
    assert!(Arc::ptr_eq(&first, &second));
    // Forwarding it asks the owner to count one more.
    reference_to_proto(&third);
    assert_eq!(*recorder.added.lock(), vec![borrowed_id]);
    assert!(recorder.released.lock().is_empty());
    drop((first, second, third));
    assert_eq!(
        *recorder.released.lock(),
        vec![(OWNER.to_string(), borrowed_id, 3)]
    );

    borrows::set_messenger(None);
    object_store::set_local_owner_address("");
}
