//! `POST /report`: sidecars push their `/status` here and the public addresses become their pod's
//! `tunnels.pico.sh/addresses` annotation -- the agent has no Kubernetes access, the webhook has.
//!
//! ```text
//! agent ─HTTPS, Bearer <projected token: audience tunnels.pico.sh, bound to its pod>─► /report
//!   │ body (<= 64 KiB) -> annotation JSON (pure)                       400 malformed
//!   ▼
//! TokenReview (successes cached 60 s by a keyed hash of the token)    401 not accepted
//!   -> system:serviceaccount:<ns>:<sa> + extra pod-name / pod-uid     403 not bound to a pod
//!   ▼
//! pod GET: same uid? injected by picotun? value already there? ─► merge patch (uid precondition)
//! ```
//!
//! The pod annotation is the record: `kubectl get pod -o yaml` shows it and the controller reads
//! it from its pod cache. Needs RBAC: `create` tokenreviews, `get` and `patch` pods.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha1::Sha1;
use tracing::{debug, info, warn};

use super::{AppState, ResultLabels};
use crate::api;
use crate::webhook::inject::{self, REPORT_AUDIENCE};

/// A status document of a few dozen tunnels is a few KiB; the annotation must stay far below
/// the apiserver's 256 KiB for all of a pod's annotations.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Extra keys the apiserver sets for a token bound to a pod.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";
const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";
/// How long an accepted token is trusted without asking again. A pod's deletion invalidates
/// its tokens; a report within this window after it finds no pod.
const REVIEW_TTL: Duration = Duration::from_secs(60);
/// How long the value last written to a pod is trusted to still be there; after this the pod
/// is read again, so an annotation someone removed is restored by the next heartbeat.
const WRITTEN_TTL: Duration = Duration::from_secs(300);
/// Entries per cache: beyond this, expired entries go, and if none had, all.
const CACHE_ENTRIES: usize = 10_000;
const API_TIMEOUT: Duration = Duration::from_secs(5);

/// The pod a verified token speaks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: String,
    pub service_account: String,
    pub pod_name: String,
    pub pod_uid: String,
}

/// Why a token is refused: `NotAuthenticated` and `WrongAudience` are 401, the rest 403.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error(
        "no bearer token: send Authorization: Bearer <the pod's projected service-account token with audience \
         {REPORT_AUDIENCE}>"
    )]
    NoToken,
    #[error("the token was not accepted: {0}")]
    NotAuthenticated(String),
    #[error("the token is not for audience {REPORT_AUDIENCE}")]
    WrongAudience,
    #[error("the token is not a service account's (user {0:?}); use the pod's projected token")]
    NotServiceAccount(String),
    #[error(
        "the token is not bound to a pod (no {POD_NAME_EXTRA} / {POD_UID_EXTRA}); use a projected \
         serviceAccountToken volume, as injected sidecars have"
    )]
    NotBoundToPod,
}

impl Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Refusal::NoToken | Refusal::NotAuthenticated(_) | Refusal::WrongAudience => StatusCode::UNAUTHORIZED,
            Refusal::NotServiceAccount(_) | Refusal::NotBoundToPod => StatusCode::FORBIDDEN,
        }
    }
}

/// `system:serviceaccount:<namespace>:<name>` -> (namespace, name).
pub fn service_account(username: &str) -> Option<(&str, &str)> {
    let (namespace, name) = username.strip_prefix(SERVICE_ACCOUNT_PREFIX)?.split_once(':')?;
    let valid = |s: &str| !s.is_empty() && !s.contains(':');
    (valid(namespace) && valid(name)).then_some((namespace, name))
}

/// Who a TokenReview's answer says the caller is; only a service-account token for our audience,
/// bound to a pod, will do.
pub fn identity(status: &TokenReviewStatus) -> Result<PodIdentity, Refusal> {
    if status.authenticated != Some(true) {
        let why = status.error.clone().filter(|e| !e.is_empty()).unwrap_or_else(|| "not authenticated".into());
        return Err(Refusal::NotAuthenticated(why));
    }
    if !status.audiences.iter().flatten().any(|a| a == REPORT_AUDIENCE) {
        return Err(Refusal::WrongAudience);
    }
    let user = status.user.as_ref();
    let username = user.and_then(|u| u.username.as_deref()).unwrap_or_default();
    let (namespace, service_account) =
        service_account(username).ok_or_else(|| Refusal::NotServiceAccount(username.to_string()))?;
    let extra = |key: &str| {
        user.and_then(|u| u.extra.as_ref())
            .and_then(|e| e.get(key))
            .and_then(|v| v.first())
            .filter(|v| !v.is_empty())
            .cloned()
    };
    let (Some(pod_name), Some(pod_uid)) = (extra(POD_NAME_EXTRA), extra(POD_UID_EXTRA)) else {
        return Err(Refusal::NotBoundToPod);
    };
    Ok(PodIdentity { namespace: namespace.into(), service_account: service_account.into(), pod_name, pod_uid })
}

/// Why a posted body is not an agent's status.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadStatus {
    #[error("the body is not an agent /status document ({0})")]
    Malformed(String),
    #[error("tunnel {0:?} appears twice")]
    Duplicate(String),
    #[error("a tunnel name must be 1 to 253 characters, got {0:?}")]
    Name(String),
}

#[derive(Deserialize)]
struct PostedStatus {
    tunnels: Vec<PostedTunnel>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PostedTunnel {
    name: String,
    state: String,
    #[serde(default)]
    public_address: Option<String>,
}

#[derive(Serialize)]
struct Addresses {
    tunnels: BTreeMap<String, TunnelAddress>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TunnelAddress {
    state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    public_address: Option<String>,
}

/// The annotation value for a posted `/status`: compact JSON, tunnels by name (sorted, so the
/// same status gives the same text), with only their state and public address.
pub fn addresses_annotation(body: &[u8]) -> Result<String, BadStatus> {
    let posted: PostedStatus = serde_json::from_slice(body).map_err(|e| BadStatus::Malformed(e.to_string()))?;
    let mut tunnels = BTreeMap::new();
    for t in posted.tunnels {
        if t.name.is_empty() || t.name.len() > 253 {
            return Err(BadStatus::Name(t.name));
        }
        let address = TunnelAddress { state: t.state, public_address: t.public_address.filter(|a| !a.is_empty()) };
        if let Some(_twice) = tunnels.insert(t.name.clone(), address) {
            return Err(BadStatus::Duplicate(t.name));
        }
    }
    Ok(serde_json::to_string(&Addresses { tunnels }).expect("strings serialize"))
}

/// The token after `Bearer `, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Entries that expire, bounded in number.
struct Expiring<K, V> {
    entries: HashMap<K, (Instant, V)>,
    ttl: Duration,
}

impl<K: std::hash::Hash + Eq, V: Clone> Expiring<K, V> {
    fn new(ttl: Duration) -> Self {
        Expiring { entries: HashMap::new(), ttl }
    }

    fn get(&self, key: &K) -> Option<V> {
        self.entries.get(key).filter(|(at, _)| at.elapsed() < self.ttl).map(|(_, v)| v.clone())
    }

    fn put(&mut self, key: K, value: V) {
        if self.entries.len() >= CACHE_ENTRIES {
            let ttl = self.ttl;
            self.entries.retain(|_, (at, _)| at.elapsed() < ttl);
            if self.entries.len() >= CACHE_ENTRIES {
                self.entries.clear();
            }
        }
        self.entries.insert(key, (Instant::now(), value));
    }

    fn remove(&mut self, key: &K) {
        self.entries.remove(key);
    }
}

/// The `/report` endpoint's state: caches and the metric.
pub(super) struct Reports {
    /// Keys the token hashes, so the cache holds nothing that could be replayed.
    hash_key: [u8; 32],
    reviews: Mutex<Expiring<Vec<u8>, PodIdentity>>,
    /// Per pod uid: the annotation value last written (or found).
    written: Mutex<Expiring<String, String>>,
    reports: Family<ResultLabels, Counter>,
}

/// How one report ended: HTTP status, metric result, and a reason for the caller.
struct Outcome {
    status: StatusCode,
    result: &'static str,
    message: String,
}

fn outcome(status: StatusCode, result: &'static str, message: impl Into<String>) -> Outcome {
    Outcome { status, result, message: message.into() }
}

impl Reports {
    pub(super) fn new(registry: &mut Registry) -> Self {
        let reports = Family::<ResultLabels, Counter>::default();
        registry.sub_registry_with_prefix("picotun_webhook").register(
            "reports",
            "Sidecar status reports by result (written, unchanged, bad_request, unauthenticated, forbidden, pod_gone, \
             unavailable)",
            reports.clone(),
        );
        Reports {
            hash_key: rand::rng().random(),
            reviews: Mutex::new(Expiring::new(REVIEW_TTL)),
            written: Mutex::new(Expiring::new(WRITTEN_TTL)),
            reports,
        }
    }

    fn token_hash(&self, token: &str) -> Vec<u8> {
        let mac = Hmac::<Sha1>::new_from_slice(&self.hash_key).expect("HMAC takes any key length");
        mac.chain_update(token.as_bytes()).finalize().into_bytes().to_vec()
    }

    /// Checks the token with a TokenReview (or the cache of recent successes).
    async fn review(&self, client: &kube::Client, token: &str) -> Result<Result<PodIdentity, Refusal>, String> {
        let key = self.token_hash(token);
        if let Some(id) = self.reviews.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(Ok(id));
        }
        let review = TokenReview {
            spec: TokenReviewSpec { audiences: Some(vec![REPORT_AUDIENCE.into()]), token: token.into() },
            ..Default::default()
        };
        let reviews: Api<TokenReview> = Api::all(client.clone());
        let answer = match tokio::time::timeout(API_TIMEOUT, reviews.create(&PostParams::default(), &review)).await {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => return Err(format!("TokenReview failed: {e}")),
            Err(_) => return Err(format!("TokenReview timed out after {API_TIMEOUT:?}")),
        };
        let id = identity(&answer.status.unwrap_or_default());
        if let Ok(id) = &id {
            self.reviews.lock().unwrap_or_else(|p| p.into_inner()).put(key, id.clone());
        }
        Ok(id)
    }

    async fn serve(
        &self,
        client: Option<&kube::Client>,
        headers: &HeaderMap,
        body: Body,
    ) -> (Outcome, Option<PodIdentity>) {
        let Some(token) = bearer(headers) else {
            return (outcome(StatusCode::UNAUTHORIZED, "unauthenticated", Refusal::NoToken.to_string()), None);
        };
        let body = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
            Ok(b) => b,
            Err(_) => {
                let msg = format!("the body is over {MAX_BODY_BYTES} bytes (or could not be read)");
                return (outcome(StatusCode::PAYLOAD_TOO_LARGE, "bad_request", msg), None);
            }
        };
        let value = match addresses_annotation(&body) {
            Ok(v) => v,
            Err(e) => return (outcome(StatusCode::BAD_REQUEST, "bad_request", e.to_string()), None),
        };
        let Some(client) = client else {
            let msg = "the webhook has no Kubernetes API access and cannot record reports";
            return (outcome(StatusCode::SERVICE_UNAVAILABLE, "unavailable", msg), None);
        };
        let id = match self.review(client, token).await {
            Ok(Ok(id)) => id,
            Ok(Err(refusal)) => {
                let result = if refusal.status() == StatusCode::FORBIDDEN { "forbidden" } else { "unauthenticated" };
                return (outcome(refusal.status(), result, refusal.to_string()), None);
            }
            Err(e) => return (outcome(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e), None),
        };
        let done = self.record(client, &id, value).await;
        (done, Some(id))
    }

    /// Writes `value` onto the pod, unless it is already there.
    async fn record(&self, client: &kube::Client, id: &PodIdentity, value: String) -> Outcome {
        let cached = self.written.lock().unwrap_or_else(|p| p.into_inner()).get(&id.pod_uid);
        if cached.as_deref() == Some(value.as_str()) {
            return outcome(StatusCode::OK, "unchanged", "unchanged");
        }
        let pods: Api<Pod> = Api::namespaced(client.clone(), &id.namespace);
        let pod = match tokio::time::timeout(API_TIMEOUT, pods.get_opt(&id.pod_name)).await {
            Ok(Ok(Some(p))) => p,
            Ok(Ok(None)) => return outcome(StatusCode::NOT_FOUND, "pod_gone", "the token's pod no longer exists"),
            Ok(Err(e)) => {
                return outcome(StatusCode::SERVICE_UNAVAILABLE, "unavailable", format!("reading the pod: {e}"));
            }
            Err(_) => return outcome(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "reading the pod timed out"),
        };
        if pod.metadata.uid.as_deref() != Some(id.pod_uid.as_str()) {
            return outcome(
                StatusCode::NOT_FOUND,
                "pod_gone",
                "the token's pod was replaced by another of the same name",
            );
        }
        // Only pods picotun injected: the endpoint is for its sidecars, not a way for any pod
        // with a token of this audience to decorate itself.
        if !inject::is_injected(&pod) {
            return outcome(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("the pod carries no {} sidecar; only injected pods report", api::SIDECAR_NAME),
            );
        }
        let current = pod.metadata.annotations.as_ref().and_then(|a| a.get(api::ADDRESSES));
        if current == Some(&value) {
            self.written.lock().unwrap_or_else(|p| p.into_inner()).put(id.pod_uid.clone(), value);
            return outcome(StatusCode::OK, "unchanged", "unchanged");
        }
        // The uid in the patch is a precondition: a pod recreated under the same name in the
        // meantime is not written.
        let patch = serde_json::json!({"metadata": {"uid": id.pod_uid, "annotations": {api::ADDRESSES: value}}});
        let params = PatchParams::default();
        match tokio::time::timeout(API_TIMEOUT, pods.patch(&id.pod_name, &params, &Patch::Merge(&patch))).await {
            Ok(Ok(_)) => {
                self.written.lock().unwrap_or_else(|p| p.into_inner()).put(id.pod_uid.clone(), value);
                outcome(StatusCode::OK, "written", "written")
            }
            Ok(Err(kube::Error::Api(s))) if s.is_conflict() || s.is_not_found() => {
                self.written.lock().unwrap_or_else(|p| p.into_inner()).remove(&id.pod_uid);
                outcome(StatusCode::NOT_FOUND, "pod_gone", "the token's pod was replaced or deleted")
            }
            Ok(Err(e)) => outcome(StatusCode::SERVICE_UNAVAILABLE, "unavailable", format!("patching the pod: {e}")),
            Err(_) => outcome(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "patching the pod timed out"),
        }
    }
}

/// `POST /report`.
pub(super) async fn handle(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let (done, id) = state.reports.serve(state.client.as_ref(), &headers, body).await;
    state.reports.reports.get_or_create(&ResultLabels { result: done.result.into() }).inc();
    let (namespace, pod) = id.as_ref().map(|i| (i.namespace.as_str(), i.pod_name.as_str())).unwrap_or_default();
    match done.result {
        "written" => info!(namespace, pod, "public addresses recorded on the pod"),
        "unchanged" => debug!(namespace, pod, "report unchanged"),
        "unavailable" => warn!(namespace, pod, reason = %done.message, "report not recorded"),
        // The caller's own problem: said in the answer, not worth more than debug here.
        _ => debug!(namespace, pod, status = done.status.as_u16(), reason = %done.message, "report refused"),
    }
    (done.status, format!("{}\n", done.message)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;
    use serde_json::json;

    fn reviewed(username: &str, audiences: &[&str], extra: &[(&str, &str)]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            user: Some(UserInfo {
                username: Some(username.into()),
                extra: Some(extra.iter().map(|(k, v)| (k.to_string(), vec![v.to_string()])).collect()),
                ..Default::default()
            }),
            error: None,
        }
    }

    #[test]
    fn service_account_usernames() {
        assert_eq!(service_account("system:serviceaccount:apps:default"), Some(("apps", "default")));
        for bad in [
            "system:serviceaccount:apps",
            "system:serviceaccount::default",
            "system:serviceaccount:apps:",
            "system:serviceaccount:a:b:c",
            "system:serviceaccounts:apps",
            "alice",
            "",
        ] {
            assert_eq!(service_account(bad), None, "{bad}");
        }
    }

    #[test]
    fn only_a_pod_bound_service_account_token_for_our_audience() {
        let bound = [(POD_NAME_EXTRA, "web-1"), (POD_UID_EXTRA, "1234")];
        assert_eq!(
            identity(&reviewed("system:serviceaccount:apps:web", &["tunnels.pico.sh"], &bound)),
            Ok(PodIdentity {
                namespace: "apps".into(),
                service_account: "web".into(),
                pod_name: "web-1".into(),
                pod_uid: "1234".into()
            })
        );
        let refused = |s: TokenReviewStatus| identity(&s).unwrap_err();
        assert_eq!(refused(reviewed("system:serviceaccount:apps:web", &["other"], &bound)), Refusal::WrongAudience);
        assert_eq!(
            refused(reviewed("system:serviceaccount:apps:web", &["tunnels.pico.sh"], &[])),
            Refusal::NotBoundToPod
        );
        assert_eq!(
            refused(reviewed("system:serviceaccount:apps:web", &["tunnels.pico.sh"], &bound[..1])),
            Refusal::NotBoundToPod,
            "the uid is needed too"
        );
        assert_eq!(
            refused(reviewed("alice", &["tunnels.pico.sh"], &bound)),
            Refusal::NotServiceAccount("alice".into())
        );
        let rejected = TokenReviewStatus {
            authenticated: Some(false),
            error: Some("token audiences [\"other\"] is invalid".into()),
            ..Default::default()
        };
        assert!(matches!(refused(rejected), Refusal::NotAuthenticated(e) if e.contains("is invalid")));
        assert!(matches!(refused(TokenReviewStatus::default()), Refusal::NotAuthenticated(_)));
        assert_eq!(Refusal::WrongAudience.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(Refusal::NotBoundToPod.status(), StatusCode::FORBIDDEN);
    }

    #[test]
    fn status_to_annotation_keeps_names_states_and_addresses() {
        let status = json!({
            "ready": false, "server": "tuns.sh:22", "dialect": "sish", "configError": null,
            "tunnels": [
                {"name": "web", "kind": "http", "requested": "demo", "targetPort": 8080, "state": "established",
                 "publicAddress": "https://u-demo.tuns.sh", "since": 1, "activeConnections": 3},
                {"name": "db", "kind": "tcp", "requested": "tcp:any", "targetPort": 5432, "state": "connecting",
                 "since": 1, "activeConnections": 0, "message": "connecting to tuns.sh"},
            ],
        });
        let value = addresses_annotation(status.to_string().as_bytes()).unwrap();
        assert_eq!(
            value,
            r#"{"tunnels":{"db":{"state":"connecting"},"web":{"state":"established","publicAddress":"https://u-demo.tuns.sh"}}}"#
        );
        assert_eq!(addresses_annotation(br#"{"tunnels":[]}"#).unwrap(), r#"{"tunnels":{}}"#);
    }

    #[test]
    fn malformed_statuses_are_refused_with_a_reason() {
        for (body, want) in [
            (&b"{not json"[..], "not an agent /status document"),
            (br#"{"ready":true}"#, "missing field `tunnels`"),
            (br#"{"tunnels":[{"name":"web"}]}"#, "missing field `state`"),
            (br#"{"tunnels":[{"name":"web","state":1}]}"#, "invalid type"),
            (br#"{"tunnels":[{"name":"","state":"x"}]}"#, "1 to 253 characters"),
            (br#"{"tunnels":[{"name":"a","state":"x"},{"name":"a","state":"y"}]}"#, "appears twice"),
        ] {
            let err = addresses_annotation(body).unwrap_err().to_string();
            assert!(err.contains(want), "{}: {err}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn bearer_tokens() {
        let headers = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
            h
        };
        assert_eq!(bearer(&headers("Bearer abc.def")), Some("abc.def"));
        assert_eq!(bearer(&headers("bearer abc")), Some("abc"));
        assert_eq!(bearer(&headers("Basic abc")), None);
        assert_eq!(bearer(&headers("Bearer ")), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
    }

    #[test]
    fn caches_expire_and_stay_bounded() {
        let mut c: Expiring<u32, u32> = Expiring::new(Duration::from_secs(60));
        for i in 0..(CACHE_ENTRIES as u32 + 5) {
            c.put(i, i);
        }
        assert!(c.entries.len() <= CACHE_ENTRIES);
        assert_eq!(c.get(&(CACHE_ENTRIES as u32 + 4)), Some(CACHE_ENTRIES as u32 + 4));
        let mut short: Expiring<u32, u32> = Expiring::new(Duration::ZERO);
        short.put(1, 1);
        assert_eq!(short.get(&1), None);
    }

    #[test]
    fn token_hashes_are_keyed_and_distinct() {
        let mut registry = Registry::default();
        let a = Reports::new(&mut registry);
        let b = Reports::new(&mut Registry::default());
        assert_eq!(a.token_hash("t1"), a.token_hash("t1"));
        assert_ne!(a.token_hash("t1"), a.token_hash("t2"));
        assert_ne!(a.token_hash("t1"), b.token_hash("t1"), "a per-process key");
    }
}
