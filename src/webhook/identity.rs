//! Which pod is calling, and whether it is one picotun injected: shared by `/report` and
//! `/certificate`.
//!
//! ```text
//! Authorization: Bearer <projected token, audience tunnels.pico.sh, bound to the pod>
//!   ▼ TokenReview (successes cached 60 s by a keyed hash of the token)      401 not accepted
//!   -> system:serviceaccount:<ns>:<sa> + extra pod-name / pod-uid           403 not bound to a pod
//!   ▼ GET the pod: same uid?                                                404 gone / replaced
//!   ▼ injected by picotun, as it is now?                                    403 which check failed
//!     - the tunnels.pico.sh/injected ticket verifies (namespace, service account, agent container)
//!     - no other container (init, regular, ephemeral) mounts the sidecar's token or key volume
//!     - no ephemeral container targets the agent's processes; shareProcessNamespace is not true
//! ```
//!
//! A pod's containers are immutable and its ticket binds the agent container, so a pod that
//! passes runs picotun's sidecar as the webhook injected it, and only that sidecar can read the
//! token. Needs RBAC: `create` tokenreviews, `get` pods.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode, header};
use hmac::{Hmac, Mac};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use rand::Rng;
use sha1::Sha1;

use crate::core::api;
use crate::webhook::inject::{self, REPORT_AUDIENCE};
use crate::webhook::ticket::{self, TicketError, TicketKey};

/// Extra keys the apiserver sets for a token bound to a pod.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";
const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";
/// How long an accepted token is trusted without asking again. A pod's deletion invalidates
/// its tokens; a call within this window after it finds no pod.
const REVIEW_TTL: Duration = Duration::from_secs(60);
/// Entries per cache: beyond this, expired entries go, and if none had, all.
pub(super) const CACHE_ENTRIES: usize = 10_000;
pub(super) const API_TIMEOUT: Duration = Duration::from_secs(5);

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
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::NoToken | Refusal::NotAuthenticated(_) | Refusal::WrongAudience => StatusCode::UNAUTHORIZED,
            Refusal::NotServiceAccount(_) | Refusal::NotBoundToPod => StatusCode::FORBIDDEN,
        }
    }
}

/// Why a pod is not one picotun injected (403). Each says which check failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NotInjected {
    #[error("{0}; only pods picotun injected may call this endpoint")]
    Ticket(#[from] TicketError),
    #[error(
        "container {container} mounts {volume}, a credential of the {} sidecar (its token or key); only the sidecar may",
        api::SIDECAR_NAME
    )]
    ForeignMount { container: String, volume: String },
    #[error("ephemeral container {0} shares the {sidecar} sidecar's processes (targetContainerName)", sidecar = api::SIDECAR_NAME)]
    TargetsSidecar(String),
    #[error("the pod sets shareProcessNamespace: every container could read the sidecar's token")]
    SharedProcessNamespace,
    #[error("the token is service account {token:?}'s but the pod runs as {pod:?}")]
    ServiceAccount { token: String, pod: String },
    #[error("the pod opts out of injection ({}=false): picotun did not inject it", api::INJECT)]
    OptedOut,
    #[error(
        "namespace {0} is not labeled {1}: the webhook injects no pod there, so a ticket on one was not made for it \
         (--injection-namespace-selector)"
    )]
    NamespaceNotEnabled(String, String),
}

/// Whether pods of `namespace` (with these labels, None if unknown) can be injected at all: its
/// labels include all of `selector` (the webhook configuration's namespaceSelector). The
/// admission endpoint answers whoever calls it, so a ticket proves only what the webhook would
/// inject *if* asked; whether it is asked is what the namespace's labels decide.
pub fn check_namespace(
    namespace: &str,
    labels: Option<&std::collections::BTreeMap<String, String>>,
    selector: &kube::core::Selector,
) -> Result<(), NotInjected> {
    use kube::core::SelectorExt;
    let none = std::collections::BTreeMap::new();
    if selector.matches(labels.unwrap_or(&none)) {
        Ok(())
    } else {
        Err(NotInjected::NamespaceNotEnabled(namespace.to_string(), selector.to_string()))
    }
}

/// Whether `pod`, as it is now, runs picotun's sidecar as the webhook injected it, alone with its
/// token. `id` is who the token says is calling.
pub fn check_pod(pod: &Pod, id: &PodIdentity, key: &TicketKey) -> Result<(), NotInjected> {
    key.verify_pod(pod, &id.namespace)?;
    let runs_as = ticket::service_account_of(pod);
    if runs_as != id.service_account {
        return Err(NotInjected::ServiceAccount { token: id.service_account.clone(), pod: runs_as.to_string() });
    }
    if let Some((container, volume)) = inject::foreign_mounts(pod).into_iter().next() {
        return Err(NotInjected::ForeignMount { container, volume });
    }
    let spec = pod.spec.as_ref();
    if let Some(c) = spec
        .and_then(|s| s.ephemeral_containers.as_ref())
        .into_iter()
        .flatten()
        .find(|c| c.target_container_name.as_deref() == Some(api::SIDECAR_NAME))
    {
        return Err(NotInjected::TargetsSidecar(c.name.clone()));
    }
    if spec.and_then(|s| s.share_process_namespace) == Some(true) {
        return Err(NotInjected::SharedProcessNamespace);
    }
    // The webhook never injects a pod that opts out: a ticket on one was copied there.
    let meta = &pod.metadata;
    if [&meta.labels, &meta.annotations]
        .iter()
        .any(|m| api::switch(m.as_ref().and_then(|m| m.get(api::INJECT))) == Some(false))
    {
        return Err(NotInjected::OptedOut);
    }
    Ok(())
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

/// The token after `Bearer `, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Entries that expire, bounded in number.
pub(super) struct Expiring<K, V> {
    pub(super) entries: HashMap<K, (Instant, V)>,
    ttl: Duration,
}

impl<K: std::hash::Hash + Eq, V: Clone> Expiring<K, V> {
    pub(super) fn new(ttl: Duration) -> Self {
        Expiring { entries: HashMap::new(), ttl }
    }

    pub(super) fn get(&self, key: &K) -> Option<V> {
        self.entries.get(key).filter(|(at, _)| at.elapsed() < self.ttl).map(|(_, v)| v.clone())
    }

    pub(super) fn put(&mut self, key: K, value: V) {
        if self.entries.len() >= CACHE_ENTRIES {
            let ttl = self.ttl;
            self.entries.retain(|_, (at, _)| at.elapsed() < ttl);
            if self.entries.len() >= CACHE_ENTRIES {
                self.entries.clear();
            }
        }
        self.entries.insert(key, (Instant::now(), value));
    }

    pub(super) fn remove(&mut self, key: &K) {
        self.entries.remove(key);
    }
}

/// How a call ended: HTTP status, metric result, and a reason for the caller.
pub struct Outcome {
    pub status: StatusCode,
    pub result: &'static str,
    pub message: String,
}

pub fn outcome(status: StatusCode, result: &'static str, message: impl Into<String>) -> Outcome {
    Outcome { status, result, message: message.into() }
}

/// Checks tokens (TokenReview, recent successes cached) and pods, for both endpoints.
pub struct Verifier {
    /// Keys the token hashes, so the cache holds nothing that could be replayed.
    hash_key: [u8; 32],
    reviews: Mutex<Expiring<Vec<u8>, PodIdentity>>,
    ticket_key: Option<TicketKey>,
    /// The labels a namespace needs for its pods to be served ([`check_namespace`]).
    namespace_selector: kube::core::Selector,
}

impl Verifier {
    pub fn new(ticket_key: Option<TicketKey>, namespace_selector: kube::core::Selector) -> Verifier {
        Verifier {
            hash_key: rand::rng().random(),
            reviews: Mutex::new(Expiring::new(REVIEW_TTL)),
            ticket_key,
            namespace_selector,
        }
    }

    pub(super) fn token_hash(&self, token: &str) -> Vec<u8> {
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

    /// Who the token (already taken from the headers) speaks for.
    pub async fn identify(&self, client: &kube::Client, token: &str) -> Result<PodIdentity, Outcome> {
        match self.review(client, token).await {
            Ok(Ok(id)) => Ok(id),
            Ok(Err(refusal)) => {
                let result = if refusal.status() == StatusCode::FORBIDDEN { "forbidden" } else { "unauthenticated" };
                Err(outcome(refusal.status(), result, refusal.to_string()))
            }
            Err(e) => Err(outcome(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e)),
        }
    }

    /// The token's pod as it is now, if it is still that pod and one picotun injected, in a
    /// namespace labeled for injection (`namespaces`: the webhook's namespace cache).
    pub async fn injected_pod(
        &self,
        client: &kube::Client,
        id: &PodIdentity,
        namespaces: Option<&kube::runtime::reflector::Store<k8s_openapi::api::core::v1::Namespace>>,
    ) -> Result<Pod, Outcome> {
        let Some(key) = &self.ticket_key else {
            let msg = "the webhook has no ticket key and cannot tell which pods it injected";
            return Err(outcome(StatusCode::SERVICE_UNAVAILABLE, "unavailable", msg));
        };
        let pods: Api<Pod> = Api::namespaced(client.clone(), &id.namespace);
        let pod = match tokio::time::timeout(API_TIMEOUT, pods.get_opt(&id.pod_name)).await {
            Ok(Ok(Some(p))) => p,
            Ok(Ok(None)) => return Err(outcome(StatusCode::NOT_FOUND, "pod_gone", "the token's pod no longer exists")),
            Ok(Err(e)) => {
                return Err(outcome(StatusCode::SERVICE_UNAVAILABLE, "unavailable", format!("reading the pod: {e}")));
            }
            Err(_) => return Err(outcome(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "reading the pod timed out")),
        };
        if pod.metadata.uid.as_deref() != Some(id.pod_uid.as_str()) {
            let msg = "the token's pod was replaced by another of the same name";
            return Err(outcome(StatusCode::NOT_FOUND, "pod_gone", msg));
        }
        check_pod(&pod, id, key).map_err(|e| outcome(StatusCode::FORBIDDEN, "forbidden", e.to_string()))?;
        let labels = namespaces
            .and_then(|store| store.get(&kube::runtime::reflector::ObjectRef::new(&id.namespace)))
            .and_then(|ns| ns.metadata.labels.clone());
        check_namespace(&id.namespace, labels.as_ref(), &self.namespace_selector)
            .map_err(|e| outcome(StatusCode::FORBIDDEN, "forbidden", e.to_string()))?;
        Ok(pod)
    }
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
        let a = Verifier::new(None, Default::default());
        let b = Verifier::new(None, Default::default());
        assert_eq!(a.token_hash("t1"), a.token_hash("t1"));
        assert_ne!(a.token_hash("t1"), a.token_hash("t2"));
        assert_ne!(a.token_hash("t1"), b.token_hash("t1"), "a per-process key");
    }

    /// A pod as the webhook injects it (certificate mode, reporting on), ticketed with `key`.
    fn injected(key: &TicketKey, namespace: &str) -> Pod {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": namespace, "uid": "u-1",
                         "annotations": {"tunnels.pico.sh/inject": "true"}},
            "spec": {"serviceAccountName": "web", "containers": [{"name": "app", "image": "app"}]},
        }))
        .unwrap();
        let config = inject::InjectConfig {
            report_url: "https://picotun-webhook.pico-sh-system.svc:8444/report".into(),
            auth: inject::SidecarAuth::Certificate,
            ticket_key: Some(key.clone()),
            ..Default::default()
        };
        inject::mutate(&pod, namespace, None, &[], false, &config).pod.unwrap()
    }

    fn id(namespace: &str) -> PodIdentity {
        PodIdentity {
            namespace: namespace.into(),
            service_account: "web".into(),
            pod_name: "web-1".into(),
            pod_uid: "u-1".into(),
        }
    }

    #[test]
    fn only_namespaces_labeled_for_injection_are_served() {
        let selector = api::parse_label_selector("tunnels.pico.sh/injection=enabled").unwrap();
        let labeled =
            std::collections::BTreeMap::from([(api::NAMESPACE_INJECTION_LABEL.to_string(), "enabled".into())]);
        assert_eq!(check_namespace("team-a", Some(&labeled), &selector), Ok(()));
        let off = std::collections::BTreeMap::from([(api::NAMESPACE_INJECTION_LABEL.to_string(), "disabled".into())]);
        for labels in [None, Some(&off), Some(&std::collections::BTreeMap::new())] {
            let err = check_namespace("team-b", labels, &selector).unwrap_err();
            assert!(matches!(err, NotInjected::NamespaceNotEnabled(ref ns, _) if ns == "team-b"), "{err}");
            assert!(err.to_string().contains("is not labeled tunnels.pico.sh/injection=enabled"), "{err}");
        }
    }

    #[test]
    fn an_injected_pod_passes_and_each_way_around_it_is_named() {
        let key = TicketKey::from_bytes(&[5; 32]).unwrap();
        let pod = injected(&key, "team-a");
        assert_eq!(check_pod(&pod, &id("team-a"), &key), Ok(()));

        // The author adds the container and the token volume himself: no ticket.
        let mut forged = pod.clone();
        forged.metadata.annotations.as_mut().unwrap().remove(api::INJECTED);
        assert_eq!(check_pod(&forged, &id("team-a"), &key), Err(NotInjected::Ticket(TicketError::Missing)));
        // The same pod in another namespace, ticket and all.
        assert_eq!(check_pod(&pod, &id("team-b"), &key), Err(NotInjected::Ticket(TicketError::Mismatch)));
        // The app mounts the token volume.
        let mut mounted = pod.clone();
        mounted.spec.as_mut().unwrap().containers[0].volume_mounts =
            Some(vec![serde_json::from_value(json!({"name": "picotun-report-token", "mountPath": "/t"})).unwrap()]);
        assert_eq!(
            check_pod(&mounted, &id("team-a"), &key),
            Err(NotInjected::ForeignMount { container: "app".into(), volume: "picotun-report-token".into() })
        );
        // Another projected token for the audience, mounted by the app.
        let mut own_token = pod.clone();
        let spec = own_token.spec.as_mut().unwrap();
        spec.volumes.as_mut().unwrap().push(
            serde_json::from_value(json!({"name": "mine", "projected": {"sources": [
                {"serviceAccountToken": {"audience": "tunnels.pico.sh", "path": "t"}}]}}))
            .unwrap(),
        );
        spec.containers[0].volume_mounts =
            Some(vec![serde_json::from_value(json!({"name": "mine", "mountPath": "/t"})).unwrap()]);
        assert!(matches!(
            check_pod(&own_token, &id("team-a"), &key),
            Err(NotInjected::ForeignMount { volume, .. }) if volume == "mine"
        ));
        // An ephemeral container (kubectl debug) mounting it, or sharing the sidecar's processes.
        let mut debug = pod.clone();
        debug.spec.as_mut().unwrap().ephemeral_containers = Some(vec![
            serde_json::from_value(
                json!({"name": "debugger", "image": "busybox", "targetContainerName": "picotun-agent"}),
            )
            .unwrap(),
        ]);
        assert_eq!(check_pod(&debug, &id("team-a"), &key), Err(NotInjected::TargetsSidecar("debugger".into())));
        let mut shared = pod.clone();
        shared.spec.as_mut().unwrap().share_process_namespace = Some(true);
        assert_eq!(check_pod(&shared, &id("team-a"), &key), Err(NotInjected::SharedProcessNamespace));
        // A copy in the same namespace, opted out so the webhook leaves it alone.
        let mut opted_out = pod.clone();
        opted_out.metadata.labels = Some([("tunnels.pico.sh/inject".to_string(), "false".to_string())].into());
        assert_eq!(check_pod(&opted_out, &id("team-a"), &key), Err(NotInjected::OptedOut));
        // A token of another service account than the pod's (cannot happen with a bound token;
        // checked all the same).
        let other = PodIdentity { service_account: "admin".into(), ..id("team-a") };
        assert!(matches!(check_pod(&pod, &other, &key), Err(NotInjected::ServiceAccount { .. })));
        // Messages say what failed.
        assert!(NotInjected::SharedProcessNamespace.to_string().contains("shareProcessNamespace"));
        assert!(NotInjected::Ticket(TicketError::Missing).to_string().contains("tunnels.pico.sh/injected"));
    }
}
