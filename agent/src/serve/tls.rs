//! `--metrics-tls-cert` / `--metrics-tls-key`: TLS on the metrics listener, so the
//! bearer tokens `--metrics-auth` checks do not cross the node network in clear.
//!
//! The certificate and key (PEM) are read at start (a bad file fails fast, naming
//! the flag) and read again when either file's modification time changes, checked
//! on each new connection: a rotated certificate (cert-manager, a projected
//! Secret) is served without a restart. A rotation that does not parse keeps the
//! previous pair and is logged.
//!
//! Must not: serve plain HTTP on a TLS listener, or ask for client certificates
//! (callers authenticate with bearer tokens).
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--metrics-tls-cert {path}: {source}")]
    Cert {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("--metrics-tls-cert {path}: no certificate in the file")]
    NoCert { path: PathBuf },
    #[error("--metrics-tls-key {path}: {source}")]
    Key {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("--metrics-tls-cert {cert} with --metrics-tls-key {key}: {source}")]
    Config {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// The listener's TLS: the current acceptor, reloaded when the files change.
pub struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    current: Mutex<Loaded>,
}

struct Loaded {
    stamps: (Option<SystemTime>, Option<SystemTime>),
    acceptor: TlsAcceptor,
}

impl TlsFiles {
    /// Reads and checks both files now.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let stamps = stamps(cert, key);
        let acceptor = acceptor(cert, key)?;
        Ok(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: Mutex::new(Loaded { stamps, acceptor }),
        })
    }

    /// The acceptor for a new connection: reloaded first if a file changed.
    pub fn acceptor(&self) -> TlsAcceptor {
        let stamps = stamps(&self.cert, &self.key);
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if stamps != current.stamps {
            // Tried once per change: a broken rotation is not re-read on every
            // connection, and the previous pair keeps serving.
            current.stamps = stamps;
            match acceptor(&self.cert, &self.key) {
                Ok(acceptor) => {
                    tracing::info!(cert = %self.cert.display(), "reloaded the metrics TLS certificate");
                    current.acceptor = acceptor;
                }
                Err(error) => {
                    tracing::warn!(%error, "the metrics TLS certificate changed but does not load; serving the previous one");
                }
            }
        }
        current.acceptor.clone()
    }
}

fn stamps(cert: &Path, key: &Path) -> (Option<SystemTime>, Option<SystemTime>) {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    (modified(cert), modified(key))
}

fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|source| TlsError::Cert {
            path: cert.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCert {
            path: cert.to_owned(),
        });
    }
    let private_key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Key {
        path: key.to_owned(),
        source,
    })?;
    let config_error = |source: rustls::Error| TlsError::Config {
        cert: cert.to_owned(),
        key: key.to_owned(),
        source,
    };
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(config_error)?
    .with_no_client_auth()
    .with_single_cert(certs, private_key)
    .map_err(config_error)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
