//! [`MetaError`]: what can go wrong talking to a meta store, and how each kind maps to the
//! seed error codes at the crate's boundary. This is the crate's one mapping to codes
//! ([`MetaError::code`]); a gRPC status from the store's service becomes a `MetaError` in
//! `wire.rs` (the store's own kind when the status carries one, else `yr_transport`'s table).
//!
//! Expected outcomes are not errors here: a missing key is `None`, a lost compare-and-swap is an
//! `Err(current)` inside `Ok` (see [`put_if_version`](crate::put_if_version)).

use yr_common::{Error, ErrorCode, ModuleCode};

use crate::store::LeaseId;

/// A meta store operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    /// The store could not be reached or did not answer in time, or it is shutting down. The
    /// outcome of a write that failed this way is unknown: read the key again before retrying.
    #[error("meta store unavailable: {0}")]
    Unavailable(String),
    /// etcd (the store behind [`EtcdStore`](crate::EtcdStore)) failed the request or could not
    /// be reached after a bounded retry: the message names the endpoints and etcd's own error.
    /// As with `Unavailable`, the outcome of a write that failed this way may be unknown.
    #[error("etcd access error: {0}")]
    Etcd(String),
    /// The store's disk failed (write, fsync, rename...). A store whose log could not be synced
    /// refuses every later operation and must be restarted.
    #[error("meta store disk I/O failed: {0}")]
    Io(String),
    /// The store's files hold bad data (a checksum mismatch or an undecodable record that is
    /// not a torn final write). The message names the file and the byte offset.
    #[error("meta store data is corrupt: {0}")]
    Corrupt(String),
    /// The lease expired or was revoked (or never existed).
    #[error("lease {0} not found: it expired or was revoked; grant a new lease and re-register its keys")]
    LeaseNotFound(LeaseId),
    /// The request itself is malformed (an empty key, a zero TTL, a duplicate key in one
    /// transaction branch...).
    #[error("invalid meta store request: {0}")]
    InvalidArgument(String),
    /// The store refused this process's cluster token (1014).
    #[error("the meta store refused this process: {0}")]
    Unauthenticated(String),
    /// A watch asked for events after `revision`, but the store only keeps events after
    /// `compacted_revision`. Read the current state with `range` and watch again from
    /// `current_revision`.
    #[error(
        "watch from revision {revision} is no longer possible: the store keeps events only after \
         revision {compacted_revision}; re-read with range and watch from the current revision"
    )]
    Compacted {
        /// The revision the watch asked to resume after.
        revision: u64,
        /// The oldest revision the store can resume after.
        compacted_revision: u64,
    },
}

impl MetaError {
    pub(crate) fn io(what: impl std::fmt::Display, err: std::io::Error) -> MetaError {
        MetaError::Io(format!("{what}: {err}"))
    }
}

impl MetaError {
    /// The code callers see. Every failure of the store itself is 3005
    /// (`ERR_ETCD_OPERATION_ERROR`, "etcd access error"): etcd failed or cannot be reached, the
    /// store is down, its disk failed, its data is corrupt, or
    /// an expected lease or history is gone. A malformed request is yr's own bug (users never
    /// build meta store requests), so it is 3003. A refused token is 1014.
    pub fn code(&self) -> ErrorCode {
        match self {
            MetaError::Unavailable(_)
            | MetaError::Etcd(_)
            | MetaError::Io(_)
            | MetaError::Corrupt(_)
            | MetaError::LeaseNotFound(_)
            | MetaError::Compacted { .. } => ErrorCode::EtcdOperationError,
            MetaError::InvalidArgument(_) => ErrorCode::InnerSystemError,
            MetaError::Unauthenticated(_) => ErrorCode::AuthorizeFailed,
        }
    }
}

impl From<MetaError> for Error {
    fn from(err: MetaError) -> Error {
        Error::with_module(err.code(), ModuleCode::Core, err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_failures_are_meta_store_errors_and_bad_requests_are_bugs() {
        let err: Error = MetaError::Unavailable("connection refused".into()).into();
        assert_eq!(err.code(), ErrorCode::EtcdOperationError);
        assert_eq!(err.module_code(), ModuleCode::Core);
        assert!(err.message().contains("connection refused"));
        let err: Error = MetaError::Io("fsync log-0.wal: EIO".into()).into();
        assert_eq!(err.code(), ErrorCode::EtcdOperationError);
        let err: Error = MetaError::LeaseNotFound(7).into();
        assert_eq!(err.code(), ErrorCode::EtcdOperationError);
        assert!(err.message().contains("lease 7"));
        let err: Error = MetaError::Etcd("etcdserver: no leader (127.0.0.1:2379)".into()).into();
        assert_eq!(err.code(), ErrorCode::EtcdOperationError);
        assert!(err.message().contains("etcd access error"));
        let err: Error = MetaError::InvalidArgument("empty key".into()).into();
        assert_eq!(err.code(), ErrorCode::InnerSystemError);
    }
}
