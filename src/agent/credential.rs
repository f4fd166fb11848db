//! What the agent logs in with: the key file, or (with `--certificate-url`) a key made in memory
//! and a short-lived SSH certificate for it. Every connect and reconnect takes the current one;
//! connections already up are never touched (servers check credentials only at login).
//!
//! ```text
//! key mode:   --key-file ─(content polled every --reload-interval)─► Credential::Key
//!             a Secret volume swaps a symlink on rotation; reading the content sees it
//!
//! certificate mode:
//!   ed25519 key from 32 random bytes, in memory only ─► public half
//!   POST --certificate-url {"publicKey": ...}, Bearer <pod token, re-read per call>
//!     ─► {"certificate": ...} checked: parses, a user certificate, certifies *our* key,
//!        signature intact, valid now ─► Credential::Certificate
//!   renewed at 2/3 of the validity left when it arrived; a failure is retried with jittered
//!   backoff; an expired certificate is never offered: reconnects wait for a fresh one
//! ```
//!
//! Logs and /status carry key fingerprints, key ids, principals and validity, never key
//! material.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use russh::keys::ssh_key::certificate::CertType;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::{Certificate, HashAlg, PrivateKey};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::agent::backoff::Backoff;
use crate::agent::keys;
use crate::agent::report::{Endpoint, PostError};
use crate::sshca::{TUNS_PRINCIPAL, parse_certificate};

/// A certificate answer is about a kilobyte.
const ANSWER_LIMIT: usize = 16 * 1024;
/// One certificate request, connection and TLS included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What one connection authenticates with.
#[derive(Clone)]
pub enum Credential {
    Key(Arc<PrivateKey>),
    Certificate(Arc<Issued>),
}

impl Credential {
    /// Safe to log: the key's fingerprint, and the certificate's key id and expiry.
    pub fn describe(&self) -> String {
        match self {
            Credential::Key(key) => format!("key {}", keys::fingerprint(key)),
            Credential::Certificate(c) => format!(
                "certificate {:?} for key {} (valid before {})",
                c.key_id(),
                keys::fingerprint(&c.key),
                timestamp(c.valid_before())
            ),
        }
    }

    fn usable_at(&self, now: u64) -> bool {
        match self {
            Credential::Key(_) => true,
            Credential::Certificate(c) => c.valid_at(now),
        }
    }
}

/// A certificate the issuer returned for the agent's key, checked.
pub struct Issued {
    pub key: Arc<PrivateKey>,
    pub certificate: Certificate,
    /// When it arrived (unix seconds).
    pub obtained: f64,
}

impl Issued {
    pub fn key_id(&self) -> &str {
        self.certificate.key_id()
    }

    pub fn principals(&self) -> &[String] {
        self.certificate.valid_principals()
    }

    pub fn valid_after(&self) -> u64 {
        self.certificate.valid_after()
    }

    pub fn valid_before(&self) -> u64 {
        self.certificate.valid_before()
    }

    /// The signing CA's public key fingerprint: what to compare with the CA the server trusts.
    pub fn ca_fingerprint(&self) -> String {
        self.certificate.signature_key().fingerprint(HashAlg::Sha256).to_string()
    }

    pub fn valid_at(&self, now: u64) -> bool {
        self.valid_after() <= now && now < self.valid_before()
    }

    /// When to ask for the next one: two thirds of the way from its arrival to its expiry.
    /// (Not of validAfter..validBefore: issuers backdate validAfter for clock skew.)
    pub fn renew_at(&self) -> f64 {
        renew_at(self.obtained, self.valid_before())
    }

    /// `/status`'s `certificate`.
    pub fn status(&self) -> Value {
        json!({
            "keyId": self.key_id(),
            "principals": self.principals(),
            "validAfter": self.valid_after(),
            "validBefore": self.valid_before(),
        })
    }
}

/// Two thirds of the way from `obtained` to `valid_before`.
pub fn renew_at(obtained: f64, valid_before: u64) -> f64 {
    let left = (valid_before as f64 - obtained).max(0.0);
    obtained + left * 2.0 / 3.0
}

/// Why the issuer's answer is not a certificate this agent can use.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CertificateError {
    #[error("the answer is not JSON with a \"certificate\" string ({0})")]
    Answer(String),
    #[error("the \"certificate\" is {0}")]
    Parse(String),
    #[error("certificate {key_id:?} is a host certificate, not a user certificate")]
    NotUser { key_id: String },
    #[error("certificate {key_id:?} certifies another key ({theirs}), not this agent's ({ours})")]
    NotOurKey { key_id: String, ours: String, theirs: String },
    #[error("certificate {key_id:?}: its signature does not verify")]
    BadSignature { key_id: String },
    #[error(
        "certificate {key_id:?} expired at {valid_before} (this pod's clock says {now}): check the issuer's clock \
         and its --certificate-validity"
    )]
    Expired { key_id: String, valid_before: String, now: String },
    #[error(
        "certificate {key_id:?} is valid only from {valid_after} (this pod's clock says {now}): check the issuer's \
         clock"
    )]
    NotYetValid { key_id: String, valid_after: String, now: String },
}

/// Checks the issuer's answer (`{"certificate": "ssh-ed25519-cert-v01@openssh.com AAAA..."}`)
/// for `key` at `now`: a user certificate of our key, signed, valid now.
pub fn check_answer(key: &PrivateKey, body: &[u8], now: u64) -> Result<Certificate, CertificateError> {
    let answer: Value = serde_json::from_slice(body).map_err(|e| CertificateError::Answer(e.to_string()))?;
    let line = answer["certificate"].as_str().ok_or_else(|| CertificateError::Answer("no such field".into()))?;
    let cert = parse_certificate(line).map_err(CertificateError::Parse)?;
    let key_id = cert.key_id().to_string();
    if cert.cert_type() != CertType::User {
        return Err(CertificateError::NotUser { key_id });
    }
    if cert.public_key() != key.public_key().key_data() {
        return Err(CertificateError::NotOurKey {
            key_id,
            ours: keys::fingerprint(key),
            theirs: cert.public_key().fingerprint(HashAlg::Sha256).to_string(),
        });
    }
    if cert.valid_before() <= now {
        return Err(CertificateError::Expired {
            key_id,
            valid_before: timestamp(cert.valid_before()),
            now: timestamp(now),
        });
    }
    if cert.valid_after() > now {
        return Err(CertificateError::NotYetValid {
            key_id,
            valid_after: timestamp(cert.valid_after()),
            now: timestamp(now),
        });
    }
    // Integrity only (the server decides which CA it trusts): the signature against the CA key
    // the certificate names, within its validity.
    let ca = cert.signature_key().fingerprint(HashAlg::Sha256);
    cert.validate_at(now, [&ca]).map_err(|_| CertificateError::BadSignature { key_id })?;
    Ok(cert)
}

/// What the server's refusal of `issued` means, and what to check: said in the log and in
/// /status. Names the key id, principals, validity and CA fingerprint, never key material.
pub fn refusal(issued: &Issued, user: &str, now: u64) -> String {
    let principals = issued.principals().join(",");
    let mut found = Vec::new();
    if !issued.principals().iter().any(|p| p == TUNS_PRINCIPAL) {
        found.push(format!(
            "it does not carry the principal {TUNS_PRINCIPAL:?}, which pico.sh requires for tunnels (the webhook's \
             --certificate-principal)"
        ));
    }
    if !issued.valid_at(now) {
        found.push(format!("by this pod's clock it is not valid now ({})", timestamp(now)));
    }
    let found = if found.is_empty() { String::new() } else { format!("; {}", found.join("; ")) };
    format!(
        "the server refused certificate {key_id:?} for user {user:?} (principals {principals}, validAfter \
         {after}, validBefore {before}, signed by CA {ca}){found}. Check that this CA is trusted by the server \
         (pico.sh: the CA public key registered with the account; OpenSSH: TrustedUserCAKeys), that the server \
         accepts one of the principals for this user (pico.sh: {TUNS_PRINCIPAL:?}; OpenSSH: \
         AuthorizedPrincipalsFile), and that the server's clock is within the validity",
        key_id = issued.key_id(),
        after = timestamp(issued.valid_after()),
        before = timestamp(issued.valid_before()),
        ca = issued.ca_fingerprint(),
    )
}

/// RFC 3339 in UTC, to the second.
pub fn timestamp(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

fn now_f64() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn now() -> u64 {
    now_f64() as u64
}

/// A new ed25519 key from the operating system's randomness. It lives in this process only.
pub fn generate_key() -> Arc<PrivateKey> {
    let mut seed = [0u8; 32];
    rand::Rng::fill(&mut rand::rng(), &mut seed);
    let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    seed.fill(0);
    std::hint::black_box(&seed);
    Arc::new(key)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

/// `picotun_agent_certificate_expiry_timestamp_seconds`, `picotun_agent_certificate_renewals_total{result}`
/// (certificate mode) and `picotun_agent_key_reloads_total{result}` (key mode).
#[derive(Default)]
pub struct CredentialMetrics {
    expiry: Gauge,
    renewals: Family<ResultLabels, Counter>,
    key_reloads: Family<ResultLabels, Counter>,
}

impl CredentialMetrics {
    fn count(family: &Family<ResultLabels, Counter>, result: &str) {
        family.get_or_create(&ResultLabels { result: result.to_string() }).inc();
    }
}

enum Mode {
    Key { path: PathBuf },
    Certificate { url: String },
}

/// The current credential, shared by every connection task.
pub struct Credentials {
    mode: Mode,
    current: watch::Sender<Option<Credential>>,
    /// The last failure to renew or reload, cleared by a success.
    problem: Mutex<Option<String>>,
    pub metrics: CredentialMetrics,
}

impl Credentials {
    /// Key mode, starting with the key read from `path`.
    pub fn with_key(key: Arc<PrivateKey>, path: &Path) -> Credentials {
        Credentials {
            mode: Mode::Key { path: path.to_path_buf() },
            current: watch::channel(Some(Credential::Key(key))).0,
            problem: Mutex::new(None),
            metrics: CredentialMetrics::default(),
        }
    }

    /// Certificate mode: nothing to log in with until the first certificate arrives.
    pub fn for_certificates(url: &str) -> Credentials {
        Credentials {
            mode: Mode::Certificate { url: url.to_string() },
            current: watch::channel(None).0,
            problem: Mutex::new(None),
            metrics: CredentialMetrics::default(),
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("picotun_agent");
        match self.mode {
            Mode::Certificate { .. } => {
                r.register(
                    "certificate_expiry_timestamp_seconds",
                    "validBefore of the SSH certificate new connections log in with (unix seconds)",
                    self.metrics.expiry.clone(),
                );
                r.register(
                    "certificate_renewals",
                    "Certificate requests, the first included, by result (ok, unauthorized, rejected, unreachable, \
                     token_unreadable, invalid)",
                    self.metrics.renewals.clone(),
                );
            }
            Mode::Key { .. } => r.register(
                "key_reloads",
                "Changes of the key file by result (ok, unreadable, invalid)",
                self.metrics.key_reloads.clone(),
            ),
        }
    }

    /// The credential to log in with now, if there is one that is valid.
    pub fn current(&self) -> Option<Credential> {
        self.current.borrow().clone().filter(|c| c.usable_at(now()))
    }

    /// Waits for a credential that is valid (at once, when there is one).
    pub async fn next_usable(&self) -> Credential {
        let mut rx = self.current.subscribe();
        loop {
            if let Some(c) = rx.borrow_and_update().clone().filter(|c| c.usable_at(now())) {
                return c;
            }
            if rx.changed().await.is_err() {
                // The sender lives in `self`: unreachable while we hold `self`.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Why [`Credentials::current`] has nothing, for /status while a reconnect waits.
    pub fn waiting_reason(&self) -> String {
        let problem = self.problem().map(|p| format!(" (last attempt: {p})")).unwrap_or_default();
        match (&self.mode, &*self.current.borrow()) {
            (Mode::Certificate { url }, Some(Credential::Certificate(c))) => format!(
                "certificate {:?} expired at {}; connecting waits for a renewed one from {url}{problem}",
                c.key_id(),
                timestamp(c.valid_before())
            ),
            (Mode::Certificate { url }, _) => format!("waiting for a certificate from {url}{problem}"),
            (Mode::Key { path }, _) => format!("no usable key in {}{problem}", path.display()),
        }
    }

    /// `/status`'s `certificate`: null in key mode and before the first certificate.
    pub fn certificate_status(&self) -> Value {
        match &*self.current.borrow() {
            Some(Credential::Certificate(c)) => c.status(),
            _ => Value::Null,
        }
    }

    pub fn problem(&self) -> Option<String> {
        self.problem.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_problem(&self, problem: Option<String>) {
        *self.problem.lock().unwrap_or_else(|p| p.into_inner()) = problem;
    }

    fn set(&self, credential: Credential) {
        self.current.send_replace(Some(credential));
    }
}

/// Key mode: reloads the key when the file's content (or the passphrase's) changes, for the
/// next connect. A change that cannot be used keeps the last good key and says why.
pub async fn watch_key_file(
    credentials: Arc<Credentials>,
    path: PathBuf,
    passphrase_file: Option<PathBuf>,
    mut seen: (String, Option<String>),
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let now_read = match keys::read(&path, passphrase_file.as_deref()) {
            Ok(r) => r,
            Err(e) => {
                let msg = format!("{e}; keeping the key loaded before");
                if credentials.problem().as_deref() != Some(msg.as_str()) {
                    warn!("{msg}");
                    CredentialMetrics::count(&credentials.metrics.key_reloads, "unreadable");
                    credentials.set_problem(Some(msg));
                }
                continue;
            }
        };
        if now_read == seen {
            continue;
        }
        seen = now_read;
        let before = credentials.current.borrow().as_ref().map(Credential::describe).unwrap_or_default();
        match keys::decode(&path, &seen.0, seen.1.as_deref()) {
            Ok(key) => {
                let credential = Credential::Key(key);
                info!(
                    now = %credential.describe(),
                    before = %before,
                    "the key file changed: new connections use the new key, connections up are not touched"
                );
                CredentialMetrics::count(&credentials.metrics.key_reloads, "ok");
                credentials.set(credential);
                credentials.set_problem(None);
            }
            Err(e) => {
                let msg = format!("the key file changed but cannot be used: {e}; keeping {before}");
                warn!("{msg}");
                CredentialMetrics::count(&credentials.metrics.key_reloads, "invalid");
                credentials.set_problem(Some(msg));
            }
        }
    }
}

/// Why one certificate request failed; `label()` is the renewals metric's `result`.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("{0}")]
    Post(PostError),
    #[error("{0}")]
    Invalid(CertificateError),
}

impl RequestError {
    fn label(&self) -> &'static str {
        match self {
            RequestError::Post(e) => e.label(),
            RequestError::Invalid(_) => "invalid",
        }
    }
}

async fn request(endpoint: &Endpoint, key: &Arc<PrivateKey>) -> Result<Issued, RequestError> {
    let public = key.public_key().to_openssh().expect("an ed25519 public key encodes");
    let body = Bytes::from(serde_json::to_vec(&json!({ "publicKey": public })).expect("a string serializes"));
    let answer = match tokio::time::timeout(REQUEST_TIMEOUT, endpoint.post(body, ANSWER_LIMIT)).await {
        Ok(r) => r.map_err(RequestError::Post)?,
        Err(_) => {
            return Err(RequestError::Post(PostError::Unreachable(format!(
                "{}: no answer within {REQUEST_TIMEOUT:?}",
                endpoint.url()
            ))));
        }
    };
    let obtained = now_f64();
    let certificate = check_answer(key, &answer, obtained as u64).map_err(RequestError::Invalid)?;
    Ok(Issued { key: key.clone(), certificate, obtained })
}

/// Certificate mode: gets a certificate for `key` from `endpoint` and keeps it fresh until
/// `shutdown`.
pub async fn keep_certificate(
    credentials: Arc<Credentials>,
    endpoint: Endpoint,
    key: Arc<PrivateKey>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let mut first = true;
    loop {
        let outcome = tokio::select! {
            r = request(&endpoint, &key) => r,
            _ = shutdown.cancelled() => return,
        };
        let wait = match outcome {
            Ok(issued) => {
                CredentialMetrics::count(&credentials.metrics.renewals, "ok");
                credentials.metrics.expiry.set(i64::try_from(issued.valid_before()).unwrap_or(i64::MAX));
                let renew_in = Duration::from_secs_f64((issued.renew_at() - now_f64()).max(0.0));
                info!(
                    key_id = issued.key_id(),
                    principals = %issued.principals().join(","),
                    valid_after = %timestamp(issued.valid_after()),
                    valid_before = %timestamp(issued.valid_before()),
                    ca = %issued.ca_fingerprint(),
                    key = %keys::fingerprint(&key),
                    renew_in = ?renew_in,
                    "{}",
                    if first { "certificate obtained" } else { "certificate renewed: new connections use it" }
                );
                if !issued.principals().iter().any(|p| p == TUNS_PRINCIPAL) {
                    warn!(
                        key_id = issued.key_id(),
                        principals = %issued.principals().join(","),
                        "the certificate does not carry the principal {TUNS_PRINCIPAL:?}: pico.sh refuses it for tunnels"
                    );
                }
                first = false;
                credentials.set(Credential::Certificate(Arc::new(issued)));
                credentials.set_problem(None);
                backoff.reset();
                renew_in
            }
            Err(e) => {
                CredentialMetrics::count(&credentials.metrics.renewals, e.label());
                let mut wait = backoff.next_delay();
                // While the current certificate holds, try again well before it expires.
                if let Some(Credential::Certificate(c)) = credentials.current() {
                    let left = Duration::from_secs_f64((c.valid_before() as f64 - now_f64()).max(0.0));
                    wait = wait.min((left / 2).max(Duration::from_millis(500)));
                }
                let msg = format!("certificate request to {} failed: {e}", endpoint.url());
                let valid_until = match credentials.current() {
                    Some(Credential::Certificate(c)) => timestamp(c.valid_before()),
                    _ => "none valid".to_string(),
                };
                warn!(error = %e, retry_in = ?wait, current = %valid_until, "certificate request failed");
                credentials.set_problem(Some(msg));
                wait
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sshca::{CertRequest, SshCa, certificate_line};

    const NOW: u64 = 1_790_000_000;

    fn answer(cert: &Certificate) -> Vec<u8> {
        serde_json::to_vec(&json!({"certificate": certificate_line(cert), "keyId": cert.key_id()})).unwrap()
    }

    fn request(principals: &[&str], validity: u64) -> CertRequest {
        CertRequest {
            key_id: "team-a/web-0".into(),
            principals: principals.iter().map(|p| p.to_string()).collect(),
            validity_seconds: validity,
        }
    }

    fn line(key: &PrivateKey) -> String {
        key.public_key().to_openssh().unwrap()
    }

    #[test]
    fn generated_keys_are_ed25519_and_differ() {
        let (a, b) = (generate_key(), generate_key());
        assert_eq!(a.algorithm(), russh::keys::Algorithm::Ed25519);
        assert_ne!(keys::fingerprint(&a), keys::fingerprint(&b));
    }

    #[test]
    fn a_certificate_of_our_key_valid_now_is_accepted() {
        let ca = SshCa::from_seed(&[1; 32], "ca");
        let key = generate_key();
        let cert = ca.sign(&line(&key), &request(&["tuns"], 3600), NOW).unwrap();
        let got = check_answer(&key, &answer(&cert), NOW).unwrap();
        assert_eq!(got, cert);
        let issued = Issued { key: key.clone(), certificate: got, obtained: NOW as f64 };
        assert_eq!(
            issued.status(),
            json!({"keyId": "team-a/web-0", "principals": ["tuns"], "validAfter": NOW - 300, "validBefore": NOW + 3600})
        );
        assert_eq!(issued.ca_fingerprint(), ca.fingerprint());
        assert_eq!(issued.renew_at(), (NOW + 2400) as f64, "two thirds of what was left");
    }

    #[test]
    fn answers_that_are_not_our_valid_certificate_are_refused_with_the_reason() {
        let ca = SshCa::from_seed(&[1; 32], "ca");
        let key = generate_key();
        let other = generate_key();
        let err = |body: &[u8], now| check_answer(&key, body, now).unwrap_err();

        assert!(matches!(err(b"not json", NOW), CertificateError::Answer(_)));
        assert!(matches!(err(br#"{"cert":"x"}"#, NOW), CertificateError::Answer(_)));
        assert!(matches!(err(br#"{"certificate":"ssh-ed25519 AAAA"}"#, NOW), CertificateError::Parse(_)));

        let theirs = ca.sign(&line(&other), &request(&["tuns"], 60), NOW).unwrap();
        let e = err(&answer(&theirs), NOW);
        assert!(matches!(e, CertificateError::NotOurKey { .. }), "{e}");
        assert!(e.to_string().contains(&keys::fingerprint(&key)), "{e}");

        let expired = ca.sign(&line(&key), &request(&["tuns"], 60), NOW - 1000).unwrap();
        let e = err(&answer(&expired), NOW);
        assert!(matches!(e, CertificateError::Expired { .. }), "{e}");
        assert!(e.to_string().contains("expired at 2026-") && e.to_string().contains("\"team-a/web-0\""), "{e}");

        let future = ca.sign(&line(&key), &request(&["tuns"], 60), NOW + 1000).unwrap();
        assert!(matches!(err(&answer(&future), NOW), CertificateError::NotYetValid { .. }));

        // A byte of the signed part changed: the key id.
        let good = certificate_line(&ca.sign(&line(&key), &request(&["tuns"], 60), NOW).unwrap());
        let mut cert = parse_certificate(&good).unwrap();
        cert.set_comment("still fine");
        assert!(check_answer(&key, &answer(&cert), NOW).is_ok(), "the comment is not signed");
        let tampered = tamper_key_id(&good);
        let e = err(&serde_json::to_vec(&json!({"certificate": tampered})).unwrap(), NOW);
        assert!(matches!(e, CertificateError::BadSignature { .. }), "{e}");
    }

    /// The certificate line with its key id's last byte changed (same length, still parses).
    fn tamper_key_id(line: &str) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut parts = line.split_whitespace();
        let (alg, blob) = (parts.next().unwrap(), parts.next().unwrap());
        let mut raw = b64.decode(blob).unwrap();
        let needle = b"team-a/web-0";
        let at = raw.windows(needle.len()).position(|w| w == needle).unwrap();
        raw[at + needle.len() - 1] = b'1';
        format!("{alg} {}", b64.encode(raw))
    }

    #[test]
    fn a_refusal_says_what_to_check_and_what_is_wrong_already() {
        let ca = SshCa::from_seed(&[1; 32], "ca");
        let key = generate_key();
        let issued = |principals: &[&str]| Issued {
            key: key.clone(),
            certificate: ca.sign(&line(&key), &request(principals, 60), NOW).unwrap(),
            obtained: NOW as f64,
        };
        let ok = refusal(&issued(&["tuns"]), "picotun", NOW);
        for part in [
            "refused certificate \"team-a/web-0\" for user \"picotun\"",
            "principals tuns",
            "validBefore 2026-",
            &format!("signed by CA {}", ca.fingerprint()),
            "TrustedUserCAKeys",
            "AuthorizedPrincipalsFile",
            "clock",
        ] {
            assert!(ok.contains(part), "{part:?} in {ok}");
        }
        assert!(!ok.contains("does not carry"), "{ok}");
        let pgs = refusal(&issued(&["pgs"]), "picotun", NOW);
        assert!(pgs.contains("does not carry the principal \"tuns\""), "{pgs}");
        let late = refusal(&issued(&["tuns"]), "picotun", NOW + 61);
        assert!(late.contains("not valid now"), "{late}");
        // No key material: neither the certificate nor the key's public half.
        let blob = certificate_line(&issued(&["tuns"]).certificate);
        assert!(!ok.contains(blob.split_whitespace().nth(1).unwrap()));
        assert!(!ok.contains(line(&key).split_whitespace().nth(1).unwrap()));
    }

    #[tokio::test]
    async fn an_expired_certificate_is_never_offered() {
        let ca = SshCa::from_seed(&[1; 32], "ca");
        let key = generate_key();
        let creds = Credentials::for_certificates("https://webhook/certificate");
        assert!(creds.current().is_none());
        assert!(creds.waiting_reason().starts_with("waiting for a certificate from https://webhook/certificate"));
        let t = now();
        // Valid for 2 s from now.
        let short = ca.sign(&line(&key), &request(&["tuns"], 2), t).unwrap();
        creds.set(Credential::Certificate(Arc::new(Issued {
            key: key.clone(),
            certificate: short,
            obtained: t as f64,
        })));
        assert!(creds.current().is_some());
        assert_eq!(creds.certificate_status()["keyId"], "team-a/web-0");
        tokio::time::sleep(Duration::from_millis(3100)).await;
        assert!(creds.current().is_none(), "expired");
        assert!(creds.waiting_reason().contains("expired at"), "{}", creds.waiting_reason());
        let waiter = tokio::spawn({
            let creds = Arc::new(creds);
            let c = creds.clone();
            let ca_key = key.clone();
            async move {
                let t = now();
                let fresh = ca.sign(&line(&ca_key), &request(&["tuns"], 60), t).unwrap();
                let wait = tokio::spawn(async move { c.next_usable().await.describe() });
                tokio::time::sleep(Duration::from_millis(100)).await;
                assert!(!wait.is_finished(), "waits while only an expired one is there");
                creds.set(Credential::Certificate(Arc::new(Issued {
                    key: ca_key,
                    certificate: fresh,
                    obtained: t as f64,
                })));
                wait.await.unwrap()
            }
        });
        assert!(waiter.await.unwrap().starts_with("certificate \"team-a/web-0\""));
    }

    #[test]
    fn renewal_is_two_thirds_into_what_was_left() {
        assert_eq!(renew_at(100.0, 106), 104.0);
        assert_eq!(renew_at(100.0, 100 + 4 * 3600), 100.0 + 9600.0);
        assert_eq!(renew_at(100.0, 50), 100.0, "already expired: at once");
    }
}
