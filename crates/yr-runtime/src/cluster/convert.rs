//! Between the client core's types and the wire's: values with their nested references, and
//! call arguments (errors: `yr_proto::error`).

use std::sync::Arc;

use yr_common::{Error, ErrorCode, ObjectId};
use yr_proto::error_from_proto;
use yr_proto::v1 as pb;

use crate::function::{dependency_failed, Arg};
use crate::object_store::{ObjectHandle, ObjectSlot, Outcome, Payload, StoredValue};
use crate::remote_value::{Recovery, RemoteValue, STATEFUL};
use crate::shared_memory::SharedRegion;

/// A reference for the wire. It is counted as sent out (see `borrows`): this process keeps the
/// object (or its own borrow of it) until the receiver releases it. A borrowed reference names
/// this process as the receiver's lender.
pub fn reference_to_proto(handle: &ObjectHandle) -> pb::ObjectRefInfo {
    crate::borrows::on_send(handle);
    pb::ObjectRefInfo {
        id: handle.id().to_bytes().to_vec().into(),
        owner_address: handle.owner_address(),
        lender_address: if handle.is_borrowed() {
            crate::object_store::local_owner_address()
        } else {
            String::new()
        },
    }
}

/// A reference from the wire: this process's object, or a borrowed one fetched from its lender
/// (or owner).
pub fn reference_from_proto(info: &pb::ObjectRefInfo) -> Result<ObjectHandle, Error> {
    let id: [u8; 16] = info.id.as_ref().try_into().map_err(|_| {
        Error::new(
            ErrorCode::ParamInvalid,
            format!("an object id has 16 bytes, got {}", info.id.len()),
        )
    })?;
    let lender = Some(info.lender_address.as_str()).filter(|lender| !lender.is_empty());
    let handle = ObjectSlot::borrowed(ObjectId::from_bytes(id), &info.owner_address, lender);
    crate::borrows::on_receive(&handle, lender.unwrap_or(&info.owner_address));
    Ok(handle)
}

/// A value for the wire, with its bytes inline.
pub fn value_to_proto(value: &StoredValue) -> pb::Value {
    value_to_proto_for(value, "")
}

/// A value for a receiver on the shared-memory pool `pool_id`: a value in shared memory travels
/// as its location (read in place on the same node, pulled by the receiver's node from ours on
/// another); the rest, and anything for a receiver without shared memory, inline.
pub fn value_to_proto_for(value: &StoredValue, pool_id: &str) -> pb::Value {
    let nested = value.nested.iter().map(reference_to_proto).collect();
    if let Payload::Remote(remote) = &value.bytes {
        // Kept by another node for this process: the receiver reads it from there, in place
        // on that node. Only a receiver with shared memory is sent one (`Worker.GetObject`).
        let mut location = remote.location().clone();
        if location.pool_id == pool_id {
            location.node_address = String::new();
        }
        return pb::Value {
            data: Default::default(),
            nested,
            shared: Some(location),
        };
    }
    if let Payload::Shared(region) = &value.bytes {
        let (pool, ..) = region.location();
        // The same node reads in place; another node with shared memory pulls from ours.
        let node_address = if pool == pool_id {
            Some(String::new())
        } else {
            Some(super::shared_memory::node_address()).filter(|a| !a.is_empty())
        };
        if let Some(node_address) = node_address.filter(|_| !pool_id.is_empty()) {
            return pb::Value {
                data: Default::default(),
                nested,
                shared: Some(located(region, node_address)),
            };
        }
    }
    pb::Value {
        data: bytes::Bytes::copy_from_slice(&value.bytes),
        nested,
        shared: None,
    }
}

/// A value from the wire, with its bytes inline (a shared location is opened by the caller
/// first, see `shared_memory::open_location`).
pub fn value_from_proto(value: pb::Value) -> Result<StoredValue, Error> {
    if value.shared.is_some() {
        return Err(Error::new(
            ErrorCode::DatasystemFailed,
            "a value in shared memory arrived where only inline values are expected",
        ));
    }
    value_with_payload(value.data.to_vec().into(), &value.nested)
}

/// A value whose bytes are `bytes`, with the references nested in it.
pub fn value_with_payload(
    bytes: Payload,
    nested: &[pb::ObjectRefInfo],
) -> Result<StoredValue, Error> {
    Ok(StoredValue {
        bytes,
        nested: nested
            .iter()
            .map(reference_from_proto)
            .collect::<Result<_, _>>()?,
    })
}

/// The location of `region` for the wire, read from the node at `node_address` ("": this
/// node).
fn located(region: &SharedRegion, node_address: String) -> pb::SharedLocation {
    let (pool, allocation, offset, size) = region.location();
    pb::SharedLocation {
        pool_id: pool.to_string(),
        allocation,
        offset,
        size,
        node_address,
        capability: region.capability().clone(),
    }
}

/// Arguments for the wire; they must be finished. A reference whose value is in shared memory
/// (or spilled from there) travels as a reference: the callee fetches it from its owner, which
/// answers with its location, and reads it in place on this node or pulls it into its own
/// (large values passed directly are such references already, see [`Arg::from_value`]). Other
/// references travel as their values.
pub fn args_to_proto(args: &[Arg]) -> Result<Vec<pb::Arg>, Error> {
    args.iter()
        .map(|arg| {
            let kind = match arg {
                Arg::Value(value) => pb::arg::Kind::Value(value_to_proto(value)),
                Arg::Ref(handle) if handle.is_in_shared_memory() => {
                    pb::arg::Kind::Reference(reference_to_proto(handle))
                }
                Arg::Ref(handle) => match handle.outcome() {
                    Some(Outcome::Ready(value)) => pb::arg::Kind::Value(value_to_proto(&value)),
                    Some(Outcome::Failed(error)) => return Err(dependency_failed(handle, &error)),
                    None => {
                        return Err(Error::new(
                            ErrorCode::InnerSystemError,
                            format!("argument {} was sent before it was resolved", handle.id()),
                        ))
                    }
                },
            };
            Ok(pb::Arg { kind: Some(kind) })
        })
        .collect()
}

/// A call's result value for its caller. A value in shared memory, for a caller on the same
/// node (`caller_pool`), is handed over: the caller gets a reference of its own and the
/// value's location, and reads it in place. For a caller on another node with shared memory,
/// this node keeps it (`hold_for_remote`) and the caller gets its location and this node's
/// data port, to pull it from when it is read (design 026). Anything else, or a hand-over or
/// hold the node refused, travels inline.
pub fn result_to_proto(value: &StoredValue, caller_pool: &str, caller_pid: u32) -> pb::Value {
    if let Payload::Shared(region) = &value.bytes {
        let (pool, ..) = region.location();
        let kept = if caller_pool.is_empty() {
            None
        } else if pool == caller_pool {
            Some(region.hand_over(caller_pid).map(|()| String::new()))
        } else {
            Some(super::shared_memory::node_address())
                .filter(|address| !address.is_empty())
                .map(|address| region.hold_for_remote().map(|()| address))
        };
        match kept {
            Some(Ok(node_address)) => {
                return pb::Value {
                    data: Default::default(),
                    nested: value.nested.iter().map(reference_to_proto).collect(),
                    shared: Some(located(region, node_address)),
                }
            }
            Some(Err(error)) => {
                tracing::debug!(%error, "a result is sent inline: the node refused to keep it")
            }
            None => {}
        }
    }
    value_to_proto(value)
}

/// A result value from the wire: its bytes inline, a region of this node's shared memory
/// that the callee handed over to this process, or the location of a region another node
/// keeps for this process (see [`result_to_proto`]), recovered as `recovery` says should that
/// node lose it.
fn result_from_proto(
    value: pb::Value,
    recovery: impl FnOnce() -> Recovery,
) -> Result<StoredValue, Error> {
    match value.shared {
        None => value_from_proto(value),
        Some(location) if !location.node_address.is_empty() => value_with_payload(
            Payload::Remote(RemoteValue::new(location, recovery())),
            &value.nested,
        ),
        Some(location) => {
            let payload = super::shared_memory::adopt_handed_over(&location)?;
            value_with_payload(payload, &value.nested)
        }
    }
}

/// Whether a call's result has a value that another node keeps for this process.
pub fn has_remote_values(result: &pb::CallResult) -> bool {
    result.values.iter().any(|value| {
        value
            .shared
            .as_ref()
            .is_some_and(|location| !location.node_address.is_empty())
    })
}

/// A call result nobody waits for any more (its call was already answered, or cancelled):
/// the regions handed over with it are given back, and those kept by other nodes dropped.
pub fn discard_result(result: pb::CallResult) {
    for value in result.values {
        if let Some(location) = value.shared {
            if location.node_address.is_empty() {
                drop(super::shared_memory::adopt_handed_over(&location));
            } else {
                drop(RemoteValue::new(location, Recovery::Not(STATEFUL)));
            }
        }
    }
}

/// Arguments encoded with [`args_to_proto`] that never left this process (the call channel
/// refused the frame): the references nested in them are no longer counted as sent.
pub fn unsend_args(args: &[pb::Arg]) {
    for arg in args {
        let nested = match &arg.kind {
            Some(pb::arg::Kind::Value(value)) => value.nested.as_slice(),
            Some(pb::arg::Kind::Reference(reference)) => std::slice::from_ref(reference),
            None => &[],
        };
        for reference in nested {
            let Ok(id) = <[u8; 16]>::try_from(reference.id.as_ref()) else {
                continue;
            };
            if let Some(handle) = ObjectSlot::lookup(ObjectId::from_bytes(id)) {
                crate::borrows::on_send_undone(&handle);
            }
        }
    }
}

/// Arguments from the wire.
pub fn args_from_proto(args: Vec<pb::Arg>) -> Result<Vec<Arg>, Error> {
    args.into_iter()
        .map(|arg| match arg.kind {
            Some(pb::arg::Kind::Value(value)) => Ok(Arg::Value(value_from_proto(value)?)),
            Some(pb::arg::Kind::Reference(reference)) => {
                Ok(Arg::Ref(reference_from_proto(&reference)?))
            }
            None => Err(Error::new(
                ErrorCode::ParamInvalid,
                "a call argument has neither a value nor a reference",
            )),
        })
        .collect()
}

/// Finish `returns` with a call's result from the wire. Values another node keeps for this
/// process are not recomputed if that node loses them (an instance method's results; see
/// [`finish_returns_with`]).
pub fn finish_returns(returns: &[ObjectHandle], result: pb::CallResult) {
    finish_returns_with(returns, result, |_| Recovery::Not(STATEFUL));
}

/// Finish `returns` with a call's result from the wire; a value another node keeps for this
/// process is recovered as `recovery(index)` says should that node lose it.
pub fn finish_returns_with(
    returns: &[ObjectHandle],
    result: pb::CallResult,
    recovery: impl Fn(usize) -> Recovery,
) {
    if let Some(error) = &result.error {
        let error = error_from_proto(error);
        for handle in returns {
            handle.fail(error.clone());
        }
        return;
    }
    if result.values.len() != returns.len() {
        let error = Error::new(
            ErrorCode::UserFunctionException,
            format!(
                "the call returned {} values, {} were expected",
                result.values.len(),
                returns.len()
            ),
        );
        for handle in returns {
            handle.fail(error.clone());
        }
        discard_result(result);
        return;
    }
    for (index, (handle, value)) in returns.iter().zip(result.values).enumerate() {
        match result_from_proto(value, || recovery(index)) {
            Ok(value) => {
                handle.complete(Arc::new(value));
            }
            Err(error) => {
                handle.fail(error);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::result_to_proto;
    use crate::object_store::{Payload, StoredValue};
    use crate::shared_memory::test_support::{memory, ScriptedNode};

    #[test]
    fn a_result_is_handed_over_on_the_same_pool_and_sent_inline_when_refused_or_elsewhere() {
        // Process 42 has left the node.
        let memory = memory(
            "pool",
            ScriptedNode {
                reclaims_to_fit: 0,
                freed_per_reclaim: 0,
                reclaims: Default::default(),
                departed: 42,
            },
        );
        let value = StoredValue {
            bytes: Payload::Shared(memory.create(1000).unwrap()),
            nested: Vec::new(),
        };
        let handed = result_to_proto(&value, "pool", 7);
        let location = handed.shared.expect("a location");
        assert_eq!((location.allocation, location.size), (1, 1000));
        assert!(handed.data.is_empty());
        // The caller left: the node refuses the hand-over, so the bytes go inline.
        let refused = result_to_proto(&value, "pool", 42);
        assert!(refused.shared.is_none());
        assert_eq!(refused.data.len(), 1000);
        // A caller on another node gets the bytes inline too.
        let elsewhere = result_to_proto(&value, "other-pool", 7);
        assert!(elsewhere.shared.is_none());
        assert_eq!(elsewhere.data.len(), 1000);
    }
}
