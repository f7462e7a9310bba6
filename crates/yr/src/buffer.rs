//! Reading an object without copying it: [`get_buffer`] gives a [`Buffer`] over the object's
//! stored encoding. For an object above 100 KB on a cluster that is the node's shared memory,
//! mapped into this process, so reading a 1 GB object costs what reading a 1 MB one does.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use yr_common::Result;
use yr_runtime::codec;
use yr_runtime::object_store::{Outcome, StoredValue};

use crate::ObjectRef;

/// An object's stored encoding (MessagePack), read in place. It keeps the object alive.
///
/// ```
/// # yr::init(yr::Config::local()).unwrap();
/// let object = yr::put(serde_bytes::ByteBuf::from(vec![7u8; 1000])).unwrap();
/// let buffer = yr::get_buffer(&object, yr::FOREVER).unwrap();
/// assert_eq!(buffer.bytes(), Some(&[7u8; 1000][..]));
/// let view: &serde_bytes::Bytes = buffer.decode().unwrap();
/// assert_eq!(view.len(), 1000);
/// # yr::finalize().unwrap();
/// ```
#[derive(Clone, Debug)]
pub struct Buffer {
    value: Arc<StoredValue>,
}

impl Buffer {
    /// The whole encoding.
    pub fn encoded(&self) -> &[u8] {
        &self.value.bytes
    }

    /// The bytes of a byte-string value (for example `serde_bytes::ByteBuf`) without their
    /// header; `None` for a value of another kind.
    pub fn bytes(&self) -> Option<&[u8]> {
        let encoded = self.encoded();
        let (header, length): (usize, usize) = match encoded.first()? {
            0xc4 => (2, usize::from(*encoded.get(1)?)),
            0xc5 => (
                3,
                usize::from(u16::from_be_bytes([*encoded.get(1)?, *encoded.get(2)?])),
            ),
            0xc6 => (
                5,
                u32::from_be_bytes(encoded.get(1..5)?.try_into().ok()?) as usize,
            ),
            _ => return None,
        };
        encoded.get(header..header.checked_add(length)?)
    }

    /// Deserialize a value that may borrow from the buffer (`&[u8]` through `serde_bytes`,
    /// `&str`, or structs of them), so nothing is copied. 4003 if the type does not match.
    pub fn decode<'a, T: Deserialize<'a>>(&'a self) -> Result<T> {
        codec::decode_borrowed(self.encoded())
    }
}

/// The stored encoding of `object`, waiting up to `timeout`, without copying it. Fails like
/// [`get`](crate::get).
///
/// ```
/// # yr::init(yr::Config::local()).unwrap();
/// let object = yr::put("in place".to_string()).unwrap();
/// let buffer = yr::get_buffer(&object, yr::FOREVER).unwrap();
/// let text: &str = buffer.decode().unwrap();
/// assert_eq!(text, "in place");
/// # yr::finalize().unwrap();
/// ```
pub fn get_buffer<T>(object: &ObjectRef<T>, timeout: Duration) -> Result<Buffer> {
    match crate::outcome_of(object, timeout)? {
        Outcome::Ready(value) => Ok(Buffer { value }),
        Outcome::Failed(error) => Err(error),
    }
}
