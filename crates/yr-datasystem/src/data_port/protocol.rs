//! The data port's wire format: the request a pull sends ([`RangeRequest`], [`REQUEST_LEN`]
//! bytes behind the magic), how it decodes and why it may not ([`RequestError`]), and the
//! status bytes and error answer the serving node replies with.

use prost::Message;
use yr_common::{Error, ErrorCode};
use yr_proto::error_to_proto;

use crate::capability::{Capability, CAPABILITY_LEN};

/// Opens every request.
const MAGIC: &[u8; 4] = b"YRD2";
/// Bytes in a request.
pub const REQUEST_LEN: usize = 4 + CAPABILITY_LEN + 4 * 8;
/// The range follows.
pub const STATUS_OK: u8 = 0;
/// An error follows.
pub const STATUS_ERROR: u8 = 1;
/// The longest an error message may be on the wire.
pub(super) const MAX_ERROR_LEN: u32 = 64 * 1024;

/// One range of one object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RangeRequest {
    /// The object's capability on the serving node.
    pub capability: Capability,
    /// The allocation on the serving node.
    pub allocation: u64,
    /// The object's size, as the reader knows it (a mismatch is refused).
    pub size: u64,
    /// The first byte.
    pub from: u64,
    /// How many bytes.
    pub length: u64,
}

/// Why bytes are not a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Not [`REQUEST_LEN`] bytes.
    #[error("a data-port request has {REQUEST_LEN} bytes, got {0}")]
    Length(usize),
    /// The magic is not this version's.
    #[error(
        "the data port got a request that does not start with its magic; only nodes of the \
         same yr version pull objects from it"
    )]
    Magic,
}

impl From<RequestError> for Error {
    fn from(error: RequestError) -> Error {
        Error::new(ErrorCode::ParamInvalid, error.to_string())
    }
}

impl RangeRequest {
    /// The request's bytes.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut bytes = [0u8; REQUEST_LEN];
        bytes[..4].copy_from_slice(MAGIC);
        bytes[4..4 + CAPABILITY_LEN].copy_from_slice(&self.capability);
        let words = 4 + CAPABILITY_LEN;
        for (i, field) in [self.allocation, self.size, self.from, self.length]
            .iter()
            .enumerate()
        {
            bytes[words + i * 8..words + 8 + i * 8].copy_from_slice(&field.to_le_bytes());
        }
        bytes
    }

    /// A request from its bytes (any bytes: they come from the network).
    pub fn decode(bytes: &[u8]) -> Result<RangeRequest, RequestError> {
        if bytes.len() != REQUEST_LEN {
            return Err(RequestError::Length(bytes.len()));
        }
        if &bytes[..4] != MAGIC {
            return Err(RequestError::Magic);
        }
        let mut capability = [0u8; CAPABILITY_LEN];
        capability.copy_from_slice(&bytes[4..4 + CAPABILITY_LEN]);
        let words = 4 + CAPABILITY_LEN;
        let field = |i: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&bytes[words + i * 8..words + 8 + i * 8]);
            u64::from_le_bytes(word)
        };
        Ok(RangeRequest {
            capability,
            allocation: field(0),
            size: field(1),
            from: field(2),
            length: field(3),
        })
    }
}

/// The status byte, length and `ErrorInfo` for `error`.
pub(super) fn error_answer(error: &Error) -> Vec<u8> {
    let encoded = error_to_proto(error).encode_to_vec();
    let mut answer = Vec::with_capacity(5 + encoded.len());
    answer.push(STATUS_ERROR);
    answer.extend_from_slice(&(encoded.len() as u32).to_le_bytes());
    answer.extend_from_slice(&encoded);
    answer
}
