//! Gateway API -> tunnels: GatewayClass (controllerName `tunnels.pico.sh/gateway-controller`),
//! Gateway listeners, HTTPRoute, TCPRoute and TLSRoute (TLS listeners in `Passthrough` mode: the
//! pod terminates TLS, the tunnel server routes by SNI) attached by parentRefs / sectionName / port,
//! honouring allowedRoutes (kinds, namespaces by label selector), listener hostnames (intersected
//! with route hostnames as the Gateway API defines it, wildcards included), certificateRefs and
//! ReferenceGrants, every rule and every backendRef.
//!
//! The typed objects of the `gateway-api` crate are read into a small model first
//! ([`gateway_model`], [`http_route_model`], [`tcp_route_model`], [`tls_route_model`],
//! [`grant_model`]): resolution
//! works on the fields it needs, and tests build them from fixtures.

use std::collections::{BTreeMap, BTreeSet};

use gateway_api::apis::experimental::gateways::{
    Gateway, GatewayListenersAllowedRoutesNamespacesFrom as NamespacesFrom,
    GatewayListenersAllowedRoutesNamespacesSelector, GatewayListenersTlsMode,
};
use gateway_api::apis::experimental::httproutes::HttpRoute;
use gateway_api::apis::experimental::referencegrants::ReferenceGrant;
use gateway_api::apis::experimental::tcproutes::TcpRoute;
use gateway_api::apis::experimental::tlsroutes::TlsRoute;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::core::{Selector, SelectorExt};

use super::ownership::{Claim, Claimant, Ownership, TUNNEL_CONFLICT};
use super::{PodKey, Problem, Snapshot, backing_pods, service_port, tunnel_name};
use crate::core::tunnel::{TunnelKind, TunnelSpec, is_dns_name};

pub const GATEWAY_CONTROLLER: &str = "tunnels.pico.sh/gateway-controller";
/// The Gateway API group (parentRefs, allowedRoutes.kinds and ReferenceGrant `from` default to it).
pub const GROUP: &str = "gateway.networking.k8s.io";
pub const HTTP_ROUTE: &str = "HTTPRoute";
pub const TCP_ROUTE: &str = "TCPRoute";
pub const TLS_ROUTE: &str = "TLSRoute";

/// Route condition types and reasons (the gateway-api crate has constants for GatewayClasses,
/// Gateways and listeners only, `gateway_api::apis::standard::constants`).
pub mod route {
    pub const ACCEPTED: &str = "Accepted";
    pub const RESOLVED_REFS: &str = "ResolvedRefs";
    pub const PARTIALLY_INVALID: &str = "PartiallyInvalid";
    pub const NOT_ALLOWED_BY_LISTENERS: &str = "NotAllowedByListeners";
    pub const NO_MATCHING_PARENT: &str = "NoMatchingParent";
    pub const NO_MATCHING_LISTENER_HOSTNAME: &str = "NoMatchingListenerHostname";
    pub const UNSUPPORTED_VALUE: &str = "UnsupportedValue";
    pub const REF_NOT_PERMITTED: &str = "RefNotPermitted";
    pub const BACKEND_NOT_FOUND: &str = "BackendNotFound";
    pub const INVALID_KIND: &str = "InvalidKind";
}

/// Listener reasons, as `&'static str` so they can be [`Problem`] reasons; each equals the
/// gateway-api crate's `ListenerConditionReason` of that name (a test checks).
pub mod listener {
    pub const PORT_UNAVAILABLE: &str = "PortUnavailable";
    pub const UNSUPPORTED_PROTOCOL: &str = "UnsupportedProtocol";
    pub const INVALID_CERTIFICATE_REF: &str = "InvalidCertificateRef";
    pub const INVALID_ROUTE_KINDS: &str = "InvalidRouteKinds";
    pub const REF_NOT_PERMITTED: &str = "RefNotPermitted";
    /// The Gateway API's `ListenerReasonUnsupportedValue` (not in the crate's enum): what
    /// conformance (TLSRouteListenerTerminateNotSupported) asks of a TLS listener in `Terminate`
    /// mode -- the tunnel server cannot present the Gateway's certificate, only pass TLS through.
    pub const UNSUPPORTED_VALUE: &str = "UnsupportedValue";
}

/// picotun's own reasons (implementation-specific, CamelCase as the API asks).
pub mod reason {
    /// A listener hostname a tunnel cannot request.
    pub const INVALID_HOSTNAME: &str = "InvalidHostname";
    /// allowedRoutes.namespaces.selector does not parse: the listener admits no route.
    pub const INVALID_ROUTE_NAMESPACES: &str = "InvalidRouteNamespaces";
    pub const WEIGHTS_UNSUPPORTED: &str = "WeightsUnsupported";
    pub const PATH_FAN_OUT_UNSUPPORTED: &str = "PathFanOutUnsupported";
    /// Backing pods without the container port a Service's targetPort names.
    pub const TARGET_PORT_NOT_FOUND: &str = "TargetPortNotFound";
    /// A wildcard hostname: a tunnel serves one name, not a domain's every name.
    pub const WILDCARD_HOSTNAME_UNSUPPORTED: &str = "WildcardHostnameUnsupported";
}

/// A route kind, as allowedRoutes.kinds and supportedKinds name it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RouteGroupKind {
    pub group: String,
    pub kind: String,
}

/// A certificateRef of an HTTPS listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateRef {
    pub group: String,
    pub kind: String,
    /// None: the Gateway's namespace.
    pub namespace: Option<String>,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub name: String,
    pub protocol: String,
    pub port: i32,
    pub hostname: Option<String>,
    /// allowedRoutes.kinds; None = the protocol's default kind.
    pub kinds: Option<Vec<RouteGroupKind>>,
    pub from: From,
    pub certificate_refs: Vec<CertificateRef>,
    /// `tls.mode`: `Terminate` (the API's default when `tls` is set) or `Passthrough`; None
    /// without `tls`.
    pub tls_mode: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum From {
    Same,
    All,
    /// The namespace selector (matchLabels and matchExpressions), or why it does not parse.
    Selector(Result<Selector, String>),
}

#[derive(Clone, Debug)]
pub struct GatewayModel {
    pub namespace: String,
    pub name: String,
    pub class: String,
    pub listeners: Vec<Listener>,
    /// `spec.infrastructure.parametersRef` (a LocalParametersReference: the Gateway's namespace).
    pub parameters_ref: Option<super::options::ParametersRef>,
    /// The server options every tunnel of this Gateway carries (resolve::options: its class's
    /// and its own), filled before resolution; empty by default.
    pub options: super::options::Options,
}

/// A route's parentRef to a Gateway, as the route wrote it (status copies it whole).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    /// As written; None means the route's namespace.
    pub namespace: Option<String>,
    pub name: String,
    pub section: Option<String>,
    pub port: Option<i32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendRef {
    pub namespace: String,
    pub name: String,
    /// "" for core.
    pub group: String,
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
    /// parentRefs to Gateways (those to other kinds are not ours).
    pub parents: Vec<ParentRef>,
    /// backendRefs of each rule.
    pub rules: Vec<Vec<BackendRef>>,
}

/// A ReferenceGrant: objects of `from` (Gateway API kind, namespace) may refer to the objects
/// of `to` (group, kind, name -- None for all of that kind) in `namespace`.
#[derive(Clone, Debug)]
pub struct Grant {
    pub namespace: String,
    pub from: Vec<(String, String)>,
    pub to: Vec<(String, String, Option<String>)>,
}

fn namespace_selector(s: &GatewayListenersAllowedRoutesNamespacesSelector) -> Result<Selector, String> {
    let selector = LabelSelector {
        match_labels: s.match_labels.clone(),
        match_expressions: s.match_expressions.as_ref().map(|es| {
            es.iter()
                .map(|e| LabelSelectorRequirement {
                    key: e.key.clone(),
                    operator: e.operator.clone(),
                    values: e.values.clone(),
                })
                .collect()
        }),
    };
    Selector::try_from(selector).map_err(|e| e.to_string())
}

/// The model of a typed Gateway.
pub fn gateway_model(g: &Gateway) -> GatewayModel {
    let listeners = g
        .spec
        .listeners
        .iter()
        .map(|l| {
            let allowed = l.allowed_routes.as_ref();
            let namespaces = allowed.and_then(|a| a.namespaces.as_ref());
            let from = match namespaces.and_then(|n| n.from.as_ref()) {
                Some(NamespacesFrom::All) => From::All,
                Some(NamespacesFrom::Selector) => From::Selector(
                    namespaces
                        .and_then(|n| n.selector.as_ref())
                        .ok_or_else(|| "from: Selector needs a selector".to_string())
                        .and_then(namespace_selector),
                ),
                Some(NamespacesFrom::Same) | None => From::Same,
            };
            Listener {
                name: l.name.clone(),
                protocol: l.protocol.clone(),
                port: l.port,
                hostname: l.hostname.clone(),
                kinds: allowed.and_then(|a| a.kinds.as_ref()).map(|ks| {
                    ks.iter()
                        .map(|k| RouteGroupKind {
                            group: k.group.clone().unwrap_or_else(|| GROUP.to_string()),
                            kind: k.kind.clone(),
                        })
                        .collect()
                }),
                from,
                certificate_refs: l
                    .tls
                    .as_ref()
                    .and_then(|t| t.certificate_refs.as_ref())
                    .map(|refs| {
                        refs.iter()
                            .map(|r| CertificateRef {
                                group: r.group.clone().unwrap_or_default(),
                                kind: r.kind.clone().unwrap_or_else(|| "Secret".to_string()),
                                namespace: r.namespace.clone(),
                                name: r.name.clone(),
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                tls_mode: l.tls.as_ref().map(|t| match t.mode {
                    Some(GatewayListenersTlsMode::Passthrough) => "Passthrough".to_string(),
                    Some(GatewayListenersTlsMode::Terminate) | None => "Terminate".to_string(),
                }),
            }
        })
        .collect();
    GatewayModel {
        namespace: g.metadata.namespace.clone().unwrap_or_default(),
        name: g.metadata.name.clone().unwrap_or_default(),
        class: g.spec.gateway_class_name.clone(),
        listeners,
        parameters_ref: g.spec.infrastructure.as_ref().and_then(|i| i.parameters_ref.as_ref()).map(|r| {
            super::options::ParametersRef {
                group: r.group.clone(),
                kind: r.kind.clone(),
                namespace: None,
                name: r.name.clone(),
            }
        }),
        options: Default::default(),
    }
}

/// A backendRef as both route kinds spell it: group, kind, namespace, name, port, weight.
type RawBackend = (Option<String>, Option<String>, Option<String>, String, Option<i32>, Option<i32>);

/// Fields every route kind shares.
struct RouteParts<'a> {
    kind: &'a str,
    meta: &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    hostnames: Vec<String>,
    parents: Vec<ParentRef>,
    /// (group, kind, namespace, name, port, weight) per backendRef per rule.
    rules: Vec<Vec<RawBackend>>,
}

fn route_model(parts: RouteParts<'_>) -> RouteModel {
    let namespace = parts.meta.namespace.clone().unwrap_or_default();
    RouteModel {
        kind: parts.kind.to_string(),
        name: parts.meta.name.clone().unwrap_or_default(),
        created: parts.meta.creation_timestamp.as_ref().map(|t| t.0),
        hostnames: parts.hostnames,
        parents: parts
            .parents
            .into_iter()
            .filter(|p| {
                p.kind.as_deref().unwrap_or("Gateway") == "Gateway" && p.group.as_deref().unwrap_or(GROUP) == GROUP
            })
            .collect(),
        rules: parts
            .rules
            .into_iter()
            .map(|rule| {
                rule.into_iter()
                    .map(|(group, kind, ns, name, port, weight)| BackendRef {
                        namespace: ns.unwrap_or_else(|| namespace.clone()),
                        name,
                        group: group.unwrap_or_default(),
                        kind: kind.unwrap_or_else(|| "Service".to_string()),
                        port,
                        weight: weight.unwrap_or(1),
                    })
                    .collect()
            })
            .collect(),
        namespace,
    }
}

/// HTTPRoute and TCPRoute spell parentRefs and backendRefs with the same fields in types of
/// their own.
macro_rules! parent_ref {
    ($p:expr) => {
        ParentRef {
            group: $p.group.clone(),
            kind: $p.kind.clone(),
            namespace: $p.namespace.clone(),
            name: $p.name.clone(),
            section: $p.section_name.clone(),
            port: $p.port,
        }
    };
}

macro_rules! raw_backend {
    ($b:expr) => {
        ($b.group.clone(), $b.kind.clone(), $b.namespace.clone(), $b.name.clone(), $b.port, $b.weight)
    };
}

/// The model of a typed HTTPRoute.
pub fn http_route_model(r: &HttpRoute) -> RouteModel {
    route_model(RouteParts {
        kind: HTTP_ROUTE,
        meta: &r.metadata,
        hostnames: r.spec.hostnames.clone().unwrap_or_default(),
        parents: r.spec.parent_refs.iter().flatten().map(|p| parent_ref!(p)).collect(),
        rules: r
            .spec
            .rules
            .iter()
            .flatten()
            .map(|rule| rule.backend_refs.iter().flatten().map(|b| raw_backend!(b)).collect())
            .collect(),
    })
}

/// The model of a typed TCPRoute.
pub fn tcp_route_model(r: &TcpRoute) -> RouteModel {
    route_model(RouteParts {
        kind: TCP_ROUTE,
        meta: &r.metadata,
        hostnames: Vec::new(),
        parents: r.spec.parent_refs.iter().flatten().map(|p| parent_ref!(p)).collect(),
        rules: r.spec.rules.iter().map(|rule| rule.backend_refs.iter().map(|b| raw_backend!(b)).collect()).collect(),
    })
}

/// The model of a typed TLSRoute.
pub fn tls_route_model(r: &TlsRoute) -> RouteModel {
    route_model(RouteParts {
        kind: TLS_ROUTE,
        meta: &r.metadata,
        hostnames: r.spec.hostnames.clone(),
        parents: r.spec.parent_refs.iter().flatten().map(|p| parent_ref!(p)).collect(),
        rules: r.spec.rules.iter().map(|rule| rule.backend_refs.iter().map(|b| raw_backend!(b)).collect()).collect(),
    })
}

/// Whether a route's backendRefs point into `namespace` (one without a namespace points into the
/// route's own): what its model's rules would say, read without building the model -- the webhook
/// asks this of every route in the cluster on each admission, and most point elsewhere.
fn backends_reach<'a>(
    route_namespace: Option<&'a str>,
    backend_namespaces: impl IntoIterator<Item = Option<&'a str>>,
    namespace: &str,
) -> bool {
    backend_namespaces.into_iter().any(|ns| ns.or(route_namespace).unwrap_or_default() == namespace)
}

/// [`backends_reach`] for a typed HTTPRoute.
pub fn http_route_reaches(r: &HttpRoute, namespace: &str) -> bool {
    let refs = r.spec.rules.iter().flatten().flat_map(|rule| rule.backend_refs.iter().flatten());
    backends_reach(r.metadata.namespace.as_deref(), refs.map(|b| b.namespace.as_deref()), namespace)
}

/// [`backends_reach`] for a typed TCPRoute.
pub fn tcp_route_reaches(r: &TcpRoute, namespace: &str) -> bool {
    let refs = r.spec.rules.iter().flat_map(|rule| rule.backend_refs.iter());
    backends_reach(r.metadata.namespace.as_deref(), refs.map(|b| b.namespace.as_deref()), namespace)
}

/// [`backends_reach`] for a typed TLSRoute.
pub fn tls_route_reaches(r: &TlsRoute, namespace: &str) -> bool {
    let refs = r.spec.rules.iter().flat_map(|rule| rule.backend_refs.iter());
    backends_reach(r.metadata.namespace.as_deref(), refs.map(|b| b.namespace.as_deref()), namespace)
}

/// The model of a typed ReferenceGrant (only `from` entries of the Gateway API group count).
pub fn grant_model(g: &ReferenceGrant) -> Grant {
    Grant {
        namespace: g.metadata.namespace.clone().unwrap_or_default(),
        from: g.spec.from.iter().filter(|f| f.group == GROUP).map(|f| (f.kind.clone(), f.namespace.clone())).collect(),
        to: g.spec.to.iter().map(|t| (t.group.clone(), t.kind.clone(), t.name.clone())).collect(),
    }
}

/// True when an object of `from_kind` in `from_namespace` may refer to `to` (group, kind, name)
/// in `to_namespace`: same namespace, or a ReferenceGrant there allows it.
pub fn ref_permitted(
    grants: &[Grant],
    from_kind: &str,
    from_namespace: &str,
    (group, kind, name): (&str, &str, &str),
    to_namespace: &str,
) -> bool {
    from_namespace == to_namespace
        || grants.iter().any(|g| {
            g.namespace == to_namespace
                && g.from.iter().any(|(k, ns)| k == from_kind && ns == from_namespace)
                && g.to.iter().any(|(tg, tk, tn)| tg == group && tk == kind && tn.as_deref().is_none_or(|n| n == name))
        })
}

/// Status of one route towards one parent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentStatus {
    /// The Gateway (namespace, name) the parentRef resolves to.
    pub gateway: (String, String),
    /// The parentRef as the route wrote it.
    pub parent_ref: ParentRef,
    /// Ok, or why it did not attach (reason NotAllowedByListeners, NoMatchingParent,
    /// NoMatchingListenerHostname, TunnelConflict, ...).
    pub accepted: Result<(), Problem>,
    /// Ok, or why a backend does not resolve (RefNotPermitted, BackendNotFound, InvalidKind).
    pub resolved_refs: Result<(), Problem>,
}

#[derive(Clone, Debug, Default)]
pub struct GatewayResolution {
    pub tunnels: BTreeMap<PodKey, Vec<TunnelSpec>>,
    /// (gateway namespace, name) -> listener name -> attached route count.
    pub attached: BTreeMap<(String, String), BTreeMap<String, i32>>,
    /// (gateway namespace, name) -> listener name -> problems (unsupported protocol, ...): the
    /// listener is not Accepted.
    pub listener_problems: BTreeMap<(String, String), BTreeMap<String, Vec<Problem>>>,
    /// (gateway namespace, name) -> listener name -> references that do not resolve
    /// (InvalidRouteKinds, InvalidCertificateRef, RefNotPermitted): ResolvedRefs=False.
    pub listener_refs: BTreeMap<(String, String), BTreeMap<String, Vec<Problem>>>,
    /// (gateway namespace, name) -> listener name -> the route kinds it serves (supportedKinds).
    pub listener_kinds: BTreeMap<(String, String), BTreeMap<String, Vec<RouteGroupKind>>>,
    /// (route kind, namespace, name) -> per-parent status.
    pub routes: BTreeMap<(String, String, String), Vec<ParentStatus>>,
    /// Route-level problems (weights, path fan-out, pods without the target port, wildcards).
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
            listener::PORT_UNAVAILABLE,
            format!("listener {}: HTTP is served on the tunnel server's ports 80/443 only, not {}", l.name, l.port),
        )),
        "TCP" => Ok(TunnelKind::Tcp),
        "TLS" if l.tls_mode.as_deref() != Some("Passthrough") => Err(problem(
            listener::UNSUPPORTED_VALUE,
            format!(
                "listener {}: TLS mode Terminate is not served: the tunnel server cannot present the Gateway's \
                 certificate; set tls.mode: Passthrough (the pod terminates TLS, the server routes by SNI) or use \
                 an HTTPS listener with an HTTPRoute",
                l.name
            ),
        )),
        "TLS" if l.port == 443 => Ok(TunnelKind::Tls),
        "TLS" => Err(problem(
            listener::PORT_UNAVAILABLE,
            format!(
                "listener {}: TLS passthrough is served on the tunnel server's port 443 only (SNI), not {}",
                l.name, l.port
            ),
        )),
        other => Err(problem(
            listener::UNSUPPORTED_PROTOCOL,
            format!("listener {}: protocol {other} is not served (HTTP, HTTPS, TCP, TLS Passthrough are)", l.name),
        )),
    }
}

/// The one route kind picotun serves on a protocol.
fn served_kind(protocol: &str) -> Option<&'static str> {
    match protocol {
        "HTTP" | "HTTPS" => Some(HTTP_ROUTE),
        "TCP" => Some(TCP_ROUTE),
        "TLS" => Some(TLS_ROUTE),
        _ => None,
    }
}

/// The route kinds a listener serves (its supportedKinds), and a problem naming the kinds of
/// allowedRoutes.kinds it does not serve.
fn supported_kinds(l: &Listener) -> (Vec<RouteGroupKind>, Option<Problem>) {
    let served = served_kind(&l.protocol);
    let serves = |k: &RouteGroupKind| k.group == GROUP && served == Some(k.kind.as_str());
    match &l.kinds {
        None => (served.map(|k| RouteGroupKind { group: GROUP.into(), kind: k.into() }).into_iter().collect(), None),
        Some(kinds) => {
            let mut valid: Vec<RouteGroupKind> = kinds.iter().filter(|k| serves(k)).cloned().collect();
            valid.dedup();
            let invalid: Vec<String> =
                kinds.iter().filter(|k| !serves(k)).map(|k| format!("{}/{}", k.group, k.kind)).collect();
            let p = (!invalid.is_empty()).then(|| {
                problem(
                    listener::INVALID_ROUTE_KINDS,
                    format!(
                        "listener {}: allowedRoutes.kinds {} cannot be served on {} (only {})",
                        l.name,
                        invalid.join(", "),
                        l.protocol,
                        served.unwrap_or("none")
                    ),
                )
            });
            (valid, p)
        }
    }
}

/// Problems with an HTTPS listener's certificateRefs: only core Secrets, in another namespace
/// only with a ReferenceGrant. picotun never reads the Secrets (the tunnel server terminates
/// TLS with its own certificate), so a missing Secret is not detected.
fn certificate_problems(g: &GatewayModel, l: &Listener, grants: &[Grant]) -> Vec<Problem> {
    let mut out = Vec::new();
    for r in &l.certificate_refs {
        if !r.group.is_empty() || r.kind != "Secret" {
            out.push(problem(
                listener::INVALID_CERTIFICATE_REF,
                format!(
                    "listener {}: certificateRef {} is a {}/{}, not a core Secret",
                    l.name, r.name, r.group, r.kind
                ),
            ));
            continue;
        }
        let ns = r.namespace.as_deref().unwrap_or(&g.namespace);
        if !ref_permitted(grants, "Gateway", &g.namespace, ("", "Secret", &r.name), ns) {
            out.push(problem(
                listener::REF_NOT_PERMITTED,
                format!(
                    "listener {}: Secret {ns}/{} is in another namespace and no ReferenceGrant there allows Gateways of {}",
                    l.name, r.name, g.namespace
                ),
            ));
        }
    }
    out
}

/// A listener hostname a tunnel can request: a DNS name, or `*.` and one.
fn valid_listener_hostname(h: &str) -> bool {
    is_dns_name(h.strip_prefix("*.").unwrap_or(h))
}

fn allows(
    l: &Listener,
    supported: &[RouteGroupKind],
    gateway_ns: &str,
    route: &RouteModel,
    namespace_labels: &BTreeMap<String, BTreeMap<String, String>>,
) -> bool {
    let kind_ok = supported.iter().any(|k| k.group == GROUP && k.kind == route.kind);
    let ns_ok = match &l.from {
        From::Same => route.namespace == gateway_ns,
        From::All => true,
        From::Selector(Ok(selector)) => namespace_labels.get(&route.namespace).is_some_and(|l| selector.matches(l)),
        From::Selector(Err(_)) => false,
    };
    kind_ok && ns_ok
}

/// The intersection of a listener hostname and a route hostname as the Gateway API defines it:
/// equal names; a `*.` wildcard matches any name with that suffix (one label or more); of two
/// that match, the more specific one is the hostname served.
fn intersect(listener: &str, route: &str) -> Option<String> {
    let suffix_of = |wild: &str, name: &str| {
        let suffix = &wild[1..]; // ".example.com"
        name.len() > suffix.len() && name.ends_with(suffix)
    };
    match (listener.starts_with("*."), route.starts_with("*.")) {
        (false, false) => (listener == route).then(|| route.to_string()),
        (true, false) => suffix_of(listener, route).then(|| route.to_string()),
        (false, true) => suffix_of(route, listener).then(|| listener.to_string()),
        (true, true) => {
            if listener == route || suffix_of(listener, &route[2..]) {
                Some(route.to_string())
            } else if suffix_of(route, &listener[2..]) {
                Some(listener.to_string())
            } else {
                None
            }
        }
    }
}

/// The hostnames a route gets through a listener: the intersections of the listener's hostname
/// with each of the route's (deduplicated, in the route's order); the listener's when the route
/// has none; the route's when the listener has none. Err when both have some and none intersect.
fn hostnames_for(listener: Option<&str>, route: &[String]) -> Result<Vec<String>, ()> {
    match (listener, route.is_empty()) {
        (Some(l), true) => Ok(vec![l.to_string()]),
        (Some(l), false) => {
            let mut hits: Vec<String> = Vec::new();
            for h in route.iter().filter_map(|r| intersect(l, r)) {
                if !hits.contains(&h) {
                    hits.push(h);
                }
            }
            if hits.is_empty() { Err(()) } else { Ok(hits) }
        }
        (None, _) => Ok(route.to_vec()),
    }
}

/// What a route's backendRefs resolve to: the pods of the first rule's Services with their
/// target ports, why a reference does not resolve (the first such), and pods lacking a target
/// port.
struct Backends {
    pods: Vec<(PodKey, u16)>,
    resolved_refs: Result<(), Problem>,
    problems: Vec<Problem>,
}

fn resolve_backends(route: &RouteModel, grants: &[Grant], snapshot: &Snapshot<'_>) -> Backends {
    let mut out = Backends { pods: Vec::new(), resolved_refs: Ok(()), problems: Vec::new() };
    for (i, rule) in route.rules.iter().enumerate() {
        for b in rule {
            let refused = if !b.group.is_empty() || b.kind != "Service" {
                Some(problem(
                    route::INVALID_KIND,
                    format!("backendRef {} is a {}/{}, not a core Service", b.name, b.group, b.kind),
                ))
            } else if !ref_permitted(grants, &route.kind, &route.namespace, ("", "Service", &b.name), &b.namespace) {
                Some(problem(
                    route::REF_NOT_PERMITTED,
                    format!(
                        "Service {}/{} is in another namespace and no ReferenceGrant there allows {}s of {}",
                        b.namespace, b.name, route.kind, route.namespace
                    ),
                ))
            } else {
                None
            };
            let service = match refused {
                Some(p) => Err(p),
                None => snapshot.service(&b.namespace, &b.name).ok_or_else(|| {
                    problem(route::BACKEND_NOT_FOUND, format!("Service {}/{} does not exist", b.namespace, b.name))
                }),
            };
            let port = service.and_then(|s| {
                b.port.and_then(|p| service_port(s, &IntOrString::Int(p))).map(|port| (s, port)).ok_or_else(|| {
                    problem(
                        route::BACKEND_NOT_FOUND,
                        format!("Service {}/{} has no port {:?}", b.namespace, b.name, b.port),
                    )
                })
            });
            match port {
                Err(p) => {
                    if out.resolved_refs.is_ok() {
                        out.resolved_refs = Err(p);
                    }
                }
                // Every backendRef of the first rule (the others are reported as fan-out).
                Ok((service, port)) if i == 0 => {
                    let (pods, missing) = backing_pods(snapshot, service, port);
                    for (key, target) in pods {
                        if !out.pods.iter().any(|(o, _)| *o == key) {
                            out.pods.push((key, target));
                        }
                    }
                    out.problems.extend(missing);
                }
                Ok(_) => {}
            }
        }
    }
    out
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
    // (gateway, listener) -> served: no problem keeps picotun from opening its tunnels.
    let mut served: BTreeSet<((String, String), String)> = BTreeSet::new();
    for g in &ours {
        let key = (g.namespace.clone(), g.name.clone());
        out.attached.entry(key.clone()).or_default();
        for l in &g.listeners {
            out.attached.entry(key.clone()).or_default().insert(l.name.clone(), 0);
            let mut problems = Vec::new();
            if let Err(p) = listener_kind(l) {
                problems.push(p);
            }
            if matches!(l.protocol.as_str(), "HTTP" | "HTTPS" | "TLS")
                && let Some(h) = l.hostname.as_deref().filter(|h| !valid_listener_hostname(h))
            {
                problems.push(problem(
                    reason::INVALID_HOSTNAME,
                    format!("listener {}: hostname {h:?} is not a name a tunnel can request", l.name),
                ));
            }
            if let From::Selector(Err(e)) = &l.from {
                problems.push(problem(
                    reason::INVALID_ROUTE_NAMESPACES,
                    format!(
                        "listener {}: allowedRoutes.namespaces.selector is invalid ({e}): no route is admitted",
                        l.name
                    ),
                ));
            }
            let (kinds, kinds_problem) = supported_kinds(l);
            let mut refs: Vec<Problem> = kinds_problem.into_iter().collect();
            let certificates = if l.protocol == "HTTPS" { certificate_problems(g, l, grants) } else { Vec::new() };
            if problems.is_empty() && certificates.is_empty() {
                served.insert((key.clone(), l.name.clone()));
            }
            refs.extend(certificates);
            out.listener_kinds.entry(key.clone()).or_default().insert(l.name.clone(), kinds);
            if !problems.is_empty() {
                out.listener_problems.entry(key.clone()).or_default().insert(l.name.clone(), problems);
            }
            if !refs.is_empty() {
                out.listener_refs.entry(key.clone()).or_default().insert(l.name.clone(), refs);
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
                reason::WEIGHTS_UNSUPPORTED,
                "backendRef weights are not honoured: the tunnel server spreads connections evenly over every pod"
                    .into(),
            ));
        }
        let distinct_rules: BTreeSet<Vec<(String, String, Option<i32>)>> = route
            .rules
            .iter()
            .map(|r| r.iter().map(|b| (b.namespace.clone(), b.name.clone(), b.port)).collect())
            .collect();
        if route.kind == HTTP_ROUTE && distinct_rules.len() > 1 {
            route_problems.push(problem(
                reason::PATH_FAN_OUT_UNSUPPORTED,
                "rules send different requests to different backends; a tunnel sends a whole host to every backend of the route".into(),
            ));
        }
        let mut backends: Option<Backends> = None;
        let mut wildcards: BTreeSet<String> = BTreeSet::new();

        let mut statuses = Vec::new();
        for parent in &route.parents {
            let parent_ns = parent.namespace.clone().unwrap_or_else(|| route.namespace.clone());
            let Some(g) = gateways.iter().find(|g| g.namespace == parent_ns && g.name == parent.name) else {
                statuses.push(ParentStatus {
                    gateway: (parent_ns.clone(), parent.name.clone()),
                    parent_ref: parent.clone(),
                    accepted: Err(problem(
                        route::NO_MATCHING_PARENT,
                        format!("Gateway {parent_ns}/{} does not exist", parent.name),
                    )),
                    resolved_refs: Ok(()),
                });
                continue;
            };
            if !our_classes.contains(&g.class) {
                continue; // another controller's Gateway: not ours to report on
            }
            let b = backends.get_or_insert_with(|| resolve_backends(route, grants, snapshot));
            let gkey = (g.namespace.clone(), g.name.clone());
            let candidates: Vec<&Listener> = g
                .listeners
                .iter()
                .filter(|l| {
                    parent.section.as_ref().is_none_or(|s| *s == l.name) && parent.port.is_none_or(|p| p == l.port)
                })
                .collect();
            let mut accepted = Err(if candidates.is_empty() {
                problem(
                    route::NO_MATCHING_PARENT,
                    format!(
                        "Gateway {}/{} has no listener {:?}",
                        g.namespace,
                        g.name,
                        parent.section.as_deref().unwrap_or("(any)")
                    ),
                )
            } else {
                problem(
                    route::NOT_ALLOWED_BY_LISTENERS,
                    format!(
                        "no listener of Gateway {}/{} allows a {} from namespace {}",
                        g.namespace, g.name, route.kind, route.namespace
                    ),
                )
            });
            for l in candidates {
                let no_kinds = Vec::new();
                let kinds = out.listener_kinds.get(&gkey).and_then(|m| m.get(&l.name)).unwrap_or(&no_kinds);
                if !allows(l, kinds, &g.namespace, route, namespace_labels) {
                    continue;
                }
                let hosts = match hostnames_for(l.hostname.as_deref(), &route.hostnames) {
                    Ok(h) => h,
                    Err(()) => {
                        if accepted.as_ref().is_err_and(|p| p.reason != route::NO_MATCHING_LISTENER_HOSTNAME) {
                            accepted = Err(problem(
                                route::NO_MATCHING_LISTENER_HOSTNAME,
                                format!(
                                    "no hostname of the route intersects listener {}'s {:?}",
                                    l.name,
                                    l.hostname.as_deref().unwrap_or_default()
                                ),
                            ));
                        }
                        continue;
                    }
                };
                accepted = Ok(());
                *out.attached.entry(gkey.clone()).or_default().entry(l.name.clone()).or_insert(0) += 1;
                if !served.contains(&(gkey.clone(), l.name.clone())) {
                    continue;
                }
                let Ok(kind) = listener_kind(l) else { continue };
                // The tunnels this listener gives: one per hostname (HTTP, TLS; a name derived from
                // the route when neither has one), or the listener's port (TCP).
                let mut specs: Vec<TunnelSpec> = Vec::new();
                match kind {
                    TunnelKind::Http | TunnelKind::Tls => {
                        let hosts =
                            if hosts.is_empty() { vec![tunnel_name(&[&route.name, &route.namespace])] } else { hosts };
                        for h in hosts {
                            if h.starts_with("*.") {
                                wildcards.insert(h);
                                continue;
                            }
                            specs.push(TunnelSpec {
                                name: tunnel_name(&["gw", &g.namespace, &g.name, &l.name, &h]),
                                kind,
                                host: Some(h),
                                remote_port: None,
                                target_port: 0,
                                options: g.options.clone(),
                                standby: false,
                            });
                        }
                    }
                    TunnelKind::Tcp => specs.push(TunnelSpec {
                        name: tunnel_name(&["gw", &g.namespace, &g.name, &l.name]),
                        kind: TunnelKind::Tcp,
                        host: None,
                        remote_port: u16::try_from(l.port).ok(),
                        target_port: 0,
                        options: g.options.clone(),
                        standby: false,
                    }),
                }
                let fixed = kind == TunnelKind::Tcp || l.hostname.as_deref().is_some_and(|h| !h.starts_with("*."));
                let records = out.route_claims.entry(route_key.clone()).or_default();
                for claim in specs.iter().filter_map(Claim::of) {
                    records.push(ClaimRecord {
                        parent: statuses.len(),
                        gateway: gkey.clone(),
                        listener: l.name.clone(),
                        fixed,
                        claim,
                    });
                }
                let names = specs.iter().map(|spec| spec.name.clone());
                out.listener_tunnels.entry(gkey.clone()).or_default().entry(l.name.clone()).or_default().extend(names);
                out.route_tunnels.entry(route_key.clone()).or_default().extend(specs.iter().map(|s| s.name.clone()));
                for (key, target) in &b.pods {
                    let tunnels = out.tunnels.entry(key.clone()).or_default();
                    for spec in &specs {
                        if !tunnels.iter().any(|t| t.name == spec.name) {
                            tunnels.push(TunnelSpec { target_port: *target, ..spec.clone() });
                        }
                    }
                    let mine =
                        out.route_pod_tunnels.entry(route_key.clone()).or_default().entry(key.clone()).or_default();
                    for spec in &specs {
                        if !mine.iter().any(|t| t.name == spec.name) {
                            mine.push(TunnelSpec { target_port: *target, ..spec.clone() });
                        }
                    }
                }
            }
            statuses.push(ParentStatus {
                gateway: gkey,
                parent_ref: parent.clone(),
                accepted,
                resolved_refs: b.resolved_refs.clone(),
            });
        }
        if let Some(b) = backends {
            route_problems.extend(b.problems);
        }
        if !wildcards.is_empty() {
            route_problems.push(problem(
                reason::WILDCARD_HOSTNAME_UNSUPPORTED,
                format!(
                    "{} cannot be requested: a tunnel serves one name, not every name of a domain; list the names in the route's hostnames",
                    wildcards.into_iter().collect::<Vec<_>>().join(", ")
                ),
            ));
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

/// Typed objects from JSON fixtures, read into the model as the index does.
#[cfg(test)]
pub mod fixtures {
    use super::*;
    use serde_json::Value;

    fn typed<K: serde::de::DeserializeOwned>(mut v: Value, kind: &str) -> K {
        v["apiVersion"] = Value::from(format!("{GROUP}/v1"));
        v["kind"] = Value::from(kind);
        serde_json::from_value(v).unwrap_or_else(|e| panic!("{kind} fixture: {e}"))
    }

    pub fn gateway(v: Value) -> GatewayModel {
        gateway_model(&typed(v, "Gateway"))
    }

    /// `kind` is `HTTPRoute`, `TCPRoute` or `TLSRoute`.
    pub fn route(kind: &str, v: Value) -> RouteModel {
        if kind == TLS_ROUTE {
            return tls_route_model(&typed(v, kind));
        }
        if kind == TCP_ROUTE {
            let mut v = v;
            v["apiVersion"] = Value::from(format!("{GROUP}/v1alpha2"));
            v["kind"] = Value::from(kind);
            return tcp_route_model(&serde_json::from_value(v).expect("TCPRoute fixture"));
        }
        http_route_model(&typed(v, kind))
    }

    /// Whether the typed route reaches `namespace` ([`http_route_reaches`] and its kin), with
    /// the model of the same fixture.
    pub fn route_reaches(kind: &str, v: Value, namespace: &str) -> (bool, RouteModel) {
        let model = route(kind, v.clone());
        let reaches = if kind == TLS_ROUTE {
            tls_route_reaches(&typed(v, kind), namespace)
        } else if kind == TCP_ROUTE {
            let mut v = v;
            v["apiVersion"] = Value::from(format!("{GROUP}/v1alpha2"));
            v["kind"] = Value::from(kind);
            tcp_route_reaches(&serde_json::from_value(v).expect("TCPRoute fixture"), namespace)
        } else {
            http_route_reaches(&typed(v, kind), namespace)
        };
        (reaches, model)
    }

    pub fn grant(v: Value) -> Grant {
        grant_model(&typed(v, "ReferenceGrant"))
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{gateway, grant, route};
    use super::*;
    use k8s_openapi::api::core::v1::{Pod, Service};
    use serde_json::json;

    #[test]
    fn whether_a_route_reaches_a_namespace_is_what_its_model_says() {
        let rules = |refs: serde_json::Value| json!([{"backendRefs": refs}, {"backendRefs": []}]);
        let cases = [
            (json!([{"name": "web", "port": 80}]), "apps", true),
            (json!([{"name": "web", "port": 80}]), "other", false),
            (json!([{"name": "web", "namespace": "other", "port": 80}]), "other", true),
            (json!([{"name": "web", "namespace": "other", "port": 80}]), "apps", false),
            (json!([{"name": "a", "namespace": "x", "port": 80}, {"name": "b", "port": 80}]), "apps", true),
            (json!([]), "apps", false),
        ];
        for kind in [HTTP_ROUTE, TCP_ROUTE, TLS_ROUTE] {
            for (refs, namespace, want) in &cases {
                let mut v = json!({"metadata": {"name": "r", "namespace": "apps"},
                    "spec": {"parentRefs": [{"name": "gw"}], "rules": rules(refs.clone())}});
                if kind == TLS_ROUTE {
                    v["spec"]["hostnames"] = json!(["web.example.com"]);
                }
                let (reaches, model) = fixtures::route_reaches(kind, v, namespace);
                let by_model = model.rules.iter().flatten().any(|b| b.namespace == *namespace);
                assert_eq!(reaches, *want, "{kind} {refs} into {namespace}");
                assert_eq!(reaches, by_model, "{kind} {refs} into {namespace}: the model says otherwise");
            }
        }
        // A route without rules at all reaches nowhere.
        let v = json!({"metadata": {"name": "r", "namespace": "apps"}, "spec": {"parentRefs": [{"name": "gw"}]}});
        assert!(!fixtures::route_reaches(HTTP_ROUTE, v, "apps").0);
    }

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
        let gw = gateway(json!({"metadata": {"name": "tcp-echo-gateway", "namespace": "default"}, "spec": {
        "gatewayClassName": "pico",
        "listeners": [
            {"name": "web-test", "protocol": "HTTP", "port": 80, "hostname": "web-test"},
            {"name": "tcp", "protocol": "TCP", "port": 59123, "allowedRoutes": {"kinds": [{"kind": "TCPRoute"}]}},
        ]}}));
        let http = route(
            "HTTPRoute",
            json!({"metadata": {"name": "http-echo-route", "namespace": "default"}, "spec": {
            "parentRefs": [{"name": "tcp-echo-gateway", "sectionName": "web-test"}],
            "rules": [{"backendRefs": [{"name": "tcp-echo-service", "port": 80}]}]}}),
        );
        let tcp = route(
            "TCPRoute",
            json!({"metadata": {"name": "tcp-echo-route", "namespace": "default"}, "spec": {
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
        let wrong_kind = route(
            "HTTPRoute",
            json!({"metadata": {"name": "r", "namespace": "default"}, "spec": {
            "parentRefs": [{"name": "tcp-echo-gateway", "sectionName": "tcp"}], "rules": [{"backendRefs": [{"name": "s", "port": 80}]}]}}),
        );
        let other_ns = route(
            "HTTPRoute",
            json!({"metadata": {"name": "r2", "namespace": "team"}, "spec": {
            "parentRefs": [{"name": "tcp-echo-gateway", "namespace": "default"}], "rules": [{"backendRefs": [{"name": "s", "port": 80}]}]}}),
        );
        let missing = route(
            "HTTPRoute",
            json!({"metadata": {"name": "r3", "namespace": "default"}, "spec": {
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
        gw.listeners[0].from = From::Selector(Ok([("team".to_string(), "yes".to_string())].into_iter().collect()));
        let labels = BTreeMap::from([("team".to_string(), BTreeMap::from([("team".to_string(), "yes".to_string())]))]);
        let other_ns = route(
            "HTTPRoute",
            json!({"metadata": {"name": "r2", "namespace": "team"}, "spec": {
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
        let route = route(
            "HTTPRoute",
            json!({"metadata": {"name": "r", "namespace": "default"}, "spec": {
            "parentRefs": [{"name": "tcp-echo-gateway", "sectionName": "web-test"}],
            "rules": [{"backendRefs": [{"name": "api", "namespace": "backend", "port": 80}]}]}}),
        );
        let services = vec![svc("backend", "api", "api", 80, 8080)];
        let pods = vec![pod("backend", "api-1", "api")];
        let snap = Snapshot::new(&services, &pods);
        let r = resolve(&gws, &classes(), std::slice::from_ref(&route), &[], &BTreeMap::new(), &snap);
        assert_eq!(r.routes.values().next().unwrap()[0].resolved_refs.clone().unwrap_err().reason, "RefNotPermitted");
        assert!(r.tunnels.is_empty());
        let grant = grant(json!({"metadata": {"name": "g", "namespace": "backend"}, "spec": {
            "from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "default"}],
            "to": [{"group": "", "kind": "Service", "name": "api"}]}}));
        let r = resolve(&gws, &classes(), &[route], &[grant], &BTreeMap::new(), &snap);
        assert!(r.routes.values().next().unwrap()[0].resolved_refs.is_ok());
        assert_eq!(r.tunnels[&("backend".into(), "api-1".into())][0].target_port, 8080);
    }

    #[test]
    fn every_backend_and_hostname_and_what_cannot_be_done() {
        let gw = gateway(
            json!({"metadata": {"name": "g", "namespace": "ns"}, "spec": {"gatewayClassName": "pico", "listeners": [
            {"name": "any", "protocol": "HTTP", "port": 80},
            {"name": "odd", "protocol": "HTTP", "port": 8080},
            {"name": "udp", "protocol": "UDP", "port": 53}]}}),
        );
        let route = route(
            "HTTPRoute",
            json!({"metadata": {"name": "r", "namespace": "ns"}, "spec": {
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
        assert_eq!(hostnames_for(Some("web"), &["other".into()]), Err(()));
        assert_eq!(hostnames_for(None, &[]), Ok(vec![]));
    }

    /// Conformance HTTPRouteHostnameIntersection: intersections as the Gateway API defines them
    /// -- a `*.` wildcard is a suffix match over one label or more (before: one label only), a
    /// route wildcard narrows to a precise listener hostname, of two wildcards the narrower
    /// wins; no intersection is Accepted=False NoMatchingListenerHostname.
    #[test]
    fn hostnames_intersect_as_the_spec_says() {
        let hosts = |l: &str, r: &[&str]| hostnames_for(Some(l), &r.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            hosts("*.wildcard.io", &["non.matching.com", "wildcard.io", "foo.wildcard.io", "foo.bar.wildcard.io"]),
            Ok(vec!["foo.wildcard.io".to_string(), "foo.bar.wildcard.io".to_string()])
        );
        assert_eq!(
            hosts("very.specific.com", &["non.matching.com", "*.specific.com"]),
            Ok(vec!["very.specific.com".into()])
        );
        assert_eq!(
            hosts("very.specific.com", &["*.nonmatchingwildcard.io", "very.specific.com"]),
            Ok(vec!["very.specific.com".into()])
        );
        assert_eq!(hosts("*.anotherwildcard.io", &["*.anotherwildcard.io"]), Ok(vec!["*.anotherwildcard.io".into()]));
        assert_eq!(hosts("*.example.com", &["*.foo.example.com"]), Ok(vec!["*.foo.example.com".into()]));
        assert_eq!(hosts("*.foo.example.com", &["*.example.com"]), Ok(vec!["*.foo.example.com".into()]));
        assert_eq!(hosts("*.wildcard.io", &["wildcard.io", "specific.but.wrong.com"]), Err(()));

        let gw = gateway(
            json!({"metadata": {"name": "g", "namespace": "ns"}, "spec": {"gatewayClassName": "pico", "listeners": [
            {"name": "listener-1", "protocol": "HTTP", "port": 80, "hostname": "very.specific.com"},
            {"name": "listener-2", "protocol": "HTTP", "port": 80, "hostname": "*.wildcard.io"}]}}),
        );
        let none = route(
            "HTTPRoute",
            json!({"metadata": {"name": "no-intersecting-hosts", "namespace": "ns"}, "spec": {
            "parentRefs": [{"name": "g"}], "hostnames": ["specific.but.wrong.com", "wildcard.io"],
            "rules": [{"backendRefs": [{"name": "s", "port": 80}]}]}}),
        );
        let r = resolve(&[gw], &classes(), &[none], &[], &BTreeMap::new(), &Snapshot::new(&[], &[]));
        let st = &r.routes[&("HTTPRoute".into(), "ns".into(), "no-intersecting-hosts".into())][0];
        assert_eq!(st.accepted.clone().unwrap_err().reason, route::NO_MATCHING_LISTENER_HOSTNAME);
        assert_eq!(r.attached[&("ns".into(), "g".into())].values().sum::<i32>(), 0);
    }

    fn labels(pairs: &[(&str, &[(&str, &str)])]) -> BTreeMap<String, BTreeMap<String, String>> {
        pairs
            .iter()
            .map(|(ns, ls)| (ns.to_string(), ls.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()))
            .collect()
    }

    fn selector_gateway(selector: serde_json::Value) -> GatewayModel {
        gateway(
            json!({"metadata": {"name": "g", "namespace": "infra"}, "spec": {"gatewayClassName": "pico", "listeners": [
            {"name": "web", "protocol": "HTTP", "port": 80, "hostname": "web",
             "allowedRoutes": {"namespaces": {"from": "Selector", "selector": selector}}}]}}),
        )
    }

    fn route_in(ns: &str, name: &str) -> RouteModel {
        route(
            "HTTPRoute",
            json!({"metadata": {"name": name, "namespace": ns}, "spec": {
            "parentRefs": [{"name": "g", "namespace": "infra"}], "rules": [{"backendRefs": [{"name": "s", "port": 80}]}]}}),
        )
    }

    /// Issue 12, defect 1: `allowedRoutes.namespaces.from: Selector` with matchExpressions
    /// admits only the namespaces the expressions select (before: the selector became `{}` and
    /// admitted every namespace); an invalid selector admits nothing and says so on the listener.
    #[test]
    fn a_namespace_selector_with_match_expressions_admits_only_what_it_selects() {
        let ns = labels(&[("a", &[("team", "a")]), ("b", &[("team", "b")]), ("c", &[])]);
        let gw = selector_gateway(json!({"matchExpressions": [{"key": "team", "operator": "In", "values": ["a"]}]}));
        let routes = [route_in("a", "r"), route_in("b", "r"), route_in("c", "r")];
        let r = resolve(&[gw], &classes(), &routes, &[], &ns, &Snapshot::new(&[], &[]));
        let accepted = |ns: &str| r.routes[&("HTTPRoute".into(), ns.into(), "r".into())][0].accepted.clone();
        assert!(accepted("a").is_ok());
        assert_eq!(accepted("b").unwrap_err().reason, route::NOT_ALLOWED_BY_LISTENERS);
        assert_eq!(accepted("c").unwrap_err().reason, route::NOT_ALLOWED_BY_LISTENERS);
        assert_eq!(r.attached[&("infra".into(), "g".into())]["web"], 1);
        assert!(!r.listener_problems.contains_key(&("infra".into(), "g".into())));

        let bad = selector_gateway(json!({"matchExpressions": [{"key": "team", "operator": "Near", "values": ["a"]}]}));
        let r = resolve(&[bad], &classes(), &routes, &[], &ns, &Snapshot::new(&[], &[]));
        assert!(r.routes.values().all(|s| s[0].accepted.is_err()), "an invalid selector admits nothing");
        let lp = &r.listener_problems[&("infra".into(), "g".into())]["web"];
        assert_eq!(lp[0].reason, reason::INVALID_ROUTE_NAMESPACES);
    }

    fn named_port_service(ns: &str) -> Service {
        serde_json::from_value(json!({"metadata": {"name": "web", "namespace": ns},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]}}))
        .unwrap()
    }

    fn pod_with_port(ns: &str, name: &str, port: Option<i32>) -> Pod {
        let ports = port.map(|p| json!([{"name": "http", "containerPort": p}])).unwrap_or(json!([]));
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": ns, "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "c", "image": "x", "ports": ports}]}}))
        .unwrap()
    }

    fn web_route(ns: &str, name: &str, hostnames: serde_json::Value) -> RouteModel {
        route(
            "HTTPRoute",
            json!({"metadata": {"name": name, "namespace": ns}, "spec": {
            "parentRefs": [{"name": "g"}], "hostnames": hostnames, "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]}}),
        )
    }

    /// Issue 12, defect 7 / contract decision 1: a hostname-less route on a hostname-less
    /// listener gets a tunnel named after the route (before: no tunnel, HostnameRequired); a
    /// hostname-less route on a wildcard listener is told why it gets none (before: counted,
    /// no tunnel, no word); pods lacking the Service's target port are named in a
    /// TargetPortNotFound problem (before: skipped silently).
    #[test]
    fn hostname_less_routes_and_pods_without_the_port_are_not_dropped_silently() {
        let gw = gateway(
            json!({"metadata": {"name": "g", "namespace": "ns"}, "spec": {"gatewayClassName": "pico", "listeners": [
            {"name": "any", "protocol": "HTTP", "port": 80},
            {"name": "wild", "protocol": "HTTPS", "port": 443, "hostname": "*.example.com"}]}}),
        );
        let services = [named_port_service("ns")];
        let pods = [pod_with_port("ns", "good", Some(8080)), pod_with_port("ns", "portless", None)];
        let r = resolve(
            &[gw],
            &classes(),
            &[web_route("ns", "app", json!([]))],
            &[],
            &BTreeMap::new(),
            &Snapshot::new(&services, &pods),
        );
        let rk = ("HTTPRoute".to_string(), "ns".to_string(), "app".to_string());
        let st = &r.routes[&rk][0];
        assert!(st.accepted.is_ok() && st.resolved_refs.is_ok(), "{st:?}");
        let t = &r.tunnels[&("ns".into(), "good".into())];
        assert_eq!(t.len(), 1, "{t:?}");
        assert_eq!(t[0].host.as_deref(), Some(tunnel_name(&["app", "ns"]).as_str()));
        assert_eq!((t[0].name.as_str(), t[0].target_port), ("gw-ns-g-any-app-ns", 8080));
        assert!(!r.tunnels.contains_key(&("ns".into(), "portless".into())));
        let problems = &r.route_problems[&rk];
        let missing = problems.iter().find(|p| p.reason == reason::TARGET_PORT_NOT_FOUND).expect("TargetPortNotFound");
        assert!(missing.message.contains("portless") && !missing.message.contains("good"), "{}", missing.message);
        let wild = problems.iter().find(|p| p.reason == reason::WILDCARD_HOSTNAME_UNSUPPORTED).expect("wildcard said");
        assert!(wild.message.contains("*.example.com"), "{}", wild.message);
        assert_eq!(r.attached[&("ns".into(), "g".into())]["wild"], 1);
    }

    /// Issue 12, defect 7: HTTPS listener hostnames are validated like HTTP ones (before: only
    /// HTTP); a label longer than 63 characters passes the CRD's pattern but no tunnel server
    /// can serve it.
    #[test]
    fn https_listener_hostnames_are_validated() {
        let long = format!("{}.example.com", "a".repeat(70));
        let gw = gateway(
            json!({"metadata": {"name": "g", "namespace": "ns"}, "spec": {"gatewayClassName": "pico", "listeners": [
            {"name": "https", "protocol": "HTTPS", "port": 443, "hostname": long},
            {"name": "http", "protocol": "HTTP", "port": 80, "hostname": format!("*.{long}")},
            {"name": "fine", "protocol": "HTTPS", "port": 443, "hostname": "*.example.com"}]}}),
        );
        let r = resolve(&[gw], &classes(), &[], &[], &BTreeMap::new(), &Snapshot::new(&[], &[]));
        let lp = &r.listener_problems[&("ns".into(), "g".into())];
        assert_eq!(lp["https"][0].reason, reason::INVALID_HOSTNAME);
        assert_eq!(lp["http"][0].reason, reason::INVALID_HOSTNAME);
        assert!(!lp.contains_key("fine"));
    }

    fn tls_gateway(refs: serde_json::Value) -> GatewayModel {
        gateway(
            json!({"metadata": {"name": "g", "namespace": "ns"}, "spec": {"gatewayClassName": "pico", "listeners": [
            {"name": "https", "protocol": "HTTPS", "port": 443, "hostname": "app.example.com",
             "tls": {"mode": "Terminate", "certificateRefs": refs}}]}}),
        )
    }

    /// Issue 12, defect 7 / contract decision 5 (conformance GatewayInvalidTLSConfiguration,
    /// GatewaySecret*ReferenceGrant*): certificateRefs must be core Secrets
    /// (InvalidCertificateRef) and a Secret in another namespace needs a ReferenceGrant from
    /// Gateways (RefNotPermitted); such a listener opens no tunnel (before: certificateRefs
    /// ignored, ResolvedRefs always True).
    #[test]
    fn certificate_refs_are_checked() {
        let lk = || ("ns".to_string(), "g".to_string());
        let services = [named_port_service("ns")];
        let pods = [pod_with_port("ns", "good", Some(8080))];
        let snap = Snapshot::new(&services, &pods);
        let routes = [web_route("ns", "app", json!([]))];
        let check = |refs: serde_json::Value, grants: &[Grant]| {
            let r = resolve(&[tls_gateway(refs)], &classes(), &routes, grants, &BTreeMap::new(), &snap);
            let reasons: Vec<&str> = r
                .listener_refs
                .get(&lk())
                .and_then(|m| m.get("https"))
                .into_iter()
                .flatten()
                .map(|p| p.reason)
                .collect();
            (reasons, r.tunnels.len(), r.attached[&lk()]["https"])
        };
        assert_eq!(check(json!([{"name": "cert"}]), &[]), (vec![], 1, 1), "a Secret in the Gateway's namespace");
        assert_eq!(
            check(json!([{"group": "example.com", "kind": "Cert", "name": "cert"}]), &[]),
            (vec![listener::INVALID_CERTIFICATE_REF], 0, 1)
        );
        assert_eq!(
            check(json!([{"kind": "ConfigMap", "name": "cert"}]), &[]),
            (vec![listener::INVALID_CERTIFICATE_REF], 0, 1)
        );
        let cross = json!([{"kind": "Secret", "name": "cert", "namespace": "certs"}]);
        assert_eq!(check(cross.clone(), &[]), (vec![listener::REF_NOT_PERMITTED], 0, 1));
        let grant_for = |name: Option<&str>| {
            let mut to = json!({"group": "", "kind": "Secret"});
            if let Some(n) = name {
                to["name"] = json!(n);
            }
            grant(json!({"metadata": {"name": "g", "namespace": "certs"}, "spec": {
                "from": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "namespace": "ns"}], "to": [to]}}))
        };
        assert_eq!(check(cross.clone(), &[grant_for(None)]), (vec![], 1, 1), "all Secrets of the namespace");
        assert_eq!(check(cross.clone(), &[grant_for(Some("cert"))]), (vec![], 1, 1), "that Secret");
        assert_eq!(
            check(cross, &[grant_for(Some("other"))]),
            (vec![listener::REF_NOT_PERMITTED], 0, 1),
            "another Secret"
        );
    }

    /// Issue 12 / contract decision 6 (conformance GatewayInvalidRouteKind): allowedRoutes.kinds
    /// naming a kind picotun does not serve is ResolvedRefs=False InvalidRouteKinds, and
    /// supportedKinds lists only the valid ones (before: not validated, supportedKinds from the
    /// protocol).
    #[test]
    fn allowed_route_kinds_are_validated() {
        let gw = gateway(
            json!({"metadata": {"name": "g", "namespace": "ns"}, "spec": {"gatewayClassName": "pico", "listeners": [
            {"name": "only-invalid", "protocol": "HTTP", "port": 80, "hostname": "a",
             "allowedRoutes": {"kinds": [{"kind": "InvalidRoute"}]}},
            {"name": "mixed", "protocol": "HTTP", "port": 80, "hostname": "b",
             "allowedRoutes": {"kinds": [{"kind": "HTTPRoute"}, {"kind": "InvalidRoute"}, {"group": "example.com", "kind": "HTTPRoute"}]}},
            {"name": "tcp", "protocol": "TCP", "port": 5000, "allowedRoutes": {"kinds": [{"kind": "HTTPRoute"}]}},
            {"name": "plain", "protocol": "HTTP", "port": 80, "hostname": "c"}]}}),
        );
        let r = resolve(
            &[gw],
            &classes(),
            &[web_route("ns", "app", json!([]))],
            &[],
            &BTreeMap::new(),
            &Snapshot::new(&[], &[]),
        );
        let key = ("ns".to_string(), "g".to_string());
        let kinds = &r.listener_kinds[&key];
        let http = vec![RouteGroupKind { group: GROUP.into(), kind: HTTP_ROUTE.into() }];
        assert_eq!(kinds["only-invalid"], vec![]);
        assert_eq!(kinds["mixed"], http);
        assert_eq!(kinds["tcp"], vec![]);
        assert_eq!(kinds["plain"], http);
        let refs = &r.listener_refs[&key];
        for l in ["only-invalid", "mixed", "tcp"] {
            assert_eq!(refs[l][0].reason, listener::INVALID_ROUTE_KINDS, "{l}");
        }
        assert!(!refs.contains_key("plain"));
        let attached = &r.attached[&key];
        assert_eq!((attached["only-invalid"], attached["mixed"], attached["tcp"], attached["plain"]), (0, 1, 0, 1));
    }

    /// Issue 12, defect 8 / contract decision 3: same-named Gateways in two namespaces give
    /// disjoint tunnel names, so their pods and addresses never mix (before: `gw-gw-tcp` in
    /// both).
    #[test]
    fn same_named_gateways_in_two_namespaces_do_not_share_tunnels() {
        let gw = |ns: &str, port: i32| {
            gateway(
                json!({"metadata": {"name": "gw", "namespace": ns}, "spec": {"gatewayClassName": "pico", "listeners": [
                {"name": "tcp", "protocol": "TCP", "port": port}, {"name": "web", "protocol": "HTTP", "port": 80}]}}),
            )
        };
        let tcp = |ns: &str| {
            route(
                "TCPRoute",
                json!({"metadata": {"name": "db", "namespace": ns}, "spec": {
                "parentRefs": [{"name": "gw"}], "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]}}),
            )
        };
        let services = [named_port_service("a"), named_port_service("b")];
        let pods = [pod_with_port("a", "a-1", Some(8080)), pod_with_port("b", "b-1", Some(8080))];
        let http = |ns: &str| {
            route(
                "HTTPRoute",
                json!({"metadata": {"name": "app", "namespace": ns}, "spec": {
                "parentRefs": [{"name": "gw"}], "hostnames": [format!("{ns}-app")],
                "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]}}),
            )
        };
        let routes = [tcp("a"), tcp("b"), http("a"), http("b")];
        let r = resolve(
            &[gw("a", 5001), gw("b", 5002)],
            &classes(),
            &routes,
            &[],
            &BTreeMap::new(),
            &Snapshot::new(&services, &pods),
        );
        let names = |ns: &str| -> BTreeSet<String> {
            r.listener_tunnels[&(ns.to_string(), "gw".to_string())].values().flatten().cloned().collect()
        };
        let (a, b) = (names("a"), names("b"));
        assert_eq!(a.len(), 2, "{a:?}");
        assert!(a.is_disjoint(&b), "{a:?} / {b:?}");
        let pod_names = |pod: &str| -> BTreeSet<String> {
            r.tunnels[&(pod[..1].to_string(), pod.to_string())].iter().map(|t| t.name.clone()).collect()
        };
        assert_eq!(pod_names("a-1"), a, "a's pod carries a's tunnels only");
        assert_eq!(pod_names("b-1"), b);
    }

    /// Conformance HTTPRouteInvalidCrossNamespaceBackendRef, HTTPRoute*BackendRef: a route is
    /// Accepted while ResolvedRefs says why a backend does not resolve -- a kind that is not a
    /// core Service is InvalidKind, a missing Service BackendNotFound -- even through a listener
    /// picotun cannot serve.
    #[test]
    fn backend_refs_resolve_or_say_why() {
        let gw = gateway(
            json!({"metadata": {"name": "g", "namespace": "ns"}, "spec": {"gatewayClassName": "pico", "listeners": [
            {"name": "odd", "protocol": "HTTP", "port": 8080}]}}),
        );
        let with = |name: &str, backend: serde_json::Value| {
            route(
                "HTTPRoute",
                json!({"metadata": {"name": name, "namespace": "ns"}, "spec": {
                "parentRefs": [{"name": "g"}], "rules": [{"backendRefs": [backend]}]}}),
            )
        };
        let routes = [
            with("kind", json!({"group": "multicluster.x-k8s.io", "kind": "ServiceImport", "name": "s", "port": 80})),
            with("missing", json!({"name": "nope", "port": 80})),
        ];
        let r = resolve(&[gw], &classes(), &routes, &[], &BTreeMap::new(), &Snapshot::new(&[], &[]));
        let st = |n: &str| r.routes[&("HTTPRoute".into(), "ns".into(), n.into())][0].clone();
        assert!(st("kind").accepted.is_ok());
        assert_eq!(st("kind").resolved_refs.unwrap_err().reason, route::INVALID_KIND);
        assert_eq!(st("missing").resolved_refs.unwrap_err().reason, route::BACKEND_NOT_FOUND);
    }

    fn tls_gateway_of(listeners: serde_json::Value) -> GatewayModel {
        gateway(json!({"metadata": {"name": "g", "namespace": "ns"},
            "spec": {"gatewayClassName": "pico", "listeners": listeners}}))
    }

    fn tls_route(name: &str, hostnames: serde_json::Value, section: Option<&str>) -> RouteModel {
        let mut parent = json!({"name": "g"});
        if let Some(s) = section {
            parent["sectionName"] = json!(s);
        }
        route(
            TLS_ROUTE,
            json!({"metadata": {"name": name, "namespace": "ns"}, "spec": {
            "parentRefs": [parent], "hostnames": hostnames,
            "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]}}),
        )
    }

    /// Issue 14: a TLS listener in Passthrough mode serves TLSRoutes as `tls` tunnels (sish
    /// `sni-proxy`), one per hostname of the route intersected with the listener's; its
    /// supportedKinds is TLSRoute; the route is Accepted and counted as attached.
    #[test]
    fn tls_passthrough_listeners_serve_tls_routes_as_tls_tunnels() {
        let gw = tls_gateway_of(json!([
            {"name": "tls", "protocol": "TLS", "port": 443, "hostname": "*.example.com", "tls": {"mode": "Passthrough"}},
            {"name": "any", "protocol": "TLS", "port": 443, "tls": {"mode": "Passthrough"}}]));
        let services = [named_port_service("ns")];
        let pods = [pod_with_port("ns", "web-1", Some(8443))];
        let routes = [
            tls_route("secure", json!(["app.example.com", "other.org"]), Some("tls")),
            tls_route("plain", json!(["demo"]), Some("any")),
        ];
        let r = resolve(&[gw], &classes(), &routes, &[], &BTreeMap::new(), &Snapshot::new(&services, &pods));
        let key = ("ns".to_string(), "g".to_string());
        assert!(!r.listener_problems.contains_key(&key), "{:?}", r.listener_problems);
        let tls_kind = vec![RouteGroupKind { group: GROUP.into(), kind: TLS_ROUTE.into() }];
        assert_eq!(r.listener_kinds[&key]["tls"], tls_kind);
        assert_eq!((r.attached[&key]["tls"], r.attached[&key]["any"]), (1, 1));
        for name in ["secure", "plain"] {
            let st = &r.routes[&(TLS_ROUTE.to_string(), "ns".to_string(), name.to_string())][0];
            assert!(st.accepted.is_ok() && st.resolved_refs.is_ok(), "{name}: {st:?}");
        }
        let t = &r.tunnels[&("ns".into(), "web-1".into())];
        let got: Vec<(TunnelKind, Option<&str>, u16)> =
            t.iter().map(|t| (t.kind, t.host.as_deref(), t.target_port)).collect();
        assert_eq!(
            got,
            [(TunnelKind::Tls, Some("app.example.com"), 8443), (TunnelKind::Tls, Some("demo"), 8443)],
            "only the hostname the listener admits; other.org is not asked for"
        );
        assert!(crate::core::tunnel::TunnelsFile { tunnels: t.clone() }.validate().is_ok());
        // An HTTPRoute is not served on a TLS listener, nor a TLSRoute on an HTTPS one.
        let gw = tls_gateway_of(json!([
            {"name": "tls", "protocol": "TLS", "port": 443, "tls": {"mode": "Passthrough"}},
            {"name": "https", "protocol": "HTTPS", "port": 443, "tls": {"certificateRefs": [{"name": "c"}]}}]));
        let http = web_route("ns", "h", json!(["h"]));
        let r = resolve(
            &[gw],
            &classes(),
            &[http, tls_route("t", json!(["t"]), Some("https"))],
            &[],
            &BTreeMap::new(),
            &Snapshot::new(&services, &pods),
        );
        let t = &r.tunnels[&("ns".into(), "web-1".into())];
        assert_eq!(t.len(), 1, "{t:?}");
        assert_eq!((t[0].kind, t[0].host.as_deref()), (TunnelKind::Http, Some("h")));
        let st = &r.routes[&(TLS_ROUTE.to_string(), "ns".to_string(), "t".to_string())][0];
        assert_eq!(st.accepted.clone().unwrap_err().reason, route::NOT_ALLOWED_BY_LISTENERS);
    }

    /// Issue 14: TLS Terminate (said explicitly, or the API's default when only certificateRefs
    /// are given) is not served, with a reason that says what to change; a Passthrough listener
    /// on a port other than 443 is PortUnavailable. Routes still attach (and are counted), but
    /// get no tunnel.
    #[test]
    fn tls_terminate_and_other_ports_are_said_not_served() {
        let gw = tls_gateway_of(json!([
            {"name": "terminate", "protocol": "TLS", "port": 443, "tls": {"mode": "Terminate", "certificateRefs": [{"name": "c"}]}},
            {"name": "default", "protocol": "TLS", "port": 443, "tls": {"certificateRefs": [{"name": "c"}]}},
            {"name": "odd", "protocol": "TLS", "port": 8443, "tls": {"mode": "Passthrough"}}]));
        let services = [named_port_service("ns")];
        let pods = [pod_with_port("ns", "web-1", Some(8443))];
        let r = resolve(
            &[gw],
            &classes(),
            &[tls_route("t", json!(["t.example.com"]), None)],
            &[],
            &BTreeMap::new(),
            &Snapshot::new(&services, &pods),
        );
        let lp = &r.listener_problems[&("ns".into(), "g".into())];
        for l in ["terminate", "default"] {
            assert_eq!(lp[l][0].reason, listener::UNSUPPORTED_VALUE, "{l}");
            assert!(lp[l][0].message.contains("Passthrough"), "says the fix: {}", lp[l][0].message);
        }
        assert_eq!(lp["odd"][0].reason, listener::PORT_UNAVAILABLE);
        assert!(r.tunnels.is_empty(), "{:?}", r.tunnels);
        let st = &r.routes[&(TLS_ROUTE.to_string(), "ns".to_string(), "t".to_string())][0];
        assert!(st.accepted.is_ok(), "attached, though nothing is served: {st:?}");
        assert_eq!(r.attached[&("ns".into(), "g".into())].values().sum::<i32>(), 3);
    }

    /// Issue 14: a TLSRoute's name is one claim with an HTTP name (both are served on the
    /// server's HTTPS port): the older route keeps it.
    #[test]
    fn tls_and_http_routes_share_names() {
        let gw = tls_gateway_of(json!([
            {"name": "tls", "protocol": "TLS", "port": 443, "tls": {"mode": "Passthrough"}},
            {"name": "web", "protocol": "HTTP", "port": 80}]));
        let (tls, http) = (tls_route("t", json!(["shared"]), None), web_route("ns", "h", json!(["shared"])));
        let claims: Vec<Claim> = [&tls, &http]
            .iter()
            .flat_map(|route| {
                let r = resolve(
                    std::slice::from_ref(&gw),
                    &classes(),
                    std::slice::from_ref(*route),
                    &[],
                    &BTreeMap::new(),
                    &Snapshot::new(&[], &[]),
                );
                r.route_claims.into_values().flatten().map(|c| c.claim)
            })
            .collect();
        assert_eq!(claims, [Claim::Name("shared".into()), Claim::Name("shared".into())]);
    }

    /// Contract decision 7: the listener reasons resolution uses are the gateway-api crate's.
    #[test]
    fn listener_reasons_are_the_crates() {
        use gateway_api::apis::standard::constants::ListenerConditionReason as R;
        for (ours, theirs) in [
            (listener::PORT_UNAVAILABLE, R::PortUnavailable),
            (listener::UNSUPPORTED_PROTOCOL, R::UnsupportedProtocol),
            (listener::INVALID_CERTIFICATE_REF, R::InvalidCertificateRef),
            (listener::INVALID_ROUTE_KINDS, R::InvalidRouteKinds),
            (listener::REF_NOT_PERMITTED, R::RefNotPermitted),
        ] {
            assert_eq!(ours, theirs.to_string());
        }
    }
}
