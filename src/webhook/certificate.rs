//! `POST /certificate`: a sidecar sends the public half of the ed25519 key it made in memory and
//! gets a short-lived SSH user certificate for it, signed by picotun's CA -- so no pod holds a
//! long-lived credential of the pico.sh account.
//!
//! ```text
//! agent ─HTTPS, Bearer <the pod's projected token>, {"publicKey":"ssh-ed25519 AAAA..."} (<= 4 KiB)─►
//!   400 body · 503 no CA (Secret picotun-ssh-ca, mounted at --ssh-ca-dir, re-read when it changes)
//!   identity (as /report): 401 token · 403 not a pod picotun injected (which check) · 404 pod gone
//!   ▼
//! sign: key id <namespace>/<pod>, principals --certificate-principal (tuns), valid from 5 min
//! before now for --certificate-validity; logged with serial, validBefore and the subject key's
//! fingerprint (never key material)
//! ```

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use russh::keys::HashAlg;
use serde::Deserialize;
use tracing::{debug, info, warn};

use super::identity::{Outcome, Refusal, bearer, outcome};
use super::{AppState, ResultLabels};
use crate::sshca::{self, CertRequest, SshCa};

/// A public key line is under 100 bytes; the JSON around it a few more.
pub const MAX_BODY_BYTES: usize = 4 * 1024;
/// The file in `--ssh-ca-dir` holding the CA's private key (the Secret's key `ca`).
pub const CA_FILE: &str = "ca";
pub const NO_CA: &str = "no SSH CA is configured: create the Secret picotun-ssh-ca with picotun ca create";

/// The CA key, read from its directory and re-read when the file changes.
pub struct CaStore {
    path: PathBuf,
    current: RwLock<Loaded>,
}

#[derive(Default)]
struct Loaded {
    raw: Option<Vec<u8>>,
    ca: Option<Arc<SshCa>>,
    /// Why the file that is there cannot be used.
    error: Option<String>,
}

impl CaStore {
    pub fn new(dir: PathBuf) -> CaStore {
        CaStore { path: dir.join(CA_FILE), current: RwLock::new(Loaded::default()) }
    }

    /// Reads the file if it changed; logs what happened.
    pub fn reload(&self) {
        let raw = std::fs::read(&self.path).ok();
        if self.current.read().unwrap_or_else(|p| p.into_inner()).raw == raw {
            return;
        }
        let loaded = match &raw {
            None => {
                warn!(path = %self.path.display(), "{NO_CA}; /certificate answers 503 until it exists");
                Loaded { raw, ca: None, error: None }
            }
            Some(bytes) => match std::str::from_utf8(bytes)
                .map_err(|_| "not text".to_string())
                .and_then(|t| SshCa::from_openssh(t).map_err(|e| e.to_string()))
            {
                Ok(ca) => {
                    info!(path = %self.path.display(), fingerprint = %ca.fingerprint(), "SSH CA loaded");
                    Loaded { raw, ca: Some(Arc::new(ca)), error: None }
                }
                Err(e) => {
                    warn!(path = %self.path.display(), error = %e, "the SSH CA cannot be used; /certificate answers 503");
                    Loaded { raw, ca: None, error: Some(e) }
                }
            },
        };
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = loaded;
    }

    /// The CA, or why there is none.
    pub fn get(&self) -> Result<Arc<SshCa>, String> {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        match (&current.ca, &current.error) {
            (Some(ca), _) => Ok(ca.clone()),
            (None, Some(e)) => Err(format!("the SSH CA in {} cannot be used: {e}", self.path.display())),
            (None, None) => Err(NO_CA.to_string()),
        }
    }

    /// Re-reads the file every `every`.
    pub async fn watch(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            self.reload();
        }
    }
}

/// What certificates say: from the webhook's flags.
#[derive(Clone, Debug)]
pub struct Issuing {
    pub principals: Vec<String>,
    pub validity: Duration,
}

/// The `/certificate` endpoint's state.
pub(super) struct Certificates {
    pub(super) store: Arc<CaStore>,
    issuing: Issuing,
    results: Family<ResultLabels, Counter>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CertificateRequest {
    public_key: String,
}

impl Certificates {
    pub(super) fn new(registry: &mut Registry, store: Arc<CaStore>, issuing: Issuing) -> Certificates {
        let results = Family::<ResultLabels, Counter>::default();
        registry.sub_registry_with_prefix("picotun_webhook").register(
            "certificates",
            "SSH certificate requests by result (issued, bad_request, unauthenticated, forbidden, pod_gone, no_ca, \
             unavailable)",
            results.clone(),
        );
        Certificates { store, issuing, results }
    }

    async fn serve(&self, state: &AppState, headers: &HeaderMap, body: Body) -> Result<Response, Outcome> {
        let token = bearer(headers)
            .ok_or_else(|| outcome(StatusCode::UNAUTHORIZED, "unauthenticated", Refusal::NoToken.to_string()))?;
        let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !content_type.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json")) {
            let msg = format!("content type must be application/json, got {content_type:?}");
            return Err(outcome(StatusCode::BAD_REQUEST, "bad_request", msg));
        }
        let body = super::read_body(body, MAX_BODY_BYTES, state.body_read_timeout)
            .await
            .map_err(|(status, msg)| outcome(status, "bad_request", msg))?;
        let request: CertificateRequest = serde_json::from_slice(&body).map_err(|e| {
            let msg = format!("the body is not {{\"publicKey\":\"ssh-ed25519 AAAA...\"}} ({e})");
            outcome(StatusCode::BAD_REQUEST, "bad_request", msg)
        })?;
        let subject = sshca::parse_public_key(&request.public_key)
            .map_err(|e| outcome(StatusCode::BAD_REQUEST, "bad_request", e.to_string()))?;
        let ca = self.store.get().map_err(|e| outcome(StatusCode::SERVICE_UNAVAILABLE, "no_ca", e))?;
        let Some(client) = state.client.as_ref() else {
            let msg = "the webhook has no Kubernetes API access and cannot check the caller";
            return Err(outcome(StatusCode::SERVICE_UNAVAILABLE, "unavailable", msg));
        };
        let id = state.verifier.identify(client, token).await?;
        state.verifier.injected_pod(client, &id, state.index.as_ref().map(|i| &i.namespaces)).await?;
        let key_id = format!("{}/{}", id.namespace, id.pod_name);
        let cert_request = CertRequest {
            key_id: key_id.clone(),
            principals: self.issuing.principals.clone(),
            validity_seconds: self.issuing.validity.as_secs().max(1),
        };
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let cert = ca.sign(&request.public_key, &cert_request, now).map_err(|e| {
            let status = match e {
                sshca::CaError::SubjectNotEd25519(_) | sshca::CaError::BadPublicKey(_) => StatusCode::BAD_REQUEST,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            outcome(
                status,
                if status == StatusCode::BAD_REQUEST { "bad_request" } else { "unavailable" },
                e.to_string(),
            )
        })?;
        info!(
            key_id = %key_id,
            serial = cert.serial(),
            valid_before = cert.valid_before(),
            principals = %cert.valid_principals().join(","),
            subject = %subject.fingerprint(HashAlg::Sha256),
            ca = %ca.fingerprint(),
            "SSH certificate issued"
        );
        let answer = serde_json::json!({
            "certificate": sshca::certificate_line(&cert),
            "keyId": key_id,
            "principals": cert.valid_principals(),
            "validAfter": cert.valid_after(),
            "validBefore": cert.valid_before(),
        });
        Ok((StatusCode::OK, axum::Json(answer)).into_response())
    }
}

/// `POST /certificate`.
pub(super) async fn handle(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let certificates = &state.certificates;
    let (result, response) = match certificates.serve(&state, &headers, body).await {
        Ok(response) => ("issued", response),
        Err(done) => {
            match done.result {
                "unavailable" | "no_ca" => warn!(reason = %done.message, "certificate not issued"),
                "forbidden" => info!(reason = %done.message, "certificate refused"),
                _ => debug!(status = done.status.as_u16(), reason = %done.message, "certificate refused"),
            }
            (done.result, (done.status, format!("{}\n", done.message)).into_response())
        }
    };
    certificates.results.get_or_create(&ResultLabels { result: result.into() }).inc();
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_follows_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = CaStore::new(dir.path().to_path_buf());
        store.reload();
        assert_eq!(store.get().unwrap_err(), NO_CA);
        std::fs::write(dir.path().join(CA_FILE), "-----BEGIN OPENSSH PRIVATE KEY-----\nc2VjcmV0\n-----END").unwrap();
        store.reload();
        let err = store.get().unwrap_err();
        assert!(err.contains("cannot be used") && !err.contains("c2VjcmV0"), "{err}");
        let ca = SshCa::from_seed(&[3; 32], "picotun-ssh-ca");
        std::fs::write(dir.path().join(CA_FILE), ca.to_openssh()).unwrap();
        store.reload();
        assert_eq!(store.get().unwrap().public_line(), ca.public_line());
        let other = SshCa::from_seed(&[4; 32], "rotated");
        std::fs::write(dir.path().join(CA_FILE), other.to_openssh()).unwrap();
        store.reload();
        assert_eq!(store.get().unwrap().public_line(), other.public_line(), "a rotated CA is used at once");
        std::fs::remove_file(dir.path().join(CA_FILE)).unwrap();
        store.reload();
        assert_eq!(store.get().unwrap_err(), NO_CA, "a removed CA is no longer used");
    }
}
