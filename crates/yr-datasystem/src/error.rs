//! [`DataSystemError`]: the data worker's own failures (its disk, its spill log, Redis, the meta
//! store, starting and stopping), and [`DataSystemError::code`], the one place in this crate that
//! chooses their seed codes. Refusals of a request (a bad key, a full quota, a missing object)
//! are answered with their code where the request is checked; they are the caller's to fix, not
//! failures of the worker.

use std::io::ErrorKind;
use std::path::PathBuf;

use yr_common::{Error, ErrorCode};
use yr_meta::MetaError;

/// A failure of the data worker itself.
#[derive(Debug, thiserror::Error)]
pub enum DataSystemError {
    /// A disk operation failed because the disk is full (4204).
    #[error("cannot {what} {}: the disk is full ({source}); {hint}", path.display())]
    DiskFull {
        /// What the worker was doing, for example "write".
        what: String,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// A disk operation failed otherwise (4203).
    #[error("cannot {what} {}: {source}; {hint}", path.display())]
    Disk {
        /// What the worker was doing.
        what: String,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// The spill metadata log (yr's stand-in for the data system's RocksDB) failed (4201).
    #[error(
        "cannot {what} the spill metadata log {}: {source}; check the node's disk and that \
         --spill-dir is writable",
        path.display()
    )]
    SpillLog {
        /// What the worker was doing, for example "append to".
        what: &'static str,
        /// The log.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The spill directory holds a file named like the log that is not one (4201).
    #[error(
        "{} is not a spill metadata log; move it away or choose another --spill-dir",
        path.display()
    )]
    NotASpillLog {
        /// The file.
        path: PathBuf,
    },
    /// Redis, the second-level store, failed or gave an unexpected reply (3007).
    #[error(
        "Redis at {address}: {what} failed: {detail}; check that Redis is running and reachable"
    )]
    Redis {
        /// The server.
        address: String,
        /// The command.
        what: String,
        /// Why.
        detail: String,
    },
    /// The meta store failed (its own code: 3005, or 1014 for a refused token).
    #[error("{what}: {source}")]
    Meta {
        /// What the worker was doing.
        what: String,
        /// The store's error.
        source: MetaError,
    },
    /// A stream's home record vanished between its write and its read (3005).
    #[error("the meta store lost the home record of stream {name:?}; retry")]
    StreamHomeLost {
        /// The stream.
        name: String,
    },
    /// A part of the worker could not be started: the process is out of threads, file
    /// descriptors or memory, or a listener failed (3015).
    #[error(
        "cannot start the data worker's {what}: {detail}; check the node's limits on threads and \
         open files (ulimit -u, ulimit -n)"
    )]
    Start {
        /// Which part.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// The worker is stopping and did not carry out the call (3015).
    #[error("the data worker is stopping and did not finish the call; retry on a running node")]
    Stopping,
    /// An invariant of the worker broke: a bug in yr (3003).
    #[error("{0}; this is a bug in yr: report it with the node's log")]
    Bug(String),
}

impl DataSystemError {
    /// The code callers see.
    pub fn code(&self) -> ErrorCode {
        match self {
            DataSystemError::DiskFull { .. } => ErrorCode::InsufficientDiskSpace,
            DataSystemError::Disk { .. } => ErrorCode::OperateDiskFailed,
            DataSystemError::SpillLog { .. } | DataSystemError::NotASpillLog { .. } => {
                ErrorCode::RocksdbFailed
            }
            DataSystemError::Redis { .. } => ErrorCode::RedisOperationError,
            DataSystemError::Meta { source, .. } => source.code(),
            DataSystemError::StreamHomeLost { .. } => ErrorCode::EtcdOperationError,
            DataSystemError::Start { .. } | DataSystemError::Stopping => ErrorCode::DsUnavailable,
            DataSystemError::Bug(_) => ErrorCode::InnerSystemError,
        }
    }

    /// A failed disk operation: [`DataSystemError::DiskFull`] when the disk is full (with
    /// `when_full`, what to do about it), otherwise [`DataSystemError::Disk`] (with `otherwise`).
    pub fn disk(
        what: &str,
        path: PathBuf,
        source: std::io::Error,
        when_full: &'static str,
        otherwise: &'static str,
    ) -> DataSystemError {
        let what = what.to_string();
        if source.kind() == ErrorKind::StorageFull {
            DataSystemError::DiskFull {
                what,
                path,
                source,
                hint: when_full,
            }
        } else {
            DataSystemError::Disk {
                what,
                path,
                source,
                hint: otherwise,
            }
        }
    }

    /// A blocking call of the worker that did not finish: cancelled because the worker is
    /// stopping, or panicked (a bug).
    pub fn from_join(error: &tokio::task::JoinError) -> DataSystemError {
        if error.is_cancelled() {
            DataSystemError::Stopping
        } else {
            DataSystemError::Bug(format!("a call panicked inside the data worker: {error}"))
        }
    }
}

impl From<DataSystemError> for Error {
    fn from(error: DataSystemError) -> Error {
        Error::new(error.code(), error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(kind: ErrorKind) -> std::io::Error {
        std::io::Error::from(kind)
    }

    #[test]
    fn a_full_disk_is_4204_and_other_disk_failures_4203() {
        let full = DataSystemError::disk(
            "write",
            "/spill/x.obj".into(),
            io(ErrorKind::StorageFull),
            "free space",
            "check permissions",
        );
        let error = Error::from(full);
        assert_eq!(error.code(), ErrorCode::InsufficientDiskSpace);
        assert!(error.message().contains("/spill/x.obj"), "{error}");
        assert!(error.message().contains("free space"), "{error}");
        let denied = DataSystemError::disk(
            "write",
            "/spill/x.obj".into(),
            io(ErrorKind::PermissionDenied),
            "free space",
            "check permissions",
        );
        let error = Error::from(denied);
        assert_eq!(error.code(), ErrorCode::OperateDiskFailed);
        assert!(error.message().contains("check permissions"), "{error}");
    }

    #[test]
    fn every_failure_has_its_code() {
        let cases = [
            (
                DataSystemError::SpillLog {
                    what: "append to",
                    path: "/spill/objects.log".into(),
                    source: io(ErrorKind::Other),
                },
                ErrorCode::RocksdbFailed,
            ),
            (
                DataSystemError::NotASpillLog {
                    path: "/spill/objects.log".into(),
                },
                ErrorCode::RocksdbFailed,
            ),
            (
                DataSystemError::Redis {
                    address: "127.0.0.1:6379".into(),
                    what: "GET".into(),
                    detail: "connection refused".into(),
                },
                ErrorCode::RedisOperationError,
            ),
            (
                DataSystemError::Meta {
                    what: "cannot read the cluster's data ports".into(),
                    source: MetaError::Unavailable("down".into()),
                },
                ErrorCode::EtcdOperationError,
            ),
            (
                DataSystemError::Meta {
                    what: "cannot read the cluster's data ports".into(),
                    source: MetaError::Unauthenticated("bad token".into()),
                },
                ErrorCode::AuthorizeFailed,
            ),
            (
                DataSystemError::StreamHomeLost { name: "s".into() },
                ErrorCode::EtcdOperationError,
            ),
            (
                DataSystemError::Start {
                    what: "data port",
                    detail: "address in use".into(),
                },
                ErrorCode::DsUnavailable,
            ),
            (DataSystemError::Stopping, ErrorCode::DsUnavailable),
            (
                DataSystemError::Bug("the spill log vanished".into()),
                ErrorCode::InnerSystemError,
            ),
        ];
        for (failure, code) in cases {
            let text = failure.to_string();
            let error = Error::from(failure);
            assert_eq!(error.code(), code, "{text}");
            assert_eq!(error.message(), text);
        }
    }

    #[tokio::test]
    async fn a_cancelled_call_is_the_worker_stopping_and_a_panic_a_bug() {
        let pending = tokio::spawn(std::future::pending::<()>());
        pending.abort();
        let cancelled = pending.await.unwrap_err();
        assert!(matches!(
            DataSystemError::from_join(&cancelled),
            DataSystemError::Stopping
        ));
        let panicked = tokio::spawn(async { panic!("boom") }).await.unwrap_err();
        let error = Error::from(DataSystemError::from_join(&panicked));
        assert_eq!(error.code(), ErrorCode::InnerSystemError);
    }
}
