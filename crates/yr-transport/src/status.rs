//! What a failed gRPC call means in yr's codes: the one mapping from a `tonic::Status` to an
//! [`ErrorCode`], used by every client of a yr service (the node's proxy keeps its own until it
//! is split; see issue 10).

use tonic::{Code, Status};
use yr_common::ErrorCode;

/// A status's message followed by the innermost cause behind it, when there is one: a
/// connection that failed before any request carries only "transport error" in its message,
/// and the reason (refused, TLS required, …) in its sources.
///
/// ```
/// let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "the peer serves TLS");
/// let status = tonic::Status::from_error(Box::new(io));
/// assert!(yr_transport::status_detail(&status).contains("the peer serves TLS"));
/// ```
pub fn status_detail(status: &Status) -> String {
    let mut innermost: Option<&(dyn std::error::Error + 'static)> = None;
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        innermost = Some(error);
        source = error.source();
    }
    match innermost.map(ToString::to_string) {
        Some(cause) if !status.message().contains(&cause) => {
            format!("{} ({cause})", status.message())
        }
        _ => status.message().to_string(),
    }
}

/// The gRPC response header in which a master that does not lead (a standby) names the leader
/// (`host:port`, empty while no master leads).
pub const LEADER_METADATA: &str = "yr-leader";

/// Whether `status` is a standby master's "not the leader" answer, and if so the leader it
/// names: `None` for any other status, `Some(None)` while no master leads (an election is under
/// way), `Some(Some(address))` to follow.
///
/// ```
/// let mut status = tonic::Status::unavailable("not the leader; the leader is at 127.0.0.1:1");
/// status.metadata_mut().insert(yr_transport::LEADER_METADATA, "127.0.0.1:1".parse().unwrap());
/// assert_eq!(yr_transport::leader_redirect(&status), Some(Some("127.0.0.1:1".to_string())));
/// assert_eq!(yr_transport::leader_redirect(&tonic::Status::unavailable("down")), None);
/// ```
pub fn leader_redirect(status: &Status) -> Option<Option<String>> {
    let value = status.metadata().get(LEADER_METADATA)?;
    let leader = value.to_str().unwrap_or_default().trim();
    Some((!leader.is_empty()).then(|| leader.to_string()))
}

/// Whether a call that failed with `status` certainly never reached its peer: the connection
/// was refused. Such a call may be sent again elsewhere, even a write.
///
/// ```
/// let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
/// assert!(yr_transport::never_sent(&tonic::Status::from_error(Box::new(io))));
/// assert!(!yr_transport::never_sent(&tonic::Status::unavailable("reset")));
/// ```
pub fn never_sent(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        source = error.source();
    }
    false
}

/// The yr code of a gRPC call that failed with `status`.
///
/// `link` is the caller's code for "the peer could not be reached or the link broke", the same
/// code it gives [`connect`](crate::connect) for that peer: 3002 between yr components, 3001
/// between a caller and a runtime, 4002 for a driver's first contact with its node, 4205 for the
/// data worker, 4005 for an object's owner. The table:
///
/// | gRPC status | yr code | why |
/// |---|---|---|
/// | `Unavailable`, `Unknown`, `Cancelled`, `Internal`, `DataLoss` | `link` | tonic reports a refused, reset or broken connection and h2 protocol errors this way: the link failed |
/// | `DeadlineExceeded`, `Aborted` | `link` | the peer did not answer in time, or gave up on the call ("failed or timed out", 3002's row) |
/// | `Unimplemented` | `link` | the peer does not serve the call: another yr version, or not a yr service |
/// | `InvalidArgument`, `OutOfRange` | 1001 `ParamInvalid` | the peer refused the request's content, or a message is larger than the limit (tonic's decode limit); the message names it |
/// | `ResourceExhausted` | 1005 `InvokeRateLimited` | the peer is overloaded (h2 `ENHANCE_YOUR_CALM`, a full queue) or a message passed the encode limit: slow down or send less |
/// | `NotFound` | 1003 `InstanceNotFound` | what the call names is gone: yr's services look up instances (and what belongs to them) |
/// | `AlreadyExists` | 1004 `InstanceDuplicated` | the id or name is taken |
/// | `Unauthenticated`, `PermissionDenied` | 1014 `AuthorizeFailed` | the peer refused this process's token or identity |
/// | `FailedPrecondition` | 3010 `StateMachineError` | the peer's state does not allow the call now (for example an instance that is not running) |
/// | `Ok` | 3003 `InnerSystemError` | a success is not an error: the caller has a bug |
///
/// A peer that refused this process's token closes the connection, so the call fails as
/// `Unavailable`; callers check [`refused`](crate::refused) for the address first, as
/// [`connect`](crate::connect) does, to report 1014.
///
/// ```
/// use yr_common::ErrorCode;
/// let lost = tonic::Status::unavailable("connection refused");
/// assert_eq!(yr_transport::status_to_code(&lost, ErrorCode::ConnectionFailed), ErrorCode::ConnectionFailed);
/// let bad = tonic::Status::invalid_argument("empty key");
/// assert_eq!(yr_transport::status_to_code(&bad, ErrorCode::ConnectionFailed), ErrorCode::ParamInvalid);
/// ```
pub fn status_to_code(status: &Status, link: ErrorCode) -> ErrorCode {
    match status.code() {
        Code::Unavailable
        | Code::Unknown
        | Code::Cancelled
        | Code::Internal
        | Code::DataLoss
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::Unimplemented => link,
        Code::InvalidArgument | Code::OutOfRange => ErrorCode::ParamInvalid,
        Code::ResourceExhausted => ErrorCode::InvokeRateLimited,
        Code::NotFound => ErrorCode::InstanceNotFound,
        Code::AlreadyExists => ErrorCode::InstanceDuplicated,
        Code::Unauthenticated | Code::PermissionDenied => ErrorCode::AuthorizeFailed,
        Code::FailedPrecondition => ErrorCode::StateMachineError,
        Code::Ok => ErrorCode::InnerSystemError,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINKS: [ErrorCode; 5] = [
        ErrorCode::InnerCommunication,
        ErrorCode::RequestBetweenRuntimeBus,
        ErrorCode::InitConnectionFailed,
        ErrorCode::ConnectionFailed,
        ErrorCode::GetOperationFailed,
    ];

    #[test]
    fn link_failures_take_the_callers_link_code() {
        for link in LINKS {
            for code in [
                Code::Unavailable,
                Code::Unknown,
                Code::Cancelled,
                Code::Internal,
                Code::DataLoss,
                Code::DeadlineExceeded,
                Code::Aborted,
                Code::Unimplemented,
            ] {
                assert_eq!(
                    status_to_code(&Status::new(code, "x"), link),
                    link,
                    "{code:?} with link {link}"
                );
            }
        }
    }

    #[test]
    fn answers_about_the_request_keep_their_meaning_whatever_the_link() {
        let expected = [
            (Code::InvalidArgument, ErrorCode::ParamInvalid),
            (Code::OutOfRange, ErrorCode::ParamInvalid),
            (Code::ResourceExhausted, ErrorCode::InvokeRateLimited),
            (Code::NotFound, ErrorCode::InstanceNotFound),
            (Code::AlreadyExists, ErrorCode::InstanceDuplicated),
            (Code::Unauthenticated, ErrorCode::AuthorizeFailed),
            (Code::PermissionDenied, ErrorCode::AuthorizeFailed),
            (Code::FailedPrecondition, ErrorCode::StateMachineError),
            (Code::Ok, ErrorCode::InnerSystemError),
        ];
        for link in LINKS {
            for (code, yr_code) in expected {
                assert_eq!(
                    status_to_code(&Status::new(code, "x"), link),
                    yr_code,
                    "{code:?} with link {link}"
                );
            }
        }
    }

    #[test]
    fn tonics_message_size_limits_are_parameter_or_rate_errors() {
        // tonic's decoder refuses an oversized message with OutOfRange, its encoder with
        // ResourceExhausted; neither is a broken link.
        let decoded = Status::out_of_range(
            "Error, decoded message length too large: found 70000000 bytes, the limit is: 67108864 bytes",
        );
        assert_eq!(
            status_to_code(&decoded, ErrorCode::InnerCommunication),
            ErrorCode::ParamInvalid
        );
        let encoded = Status::resource_exhausted("Error, encoded message length too large");
        assert_eq!(
            status_to_code(&encoded, ErrorCode::InnerCommunication),
            ErrorCode::InvokeRateLimited
        );
    }
}
