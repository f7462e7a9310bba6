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
    /// The PEM files it was loaded from: certificate, key, CA.
    pub files: [PathBuf; 3],
    /// The name servers' certificates are checked against; `None` = the host connected to.
    pub server_name: Option<String>,
}

/// The environment variables that carry a process's TLS files: certificate, key, CA. A node
/// gives its runtimes its own; a driver elsewhere sets them to join a TLS cluster.
pub const ENV_FILES: [&str; 3] = ["YR_TLS_CERT", "YR_TLS_KEY", "YR_TLS_CA"];

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
            files: [cert.to_path_buf(), key.to_path_buf(), ca.to_path_buf()],
            server_name: None,
        })
    }

    /// These settings, checking every server's certificate against `name` instead of the host
    /// connected to (for servers reached through an address their certificates do not name).
    pub fn with_server_name(mut self, name: Option<String>) -> Tls {
        self.server_name = name;
        self
    }

    /// The name the certificate of the server at `host_port` must carry: the configured
    /// server name, else the host.
    pub fn server_name_for(&self, host_port: &str) -> Result<ServerName<'static>, Error> {
        match &self.server_name {
            Some(name) => server_name(name),
            None => server_name(host_port),
        }
    }

    /// TLS from [`ENV_FILES`], if all three are set.
    pub fn from_env() -> Result<Option<Tls>, TlsError> {
        let [cert, key, ca] = ENV_FILES.map(std::env::var_os);
        match (cert, key, ca) {
            (Some(cert), Some(key), Some(ca)) => {
                Tls::load(Path::new(&cert), Path::new(&key), Path::new(&ca)).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// [`ENV_FILES`] with this configuration's files, for a child process.
    pub fn env(&self) -> Vec<(String, String)> {
        ENV_FILES
            .iter()
            .zip(&self.files)
            .map(|(name, file)| (name.to_string(), file.display().to_string()))
            .collect()
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

/// For tests: a new CA and `N` node certificates signed by it, written as PEM files to `dir`
/// (`ca.pem`, `node<i>.pem`, `node<i>.key`, keys mode 0600). Each node certificate names
/// `127.0.0.1` and `localhost` and serves as both server and client certificate, as yr's
/// processes use theirs. Returns the CA's path and each node's (certificate, key), ready for
/// [`Tls::load`]. Two calls make two unrelated CAs. Behind the `test-certificates` feature.
#[cfg(any(test, feature = "test-certificates"))]
pub fn test_certificates<const N: usize>(
    dir: &Path,
) -> std::io::Result<(PathBuf, [(PathBuf, PathBuf); N])> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    use std::os::unix::fs::OpenOptionsExt;

    let failed = |e: rcgen::Error| std::io::Error::other(format!("rcgen: {e}"));
    let write = |name: String, pem: String, mode: u32| -> std::io::Result<PathBuf> {
        use std::io::Write;
        let path = dir.join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)?
            .write_all(pem.as_bytes())?;
        Ok(path)
    };
    std::fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate().map_err(failed)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(failed)?;
    ca_params.distinguished_name.push(
        DnType::CommonName,
        format!("yr test CA in {}", dir.display()),
    );
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key).map_err(failed)?;
    let ca_path = write("ca.pem".into(), ca.pem(), 0o644)?;
    let mut nodes = Vec::with_capacity(N);
    for i in 0..N {
        let key = KeyPair::generate().map_err(failed)?;
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).map_err(failed)?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("yr test node {i}"));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let certificate = params.signed_by(&key, &ca, &ca_key).map_err(failed)?;
        nodes.push((
            write(format!("node{i}.pem"), certificate.pem(), 0o644)?,
            write(format!("node{i}.key"), key.serialize_pem(), 0o600)?,
        ));
    }
    let nodes = nodes
        .try_into()
        .unwrap_or_else(|_| unreachable!("exactly N certificates were made"));
    Ok((ca_path, nodes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_certificates_load_as_mutual_tls() {
        let dir = std::env::temp_dir().join(format!("yr-tls-{}", std::process::id()));
        let (ca, [(cert, key), (other_cert, other_key)]) =
            test_certificates::<2>(&dir).expect("certificates");
        Tls::load(&cert, &key, &ca).expect("node 0");
        Tls::load(&other_cert, &other_key, &ca).expect("node 1");
        assert_eq!(
            server_name("127.0.0.1:22770").expect("name"),
            ServerName::try_from("127.0.0.1").expect("ip")
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
