//! Where the master's failures get their seed codes: the one place in this crate that chooses a
//! code. The failures themselves are defined next to what fails ([`MasterError`] in the crate
//! root, [`RegisterError`] in `cluster`, [`PlacementError`] in `placement`,
//! [`InstanceManagerError`] in `instance_manager`); each has a `code()` here, and converts to
//! `yr_common::Error` with module 10 (core).
//!
//! | failure | code |
//! |---|---|
//! | a listener cannot be bound (`--listen`, `--metrics-listen`) | 1001 |
//! | the meta store cannot be opened or fails while recovering | the store's own ([`MetaError::code`](yr_meta::MetaError::code): 3005, 1014, 3003) |
//! | the gRPC server fails | 3002 |
//! | the master's task panics | 3003 (a bug) |
//! | a malformed registration | 1001 |
//! | a registration that cannot be persisted | 3005 |
//! | no live node, or no node with room now | 1002 |
//! | a request larger than every node | 1006 |
//! | the instance manager cannot mark a lost node's instances FATAL | 3013 |
//! | an instance record that cannot be decoded | 1016 |
//! | a master call that reached a standby ([`NotLeader`]: "not the leader; the leader is at X") | 3002 (a link to follow, retried) |

use yr_common::{Error, ErrorCode, ModuleCode};

use crate::cluster::RegisterError;
use crate::instance_manager::InstanceManagerError;
use crate::leadership::NotLeader;
use crate::placement::PlacementError;
use crate::MasterError;

impl MasterError {
    /// The code callers see.
    pub fn code(&self) -> ErrorCode {
        match self {
            MasterError::Listen { .. } => ErrorCode::ParamInvalid,
            MasterError::OpenStore { error, .. } | MasterError::Meta(error) => error.code(),
            MasterError::Serve(_) => ErrorCode::InnerCommunication,
            MasterError::Task(_) => ErrorCode::InnerSystemError,
        }
    }
}

impl RegisterError {
    /// The code the registering node sees.
    pub fn code(&self) -> ErrorCode {
        match self {
            RegisterError::Invalid(_) => ErrorCode::ParamInvalid,
            RegisterError::Meta { .. } => ErrorCode::EtcdOperationError,
        }
    }
}

impl PlacementError {
    /// The code callers see.
    pub fn code(&self) -> ErrorCode {
        match self {
            PlacementError::NoLiveNodes | PlacementError::NotEnough { .. } => {
                ErrorCode::ResourceNotEnough
            }
            PlacementError::ExceedsCapacity { .. } => ErrorCode::ResourceConfigError,
        }
    }

    /// The error as users see it.
    pub fn to_error(&self) -> Error {
        Error::with_module(self.code(), ModuleCode::Core, self.to_string())
    }
}

impl InstanceManagerError {
    /// The code this failure is logged (and, when asked, reported) with.
    pub fn code(&self) -> ErrorCode {
        match self {
            InstanceManagerError::MarkFatal { .. } => ErrorCode::InstanceManagerOperationError,
            InstanceManagerError::BadRecord { .. } => ErrorCode::InstanceInfoInvalid,
        }
    }
}

impl NotLeader {
    /// The code callers see: 3002, communication between components, which they retry (at the
    /// leader the message names).
    pub fn code(&self) -> ErrorCode {
        ErrorCode::InnerCommunication
    }
}

impl From<NotLeader> for Error {
    fn from(err: NotLeader) -> Error {
        Error::with_module(err.code(), ModuleCode::Core, err.to_string())
    }
}

impl From<MasterError> for Error {
    fn from(err: MasterError) -> Error {
        Error::with_module(err.code(), ModuleCode::Core, err.to_string())
    }
}

impl From<RegisterError> for Error {
    fn from(err: RegisterError) -> Error {
        Error::with_module(err.code(), ModuleCode::Core, err.to_string())
    }
}

impl From<InstanceManagerError> for Error {
    fn from(err: InstanceManagerError) -> Error {
        Error::with_module(err.code(), ModuleCode::Core, err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use yr_meta::MetaError;

    #[test]
    fn master_errors_carry_chosen_codes() {
        let listen = MasterError::Listen {
            address: "127.0.0.1:1".parse().unwrap(),
            error: std::io::Error::from(std::io::ErrorKind::AddrInUse),
        };
        let err = Error::from(listen);
        assert_eq!(err.code(), ErrorCode::ParamInvalid);
        assert_eq!(err.module_code(), ModuleCode::Core);
        assert!(err.message().contains("127.0.0.1:1"), "{}", err.message());
        let store = MasterError::OpenStore {
            store: "embedded /data/meta".into(),
            error: MetaError::Io("fsync: EIO".into()),
        };
        let err = Error::from(store);
        assert_eq!(err.code(), ErrorCode::EtcdOperationError);
        assert!(err.message().contains("/data/meta"), "{}", err.message());
        let task = MasterError::Task("panicked".into());
        assert_eq!(task.code(), ErrorCode::InnerSystemError);
    }

    #[test]
    fn registration_errors_are_bad_requests_or_store_failures() {
        let invalid = RegisterError::Invalid("node id is empty".into());
        assert_eq!(Error::from(invalid).code(), ErrorCode::ParamInvalid);
        let meta = RegisterError::Meta {
            node_id: "n1".into(),
            source: MetaError::Unavailable("down".into()),
        };
        assert_eq!(Error::from(meta).code(), ErrorCode::EtcdOperationError);
    }

    #[test]
    fn a_standby_answers_3002_naming_the_leader() {
        let err = Error::from(NotLeader {
            leader: Some("10.0.0.1:22770".into()),
        });
        assert_eq!(err.code(), ErrorCode::InnerCommunication);
        assert!(
            err.message()
                .contains("not the leader; the leader is at 10.0.0.1:22770"),
            "{err}"
        );
        let none = Error::from(NotLeader { leader: None });
        assert!(none.message().contains("election"), "{none}");
    }

    #[test]
    fn instance_manager_failures_are_3013_and_bad_records_1016() {
        let mark = InstanceManagerError::MarkFatal {
            node_id: "lost".into(),
            source: MetaError::Unavailable("down".into()),
        };
        let err = Error::from(mark);
        assert_eq!(err.code(), ErrorCode::InstanceManagerOperationError);
        assert_eq!(err.module_code(), ModuleCode::Core);
        assert!(err.message().contains("lost node lost"), "{err}");
        let bad = InstanceManagerError::BadRecord {
            key: "/yr/instance/x".into(),
            detail: "invalid wire type".into(),
        };
        let err = Error::from(bad);
        assert_eq!(err.code(), ErrorCode::InstanceInfoInvalid);
        assert!(err.message().contains("/yr/instance/x"), "{err}");
    }
}
