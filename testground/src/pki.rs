//! Certificates generated in-process: one throwaway CA per ground, serving certificates for the
//! apiserver and for webhooks the tests start, and client certificates for kubeconfigs.

use std::net::IpAddr;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::Error;

/// A PEM certificate and its PEM (PKCS#8) private key.
#[derive(Clone)]
pub struct CertAndKey {
    pub cert_pem: String,
    pub key_pem: String,
}

impl CertAndKey {
    /// Writes `<stem>.crt` and `<stem>.key` into `dir` and returns their paths.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<(std::path::PathBuf, std::path::PathBuf), Error> {
        let cert = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        crate::write_file(&cert, &self.cert_pem)?;
        crate::write_file(&key, &self.key_pem)?;
        Ok((cert, key))
    }
}

impl std::fmt::Debug for CertAndKey {
    // Key material stays out of test output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAndKey").finish_non_exhaustive()
    }
}

/// What a leaf certificate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
}

/// A self-signed certificate authority.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(common_name: &str) -> Result<Self, Error> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(pki_err)?;
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().map_err(pki_err)?;
        let issuer = CertifiedIssuer::self_signed(params, key).map_err(pki_err)?;
        Ok(Self { issuer })
    }

    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// Issues a leaf certificate. `names` become DNS SANs, `ips` IP SANs; `organizations` end up
    /// as O= entries (Kubernetes reads them as groups).
    pub fn issue(
        &self,
        common_name: &str,
        names: &[&str],
        ips: &[IpAddr],
        organizations: &[&str],
        usage: Usage,
    ) -> Result<CertAndKey, Error> {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).map_err(pki_err)?;
        params.subject_alt_names.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.distinguished_name.push(DnType::CommonName, common_name);
        for org in organizations {
            params.distinguished_name.push(DnType::OrganizationName, *org);
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![match usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        let key = KeyPair::generate().map_err(pki_err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(pki_err)?;
        Ok(CertAndKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// A serving certificate for loopback: DNS `localhost` plus `extra_names`, IP 127.0.0.1.
    pub fn issue_loopback_server(&self, extra_names: &[&str]) -> Result<CertAndKey, Error> {
        let mut names = vec!["localhost"];
        names.extend_from_slice(extra_names);
        self.issue("localhost", &names, &[IpAddr::from([127, 0, 0, 1])], &[], Usage::Server)
    }
}

/// A fresh key pair as (PKCS#8 private key PEM, SubjectPublicKeyInfo PEM), e.g. for
/// service-account token signing.
pub fn key_pair_pem() -> Result<(String, String), Error> {
    let key = KeyPair::generate().map_err(pki_err)?;
    Ok((key.serialize_pem(), key.public_key_pem()))
}

fn pki_err(e: rcgen::Error) -> Error {
    Error::Pki(e.to_string())
}
