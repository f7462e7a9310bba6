//! [`RuntimeError`]: the client core's own failures and the misuses of its API that it detects,
//! and [`RuntimeError::code`], the one place in this crate that chooses their seed codes.
//!
//! Errors that other components sent (a node's answer, a runtime's call result) keep the code
//! they came with; checks of a single argument (an empty name, a bad `wait_num`) are answered
//! with 1001 where the argument is checked.

use yr_common::{Error, ErrorCode};

/// What kind of entry point a registration is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// A stateless function (`#[yr::invoke]`).
    Function,
    /// An instance constructor (`#[yr::instance]` on an `impl` block).
    Constructor,
    /// An instance method.
    Method,
}

impl std::fmt::Display for EntryKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EntryKind::Function => "function",
            EntryKind::Constructor => "constructor",
            EntryKind::Method => "method",
        })
    }
}

/// A failure of the client core, or a misuse of its API.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// `init` could not set up this process's side of the cluster connection: a thread, an event
    /// loop or a socket of its own (4002).
    #[error(
        "init cannot start {what}: {source}; the process may be out of threads, memory or file \
         descriptors (check ulimit -u and ulimit -n)"
    )]
    Start {
        /// What could not be started.
        what: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The runtime that drives `async fn` user code could not start its thread (3012, as an
    /// instance's executor thread that cannot start).
    #[error(
        "cannot start the runtime for async functions and methods: {source}; the process may be \
         out of threads or memory (check ulimit -u)"
    )]
    AsyncRuntime {
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The call sockets between callers and a runtime could not be served or watched (3001).
    #[error("{what}: {source}; the process may be out of threads or file descriptors")]
    CallSocket {
        /// What failed.
        what: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A value's `Serialize` wrote fewer bytes the second time than the first (1001).
    #[error(
        "a value encoded to fewer bytes the second time; its Serialize impl must be \
         deterministic (the same value must always encode the same way)"
    )]
    NondeterministicEncoding,
    /// A runtime received `InvokeOptions` it cannot decode with its init call (1001).
    #[error(
        "the init call of instance {instance_id} carries InvokeOptions this runtime cannot \
         decode ({detail}); the instance is not started: build the driver and the runtime from \
         the same yr version"
    )]
    BadInvokeOptions {
        /// The instance.
        instance_id: String,
        /// The decoder's complaint.
        detail: String,
    },
    /// `finalize` was called inside a runtime: from a function or method, or in a runtime
    /// process (4006).
    #[error(
        "yr::finalize cannot be called {place}: only the driver finalizes yr; return from the \
         function (or call yr::finalize in the driver) instead"
    )]
    FinalizeInRuntime {
        /// Where it was called, for example "inside a function or method".
        place: &'static str,
    },
    /// A kill named an instance that does not exist (4009).
    #[error(
        "cannot kill instance {instance_id}: no instance has this id (it was never created, or \
         it ended and was forgotten); pass the id of an instance this job created ({detail})"
    )]
    KillUnknown {
        /// The id the kill named.
        instance_id: String,
        /// What the backend said.
        detail: String,
    },
    /// Two entry points of the binary have the same name, so a call by name is ambiguous
    /// (4007 for a constructor, 4008 for a function or method).
    #[error(
        "{kind} `{name}` is registered more than once in this binary (two versions of its crate \
         are linked?); calls by this name are ambiguous: give one of them another name or path, \
         or link one version"
    )]
    RegisteredTwice {
        /// What kind of entry point.
        kind: EntryKind,
        /// Its name.
        name: String,
    },
    /// A call names an entry point this executable does not register: a wrong name, or a
    /// function of another program (1015).
    #[error(
        "{kind} `{name}` is not registered in executable {executable}; check the name (a Rust \
         entry point is named by its path, for example `my_crate::add` or \
         `my_crate::Counter::new`) and that it is annotated with #[yr::invoke] or \
         #[yr::instance] in the program that runs it"
    )]
    NotRegistered {
        /// What kind of entry point.
        kind: EntryKind,
        /// The name the call carries.
        name: String,
        /// This process's executable.
        executable: String,
    },
    /// A call across languages in local mode, which runs only this process's code (4006).
    #[error(
        "{what} in executable {executable} cannot run in local mode: only a cluster runs code \
         of another executable; initialize yr against a cluster"
    )]
    CrossLanguageInLocalMode {
        /// What was called, for example "function `worker::add`".
        what: String,
        /// The executable named.
        executable: String,
    },
    /// No Python interpreter to run Python code in (1001).
    #[error(
        "no Python interpreter for calls to Python: {detail}; set YR_PYTHON to an interpreter \
         with the yr package installed, or name one on the handle"
    )]
    NoPythonInterpreter {
        /// Why none was found.
        detail: String,
    },
    /// The node answered a request with a message of another kind: the two sides disagree on
    /// the protocol (3003).
    #[error("the node answered {request} with {answer}; this is a bug in yr (or a node of another yr version): report it with the node's log")]
    UnexpectedAnswer {
        /// The request.
        request: &'static str,
        /// What came back.
        answer: String,
    },
    /// An invariant of the client core broke: a bug in yr (3003).
    #[error("{0}; this is a bug in yr: report it with the driver's log")]
    Bug(String),
}

impl RuntimeError {
    /// The code callers see.
    pub fn code(&self) -> ErrorCode {
        match self {
            RuntimeError::Start { .. } => ErrorCode::InitConnectionFailed,
            RuntimeError::CallSocket { .. } => ErrorCode::RequestBetweenRuntimeBus,
            RuntimeError::AsyncRuntime { .. } => ErrorCode::RuntimeManagerOperationError,
            RuntimeError::NondeterministicEncoding
            | RuntimeError::BadInvokeOptions { .. }
            | RuntimeError::NoPythonInterpreter { .. } => ErrorCode::ParamInvalid,
            RuntimeError::FinalizeInRuntime { .. }
            | RuntimeError::CrossLanguageInLocalMode { .. } => ErrorCode::IncorrectFunctionUsage,
            RuntimeError::NotRegistered { .. } => ErrorCode::FunctionMetaNotFound,
            RuntimeError::KillUnknown { .. } => ErrorCode::IncorrectKillUsage,
            RuntimeError::RegisteredTwice {
                kind: EntryKind::Constructor,
                ..
            } => ErrorCode::IncorrectCreateUsage,
            RuntimeError::RegisteredTwice { .. } => ErrorCode::IncorrectInvokeUsage,
            RuntimeError::UnexpectedAnswer { .. } | RuntimeError::Bug(_) => {
                ErrorCode::InnerSystemError
            }
        }
    }
}

impl From<RuntimeError> for Error {
    fn from(error: RuntimeError) -> Error {
        Error::new(error.code(), error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io() -> std::io::Error {
        std::io::Error::from(std::io::ErrorKind::WouldBlock)
    }

    #[test]
    fn every_failure_has_its_code_and_a_message_that_says_what_to_do() {
        let cases = [
            (
                RuntimeError::Start {
                    what: "yr's IO thread".into(),
                    source: io(),
                },
                ErrorCode::InitConnectionFailed,
                "ulimit",
            ),
            (
                RuntimeError::CallSocket {
                    what: "cannot start the call poller".into(),
                    source: io(),
                },
                ErrorCode::RequestBetweenRuntimeBus,
                "call poller",
            ),
            (
                RuntimeError::AsyncRuntime { source: io() },
                ErrorCode::RuntimeManagerOperationError,
                "async functions",
            ),
            (
                RuntimeError::NondeterministicEncoding,
                ErrorCode::ParamInvalid,
                "deterministic",
            ),
            (
                RuntimeError::BadInvokeOptions {
                    instance_id: "i1".into(),
                    detail: "invalid type".into(),
                },
                ErrorCode::ParamInvalid,
                "i1",
            ),
            (
                RuntimeError::FinalizeInRuntime {
                    place: "inside a function or method",
                },
                ErrorCode::IncorrectFunctionUsage,
                "only the driver",
            ),
            (
                RuntimeError::KillUnknown {
                    instance_id: "nope".into(),
                    detail: "not found".into(),
                },
                ErrorCode::IncorrectKillUsage,
                "nope",
            ),
            (
                RuntimeError::RegisteredTwice {
                    kind: EntryKind::Constructor,
                    name: "m::C::new".into(),
                },
                ErrorCode::IncorrectCreateUsage,
                "constructor `m::C::new`",
            ),
            (
                RuntimeError::RegisteredTwice {
                    kind: EntryKind::Function,
                    name: "m::f".into(),
                },
                ErrorCode::IncorrectInvokeUsage,
                "function `m::f`",
            ),
            (
                RuntimeError::RegisteredTwice {
                    kind: EntryKind::Method,
                    name: "m::C::get".into(),
                },
                ErrorCode::IncorrectInvokeUsage,
                "method `m::C::get`",
            ),
            (
                RuntimeError::NotRegistered {
                    kind: EntryKind::Function,
                    name: "m::nobody".into(),
                    executable: "/bin/app".into(),
                },
                ErrorCode::FunctionMetaNotFound,
                "function `m::nobody` is not registered in executable /bin/app",
            ),
            (
                RuntimeError::CrossLanguageInLocalMode {
                    what: "function `m::add`".into(),
                    executable: "/bin/app".into(),
                },
                ErrorCode::IncorrectFunctionUsage,
                "local mode",
            ),
            (
                RuntimeError::NoPythonInterpreter {
                    detail: "none on PATH".into(),
                },
                ErrorCode::ParamInvalid,
                "YR_PYTHON",
            ),
            (
                RuntimeError::UnexpectedAnswer {
                    request: "get_instance",
                    answer: "Kill".into(),
                },
                ErrorCode::InnerSystemError,
                "bug in yr",
            ),
            (
                RuntimeError::Bug("a result was sent unfinished".into()),
                ErrorCode::InnerSystemError,
                "bug in yr",
            ),
        ];
        for (failure, code, needle) in cases {
            let error = Error::from(failure);
            assert_eq!(error.code(), code, "{error}");
            assert!(error.message().contains(needle), "{error}");
        }
    }
}
