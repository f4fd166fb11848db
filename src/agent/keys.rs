//! The client key the agent authenticates with: ed25519, ECDSA or RSA, in OpenSSH or PEM
//! (PKCS#1, PKCS#8) form, optionally encrypted with a passphrase read from its own file.
//! Key material never reaches a log line or an error message.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use russh::keys::{HashAlg, PrivateKey};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the SSH key file {path}: {source} (mount the tunnel key Secret there)")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot read the passphrase file {path}: {source}")]
    ReadPassphrase { path: PathBuf, source: std::io::Error },
    #[error("the SSH key {path} is encrypted: give its passphrase with --key-passphrase-file")]
    NeedsPassphrase { path: PathBuf },
    #[error("the SSH key {path} could not be decrypted: wrong passphrase?")]
    WrongPassphrase { path: PathBuf },
    #[error(
        "{path} is not a private key picotun can use ({reason}); expected an OpenSSH (`ssh-keygen -t ed25519`) or \
         PEM/PKCS#8 ed25519, ECDSA or RSA private key"
    )]
    Unusable { path: PathBuf, reason: String },
}

/// Loads the key. The error says what to fix and never quotes the file.
pub fn load(path: &Path, passphrase_file: Option<&Path>) -> Result<Arc<PrivateKey>, KeyError> {
    let (text, passphrase) = read(path, passphrase_file)?;
    decode(path, &text, passphrase.as_deref())
}

/// The key file's text and the passphrase (without its line end), as they are now.
pub fn read(path: &Path, passphrase_file: Option<&Path>) -> Result<(String, Option<String>), KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read { path: path.to_path_buf(), source })?;
    let passphrase = passphrase_file
        .map(|p| {
            std::fs::read_to_string(p)
                .map(|s| s.trim_end_matches(['\r', '\n']).to_string())
                .map_err(|source| KeyError::ReadPassphrase { path: p.to_path_buf(), source })
        })
        .transpose()?;
    Ok((text, passphrase))
}

/// Decodes key text read from `path` (named in errors, which never quote the text).
pub fn decode(path: &Path, text: &str, passphrase: Option<&str>) -> Result<Arc<PrivateKey>, KeyError> {
    let encrypted = text.contains("ENCRYPTED") || is_encrypted_openssh(text);
    match russh::keys::decode_secret_key(text, passphrase) {
        Ok(key) => Ok(Arc::new(key)),
        Err(_) if encrypted && passphrase.is_none() => Err(KeyError::NeedsPassphrase { path: path.to_path_buf() }),
        Err(_) if encrypted => Err(KeyError::WrongPassphrase { path: path.to_path_buf() }),
        // The error's Display can quote input; keep only its kind.
        Err(e) => Err(KeyError::Unusable { path: path.to_path_buf(), reason: error_kind(&e) }),
    }
}

/// The SHA256 fingerprint of the key's public half, safe to log.
pub fn fingerprint(key: &PrivateKey) -> String {
    key.public_key().fingerprint(HashAlg::Sha256).to_string()
}

fn is_encrypted_openssh(text: &str) -> bool {
    // An unencrypted OpenSSH key names cipher "none" right after the magic; encrypted ones name
    // aes256-ctr and friends. Checking for the cipher name avoids decoding the key twice.
    use base64::Engine;
    let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(body.trim()) else { return false };
    raw.starts_with(b"openssh-key-v1\0") && raw.get(19..23).is_none_or(|c| c != b"none")
}

fn error_kind(e: &russh::keys::Error) -> String {
    let text = format!("{e:?}");
    text.split(['(', '{', ' ']).next().unwrap_or("unknown").to_string()
}
