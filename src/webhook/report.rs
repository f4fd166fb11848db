//! `POST /report`: sidecars push their `/status` here and the public addresses become their pod's
//! `tunnels.pico.sh/addresses` annotation -- the agent has no Kubernetes access, the webhook has.
//!
//! ```text
//! agent ─HTTPS, Bearer <projected token: audience tunnels.pico.sh, bound to its pod>─► /report
//!   │ body (<= 64 KiB, read within --body-read-timeout) -> tunnels (pure)      400 malformed
//!   ▼
//! identity: TokenReview, the pod as it is now, injected by picotun?          401 / 403 / 404
//!   ▼
//! each tunnel checked against the pod's tunnels annotation and the server domains (pure):
//!   unknown names, unknown states, addresses that are not http/https/tcp with a valid DNS host
//!   under a server domain (or the custom domain the tunnel asked for) are dropped, counted, logged
//!   ▼
//! value already there? ─► merge patch (uid precondition)
//! ```
//!
//! The pod annotation is the record: `kubectl get pod -o yaml` shows it and the controller reads
//! it from its pod cache into Ingress and Gateway status -- so nothing reaches it unchecked: one
//! host that fails the Gateway CRD's validation would make every status patch of that Gateway
//! fail. Needs RBAC: `create` tokenreviews, `get` and `patch` pods.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::identity::{API_TIMEOUT, Expiring, Outcome, PodIdentity, Refusal, bearer, outcome};
use super::{AppState, ReasonLabels, ResultLabels};
use crate::core::api;
pub use crate::core::report::{check_address, default_domains};
use crate::core::tunnel::{TunnelSpec, TunnelsFile};

/// A status document of a few dozen tunnels is a few KiB; the annotation must stay far below
/// the apiserver's 256 KiB for all of a pod's annotations.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// How long the value last written to a pod is trusted to still be there; after this the pod
/// is read again, so an annotation someone removed is restored by the next heartbeat.
const WRITTEN_TTL: Duration = Duration::from_secs(300);
/// The states an agent reports (`ForwardState` as the agent's /status spells it).
pub const KNOWN_STATES: [&str; 7] =
    ["waitingForApp", "connecting", "requesting", "established", "standingBy", "failed", "draining"];

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

/// One tunnel of a posted status, as posted.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PostedTunnel {
    pub name: String,
    pub state: String,
    #[serde(default)]
    pub public_address: Option<String>,
}

#[derive(Serialize)]
struct Addresses<'a> {
    tunnels: BTreeMap<&'a str, TunnelAddress<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TunnelAddress<'a> {
    state: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    public_address: Option<&'a str>,
}

/// The tunnels of a posted `/status`, by name (sorted; names unique).
pub fn parse_status(body: &[u8]) -> Result<Vec<PostedTunnel>, BadStatus> {
    let posted: PostedStatus = serde_json::from_slice(body).map_err(|e| BadStatus::Malformed(e.to_string()))?;
    let mut tunnels: BTreeMap<String, PostedTunnel> = BTreeMap::new();
    for mut t in posted.tunnels {
        if t.name.is_empty() || t.name.len() > 253 {
            return Err(BadStatus::Name(t.name));
        }
        t.public_address = t.public_address.filter(|a| !a.is_empty());
        if tunnels.insert(t.name.clone(), t.clone()).is_some() {
            return Err(BadStatus::Duplicate(t.name));
        }
    }
    Ok(tunnels.into_values().collect())
}

/// The annotation value for `tunnels`: compact JSON, by name, state and public address only.
pub fn annotation(tunnels: &[PostedTunnel]) -> String {
    let tunnels = tunnels
        .iter()
        .map(|t| (t.name.as_str(), TunnelAddress { state: &t.state, public_address: t.public_address.as_deref() }))
        .collect();
    serde_json::to_string(&Addresses { tunnels }).expect("strings serialize")
}

/// Why one reported tunnel was left out of the annotation.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Dropped {
    #[error("not one of the pod's tunnels ({} annotation)", api::TUNNELS)]
    UnknownTunnel,
    #[error("state {0:?} is not one an agent reports")]
    UnknownState(String),
    #[error("public address {address:?}: {why}")]
    Address { reason: &'static str, address: String, why: String },
}

impl Dropped {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Dropped::UnknownTunnel => "unknown_tunnel",
            Dropped::UnknownState(_) => "unknown_state",
            Dropped::Address { reason, .. } => reason,
        }
    }
}

/// What is kept of a report, and what was dropped (tunnel name, why).
#[derive(Debug, PartialEq, Eq)]
pub struct Checked {
    pub kept: Vec<PostedTunnel>,
    pub dropped: Vec<(String, Dropped)>,
}

/// Keeps the reported tunnels the pod was asked to open, in a state an agent reports, at an
/// address the tunnel can have: see [`check_address`].
pub fn check(posted: &[PostedTunnel], asked: &[TunnelSpec], domains: &[String]) -> Checked {
    let mut out = Checked { kept: Vec::new(), dropped: Vec::new() };
    for t in posted {
        let verdict = match asked.iter().find(|s| s.name == t.name) {
            None => Err(Dropped::UnknownTunnel),
            Some(_) if !KNOWN_STATES.contains(&t.state.as_str()) => Err(Dropped::UnknownState(t.state.clone())),
            Some(spec) => match &t.public_address {
                Some(a) => check_address(a, spec, Some(domains)).map_err(|(reason, why)| Dropped::Address {
                    reason,
                    address: shorten(a),
                    why,
                }),
                None => Ok(()),
            },
        };
        match verdict {
            Ok(()) => out.kept.push(t.clone()),
            Err(d) => out.dropped.push((shorten(&t.name), d)),
        }
    }
    out
}

/// For logs and answers: at most 80 characters of what a caller sent.
fn shorten(s: &str) -> String {
    if s.chars().count() <= 80 { s.to_string() } else { format!("{}...", s.chars().take(80).collect::<String>()) }
}

/// The `/report` endpoint's state: its cache and metrics.
pub(super) struct Reports {
    /// Per pod uid: (what was posted, the annotation value last written or found for it).
    written: Mutex<Expiring<String, (String, String)>>,
    reports: Family<ResultLabels, Counter>,
    dropped: Family<ReasonLabels, Counter>,
    domains: Vec<String>,
}

impl Reports {
    pub(super) fn new(registry: &mut Registry, domains: Vec<String>) -> Self {
        let reports = Family::<ResultLabels, Counter>::default();
        let dropped = Family::<ReasonLabels, Counter>::default();
        let r = registry.sub_registry_with_prefix("picotun_webhook");
        r.register(
            "reports",
            "Sidecar status reports by result (written, unchanged, bad_request, unauthenticated, forbidden, pod_gone, \
             unavailable)",
            reports.clone(),
        );
        r.register(
            "report_entries_dropped",
            "Reported tunnels left out of the addresses annotation, by reason (unknown_tunnel, unknown_state, \
             bad_scheme, bad_address, bad_host, outside_domain, not_requested)",
            dropped.clone(),
        );
        Reports { written: Mutex::new(Expiring::new(WRITTEN_TTL)), reports, dropped, domains }
    }

    async fn serve(&self, state: &AppState, headers: &HeaderMap, body: Body) -> (Outcome, Option<PodIdentity>) {
        let Some(token) = bearer(headers) else {
            return (outcome(StatusCode::UNAUTHORIZED, "unauthenticated", Refusal::NoToken.to_string()), None);
        };
        let body = match super::read_body(body, MAX_BODY_BYTES, state.body_read_timeout).await {
            Ok(b) => b,
            Err((status, msg)) => return (outcome(status, "bad_request", msg), None),
        };
        let posted = match parse_status(&body) {
            Ok(v) => v,
            Err(e) => return (outcome(StatusCode::BAD_REQUEST, "bad_request", e.to_string()), None),
        };
        let Some(client) = state.client.as_ref() else {
            let msg = "the webhook has no Kubernetes API access and cannot record reports";
            return (outcome(StatusCode::SERVICE_UNAVAILABLE, "unavailable", msg), None);
        };
        let id = match state.verifier.identify(client, token).await {
            Ok(id) => id,
            Err(o) => return (o, None),
        };
        let done = self.record(state, client, &id, &posted).await;
        (done, Some(id))
    }

    /// Checks the report against the pod and writes what is kept, unless it is already there.
    async fn record(
        &self,
        state: &AppState,
        client: &kube::Client,
        id: &PodIdentity,
        posted: &[PostedTunnel],
    ) -> Outcome {
        let as_posted = annotation(posted);
        let cached = self.written.lock().unwrap_or_else(|p| p.into_inner()).get(&id.pod_uid);
        if cached.as_ref().is_some_and(|(p, _)| *p == as_posted) {
            return outcome(StatusCode::OK, "unchanged", "unchanged");
        }
        let pod = match state.verifier.injected_pod(client, id, state.index.as_ref().map(|i| &i.namespaces)).await {
            Ok(p) => p,
            Err(o) => return o,
        };
        let asked = asked_tunnels(&pod);
        let checked = check(posted, &asked, &self.domains);
        for (tunnel, why) in &checked.dropped {
            self.dropped.get_or_create(&ReasonLabels { reason: why.reason().into() }).inc();
            warn!(
                namespace = %id.namespace, pod = %id.pod_name, tunnel = %tunnel, reason = why.reason(), detail = %why,
                "reported tunnel dropped"
            );
        }
        let value = annotation(&checked.kept);
        let note = if checked.dropped.is_empty() {
            String::new()
        } else {
            let reasons: Vec<String> = checked.dropped.iter().map(|(t, d)| format!("tunnel {t:?}: {d}")).collect();
            format!(" (dropped: {})", reasons.join("; "))
        };
        let remember = |value: String| {
            self.written.lock().unwrap_or_else(|p| p.into_inner()).put(id.pod_uid.clone(), (as_posted.clone(), value))
        };
        let current = pod.metadata.annotations.as_ref().and_then(|a| a.get(api::ADDRESSES));
        if current == Some(&value) {
            remember(value);
            return outcome(StatusCode::OK, "unchanged", format!("unchanged{note}"));
        }
        // The uid in the patch is a precondition: a pod recreated under the same name in the
        // meantime is not written.
        let patch = serde_json::json!({"metadata": {"uid": id.pod_uid, "annotations": {api::ADDRESSES: value}}});
        let pods: Api<Pod> = Api::namespaced(client.clone(), &id.namespace);
        let params = PatchParams::default();
        match tokio::time::timeout(API_TIMEOUT, pods.patch(&id.pod_name, &params, &Patch::Merge(&patch))).await {
            Ok(Ok(_)) => {
                remember(value);
                outcome(StatusCode::OK, "written", format!("written{note}"))
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

/// The tunnels the pod was asked to open: its tunnels annotation (none if it does not parse).
fn asked_tunnels(pod: &Pod) -> Vec<TunnelSpec> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(api::TUNNELS))
        .and_then(|t| TunnelsFile::parse(t).ok())
        .map(|f| f.tunnels)
        .unwrap_or_default()
}

/// `POST /report`.
pub(super) async fn handle(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let (done, id) = state.reports.serve(&state, &headers, body).await;
    state.reports.reports.get_or_create(&ResultLabels { result: done.result.into() }).inc();
    let (namespace, pod) = id.as_ref().map(|i| (i.namespace.as_str(), i.pod_name.as_str())).unwrap_or_default();
    match done.result {
        "written" => info!(namespace, pod, "public addresses recorded on the pod"),
        "unchanged" => debug!(namespace, pod, "report unchanged"),
        "unavailable" => warn!(namespace, pod, reason = %done.message, "report not recorded"),
        "forbidden" => info!(namespace, pod, reason = %done.message, "report refused"),
        // The caller's own problem: said in the answer, not worth more than debug here.
        _ => debug!(namespace, pod, status = done.status.as_u16(), reason = %done.message, "report refused"),
    }
    (done.status, format!("{}\n", done.message)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(json: serde_json::Value) -> TunnelSpec {
        serde_json::from_value(json).unwrap()
    }

    fn http(name: &str, host: &str) -> TunnelSpec {
        spec(json!({"name": name, "kind": "http", "host": host, "targetPort": 8080}))
    }

    fn tcp(name: &str, port: Option<u16>) -> TunnelSpec {
        spec(json!({"name": name, "kind": "tcp", "remotePort": port, "targetPort": 5432}))
    }

    fn posted(name: &str, state: &str, address: Option<&str>) -> PostedTunnel {
        PostedTunnel { name: name.into(), state: state.into(), public_address: address.map(str::to_string) }
    }

    fn domains() -> Vec<String> {
        vec!["tuns.sh".into()]
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
        let tunnels = parse_status(status.to_string().as_bytes()).unwrap();
        assert_eq!(
            annotation(&tunnels),
            r#"{"tunnels":{"db":{"state":"connecting"},"web":{"state":"established","publicAddress":"https://u-demo.tuns.sh"}}}"#
        );
        assert_eq!(annotation(&parse_status(br#"{"tunnels":[]}"#).unwrap()), r#"{"tunnels":{}}"#);
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
            let err = parse_status(body).unwrap_err().to_string();
            assert!(err.contains(want), "{}: {err}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn only_the_pods_own_tunnels_in_known_states_are_kept() {
        let asked = [http("web", "demo"), tcp("db", Some(5432))];
        let report = [
            posted("web", "established", Some("https://alice-demo.tuns.sh")),
            posted("db", "connecting", None),
            posted("stolen", "established", Some("https://alice-bank.tuns.sh")),
            posted("web2", "nonsense", None),
        ];
        let checked = check(&report, &asked, &domains());
        assert_eq!(checked.kept, report[..2].to_vec());
        assert_eq!(
            checked.dropped.iter().map(|(t, d)| (t.as_str(), d.reason())).collect::<Vec<_>>(),
            [("stolen", "unknown_tunnel"), ("web2", "unknown_tunnel")]
        );
        let weird = [posted("web", "hacked", None)];
        assert_eq!(check(&weird, &asked, &domains()).dropped[0].1, Dropped::UnknownState("hacked".into()));
        // Every state the agent has is one of the known ones.
        use crate::core::report::ForwardState as S;
        for s in [S::WaitingForApp, S::Connecting, S::Requesting, S::Established, S::StandingBy, S::Failed, S::Draining]
        {
            let name = serde_json::to_value(s).unwrap();
            assert!(KNOWN_STATES.contains(&name.as_str().unwrap()), "{name}");
        }
    }

    #[test]
    fn addresses_the_tunnel_can_have_are_kept() {
        let ok = |address: &str, spec: &TunnelSpec, domains: &[&str]| {
            let domains: Vec<String> = domains.iter().map(|d| d.to_string()).collect();
            check_address(address, spec, Some(&domains))
        };
        let demo = http("web", "demo");
        for good in [
            "https://alice-demo.tuns.sh",
            "http://alice-demo.tuns.sh",
            "https://demo.tuns.sh/",
            "http://demo-alice.tuns.test:41511",
        ] {
            assert_eq!(ok(good, &demo, &["tuns.sh", "tuns.test"]), Ok(()), "{good}");
        }
        let custom = http("shop", "shop.example.com");
        assert_eq!(ok("https://shop.example.com", &custom, &["tuns.sh"]), Ok(()));
        assert_eq!(ok("nue.tuns.sh:5432", &tcp("db", Some(5432)), &["nue.tuns.sh", "tuns.sh"]), Ok(()));
        assert_eq!(ok("tcp://tuns.test:38663", &tcp("db", None), &["tuns.test"]), Ok(()));
        let tls = spec(json!({"name": "t", "kind": "tls", "host": "demo", "targetPort": 8443}));
        assert_eq!(ok("demo-alice.tuns.test:443", &tls, &["tuns.test"]), Ok(()));

        for (bad, spec, reason) in [
            // Another tenant's name, or a name nobody asked for, under the right domain.
            ("https://alice-bank.tuns.sh", &demo, "not_requested"),
            ("https://x7k.tuns.sh", &demo, "not_requested"),
            ("https://demox.tuns.sh", &demo, "not_requested"),
            // Outside the server's domain: anything a Gateway's status would then show.
            ("https://demo.evil.example", &demo, "outside_domain"),
            ("https://demo.tuns.sh.evil.example", &demo, "outside_domain"),
            ("https://eviltuns.sh", &demo, "outside_domain"),
            ("https://www.example.com", &custom, "not_requested"),
            // Not a hostname the Gateway API accepts.
            ("https://Demo.tuns.sh", &demo, "bad_host"),
            ("https://demo_x.tuns.sh", &demo, "bad_host"),
            ("https://-demo.tuns.sh", &demo, "bad_host"),
            ("https://demo..tuns.sh", &demo, "bad_host"),
            ("https://127.0.0.1", &demo, "bad_host"),
            ("https://", &demo, "bad_host"),
            // Not http/https for an http tunnel; not host:port for tcp.
            ("javascript://demo.tuns.sh", &demo, "bad_scheme"),
            ("alice-demo.tuns.sh", &demo, "bad_scheme"),
            ("https://tuns.sh:5432", &tcp("db", None), "bad_scheme"),
            ("https://demo.tuns.sh/path", &demo, "bad_address"),
            ("https://user@demo.tuns.sh", &demo, "bad_address"),
            ("https://demo.tuns.sh:0", &demo, "bad_address"),
            ("https://demo.tuns.sh:99999", &demo, "bad_address"),
            ("https://demo.tuns.sh\n", &demo, "bad_address"),
            ("tuns.sh", &tcp("db", None), "bad_address"),
            ("[::1]:5432", &tcp("db", None), "bad_address"),
            ("tuns.sh:5433", &tcp("db", Some(5432)), "not_requested"),
        ] {
            let got = ok(bad, spec, &["tuns.sh"]);
            assert_eq!(got.as_ref().map_err(|(r, _)| *r), Err(reason), "{bad}: {got:?}");
        }
        let long = format!("https://{}.tuns.sh", "a".repeat(300));
        assert!(ok(&long, &demo, &["tuns.sh"]).is_err());
        // No domain configured (an IP server without --server-domain): only custom domains.
        assert_eq!(ok("https://demo.tuns.sh", &demo, &[]).map_err(|(r, _)| r), Err("outside_domain"));
        assert_eq!(ok("https://shop.example.com", &custom, &[]), Ok(()));
    }

    #[test]
    fn a_bad_address_drops_its_tunnel_only_and_says_why() {
        let asked = [http("web", "demo"), http("api", "api")];
        let report = [
            posted("web", "established", Some("https://x.evil.example")),
            posted("api", "established", Some("https://alice-api.tuns.sh")),
        ];
        let checked = check(&report, &asked, &domains());
        assert_eq!(checked.kept, report[1..].to_vec());
        let (tunnel, why) = &checked.dropped[0];
        assert_eq!((tunnel.as_str(), why.reason()), ("web", "outside_domain"));
        assert!(why.to_string().contains("x.evil.example") && why.to_string().contains("--server-domain"), "{why}");
        let long = "x".repeat(500);
        let dropped = check(&[posted(&long, "established", None)], &asked, &domains()).dropped;
        assert!(dropped[0].0.len() < 100, "what a caller sent is shortened in logs");
    }

    #[test]
    fn server_domains_by_default() {
        assert_eq!(default_domains("tuns.sh"), ["tuns.sh"]);
        assert_eq!(default_domains("nue.tuns.sh"), ["nue.tuns.sh", "tuns.sh"]);
        assert_eq!(default_domains("Tunnels.Example.com."), ["tunnels.example.com"]);
        assert!(default_domains("127.0.0.1").is_empty());
        assert!(default_domains("::1").is_empty());
    }
}
