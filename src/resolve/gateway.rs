//! Gateway API -> tunnels: GatewayClass (controllerName `tunnels.pico.sh/gateway-controller`),
//! Gateway listeners, HTTPRoute and TCPRoute attached by parentRefs / sectionName / port,
//! honouring allowedRoutes and ReferenceGrant, every rule and every backendRef.
//!
//! The objects are read through their JSON form into a small model, so this module does not
//! depend on one generated Rust type per Gateway API version.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

use super::ownership::{Claim, Claimant, Ownership, TUNNEL_CONFLICT};
use super::{PodKey, Problem, Snapshot, service_port, target_port, tunnel_name};
use crate::core::tunnel::{TunnelKind, TunnelSpec, is_dns_name};

pub const GATEWAY_CONTROLLER: &str = "tunnels.pico.sh/gateway-controller";
const GROUP: &str = "gateway.networking.k8s.io";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub name: String,
    pub protocol: String,
    pub port: i32,
    pub hostname: Option<String>,
    /// allowedRoutes.kinds; None = the protocol's default kind.
    pub kinds: Option<Vec<String>>,
    pub from: From,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum From {
    Same,
    All,
    /// matchLabels of the namespace selector.
    Selector(BTreeMap<String, String>),
}

#[derive(Clone, Debug)]
pub struct GatewayModel {
    pub namespace: String,
    pub name: String,
    pub class: String,
    pub listeners: Vec<Listener>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentRef {
    pub namespace: String,
    pub name: String,
    pub section: Option<String>,
    pub port: Option<i32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendRef {
    pub namespace: String,
    pub name: String,
    pub kind: String,
    pub port: Option<i32>,
    pub weight: i32,
}

#[derive(Clone, Debug)]
pub struct RouteModel {
    /// `HTTPRoute` or `TCPRoute`.
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// metadata.creationTimestamp: how old its claims are (resolve::ownership).
    pub created: Option<k8s_openapi::jiff::Timestamp>,
    pub hostnames: Vec<String>,
    pub parents: Vec<ParentRef>,
    /// backendRefs of each rule.
    pub rules: Vec<Vec<BackendRef>>,
}

/// A ReferenceGrant: routes of `from` (kind, namespace) may use Services (all, or the named)
/// in `namespace`.
#[derive(Clone, Debug)]
pub struct Grant {
    pub namespace: String,
    pub from: Vec<(String, String)>,
    pub to_services: Option<BTreeSet<String>>,
}

fn s(v: &Value) -> Option<String> {
    v.as_str().map(str::to_string)
}

pub fn gateway_from_json(v: &Value) -> GatewayModel {
    let namespace = s(&v["metadata"]["namespace"]).unwrap_or_default();
    let listeners = v["spec"]["listeners"]
        .as_array()
        .map(|ls| {
            ls.iter()
                .map(|l| {
                    let ns = &l["allowedRoutes"]["namespaces"];
                    let from = match ns["from"].as_str() {
                        Some("All") => From::All,
                        Some("Selector") => From::Selector(
                            serde_json::from_value(ns["selector"]["matchLabels"].clone()).unwrap_or_default(),
                        ),
                        _ => From::Same,
                    };
                    Listener {
                        name: s(&l["name"]).unwrap_or_default(),
                        protocol: s(&l["protocol"]).unwrap_or_default(),
                        port: l["port"].as_i64().unwrap_or(0) as i32,
                        hostname: s(&l["hostname"]),
                        kinds: l["allowedRoutes"]["kinds"]
                            .as_array()
                            .map(|ks| ks.iter().filter_map(|k| s(&k["kind"])).collect()),
                        from,
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    GatewayModel {
        namespace,
        name: s(&v["metadata"]["name"]).unwrap_or_default(),
        class: s(&v["spec"]["gatewayClassName"]).unwrap_or_default(),
        listeners,
    }
}

pub fn route_from_json(kind: &str, v: &Value) -> RouteModel {
    let namespace = s(&v["metadata"]["namespace"]).unwrap_or_default();
    let parents = v["spec"]["parentRefs"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter(|p| {
                    p["kind"].as_str().unwrap_or("Gateway") == "Gateway"
                        && p["group"].as_str().unwrap_or(GROUP) == GROUP
                })
                .map(|p| ParentRef {
                    namespace: s(&p["namespace"]).unwrap_or_else(|| namespace.clone()),
                    name: s(&p["name"]).unwrap_or_default(),
                    section: s(&p["sectionName"]),
                    port: p["port"].as_i64().map(|n| n as i32),
                })
                .collect()
        })
        .unwrap_or_default();
    let rules = v["spec"]["rules"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .map(|r| {
                    r["backendRefs"]
                        .as_array()
                        .map(|bs| {
                            bs.iter()
                                .map(|b| BackendRef {
                                    namespace: s(&b["namespace"]).unwrap_or_else(|| namespace.clone()),
                                    name: s(&b["name"]).unwrap_or_default(),
                                    kind: format!(
                                        "{}/{}",
                                        b["group"].as_str().unwrap_or(""),
                                        b["kind"].as_str().unwrap_or("Service")
                                    ),
                                    port: b["port"].as_i64().map(|n| n as i32),
                                    weight: b["weight"].as_i64().unwrap_or(1) as i32,
                                })
                                .collect()
                        })
                        .unwrap_or_default()
                })
                .collect()
        })
        .unwrap_or_default();
    RouteModel {
        kind: kind.to_string(),
        namespace,
        name: s(&v["metadata"]["name"]).unwrap_or_default(),
        created: v["metadata"]["creationTimestamp"].as_str().and_then(|t| t.parse().ok()),
        hostnames: v["spec"]["hostnames"].as_array().map(|hs| hs.iter().filter_map(s).collect()).unwrap_or_default(),
        parents,
        rules,
    }
}

pub fn grant_from_json(v: &Value) -> Grant {
    let from = v["spec"]["from"]
        .as_array()
        .map(|fs| {
            fs.iter()
                .filter(|f| f["group"].as_str() == Some(GROUP))
                .filter_map(|f| Some((s(&f["kind"])?, s(&f["namespace"])?)))
                .collect()
        })
        .unwrap_or_default();
    let tos: Vec<&Value> = v["spec"]["to"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .filter(|t| t["group"].as_str().unwrap_or("").is_empty() && t["kind"].as_str() == Some("Service"))
                .collect()
        })
        .unwrap_or_default();
    let to_services = if tos.iter().any(|t| t["name"].is_null()) {
        None
    } else {
        Some(tos.iter().filter_map(|t| s(&t["name"])).collect())
    };
    Grant {
        namespace: s(&v["metadata"]["namespace"]).unwrap_or_default(),
        from,
        to_services: if tos.is_empty() { Some(BTreeSet::new()) } else { to_services },
    }
}

/// Status of one route towards one parent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentStatus {
    pub gateway: (String, String),
    pub section: Option<String>,
    /// Ok, or why it did not attach (reason NotAllowedByListeners, NoMatchingParent,
    /// NoMatchingListenerHostname, ...).
    pub accepted: Result<(), Problem>,
    /// Ok, or why a backend does not resolve (RefNotPermitted, BackendNotFound, InvalidKind).
    pub resolved_refs: Result<(), Problem>,
}

#[derive(Clone, Debug, Default)]
pub struct GatewayResolution {
    pub tunnels: BTreeMap<PodKey, Vec<TunnelSpec>>,
    /// (gateway namespace, name) -> listener name -> attached route count.
    pub attached: BTreeMap<(String, String), BTreeMap<String, i32>>,
    /// (gateway namespace, name) -> listener name -> problems (unsupported protocol, ...).
    pub listener_problems: BTreeMap<(String, String), BTreeMap<String, Vec<Problem>>>,
    /// (route kind, namespace, name) -> per-parent status.
    pub routes: BTreeMap<(String, String, String), Vec<ParentStatus>>,
    /// Route-level problems (weights, path fan-out).
    pub route_problems: BTreeMap<(String, String, String), Vec<Problem>>,
    /// (gateway namespace, name) -> listener name -> the tunnels routes opened through it, so
    /// status can show the addresses the sidecars report for them.
    pub listener_tunnels: BTreeMap<(String, String), BTreeMap<String, BTreeSet<String>>>,
    /// (route kind, namespace, name) -> the tunnels the route opens.
    pub route_tunnels: BTreeMap<(String, String, String), BTreeSet<String>>,
    /// (route kind, namespace, name) -> what it asks for through each parent and listener,
    /// backed by pods yet or not (resolve::ownership).
    pub route_claims: BTreeMap<(String, String, String), Vec<ClaimRecord>>,
    /// (route kind, namespace, name) -> its tunnels per backing pod (`tunnels` is their union).
    pub route_pod_tunnels: BTreeMap<(String, String, String), BTreeMap<PodKey, Vec<TunnelSpec>>>,
    /// (gateway namespace, name) -> listener name -> the listener's own claim (its hostname or
    /// TCP port) belongs to a claimant not attached through it: the listener is Conflicted.
    pub listener_conflicts: BTreeMap<(String, String), BTreeMap<String, Problem>>,
}

/// One claim of a route through one listener of one parent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimRecord {
    /// Index into the route's parent statuses (`GatewayResolution::routes`).
    pub parent: usize,
    pub gateway: (String, String),
    pub listener: String,
    /// The listener fixes this claim itself (a TCP listener's port, an HTTP listener's
    /// hostname), rather than the route's hostnames.
    pub fixed: bool,
    pub claim: Claim,
}

fn problem(reason: &'static str, message: String) -> Problem {
    Problem { reason, message }
}

/// How picotun serves a listener, or why it cannot.
fn listener_kind(l: &Listener) -> Result<TunnelKind, Problem> {
    match l.protocol.as_str() {
        "HTTP" | "HTTPS" if l.port == 80 || l.port == 443 => Ok(TunnelKind::Http),
        "HTTP" | "HTTPS" => Err(problem(
            "PortUnavailable",
            format!("listener {}: HTTP is served on the tunnel server's ports 80/443 only, not {}", l.name, l.port),
        )),
        "TCP" => Ok(TunnelKind::Tcp),
        other => Err(problem(
            "UnsupportedProtocol",
            format!("listener {}: protocol {other} is not served (HTTP, HTTPS, TCP are)", l.name),
        )),
    }
}

fn default_kind(protocol: &str) -> &'static str {
    match protocol {
        "TCP" => "TCPRoute",
        _ => "HTTPRoute",
    }
}

fn allows(
    l: &Listener,
    gateway_ns: &str,
    route: &RouteModel,
    namespace_labels: &BTreeMap<String, BTreeMap<String, String>>,
) -> bool {
    let kind_ok = match &l.kinds {
        Some(kinds) => kinds.contains(&route.kind),
        None => default_kind(&l.protocol) == route.kind,
    };
    let ns_ok = match &l.from {
        From::Same => route.namespace == gateway_ns,
        From::All => true,
        From::Selector(want) => {
            namespace_labels.get(&route.namespace).is_some_and(|have| want.iter().all(|(k, v)| have.get(k) == Some(v)))
        }
    };
    kind_ok && ns_ok
}

/// Hostname matching as the Gateway API defines it (a `*.` listener matches one more label).
fn hostnames_for(listener: Option<&str>, route: &[String]) -> Result<Vec<String>, ()> {
    let matches = |l: &str, r: &str| {
        if let Some(suffix) = l.strip_prefix("*.") {
            r.ends_with(&format!(".{suffix}")) && !r[..r.len() - suffix.len() - 1].contains('.')
        } else {
            l == r
        }
    };
    match (listener, route.is_empty()) {
        (Some(l), true) => Ok(vec![l.to_string()]),
        (Some(l), false) => {
            let hits: Vec<String> = route.iter().filter(|r| matches(l, r)).cloned().collect();
            if hits.is_empty() { Err(()) } else { Ok(hits) }
        }
        (None, _) => Ok(route.to_vec()),
    }
}

fn permitted(route: &RouteModel, backend: &BackendRef, grants: &[Grant]) -> bool {
    backend.namespace == route.namespace
        || grants.iter().any(|g| {
            g.namespace == backend.namespace
                && g.from.iter().any(|(kind, ns)| *kind == route.kind && *ns == route.namespace)
                && g.to_services.as_ref().is_none_or(|names| names.contains(&backend.name))
        })
}

/// Resolves every route against the Gateways whose class is ours (`our_classes`).
pub fn resolve(
    gateways: &[GatewayModel],
    our_classes: &BTreeSet<String>,
    routes: &[RouteModel],
    grants: &[Grant],
    namespace_labels: &BTreeMap<String, BTreeMap<String, String>>,
    snapshot: &Snapshot<'_>,
) -> GatewayResolution {
    let mut out = GatewayResolution::default();
    let ours: Vec<&GatewayModel> = gateways.iter().filter(|g| our_classes.contains(&g.class)).collect();
    for g in &ours {
        let key = (g.namespace.clone(), g.name.clone());
        let attached = out.attached.entry(key.clone()).or_default();
        for l in &g.listeners {
            attached.insert(l.name.clone(), 0);
            if let Err(p) = listener_kind(l) {
                out.listener_problems.entry(key.clone()).or_default().entry(l.name.clone()).or_default().push(p);
            }
            if l.protocol == "HTTP" && l.hostname.as_deref().is_some_and(|h| !h.starts_with("*.") && !is_dns_name(h)) {
                out.listener_problems.entry(key.clone()).or_default().entry(l.name.clone()).or_default().push(problem(
                    "InvalidHostname",
                    format!(
                        "listener {}: hostname {:?} is not a name a tunnel can request",
                        l.name,
                        l.hostname.as_deref().unwrap_or("")
                    ),
                ));
            }
        }
    }

    for route in routes {
        let route_key = (route.kind.clone(), route.namespace.clone(), route.name.clone());
        // What the tunnel server cannot do, said once per route.
        let mut route_problems = Vec::new();
        let all_backends: Vec<&BackendRef> = route.rules.iter().flatten().collect();
        let weights: BTreeSet<i32> = all_backends.iter().map(|b| b.weight).collect();
        if all_backends.len() > 1 && weights.len() > 1 {
            route_problems.push(problem(
                "WeightsUnsupported",
                "backendRef weights are not honoured: the tunnel server spreads connections evenly over every pod"
                    .into(),
            ));
        }
        let distinct_rules: BTreeSet<Vec<(String, String, Option<i32>)>> = route
            .rules
            .iter()
            .map(|r| r.iter().map(|b| (b.namespace.clone(), b.name.clone(), b.port)).collect())
            .collect();
        if route.kind == "HTTPRoute" && distinct_rules.len() > 1 {
            route_problems.push(problem(
                "PathFanOutUnsupported",
                "rules send different requests to different backends; a tunnel sends a whole host to every backend of the route".into(),
            ));
        }

        let mut statuses = Vec::new();
        for parent in &route.parents {
            let Some(g) = gateways.iter().find(|g| g.namespace == parent.namespace && g.name == parent.name) else {
                statuses.push(ParentStatus {
                    gateway: (parent.namespace.clone(), parent.name.clone()),
                    section: parent.section.clone(),
                    accepted: Err(problem(
                        "NoMatchingParent",
                        format!("Gateway {}/{} does not exist", parent.namespace, parent.name),
                    )),
                    resolved_refs: Ok(()),
                });
                continue;
            };
            if !our_classes.contains(&g.class) {
                continue; // another controller's Gateway: not ours to report on
            }
            let gkey = (g.namespace.clone(), g.name.clone());
            let candidates: Vec<&Listener> = g
                .listeners
                .iter()
                .filter(|l| {
                    parent.section.as_ref().is_none_or(|s| *s == l.name) && parent.port.is_none_or(|p| p == l.port)
                })
                .collect();
            let mut accepted = Err(problem(
                if candidates.is_empty() { "NoMatchingParent" } else { "NotAllowedByListeners" },
                if candidates.is_empty() {
                    format!(
                        "Gateway {}/{} has no listener {:?}",
                        g.namespace,
                        g.name,
                        parent.section.as_deref().unwrap_or("(any)")
                    )
                } else {
                    format!(
                        "no listener of Gateway {}/{} allows a {} from namespace {}",
                        g.namespace, g.name, route.kind, route.namespace
                    )
                },
            ));
            let mut resolved_refs = Ok(());
            for l in candidates {
                if !allows(l, &g.namespace, route, namespace_labels) {
                    continue;
                }
                let hosts = match hostnames_for(l.hostname.as_deref(), &route.hostnames) {
                    Ok(h) => h,
                    Err(()) => {
                        if accepted.is_err() {
                            accepted = Err(problem(
                                "NoMatchingListenerHostname",
                                format!("no hostname of the route matches listener {}'s {:?}", l.name, l.hostname),
                            ));
                        }
                        continue;
                    }
                };
                accepted = Ok(());
                *out.attached.entry(gkey.clone()).or_default().entry(l.name.clone()).or_insert(0) += 1;
                let Ok(kind) = listener_kind(l) else { continue };
                // The tunnels this listener gives: one per hostname (HTTP), or the listener's port (TCP).
                let mut specs: Vec<(String, TunnelSpec)> = Vec::new();
                match kind {
                    TunnelKind::Http => {
                        if hosts.is_empty() {
                            resolved_refs = Err(problem(
                                "HostnameRequired",
                                format!(
                                    "listener {} has no hostname and the route gives none: a tunnel needs a name",
                                    l.name
                                ),
                            ));
                        }
                        for h in hosts.iter().filter(|h| !h.starts_with("*.")) {
                            specs.push((
                                h.clone(),
                                TunnelSpec {
                                    name: tunnel_name(&["gw", &g.name, &l.name, h]),
                                    kind: TunnelKind::Http,
                                    host: Some(h.clone()),
                                    remote_port: None,
                                    target_port: 0,
                                    options: Default::default(),
                                    standby: false,
                                },
                            ));
                        }
                    }
                    _ => specs.push((
                        String::new(),
                        TunnelSpec {
                            name: tunnel_name(&["gw", &g.name, &l.name]),
                            kind: TunnelKind::Tcp,
                            host: None,
                            remote_port: u16::try_from(l.port).ok(),
                            target_port: 0,
                            options: Default::default(),
                            standby: false,
                        },
                    )),
                }
                let fixed = kind == TunnelKind::Tcp || l.hostname.as_deref().is_some_and(|h| !h.starts_with("*."));
                let records = out.route_claims.entry(route_key.clone()).or_default();
                for claim in specs.iter().filter_map(|(_, spec)| Claim::of(spec)) {
                    records.push(ClaimRecord {
                        parent: statuses.len(),
                        gateway: gkey.clone(),
                        listener: l.name.clone(),
                        fixed,
                        claim,
                    });
                }
                let names = specs.iter().map(|(_, spec)| spec.name.clone());
                out.listener_tunnels.entry(gkey.clone()).or_default().entry(l.name.clone()).or_default().extend(names);
                out.route_tunnels
                    .entry(route_key.clone())
                    .or_default()
                    .extend(specs.iter().map(|(_, s)| s.name.clone()));
                // Every backendRef of the first rule (the others are reported as fan-out).
                for b in route.rules.first().into_iter().flatten() {
                    if b.kind != "/Service" {
                        resolved_refs = Err(problem(
                            "InvalidKind",
                            format!("backendRef {} is a {}, not a Service", b.name, b.kind),
                        ));
                        continue;
                    }
                    if !permitted(route, b, grants) {
                        resolved_refs = Err(problem(
                            "RefNotPermitted",
                            format!(
                                "Service {}/{} is in another namespace and no ReferenceGrant there allows it",
                                b.namespace, b.name
                            ),
                        ));
                        continue;
                    }
                    let Some(service) = snapshot.service(&b.namespace, &b.name) else {
                        resolved_refs = Err(problem(
                            "BackendNotFound",
                            format!("Service {}/{} does not exist", b.namespace, b.name),
                        ));
                        continue;
                    };
                    let Some(port) = b.port.and_then(|p| service_port(service, &IntOrString::Int(p))) else {
                        resolved_refs = Err(problem(
                            "BackendNotFound",
                            format!("Service {}/{} has no port {:?}", b.namespace, b.name, b.port),
                        ));
                        continue;
                    };
                    for pod in snapshot.selected_pods(service).unwrap_or_default() {
                        let Some(target) = target_port(port, pod) else { continue };
                        let key = (
                            pod.metadata.namespace.clone().unwrap_or_default(),
                            pod.metadata.name.clone().unwrap_or_default(),
                        );
                        let tunnels = out.tunnels.entry(key.clone()).or_default();
                        for (_, spec) in &specs {
                            if !tunnels.iter().any(|t| t.name == spec.name) {
                                tunnels.push(TunnelSpec { target_port: target, ..spec.clone() });
                            }
                        }
                        let mine = out.route_pod_tunnels.entry(route_key.clone()).or_default().entry(key).or_default();
                        for (_, spec) in &specs {
                            if !mine.iter().any(|t| t.name == spec.name) {
                                mine.push(TunnelSpec { target_port: target, ..spec.clone() });
                            }
                        }
                    }
                }
            }
            statuses.push(ParentStatus { gateway: gkey, section: parent.section.clone(), accepted, resolved_refs });
        }
        if !statuses.is_empty() {
            out.routes.insert(route_key.clone(), statuses);
            if !route_problems.is_empty() {
                out.route_problems.insert(route_key, route_problems);
            }
        }
    }
    out
}

impl GatewayResolution {
    /// Takes away what routes ask for but do not own: their tunnels leave every pod; a parent
    /// through which nothing is left is not Accepted (reason `TunnelConflict` or
    /// `DomainNotAllowed`) and does not count as attached; a parent that keeps some of its names
    /// says the rest as a route problem (PartiallyInvalid); a listener whose own hostname or port
    /// belongs to a claimant not attached through it is Conflicted.
    pub fn apply_ownership(&mut self, ownership: &Ownership) {
        type Key = (String, String, String);
        type GatewayKey = (String, String);
        /// (claim, gateway, listener) -> the routes asking for it there.
        type Through<'a> = BTreeMap<(&'a Claim, &'a GatewayKey, &'a str), BTreeSet<Claimant>>;
        /// (parent, gateway, listener) -> (claims kept, problems).
        type PerListener<'a> = BTreeMap<(usize, &'a GatewayKey, &'a str), (usize, Vec<Problem>)>;
        // Which routes ask for each claim through each listener: a listener's own claim won by
        // one of them is a conflict between its routes, not of the listener.
        let mut through = Through::new();
        for (rk, records) in &self.route_claims {
            for r in records {
                through
                    .entry((&r.claim, &r.gateway, r.listener.as_str()))
                    .or_default()
                    .insert(Claimant::route(&rk.0, &rk.1, &rk.2));
            }
        }
        let mut lost: BTreeMap<Key, BTreeSet<Claim>> = BTreeMap::new();
        let mut listener_conflicts: BTreeMap<(String, String), BTreeMap<String, Problem>> = BTreeMap::new();
        let mut detached: Vec<((String, String), String)> = Vec::new();
        let mut not_accepted: Vec<(Key, usize, Problem)> = Vec::new();
        let mut partial: Vec<(Key, Problem)> = Vec::new();
        for (rk, records) in &self.route_claims {
            let claimant = Claimant::route(&rk.0, &rk.1, &rk.2);
            let mut per_listener = PerListener::new();
            for r in records {
                let entry = per_listener.entry((r.parent, &r.gateway, r.listener.as_str())).or_default();
                match ownership.check_claim(&claimant, &r.claim) {
                    Ok(()) => entry.0 += 1,
                    Err(p) => {
                        lost.entry(rk.clone()).or_default().insert(r.claim.clone());
                        let owner = ownership.owner(&r.claim);
                        let owner_attached = owner.is_some_and(|o| {
                            through
                                .get(&(&r.claim, &r.gateway, r.listener.as_str()))
                                .is_some_and(|routes| routes.contains(&o.claimant))
                        });
                        if r.fixed && p.reason == TUNNEL_CONFLICT && !owner_attached {
                            let owner = owner.map(|o| o.describe()).unwrap_or_default();
                            listener_conflicts.entry(r.gateway.clone()).or_default().entry(r.listener.clone()).or_insert(
                                Problem {
                                    reason: TUNNEL_CONFLICT,
                                    message: format!(
                                        "listener {}: its {} belongs to {owner} (the oldest claim wins): no route attached here gets a tunnel for it",
                                        r.listener, r.claim
                                    ),
                                },
                            );
                        }
                        if !entry.1.contains(&p) {
                            entry.1.push(p);
                        }
                    }
                }
            }
            let mut per_parent: BTreeMap<usize, (usize, Vec<Problem>)> = BTreeMap::new();
            for ((parent, gateway, listener), (kept, problems)) in per_listener {
                if kept == 0 && !problems.is_empty() {
                    detached.push((gateway.clone(), listener.to_string()));
                }
                let entry = per_parent.entry(parent).or_default();
                if kept > 0 {
                    entry.0 += 1;
                }
                for p in problems {
                    if !entry.1.contains(&p) {
                        entry.1.push(p);
                    }
                }
            }
            for (parent, (kept_listeners, problems)) in per_parent {
                let Some(first) = problems.first() else { continue };
                if kept_listeners == 0 {
                    let message = problems.iter().map(|p| p.message.as_str()).collect::<Vec<_>>().join("; ");
                    not_accepted.push((rk.clone(), parent, Problem { reason: first.reason, message }));
                } else {
                    partial.extend(problems.into_iter().map(|p| (rk.clone(), p)));
                }
            }
        }
        for (gateway, listener) in detached {
            if let Some(n) = self.attached.get_mut(&gateway).and_then(|m| m.get_mut(&listener)) {
                *n = (*n - 1).max(0);
            }
        }
        for (rk, parent, problem) in not_accepted {
            if let Some(status) = self.routes.get_mut(&rk).and_then(|s| s.get_mut(parent)) {
                status.accepted = Err(problem);
            }
        }
        for (rk, problem) in partial {
            let problems = self.route_problems.entry(rk).or_default();
            if !problems.contains(&problem) {
                problems.push(problem);
            }
        }
        self.listener_conflicts = listener_conflicts;
        // The pods' tunnels again, without what their routes lost.
        let mut tunnels: BTreeMap<PodKey, Vec<TunnelSpec>> = BTreeMap::new();
        for (rk, pods) in &mut self.route_pod_tunnels {
            let lost = lost.get(rk);
            for (pod, specs) in pods.iter_mut() {
                specs.retain(|s| Claim::of(s).is_none_or(|c| lost.is_none_or(|l| !l.contains(&c))));
                let all = tunnels.entry(pod.clone()).or_default();
                for spec in specs.iter() {
                    if !all.iter().any(|t| t.name == spec.name) {
                        all.push(spec.clone());
                    }
                }
            }
        }
        self.tunnels = tunnels;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Pod, Service};
    use serde_json::json;

    fn classes() -> BTreeSet<String> {
        BTreeSet::from(["pico".to_string()])
    }

    fn svc(ns: &str, name: &str, app: &str, port: i32, target: i32) -> Service {
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": ns},
            "spec": {"selector": {"app": app}, "ports": [{"port": port, "targetPort": target}]}}))
        .unwrap()
    }

    fn pod(ns: &str, name: &str, app: &str) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
            "spec": {"containers": [{"name": "c", "image": "x"}]}}))
        .unwrap()
    }

    /// The prototype's Gateway walkthrough: an HTTP listener `web-test` and a TCP listener, an
    /// HTTPRoute and a TCPRoute to one echo server.
    fn walkthrough() -> (Vec<GatewayModel>, Vec<RouteModel>) {
        let gw = gateway_from_json(&json!({"metadata": {"name": "tcp-echo-gateway", "namespace": "default"}, "spec": {
        "gatewayClassName": "pico",
        "listeners": [
            {"name": "web-test", "protocol": "HTTP", "port": 80, "hostname": "web-test"},
            {"name": "tcp", "protocol": "TCP", "port": 59123, "allowedRoutes": {"kinds": [{"kind": "TCPRoute"}]}},
        ]}}));
        let http = route_from_json(
            "HTTPRoute",
            &json!({"metadata": {"name": "http-echo-route", "namespace": "default"}, "spec": {
            "parentRefs": [{"name": "tcp-echo-gateway", "sectionName": "web-test"}],
            "rules": [{"backendRefs": [{"name": "tcp-echo-service", "port": 80}]}]}}),
        );
        let tcp = route_from_json(
            "TCPRoute",
            &json!({"metadata": {"name": "tcp-echo-route", "namespace": "default"}, "spec": {
            "parentRefs": [{"name": "tcp-echo-gateway", "sectionName": "tcp"}],
            "rules": [{"backendRefs": [{"name": "tcp-echo-service", "port": 80}]}]}}),
        );
        (vec![gw], vec![http, tcp])
    }

    #[test]
    fn the_walkthrough_gives_each_echo_pod_an_http_and_a_tcp_tunnel() {
        let (gws, routes) = walkthrough();
        let services = vec![svc("default", "tcp-echo-service", "echo", 80, 5678)];
        let pods =
            vec![pod("default", "echo-1", "echo"), pod("default", "echo-2", "echo"), pod("default", "other", "x")];
        let r = resolve(&gws, &classes(), &routes, &[], &BTreeMap::new(), &Snapshot::new(&services, &pods));
        assert_eq!(r.tunnels.len(), 2);
        let t = &r.tunnels[&("default".into(), "echo-1".into())];
        assert_eq!(t.len(), 2, "{t:?}");
        assert_eq!((t[0].kind, t[0].host.as_deref(), t[0].target_port), (TunnelKind::Http, Some("web-test"), 5678));
        assert_eq!((t[1].kind, t[1].remote_port, t[1].target_port), (TunnelKind::Tcp, Some(59123), 5678));
        let attached = &r.attached[&("default".into(), "tcp-echo-gateway".into())];
        assert_eq!((attached["web-test"], attached["tcp"]), (1, 1));
        for statuses in r.routes.values() {
            assert_eq!(statuses.len(), 1);
            assert!(statuses[0].accepted.is_ok() && statuses[0].resolved_refs.is_ok(), "{statuses:?}");
        }
    }

    #[test]
    fn other_classes_are_not_ours() {
        let (gws, routes) = walkthrough();
        let r = resolve(
            &gws,
            &BTreeSet::from(["nginx".to_string()]),
            &routes,
            &[],
            &BTreeMap::new(),
            &Snapshot::new(&[], &[]),
        );
        assert!(r.tunnels.is_empty() && r.routes.is_empty() && r.attached.is_empty());
    }

    #[test]
    fn allowed_routes_kinds_and_namespaces() {
        let (gws, _) = walkthrough();
        // An HTTPRoute aimed at the TCP listener (which allows only TCPRoute), from another namespace.
        let wrong_kind = route_from_json(
            "HTTPRoute",
            &json!({"metadata": {"name": "r", "namespace": "default"}, "spec": {
            "parentRefs": [{"name": "tcp-echo-gateway", "sectionName": "tcp"}], "rules": [{"backendRefs": [{"name": "s", "port": 80}]}]}}),
        );
        let other_ns = route_from_json(
            "HTTPRoute",
            &json!({"metadata": {"name": "r2", "namespace": "team"}, "spec": {
            "parentRefs": [{"name": "tcp-echo-gateway", "namespace": "default"}], "rules": [{"backendRefs": [{"name": "s", "port": 80}]}]}}),
        );
        let missing = route_from_json(
            "HTTPRoute",
            &json!({"metadata": {"name": "r3", "namespace": "default"}, "spec": {
            "parentRefs": [{"name": "tcp-echo-gateway", "sectionName": "nope"}, {"name": "ghost"}]}}),
        );
        let r = resolve(
            &gws,
            &classes(),
            &[wrong_kind, other_ns, missing],
            &[],
            &BTreeMap::new(),
            &Snapshot::new(&[], &[]),
        );
        let reason = |name: &str, i: usize| {
            r.routes[&("HTTPRoute".into(), if name == "r2" { "team" } else { "default" }.into(), name.into())][i]
                .accepted
                .clone()
                .unwrap_err()
                .reason
        };
        assert_eq!(reason("r", 0), "NotAllowedByListeners");
        assert_eq!(reason("r2", 0), "NotAllowedByListeners", "listeners allow Same namespace by default");
        assert_eq!(reason("r3", 0), "NoMatchingParent");
        assert_eq!(reason("r3", 1), "NoMatchingParent");
        // With From: Selector and the namespace's label, the second route attaches.
        let mut gw = gws[0].clone();
        gw.listeners[0].from = From::Selector(BTreeMap::from([("team".into(), "yes".into())]));
        let labels = BTreeMap::from([("team".to_string(), BTreeMap::from([("team".to_string(), "yes".to_string())]))]);
        let other_ns = route_from_json(
            "HTTPRoute",
            &json!({"metadata": {"name": "r2", "namespace": "team"}, "spec": {
            "parentRefs": [{"name": "tcp-echo-gateway", "namespace": "default"}], "rules": [{"backendRefs": [{"name": "s", "port": 80}]}]}}),
        );
        let r = resolve(&[gw], &classes(), &[other_ns], &[], &labels, &Snapshot::new(&[], &[]));
        let st = &r.routes[&("HTTPRoute".into(), "team".into(), "r2".into())][0];
        assert!(st.accepted.is_ok());
        assert_eq!(st.resolved_refs.clone().unwrap_err().reason, "BackendNotFound");
    }

    #[test]
    fn cross_namespace_backends_need_a_reference_grant() {
        let (gws, _) = walkthrough();
        let route = route_from_json(
            "HTTPRoute",
            &json!({"metadata": {"name": "r", "namespace": "default"}, "spec": {
            "parentRefs": [{"name": "tcp-echo-gateway", "sectionName": "web-test"}],
            "rules": [{"backendRefs": [{"name": "api", "namespace": "backend", "port": 80}]}]}}),
        );
        let services = vec![svc("backend", "api", "api", 80, 8080)];
        let pods = vec![pod("backend", "api-1", "api")];
        let snap = Snapshot::new(&services, &pods);
        let r = resolve(&gws, &classes(), std::slice::from_ref(&route), &[], &BTreeMap::new(), &snap);
        assert_eq!(r.routes.values().next().unwrap()[0].resolved_refs.clone().unwrap_err().reason, "RefNotPermitted");
        assert!(r.tunnels.is_empty());
        let grant = grant_from_json(&json!({"metadata": {"name": "g", "namespace": "backend"}, "spec": {
            "from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "default"}],
            "to": [{"group": "", "kind": "Service", "name": "api"}]}}));
        let r = resolve(&gws, &classes(), &[route], &[grant], &BTreeMap::new(), &snap);
        assert!(r.routes.values().next().unwrap()[0].resolved_refs.is_ok());
        assert_eq!(r.tunnels[&("backend".into(), "api-1".into())][0].target_port, 8080);
    }

    #[test]
    fn every_backend_and_hostname_and_what_cannot_be_done() {
        let gw = gateway_from_json(
            &json!({"metadata": {"name": "g", "namespace": "ns"}, "spec": {"gatewayClassName": "pico", "listeners": [
            {"name": "any", "protocol": "HTTP", "port": 80},
            {"name": "odd", "protocol": "HTTP", "port": 8080},
            {"name": "udp", "protocol": "UDP", "port": 53}]}}),
        );
        let route = route_from_json(
            "HTTPRoute",
            &json!({"metadata": {"name": "r", "namespace": "ns"}, "spec": {
            "parentRefs": [{"name": "g", "sectionName": "any"}],
            "hostnames": ["a", "b.example.com"],
            "rules": [
                {"backendRefs": [{"name": "one", "port": 80, "weight": 90}, {"name": "two", "port": 80, "weight": 10}]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/x"}}], "backendRefs": [{"name": "three", "port": 80}]}]}}),
        );
        let services = vec![svc("ns", "one", "one", 80, 1001), svc("ns", "two", "two", 80, 1002)];
        let pods = vec![pod("ns", "one-1", "one"), pod("ns", "two-1", "two")];
        let r = resolve(&[gw], &classes(), &[route], &[], &BTreeMap::new(), &Snapshot::new(&services, &pods));
        for (p, port) in [("one-1", 1001), ("two-1", 1002)] {
            let hosts: Vec<_> =
                r.tunnels[&("ns".into(), p.into())].iter().map(|t| (t.host.clone().unwrap(), t.target_port)).collect();
            assert_eq!(
                hosts,
                vec![("a".to_string(), port), ("b.example.com".to_string(), port)],
                "{p}: both backends, both hostnames"
            );
        }
        let reasons: Vec<&str> = r.route_problems.values().flatten().map(|p| p.reason).collect();
        assert_eq!(reasons, vec!["WeightsUnsupported", "PathFanOutUnsupported"]);
        let lp = &r.listener_problems[&("ns".into(), "g".into())];
        assert_eq!(lp["odd"][0].reason, "PortUnavailable");
        assert_eq!(lp["udp"][0].reason, "UnsupportedProtocol");
    }

    #[test]
    fn listener_hostnames_filter_route_hostnames() {
        assert_eq!(hostnames_for(Some("web"), &[]), Ok(vec!["web".to_string()]));
        assert_eq!(
            hostnames_for(Some("*.example.com"), &["a.example.com".into(), "a.b.example.com".into()]),
            Ok(vec!["a.example.com".to_string()])
        );
        assert_eq!(hostnames_for(Some("web"), &["other".into()]), Err(()));
        assert_eq!(hostnames_for(None, &[]), Ok(vec![]));
    }
}
