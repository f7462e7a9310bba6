//! The cluster token and peer credentials: who may talk to a yr cluster.
//!
//! Every connection to a yr process carries the cluster's token: gRPC requests in the
//! `authorization: Bearer <token>` header ([`METADATA_KEY`], [`ClusterToken::header_value`]), and
//! the raw-socket protocols (the call sockets, the data port) in a hello frame sent once per
//! connection ([`ClusterToken::hello`], checked with [`read_hello`]). Unix sockets are checked by
//! the peer's credentials too ([`peer_credentials`], [`peer_allowed`]): only this user (or root)
//! may connect.
//!
//! `yr start --master` generates the token ([`ClusterToken::generate`]) into the session
//! directory, readable by its owner only ([`ClusterToken::write_to`]). Nodes that join take it
//! from `--token` or `YR_TOKEN`; drivers on the machine read it from the session
//! ([`ClusterToken::resolve`]).
//!
//! ```
//! use yr_common::auth::ClusterToken;
//! let token = ClusterToken::generate().unwrap();
//! let hello = token.hello();
//! assert!(yr_common::auth::read_hello(&mut hello.as_slice(), &token).is_ok());
//! let other = ClusterToken::generate().unwrap();
//! assert!(yr_common::auth::read_hello(&mut hello.as_slice(), &other).is_err());
//! ```

use std::fmt;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::{Error, ErrorCode};

/// The environment variable that carries the cluster token.
pub const TOKEN_ENV: &str = "YR_TOKEN";
/// The token's file in a session directory (mode 0600).
pub const TOKEN_FILE: &str = "token";
/// The gRPC metadata key that carries the token.
pub const METADATA_KEY: &str = "authorization";
/// The longest token accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 512;
/// The first bytes of a hello frame.
pub const HELLO_MAGIC: [u8; 4] = *b"YRT1";
/// A hello frame's header: the magic, then the token's length (u16, little-endian).
pub const HELLO_HEADER: usize = 6;
/// The byte a server answers a good hello with.
pub const HELLO_ACCEPTED: u8 = 0;
/// The byte a server answers a bad hello with, before it closes the connection.
pub const HELLO_REFUSED: u8 = 1;

/// Why a connection was not let in. Every variant is 1014 for users.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token was presented.
    #[error("the request carries no cluster token; pass the cluster's token (YR_TOKEN, --token, or the session's token file)")]
    Missing,
    /// A token was presented, but not the cluster's.
    #[error("the cluster token is wrong; use the token of the cluster you connect to (YR_TOKEN, --token, or the session's token file)")]
    Wrong,
    /// The connection did not start with a hello frame.
    #[error("the connection did not start with yr's hello frame; connect with a yr client of the same version")]
    NotAHello,
    /// A Unix-socket peer runs as another user.
    #[error("the peer runs as user {uid}, not as the cluster's user {expected}; run yr clients as the user who started the cluster")]
    OtherUser {
        /// The peer's user.
        uid: u32,
        /// This process's user.
        expected: u32,
    },
    /// The peer's credentials could not be read.
    #[error("cannot read the peer's credentials: {0}")]
    NoCredentials(String),
}

impl From<AuthError> for Error {
    fn from(error: AuthError) -> Error {
        Error::new(ErrorCode::AuthorizeFailed, error.to_string())
    }
}

/// Why a token could not be made, read or stored.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The operating system's random source failed.
    #[error("cannot read random bytes for the cluster token: {0}")]
    Random(std::io::Error),
    /// The token file could not be read or written.
    #[error("cannot {action} the cluster token file {path}: {source}")]
    File {
        /// read or write.
        action: &'static str,
        /// Which file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The token is empty, too long, or not printable ASCII.
    #[error(
        "the cluster token must be 1 to {MAX_TOKEN_LEN} printable ASCII characters without spaces"
    )]
    Invalid,
}

impl From<TokenError> for Error {
    fn from(error: TokenError) -> Error {
        let code = match error {
            TokenError::Invalid => ErrorCode::ParamInvalid,
            TokenError::Random(_) | TokenError::File { .. } => ErrorCode::AuthorizeFailed,
        };
        Error::new(code, error.to_string())
    }
}

/// The secret every connection to a cluster presents.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterToken(String);

impl fmt::Debug for ClusterToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterToken(<redacted>)")
    }
}

impl ClusterToken {
    /// A new random token: 256 bits from the operating system, as 64 hex digits.
    pub fn generate() -> Result<ClusterToken, TokenError> {
        let mut bytes = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut random| random.read_exact(&mut bytes))
            .map_err(TokenError::Random)?;
        Ok(ClusterToken(
            bytes.iter().map(|b| format!("{b:02x}")).collect(),
        ))
    }

    /// A token given by the user (flag, environment, config).
    pub fn parse(text: &str) -> Result<ClusterToken, TokenError> {
        let text = text.trim();
        let printable = text.bytes().all(|b| b.is_ascii_graphic());
        if text.is_empty() || text.len() > MAX_TOKEN_LEN || !printable {
            return Err(TokenError::Invalid);
        }
        Ok(ClusterToken(text.to_string()))
    }

    /// The token's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The value of the `authorization` header: `Bearer <token>`.
    pub fn header_value(&self) -> String {
        format!("Bearer {}", self.0)
    }

    /// Whether `presented` (a header value `Bearer <token>`, or the bare token) is this token.
    /// Compares in constant time.
    pub fn accepts_header(&self, presented: &[u8]) -> bool {
        let bare = presented.strip_prefix(b"Bearer ").unwrap_or(presented);
        self.accepts(bare)
    }

    /// Whether `presented` is this token, compared in constant time.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        constant_time_eq(self.0.as_bytes(), presented)
    }

    /// Check a header value, or its absence.
    pub fn check_header(&self, presented: Option<&[u8]>) -> Result<(), AuthError> {
        match presented {
            None => Err(AuthError::Missing),
            Some(value) if self.accepts_header(value) => Ok(()),
            Some(_) => Err(AuthError::Wrong),
        }
    }

    /// The hello frame a client sends first on a raw socket: the magic, the token's length
    /// and the token.
    pub fn hello(&self) -> Vec<u8> {
        let mut frame = Vec::with_capacity(HELLO_HEADER + self.0.len());
        frame.extend_from_slice(&HELLO_MAGIC);
        frame.extend_from_slice(&(self.0.len() as u16).to_le_bytes());
        frame.extend_from_slice(self.0.as_bytes());
        frame
    }

    /// Write the token to `<dir>/token`, readable and writable by its owner only. Fails if the
    /// file exists.
    pub fn write_to(&self, dir: &Path) -> Result<(), TokenError> {
        self.write_file(&dir.join(TOKEN_FILE))
    }

    /// Write the token to the new file `path`, mode 0600.
    fn write_file(&self, path: &Path) -> Result<(), TokenError> {
        use std::os::unix::fs::OpenOptionsExt;
        let failed = |source| TokenError::File {
            action: "write",
            path: path.display().to_string(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(failed)?;
        file.write_all(self.0.as_bytes()).map_err(failed)?;
        file.sync_all().map_err(failed)
    }

    /// Make `<dir>/token` hold this token, replacing another one atomically (write a private
    /// file beside it, then rename), so a reader sees the old token or the new, never none.
    /// Nothing is written when it already holds this one.
    pub fn store(&self, dir: &Path) -> Result<(), TokenError> {
        if ClusterToken::read_from(dir).ok().as_ref() == Some(self) {
            return Ok(());
        }
        let staging = dir.join(format!(".{TOKEN_FILE}.{}", std::process::id()));
        let _ = std::fs::remove_file(&staging);
        self.write_file(&staging)?;
        let path = dir.join(TOKEN_FILE);
        std::fs::rename(&staging, &path).map_err(|source| TokenError::File {
            action: "write",
            path: path.display().to_string(),
            source,
        })
    }

    /// Read `<dir>/token`.
    pub fn read_from(dir: &Path) -> Result<ClusterToken, TokenError> {
        let path = dir.join(TOKEN_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| TokenError::File {
            action: "read",
            path: path.display().to_string(),
            source,
        })?;
        ClusterToken::parse(&text)
    }

    /// The token a client uses: `explicit` (a flag or `Config`), else `$YR_TOKEN`, else the
    /// token file of `session_dir`. `None` if none of them has one.
    pub fn resolve(
        explicit: Option<&str>,
        session_dir: Option<&Path>,
    ) -> Result<Option<ClusterToken>, TokenError> {
        if let Some(text) = explicit {
            return ClusterToken::parse(text).map(Some);
        }
        if let Ok(text) = std::env::var(TOKEN_ENV) {
            if !text.trim().is_empty() {
                return ClusterToken::parse(&text).map(Some);
            }
        }
        match session_dir {
            Some(dir) if dir.join(TOKEN_FILE).exists() => ClusterToken::read_from(dir).map(Some),
            _ => Ok(None),
        }
    }
}

/// Whether two secrets are equal, in time that depends only on their lengths.
pub fn constant_time_eq(expected: &[u8], presented: &[u8]) -> bool {
    if presented.len() != expected.len() {
        return false;
    }
    let difference = expected
        .iter()
        .zip(presented)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    // Keep the comparison from being folded into an early exit.
    std::hint::black_box(difference) == 0
}

/// Read a hello frame from `reader` and check its token. Reads at most
/// [`HELLO_HEADER`] + [`MAX_TOKEN_LEN`] bytes whatever the peer sends.
pub fn read_hello(reader: &mut impl Read, token: &ClusterToken) -> Result<(), AuthError> {
    let mut header = [0u8; HELLO_HEADER];
    reader
        .read_exact(&mut header)
        .map_err(|_| AuthError::NotAHello)?;
    let length = hello_length(&header)?;
    let mut presented = vec![0u8; length];
    reader
        .read_exact(&mut presented)
        .map_err(|_| AuthError::NotAHello)?;
    if token.accepts(&presented) {
        Ok(())
    } else {
        Err(AuthError::Wrong)
    }
}

/// The token length a hello header announces; an error if it is not a hello or too long.
pub fn hello_length(header: &[u8; HELLO_HEADER]) -> Result<usize, AuthError> {
    if header[..4] != HELLO_MAGIC {
        return Err(AuthError::NotAHello);
    }
    let length = usize::from(u16::from_le_bytes([header[4], header[5]]));
    if length == 0 {
        return Err(AuthError::Missing);
    }
    if length > MAX_TOKEN_LEN {
        return Err(AuthError::Wrong);
    }
    Ok(length)
}

/// A Unix-socket peer: its process, user and group, as the kernel saw them at connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCredentials {
    /// The peer's process id.
    pub pid: u32,
    /// The peer's user id.
    pub uid: u32,
    /// The peer's group id.
    pub gid: u32,
}

/// The credentials of the peer of a connected Unix socket (`SO_PEERCRED`).
pub fn peer_credentials(socket: &impl AsRawFd) -> Result<PeerCredentials, AuthError> {
    let mut credentials = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut length = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `credentials` is a valid ucred and `length` its size, both live for the call.
    let result = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut credentials as *mut libc::ucred).cast(),
            &mut length,
        )
    };
    if result != 0 {
        return Err(AuthError::NoCredentials(
            std::io::Error::last_os_error().to_string(),
        ));
    }
    Ok(PeerCredentials {
        pid: credentials.pid as u32,
        uid: credentials.uid,
        gid: credentials.gid,
    })
}

/// Whether a Unix-socket peer may talk to this process: it runs as this process's user, or as
/// root.
pub fn peer_allowed(peer: &PeerCredentials) -> Result<(), AuthError> {
    // SAFETY: geteuid has no preconditions.
    let expected = unsafe { libc::geteuid() };
    if peer.uid == expected || peer.uid == 0 {
        Ok(())
    } else {
        Err(AuthError::OtherUser {
            uid: peer.uid,
            expected,
        })
    }
}

/// Send `token`'s hello on a blocking stream and read the server's answer: 1014 if the server
/// refuses the token, `failed` if the connection breaks first.
pub fn send_hello(
    stream: &mut (impl Read + Write),
    token: &ClusterToken,
    failed: ErrorCode,
) -> Result<(), Error> {
    stream
        .write_all(&token.hello())
        .map_err(|e| Error::new(failed, format!("cannot send the cluster token: {e}")))?;
    let mut answer = [0u8; 1];
    match stream.read_exact(&mut answer) {
        Ok(()) if answer[0] == HELLO_ACCEPTED => Ok(()),
        Ok(()) => Err(Error::new(
            ErrorCode::AuthorizeFailed,
            "the peer refused the cluster token; use the token of the cluster you connect to \
             (YR_TOKEN, --token, or the session's token file)",
        )),
        Err(e) => Err(Error::new(
            failed,
            format!("the peer closed the connection before it answered the cluster token: {e}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_compare_exactly() {
        let a = ClusterToken::generate().expect("token");
        let b = ClusterToken::generate().expect("token");
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 64);
        assert!(a.accepts(a.as_str().as_bytes()));
        assert!(!a.accepts(b.as_str().as_bytes()));
        assert!(!a.accepts(&a.as_str().as_bytes()[..63]));
        assert!(a.accepts_header(a.header_value().as_bytes()));
        assert_eq!(a.check_header(None), Err(AuthError::Missing));
        assert_eq!(a.check_header(Some(b"Bearer x")), Err(AuthError::Wrong));
        assert!(!format!("{a:?}").contains(a.as_str()));
    }

    #[test]
    fn bad_tokens_are_refused() {
        assert!(ClusterToken::parse("").is_err());
        assert!(ClusterToken::parse("has space").is_err());
        assert!(ClusterToken::parse(&"x".repeat(MAX_TOKEN_LEN + 1)).is_err());
        assert_eq!(ClusterToken::parse(" abc\n").expect("ok").as_str(), "abc");
    }

    #[test]
    fn the_token_file_is_private_and_not_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("yr-auth-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let _ = std::fs::remove_file(dir.join(TOKEN_FILE));
        let token = ClusterToken::generate().expect("token");
        token.write_to(&dir).expect("write");
        let mode = std::fs::metadata(dir.join(TOKEN_FILE))
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(token.write_to(&dir).is_err(), "an existing file is kept");
        assert_eq!(ClusterToken::read_from(&dir).expect("read"), token);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn hellos_check_the_token_and_bound_what_they_read() {
        let token = ClusterToken::generate().expect("token");
        assert_eq!(
            read_hello(&mut &b"GET / HTTP/1.1\r\n"[..], &token),
            Err(AuthError::NotAHello)
        );
        let mut huge = HELLO_MAGIC.to_vec();
        huge.extend_from_slice(&u16::MAX.to_le_bytes());
        assert_eq!(
            read_hello(&mut huge.as_slice(), &token),
            Err(AuthError::Wrong)
        );
        let mut empty = HELLO_MAGIC.to_vec();
        empty.extend_from_slice(&0u16.to_le_bytes());
        assert_eq!(
            read_hello(&mut empty.as_slice(), &token),
            Err(AuthError::Missing)
        );
        let torn = token.hello();
        assert_eq!(
            read_hello(&mut &torn[..10], &token),
            Err(AuthError::NotAHello)
        );
        assert_eq!(read_hello(&mut torn.as_slice(), &token), Ok(()));
    }

    #[test]
    fn a_unix_peer_of_this_user_is_allowed() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let peer = peer_credentials(&a).expect("credentials");
        assert_eq!(peer.pid, std::process::id());
        assert!(peer_allowed(&peer).is_ok());
        let stranger = PeerCredentials { uid: 4242, ..peer };
        if peer.uid != 0 {
            assert!(peer_allowed(&stranger).is_err());
        }
    }
}
