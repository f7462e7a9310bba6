//! `ObjectRef<T>`: a typed reference to a value that exists now or will once a call finishes.

use std::fmt;
use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use yr_common::{Error, ObjectId, Result};
use yr_runtime::codec;
use yr_runtime::object_store::{ObjectHandle, ObjectSlot, Outcome};

use crate::wire_ext;

/// A reference to a value of type `T`: the result of a call, or a value given to [`put`](crate::put).
///
/// It is cheap to clone, can be awaited, passed as an argument to other calls (the callee gets
/// the value), and stored inside other values. The value lives as long as some reference to it
/// does.
///
/// ```
/// # yr::init(yr::Config::local()).unwrap();
/// let r = yr::put(41).unwrap();
/// let copy = r.clone();
/// assert_eq!(yr::get(&copy, std::time::Duration::from_secs(1)).unwrap(), 41);
/// # yr::finalize().unwrap();
/// ```
pub struct ObjectRef<T> {
    handle: ObjectHandle,
    _type: PhantomData<fn() -> T>,
}

impl<T> ObjectRef<T> {
    pub(crate) fn from_handle(handle: ObjectHandle) -> ObjectRef<T> {
        ObjectRef {
            handle,
            _type: PhantomData,
        }
    }

    pub(crate) fn handle(&self) -> &ObjectHandle {
        &self.handle
    }

    pub(crate) fn into_handle(self) -> ObjectHandle {
        self.handle
    }

    /// The object's id.
    pub fn id(&self) -> ObjectId {
        self.handle.id()
    }

    /// Whether the value (or the error of the call that should produce it) has arrived.
    pub fn is_ready(&self) -> bool {
        self.handle.is_finished()
    }
}

impl<T: DeserializeOwned> ObjectRef<T> {
    /// The value, waiting up to `timeout`. Same as [`yr::get`](crate::get).
    pub fn get(&self, timeout: Duration) -> Result<T> {
        crate::get(self, timeout)
    }
}

pub(crate) fn decode_outcome<T: DeserializeOwned>(outcome: Outcome) -> Result<T> {
    match outcome {
        Outcome::Ready(value) => codec::decode(&value.bytes),
        Outcome::Failed(error) => Err(error),
    }
}

impl<T> Clone for ObjectRef<T> {
    fn clone(&self) -> Self {
        ObjectRef::from_handle(self.handle.clone())
    }
}

impl<T> fmt::Debug for ObjectRef<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectRef({})", self.handle.id())
    }
}

impl<T> PartialEq for ObjectRef<T> {
    fn eq(&self, other: &Self) -> bool {
        self.handle.id() == other.handle.id()
    }
}

impl<T> Eq for ObjectRef<T> {}

impl<T> std::hash::Hash for ObjectRef<T> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.handle.id().hash(state)
    }
}

impl<T> Serialize for ObjectRef<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        codec::capture_reference(&self.handle);
        wire_ext::serialize(
            wire_ext::OBJECT_REF,
            &self.handle.id().to_bytes(),
            serializer,
        )
    }
}

impl<'de, T> Deserialize<'de> for ObjectRef<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let bytes = wire_ext::deserialize(wire_ext::OBJECT_REF, deserializer)?;
        if bytes.len() < 16 {
            return Err(serde::de::Error::custom(format!(
                "an object reference has a 16-byte id, this one has {} bytes",
                bytes.len()
            )));
        }
        let (id, owner) = bytes.split_at(16);
        let mut id_bytes = [0u8; 16];
        id_bytes.copy_from_slice(id);
        let owner = std::str::from_utf8(owner).map_err(serde::de::Error::custom)?;
        let handle = ObjectSlot::borrowed(ObjectId::from_bytes(id_bytes), owner, None);
        Ok(ObjectRef::from_handle(handle))
    }
}

/// The future of an [`ObjectRef`]: resolves to the value, or the error of the call.
///
/// ```
/// # yr::init(yr::Config::local()).unwrap();
/// let r = yr::put(String::from("hi")).unwrap();
/// let value = futures_lite_block_on(async { r.await });
/// assert_eq!(value.unwrap(), "hi");
/// # yr::finalize().unwrap();
/// # fn futures_lite_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     let waker = std::task::Waker::noop();
/// #     let mut cx = std::task::Context::from_waker(&waker);
/// #     let mut f = std::pin::pin!(f);
/// #     loop {
/// #         if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) { return v; }
/// #         std::thread::yield_now();
/// #     }
/// # }
/// ```
pub struct ObjectFuture<T> {
    handle: ObjectHandle,
    _type: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> Future for ObjectFuture<T> {
    type Output = Result<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.handle.poll_outcome(cx.waker()) {
            Some(outcome) => Poll::Ready(decode_outcome(outcome)),
            None => Poll::Pending,
        }
    }
}

impl<T: DeserializeOwned> IntoFuture for ObjectRef<T> {
    type Output = Result<T>;
    type IntoFuture = ObjectFuture<T>;

    fn into_future(self) -> ObjectFuture<T> {
        ObjectFuture {
            handle: self.handle,
            _type: PhantomData,
        }
    }
}

impl<T: DeserializeOwned> IntoFuture for &ObjectRef<T> {
    type Output = Result<T>;
    type IntoFuture = ObjectFuture<T>;

    fn into_future(self) -> ObjectFuture<T> {
        self.clone().into_future()
    }
}

/// Keep `Error` in scope for docs.
#[allow(dead_code)]
type _Error = Error;
