//! How an etcd failure becomes a [`MetaError`], which failures are transient, and the bounded
//! retry with backoff that every [`EtcdStore`](super::EtcdStore) call goes through.
//!
//! Reads (get, range, the current revision, opening a watch) and lease renewals are retried on
//! any transient failure. Writes are retried only when etcd certainly did not apply them (it had
//! no leader, it refused the load, or the connection was never made), so a retry never applies a
//! write twice. Each attempt has a timeout and the attempts together a budget; then the call
//! fails with [`MetaError::Etcd`] (3005).

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::MetaError;
use crate::store::LeaseId;

const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_millis(800);
/// The shortest timeout an attempt gets, even at the end of the budget.
const MIN_ATTEMPT: Duration = Duration::from_millis(500);

/// Whether a call may be sent again after a failure whose outcome is unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Retry {
    /// A read or a renewal: sending it twice does no harm.
    Idempotent,
    /// A write: sent again only if etcd certainly did not apply it.
    Write,
}

/// One failed attempt, classified.
#[derive(Debug)]
pub(super) struct Failure {
    pub(super) error: MetaError,
    /// etcd certainly did not apply the request.
    pub(super) not_applied: bool,
    /// Trying again later may succeed.
    pub(super) transient: bool,
}

/// What a failed call was about, to name it in errors.
#[derive(Clone, Copy, Debug)]
pub(super) struct Context<'a> {
    pub(super) what: &'a str,
    pub(super) endpoints: &'a str,
    /// The lease the call used, if any: etcd's "lease not found" becomes
    /// [`MetaError::LeaseNotFound`] with it.
    pub(super) lease: Option<LeaseId>,
}

/// Classifies an etcd-client error.
pub(super) fn classify(err: etcd_client::Error, context: Context<'_>) -> Failure {
    let etcd = |message: String, not_applied: bool, transient: bool| Failure {
        error: MetaError::Etcd(format!(
            "{} at etcd {}: {message}",
            context.what, context.endpoints
        )),
        not_applied,
        transient,
    };
    match err {
        etcd_client::Error::GRpcStatus(status) => {
            let message = status.message();
            if message.contains("requested lease not found") || message.contains("lease not found")
            {
                if let Some(lease) = context.lease {
                    return Failure {
                        error: MetaError::LeaseNotFound(lease),
                        not_applied: true,
                        transient: false,
                    };
                }
            }
            if message.contains("duplicate key given in txn request")
                || message.contains("key is not provided")
            {
                return Failure {
                    error: MetaError::InvalidArgument(message.to_string()),
                    not_applied: true,
                    transient: false,
                };
            }
            let not_applied = message.contains("no leader")
                || message.contains("too many requests")
                || message.contains("not capable")
                || (status.code() == tonic::Code::Unavailable
                    && (message.contains("connect") || message.contains("Connection refused")));
            let transient = not_applied
                || matches!(
                    status.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Aborted
                        | tonic::Code::ResourceExhausted
                        | tonic::Code::Unknown
                )
                || message.contains("leader changed")
                || message.contains("timed out");
            etcd(
                format!("{message} ({:?})", status.code()),
                not_applied,
                transient,
            )
        }
        etcd_client::Error::LeaseKeepAliveError(message) if message.contains("not found") => {
            match context.lease {
                Some(lease) => Failure {
                    error: MetaError::LeaseNotFound(lease),
                    not_applied: true,
                    transient: false,
                },
                None => etcd(message, true, false),
            }
        }
        etcd_client::Error::TransportError(err) => etcd(format!("transport: {err}"), true, true),
        etcd_client::Error::IoError(err) => etcd(format!("I/O: {err}"), false, true),
        etcd_client::Error::WatchError(message)
        | etcd_client::Error::LeaseKeepAliveError(message) => etcd(message, false, true),
        etcd_client::Error::InvalidArgs(message) | etcd_client::Error::EndpointError(message) => {
            Failure {
                error: MetaError::InvalidArgument(format!(
                    "{} at etcd {}: {message}",
                    context.what, context.endpoints
                )),
                not_applied: true,
                transient: false,
            }
        }
        other => etcd(other.to_string(), false, false),
    }
}

/// The retry budget of one call.
#[derive(Clone, Copy, Debug)]
pub(super) struct Budget {
    /// The longest one attempt may take.
    pub(super) attempt: Duration,
    /// The longest all attempts together may take before the next one would start.
    pub(super) total: Duration,
}

/// Runs `attempt` until it succeeds, fails for good, or the budget is spent. Between attempts
/// it waits 50 ms, doubling up to 800 ms.
pub(super) async fn with_retry<T, F, Fut>(
    budget: Budget,
    retry: Retry,
    context: Context<'_>,
    mut attempt: F,
) -> Result<T, MetaError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let started = Instant::now();
    let deadline = started + budget.total;
    let mut backoff = FIRST_BACKOFF;
    let mut tries = 0u32;
    loop {
        tries += 1;
        let left = deadline.saturating_duration_since(Instant::now());
        let limit = budget.attempt.min(left).max(MIN_ATTEMPT);
        let failure = match tokio::time::timeout(limit, attempt()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(err)) => classify(err, context),
            Err(_) => Failure {
                error: MetaError::Etcd(format!(
                    "{} at etcd {} got no answer within {limit:?}",
                    context.what, context.endpoints
                )),
                not_applied: false,
                transient: true,
            },
        };
        let may_retry = failure.transient
            && (retry == Retry::Idempotent || failure.not_applied)
            && Instant::now() + backoff < deadline;
        if !may_retry {
            if failure.transient {
                tracing::warn!(
                    what = context.what,
                    endpoints = context.endpoints,
                    tries,
                    elapsed = ?started.elapsed(),
                    error = %failure.error,
                    "etcd call failed"
                );
            }
            return Err(match failure.error {
                MetaError::Etcd(message) if tries > 1 => MetaError::Etcd(format!(
                    "{message} (after {tries} tries in {:?})",
                    started.elapsed()
                )),
                other => other,
            });
        }
        tracing::debug!(
            what = context.what,
            tries,
            error = %failure.error,
            "etcd call failed; retrying"
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> Context<'static> {
        Context {
            what: "put",
            endpoints: "127.0.0.1:1",
            lease: Some(9),
        }
    }

    #[test]
    fn etcd_answers_become_the_stores_own_errors() {
        let failure = classify(
            etcd_client::Error::GRpcStatus(tonic::Status::not_found(
                "etcdserver: requested lease not found",
            )),
            context(),
        );
        assert_eq!(failure.error, MetaError::LeaseNotFound(9));
        let failure = classify(
            etcd_client::Error::GRpcStatus(tonic::Status::invalid_argument(
                "etcdserver: duplicate key given in txn request",
            )),
            context(),
        );
        assert!(matches!(failure.error, MetaError::InvalidArgument(_)));
        let failure = classify(
            etcd_client::Error::GRpcStatus(tonic::Status::unavailable("etcdserver: no leader")),
            context(),
        );
        assert!(failure.transient && failure.not_applied);
        assert!(matches!(failure.error, MetaError::Etcd(ref m) if m.contains("no leader")));
        let failure = classify(
            etcd_client::Error::GRpcStatus(tonic::Status::unavailable(
                "etcdserver: request timed out",
            )),
            context(),
        );
        assert!(failure.transient && !failure.not_applied);
    }

    /// An operation of kind `retry` whose every try times out ("request timed out": the
    /// outcome is unknown), under a short budget: how many tries were made, and the error.
    async fn timing_out(retry: Retry) -> (u32, MetaError) {
        let budget = Budget {
            attempt: Duration::from_millis(500),
            total: Duration::from_secs(2),
        };
        let mut tries = 0;
        let err = with_retry(budget, retry, context(), || {
            tries += 1;
            async {
                Err::<(), _>(etcd_client::Error::GRpcStatus(tonic::Status::unavailable(
                    "etcdserver: request timed out",
                )))
            }
        })
        .await
        .unwrap_err();
        (tries, err)
    }

    #[tokio::test]
    async fn a_write_whose_outcome_is_unknown_is_not_sent_again() {
        let (tries, err) = timing_out(Retry::Write).await;
        assert_eq!(tries, 1);
        assert_eq!(err.code(), yr_common::ErrorCode::EtcdOperationError);

        let (tries, err) = timing_out(Retry::Idempotent).await;
        assert!(tries > 1, "a read is retried ({tries} tries)");
        assert!(matches!(err, MetaError::Etcd(ref m) if m.contains("tries")));
    }
}
