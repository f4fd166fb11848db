//! Which server host keys the agent trusts. Checked by default: tuns.sh's published key is built
//! in, a known_hosts file can be given, and turning the check off takes an explicit flag.

use std::path::{Path, PathBuf};

use base64::Engine;
use hmac::{Hmac, Mac};
use russh::keys::{HashAlg, PublicKey};
use sha1::Sha1;

/// pico.sh's published host key for tuns.sh (and, as far as is known, its regional hosts).
pub const TUNS_SH_HOST_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMiaQvp2pHxvQFzYYkv4+MIsP2Kh47gL00IZD/tLOMqy";

#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    #[error("cannot read known_hosts file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "{path} has no usable key for {host_port}; add one with `ssh-keyscan -p {port} {host} >> {path}` (check it \
         against the fingerprint your provider publishes)"
    )]
    NoEntry { path: PathBuf, host_port: String, host: String, port: u16 },
    #[error(
        "no host key to check {host}:{port} against: pass --known-hosts FILE (e.g. from `ssh-keyscan -p {port} {host}`), \
         or --insecure-skip-host-key-check to connect to whoever answers"
    )]
    NoPin { host: String, port: u16 },
}

/// The host keys a connection accepts.
#[derive(Clone, Debug)]
pub enum HostKeyPolicy {
    Pinned {
        keys: Vec<PublicKey>,
        source: String,
    },
    /// Accept any key (logged as a warning on every connect).
    Insecure,
}

impl HostKeyPolicy {
    pub fn resolve(host: &str, port: u16, known_hosts: Option<&Path>, insecure: bool) -> Result<Self, HostKeyError> {
        if insecure {
            return Ok(HostKeyPolicy::Insecure);
        }
        if let Some(path) = known_hosts {
            let text = std::fs::read_to_string(path)
                .map_err(|source| HostKeyError::Read { path: path.to_path_buf(), source })?;
            return Self::from_text(&text, &path.display().to_string(), host, port);
        }
        if host == "tuns.sh" || host.ends_with(".tuns.sh") {
            let key = parse_key_line(TUNS_SH_HOST_KEY).expect("the built-in tuns.sh key parses");
            return Ok(HostKeyPolicy::Pinned { keys: vec![key], source: "built-in tuns.sh key".into() });
        }
        Err(HostKeyError::NoPin { host: host.to_string(), port })
    }

    /// Pins the keys known_hosts `text` (from `source`) holds for `host:port`.
    pub fn from_text(text: &str, source: &str, host: &str, port: u16) -> Result<Self, HostKeyError> {
        let keys = keys_for(text, host, port);
        if keys.is_empty() {
            return Err(HostKeyError::NoEntry {
                path: PathBuf::from(source),
                host_port: host_port(host, port),
                host: host.to_string(),
                port,
            });
        }
        Ok(HostKeyPolicy::Pinned { keys, source: source.to_string() })
    }

    /// True if `presented` is acceptable.
    pub fn accepts(&self, presented: &PublicKey) -> bool {
        match self {
            HostKeyPolicy::Insecure => true,
            HostKeyPolicy::Pinned { keys, .. } => keys.iter().any(|k| k.key_data() == presented.key_data()),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            HostKeyPolicy::Insecure => "host key check DISABLED".into(),
            HostKeyPolicy::Pinned { keys, source } => format!(
                "{} pinned key(s) from {source}: {}",
                keys.len(),
                keys.iter().map(fingerprint).collect::<Vec<_>>().join(", ")
            ),
        }
    }
}

pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

fn host_port(host: &str, port: u16) -> String {
    if port == 22 { host.to_string() } else { format!("[{host}]:{port}") }
}

/// `algo base64 [comment]` -> key.
fn parse_key_line(line: &str) -> Option<PublicKey> {
    let mut parts = line.split_whitespace();
    let _algo = parts.next()?;
    russh::keys::parse_public_key_base64(parts.next()?).ok()
}

/// The keys a known_hosts text holds for `host:port`: plain and hashed (`|1|salt|hash`) host
/// patterns, `*`/`?` wildcards and `!` negations; `@revoked` lines remove a key, `@cert-authority`
/// lines are skipped (certificates are not used here).
pub fn keys_for(text: &str, host: &str, port: u16) -> Vec<PublicKey> {
    let target = host_port(host, port);
    let mut keys = Vec::new();
    let mut revoked = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace().peekable();
        let marker = fields.next_if(|f| f.starts_with('@'));
        let (Some(patterns), Some(rest)) = (fields.next(), Some(fields.collect::<Vec<_>>().join(" "))) else {
            continue;
        };
        if !patterns_match(patterns, &target) {
            continue;
        }
        let Some(key) = parse_key_line(&rest) else { continue };
        match marker {
            None => keys.push(key),
            Some("@revoked") => revoked.push(key),
            Some(_) => {}
        }
    }
    keys.retain(|k| !revoked.iter().any(|r| r.key_data() == k.key_data()));
    keys
}

fn patterns_match(patterns: &str, target: &str) -> bool {
    let mut matched = false;
    for pattern in patterns.split(',') {
        if let Some(negated) = pattern.strip_prefix('!') {
            if wildcard(negated, target) {
                return false;
            }
        } else if pattern.starts_with("|1|") {
            matched |= hashed_match(pattern, target);
        } else {
            matched |= wildcard(pattern, target);
        }
    }
    matched
}

fn hashed_match(pattern: &str, target: &str) -> bool {
    let mut parts = pattern.trim_start_matches("|1|").split('|');
    let engine = base64::engine::general_purpose::STANDARD;
    let (Some(Ok(salt)), Some(Ok(hash))) =
        (parts.next().map(|s| engine.decode(s)), parts.next().map(|h| engine.decode(h)))
    else {
        return false;
    };
    let Ok(mac) = Hmac::<Sha1>::new_from_slice(&salt) else { return false };
    mac.chain_update(target.as_bytes()).verify_slice(&hash).is_ok()
}

/// OpenSSH-style glob: `*` any run, `?` one character; case-insensitive.
fn wildcard(pattern: &str, text: &str) -> bool {
    fn go(p: &[u8], t: &[u8]) -> bool {
        match (p.first(), t.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], t) || (!t.is_empty() && go(p, &t[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &t[1..]),
            (Some(a), Some(b)) if a.eq_ignore_ascii_case(b) => go(&p[1..], &t[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMiaQvp2pHxvQFzYYkv4+MIsP2Kh47gL00IZD/tLOMqy";
    // Another ed25519 public key (made for this test).
    const KEY_B: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMOJ8QDMFtzg91CsXPd/hX4RUr3VBGhiqeSLuq60Kh7L";

    #[test]
    fn builtin_tuns_key_is_pinned_for_tuns_hosts() {
        for host in ["tuns.sh", "nue.tuns.sh", "ash.tuns.sh"] {
            let p = HostKeyPolicy::resolve(host, 22, None, false).unwrap();
            assert!(p.accepts(&parse_key_line(KEY_A).unwrap()), "{host}");
            assert!(!p.accepts(&parse_key_line(KEY_B).unwrap()), "{host}");
            assert!(p.describe().contains("SHA256:DCOhxF0YDQoIsNONS164OHPrKzJTpEdiRr57YCyuxio"), "{}", p.describe());
        }
    }

    #[test]
    fn other_hosts_need_a_pin_or_an_explicit_opt_out() {
        let err = HostKeyPolicy::resolve("example.com", 2222, None, false).unwrap_err().to_string();
        assert!(err.contains("--known-hosts") && err.contains("ssh-keyscan -p 2222 example.com"), "{err}");
        assert!(
            HostKeyPolicy::resolve("example.com", 2222, None, true).unwrap().accepts(&parse_key_line(KEY_B).unwrap())
        );
    }

    #[test]
    fn known_hosts_plain_ports_wildcards_negation_revocation() {
        let text = format!(
            "# comment\n\
             [127.0.0.1]:2222 {KEY_A}\n\
             127.0.0.1 {KEY_B}\n\
             *.example.com,!bad.example.com {KEY_B} comment here\n\
             @revoked * {KEY_A}\n"
        );
        assert!(keys_for(&text, "127.0.0.1", 2222).is_empty(), "revoked everywhere");
        let text_no_revoke = text.replace("@revoked", "#");
        assert_eq!(keys_for(&text_no_revoke, "127.0.0.1", 2222).len(), 1);
        assert_eq!(keys_for(&text_no_revoke, "127.0.0.1", 22).len(), 1);
        assert_eq!(keys_for(&text_no_revoke, "a.example.com", 22).len(), 1);
        assert!(keys_for(&text_no_revoke, "bad.example.com", 22).is_empty());
        assert!(keys_for(&text_no_revoke, "example.org", 22).is_empty());
    }

    #[test]
    fn known_hosts_hashed_entries() {
        // `ssh-keygen -H` form for "[127.0.0.1]:2222" with a fixed salt.
        let salt = [7u8; 20];
        let mac =
            Hmac::<Sha1>::new_from_slice(&salt).unwrap().chain_update(b"[127.0.0.1]:2222").finalize().into_bytes();
        let e = base64::engine::general_purpose::STANDARD;
        let text = format!("|1|{}|{} {KEY_A}\n", e.encode(salt), e.encode(mac));
        assert_eq!(keys_for(&text, "127.0.0.1", 2222).len(), 1);
        assert!(keys_for(&text, "127.0.0.1", 2223).is_empty());
    }

    #[test]
    fn known_hosts_file_errors_say_what_to_do() {
        let dir = std::env::temp_dir().join(format!("picotun-hostkey-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("known_hosts");
        std::fs::write(&path, format!("other.host {KEY_A}\n")).unwrap();
        let err = HostKeyPolicy::resolve("127.0.0.1", 2222, Some(&path), false).unwrap_err().to_string();
        assert!(err.contains("no usable key for [127.0.0.1]:2222") && err.contains("ssh-keyscan"), "{err}");
        let err = HostKeyPolicy::resolve("h", 22, Some(&dir.join("missing")), false).unwrap_err().to_string();
        assert!(err.contains("cannot read known_hosts"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
