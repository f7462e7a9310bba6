//! Serialization: values travel as MessagePack (maps with field names, so Python reads them as
//! dicts). While a value is encoded, every object reference inside it is captured, so the value
//! keeps those objects alive and a call waits for them before it runs.

use std::cell::RefCell;

use serde::de::DeserializeOwned;
use serde::Serialize;
use yr_common::{Error, ErrorCode, Result};

use crate::object_store::{ObjectHandle, StoredValue};

thread_local! {
    static CAPTURE: RefCell<Option<Vec<ObjectHandle>>> = const { RefCell::new(None) };
}

/// Record that the value being encoded on this thread refers to `handle`. Called by the
/// `Serialize` impl of object references; does nothing outside [`encode`].
pub fn capture_reference(handle: &ObjectHandle) {
    CAPTURE.with(|capture| {
        if let Some(list) = capture.borrow_mut().as_mut() {
            list.push(handle.clone());
        }
    });
}

/// Encode `value`, capturing the object references inside it.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<StoredValue> {
    let outer = CAPTURE.with(|capture| capture.borrow_mut().replace(Vec::new()));
    let encoded = rmp_serde::to_vec_named(value);
    let nested = CAPTURE
        .with(|capture| std::mem::replace(&mut *capture.borrow_mut(), outer))
        .unwrap_or_default();
    match encoded {
        Ok(bytes) => Ok(StoredValue { bytes, nested }),
        Err(e) => Err(Error::new(
            ErrorCode::ParamInvalid,
            format!(
                "cannot serialize a value of type {}: {e}; make the type serializable with serde",
                std::any::type_name::<T>()
            ),
        )),
    }
}

/// Decode a value of type `T` from `bytes`. A mismatch is error 4003.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    rmp_serde::from_slice(bytes).map_err(|e| {
        Error::new(
            ErrorCode::DeserializationFailed,
            format!(
                "cannot deserialize a {} from {} bytes: {e}; check that the caller and the \
                 callee agree on the type",
                std::any::type_name::<T>(),
                bytes.len()
            ),
        )
    })
}
