//! TLS material named in the config: the listener's certificate and key, and extra CA
//! certificates for HTTPS to backends. Read and checked when the config is, so a bad path or
//! a key that does not fit its certificate stops the start (or the reload) with the field named.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use super::ConfigError;

/// The client listener's certificate chain and private key.
#[derive(Clone)]
pub struct ListenerTls {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub certified: Arc<CertifiedKey>,
    /// SHA-256 over the files' contents: a reload swaps the certificate only when it changed.
    fingerprint: [u8; 32],
}

// The private key must never reach a log line, so only the paths are shown.
impl fmt::Debug for ListenerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListenerTls")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl PartialEq for ListenerTls {
    fn eq(&self, other: &Self) -> bool {
        self.fingerprint == other.fingerprint
    }
}

/// PEM files are a few kilobytes; anything over this is not one.
const MAX_PEM_BYTES: u64 = 1024 * 1024;

fn read(path: &str, field: &str) -> Result<Vec<u8>, ConfigError> {
    let fail = |m: String| ConfigError::field(field, m);
    let meta = std::fs::metadata(path).map_err(|e| fail(format!("cannot read {path}: {e}")))?;
    // A directory or a device (say /dev/zero) would fail late or never end.
    if !meta.is_file() {
        return Err(fail(format!("{path} is not a regular file")));
    }
    if meta.len() > MAX_PEM_BYTES {
        return Err(fail(format!(
            "{path} is {} bytes: too large for a PEM file",
            meta.len()
        )));
    }
    std::fs::read(path).map_err(|e| fail(format!("cannot read {path}: {e}")))
}

impl ListenerTls {
    /// Loads a PEM certificate chain (leaf first) and a PEM private key (PKCS#8, PKCS#1 or
    /// SEC1) and checks that the key belongs to the leaf certificate.
    pub fn load(cert: &str, key: &str) -> Result<ListenerTls, ConfigError> {
        const CERT: &str = "server.tls_cert";
        const KEY: &str = "server.tls_key";
        let cert_pem = read(cert, CERT)?;
        let key_pem = read(key, KEY)?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ConfigError::field(CERT, format!("{cert}: not a PEM certificate: {e}")))?;
        if chain.is_empty() {
            return Err(ConfigError::field(
                CERT,
                format!("{cert}: no CERTIFICATE block found"),
            ));
        }
        // The parse error can quote the file, and the file is a secret: say only what failed.
        let der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
            ConfigError::field(KEY, format!("{key}: no PEM private key could be read"))
        })?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&der)
            .map_err(|_| ConfigError::field(KEY, format!("{key}: unsupported private key type")))?;
        let certified = CertifiedKey::new(chain, signer);
        certified.keys_match().map_err(|_| {
            ConfigError::field(
                KEY,
                format!("{key} is not the private key of the certificate in {cert}"),
            )
        })?;
        let fingerprint = fingerprint(&cert_pem, &key_pem);
        Ok(ListenerTls {
            cert_path: PathBuf::from(cert),
            key_path: PathBuf::from(key),
            certified: Arc::new(certified),
            fingerprint,
        })
    }
}

impl ListenerTls {
    /// What the certificate and key files hold now, to compare with what was loaded; `None`
    /// while either cannot be read (mid-rotation, say).
    pub async fn files_fingerprint(&self) -> Option<[u8; 32]> {
        let cert = tokio::fs::read(&self.cert_path).await.ok()?;
        let key = tokio::fs::read(&self.key_path).await.ok()?;
        Some(fingerprint(&cert, &key))
    }

    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }
}

fn fingerprint(cert_pem: &[u8], key_pem: &[u8]) -> [u8; 32] {
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    digest.update(cert_pem);
    digest.update(key_pem);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.finish().as_ref());
    out
}

/// CA certificates trusted on top of the system's, for HTTPS to backends, the identity
/// endpoint and the trace collector.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ExtraCa {
    pub path: Option<PathBuf>,
    pub certs: Vec<CertificateDer<'static>>,
}

impl fmt::Debug for ExtraCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ExtraCa({:?}, {} certificates)",
            self.path,
            self.certs.len()
        )
    }
}

impl ExtraCa {
    pub fn load(path: &str, field: &str) -> Result<ExtraCa, ConfigError> {
        let pem = read(path, field)?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                ConfigError::field(field, format!("{path}: not a PEM certificate: {e}"))
            })?;
        if certs.is_empty() {
            return Err(ConfigError::field(
                field,
                format!("{path}: no CERTIFICATE block found"),
            ));
        }
        // A file that parses as PEM but is no CA certificate is refused now, not at the first
        // handshake.
        let mut store = rustls::RootCertStore::empty();
        for c in &certs {
            store.add(c.clone()).map_err(|e| {
                ConfigError::field(field, format!("{path}: unusable CA certificate: {e}"))
            })?;
        }
        Ok(ExtraCa {
            path: Some(Path::new(path).to_path_buf()),
            certs,
        })
    }
}
