//! [`StreamError`]: what can go wrong with a stream call, and the seed code each case
//! converts to.

use std::time::Duration;

use yr_common::{Error, ErrorCode};

/// What can go wrong with a stream call. Converts to a [`yr_common::Error`] with its code.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// A name, a configuration or an argument failed validation (1001).
    #[error("{0}")]
    InvalidArgument(String),
    /// The stream had no room for the elements within the send's timeout (4202).
    #[error(
        "stream {stream:?} is full: {used} of its {max} bytes (max_stream_size) are not acked \
         yet, and {wanted} more bytes found no room within {timeout:?}; let consumers receive and \
         ack, raise max_stream_size, or send with a longer timeout"
    )]
    Full {
        /// The stream.
        stream: String,
        /// Bytes not acked yet.
        used: usize,
        /// The stream's limit.
        max: usize,
        /// Bytes the send needed.
        wanted: usize,
        /// The send's timeout.
        timeout: Duration,
    },
    /// The producer or consumer was closed, or never existed here (4298).
    #[error(
        "the {what} {id} of stream {stream:?} is closed (or the stream was removed); create a \
         new {what}"
    )]
    Closed {
        /// "producer" or "consumer".
        what: &'static str,
        /// Its id.
        id: u64,
        /// The stream.
        stream: String,
    },
    /// `delete` of a stream that still has producers or consumers (4299).
    #[error(
        "stream {stream:?} cannot be deleted: it still has {producers} producer(s) and \
         {consumers} consumer(s); close them first"
    )]
    InUse {
        /// The stream.
        stream: String,
        /// Its producers.
        producers: u64,
        /// Its consumers.
        consumers: u64,
    },
    /// The store was closed (finalize): the error every call now gets.
    #[error("{0}")]
    StoreClosed(Error),
}

impl From<StreamError> for Error {
    fn from(error: StreamError) -> Error {
        let code = match &error {
            StreamError::InvalidArgument(_) => ErrorCode::ParamInvalid,
            StreamError::Full { .. } => ErrorCode::SharedMemoryLimited,
            StreamError::Closed { .. } => ErrorCode::ClientAlreadyClosed,
            StreamError::InUse { .. } => ErrorCode::DatasystemFailed,
            StreamError::StoreClosed(error) => return error.clone(),
        };
        Error::new(code, error.to_string())
    }
}
