//! HTTPS for the listener: rustls with HTTP/2 and HTTP/1.1 offered via ALPN, the certificate
//! chain and key read from PEM files. The active configuration can be swapped while serving
//! (`reload`, on SIGHUP or when the files change): new connections get the new certificate,
//! established ones keep theirs, and files that fail to load never replace a working setup.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read TLS certificate file {0}: {1}")]
    Cert(String, String),
    #[error("cannot read TLS key file {0}: {1}")]
    Key(String, String),
    #[error("TLS certificate file {0} holds no certificate")]
    NoCert(String),
    #[error("the TLS certificate and key do not work together: {0}")]
    Config(String),
}

pub struct Tls {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<TlsAcceptor>,
    /// Modification times of the files the current configuration came from.
    loaded_from: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn build(cert_file: &Path, key_file: &Path) -> Result<TlsAcceptor, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| TlsError::Cert(cert_file.display().to_string(), e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Cert(cert_file.display().to_string(), e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCert(cert_file.display().to_string()));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| TlsError::Key(key_file.display().to_string(), e.to_string()))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

impl Tls {
    pub fn load(config: &TlsConfig) -> Result<Self, TlsError> {
        let stamps = (modified(&config.cert_file), modified(&config.key_file));
        let acceptor = build(&config.cert_file, &config.key_file)?;
        Ok(Self {
            cert_file: config.cert_file.clone(),
            key_file: config.key_file.clone(),
            current: RwLock::new(acceptor),
            loaded_from: Mutex::new(stamps),
        })
    }

    /// The acceptor for a new connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-reads the files. On error the current configuration stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamps = (modified(&self.cert_file), modified(&self.key_file));
        let acceptor = build(&self.cert_file, &self.key_file)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = acceptor;
        *self.loaded_from.lock().unwrap_or_else(|p| p.into_inner()) = stamps;
        Ok(())
    }

    /// Reloads if either file changed since the last load. `Ok(true)` if it reloaded.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = (modified(&self.cert_file), modified(&self.key_file));
        {
            let mut seen = self.loaded_from.lock().unwrap_or_else(|p| p.into_inner());
            if *seen == now {
                return Ok(false);
            }
            // Remember this state even if it fails to load: retry when the files change again,
            // not on every check.
            *seen = now;
        }
        self.reload().map(|()| true)
    }
}
