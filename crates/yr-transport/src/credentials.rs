//! This process's credentials: the cluster token it presents and checks, its TLS
//! configuration, and the largest message it accepts. A process installs them once, before it
//! connects or serves ([`install`]); every connection made or accepted through this crate uses
//! them.

use std::sync::Arc;

use parking_lot::RwLock;
use yr_common::auth::ClusterToken;

use crate::tls::Tls;

/// The default largest gRPC message a yr process accepts or sends: 64 MiB. Values above
/// 100 KiB travel through shared memory, so only a mistake or an attack comes near it.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 << 20;

/// What a process presents and checks on its connections.
#[derive(Clone, Debug)]
pub struct Credentials {
    /// The cluster token: sent in the hello of every connection this process opens, and
    /// required in the hello of every connection it accepts. `None`: this process can neither
    /// connect nor serve (connections fail with 1014).
    pub token: Option<ClusterToken>,
    /// TLS for TCP connections (mutual: both sides present certificates signed by the CA).
    pub tls: Option<Arc<Tls>>,
    /// The largest gRPC message accepted or sent.
    pub max_message_bytes: usize,
}

impl Credentials {
    /// Credentials with `token`, no TLS and the default message limit.
    pub fn with_token(token: ClusterToken) -> Credentials {
        Credentials {
            token: Some(token),
            tls: None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

impl Default for Credentials {
    fn default() -> Self {
        Credentials {
            token: None,
            tls: None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

static CREDENTIALS: RwLock<Option<Arc<Credentials>>> = RwLock::new(None);

/// Install this process's credentials (replacing earlier ones: a driver that finalizes and
/// joins another cluster installs that cluster's).
pub fn install(credentials: Credentials) {
    *CREDENTIALS.write() = Some(Arc::new(credentials));
}

/// This process's credentials (empty ones if none were installed).
pub fn current() -> Arc<Credentials> {
    CREDENTIALS
        .read()
        .clone()
        .unwrap_or_else(|| Arc::new(Credentials::default()))
}

/// Room in a message for what surrounds its payload (keys, ids, framing), beyond
/// [`Credentials::max_message_bytes`]: a 64 MiB KV value still fits in one message.
pub const MESSAGE_ENVELOPE_BYTES: usize = 1 << 20;

/// The largest gRPC message (or call-socket frame) this process accepts or sends: the
/// configured payload limit plus [`MESSAGE_ENVELOPE_BYTES`].
pub fn max_message_bytes() -> usize {
    current()
        .max_message_bytes
        .saturating_add(MESSAGE_ENVELOPE_BYTES)
}
