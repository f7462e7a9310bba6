//! The data port's wire format: the request a pull sends ([`RangeRequest`], [`REQUEST_LEN`]
//! bytes behind the magic), how it decodes and why it may not ([`RequestError`]), and the
//! status bytes and error answer the serving node replies with.

use prost::Message;
use yr_common::{Error, ErrorCode};
use yr_proto::error_to_proto;

use crate::capability::{Capability, CAPABILITY_LEN};

/// Opens every request for a range.
const MAGIC: &[u8; 4] = b"YRD2";
/// Opens a request to drop the hold the serving node keeps on an object for an owner on the
/// asking node (the same layout; `from` and `length` are 0). Answered with [`STATUS_OK`] alone.
const RELEASE_MAGIC: &[u8; 4] = b"YRDR";

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ask {
    /// The bytes of a range.
    Range,
    /// Drop the hold kept for the asking node's owner (see `SharedMemoryStore::hold_for_remote`).
    Release,
}
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
        self.encode_as(Ask::Range)
    }

    /// The request's bytes, asking for `ask`.
    pub fn encode_as(&self, ask: Ask) -> [u8; REQUEST_LEN] {
        let mut bytes = [0u8; REQUEST_LEN];
        bytes[..4].copy_from_slice(match ask {
            Ask::Range => MAGIC,
            Ask::Release => RELEASE_MAGIC,
        });
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
        match Self::decode_ask(bytes)? {
            (Ask::Range, request) => Ok(request),
            (Ask::Release, _) => Err(RequestError::Magic),
        }
    }

    /// A request and what it asks for, from its bytes (any bytes: they come from the network).
    pub fn decode_ask(bytes: &[u8]) -> Result<(Ask, RangeRequest), RequestError> {
        if bytes.len() != REQUEST_LEN {
            return Err(RequestError::Length(bytes.len()));
        }
        let ask = match &bytes[..4] {
            magic if magic == MAGIC => Ask::Range,
            magic if magic == RELEASE_MAGIC => Ask::Release,
            _ => return Err(RequestError::Magic),
        };
        let mut capability = [0u8; CAPABILITY_LEN];
        capability.copy_from_slice(&bytes[4..4 + CAPABILITY_LEN]);
        let words = 4 + CAPABILITY_LEN;
        let field = |i: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&bytes[words + i * 8..words + 8 + i * 8]);
            u64::from_le_bytes(word)
        };
        Ok((
            ask,
            RangeRequest {
                capability,
                allocation: field(0),
                size: field(1),
                from: field(2),
                length: field(3),
            },
        ))
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
