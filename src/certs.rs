//! `picotun certs`: a CA and a webhook serving certificate for clusters without cert-manager
//! (and for local runs), written as PEM files; prints the caBundle for the webhook configuration.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

#[derive(Clone, Debug, clap::Args)]
pub struct CertsArgs {
    /// Where to write ca.crt, ca.key, tls.crt and tls.key.
    #[arg(long, default_value = "webhook-certs")]
    pub out_dir: PathBuf,
    /// The webhook Service's name and namespace (the certificate covers its in-cluster DNS names).
    #[arg(long, default_value = "picotun-webhook")]
    pub service: String,
    #[arg(long, default_value = "pico-sh-system")]
    pub namespace: String,
    /// Extra IP addresses (127.0.0.1 is always included, for local runs).
    #[arg(long = "ip")]
    pub ips: Vec<IpAddr>,
    /// Validity of the serving certificate, in days (the CA gets ten times as long).
    #[arg(long, default_value_t = 365)]
    pub days: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// The DNS names the apiserver may use for a webhook Service.
pub fn service_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_string(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

/// Generates and writes the files; returns the caBundle (base64 of the CA's PEM).
pub fn generate(args: &CertsArgs) -> Result<String, CertsError> {
    let now = time::OffsetDateTime::now_utc();
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name.push(DnType::CommonName, "picotun webhook CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_before = now - time::Duration::hours(1);
    ca_params.not_after = now + time::Duration::days(i64::from(args.days) * 10);
    let ca_key = KeyPair::generate()?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key)?;

    let mut params = CertificateParams::new(service_names(&args.service, &args.namespace))?;
    params.distinguished_name.push(DnType::CommonName, format!("{}.{}.svc", args.service, args.namespace));
    let mut ips = vec![IpAddr::from([127, 0, 0, 1])];
    ips.extend(args.ips.iter().copied());
    params.subject_alt_names.extend(ips.into_iter().map(SanType::IpAddress));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(args.days));
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca)?;

    std::fs::create_dir_all(&args.out_dir)
        .map_err(|source| CertsError::Write { path: args.out_dir.clone(), source })?;
    let write = |name: &str, contents: &str, private: bool| -> Result<(), CertsError> {
        let path = args.out_dir.join(name);
        std::fs::write(&path, contents).map_err(|source| CertsError::Write { path: path.clone(), source })?;
        if private {
            restrict(&path).map_err(|source| CertsError::Write { path, source })?;
        }
        Ok(())
    };
    write("ca.crt", &ca.pem(), false)?;
    write("ca.key", &ca_key_pem, true)?;
    write("tls.crt", &cert.pem(), false)?;
    write("tls.key", &key.serialize_pem(), true)?;
    Ok(base64::engine::general_purpose::STANDARD.encode(ca.pem()))
}

fn restrict(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_chain_the_webhook_accepts() {
        let dir = tempfile_dir();
        let args = CertsArgs {
            out_dir: dir.clone(),
            service: "picotun-webhook".into(),
            namespace: "pico-sh-system".into(),
            ips: vec![],
            days: 30,
        };
        let bundle = generate(&args).unwrap();
        let ca = base64::engine::general_purpose::STANDARD.decode(bundle).unwrap();
        assert!(String::from_utf8(ca).unwrap().starts_with("-----BEGIN CERTIFICATE-----"));
        // The serving pair loads as the webhook loads it.
        let cert = crate::webhook::tls::ReloadingCert::new(dir.join("tls.crt"), dir.join("tls.key"));
        assert!(cert.reload().unwrap());
        assert!(cert.is_valid());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(dir.join("tls.key")).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("picotun-certs-{}-{}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
