//! SSH user certificates: the CA picotun signs each sidecar's own key with, and the checks both
//! ends make. Pure (no I/O, no clock: callers pass "now").
//!
//! pico.sh trusts a CA public key its account admin registered; a certificate signed by it with
//! the principal `tuns` may open tunnels and nothing else of the account, for the validity it
//! names, and its key id (`namespace/pod`) appears in pico's access log. So no pod ever holds the
//! account key: each sidecar makes an ed25519 key in memory and asks for a short certificate.

use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::{LineEnding, PublicKey};
use russh::keys::{Algorithm, Certificate, HashAlg, PrivateKey};

/// The principal pico.sh grants tunnels (and only tunnels) to.
pub const TUNS_PRINCIPAL: &str = "tuns";
/// Certificates are valid from a little before they were made: the server's clock may be behind.
pub const CLOCK_SKEW_SECONDS: u64 = 300;
/// The one extension a remote-forwarding certificate needs (OpenSSH checks it for `-R`).
pub const PORT_FORWARDING_EXTENSION: &str = "permit-port-forwarding";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CaError {
    #[error(
        "the SSH CA key is not an unencrypted OpenSSH ed25519 private key ({0}); make one with `picotun ca create` \
         or `ssh-keygen -t ed25519 -N '' -f ca`"
    )]
    Unusable(String),
    #[error("the SSH CA key is {0}, not ed25519; picotun signs with ed25519 CA keys only")]
    NotEd25519(String),
    #[error("the public key to certify is not an OpenSSH public key line ({0}); send `ssh-ed25519 AAAA...`")]
    BadPublicKey(String),
    #[error("the public key to certify is {0}; picotun certifies ed25519 keys only")]
    SubjectNotEd25519(String),
    #[error("a certificate needs at least one principal")]
    NoPrincipal,
    #[error("a certificate's validity must be longer than zero seconds")]
    NoValidity,
    #[error("cannot sign the certificate: {0}")]
    Sign(String),
}

/// What a certificate says: who (key id), as what (principals), for how long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertRequest {
    pub key_id: String,
    pub principals: Vec<String>,
    pub validity_seconds: u64,
}

/// A CA: an ed25519 key pair held in memory. Its Debug prints the fingerprint only.
pub struct SshCa {
    key: PrivateKey,
}

impl std::fmt::Debug for SshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshCa").field("fingerprint", &self.fingerprint()).finish()
    }
}

impl SshCa {
    /// A new CA key from 32 random bytes.
    pub fn from_seed(seed: &[u8; 32], comment: &str) -> SshCa {
        let mut key = PrivateKey::from(Ed25519Keypair::from_seed(seed));
        key.set_comment(comment);
        SshCa { key }
    }

    /// A new CA key from the operating system's randomness.
    pub fn generate(comment: &str) -> SshCa {
        let mut seed = [0u8; 32];
        rand::Rng::fill(&mut rand::rng(), &mut seed);
        SshCa::from_seed(&seed, comment)
    }

    /// Reads an OpenSSH private key (`-----BEGIN OPENSSH PRIVATE KEY-----`). The error never
    /// quotes the input.
    pub fn from_openssh(text: &str) -> Result<SshCa, CaError> {
        let key = PrivateKey::from_openssh(text.trim()).map_err(|e| CaError::Unusable(error_kind(&e)))?;
        if key.is_encrypted() {
            return Err(CaError::Unusable("it is encrypted".into()));
        }
        if key.algorithm() != Algorithm::Ed25519 {
            return Err(CaError::NotEd25519(key.algorithm().to_string()));
        }
        Ok(SshCa { key })
    }

    /// The private key in OpenSSH form, for the Secret that holds it.
    pub fn to_openssh(&self) -> String {
        self.key.to_openssh(LineEnding::LF).expect("an ed25519 key encodes").to_string()
    }

    /// `ssh-ed25519 AAAA... comment`: what the account admin registers with pico.sh.
    pub fn public_line(&self) -> String {
        self.key.public_key().to_openssh().expect("an ed25519 public key encodes")
    }

    /// `SHA256:...` of the public key, safe to log.
    pub fn fingerprint(&self) -> String {
        self.key.public_key().fingerprint(HashAlg::Sha256).to_string()
    }

    /// Signs a user certificate for `subject` (an OpenSSH public key line), valid from
    /// [`CLOCK_SKEW_SECONDS`] before `now` for `validity_seconds` after it, permitting port
    /// forwarding only.
    pub fn sign(&self, subject: &str, request: &CertRequest, now: u64) -> Result<Certificate, CaError> {
        let subject = parse_public_key(subject)?;
        if subject.algorithm() != Algorithm::Ed25519 {
            return Err(CaError::SubjectNotEd25519(subject.algorithm().to_string()));
        }
        if request.principals.is_empty() {
            return Err(CaError::NoPrincipal);
        }
        if request.validity_seconds == 0 {
            return Err(CaError::NoValidity);
        }
        let mut nonce = [0u8; 32];
        rand::Rng::fill(&mut rand::rng(), &mut nonce);
        let mut serial = [0u8; 8];
        rand::Rng::fill(&mut rand::rng(), &mut serial);
        let sign_error = |e: russh::keys::ssh_key::Error| CaError::Sign(e.to_string());
        let mut builder = Builder::new(
            nonce.to_vec(),
            subject.key_data().clone(),
            now.saturating_sub(CLOCK_SKEW_SECONDS),
            now.saturating_add(request.validity_seconds),
        )
        .map_err(sign_error)?;
        builder.serial(u64::from_be_bytes(serial)).map_err(sign_error)?;
        builder.cert_type(CertType::User).map_err(sign_error)?;
        builder.key_id(request.key_id.clone()).map_err(sign_error)?;
        for principal in &request.principals {
            builder.valid_principal(principal.clone()).map_err(sign_error)?;
        }
        builder.extension(PORT_FORWARDING_EXTENSION, "").map_err(sign_error)?;
        builder.comment(request.key_id.clone()).map_err(sign_error)?;
        builder.sign(&self.key).map_err(sign_error)
    }

    /// Whether `cert` was signed by this CA and is valid at `now`.
    pub fn verify(&self, cert: &Certificate, now: u64) -> bool {
        let fingerprint = self.key.public_key().fingerprint(HashAlg::Sha256);
        cert.validate_at(now, [&fingerprint]).is_ok()
    }
}

/// An OpenSSH public key line (`ssh-ed25519 AAAA... [comment]`).
pub fn parse_public_key(line: &str) -> Result<PublicKey, CaError> {
    PublicKey::from_openssh(line.trim()).map_err(|e| CaError::BadPublicKey(error_kind(&e)))
}

/// A certificate line (`ssh-ed25519-cert-v01@openssh.com AAAA... [comment]`).
pub fn parse_certificate(line: &str) -> Result<Certificate, String> {
    Certificate::from_openssh(line.trim()).map_err(|e| format!("not an OpenSSH certificate ({})", error_kind(&e)))
}

/// The certificate as one OpenSSH line.
pub fn certificate_line(cert: &Certificate) -> String {
    cert.to_openssh().expect("a signed certificate encodes")
}

/// The kind of a key-parsing error, without anything of the input it may quote.
fn error_kind(e: &russh::keys::ssh_key::Error) -> String {
    let text = format!("{e:?}");
    text.split(['(', '{', ' ']).next().unwrap_or("unknown").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_790_000_000;

    fn subject() -> (PrivateKey, String) {
        let key = PrivateKey::from(Ed25519Keypair::from_seed(&[7; 32]));
        let line = key.public_key().to_openssh().unwrap();
        (key, line)
    }

    fn request(validity: u64) -> CertRequest {
        CertRequest {
            key_id: "team-a/web-0".into(),
            principals: vec![TUNS_PRINCIPAL.into()],
            validity_seconds: validity,
        }
    }

    #[test]
    fn a_signed_certificate_says_who_as_what_and_until_when() {
        let ca = SshCa::from_seed(&[1; 32], "picotun-ca");
        let (key, line) = subject();
        let cert = ca.sign(&line, &request(3600), NOW).unwrap();
        assert_eq!(cert.key_id(), "team-a/web-0");
        assert_eq!(cert.valid_principals(), [TUNS_PRINCIPAL.to_string()]);
        assert_eq!(cert.valid_after(), NOW - CLOCK_SKEW_SECONDS);
        assert_eq!(cert.valid_before(), NOW + 3600);
        assert_eq!(cert.cert_type(), CertType::User);
        assert_eq!(cert.public_key(), key.public_key().key_data());
        assert!(cert.extensions().contains_key(PORT_FORWARDING_EXTENSION));
        assert!(ca.verify(&cert, NOW));
        assert!(!ca.verify(&cert, NOW + 3601), "expired");
        let other = SshCa::from_seed(&[2; 32], "other");
        assert!(!other.verify(&cert, NOW), "another CA's");
        // The line round-trips.
        let again = parse_certificate(&certificate_line(&cert)).unwrap();
        assert_eq!(again, cert);
    }

    #[test]
    fn the_ca_key_round_trips_and_bad_keys_say_what_to_fix_without_quoting_them() {
        let ca = SshCa::from_seed(&[3; 32], "picotun-ca");
        let text = ca.to_openssh();
        assert!(text.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
        let again = SshCa::from_openssh(&text).unwrap();
        assert_eq!(again.public_line(), ca.public_line());
        assert!(ca.public_line().starts_with("ssh-ed25519 "));
        assert!(format!("{ca:?}").contains("SHA256:"), "Debug shows the fingerprint");
        assert!(!format!("{ca:?}").contains("PRIVATE"));

        let secret_looking =
            "-----BEGIN OPENSSH PRIVATE KEY-----\nc2VjcmV0LXNlY3JldA==\n-----END OPENSSH PRIVATE KEY-----";
        let err = SshCa::from_openssh(secret_looking).unwrap_err().to_string();
        assert!(err.contains("picotun ca create"), "{err}");
        assert!(!err.contains("c2VjcmV0"), "{err}");
    }

    #[test]
    fn only_ed25519_subjects_principals_and_a_validity_are_signed() {
        let ca = SshCa::from_seed(&[4; 32], "picotun-ca");
        let (_, line) = subject();
        assert!(matches!(ca.sign("not a key", &request(60), NOW), Err(CaError::BadPublicKey(_))));
        let none = CertRequest { principals: vec![], ..request(60) };
        assert_eq!(ca.sign(&line, &none, NOW).unwrap_err(), CaError::NoPrincipal);
        assert_eq!(ca.sign(&line, &request(0), NOW).unwrap_err(), CaError::NoValidity);
        let ecdsa = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBEnYv9sjpD2gsJO9Pz4bYm0Ahtd0tMt0Fth+2oAQkw8nDzdLxbg16fBJKsgdCUWgEmqsJ9p1KLuWjKKtrD4QIAM=";
        assert!(matches!(ca.sign(ecdsa, &request(60), NOW), Err(CaError::SubjectNotEd25519(_))));
    }
}
