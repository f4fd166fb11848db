//! The admission exchange: bytes of an AdmissionReview in, an answer out. Parsing failures are
//! answered with a clear error; anything about a pod that is not ours, or that picotun cannot
//! read, is admitted unchanged -- the webhook never denies.

use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};

use crate::core::pod::{Decision, Workload};
use crate::core::tunnel::TunnelSpec;
use crate::resolve::ownership::Ownership;
use crate::webhook::inject::{self, InjectConfig};

/// The apiserver never sends more than its 3 MiB request limit (plus JSON overhead).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Why a request could not be read at all.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadRequest {
    #[error("content type must be application/json, got {0:?}")]
    ContentType(String),
    #[error("malformed AdmissionReview: {0}")]
    Malformed(String),
    #[error("the AdmissionReview carries no request")]
    NoRequest,
}

pub fn parse(content_type: Option<&str>, body: &[u8]) -> Result<AdmissionRequest<DynamicObject>, BadRequest> {
    let ct = content_type.unwrap_or("");
    if !ct.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json")) {
        return Err(BadRequest::ContentType(ct.to_string()));
    }
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_slice(body).map_err(|e| BadRequest::Malformed(e.to_string()))?;
    review.try_into().map_err(|_| BadRequest::NoRequest)
}

/// The answer, and what it means for metrics.
pub struct Answer {
    pub response: AdmissionResponse,
    /// `injected`, `skipped`, `not_a_pod_create`, `unreadable_pod`.
    pub result: &'static str,
    pub decision: Option<Decision>,
}

/// A request as the webhook acts on it: the pod in it is read once -- converting the request's
/// object into a Pod is most of what a pod that is not ours costs -- and every step after sees the
/// same pod and the same namespace.
pub struct Admission<'r> {
    pub request: &'r AdmissionRequest<DynamicObject>,
    /// The pod being created; None for anything else (another kind, an update, a subresource),
    /// Err when the object does not read as a Pod.
    pub pod: Option<Result<Pod, String>>,
    /// Where the pod is created: the request's namespace, else the pod's own.
    pub namespace: String,
}

impl<'r> Admission<'r> {
    pub fn of(request: &'r AdmissionRequest<DynamicObject>) -> Self {
        let pod = pod_of(request);
        let namespace = request
            .namespace
            .clone()
            .or_else(|| pod.as_ref().and_then(|p| p.as_ref().ok()).and_then(|p| p.metadata.namespace.clone()))
            .unwrap_or_default();
        Admission { request, pod, namespace }
    }

    /// The pod, when this is a pod creation picotun could read.
    pub fn readable_pod(&self) -> Option<&Pod> {
        self.pod.as_ref().and_then(|p| p.as_ref().ok())
    }
}

fn pod_of(req: &AdmissionRequest<DynamicObject>) -> Option<Result<Pod, String>> {
    let is_pod = req.kind.group.is_empty() && req.kind.kind == "Pod" && req.sub_resource.is_none();
    if !is_pod || req.operation != Operation::Create {
        return None;
    }
    let object = req.object.as_ref()?;
    Some(serde_json::to_value(object).and_then(serde_json::from_value::<Pod>).map_err(|e| e.to_string()))
}

/// What the webhook learned about a pod beyond its request.
#[derive(Default)]
pub struct Findings<'a> {
    /// The Deployment (or other workload) that owns the pod, read from the cluster.
    pub workload: Option<&'a Workload>,
    /// The tunnels routes already ask of this pod (the controller's resolution, for this pod).
    pub route_tunnels: &'a [TunnelSpec],
    /// Who owns every name across the cluster (the webhook's index; None without one): the
    /// pod's own expose tunnels are kept to those its namespace owns.
    pub owners: Option<&'a Ownership>,
    /// What went wrong on the way, for the user (a workload that could not be read).
    pub warnings: Vec<String>,
}

pub fn answer(admission: &Admission, findings: Findings, inject_route_backends: bool, config: &InjectConfig) -> Answer {
    let allow = AdmissionResponse::from(admission.request);
    let pod = match &admission.pod {
        None => return Answer { response: allow, result: "not_a_pod_create", decision: None },
        Some(Err(e)) => {
            let mut response = allow;
            response.warnings =
                Some(vec![format!("picotun could not read this pod ({e}); admitted without a tunnel sidecar")]);
            return Answer { response, result: "unreadable_pod", decision: None };
        }
        Some(Ok(pod)) => pod,
    };
    let Findings { workload, route_tunnels, owners, mut warnings } = findings;
    let outcome =
        inject::mutate_owned(pod, &admission.namespace, workload, route_tunnels, owners, inject_route_backends, config);
    warnings.extend(outcome.warnings);
    let with_warnings = |mut response: AdmissionResponse, warnings: Vec<String>| {
        if !warnings.is_empty() {
            response.warnings = Some(warnings.into_iter().map(|w| format!("picotun: {w}")).collect());
        }
        response
    };
    let Some(injected) = outcome.pod else {
        // A skipped pod may still carry a warning worth the user's eyes (a volume named like
        // picotun's): it goes back with the unchanged pod.
        return Answer {
            response: with_warnings(allow, warnings),
            result: "skipped",
            decision: Some(outcome.decision),
        };
    };
    let patch = inject::patch(pod, &injected);
    let mut response = if patch.0.is_empty() {
        allow
    } else {
        match allow.clone().with_patch(patch) {
            Ok(r) => r,
            Err(e) => {
                warnings.push(format!("picotun could not encode its patch ({e}); admitted without a tunnel sidecar"));
                allow
            }
        }
    };
    response = with_warnings(response, warnings);
    Answer { response, result: "injected", decision: Some(outcome.decision) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn review(object: serde_json::Value, kind: &str, operation: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "u-1",
                "kind": {"group": "", "version": "v1", "kind": kind},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "requestKind": {"group": "", "version": "v1", "kind": kind},
                "requestResource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "apps",
                "operation": operation,
                "userInfo": {"username": "u"},
                "object": object,
                "dryRun": false,
            }
        }))
        .unwrap()
    }

    fn pod(annotations: serde_json::Value) -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "annotations": annotations},
               "spec": {"containers": [{"name": "app", "image": "x"}]}})
    }

    fn run(body: &[u8]) -> Answer {
        let req = parse(Some("application/json"), body).unwrap();
        answer(&Admission::of(&req), Findings::default(), false, &InjectConfig::default())
    }

    #[test]
    fn injects_an_opted_in_pod_with_a_patch() {
        let a = run(&review(pod(json!({"tunnels.pico.sh/inject": "true"})), "Pod", "CREATE"));
        assert_eq!(a.result, "injected");
        assert!(a.response.allowed);
        assert!(a.response.patch.is_some());
        assert_eq!(a.response.uid, "u-1");
    }

    #[test]
    fn other_pods_and_objects_pass_unchanged() {
        for (body, result) in [
            (review(pod(json!({})), "Pod", "CREATE"), "skipped"),
            (review(pod(json!({"tunnels.pico.sh/inject": "true"})), "Pod", "UPDATE"), "not_a_pod_create"),
            (
                review(
                    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}),
                    "ConfigMap",
                    "CREATE",
                ),
                "not_a_pod_create",
            ),
            (
                review(
                    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "annotations": {"tunnels.pico.sh/inject": "true"}}, "spec": {"containers": "nope"}}),
                    "Pod",
                    "CREATE",
                ),
                "unreadable_pod",
            ),
        ] {
            let a = run(&body);
            assert_eq!(a.result, result);
            assert!(a.response.allowed, "{result}: never denied");
            assert!(a.response.patch.is_none(), "{result}: no patch");
        }
    }

    #[test]
    fn unreadable_requests_are_errors_not_panics() {
        assert!(matches!(parse(Some("text/plain"), b"{}"), Err(BadRequest::ContentType(_))));
        assert!(matches!(parse(None, b"{}"), Err(BadRequest::ContentType(_))));
        assert!(matches!(parse(Some("application/json"), b"{"), Err(BadRequest::Malformed(_))));
        assert!(matches!(parse(Some("application/json"), b"[]"), Err(BadRequest::Malformed(_))));
        let no_request = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#;
        assert!(parse(Some("application/json; charset=utf-8"), no_request).is_err());
    }

    /// Property test: whatever bytes arrive, parsing and answering never panic, and any pod
    /// creation that parses is admitted.
    #[test]
    fn arbitrary_input_never_panics_and_never_denies() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let base = review(
            pod(json!({"tunnels.pico.sh/inject": "true", "tunnels.pico.sh/expose": "http:demo=80"})),
            "Pod",
            "CREATE",
        );
        for _ in 0..5000 {
            let mut body = base.clone();
            // Flip, drop or duplicate a few bytes.
            for _ in 0..(next() % 4 + 1) {
                let i = (next() as usize) % body.len();
                match next() % 3 {
                    0 => body[i] = (next() % 256) as u8,
                    1 => {
                        body.remove(i);
                    }
                    _ => body.insert(i, body[i]),
                }
            }
            if let Ok(req) = parse(Some("application/json"), &body) {
                let a = answer(&Admission::of(&req), Findings::default(), false, &InjectConfig::default());
                assert!(a.response.allowed);
            }
        }
    }
}
