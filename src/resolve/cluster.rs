//! The whole cluster at once: every Ingress and Gateway API route picotun serves, resolved
//! together into the tunnels file each pod should carry. The controller runs this over its caches
//! on every change; the webhook runs it over the same index for a pod being created.
//!
//! Names belong to someone (`ownership`): every claim of every Ingress, route and namespace's
//! expose annotations is collected first, the oldest claimant of each name owns it, and the
//! tunnels of the others are taken out of their pods before they are merged per pod.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::gateway::{self, GatewayModel, GatewayResolution, Grant, RouteModel};
use super::options::{self, ConfigMaps, Options, ParametersRef};
use super::ownership::{self, Ask, Claim, Claimant, DomainPolicy, Ownership, TUNNEL_CONFLICT};
use super::{PodKey, Problem, Resolution, Snapshot, ingress};
use crate::core::pod;
use crate::core::server::Dialect;
use crate::core::tunnel::{TunnelSpec, TunnelsFile};

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
    /// Pods whose expose annotations ask for names (their metadata is all that is read).
    pub expose_pods: Vec<&'a ObjectMeta>,
    /// Which namespaces may use which custom domains.
    pub domains: &'a DomainPolicy,
    /// Server options from Kubernetes (resolve::options); None: none are read (the webhook,
    /// which the controller corrects once it has read the ConfigMaps).
    pub server_options: Option<ServerOptionInputs<'a>>,
}

/// What server options are resolved from.
pub struct ServerOptionInputs<'a> {
    /// The tunnel server's dialect: which options it takes.
    pub dialect: Dialect,
    /// Our GatewayClasses' `spec.parametersRef`, by class name.
    pub class_refs: BTreeMap<String, Option<ParametersRef>>,
    /// The ConfigMaps the parametersRefs name, as read.
    pub config_maps: &'a ConfigMaps,
}

/// What the cluster should look like.
#[derive(Debug, Default)]
pub struct ClusterResolution {
    /// The tunnels routes give each pod, sorted by name, conflicts removed.
    pub route_tunnels: BTreeMap<PodKey, Vec<TunnelSpec>>,
    /// Per Ingress of our class: its tunnels per pod (only names it owns) and its problems
    /// (`TunnelConflict` / `DomainNotAllowed` for the others).
    pub ingresses: BTreeMap<(String, String), Resolution>,
    pub gateway: GatewayResolution,
    /// Tunnels dropped from a pod because another route already asked it for the same name or
    /// port (the agent would refuse the whole file otherwise).
    pub pod_problems: BTreeMap<PodKey, Vec<Problem>>,
    /// Who owns every name, port and domain asked for.
    pub ownership: Ownership,
    /// GatewayClass name -> why its parametersRef gives no options (InvalidParameters).
    pub class_problems: BTreeMap<String, Problem>,
    /// Gateway (namespace, name) -> why its infrastructure.parametersRef gives no options (its
    /// class's still apply).
    pub gateway_option_problems: BTreeMap<(String, String), Problem>,
}

/// Per Ingress: its creation time and the hosts it asks for.
type IngressAsks = BTreeMap<(String, String), (Option<k8s_openapi::jiff::Timestamp>, Vec<String>)>;

/// Every claim the inputs make: Ingress hosts, what routes ask for through their listeners,
/// the expose annotations of pods.
fn asks(inputs: &Inputs<'_>, ingresses: &IngressAsks, gateway: &GatewayResolution) -> Vec<Ask> {
    let mut out = Vec::new();
    for ((ns, name), (since, hosts)) in ingresses {
        for h in hosts {
            out.push(Ask {
                claimant: Claimant::ingress(ns, name),
                claim: Claim::Name(h.to_ascii_lowercase()),
                since: *since,
                via: None,
            });
        }
    }
    let created: BTreeMap<(&str, &str, &str), Option<k8s_openapi::jiff::Timestamp>> =
        inputs.routes.iter().map(|r| ((r.kind.as_str(), r.namespace.as_str(), r.name.as_str()), r.created)).collect();
    for ((kind, ns, name), records) in &gateway.route_claims {
        let since = created.get(&(kind.as_str(), ns.as_str(), name.as_str())).copied().flatten();
        for r in records {
            out.push(Ask { claimant: Claimant::route(kind, ns, name), claim: r.claim.clone(), since, via: None });
        }
    }
    out.extend(ownership::expose_asks(inputs.expose_pods.iter().copied()));
    out
}

/// Resolves everything, owners included.
pub fn resolve_all(inputs: &Inputs<'_>) -> ClusterResolution {
    resolve_with(inputs, None)
}

/// Resolves with the owners from `owners` when given (the webhook: the table comes from the
/// whole cluster, the resolution from the routes that reach one pod), else from the inputs.
/// Given owners are not copied into the result (its `ownership` stays empty: the caller has it).
pub fn resolve_with(inputs: &Inputs<'_>, owners: Option<&Ownership>) -> ClusterResolution {
    let mut out = ClusterResolution::default();
    let mut asked = IngressAsks::new();
    for ing in inputs.ingresses.iter().filter(|i| ingress::is_ours(i, inputs.ingress_class)) {
        let mut resolution = ingress::resolve(ing, &inputs.snapshot);
        if let Some(o) = &inputs.server_options {
            ingress_options(o.dialect, ing, &mut resolution);
        }
        let key = (ing.metadata.namespace.clone().unwrap_or_default(), ing.metadata.name.clone().unwrap_or_default());
        asked.insert(key.clone(), (ing.metadata.creation_timestamp.as_ref().map(|t| t.0), resolution.hosts.clone()));
        out.ingresses.insert(key, resolution);
    }
    let gateways = match &inputs.server_options {
        Some(o) => with_options(o, &inputs.gateways, &inputs.our_gateway_classes, &mut out),
        None => inputs.gateways.clone(),
    };
    out.gateway = gateway::resolve(
        &gateways,
        &inputs.our_gateway_classes,
        &inputs.routes,
        &inputs.grants,
        &inputs.namespace_labels,
        &inputs.snapshot,
    );
    let mut computed = None;
    let owners: &Ownership = match owners {
        Some(given) => given,
        None => computed.insert(ownership::ownership(asks(inputs, &asked, &out.gateway), inputs.domains)),
    };

    let mut merged: BTreeMap<PodKey, Vec<TunnelSpec>> = BTreeMap::new();
    for ((ns, name), resolution) in &mut out.ingresses {
        let claimant = Claimant::ingress(ns, name);
        for specs in resolution.tunnels.values_mut() {
            let (kept, problems) = owners.keep(&claimant, std::mem::take(specs));
            *specs = kept;
            for p in problems {
                if !resolution.problems.contains(&p) {
                    resolution.problems.push(p);
                }
            }
        }
        // Names asked for with no pod behind them yet are said too.
        for host in &resolution.hosts {
            if let Err(p) = owners.check_claim(&claimant, &Claim::Name(host.to_ascii_lowercase()))
                && !resolution.problems.contains(&p)
            {
                resolution.problems.push(p);
            }
        }
        for (pod, specs) in &resolution.tunnels {
            merged.entry(pod.clone()).or_default().extend(specs.iter().cloned());
        }
    }
    out.gateway.apply_ownership(owners);
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
    if let Some(computed) = computed {
        out.ownership = computed;
    }
    out
}

/// An Ingress's options annotation onto every tunnel it gives, or a problem saying why not.
fn ingress_options(dialect: Dialect, ing: &Ingress, resolution: &mut super::Resolution) {
    let Some(text) = ing.metadata.annotations.as_ref().and_then(|a| a.get(options::OPTIONS_ANNOTATION)) else {
        return;
    };
    let source = format!("annotation {}", options::OPTIONS_ANNOTATION);
    match options::parse_annotation(text).and_then(|o| options::validate(dialect, &o, &source).map(|()| o)) {
        Ok(opts) => {
            for spec in resolution.tunnels.values_mut().flatten() {
                spec.options = opts.clone();
            }
        }
        Err(p) => resolution.problems.push(p),
    }
}

/// Our Gateways with their server options filled in: the class's, overridden key by key by the
/// Gateway's own; a parametersRef that gives none is said (and the rest still applies).
fn with_options(
    o: &ServerOptionInputs<'_>,
    gateways: &[GatewayModel],
    ours: &BTreeSet<String>,
    out: &mut ClusterResolution,
) -> Vec<GatewayModel> {
    let mut class_options: BTreeMap<&str, Options> = BTreeMap::new();
    for (class, r) in &o.class_refs {
        match options::from_ref(o.dialect, &format!("GatewayClass {class}"), r.as_ref(), None, o.config_maps) {
            Ok(opts) => {
                class_options.insert(class, opts);
            }
            Err(p) => {
                out.class_problems.insert(class.clone(), p);
            }
        }
    }
    gateways
        .iter()
        .map(|g| {
            let mut g = g.clone();
            if !ours.contains(&g.class) {
                return g;
            }
            let base = class_options.get(g.class.as_str()).cloned().unwrap_or_default();
            let what = format!("Gateway {}/{}", g.namespace, g.name);
            g.options =
                match options::from_ref(o.dialect, &what, g.parameters_ref.as_ref(), Some(&g.namespace), o.config_maps)
                {
                    Ok(own) => options::merged(&base, &own),
                    Err(p) => {
                        out.gateway_option_problems.insert((g.namespace.clone(), g.name.clone()), p);
                        base
                    }
                };
            g
        })
        .collect()
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
                reason: TUNNEL_CONFLICT,
                message: format!("two routes give this pod a tunnel named {}; the first is kept", spec.name),
            });
            continue;
        }
        if let Some(claim) = spec.public_claim() {
            if let Some(first) = claims.get(&claim) {
                problems.push(Problem {
                    reason: TUNNEL_CONFLICT,
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
/// webhook copies a workload's annotation onto the pod, so the pod alone says it all) less the
/// names its namespace does not own. Problems with the annotation come back too; the rest is
/// still served.
pub fn pod_tunnels_file(pod: &Pod, route_tunnels: &[TunnelSpec], owners: &Ownership) -> (TunnelsFile, Vec<Problem>) {
    let mut warnings = Vec::new();
    let mut all = pod::tunnels_for(pod, None, route_tunnels, &mut warnings);
    let mut problems: Vec<Problem> =
        warnings.into_iter().map(|message| Problem { reason: TUNNEL_CONFLICT, message }).collect();
    // tunnels_for appends the annotation's tunnels after the routes'.
    let exposed = all.split_off(route_tunnels.len().min(all.len()));
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    let (exposed, refused) = owners.keep(&Claimant::expose(namespace), exposed);
    problems.extend(refused);
    all.extend(exposed);
    let (tunnels, conflicts) = without_conflicts(all);
    problems.extend(conflicts);
    (TunnelsFile { tunnels }, problems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::tunnel::TunnelKind;
    use serde_json::json;

    fn http(name: &str, host: &str, port: u16) -> TunnelSpec {
        TunnelSpec {
            name: name.into(),
            kind: TunnelKind::Http,
            host: Some(host.into()),
            remote_port: None,
            target_port: port,
            options: Default::default(),
            standby: false,
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
        let (file, warnings) = pod_tunnels_file(&pod, &[http("ing-web-demo", "demo", 8080)], &Ownership::default());
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
            expose_pods: pods.iter().map(|p| &p.metadata).collect(),
            domains: &DomainPolicy::default(),
            server_options: None,
        };
        let r = resolve_all(&inputs);
        assert_eq!(r.ingresses.len(), 1, "only our class");
        let tunnels = &r.route_tunnels[&("default".to_string(), "p1".to_string())];
        assert_eq!(tunnels, &vec![http("ing-example-app-demo", "demo", 5678)]);
    }

    // Fixtures for ownership across the cluster.
    fn ingress_at(ns: &str, name: &str, created: &str, hosts: &[&str]) -> Ingress {
        let rules: Vec<serde_json::Value> = hosts
            .iter()
            .map(|h| {
                json!({"host": h, "http": {"paths": [{"path": "/", "pathType": "Prefix",
                "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}})
            })
            .collect();
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": ns, "creationTimestamp": created},
            "spec": {"ingressClassName": "pico-tunnel", "rules": rules}}))
        .unwrap()
    }

    fn web_service(ns: &str) -> k8s_openapi::api::core::v1::Service {
        serde_json::from_value(json!({"metadata": {"name": "web", "namespace": ns},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}))
        .unwrap()
    }

    fn pod_at(ns: &str, name: &str, created: &str, expose: Option<&str>) -> Pod {
        let mut annotations = json!({});
        if let Some(e) = expose {
            annotations["tunnels.pico.sh/expose"] = json!(e);
        }
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": ns, "creationTimestamp": created,
            "labels": {"app": "web"}, "annotations": annotations},
            "spec": {"containers": [{"name": "c", "image": "x"}]}}))
        .unwrap()
    }

    fn inputs<'a>(
        ingresses: &'a [Ingress],
        services: &'a [k8s_openapi::api::core::v1::Service],
        pods: &'a [Pod],
        gateways: Vec<GatewayModel>,
        routes: Vec<RouteModel>,
        domains: &'a DomainPolicy,
    ) -> Inputs<'a> {
        Inputs {
            ingress_class: "pico-tunnel",
            ingresses: ingresses.iter().collect(),
            our_gateway_classes: BTreeSet::from(["pico".to_string()]),
            gateways,
            routes,
            grants: vec![],
            namespace_labels: BTreeMap::new(),
            snapshot: Snapshot::new(services, pods),
            expose_pods: pods.iter().map(|p| &p.metadata).collect(),
            domains,
            server_options: None,
        }
    }

    /// Issue 14: server options from Kubernetes. The GatewayClass's ConfigMap gives every tunnel
    /// of its Gateways its options, a Gateway's own ConfigMap overrides them key by key, an
    /// Ingress's annotation gives its tunnels theirs; a bad key is said naming it (the class's,
    /// the Gateway's, the Ingress's), and only that set is not used.
    #[test]
    fn server_options_come_from_parameters_refs_and_the_ingress_annotation() {
        let gw = |name: &str, port: u16, params: Option<&str>| {
            let mut spec =
                json!({"gatewayClassName": "pico", "listeners": [{"name": "tcp", "protocol": "TCP", "port": port}]});
            if let Some(p) = params {
                spec["infrastructure"] = json!({"parametersRef": {"group": "", "kind": "ConfigMap", "name": p}});
            }
            gateway::fixtures::gateway(json!({"metadata": {"name": name, "namespace": "a"}, "spec": spec}))
        };
        let route = |gw: &str| {
            gateway::fixtures::route(
                "TCPRoute",
                json!({"metadata": {"name": gw, "namespace": "a"}, "spec": {
                "parentRefs": [{"name": gw}], "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]}}),
            )
        };
        let data = |pairs: &[(&str, &str)]| Some(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        let maps: ConfigMaps = BTreeMap::from([
            (("infra".into(), "class".into()), data(&[("proxy-protocol", "1"), ("force-https", "true")])),
            (("a".into(), "v2".into()), data(&[("proxy-protocol", "2")])),
            (("a".into(), "bad".into()), data(&[("tcp-alias", "true")])),
        ]);
        let mut ing = ingress_at("a", "web", "2024-01-01T00:00:00Z", &["demo"]);
        ing.metadata.annotations =
            Some(BTreeMap::from([(options::OPTIONS_ANNOTATION.to_string(), "proxy-protocol=2".into())]));
        let mut odd = ingress_at("b", "odd", "2024-01-01T00:00:00Z", &["odd"]);
        odd.metadata.annotations =
            Some(BTreeMap::from([(options::OPTIONS_ANNOTATION.to_string(), "proxy-protocol=9".into())]));
        let ingresses = [ing, odd];
        let services = [web_service("a"), web_service("b")];
        let pods = [pod_at("a", "a-1", "2025-01-01T00:00:00Z", None), pod_at("b", "b-1", "2025-01-01T00:00:00Z", None)];
        let domains = DomainPolicy::default();
        let mut inputs = inputs(
            &ingresses,
            &services,
            &pods,
            vec![gw("plain", 5000, None), gw("own", 5001, Some("v2")), gw("broken", 5002, Some("bad"))],
            vec![route("plain"), route("own"), route("broken")],
            &domains,
        );
        // Without server options (the webhook), nothing is read.
        let r = resolve_all(&inputs);
        assert!(r.route_tunnels.values().flatten().all(|t| t.options.is_empty()));
        let class_ref = ParametersRef {
            group: "".into(),
            kind: "ConfigMap".into(),
            namespace: Some("infra".into()),
            name: "class".into(),
        };
        inputs.server_options = Some(ServerOptionInputs {
            dialect: Dialect::Sish,
            class_refs: BTreeMap::from([("pico".to_string(), Some(class_ref))]),
            config_maps: &maps,
        });
        let r = resolve_all(&inputs);
        let opts_of = |pod: &str, name_part: &str| -> Vec<(String, String)> {
            let t = r.route_tunnels[&key(&pod[..1], pod)].iter().find(|t| t.name.contains(name_part)).unwrap();
            t.options.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(opts_of("a-1", "plain"), [pair("force-https", "true"), pair("proxy-protocol", "1")], "the class's");
        assert_eq!(
            opts_of("a-1", "own"),
            [pair("force-https", "true"), pair("proxy-protocol", "2")],
            "the Gateway's wins"
        );
        assert_eq!(
            opts_of("a-1", "broken"),
            [pair("force-https", "true"), pair("proxy-protocol", "1")],
            "the class's still"
        );
        let p = &r.gateway_option_problems[&("a".to_string(), "broken".to_string())];
        assert_eq!(p.reason, options::INVALID_PARAMETERS);
        assert!(p.message.contains("\"tcp-alias\"") && p.message.contains("ConfigMap a/bad"), "{}", p.message);
        assert_eq!(opts_of("a-1", "demo"), [pair("proxy-protocol", "2")], "the Ingress's annotation");
        assert!(opts_of("b-1", "odd").is_empty());
        let odd = &r.ingresses[&key("b", "odd")].problems;
        assert!(odd.iter().any(|p| p.reason == options::INVALID_PARAMETERS && p.message.contains("1 or 2")), "{odd:?}");
        assert!(r.class_problems.is_empty());

        // A class whose ConfigMap is missing is said; its Gateways keep their own options.
        inputs
            .server_options
            .as_mut()
            .unwrap()
            .class_refs
            .values_mut()
            .for_each(|r| r.as_mut().unwrap().name = "gone".into());
        let r = resolve_all(&inputs);
        assert!(r.class_problems["pico"].message.contains("does not exist"), "{:?}", r.class_problems);
        let t = r.route_tunnels[&key("a", "a-1")].iter().find(|t| t.name.contains("own")).unwrap();
        assert_eq!(t.options.get("proxy-protocol").map(String::as_str), Some("2"));
    }

    fn key(ns: &str, name: &str) -> PodKey {
        (ns.to_string(), name.to_string())
    }

    fn hosts_of(r: &ClusterResolution, pod: &PodKey) -> Vec<String> {
        r.route_tunnels.get(pod).into_iter().flatten().filter_map(|t| t.host.clone()).collect()
    }

    #[test]
    fn a_name_belongs_to_its_oldest_claimant_across_namespaces() {
        let ingresses = [
            ingress_at("b", "web", "2025-01-01T00:00:00Z", &["demo", "b-only"]),
            ingress_at("a", "web", "2024-01-01T00:00:00Z", &["demo"]),
        ];
        let services = [web_service("a"), web_service("b"), web_service("c")];
        let pods = [
            pod_at("a", "a-1", "2024-02-01T00:00:00Z", None),
            pod_at("b", "b-1", "2025-02-01T00:00:00Z", None),
            // Namespace c exposes demo too, later than both Ingresses, and a TCP port nobody else wants.
            pod_at("c", "c-1", "2026-01-01T00:00:00Z", Some("http:demo=8080, tcp:5432=8080")),
        ];
        let domains = DomainPolicy::default();
        let r = resolve_all(&inputs(&ingresses, &services, &pods, vec![], vec![], &domains));
        assert_eq!(hosts_of(&r, &key("a", "a-1")), ["demo"], "the older Ingress keeps its pods' tunnel");
        assert_eq!(hosts_of(&r, &key("b", "b-1")), ["b-only"], "the newer one loses demo, keeps its other name");
        let b = &r.ingresses[&key("b", "web")];
        let conflict = b.problems.iter().find(|p| p.reason == TUNNEL_CONFLICT).expect("said on the newer Ingress");
        assert!(conflict.message.contains("belongs to Ingress a/web"), "{}", conflict.message);
        assert!(r.ingresses[&key("a", "web")].problems.is_empty(), "{:?}", r.ingresses[&key("a", "web")].problems);
        // The expose annotation in c: demo is not c's, the port is.
        let (file, problems) = pod_tunnels_file(&pods[2], &[], &r.ownership);
        let names: Vec<&str> = file.tunnels.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["tcp-5432"]);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].message.contains("Ingress a/web"), "{}", problems[0].message);

        // The older Ingress goes: the newer takes over.
        let r = resolve_all(&inputs(&ingresses[..1], &services, &pods, vec![], vec![], &domains));
        assert_eq!(hosts_of(&r, &key("b", "b-1")), ["b-only", "demo"]);
        assert!(r.ingresses[&key("b", "web")].problems.is_empty());
    }

    #[test]
    fn a_name_with_no_pod_behind_it_still_belongs_to_its_route() {
        // a's Ingress is older; its Service selects nothing yet. b still may not have demo.
        let ingresses = [
            ingress_at("a", "web", "2024-01-01T00:00:00Z", &["demo"]),
            ingress_at("b", "web", "2025-01-01T00:00:00Z", &["demo"]),
        ];
        let services = [web_service("a"), web_service("b")];
        let pods = [pod_at("b", "b-1", "2025-02-01T00:00:00Z", None)];
        let domains = DomainPolicy::default();
        let r = resolve_all(&inputs(&ingresses, &services, &pods, vec![], vec![], &domains));
        assert!(hosts_of(&r, &key("b", "b-1")).is_empty());
        assert_eq!(r.ingresses[&key("b", "web")].problems[0].reason, TUNNEL_CONFLICT);
    }

    fn tcp_gateway(ns: &str, port: u16) -> GatewayModel {
        gateway::fixtures::gateway(json!({"metadata": {"name": "gw", "namespace": ns}, "spec": {
            "gatewayClassName": "pico", "listeners": [
                {"name": "tcp", "protocol": "TCP", "port": port},
                {"name": "web", "protocol": "HTTP", "port": 80, "hostname": "web"}]}}))
    }

    fn route_at(kind: &str, ns: &str, name: &str, created: &str, section: &str) -> RouteModel {
        gateway::fixtures::route(
            kind,
            json!({"metadata": {"name": name, "namespace": ns, "creationTimestamp": created}, "spec": {
            "parentRefs": [{"name": "gw", "sectionName": section}],
            "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]}}),
        )
    }

    #[test]
    fn routes_through_a_listener_whose_port_another_namespace_owns_are_not_accepted() {
        let services = [web_service("g")];
        let pods = [
            pod_at("g", "g-1", "2024-02-01T00:00:00Z", None),
            // Older than the route: namespace x's expose annotation owns the port.
            pod_at("x", "x-1", "2020-01-01T00:00:00Z", Some("tcp:5432=5432")),
        ];
        let domains = DomainPolicy::default();
        let routes = vec![
            route_at("TCPRoute", "g", "db", "2024-01-01T00:00:00Z", "tcp"),
            route_at("HTTPRoute", "g", "first", "2024-01-01T00:00:00Z", "web"),
            route_at("HTTPRoute", "g", "second", "2024-06-01T00:00:00Z", "web"),
        ];
        let r = resolve_all(&inputs(&[], &services, &pods, vec![tcp_gateway("g", 5432)], routes, &domains));
        let tunnels = &r.route_tunnels[&key("g", "g-1")];
        assert!(tunnels.iter().all(|t| t.kind != TunnelKind::Tcp), "{tunnels:?}");
        assert_eq!(hosts_of(&r, &key("g", "g-1")), ["web"], "the older HTTPRoute's name");
        let gw = &r.gateway;
        let status =
            |kind: &str, name: &str| gw.routes[&(kind.to_string(), "g".to_string(), name.to_string())][0].clone();
        let db = status("TCPRoute", "db").accepted.unwrap_err();
        assert_eq!(db.reason, TUNNEL_CONFLICT);
        assert!(db.message.contains("namespace x, pod x-1"), "{}", db.message);
        assert!(status("HTTPRoute", "first").accepted.is_ok());
        let second = status("HTTPRoute", "second").accepted.unwrap_err();
        assert!(second.message.contains("HTTPRoute g/first"), "{}", second.message);
        let attached = &gw.attached[&key("g", "gw")];
        assert_eq!((attached["tcp"], attached["web"]), (0, 1), "routes that lost everything are not attached");
        let conflicts = &gw.listener_conflicts[&key("g", "gw")];
        assert!(conflicts["tcp"].message.contains("public TCP port 5432"), "{:?}", conflicts["tcp"]);
        assert!(!conflicts.contains_key("web"), "two routes of one listener: not the listener's conflict");
        // x keeps its port.
        let (file, problems) = pod_tunnels_file(&pods[1], &[], &r.ownership);
        assert_eq!((file.tunnels.len(), problems.len()), (1, 0));
    }

    /// Issue 12, defect 13 (routes) / contract decision 4: two HTTPRoutes asking one
    /// hostname-less listener for the same hostname, with different backends: the older gets
    /// it; the other's parent is Accepted=False TunnelConflict naming the winner, its pods get
    /// no tunnel for it, and attachedRoutes counts only the winner. (This pure side already held
    /// on the base of issue 12, through resolve::ownership; the test pins it.)
    #[test]
    fn two_routes_with_one_hostname_on_one_listener_the_older_wins() {
        let gw = gateway::fixtures::gateway(json!({"metadata": {"name": "gw", "namespace": "g"}, "spec": {
            "gatewayClassName": "pico", "listeners": [{"name": "web", "protocol": "HTTP", "port": 80}]}}));
        let route = |name: &str, created: &str, backend: &str| {
            gateway::fixtures::route(
                "HTTPRoute",
                json!({"metadata": {"name": name, "namespace": "g", "creationTimestamp": created}, "spec": {
                "parentRefs": [{"name": "gw"}], "hostnames": ["demo"],
                "rules": [{"backendRefs": [{"name": backend, "port": 80}]}]}}),
            )
        };
        let mut other = web_service("g");
        other.metadata.name = Some("other".into());
        other.spec.as_mut().unwrap().selector = Some(BTreeMap::from([("app".to_string(), "other".to_string())]));
        let services = [web_service("g"), other];
        let mut pods =
            [pod_at("g", "web-1", "2024-02-01T00:00:00Z", None), pod_at("g", "other-1", "2024-02-01T00:00:00Z", None)];
        pods[1].metadata.labels = Some(BTreeMap::from([("app".to_string(), "other".to_string())]));
        let domains = DomainPolicy::default();
        let routes =
            vec![route("newer", "2024-06-01T00:00:00Z", "other"), route("older", "2024-01-01T00:00:00Z", "web")];
        let r = resolve_all(&inputs(&[], &services, &pods, vec![gw], routes, &domains));
        assert_eq!(hosts_of(&r, &key("g", "web-1")), ["demo"]);
        assert!(hosts_of(&r, &key("g", "other-1")).is_empty(), "the loser's pods serve nothing");
        let status =
            |name: &str| r.gateway.routes[&("HTTPRoute".to_string(), "g".to_string(), name.to_string())][0].clone();
        assert!(status("older").accepted.is_ok());
        let lost = status("newer").accepted.unwrap_err();
        assert_eq!(lost.reason, TUNNEL_CONFLICT);
        assert!(lost.message.contains("HTTPRoute g/older"), "{}", lost.message);
        assert_eq!(r.gateway.attached[&key("g", "gw")]["web"], 1);
    }

    #[test]
    fn the_allow_list_refuses_a_domain_to_other_namespaces() {
        let domains = DomainPolicy::new(vec![ownership::parse_domain_rule("team-a=*.a.example.com").unwrap()]);
        let ingresses = [ingress_at("team-b", "web", "2020-01-01T00:00:00Z", &["app.a.example.com", "demo"])];
        let services = [web_service("team-b")];
        let pods = [pod_at("team-b", "b-1", "2020-02-01T00:00:00Z", Some("http:x.a.example.com=8080"))];
        let r = resolve_all(&inputs(&ingresses, &services, &pods, vec![], vec![], &domains));
        assert_eq!(hosts_of(&r, &key("team-b", "b-1")), ["demo"], "tuns names are not affected");
        let p = &r.ingresses[&key("team-b", "web")].problems;
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].reason, ownership::DOMAIN_NOT_ALLOWED);
        let (file, problems) = pod_tunnels_file(&pods[0], &r.route_tunnels[&key("team-b", "b-1")], &r.ownership);
        assert_eq!(file.tunnels.len(), 1);
        assert_eq!(problems[0].reason, ownership::DOMAIN_NOT_ALLOWED);
        assert!(r.ownership.owner(&Claim::Name("app.a.example.com".into())).is_none(), "a refused ask claims nothing");
    }
}
