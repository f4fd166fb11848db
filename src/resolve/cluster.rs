//! The whole cluster at once: every Ingress and Gateway API route picotun serves, resolved
//! together into the tunnels file each pod should carry. The controller runs this over its caches
//! on every change; the webhook runs it over the same index for a pod being created.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::Ingress;

use super::gateway::{self, GatewayModel, GatewayResolution, Grant, RouteModel};
use super::{PodKey, Problem, Resolution, Snapshot, ingress};
use crate::tunnel::{TunnelSpec, TunnelsFile};
use crate::webhook::inject;

/// Everything resolution reads, borrowed from the caches.
pub struct Inputs<'a> {
    pub ingress_class: &'a str,
    pub ingresses: Vec<&'a Ingress>,
    /// Names of the GatewayClasses whose controllerName is ours.
    pub our_gateway_classes: BTreeSet<String>,
    pub gateways: Vec<GatewayModel>,
    pub routes: Vec<RouteModel>,
    pub grants: Vec<Grant>,
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    pub snapshot: Snapshot<'a>,
}

/// What the cluster should look like.
#[derive(Debug, Default)]
pub struct ClusterResolution {
    /// The tunnels routes give each pod, sorted by name, conflicts removed.
    pub route_tunnels: BTreeMap<PodKey, Vec<TunnelSpec>>,
    /// Per Ingress of our class: its tunnels per pod and its problems.
    pub ingresses: BTreeMap<(String, String), Resolution>,
    pub gateway: GatewayResolution,
    /// Tunnels dropped from a pod because another route already asked it for the same name or
    /// port (the agent would refuse the whole file otherwise).
    pub pod_problems: BTreeMap<PodKey, Vec<Problem>>,
}

pub fn resolve_all(inputs: &Inputs<'_>) -> ClusterResolution {
    let mut out = ClusterResolution::default();
    let mut merged: BTreeMap<PodKey, Vec<TunnelSpec>> = BTreeMap::new();
    for ing in inputs.ingresses.iter().filter(|i| ingress::is_ours(i, inputs.ingress_class)) {
        let resolution = ingress::resolve(ing, &inputs.snapshot);
        for (pod, specs) in &resolution.tunnels {
            merged.entry(pod.clone()).or_default().extend(specs.iter().cloned());
        }
        let key = (ing.metadata.namespace.clone().unwrap_or_default(), ing.metadata.name.clone().unwrap_or_default());
        out.ingresses.insert(key, resolution);
    }
    out.gateway = gateway::resolve(
        &inputs.gateways,
        &inputs.our_gateway_classes,
        &inputs.routes,
        &inputs.grants,
        &inputs.namespace_labels,
        &inputs.snapshot,
    );
    for (pod, specs) in &out.gateway.tunnels {
        merged.entry(pod.clone()).or_default().extend(specs.iter().cloned());
    }
    for (pod, mut specs) in merged {
        specs.sort();
        specs.dedup();
        let (kept, problems) = without_conflicts(specs);
        if !problems.is_empty() {
            out.pod_problems.insert(pod.clone(), problems);
        }
        out.route_tunnels.insert(pod, kept);
    }
    out
}

/// Drops tunnels whose name or public claim an earlier one already has: two routes asking one
/// pod for the same host would otherwise make the agent refuse the whole file.
pub fn without_conflicts(specs: Vec<TunnelSpec>) -> (Vec<TunnelSpec>, Vec<Problem>) {
    let mut names = BTreeSet::new();
    let mut claims = BTreeMap::new();
    let mut kept = Vec::new();
    let mut problems = Vec::new();
    for spec in specs {
        if !names.insert(spec.name.clone()) {
            problems.push(Problem {
                reason: "TunnelConflict",
                message: format!("two routes give this pod a tunnel named {}; the first is kept", spec.name),
            });
            continue;
        }
        if let Some(claim) = spec.public_claim() {
            if let Some(first) = claims.get(&claim) {
                problems.push(Problem {
                    reason: "TunnelConflict",
                    message: format!("tunnels {first} and {} both ask for {claim}; only {first} is opened", spec.name),
                });
                continue;
            }
            claims.insert(claim, spec.name.clone());
        }
        kept.push(spec);
    }
    (kept, problems)
}

/// The tunnels file a pod should carry: what routes give it, then its own expose annotation (the
/// webhook copies a workload's annotation onto the pod, so the pod alone says it all). Problems
/// with the annotation come back as warnings; the rest is still served.
pub fn pod_tunnels_file(pod: &Pod, route_tunnels: &[TunnelSpec]) -> (TunnelsFile, Vec<String>) {
    let mut warnings = Vec::new();
    let all = inject::tunnels_for(pod, None, route_tunnels, &mut warnings);
    let (tunnels, problems) = without_conflicts(all);
    warnings.extend(problems.into_iter().map(|p| p.message));
    (TunnelsFile { tunnels }, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::TunnelKind;
    use serde_json::json;

    fn http(name: &str, host: &str, port: u16) -> TunnelSpec {
        TunnelSpec {
            name: name.into(),
            kind: TunnelKind::Http,
            host: Some(host.into()),
            remote_port: None,
            target_port: port,
            options: Default::default(),
        }
    }

    #[test]
    fn conflicting_tunnels_keep_the_first_and_say_so() {
        let (kept, problems) =
            without_conflicts(vec![http("a", "demo", 80), http("b", "demo", 81), http("a", "other", 82)]);
        assert_eq!(kept, vec![http("a", "demo", 80)]);
        assert_eq!(problems.len(), 2);
        assert!(problems[0].message.contains("both ask for"), "{problems:?}");
        TunnelsFile { tunnels: kept }.validate().unwrap();
    }

    #[test]
    fn a_pods_file_is_its_routes_then_its_expose_annotation() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns", "annotations": {"tunnels.pico.sh/expose": "tcp:5432=5432, http:demo=8080"}},
            "spec": {"containers": [{"name": "app", "image": "x"}]}
        }))
        .unwrap();
        let (file, warnings) = pod_tunnels_file(&pod, &[http("ing-web-demo", "demo", 8080)]);
        let names: Vec<&str> = file.tunnels.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names.len(), 2, "the annotation's http:demo conflicts with the route's: {names:?}");
        assert_eq!(names[0], "ing-web-demo");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        file.validate().unwrap();
    }

    #[test]
    fn the_ingress_walkthrough_resolves_across_the_cluster() {
        let ing: Ingress = serde_json::from_value(json!({
            "metadata": {"name": "example-app", "namespace": "default"},
            "spec": {"ingressClassName": "pico-tunnel", "rules": [{"host": "demo", "http": {"paths": [
                {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "example-app", "port": {"number": 80}}}}]}}]}
        }))
        .unwrap();
        let other: Ingress = serde_json::from_value(json!({
            "metadata": {"name": "nginx", "namespace": "default"},
            "spec": {"ingressClassName": "nginx", "rules": [{"host": "x.example.com"}]}
        }))
        .unwrap();
        let svc = serde_json::from_value(json!({"metadata": {"name": "example-app", "namespace": "default"},
            "spec": {"selector": {"app": "example-app"}, "ports": [{"port": 80, "targetPort": 5678}]}}))
        .unwrap();
        let pod: Pod = serde_json::from_value(
            json!({"metadata": {"name": "p1", "namespace": "default", "labels": {"app": "example-app"}},
            "spec": {"containers": [{"name": "c", "image": "x"}]}}),
        )
        .unwrap();
        let services = [svc];
        let pods = [pod];
        let inputs = Inputs {
            ingress_class: "pico-tunnel",
            ingresses: vec![&ing, &other],
            our_gateway_classes: BTreeSet::new(),
            gateways: vec![],
            routes: vec![],
            grants: vec![],
            namespace_labels: BTreeMap::new(),
            snapshot: Snapshot::new(&services, &pods),
        };
        let r = resolve_all(&inputs);
        assert_eq!(r.ingresses.len(), 1, "only our class");
        let tunnels = &r.route_tunnels[&("default".to_string(), "p1".to_string())];
        assert_eq!(tunnels, &vec![http("ing-example-app-demo", "demo", 5678)]);
    }
}
