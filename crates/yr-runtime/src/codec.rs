//! Serialization: values travel as MessagePack (maps with field names, so Python reads them as
//! dicts). While a value is encoded, every object reference inside it is captured, so the value
//! keeps those objects alive and a call waits for them before it runs.

use std::cell::RefCell;

use serde::de::DeserializeOwned;
use serde::Serialize;
use yr_common::{Error, ErrorCode, Result};

use crate::object_store::{ObjectHandle, Payload, StoredValue};
use crate::shared_memory::{self, EncodeError, Encoded};

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

/// Encode `value`, capturing the object references inside it. An encoding above
/// [`INLINE_LIMIT`](crate::shared_memory::INLINE_LIMIT) goes straight into the node's shared
/// memory when this process has one (4202 if it does not fit there).
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<StoredValue> {
    let outer = CAPTURE.with(|capture| capture.borrow_mut().replace(Vec::new()));
    let mut nested = Vec::new();
    let encoded = shared_memory::write_encoded(|writer| {
        // A value may be encoded more than once (measured, then written): keep the references
        // of the last pass only.
        CAPTURE.with(|capture| *capture.borrow_mut() = Some(Vec::new()));
        let written = value.serialize(&mut rmp_serde::Serializer::new(writer).with_struct_map());
        nested = CAPTURE
            .with(|capture| capture.borrow_mut().take())
            .unwrap_or_default();
        written
    });
    CAPTURE.with(|capture| *capture.borrow_mut() = outer);
    match encoded {
        Ok(Encoded::Inline(bytes)) => Ok(StoredValue {
            bytes: Payload::Inline(bytes),
            nested,
        }),
        Ok(Encoded::Shared(region)) => Ok(StoredValue {
            bytes: Payload::Shared(region),
            nested,
        }),
        Err(EncodeError::Store(error)) => Err(error),
        Err(EncodeError::Encode(e)) => Err(Error::new(
            ErrorCode::ParamInvalid,
            format!(
                "cannot serialize a value of type {}: {e}; make the type serializable with serde",
                std::any::type_name::<T>()
            ),
        )),
    }
}

/// Decode a value of type `T` that may borrow from `bytes` (`&str`, `&[u8]` through
/// `serde_bytes`). A mismatch is error 4003.
pub fn decode_borrowed<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T> {
    rmp_serde::from_slice(bytes).map_err(|e| {
        Error::new(
            ErrorCode::DeserializationFailed,
            format!(
                "cannot read a {} from {} bytes in place: {e}; check the type the object was \
                 stored with",
                std::any::type_name::<T>(),
                bytes.len()
            ),
        )
    })
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
