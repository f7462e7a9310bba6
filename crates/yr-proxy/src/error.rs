//! The node's failures, and the one place they are mapped to yr's error codes
//! ([`ProxyError::code`]). Callers see them as `yr_common::Error` with that code and the
//! message below.

use std::time::Duration;

use yr_common::{Error, ErrorCode};

/// What can go wrong in the node's flows.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A create's options are not valid MessagePack `InvokeOptions`.
    #[error("the create's options cannot be decoded: {0}")]
    OptionsUndecodable(String),
    /// A stateful create names a class no driver registered here.
    #[error("function {function} is not registered on node {node}; annotate it with #[yr::instance] in the driver's binary")]
    FunctionNotRegistered {
        /// The class.
        function: String,
        /// This node.
        node: String,
    },
    /// A create names a binary no driver registered here.
    #[error("the create names binary {hash:?}, which no driver registered on node {node}; create instances from a driver (or runtime) connected to this node")]
    BinaryNotRegistered {
        /// The binary's content key.
        hash: String,
        /// This node.
        node: String,
    },
    /// A client named an executable before it registered itself.
    #[error("executable {path:?} was named before the client registered itself; register as a driver or runtime first")]
    NotRegisteredYet {
        /// The path named.
        path: String,
    },
    /// An executable's language is not one the node knows.
    #[error("executable {path:?} names language {language}, which this node does not know; use a yr of the same version as the node")]
    UnknownLanguage {
        /// The path named.
        path: String,
        /// The language's number.
        language: i32,
    },
    /// A client over TCP named an executable for calls across languages that no client on
    /// this machine registered.
    #[error("a client connected over TCP named executable {path:?}, which no client on node {node} registered; the node runs only executables that a client on its own machine registered")]
    RemoteExecutable {
        /// The path named.
        path: String,
        /// This node.
        node: String,
    },
    /// The create rate limit refused a create.
    #[error("create rate limited on local node {node}: more than {rate} creates per second; retry later")]
    CreateRateLimited {
        /// This node.
        node: String,
        /// The configured rate.
        rate: f64,
    },
    /// An instance with this id exists.
    #[error("you are not allowed to create instance with the same instance id {0}, please kill it first")]
    DuplicateId(String),
    /// The instance is not on this node.
    #[error("instance {0} is not on this node")]
    NotHere(String),
    /// The instance is nowhere.
    #[error("instance {0} is not found: it was never created or it was killed; check the id")]
    NotFound(String),
    /// A kill named no instance.
    #[error("the instance id is empty; pass the id of a created instance")]
    EmptyId,
    /// A kill cancelled the creation.
    #[error("the creation of instance {0} was cancelled: it was killed")]
    CreationCancelled(String),
    /// No node had room within the schedule timeout.
    #[error("the instance {instance} cannot be scheduled within {timeout_ms} ms: it needs {needs}, node {node} has {free} free; last reason: {reason}; free resources or raise schedule_timeout_ms")]
    ScheduleTimeout {
        /// The instance.
        instance: String,
        /// The timeout.
        timeout_ms: u128,
        /// What it needs.
        needs: String,
        /// This node.
        node: String,
        /// What is free here.
        free: String,
        /// Why the master could not place it either.
        reason: String,
    },
    /// The binary is not known here.
    #[error("the binary {hash} of instance {instance} is not known to node {node}")]
    UnknownBinary {
        /// The binary's content key.
        hash: String,
        /// The instance.
        instance: String,
        /// This node.
        node: String,
    },
    /// The instance's binary could not be fetched from its creator's node.
    #[error("the code of instance {instance} (binary {hash}) is not on node {node} and could not be fetched from {creator}: {reason}")]
    CodeDownload {
        /// The instance.
        instance: String,
        /// The binary's content key.
        hash: String,
        /// This node.
        node: String,
        /// The creator's node.
        creator: String,
        /// Why.
        reason: String,
    },
    /// A runtime process did not start or ended before it was used.
    #[error("the runtime {runtime} of instance {instance} failed to start: it {why}")]
    RuntimeStart {
        /// The runtime.
        runtime: String,
        /// The instance.
        instance: String,
        /// Why, with its stderr's tail.
        why: String,
    },
    /// The runtime exited while the constructor ran.
    #[error("the runtime of instance {0} exited while its constructor ran")]
    ConstructorExited(String),
    /// The constructor did not answer in time.
    #[error("the constructor of instance {instance} did not finish within {timeout:?}")]
    ConstructorTimeout {
        /// The instance.
        instance: String,
        /// The init timeout.
        timeout: Duration,
    },
    /// Another node refused a forwarded create.
    #[error("node {node} refused instance {instance}: {message}")]
    ForwardRefused {
        /// The other node.
        node: String,
        /// The instance.
        instance: String,
        /// What it said.
        message: String,
        /// The code of its gRPC status.
        code: ErrorCode,
    },
    /// The node running a forwarded instance cannot be reached.
    #[error("instance {instance} ran on node {node}, which is no longer reachable")]
    NodeUnreachable {
        /// The instance.
        instance: String,
        /// The other node.
        node: String,
    },
    /// Another node did not carry out a kill.
    #[error("the node at {address} did not kill instance {instance}: {message}")]
    RemoteKill {
        /// The other node's address.
        address: String,
        /// The instance.
        instance: String,
        /// What it said.
        message: String,
        /// The code of its gRPC status.
        code: ErrorCode,
    },
    /// A record in the meta store does not decode.
    #[error("the meta store's record {key} does not decode: {reason}")]
    BadRecord {
        /// Its key.
        key: String,
        /// Why.
        reason: String,
    },
    /// No named instance is live.
    #[error("failed to get instance {0}: no live instance; create it first or check the name and namespace")]
    NoLiveInstance(String),
    /// An instance whose caller lost its runtime did not run again at another address in time.
    #[error("instance {instance} did not run again within {waited:?} after its caller lost its runtime (its node may still be starting it again); please retry")]
    NotRunningAgain {
        /// The instance.
        instance: String,
        /// How long the caller waited.
        waited: Duration,
    },
    /// A runtime's process stopped answering heartbeats.
    #[error("the runtime of instance {instance} stopped answering heartbeats for {timeout:?} and was killed; check the user code for a hang")]
    RuntimeHung {
        /// The instance.
        instance: String,
        /// The heartbeat timeout.
        timeout: Duration,
    },
    /// The instance's runtime exited on its own.
    #[error("instance {instance} exited (its runtime {cause} ); create it again to call it")]
    RuntimeExited {
        /// The instance.
        instance: String,
        /// How it ended.
        cause: String,
    },
    /// The runtime crashed while serving.
    #[error(
        "the runtime of instance {instance} crashed: it {cause}; its stderr ends with:\n{stderr}"
    )]
    RuntimeCrashed {
        /// The instance.
        instance: String,
        /// How it ended.
        cause: String,
        /// Its stderr's tail.
        stderr: String,
    },
    /// The instance was killed or exited.
    #[error("instance occurs fatal error, cause by: (instance {0} has been killed or exited.)")]
    Exited(String),
}

impl ProxyError {
    /// The code callers get.
    pub fn code(&self) -> ErrorCode {
        use ProxyError::*;
        match self {
            OptionsUndecodable(_)
            | BinaryNotRegistered { .. }
            | NotRegisteredYet { .. }
            | UnknownLanguage { .. } => ErrorCode::ParamInvalid,
            FunctionNotRegistered { .. } => ErrorCode::FunctionMetaNotFound,
            RemoteExecutable { .. } => ErrorCode::AuthorizeFailed,
            CreateRateLimited { .. } => ErrorCode::CreateRateLimited,
            DuplicateId(_) => ErrorCode::InstanceDuplicated,
            NotHere(_) | NotFound(_) | NoLiveInstance(_) => ErrorCode::InstanceNotFound,
            EmptyId => ErrorCode::InstanceIdEmpty,
            CreationCancelled(_) | ScheduleTimeout { .. } => ErrorCode::ScheduleCanceled,
            UnknownBinary { .. } => ErrorCode::UserCodeLoad,
            CodeDownload { .. } => ErrorCode::FunctionAgentOperationError,
            RuntimeStart { .. } => ErrorCode::RuntimeManagerOperationError,
            ConstructorExited(_) | RuntimeHung { .. } | RuntimeCrashed { .. } => {
                ErrorCode::UserFunctionException
            }
            ConstructorTimeout { .. } => ErrorCode::InnerCommunication,
            NotRunningAgain { .. } => ErrorCode::RequestBetweenRuntimeBus,
            RemoteKill { code, .. } => *code,
            BadRecord { .. } => ErrorCode::InstanceInfoInvalid,
            ForwardRefused { code, .. } => *code,
            NodeUnreachable { .. } | RuntimeExited { .. } | Exited(_) => ErrorCode::InstanceExited,
        }
    }
}

impl From<ProxyError> for Error {
    fn from(error: ProxyError) -> Error {
        Error::new(error.code(), error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_carry_their_codes_and_messages() {
        let error: Error = ProxyError::CreateRateLimited {
            node: "n1".into(),
            rate: 10.0,
        }
        .into();
        assert_eq!(error.code(), ErrorCode::CreateRateLimited);
        assert!(error.message().contains("more than 10 creates per second"));
        let error: Error = ProxyError::CodeDownload {
            instance: "i".into(),
            hash: "h".into(),
            node: "n".into(),
            creator: "c".into(),
            reason: "gone".into(),
        }
        .into();
        assert_eq!(error.code(), ErrorCode::FunctionAgentOperationError);
        let error: Error = ProxyError::EmptyId.into();
        assert_eq!(error.code(), ErrorCode::InstanceIdEmpty);
        let error: Error = ProxyError::RemoteExecutable {
            path: "/bin/true".into(),
            node: "n".into(),
        }
        .into();
        assert_eq!(error.code(), ErrorCode::AuthorizeFailed);
        assert!(error.message().contains("TCP"), "{error}");
        let error: Error = ProxyError::UnknownLanguage {
            path: "/bin/true".into(),
            language: 9,
        }
        .into();
        assert_eq!(error.code(), ErrorCode::ParamInvalid);
    }
}
