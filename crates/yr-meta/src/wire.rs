//! Conversions between the store's types and the `yr.meta.v1` wire messages, and between
//! [`MetaError`] and gRPC statuses. The `yr-meta-error` metadata carries the error kind, so a
//! [`RemoteStore`](crate::RemoteStore) gets back exactly the error the served store returned.

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};
use yr_common::ErrorCode;
use yr_proto::meta as proto;

use crate::error::MetaError;
use crate::store::{Compare, KeyValue, TxnOp, TxnResponse, WatchEvent};

const ERROR_KIND: &str = "yr-meta-error";
const COMPACTED_REVISION: &str = "yr-meta-compacted-revision";
const REQUESTED_REVISION: &str = "yr-meta-revision";
const LEASE: &str = "yr-meta-lease";

pub(crate) fn kv_to_proto(kv: KeyValue) -> proto::KeyValue {
    proto::KeyValue {
        key: kv.key,
        value: kv.value,
        version: kv.version,
        mod_revision: kv.mod_revision,
        lease: kv.lease,
    }
}

pub(crate) fn kv_from_proto(kv: proto::KeyValue) -> KeyValue {
    KeyValue {
        key: kv.key,
        value: kv.value,
        version: kv.version,
        mod_revision: kv.mod_revision,
        lease: kv.lease,
    }
}

pub(crate) fn compare_to_proto(compare: Compare) -> proto::Compare {
    match compare {
        Compare::Version { key, version } => proto::Compare {
            key,
            target: Some(proto::compare::Target::Version(version)),
        },
        Compare::ModRevision { key, mod_revision } => proto::Compare {
            key,
            target: Some(proto::compare::Target::ModRevision(mod_revision)),
        },
        Compare::ValueEquals { key, value } => proto::Compare {
            key,
            target: Some(proto::compare::Target::Value(value)),
        },
    }
}

pub(crate) fn compare_from_proto(compare: proto::Compare) -> Result<Compare, MetaError> {
    match compare.target {
        Some(proto::compare::Target::Version(version)) => Ok(Compare::Version {
            key: compare.key,
            version,
        }),
        Some(proto::compare::Target::ModRevision(mod_revision)) => Ok(Compare::ModRevision {
            key: compare.key,
            mod_revision,
        }),
        Some(proto::compare::Target::Value(value)) => Ok(Compare::ValueEquals {
            key: compare.key,
            value,
        }),
        None => Err(MetaError::InvalidArgument(format!(
            "compare on {:?} has no target",
            compare.key
        ))),
    }
}

pub(crate) fn op_to_proto(op: TxnOp) -> proto::TxnOp {
    let op = match op {
        TxnOp::Put { key, value, lease } => {
            proto::txn_op::Op::Put(proto::PutOp { key, value, lease })
        }
        TxnOp::Delete { key } => proto::txn_op::Op::Delete(proto::DeleteOp { key }),
        TxnOp::Get { key } => proto::txn_op::Op::Get(proto::GetOp { key }),
    };
    proto::TxnOp { op: Some(op) }
}

pub(crate) fn op_from_proto(op: proto::TxnOp) -> Result<TxnOp, MetaError> {
    match op.op {
        Some(proto::txn_op::Op::Put(put)) => Ok(TxnOp::Put {
            key: put.key,
            value: put.value,
            lease: put.lease,
        }),
        Some(proto::txn_op::Op::Delete(delete)) => Ok(TxnOp::Delete { key: delete.key }),
        Some(proto::txn_op::Op::Get(get)) => Ok(TxnOp::Get { key: get.key }),
        None => Err(MetaError::InvalidArgument(
            "transaction operation is empty".to_string(),
        )),
    }
}

pub(crate) fn txn_response_to_proto(response: TxnResponse) -> proto::TxnResponse {
    proto::TxnResponse {
        succeeded: response.succeeded,
        revision: response.revision,
        results: response
            .results
            .into_iter()
            .map(|kv| proto::TxnResult {
                kv: kv.map(kv_to_proto),
            })
            .collect(),
    }
}

pub(crate) fn txn_response_from_proto(response: proto::TxnResponse) -> TxnResponse {
    TxnResponse {
        succeeded: response.succeeded,
        revision: response.revision,
        results: response
            .results
            .into_iter()
            .map(|r| r.kv.map(kv_from_proto))
            .collect(),
    }
}

pub(crate) fn event_to_proto(event: WatchEvent) -> proto::WatchEvent {
    let event = match event {
        WatchEvent::Put(kv) => proto::watch_event::Event::Put(kv_to_proto(kv)),
        WatchEvent::Delete { key, revision } => {
            proto::watch_event::Event::Delete(proto::DeleteEvent { key, revision })
        }
    };
    proto::WatchEvent { event: Some(event) }
}

pub(crate) fn event_from_proto(event: proto::WatchEvent) -> Option<WatchEvent> {
    match event.event? {
        proto::watch_event::Event::Put(kv) => Some(WatchEvent::Put(kv_from_proto(kv))),
        proto::watch_event::Event::Delete(delete) => Some(WatchEvent::Delete {
            key: delete.key,
            revision: delete.revision,
        }),
    }
}

fn insert(status: &mut Status, key: &'static str, value: impl ToString) {
    if let Ok(value) = MetadataValue::try_from(value.to_string()) {
        status.metadata_mut().insert(key, value);
    }
}

/// The status a served store's error travels as.
pub(crate) fn status_from_error(err: MetaError) -> Status {
    let message = err.to_string();
    let (code, kind) = match &err {
        MetaError::Unavailable(_) => (Code::Unavailable, "unavailable"),
        MetaError::Etcd(_) => (Code::Unavailable, "etcd"),
        MetaError::Io(_) => (Code::Internal, "io"),
        MetaError::Corrupt(_) => (Code::DataLoss, "corrupt"),
        MetaError::LeaseNotFound(_) => (Code::NotFound, "lease-not-found"),
        MetaError::InvalidArgument(_) => (Code::InvalidArgument, "invalid-argument"),
        MetaError::Compacted { .. } => (Code::OutOfRange, "compacted"),
        MetaError::Unauthenticated(_) => (Code::Unauthenticated, "unauthenticated"),
    };
    let mut status = Status::new(code, message);
    insert(&mut status, ERROR_KIND, kind);
    match err {
        MetaError::LeaseNotFound(lease) => insert(&mut status, LEASE, lease),
        MetaError::Compacted {
            revision,
            compacted_revision,
        } => {
            insert(&mut status, REQUESTED_REVISION, revision);
            insert(&mut status, COMPACTED_REVISION, compacted_revision);
        }
        _ => {}
    }
    status
}

fn detail(status: &Status) -> String {
    // Strip the prefix the server's MetaError display added, so it is not doubled.
    let message = status.message();
    for prefix in [
        "meta store unavailable: ",
        "etcd access error: ",
        "meta store disk I/O failed: ",
        "meta store data is corrupt: ",
        "invalid meta store request: ",
        "the meta store refused this process: ",
    ] {
        if let Some(rest) = message.strip_prefix(prefix) {
            return rest.to_string();
        }
    }
    message.to_string()
}

fn number<T: std::str::FromStr>(status: &Status, key: &str) -> Option<T> {
    status.metadata().get(key)?.to_str().ok()?.parse().ok()
}

/// The error a status from the meta service stands for. `address` and `what` describe the call
/// for transport failures.
pub(crate) fn error_from_status(status: Status, address: &str, what: &str) -> MetaError {
    let kind = status
        .metadata()
        .get(ERROR_KIND)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    match kind.as_deref() {
        Some("unavailable") => return MetaError::Unavailable(detail(&status)),
        Some("etcd") => return MetaError::Etcd(detail(&status)),
        Some("io") => return MetaError::Io(detail(&status)),
        Some("corrupt") => return MetaError::Corrupt(detail(&status)),
        Some("invalid-argument") => return MetaError::InvalidArgument(detail(&status)),
        Some("unauthenticated") => return MetaError::Unauthenticated(detail(&status)),
        Some("lease-not-found") => {
            if let Some(lease) = number(&status, LEASE) {
                return MetaError::LeaseNotFound(lease);
            }
        }
        Some("compacted") => {
            if let (Some(revision), Some(compacted_revision)) = (
                number(&status, REQUESTED_REVISION),
                number(&status, COMPACTED_REVISION),
            ) {
                return MetaError::Compacted {
                    revision,
                    compacted_revision,
                };
            }
        }
        _ => {}
    }
    // Not the store's own answer (no error kind): tonic's, or the transport's. The shared table
    // decides what it means; everything that is not about the request is the store being
    // unreachable.
    match yr_transport::status_to_code(&status, ErrorCode::EtcdOperationError) {
        ErrorCode::ParamInvalid => MetaError::InvalidArgument(status.message().to_string()),
        ErrorCode::AuthorizeFailed => MetaError::Unauthenticated(format!(
            "{what} at meta store {address}: {}",
            status.message()
        )),
        _ => MetaError::Unavailable(format!(
            "{what} at meta store {address} failed: {} ({:?}); check that the master is running and reachable",
            status.message(),
            status.code()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_error_comes_back_as_itself() {
        for err in [
            MetaError::Unavailable("down".into()),
            MetaError::Etcd("etcdserver: no leader".into()),
            MetaError::Io("fsync: EIO".into()),
            MetaError::Corrupt("log-0.wal at 12".into()),
            MetaError::InvalidArgument("empty key".into()),
            MetaError::Unauthenticated("bad token".into()),
            MetaError::LeaseNotFound(7),
            MetaError::Compacted {
                revision: 3,
                compacted_revision: 9,
            },
        ] {
            let back = error_from_status(status_from_error(err.clone()), "127.0.0.1:1", "get");
            assert_eq!(back, err);
        }
    }

    #[test]
    fn a_status_that_is_not_the_stores_follows_the_shared_table() {
        let back = |status: Status| error_from_status(status, "127.0.0.1:1", "put");
        assert!(matches!(
            back(Status::unavailable("connection refused")),
            MetaError::Unavailable(message) if message.contains("put at meta store 127.0.0.1:1")
        ));
        assert!(matches!(
            back(Status::deadline_exceeded("slow")),
            MetaError::Unavailable(_)
        ));
        assert!(matches!(
            back(Status::unauthenticated("who are you")),
            MetaError::Unauthenticated(message) if message.contains("who are you")
        ));
        assert!(matches!(
            back(Status::out_of_range("decoded message length too large")),
            MetaError::InvalidArgument(_)
        ));
    }
}
