//! TLS for TCP connections between yr processes, with rustls: each process has a certificate
//! and key, and trusts one CA. Servers require a client certificate signed by that CA (mutual
//! TLS), so only the cluster's own nodes, masters and drivers complete a handshake.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use yr_common::{Error, ErrorCode};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read the TLS {what} file {path}: {source}")]
    Read {
        /// certificate, key or CA.
        what: &'static str,
        /// Which file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A PEM file held nothing usable.
    #[error("the TLS {what} file {path} holds no {what} in PEM form")]
    Empty {
        /// certificate, key or CA.
        what: &'static str,
        /// Which file.
        path: PathBuf,
    },
    /// rustls refused the configuration.
    #[error("invalid TLS configuration: {0}")]
    Config(String),
}

impl From<TlsError> for Error {
    fn from(error: TlsError) -> Error {
        Error::new(ErrorCode::ParamInvalid, error.to_string())
    }
}

/// A process's TLS configuration: what it serves with and what it connects with.
#[derive(Debug)]
pub struct Tls {
    /// For accepted connections: requires a client certificate signed by the CA.
    pub server: Arc<rustls::ServerConfig>,
    /// For connections this process opens: presents its certificate, trusts the CA.
    pub client: Arc<rustls::ClientConfig>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem(what, path)?;
    let certificates: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read {
            what,
            path: path.to_path_buf(),
            source,
        })?;
    if certificates.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certificates)
}

impl Tls {
    /// Load a certificate chain, its private key and the CA, all PEM files.
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<Tls, TlsError> {
        let chain = certificates("certificate", cert)?;
        let key_pem = read_pem("key", key)?;
        let private_key: PrivateKeyDer<'static> =
            rustls_pemfile::private_key(&mut key_pem.as_slice())
                .map_err(|source| TlsError::Read {
                    what: "key",
                    path: key.to_path_buf(),
                    source,
                })?
                .ok_or_else(|| TlsError::Empty {
                    what: "key",
                    path: key.to_path_buf(),
                })?;
        let mut roots = rustls::RootCertStore::empty();
        for certificate in certificates("CA", ca)? {
            roots
                .add(certificate)
                .map_err(|e| TlsError::Config(format!("the CA in {}: {e}", ca.display())))?;
        }
        let roots = Arc::new(roots);
        let config = |e: rustls::Error| TlsError::Config(e.to_string());
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), private_key.clone_key())
            .map_err(config)?;
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, private_key)
            .map_err(config)?;
        Ok(Tls {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// The name a TLS client checks the server's certificate against: the host of `host:port`.
pub fn server_name(host_port: &str) -> Result<ServerName<'static>, Error> {
    let host = match host_port.rsplit_once(':') {
        Some((host, _port)) => host.trim_start_matches('[').trim_end_matches(']'),
        None => host_port,
    };
    ServerName::try_from(host.to_string()).map_err(|e| {
        Error::new(
            ErrorCode::ParamInvalid,
            format!("{host:?} is not a host name TLS can check: {e}"),
        )
    })
}
