//! Pure planning: the caches and their resolution in; the writes that bring the cluster to it,
//! and the Events to tell users, out. Only what differs from the cache is planned, so a pass over
//! a settled cluster plans nothing.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::Resource;
use serde_json::{Value, json};

use super::assign::{self, Candidate, Holder};
use super::status::{self, ListenerFacts, Reports};
use crate::apiserver::index::{GatewayKind, ResolveConfig, View, json_of};
use crate::core::api;
use crate::core::pod::{self, Decision, SkipReason};
use crate::core::report::check_address;
use crate::core::tunnel::TunnelsFile;
use crate::resolve::cluster::{ClusterResolution, pod_tunnels_file};
use crate::resolve::{PodKey, Problem};

/// A change to make in the cluster.
#[derive(Clone, Debug, PartialEq)]
pub enum Write {
    /// The pod's tunnels file annotation (the sidecar picks it up through the downward API).
    /// Sent with the pod's uid as a precondition.
    PodTunnels { namespace: String, name: String, uid: String, tunnels: String },
    /// `status` of an Ingress.
    IngressStatus { namespace: String, name: String, status: Value },
    /// `status` of a Gateway API object (GatewayClass: no namespace). For a route, only
    /// picotun's own `parents` entries: the writer merges them into a fresh read.
    GatewayStatus { kind: GatewayKind, namespace: Option<String>, name: String, status: Value },
}

impl Write {
    /// Identifies the object written, to remember recent writes by.
    pub fn key(&self) -> String {
        match self {
            Write::PodTunnels { namespace, name, .. } => format!("Pod/{namespace}/{name}"),
            Write::IngressStatus { namespace, name, .. } => format!("Ingress/{namespace}/{name}"),
            Write::GatewayStatus { kind, namespace, name, .. } => {
                format!("{kind:?}/{}/{name}", namespace.as_deref().unwrap_or(""))
            }
        }
    }

    /// The kind written, as the metrics label it.
    pub fn kind_label(&self) -> String {
        match self {
            Write::PodTunnels { .. } => "Pod".into(),
            Write::IngressStatus { .. } => "Ingress".into(),
            Write::GatewayStatus { kind, .. } => format!("{kind:?}"),
        }
    }
}

/// An Event to publish on a user's object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Note {
    pub regarding: ObjectReferenceKey,
    pub warning: bool,
    pub reason: String,
    pub message: String,
}

/// The parts of an ObjectReference Events need, orderable so notes can be deduplicated.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObjectReferenceKey {
    pub api_version: String,
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    pub uid: Option<String>,
}

impl ObjectReferenceKey {
    fn of(r: ObjectReference) -> Self {
        ObjectReferenceKey {
            api_version: r.api_version.unwrap_or_default(),
            kind: r.kind.unwrap_or_default(),
            namespace: r.namespace,
            name: r.name.unwrap_or_default(),
            uid: r.uid,
        }
    }

    pub fn to_reference(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some(self.api_version.clone()),
            kind: Some(self.kind.clone()),
            namespace: self.namespace.clone(),
            name: Some(self.name.clone()),
            uid: self.uid.clone(),
            ..Default::default()
        }
    }
}

/// A planned write, with the Event that explains it once it succeeds.
#[derive(Clone, Debug)]
pub struct Planned {
    pub write: Write,
    pub note: Option<Note>,
    /// The resourceVersion of the object as the plan saw it in the cache.
    pub seen: Option<String>,
}

/// What planning needs beyond the resolution's config.
#[derive(Clone, Debug)]
pub struct Options {
    /// picotun's own namespace (its pods are never injected).
    pub own_namespace: String,
    /// `--inject-route-backends`: pods a route selects are injected without opting in.
    pub inject_route_backends: bool,
    /// `--server-load-balancing`: the server shares a name among replicas, nobody stands by.
    pub server_load_balancing: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { own_namespace: "pico-sh-system".into(), inject_route_backends: false, server_load_balancing: false }
    }
}

/// The Warning Event reason for routes whose backing pods did not opt in to the sidecar.
pub const BACKEND_NOT_INJECTED: &str = "BackendNotInjected";
/// The Warning Event reason for pods that should carry the sidecar but don't.
pub const SIDECAR_MISSING: &str = "SidecarMissing";

#[derive(Debug, Default)]
pub struct Plan {
    pub writes: Vec<Planned>,
    /// Standing problems: published once each while they last.
    pub problems: Vec<Note>,
    /// Pods a route selects that have no sidecar, with the objects that want them.
    pub missing_sidecars: BTreeMap<PodKey, Vec<String>>,
    /// Pods a route selects that did not opt in to the sidecar (never restarted, never
    /// SidecarMissing).
    pub not_injected: BTreeSet<PodKey>,
    /// Tunnels by state, for the metrics: established, pending, missing_sidecar.
    pub tunnel_states: BTreeMap<&'static str, i64>,
    /// Current problems by reason, for the metrics.
    pub problem_counts: BTreeMap<String, i64>,
}

fn key_of(meta: &kube::api::ObjectMeta) -> (String, String) {
    (meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default())
}

fn typed_ref<K: Resource<DynamicType = ()>>(o: &K) -> ObjectReferenceKey {
    ObjectReferenceKey::of(o.object_ref(&()))
}

fn problem_note(regarding: &ObjectReferenceKey, p: &Problem) -> Note {
    Note { regarding: regarding.clone(), warning: true, reason: p.reason.to_string(), message: p.message.clone() }
}

/// Plans every write and Event for one pass. `now` is the RFC 3339 time for new conditions.
pub fn plan(view: &View, resolution: &ClusterResolution, config: &ResolveConfig, opts: &Options, now: &str) -> Plan {
    let mut out = Plan::default();
    let scope = view.scope(config);
    let pods: BTreeMap<PodKey, &Pod> = view
        .pods
        .iter()
        .map(|p| (key_of(&p.metadata), p.as_ref()))
        .filter(|(k, _)| scope.as_ref().is_none_or(|s| s.contains(&k.0)))
        .collect();
    let live = |p: &Pod| {
        p.metadata.deletion_timestamp.is_none()
            && !matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
    };

    // Pods: the tunnels file of every injected pod.
    let no_tunnels = Vec::new();
    let mut files = Vec::new();
    for (key, pod) in &pods {
        let routes = resolution.route_tunnels.get(key).unwrap_or(&no_tunnels);
        if !pod::is_injected(pod) {
            if !routes.is_empty() && live(pod) {
                match pod::expects_sidecar(pod, &key.0, &opts.own_namespace, None, routes, opts.inject_route_backends) {
                    Decision::Inject { .. } => {
                        out.missing_sidecars.insert(key.clone(), Vec::new());
                        *out.tunnel_states.entry("missing_sidecar").or_default() += routes.len() as i64;
                    }
                    // Not asked for: said on the route, never restarted.
                    Decision::Skip { reason: SkipReason::NotOptedIn, .. } => {
                        out.not_injected.insert(key.clone());
                    }
                    Decision::Skip { .. } => {}
                }
            }
            continue;
        }
        if !live(pod) {
            continue;
        }
        let (file, problems) = pod_tunnels_file(pod, routes, &resolution.ownership);
        let pod_ref = ObjectReferenceKey::of(pod.object_ref(&()));
        out.problems.extend(problems.iter().map(|p| problem_note(&pod_ref, p)));
        files.push((key, *pod, file, pod_ref));
    }
    // What the sidecars reported: only injected, live pods' reports, of tunnels they have, and
    // only addresses those tunnels can have. The annotation is on the pod, which its author can
    // write, and it goes into route and Gateway status: a host the Gateway CRD refuses would fail
    // every status patch of a Gateway other namespaces share. (The server's domains are checked
    // by the webhook at /report; the controller does not know them.)
    let reports: Reports = files
        .iter()
        .filter_map(|(key, pod, file, _)| {
            let mut reported = status::reports_of(pod);
            reported.retain(|name, report| {
                let Some(spec) = file.tunnels.iter().find(|t| &t.name == name) else { return false };
                if report.public_address.as_deref().is_some_and(|a| check_address(a, spec, None).is_err()) {
                    report.public_address = None;
                }
                true
            });
            (!reported.is_empty()).then(|| ((*key).clone(), reported))
        })
        .collect();
    let standby = if opts.server_load_balancing { BTreeMap::new() } else { standing_by(&files, &reports) };
    for (key, pod, mut file, pod_ref) in files {
        if let Some(names) = standby.get(key) {
            for t in &mut file.tunnels {
                t.standby = names.contains(&t.name);
            }
        }
        let reported = reports.get(key);
        for t in &file.tunnels {
            let up = reported.and_then(|r| r.get(&t.name)).is_some_and(|r| r.state == "established");
            let state = if t.standby {
                "standby"
            } else if up {
                "established"
            } else {
                "pending"
            };
            *out.tunnel_states.entry(state).or_default() += 1;
        }
        let wanted = file.to_json();
        let current = pod.metadata.annotations.as_ref().and_then(|a| a.get(api::TUNNELS));
        if current != Some(&wanted) {
            let names: Vec<&str> = file.tunnels.iter().filter(|t| !t.standby).map(|t| t.name.as_str()).collect();
            let standing: Vec<&str> = file.tunnels.iter().filter(|t| t.standby).map(|t| t.name.as_str()).collect();
            let mut message = if file.tunnels.is_empty() {
                "no tunnels: no route picotun serves selects this pod any more".to_string()
            } else if names.is_empty() {
                "the sidecar opens no tunnel".to_string()
            } else {
                format!("the sidecar now opens {}", names.join(", "))
            };
            if !standing.is_empty() {
                message.push_str(&format!("; stands by for {} (another replica holds them)", standing.join(", ")));
            }
            out.writes.push(Planned {
                write: Write::PodTunnels {
                    namespace: key.0.clone(),
                    name: key.1.clone(),
                    uid: pod.metadata.uid.clone().unwrap_or_default(),
                    tunnels: wanted,
                },
                note: Some(Note { regarding: pod_ref, warning: false, reason: "TunnelsUpdated".into(), message }),
                seen: pod.metadata.resource_version.clone(),
            });
        }
    }

    // Ingresses.
    for ing in &view.ingresses {
        let key = key_of(&ing.metadata);
        let Some(r) = resolution.ingresses.get(&key) else { continue };
        let regarding = ObjectReferenceKey::of(ing.object_ref(&()));
        out.problems.extend(r.problems.iter().map(|p| problem_note(&regarding, p)));
        let names: BTreeSet<String> = r.tunnels.values().flatten().map(|t| t.name.clone()).collect();
        let missing: Vec<&PodKey> = r.tunnels.keys().filter(|k| out.missing_sidecars.contains_key(*k)).collect();
        for pod in &missing {
            out.missing_sidecars.entry((*pod).clone()).or_default().push(format!("Ingress {}/{}", key.0, key.1));
        }
        if !missing.is_empty() {
            out.problems.push(missing_note(&regarding, &missing));
        }
        let not_injected: Vec<&PodKey> = r.tunnels.keys().filter(|k| out.not_injected.contains(*k)).collect();
        if !not_injected.is_empty() {
            out.problems.push(not_injected_note(&regarding, &not_injected));
        }
        let addresses = status::published(&reports, r.tunnels.keys(), &names);
        let wanted = status::ingress_status(&addresses);
        let have = serde_json::to_value(&ing.status).unwrap_or(Value::Null);
        if !status::already(&wanted, &have) {
            let note = (!addresses.is_empty()).then(|| Note {
                regarding: regarding.clone(),
                warning: false,
                reason: "Published".into(),
                message: format!("published at {}", addresses.iter().cloned().collect::<Vec<_>>().join(", ")),
            });
            out.writes.push(Planned {
                write: Write::IngressStatus { namespace: key.0.clone(), name: key.1.clone(), status: wanted },
                note,
                seen: ing.metadata.resource_version.clone(),
            });
        }
    }

    // GatewayClasses of ours.
    let ours = view.our_gateway_classes(config);
    for class in &view.gateway_classes {
        let name = class.metadata.name.clone().unwrap_or_default();
        if !ours.contains(&name) {
            continue;
        }
        let generation = class.metadata.generation.unwrap_or(0);
        let have_doc = json_of(class.as_ref());
        let have = &have_doc["status"];
        let parameters = resolution.class_problems.get(&name);
        if let Some(p) = parameters {
            out.problems.push(problem_note(&typed_ref(class.as_ref()), p));
        }
        let wanted = status::gateway_class_status(generation, have, now, parameters);
        if !status::already(&wanted, have) {
            out.writes.push(Planned {
                write: Write::GatewayStatus { kind: GatewayKind::GatewayClass, namespace: None, name, status: wanted },
                note: None,
                seen: class.metadata.resource_version.clone(),
            });
        }
    }

    // Gateways of our classes.
    let g = &resolution.gateway;
    let tunnel_pods = tunnel_pods(resolution);
    let no_problems = Vec::new();
    for gw in &view.gateways {
        let key = key_of(&gw.metadata);
        let Some(attached) = g.attached.get(&key) else { continue };
        let regarding = typed_ref(gw.as_ref());
        let gw_doc = json_of(gw.as_ref());
        let model = crate::resolve::gateway::gateway_model(gw);
        let mut facts = Vec::new();
        let mut all_missing = BTreeSet::new();
        let mut all_not_injected = BTreeSet::new();
        for l in &model.listeners {
            let problems = g.listener_problems.get(&key).and_then(|m| m.get(&l.name)).unwrap_or(&no_problems);
            out.problems.extend(problems.iter().map(|p| problem_note(&regarding, p)));
            let conflict = g.listener_conflicts.get(&key).and_then(|m| m.get(&l.name));
            out.problems.extend(conflict.map(|p| problem_note(&regarding, p)));
            let names = g.listener_tunnels.get(&key).and_then(|m| m.get(&l.name)).cloned().unwrap_or_default();
            let pods: BTreeSet<&PodKey> = names.iter().filter_map(|n| tunnel_pods.get(n)).flatten().collect();
            let missing: Vec<&PodKey> =
                pods.iter().copied().filter(|k| out.missing_sidecars.contains_key(*k)).collect();
            all_missing.extend(missing.iter().copied());
            all_not_injected.extend(pods.iter().copied().filter(|k| out.not_injected.contains(*k)));
            facts.push(ListenerFacts {
                name: &l.name,
                protocol: &l.protocol,
                attached: attached.get(&l.name).copied().unwrap_or(0),
                problems,
                refs: g.listener_refs.get(&key).and_then(|m| m.get(&l.name)).map_or(&[], Vec::as_slice),
                supported_kinds: g.listener_kinds.get(&key).and_then(|m| m.get(&l.name)).map_or(&[], Vec::as_slice),
                addresses: status::published(&reports, pods.iter().copied(), &names),
                missing_sidecars: missing.len(),
                conflict,
            });
        }
        if !all_missing.is_empty() {
            let missing: Vec<&PodKey> = all_missing.into_iter().collect();
            for pod in &missing {
                out.missing_sidecars.entry((*pod).clone()).or_default().push(format!("Gateway {}/{}", key.0, key.1));
            }
            out.problems.push(missing_note(&regarding, &missing));
        }
        if !all_not_injected.is_empty() {
            out.problems.push(not_injected_note(&regarding, &all_not_injected.into_iter().collect::<Vec<_>>()));
        }
        let generation = gw.metadata.generation.unwrap_or(0);
        let have = &gw_doc["status"];
        let parameters = resolution.gateway_option_problems.get(&key);
        out.problems.extend(parameters.map(|p| problem_note(&regarding, p)));
        let wanted = status::gateway_status_with(&facts, parameters, generation, have, now);
        if !status::already(&wanted, have) {
            let published: Vec<String> = facts.iter().flat_map(|f| f.addresses.iter().cloned()).collect();
            let was: BTreeSet<&str> =
                have["addresses"].as_array().into_iter().flatten().filter_map(|a| a["value"].as_str()).collect();
            let now_hosts: BTreeSet<String> = published.iter().map(|a| status::host_of(a)).collect();
            let note = (!published.is_empty() && now_hosts.iter().any(|h| !was.contains(h.as_str()))).then(|| Note {
                regarding: regarding.clone(),
                warning: false,
                reason: "Published".into(),
                message: format!("published at {}", published.join(", ")),
            });
            out.writes.push(Planned {
                write: Write::GatewayStatus {
                    kind: GatewayKind::Gateway,
                    namespace: Some(key.0.clone()),
                    name: key.1.clone(),
                    status: wanted,
                },
                note,
                seen: gw.metadata.resource_version.clone(),
            });
        }
    }

    // Routes attached to our Gateways.
    let http = view.http_routes.iter().map(|r| (&r.metadata, typed_ref(r.as_ref()), json_of(r.as_ref())));
    let tcp = view.tcp_routes.iter().map(|r| (&r.metadata, typed_ref(r.as_ref()), json_of(r.as_ref())));
    let tls = view.tls_routes.iter().map(|r| (&r.metadata, typed_ref(r.as_ref()), json_of(r.as_ref())));
    for (kind, objs) in [
        (GatewayKind::HTTPRoute, http.collect::<Vec<_>>()),
        (GatewayKind::TCPRoute, tcp.collect::<Vec<_>>()),
        (GatewayKind::TLSRoute, tls.collect::<Vec<_>>()),
    ] {
        let kind_name = format!("{kind:?}");
        for (meta, regarding, doc) in objs {
            let (ns, name) = key_of(meta);
            let rkey = (kind_name.clone(), ns.clone(), name.clone());
            let Some(parents) = g.routes.get(&rkey) else {
                // Detached from every Gateway of ours: our old entries go.
                let ours = doc["status"]["parents"]
                    .as_array()
                    .is_some_and(|ps| ps.iter().any(|p| p["controllerName"] == config.gateway_controller.as_str()));
                if ours {
                    out.writes.push(Planned {
                        write: Write::GatewayStatus { kind, namespace: Some(ns), name, status: json!({"parents": []}) },
                        note: None,
                        seen: meta.resource_version.clone(),
                    });
                }
                continue;
            };
            let route_problems = g.route_problems.get(&rkey).unwrap_or(&no_problems);
            out.problems.extend(route_problems.iter().map(|p| problem_note(&regarding, p)));
            for p in parents {
                for e in [&p.accepted, &p.resolved_refs].into_iter().filter_map(|r| r.as_ref().err()) {
                    out.problems.push(problem_note(&regarding, e));
                }
            }
            if let Some(names) = g.route_tunnels.get(&rkey) {
                let backing: BTreeSet<&PodKey> = names.iter().filter_map(|n| tunnel_pods.get(n)).flatten().collect();
                let missing: Vec<&PodKey> =
                    backing.iter().copied().filter(|k| out.missing_sidecars.contains_key(*k)).collect();
                if !missing.is_empty() {
                    out.problems.push(missing_note(&regarding, &missing));
                }
                let not_injected: Vec<&PodKey> =
                    backing.iter().copied().filter(|k| out.not_injected.contains(*k)).collect();
                if !not_injected.is_empty() {
                    out.problems.push(not_injected_note(&regarding, &not_injected));
                }
            }
            let generation = meta.generation.unwrap_or(0);
            let have = &doc["status"];
            let ours = status::route_parents(parents, route_problems, &config.gateway_controller, generation, now);
            let wanted = status::merge_route_parents(have, ours, &config.gateway_controller);
            if !status::already(&wanted, have) {
                // Only our entries: status.parents is atomic, the writer merges them into a
                // fresh read so other implementations' entries are never lost.
                let ours: Vec<Value> = wanted["parents"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|p| p["controllerName"] == config.gateway_controller.as_str())
                    .cloned()
                    .collect();
                out.writes.push(Planned {
                    write: Write::GatewayStatus { kind, namespace: Some(ns), name, status: json!({"parents": ours}) },
                    note: None,
                    seen: meta.resource_version.clone(),
                });
            }
        }
    }

    // Tunnels a pod could not take.
    for (pod, problems) in &resolution.pod_problems {
        if let Some(p) = pods.get(pod) {
            let regarding = ObjectReferenceKey::of(p.object_ref(&()));
            out.problems.extend(problems.iter().map(|p| problem_note(&regarding, p)));
        }
    }
    // Pods that should carry the sidecar but don't, said on the pod too.
    for (key, wanted_by) in &out.missing_sidecars {
        if let Some(p) = pods.get(key) {
            out.problems.push(Note {
                regarding: ObjectReferenceKey::of(p.object_ref(&())),
                warning: true,
                reason: SIDECAR_MISSING.into(),
                message: format!(
                    "backs {} but has no picotun sidecar (created before its namespace was labeled {}=enabled, or while the webhook was unavailable): restart it",
                    if wanted_by.is_empty() { "a route".to_string() } else { wanted_by.join(", ") },
                    api::NAMESPACE_INJECTION_LABEL
                ),
            });
        }
    }
    out.problems.sort();
    out.problems.dedup();
    for n in out.problems.iter().filter(|n| n.warning) {
        *out.problem_counts.entry(n.reason.clone()).or_default() += 1;
    }
    out
}

fn missing_note(regarding: &ObjectReferenceKey, missing: &[&PodKey]) -> Note {
    let names: Vec<&str> = missing.iter().take(5).map(|k| k.1.as_str()).collect();
    Note {
        regarding: regarding.clone(),
        warning: true,
        reason: SIDECAR_MISSING.into(),
        message: format!(
            "{} backing pod(s) have no picotun sidecar ({}{}): label the namespace {}=enabled and restart them",
            missing.len(),
            names.join(", "),
            if missing.len() > names.len() { ", ..." } else { "" },
            api::NAMESPACE_INJECTION_LABEL
        ),
    }
}

fn not_injected_note(regarding: &ObjectReferenceKey, pods: &[&PodKey]) -> Note {
    let names: Vec<&str> = pods.iter().take(5).map(|k| k.1.as_str()).collect();
    Note {
        regarding: regarding.clone(),
        warning: true,
        reason: BACKEND_NOT_INJECTED.into(),
        message: format!(
            "{} backing pod(s) did not opt in to the picotun sidecar and open no tunnel ({}{}): label their pod template {}=true (or run the webhook and controller with --inject-route-backends) and restart them",
            pods.len(),
            names.join(", "),
            if pods.len() > names.len() { ", ..." } else { "" },
            api::INJECT
        ),
    }
}

/// The tunnels (by pod) that stand by: every public claim two or more pods ask for is held by
/// one of them (`assign::holder`).
fn standing_by(
    files: &[(&PodKey, &Pod, TunnelsFile, ObjectReferenceKey)],
    reports: &Reports,
) -> BTreeMap<PodKey, BTreeSet<String>> {
    let mut claims: BTreeMap<String, Vec<Candidate>> = BTreeMap::new();
    let mut asks: Vec<(&PodKey, &str, String)> = Vec::new();
    for (key, pod, file, _) in files {
        let held = assign::held_claims(pod.metadata.annotations.as_ref().and_then(|a| a.get(api::TUNNELS)));
        let reported = reports.get(*key);
        for t in &file.tunnels {
            let Some(claim) = t.public_claim() else { continue };
            let state = reported.and_then(|r| r.get(&t.name)).map(|r| r.state.as_str());
            claims.entry(claim.clone()).or_default().push(Candidate {
                key: (*key).clone(),
                created: pod.metadata.creation_timestamp.as_ref().map(|t| t.0),
                live: true,
                ready: assign::is_ready(pod),
                holds: held.contains(&claim),
                established: state == Some("established"),
                failed: state == Some("failed"),
                unreported: !matches!(state, Some("established" | "failed" | "standingBy")),
            });
            asks.push((key, t.name.as_str(), claim));
        }
    }
    let holders = assign::holders(&claims);
    let mut out: BTreeMap<PodKey, BTreeSet<String>> = BTreeMap::new();
    for (key, name, claim) in asks {
        let stand_by = match holders.get(&claim) {
            Some(Holder::Pod(h)) => *h != key,
            // Until the sidecars have said who has it, each keeps what its file says.
            Some(Holder::Undecided) => claims[&claim].iter().any(|c| c.key == *key && !c.holds),
            _ => false,
        };
        if stand_by {
            out.entry(key.clone()).or_default().insert(name.to_string());
        }
    }
    out
}

/// Tunnel name -> the pods that carry it.
fn tunnel_pods(resolution: &ClusterResolution) -> BTreeMap<String, BTreeSet<PodKey>> {
    let mut out: BTreeMap<String, BTreeSet<PodKey>> = BTreeMap::new();
    for (pod, specs) in &resolution.route_tunnels {
        for s in specs {
            out.entry(s.name.clone()).or_default().insert(pod.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use k8s_openapi::api::networking::v1::Ingress;

    fn ingress() -> Arc<Ingress> {
        Arc::new(
            serde_json::from_value(json!({"metadata": {"name": "web", "namespace": "apps", "resourceVersion": "7",
                "creationTimestamp": "2026-01-01T00:00:00Z"},
                "spec": {"ingressClassName": "pico-tunnel", "rules": [{"host": "demo", "http": {"paths": [
                    {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}]}}))
            .unwrap(),
        )
    }

    fn service() -> Arc<k8s_openapi::api::core::v1::Service> {
        Arc::new(
            serde_json::from_value(json!({"metadata": {"name": "web", "namespace": "apps"},
                "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}))
            .unwrap(),
        )
    }

    /// A pod behind the Service: `sidecar` says whether it carries the sidecar, `labels` adds
    /// to `app: web`.
    fn pod(name: &str, created: &str, sidecar: bool, labels: Value, ready: bool) -> Arc<Pod> {
        let mut l = json!({"app": "web"});
        l.as_object_mut().unwrap().extend(labels.as_object().cloned().unwrap_or_default());
        let mut containers = vec![json!({"name": "app", "image": "x", "ports": [{"containerPort": 8080}]})];
        if sidecar {
            containers.push(json!({"name": api::SIDECAR_NAME, "image": "picotun"}));
        }
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "apps", "uid": format!("uid-{name}"), "labels": l,
                    "creationTimestamp": created, "resourceVersion": "1"},
                "spec": {"containers": containers},
                "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
            }))
            .unwrap(),
        )
    }

    fn plan_of(pods: Vec<Arc<Pod>>, opts: &Options) -> Plan {
        let view = View { ingresses: vec![ingress()], services: vec![service()], pods, ..Default::default() };
        let config = ResolveConfig::default();
        let resolution = view.resolve(&config);
        plan(&view, &resolution, &config, opts, "2026-01-01T00:00:00Z")
    }

    fn reasons_on(plan: &Plan, name: &str) -> Vec<String> {
        plan.problems.iter().filter(|n| n.regarding.name == name).map(|n| n.reason.clone()).collect()
    }

    /// Defect 2 of issue 12: a pod that opted out, or never opted in, was SidecarMissing (and
    /// restarted with --restart-uninjected, which restarts plan.missing_sidecars).
    #[test]
    fn only_pods_that_ask_for_the_sidecar_are_missing_it() {
        let created = "2026-01-01T00:00:00Z";
        let pods = vec![
            pod("asks", created, false, json!({api::INJECT: "true"}), true),
            pod("optout", created, false, json!({api::INJECT: "false"}), true),
            pod("plain", created, false, json!({}), true),
        ];
        let p = plan_of(pods.clone(), &Options::default());
        let missing: Vec<&str> = p.missing_sidecars.keys().map(|k| k.1.as_str()).collect();
        assert_eq!(missing, ["asks"]);
        let not_injected: Vec<&str> = p.not_injected.iter().map(|k| k.1.as_str()).collect();
        assert_eq!(not_injected, ["plain"], "opting out is a choice, not something to fix");
        assert_eq!(reasons_on(&p, "asks"), [SIDECAR_MISSING]);
        assert!(reasons_on(&p, "optout").is_empty() && reasons_on(&p, "plain").is_empty());
        let on_ingress = reasons_on(&p, "web");
        assert!(on_ingress.contains(&BACKEND_NOT_INJECTED.to_string()), "{on_ingress:?}");
        let note = p.problems.iter().find(|n| n.reason == BACKEND_NOT_INJECTED).unwrap();
        assert!(note.message.contains("plain") && note.message.contains("tunnels.pico.sh/inject=true"), "{note:?}");

        // With --inject-route-backends the route itself opts them in: missing (but the opted-out
        // pod still not).
        let p = plan_of(pods, &Options { inject_route_backends: true, ..Default::default() });
        let missing: Vec<&str> = p.missing_sidecars.keys().map(|k| k.1.as_str()).collect();
        assert_eq!(missing, ["asks", "plain"]);
        // Pods in picotun's own namespace are never expected to carry it.
        let p = plan_of(
            vec![pod("asks", created, false, json!({api::INJECT: "true"}), true)],
            &Options { own_namespace: "apps".into(), ..Default::default() },
        );
        assert!(p.missing_sidecars.is_empty());
    }

    fn file_of(plan: &Plan, pod: &str) -> Option<TunnelsFile> {
        plan.writes.iter().find_map(|w| match &w.write {
            Write::PodTunnels { name, tunnels, .. } if name == pod => Some(TunnelsFile::parse(tunnels).unwrap()),
            _ => None,
        })
    }

    /// Contract 10 of issue 12: without load balancing one pod holds the name, the others' files
    /// say standby; with it nobody stands by.
    #[test]
    fn one_pod_holds_each_name_unless_the_server_load_balances() {
        let pods = vec![
            pod("young", "2026-01-01T00:00:09Z", true, json!({}), true),
            pod("old", "2026-01-01T00:00:01Z", true, json!({}), true),
            pod("older-not-ready", "2026-01-01T00:00:00Z", true, json!({}), false),
        ];
        let p = plan_of(pods.clone(), &Options::default());
        let standby = |pod: &str| file_of(&p, pod).unwrap().tunnels[0].standby;
        assert!(!standby("old"), "the oldest Ready pod holds it");
        assert!(standby("young") && standby("older-not-ready"));
        let Write::PodTunnels { uid, .. } = &p.writes.iter().find(|w| w.write.key() == "Pod/apps/old").unwrap().write
        else {
            unreachable!()
        };
        assert_eq!(uid, "uid-old", "sent as the patch's precondition");
        assert_eq!(p.tunnel_states.get("standby"), Some(&2));

        let p = plan_of(pods, &Options { server_load_balancing: true, ..Default::default() });
        for pod in ["young", "old", "older-not-ready"] {
            assert!(!file_of(&p, pod).unwrap().tunnels[0].standby, "{pod}");
        }
    }

    /// Defect: the controller published whatever any pod's `tunnels.pico.sh/addresses` said --
    /// a pod its author annotated, injected or not, with any host. A host the Gateway CRD
    /// refuses fails every status patch of a shared Gateway. Now only injected pods' reports of
    /// their own tunnels count, and only addresses those tunnels can have.
    #[test]
    fn only_addresses_an_injected_pods_tunnels_can_have_reach_status() {
        let created = "2026-01-01T00:00:00Z";
        let first = plan_of(vec![pod("a", created, true, json!({}), true)], &Options::default());
        let tunnel = file_of(&first, "a").unwrap().tunnels[0].name.clone();
        let reporting = |name: &str, sidecar: bool, address: &str| {
            let mut p = (*pod(name, created, sidecar, json!({}), true)).clone();
            let report = json!({"tunnels": {tunnel.clone(): {"state": "established", "publicAddress": address}}});
            p.metadata.annotations = Some(BTreeMap::from([(api::ADDRESSES.to_string(), report.to_string())]));
            Arc::new(p)
        };
        let hosts = |plan: &Plan| -> Vec<String> {
            plan.writes
                .iter()
                .filter_map(|w| match &w.write {
                    Write::IngressStatus { status, .. } => Some(status["loadBalancer"]["ingress"].clone()),
                    _ => None,
                })
                .flat_map(|i| i.as_array().cloned().unwrap_or_default())
                .filter_map(|h| h["hostname"].as_str().map(str::to_string))
                .collect()
        };
        let p = plan_of(vec![reporting("a", true, "https://alice-demo.tuns.sh")], &Options::default());
        assert_eq!(hosts(&p), ["alice-demo.tuns.sh"], "a real report is published");
        for (sidecar, forged) in
            [(true, "https://EVIL_X"), (true, "https://evil.example"), (false, "https://alice-demo.evil.example")]
        {
            let p = plan_of(vec![reporting("a", sidecar, forged)], &Options::default());
            assert!(hosts(&p).is_empty(), "{forged} (sidecar {sidecar}): {:?}", hosts(&p));
        }
    }

    #[test]
    fn writes_carry_the_resource_version_the_plan_saw() {
        let p = plan_of(vec![pod("a", "2026-01-01T00:00:00Z", true, json!({}), true)], &Options::default());
        assert!(p.writes.iter().all(|w| w.seen.is_some()), "{:?}", p.writes);
    }
}
