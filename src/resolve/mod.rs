//! Pure resolution: what users apply (Ingress today; Gateway API routes next) plus the Services
//! and Pods of the cluster, in; which pod opens which tunnels, and what cannot be served and why,
//! out. No I/O: the controller feeds it from its caches, the webhook from the same index, tests
//! from fixtures.

pub mod cluster;
pub mod gateway;
pub mod ingress;
pub mod options;
pub mod ownership;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, Service, ServicePort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::core::{Selector, SelectorExt};

use crate::core::tunnel::TunnelSpec;

/// Something a tunnel server cannot do, or a reference that does not resolve: said, never
/// silently dropped. Becomes a condition reason and an Event on the user's object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// CamelCase, usable as a condition reason.
    pub reason: &'static str,
    pub message: String,
}

/// A pod, by namespace and name.
pub type PodKey = (String, String);

/// Tunnels per backing pod, and the problems met on the way.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolution {
    pub tunnels: BTreeMap<PodKey, Vec<TunnelSpec>>,
    pub problems: Vec<Problem>,
    /// The names the object asks for, served by pods yet or not (its claims).
    pub hosts: Vec<String>,
}

/// The objects resolution looks at: Services and Pods, indexed by namespace so that resolving a
/// thousand routes over thousands of pods stays linear.
#[derive(Default)]
pub struct Snapshot<'a> {
    services: BTreeMap<(&'a str, &'a str), &'a Service>,
    pods: BTreeMap<&'a str, Vec<&'a Pod>>,
}

impl<'a> Snapshot<'a> {
    pub fn new(
        services: impl IntoIterator<Item = &'a Service>,
        pods: impl IntoIterator<Item = &'a Pod>,
    ) -> Snapshot<'a> {
        let mut snapshot = Snapshot::default();
        for s in services {
            if let (Some(ns), Some(name)) = (s.metadata.namespace.as_deref(), s.metadata.name.as_deref()) {
                snapshot.services.insert((ns, name), s);
            }
        }
        for p in pods {
            if let Some(ns) = p.metadata.namespace.as_deref() {
                snapshot.pods.entry(ns).or_default().push(p);
            }
        }
        snapshot
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<&'a Service> {
        self.services.get(&(namespace, name)).copied()
    }

    /// Pods a Service selects (not those being deleted). None when the Service has no selector
    /// (its endpoints are managed by hand: nothing picotun can inject into).
    pub fn selected_pods(&self, service: &Service) -> Option<Vec<&'a Pod>> {
        let selector = service.spec.as_ref()?.selector.as_ref().filter(|s| !s.is_empty())?;
        let selector: Selector = selector.clone().into_iter().collect();
        let namespace = service.metadata.namespace.as_deref().unwrap_or_default();
        let no_labels = BTreeMap::new();
        Some(
            self.pods
                .get(namespace)
                .into_iter()
                .flatten()
                .copied()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .filter(|p| selector.matches(p.metadata.labels.as_ref().unwrap_or(&no_labels)))
                .collect(),
        )
    }
}

/// The Service port a backend names: by number or by name.
pub fn service_port<'s>(service: &'s Service, port: &IntOrString) -> Option<&'s ServicePort> {
    service.spec.as_ref()?.ports.as_ref()?.iter().find(|p| match port {
        IntOrString::Int(n) => p.port == *n,
        IntOrString::String(name) => p.name.as_deref() == Some(name.as_str()),
    })
}

/// The container port on `pod` that a Service port's targetPort means (named target ports are
/// looked up in the pod's containers, as kube-proxy does).
pub fn target_port(port: &ServicePort, pod: &Pod) -> Option<u16> {
    match &port.target_port {
        None => u16::try_from(port.port).ok(),
        Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
        Some(IntOrString::String(name)) => {
            pod.spec.as_ref()?.containers.iter().flat_map(|c| c.ports.iter().flatten()).find_map(|p| {
                (p.name.as_deref() == Some(name.as_str())).then(|| u16::try_from(p.container_port).ok()).flatten()
            })
        }
    }
}

/// The pods behind a Service port, each with the container port its targetPort means; the pods
/// that lack that port are named in a `TargetPortNotFound` problem (they get no tunnel).
pub fn backing_pods(
    snapshot: &Snapshot<'_>,
    service: &Service,
    port: &ServicePort,
) -> (Vec<(PodKey, u16)>, Option<Problem>) {
    let mut pods = Vec::new();
    let mut missing = Vec::new();
    for pod in snapshot.selected_pods(service).unwrap_or_default() {
        let key = (pod.metadata.namespace.clone().unwrap_or_default(), pod.metadata.name.clone().unwrap_or_default());
        match target_port(port, pod) {
            Some(target) => pods.push((key, target)),
            None => missing.push(key.1),
        }
    }
    let problem = (!missing.is_empty()).then(|| {
        let target = match &port.target_port {
            Some(IntOrString::String(name)) => format!("{name:?}"),
            Some(IntOrString::Int(n)) => n.to_string(),
            None => port.port.to_string(),
        };
        Problem {
            reason: gateway::reason::TARGET_PORT_NOT_FOUND,
            message: format!(
                "Service {}/{} port {}: pod(s) {} have no container port {target}, so they get no tunnel",
                service.metadata.namespace.as_deref().unwrap_or_default(),
                service.metadata.name.as_deref().unwrap_or_default(),
                port.name.as_deref().map_or_else(|| port.port.to_string(), str::to_string),
                missing.join(", ")
            ),
        }
    });
    (pods, problem)
}

/// A tunnel name from parts: a DNS label of at most 63 characters, unique per input (a hash
/// suffix when it had to be shortened).
pub fn tunnel_name(parts: &[&str]) -> String {
    let raw = parts.join("-").to_lowercase();
    let mut name: String = raw.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    while name.contains("--") {
        name = name.replace("--", "-");
    }
    let name = name.trim_matches('-').to_string();
    if name.len() <= 63 {
        return name;
    }
    // FNV-1a: stable across builds and platforms.
    let hash = raw.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{}-{:08x}", name[..54].trim_end_matches('-'), hash as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_names_are_dns_labels() {
        assert_eq!(tunnel_name(&["ing", "web", "demo"]), "ing-web-demo");
        assert_eq!(tunnel_name(&["ing", "web", "app.example.com"]), "ing-web-app-example-com");
        let long = tunnel_name(&["ing", &"x".repeat(80), "demo"]);
        assert!(crate::core::tunnel::is_dns_label(&long), "{long}");
        assert_ne!(long, tunnel_name(&["ing", &"x".repeat(81), "demo"]), "shortened names stay distinct");
    }
}
