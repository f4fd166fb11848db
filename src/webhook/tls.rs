//! The webhook's serving certificate, read from files (a cert-manager Secret mounted into the pod,
//! or `webhook-certs/`) and swapped in place when the files change: each TLS handshake takes the
//! current certificate, so rotation needs no restart and fails no request.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no usable PEM private key")]
    NoKey { path: PathBuf },
    #[error("the certificate and key do not belong together (or are unsupported): {0}")]
    Mismatch(String),
    #[error("cannot read the certificate's validity: {0}")]
    Validity(String),
}

struct Loaded {
    key: Arc<CertifiedKey>,
    not_after: i64,
    raw: (Vec<u8>, Vec<u8>),
}

/// A certificate that follows its files.
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Option<Loaded>>,
}

impl std::fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCert").field("cert_path", &self.cert_path).finish_non_exhaustive()
    }
}

impl ReloadingCert {
    pub fn new(cert_path: PathBuf, key_path: PathBuf) -> Self {
        ReloadingCert { cert_path, key_path, current: RwLock::new(None) }
    }

    /// Loads the files if they changed. Ok(true) when a new certificate took effect.
    pub fn reload(&self) -> Result<bool, CertError> {
        let read = |p: &PathBuf| std::fs::read(p).map_err(|source| CertError::Read { path: p.clone(), source });
        let raw = (read(&self.cert_path)?, read(&self.key_path)?);
        if self.current.read().unwrap_or_else(|p| p.into_inner()).as_ref().is_some_and(|l| l.raw == raw) {
            return Ok(false);
        }
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&raw.0).filter_map(Result::ok).collect();
        if certs.is_empty() {
            return Err(CertError::NoCertificate { path: self.cert_path.clone() });
        }
        let key =
            PrivateKeyDer::from_pem_slice(&raw.1).map_err(|_| CertError::NoKey { path: self.key_path.clone() })?;
        let provider = rustls::crypto::ring::default_provider();
        let not_after = not_after(&certs[0])?;
        let certified =
            CertifiedKey::from_der(certs, key, &provider).map_err(|e| CertError::Mismatch(e.to_string()))?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) =
            Some(Loaded { key: Arc::new(certified), not_after, raw });
        Ok(true)
    }

    /// Unix seconds when the current certificate expires.
    pub fn not_after(&self) -> Option<i64> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).as_ref().map(|l| l.not_after)
    }

    /// True while a certificate is loaded and not expired.
    pub fn is_valid(&self) -> bool {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        self.not_after().is_some_and(|t| t > now)
    }

    /// Polls the files every `every`; a broken replacement keeps the previous certificate.
    pub async fn watch(self: Arc<Self>, every: Duration, on_change: impl Fn(&Self) + Send + 'static) {
        loop {
            tokio::time::sleep(every).await;
            match self.reload() {
                Ok(true) => {
                    info!(cert = %self.cert_path.display(), not_after = self.not_after(), "serving certificate reloaded");
                    on_change(&self);
                }
                Ok(false) => {}
                Err(e) => {
                    warn!(error = %e, "serving certificate files changed but cannot be used; keeping the previous one")
                }
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).as_ref().map(|l| l.key.clone())
    }
}

fn not_after(cert: &CertificateDer<'_>) -> Result<i64, CertError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| CertError::Validity(e.to_string()))?;
    Ok(parsed.validity().not_after.timestamp())
}
