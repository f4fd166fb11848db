//! Ingress (class `pico-tunnel`) -> tunnels on the pods behind its backends.
//!
//! A rule host without dots is a tuns name (`demo` -> `https://{user}-demo.tuns.sh`); a host with
//! dots is a custom domain, requested as-is. A tunnel server routes a whole host to one backend,
//! so a host whose paths lead to different Services cannot be served and is reported
//! (`PathFanOut`), as are TLS sections (the tunnel server terminates TLS itself), rules without a
//! host, resource backends, and references that do not resolve.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{Ingress, IngressServiceBackend};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Problem, Resolution, Snapshot, backing_pods, service_port, tunnel_name};
use crate::core::tunnel::{TunnelKind, TunnelSpec, is_dns_name};

/// The IngressClass picotun ships, and its controller name.
pub const INGRESS_CLASS: &str = "pico-tunnel";
pub const INGRESS_CONTROLLER: &str = "tunnels.pico.sh/ingress-controller";

/// True if the Ingress asks for picotun (spec.ingressClassName, or the deprecated annotation).
pub fn is_ours(ingress: &Ingress, class: &str) -> bool {
    let by_field = ingress.spec.as_ref().and_then(|s| s.ingress_class_name.as_deref()) == Some(class);
    let by_annotation = ingress
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("kubernetes.io/ingress.class"))
        .is_some_and(|c| c == class);
    by_field || by_annotation
}

fn backend_label(b: &IngressServiceBackend) -> String {
    let port = b.port.as_ref().map(|p| match (&p.number, &p.name) {
        (Some(n), _) => n.to_string(),
        (None, Some(name)) => name.clone(),
        _ => "?".into(),
    });
    format!("{}:{}", b.name, port.unwrap_or_else(|| "?".into()))
}

/// Resolves one Ingress.
pub fn resolve(ingress: &Ingress, snapshot: &Snapshot<'_>) -> Resolution {
    let mut out = Resolution::default();
    let namespace = ingress.metadata.namespace.clone().unwrap_or_default();
    let name = ingress.metadata.name.clone().unwrap_or_default();
    let Some(spec) = ingress.spec.as_ref() else { return out };
    let mut problem = |reason: &'static str, message: String| out.problems.push(Problem { reason, message });

    if spec.tls.as_ref().is_some_and(|t| !t.is_empty()) {
        problem(
            "TLSTerminationUnsupported",
            "spec.tls is ignored: the tunnel server terminates TLS for tuns names itself; custom domains get \
             their certificate from the tunnel service"
                .into(),
        );
    }
    let rules = spec.rules.as_deref().unwrap_or_default();
    if rules.is_empty() && spec.default_backend.is_some() {
        problem("HostRequired", "a defaultBackend without rules has no host to publish: add a rule with a host".into());
    }

    // host -> the one backend it may have
    let mut hosts: BTreeMap<String, IngressServiceBackend> = BTreeMap::new();
    for rule in rules {
        let Some(host) = rule.host.clone().filter(|h| !h.is_empty()) else {
            problem("HostRequired", "a rule without a host cannot be published: tunnels are named by host".into());
            continue;
        };
        if host.starts_with("*.") || !is_dns_name(&host) {
            problem("InvalidHost", format!("host {host:?} is not a name a tunnel can request (no wildcards)"));
            continue;
        }
        let paths = rule.http.as_ref().map(|h| h.paths.as_slice()).unwrap_or_default();
        if paths.is_empty() {
            problem("BackendRequired", format!("host {host}: no http paths, so no backend"));
            continue;
        }
        for path in paths {
            let Some(backend) = path.backend.service.clone() else {
                problem(
                    "UnsupportedBackend",
                    format!("host {host}: only Service backends can be tunnelled (resource backends cannot)"),
                );
                continue;
            };
            match hosts.get(&host) {
                None => {
                    if path.path.as_deref().is_some_and(|p| p != "/") {
                        problem(
                            "PathsIgnored",
                            format!(
                                "host {host}: path {:?} is not enforced; the whole host goes to {}",
                                path.path.as_deref().unwrap_or(""),
                                backend_label(&backend)
                            ),
                        );
                    }
                    hosts.insert(host.clone(), backend);
                }
                Some(first) if *first == backend => {}
                Some(first) => problem(
                    "PathFanOutUnsupported",
                    format!(
                        "host {host}: paths lead to {} and {}; a tunnel sends a whole host to one backend, so only {} is served",
                        backend_label(first),
                        backend_label(&backend),
                        backend_label(first)
                    ),
                ),
            }
        }
    }

    // Every host with a Service backend is asked for, whether or not pods back it yet: the name
    // belongs to this Ingress while it asks (resolve::ownership).
    out.hosts = hosts.keys().cloned().collect();
    for (host, backend) in hosts {
        let Some(service) = snapshot.service(&namespace, &backend.name) else {
            problem("BackendNotFound", format!("host {host}: Service {namespace}/{} does not exist", backend.name));
            continue;
        };
        let port_ref = match backend.port.as_ref().map(|p| (&p.number, &p.name)) {
            Some((Some(n), _)) => IntOrString::Int(*n),
            Some((None, Some(name))) => IntOrString::String(name.clone()),
            _ => {
                problem("BackendNotFound", format!("host {host}: the backend names no Service port"));
                continue;
            }
        };
        let Some(port) = service_port(service, &port_ref) else {
            problem(
                "BackendNotFound",
                format!("host {host}: Service {} has no port {}", backend.name, backend_label(&backend)),
            );
            continue;
        };
        if snapshot.selected_pods(service).is_none() {
            problem(
                "NoSelector",
                format!("host {host}: Service {} has no selector, so no pods picotun can give a tunnel", backend.name),
            );
            continue;
        }
        let (pods, missing) = backing_pods(snapshot, service, port);
        if let Some(p) = missing {
            problem(p.reason, format!("host {host}: {}", p.message));
        }
        let tunnel = tunnel_name(&["ing", &name, &host]);
        for (pod, target) in pods {
            out.tunnels.entry(pod).or_default().push(TunnelSpec {
                name: tunnel.clone(),
                kind: TunnelKind::Http,
                host: Some(host.clone()),
                remote_port: None,
                target_port: target,
                options: Default::default(),
                standby: false,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Pod, Service};
    use serde_json::json;

    fn ingress(v: serde_json::Value) -> Ingress {
        serde_json::from_value(v).unwrap()
    }

    fn service(name: &str, selector: serde_json::Value, ports: serde_json::Value) -> Service {
        serde_json::from_value(
            json!({"metadata": {"name": name, "namespace": "apps"}, "spec": {"selector": selector, "ports": ports}}),
        )
        .unwrap()
    }

    fn pod(name: &str, labels: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "apps", "labels": labels},
            "spec": {"containers": [{"name": "app", "image": "x", "ports": [{"name": "http", "containerPort": 5678}]}]},
        }))
        .unwrap()
    }

    /// The prototype's walkthrough: Ingress `example-app`, host `demo`, Service port 80 -> pods.
    fn walkthrough() -> (Vec<Service>, Vec<Pod>) {
        (
            vec![service(
                "example-app",
                json!({"app": "example-app"}),
                json!([{"name": "web", "port": 80, "targetPort": "http"}]),
            )],
            vec![
                pod("example-app-1", json!({"app": "example-app"})),
                pod("example-app-2", json!({"app": "example-app"})),
                pod("other", json!({"app": "other"})),
            ],
        )
    }

    fn demo_ingress(extra_rule: Option<serde_json::Value>) -> Ingress {
        let mut rules = vec![json!({"host": "demo", "http": {"paths": [{"path": "/", "pathType": "Prefix",
            "backend": {"service": {"name": "example-app", "port": {"number": 80}}}}]}})];
        rules.extend(extra_rule);
        ingress(json!({"metadata": {"name": "example-app", "namespace": "apps"},
            "spec": {"ingressClassName": "pico-tunnel", "rules": rules}}))
    }

    #[test]
    fn the_walkthrough_gives_every_backing_pod_the_demo_tunnel() {
        let (services, pods) = walkthrough();
        let r = resolve(&demo_ingress(None), &Snapshot::new(&services, &pods));
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.tunnels.len(), 2, "both example-app pods, not `other`");
        let t = &r.tunnels[&("apps".to_string(), "example-app-1".to_string())][0];
        assert_eq!(
            (t.host.as_deref(), t.target_port, t.kind),
            (Some("demo"), 5678, TunnelKind::Http),
            "named targetPort resolved"
        );
        assert_eq!(t.name, "ing-example-app-demo");
    }

    #[test]
    fn ours_by_class_or_legacy_annotation() {
        assert!(is_ours(&demo_ingress(None), INGRESS_CLASS));
        let legacy = ingress(
            json!({"metadata": {"name": "x", "annotations": {"kubernetes.io/ingress.class": "pico-tunnel"}}, "spec": {}}),
        );
        assert!(is_ours(&legacy, INGRESS_CLASS));
        let other = ingress(json!({"metadata": {"name": "x"}, "spec": {"ingressClassName": "nginx"}}));
        assert!(!is_ours(&other, INGRESS_CLASS));
    }

    #[test]
    fn custom_domains_and_several_hosts() {
        let (services, pods) = walkthrough();
        let extra = json!({"host": "app.example.com", "http": {"paths": [{"path": "/", "pathType": "Prefix",
            "backend": {"service": {"name": "example-app", "port": {"name": "web"}}}}]}});
        let r = resolve(&demo_ingress(Some(extra)), &Snapshot::new(&services, &pods));
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        let hosts: Vec<_> =
            r.tunnels[&("apps".into(), "example-app-2".into())].iter().map(|t| t.host.clone().unwrap()).collect();
        assert_eq!(hosts, vec!["app.example.com", "demo"]);
    }

    #[test]
    fn what_cannot_be_served_is_said() {
        let (mut services, pods) = walkthrough();
        services.push(service("api", json!({"app": "api"}), json!([{"port": 8080}])));
        services.push(service("manual", json!({}), json!([{"port": 80}])));
        let ing = ingress(json!({"metadata": {"name": "mixed", "namespace": "apps"}, "spec": {
            "ingressClassName": "pico-tunnel",
            "tls": [{"hosts": ["demo"], "secretName": "s"}],
            "rules": [
                {"http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "example-app", "port": {"number": 80}}}}]}},
                {"host": "*.example.com", "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "example-app", "port": {"number": 80}}}}]}},
                {"host": "demo", "http": {"paths": [
                    {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "example-app", "port": {"number": 80}}}},
                    {"path": "/api", "pathType": "Prefix", "backend": {"service": {"name": "api", "port": {"number": 8080}}}}]}},
                {"host": "gone", "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "missing", "port": {"number": 80}}}}]}},
                {"host": "badport", "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "example-app", "port": {"number": 81}}}}]}},
                {"host": "byhand", "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "manual", "port": {"number": 80}}}}]}},
                {"host": "res", "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": {"resource": {"kind": "Bucket", "name": "b"}}}]}},
            ],
        }}));
        let r = resolve(&ing, &Snapshot::new(&services, &pods));
        let reasons: Vec<&str> = r.problems.iter().map(|p| p.reason).collect();
        for want in [
            "TLSTerminationUnsupported",
            "HostRequired",
            "InvalidHost",
            "PathFanOutUnsupported",
            "BackendNotFound",
            "NoSelector",
            "UnsupportedBackend",
        ] {
            assert!(reasons.contains(&want), "{want} missing from {reasons:?}");
        }
        assert_eq!(reasons.iter().filter(|r| **r == "BackendNotFound").count(), 2, "missing Service and missing port");
        // `demo` is still served, by its first backend.
        let t = &r.tunnels[&("apps".into(), "example-app-1".into())];
        assert_eq!(t.iter().map(|t| t.host.as_deref().unwrap()).collect::<Vec<_>>(), vec!["demo"]);
        let fan_out = r.problems.iter().find(|p| p.reason == "PathFanOutUnsupported").unwrap();
        assert!(
            fan_out.message.contains("example-app:80") && fan_out.message.contains("api:8080"),
            "{}",
            fan_out.message
        );
    }

    #[test]
    fn paths_other_than_root_are_noted() {
        let (services, pods) = walkthrough();
        let ing = ingress(
            json!({"metadata": {"name": "p", "namespace": "apps"}, "spec": {"ingressClassName": "pico-tunnel", "rules": [
            {"host": "demo", "http": {"paths": [{"path": "/app", "pathType": "Prefix", "backend": {"service": {"name": "example-app", "port": {"number": 80}}}}]}}]}}),
        );
        let r = resolve(&ing, &Snapshot::new(&services, &pods));
        assert_eq!(r.problems.iter().map(|p| p.reason).collect::<Vec<_>>(), vec!["PathsIgnored"]);
        assert_eq!(r.tunnels.len(), 2);
    }

    #[test]
    fn terminating_pods_and_missing_named_ports() {
        let (services, mut pods) = walkthrough();
        pods[0].metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Default::default()));
        pods[1].spec.as_mut().unwrap().containers[0].ports = None;
        let r = resolve(&demo_ingress(None), &Snapshot::new(&services, &pods));
        assert!(r.tunnels.is_empty());
        assert_eq!(r.problems.iter().map(|p| p.reason).collect::<Vec<_>>(), vec!["TargetPortNotFound"]);
    }
}
