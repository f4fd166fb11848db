//! Which pods are picotun's, and which tunnels a pod gets: the rules every mode applies the same
//! way -- the webhook when it injects, the controller when it writes a pod's tunnels or says a
//! sidecar is missing, `picotun explain` when it answers why. Pure.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod};

use crate::core::api;
use crate::core::tunnel::TunnelSpec;

/// Namespaces whose pods are never injected, whatever they say.
pub const SYSTEM_NAMESPACES: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];

/// The workload a pod belongs to (its metadata only), when known.
#[derive(Clone, Debug, Default)]
pub struct Workload {
    /// e.g. `Deployment/web`.
    pub reference: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// Why a pod is left alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SkipReason {
    SystemNamespace,
    OwnNamespace,
    HostNetwork,
    AlreadyInjected,
    OptedOut,
    NotOptedIn,
    /// The pod has a volume of its own named like one picotun adds (admitted without the sidecar).
    VolumeConflict,
}

impl SkipReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            SkipReason::SystemNamespace => "system_namespace",
            SkipReason::OwnNamespace => "own_namespace",
            SkipReason::HostNetwork => "host_network",
            SkipReason::AlreadyInjected => "already_injected",
            SkipReason::OptedOut => "opted_out",
            SkipReason::NotOptedIn => "not_opted_in",
            SkipReason::VolumeConflict => "volume_conflict",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// `because` names the label, annotation or route that decided.
    Inject {
        because: String,
    },
    Skip {
        reason: SkipReason,
        because: String,
    },
}

/// `map[key]`, for the optional label and annotation maps of object metadata.
pub fn lookup<'a>(map: &'a Option<BTreeMap<String, String>>, key: &str) -> Option<&'a String> {
    map.as_ref().and_then(|m| m.get(key))
}

/// The pods picotun never touches, whatever they say: system namespaces, picotun's own, host
/// network. None: the pod's own labels and annotations decide ([`opted_in`]).
pub fn never_injected(pod: &Pod, namespace: &str, own_namespace: &str) -> Option<Decision> {
    let skip = |reason, because: String| Decision::Skip { reason, because };
    if SYSTEM_NAMESPACES.contains(&namespace) {
        return Some(skip(SkipReason::SystemNamespace, format!("namespace {namespace} is never injected")));
    }
    if namespace == own_namespace {
        return Some(skip(SkipReason::OwnNamespace, format!("namespace {namespace} is picotun's own")));
    }
    if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
        return Some(skip(SkipReason::HostNetwork, "hostNetwork pods share the node's ports; not injected".into()));
    }
    None
}

/// Whether a pod asks for the sidecar: `inject` label or annotation on the pod (template) or
/// its workload ("false" anywhere wins), an expose annotation, or -- with `inject_route_backends`
/// -- a route picotun serves that selects it.
pub fn opted_in(
    pod: &Pod,
    workload: Option<&Workload>,
    route_tunnels: &[TunnelSpec],
    inject_route_backends: bool,
) -> Decision {
    let skip = |reason, because: String| Decision::Skip { reason, because };
    let meta = &pod.metadata;
    let from_pod = [("label", &meta.labels), ("annotation", &meta.annotations)].into_iter().find_map(|(what, map)| {
        api::switch(lookup(map, api::INJECT)).map(|on| (on, format!("pod {what} {}", api::INJECT)))
    });
    let from_workload = workload.and_then(|w| {
        [("label", &w.labels), ("annotation", &w.annotations)].into_iter().find_map(|(what, map)| {
            api::switch(map.get(api::INJECT)).map(|on| (on, format!("{} {what} {}", w.reference, api::INJECT)))
        })
    });
    // "false" anywhere wins.
    for (on, because) in [&from_pod, &from_workload].into_iter().flatten() {
        if !on {
            return skip(SkipReason::OptedOut, format!("{because}=false"));
        }
    }
    if let Some((_, because)) = from_pod.or(from_workload) {
        return Decision::Inject { because: format!("{because}=true") };
    }
    if lookup(&meta.annotations, api::EXPOSE).is_some() {
        return Decision::Inject { because: format!("pod annotation {}", api::EXPOSE) };
    }
    if let Some(w) = workload.filter(|w| w.annotations.contains_key(api::EXPOSE)) {
        return Decision::Inject { because: format!("{} annotation {}", w.reference, api::EXPOSE) };
    }
    if inject_route_backends && !route_tunnels.is_empty() {
        return Decision::Inject { because: format!("backs a route picotun serves ({} tunnels)", route_tunnels.len()) };
    }
    skip(
        SkipReason::NotOptedIn,
        format!(
            "no {0}=true label or annotation on the pod template or its workload, no {1} annotation{2}",
            api::INJECT,
            api::EXPOSE,
            if inject_route_backends { ", and no route picotun serves selects it" } else { "" }
        ),
    )
}

/// [`never_injected`], then [`opted_in`]: whether a pod should carry the sidecar. The controller
/// asks this of pods without one before it calls the sidecar missing (and, if asked to, restarts
/// their workload) -- so a pod the webhook left alone for a volume named like picotun's is not
/// expected to carry it either: a restart would only bring the same pod back.
pub fn expects_sidecar(
    pod: &Pod,
    namespace: &str,
    own_namespace: &str,
    workload: Option<&Workload>,
    route_tunnels: &[TunnelSpec],
    inject_route_backends: bool,
) -> Decision {
    if let Some(never) = never_injected(pod, namespace, own_namespace) {
        return never;
    }
    let own: Vec<&str> = pod
        .spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .map(|v| v.name.as_str())
        .filter(|n| !is_injected(pod) && api::SIDECAR_VOLUMES.contains(n))
        .collect();
    if !own.is_empty() {
        let because = format!("the pod has its own volume named {}, as picotun names the sidecar's", own.join(", "));
        return Decision::Skip { reason: SkipReason::VolumeConflict, because };
    }
    opted_in(pod, workload, route_tunnels, inject_route_backends)
}

/// True if a container named like the sidecar is there (re-invocation, a pod injected by `picotun
/// inject`, or one its author wrote). Whether picotun put it there is the ticket's to say.
pub fn is_injected(pod: &Pod) -> bool {
    let spec = pod.spec.as_ref();
    let named = |cs: Option<&Vec<Container>>| cs.is_some_and(|cs| cs.iter().any(|c| c.name == api::SIDECAR_NAME));
    named(spec.map(|s| &s.containers)) || named(spec.and_then(|s| s.init_containers.as_ref()))
}

/// The tunnels a pod gets: those routes give it, then its expose annotation's (pod template
/// first, else the workload's). An expose tunnel whose name or public claim (HTTP/TLS name, TCP
/// port) a route's tunnel or an earlier expose tunnel already has is left out with a warning:
/// the agent refuses a file where two tunnels ask for the same thing, so the webhook and the
/// controller must agree on which one stays. A broken annotation is a warning, not a failure.
pub fn tunnels_for(
    pod: &Pod,
    workload: Option<&Workload>,
    route_tunnels: &[TunnelSpec],
    warnings: &mut Vec<String>,
) -> Vec<TunnelSpec> {
    let mut tunnels: Vec<TunnelSpec> = route_tunnels.to_vec();
    let expose = lookup(&pod.metadata.annotations, api::EXPOSE)
        .or_else(|| workload.and_then(|w| w.annotations.get(api::EXPOSE)));
    if let Some(value) = expose {
        match api::parse_expose(value, |name| named_port(pod, name)) {
            Ok(specs) => {
                for s in specs {
                    let claim = s.public_claim();
                    let taken =
                        tunnels.iter().find(|t| t.name == s.name || (claim.is_some() && t.public_claim() == claim));
                    match taken {
                        Some(t) if t.name == s.name => warnings.push(format!(
                            "{}: tunnel {} is already given by a route; the route's wins",
                            api::EXPOSE,
                            s.name
                        )),
                        Some(t) => warnings.push(format!(
                            "{}: tunnel {} asks for {}, which tunnel {} already has; only {} is opened",
                            api::EXPOSE,
                            s.name,
                            claim.unwrap_or_default(),
                            t.name,
                            t.name
                        )),
                        None => tunnels.push(s),
                    }
                }
            }
            Err(e) => warnings.push(format!("{e}; the sidecar is injected without these tunnels")),
        }
    }
    tunnels
}

fn named_port(pod: &Pod, name: &str) -> Option<u16> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find_map(|p| (p.name.as_deref() == Some(name)).then(|| u16::try_from(p.container_port).ok()).flatten())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::tunnel::{TunnelKind, TunnelsFile};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn exposed(value: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                annotations: Some([(api::EXPOSE.to_string(), value.to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn ingress_tunnel(host: &str) -> TunnelSpec {
        TunnelSpec {
            name: format!("ing-web-{host}"),
            kind: TunnelKind::Http,
            host: Some(host.into()),
            remote_port: None,
            target_port: 8080,
            options: Default::default(),
            standby: false,
        }
    }

    /// Defect 3 of issue 12: the webhook kept an expose tunnel whose host a route's tunnel already
    /// asks for, so the first tunnels file was one the agent refuses.
    #[test]
    fn an_expose_tunnel_never_asks_for_what_a_route_tunnel_has() {
        let mut warnings = Vec::new();
        let tunnels =
            tunnels_for(&exposed("http:demo=8080, tcp:5432=5432"), None, &[ingress_tunnel("demo")], &mut warnings);
        let names: Vec<&str> = tunnels.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["ing-web-demo", "tcp-5432"], "{warnings:?}");
        assert!(warnings.iter().any(|w| w.contains("http-demo") && w.contains("ing-web-demo")), "{warnings:?}");
        TunnelsFile { tunnels }.validate().expect("the agent accepts the file");
    }

    #[test]
    fn opted_out_and_never_opted_in_pods_do_not_expect_a_sidecar() {
        let mut pod = Pod::default();
        let routes = [ingress_tunnel("demo")];
        let d = expects_sidecar(&pod, "apps", "pico-sh-system", None, &routes, false);
        assert!(matches!(d, Decision::Skip { reason: SkipReason::NotOptedIn, .. }), "{d:?}");
        assert!(matches!(
            expects_sidecar(&pod, "apps", "pico-sh-system", None, &routes, true),
            Decision::Inject { .. }
        ));
        pod.metadata.labels = Some([(api::INJECT.to_string(), "false".to_string())].into());
        let d = expects_sidecar(&pod, "apps", "pico-sh-system", None, &routes, true);
        assert!(matches!(d, Decision::Skip { reason: SkipReason::OptedOut, .. }), "{d:?}");
        let d = expects_sidecar(&Pod::default(), "kube-system", "pico-sh-system", None, &routes, true);
        assert!(matches!(d, Decision::Skip { reason: SkipReason::SystemNamespace, .. }), "{d:?}");
        // The webhook leaves a pod with its own volume named like picotun's alone: not missing.
        let mut clash = Pod::default();
        clash.metadata.labels = Some([(api::INJECT.to_string(), "true".to_string())].into());
        clash.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            volumes: Some(vec![k8s_openapi::api::core::v1::Volume {
                name: api::TUNNELS_VOLUME.into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        let d = expects_sidecar(&clash, "apps", "pico-sh-system", None, &routes, true);
        assert!(matches!(d, Decision::Skip { reason: SkipReason::VolumeConflict, .. }), "{d:?}");
    }
}
