//! Pure status builders: a cluster resolution plus what the sidecars reported, in; the status
//! documents for Ingresses, GatewayClasses, Gateways and routes, out. The writer patches only
//! those that differ from what the cache already shows.

use std::collections::{BTreeMap, BTreeSet};

use gateway_api::apis::experimental::constants::{
    GatewayClassConditionReason, GatewayClassConditionType, GatewayConditionReason, GatewayConditionType,
    ListenerConditionReason, ListenerConditionType,
};
use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::core::api;
use crate::resolve::gateway::{self, ParentRef, ParentStatus, RouteGroupKind, listener};
use crate::resolve::ownership::{DOMAIN_NOT_ALLOWED, TUNNEL_CONFLICT};
use crate::resolve::{PodKey, Problem};

/// Route condition types and reasons (resolve owns them; re-exported for the writers).
pub use crate::resolve::gateway::route;

/// What a sidecar says of one tunnel (the pod's `tunnels.pico.sh/addresses` annotation).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reported {
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub public_address: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct ReportDoc {
    #[serde(default)]
    tunnels: BTreeMap<String, Reported>,
}

/// The tunnels a pod's sidecar reported, by name (empty when it has not reported, or the
/// annotation does not parse).
pub fn reports_of(pod: &Pod) -> BTreeMap<String, Reported> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(api::ADDRESSES))
        .and_then(|v| serde_json::from_str::<ReportDoc>(v).ok())
        .map(|d| d.tunnels)
        .unwrap_or_default()
}

pub type Reports = BTreeMap<PodKey, BTreeMap<String, Reported>>;

/// Public addresses of `tunnels` that any of `pods` reported as established.
pub fn published<'a>(
    reports: &Reports,
    pods: impl IntoIterator<Item = &'a PodKey>,
    tunnels: &BTreeSet<String>,
) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for pod in pods {
        let Some(r) = reports.get(pod) else { continue };
        for name in tunnels {
            if let Some(Reported { state, public_address: Some(a) }) = r.get(name)
                && state == "established"
            {
                out.insert(a.clone());
            }
        }
    }
    out
}

/// The host of a public address: `https://a-demo.tuns.sh` -> `a-demo.tuns.sh`,
/// `nue.tuns.sh:59123` -> `nue.tuns.sh`.
pub fn host_of(address: &str) -> String {
    let rest = address.split_once("://").map_or(address, |(_, r)| r);
    let rest = rest.split('/').next().unwrap_or(rest);
    match rest.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host.to_string(),
        _ => rest.to_string(),
    }
}

/// An Ingress's `status` (`{"loadBalancer": {"ingress": [{"hostname": ..}, ..]}}`): one hostname
/// per published address, `[]` when none (an empty list, not null, so that the document is also a
/// server-side-apply body).
pub fn ingress_status(addresses: &BTreeSet<String>) -> Value {
    let hosts: BTreeSet<String> = addresses.iter().map(|a| host_of(a)).collect();
    json!({"loadBalancer": {"ingress": hosts.into_iter().map(|h| json!({"hostname": h})).collect::<Vec<_>>()}})
}

/// One condition to set.
#[derive(Clone, Debug)]
pub struct Cond {
    pub type_: String,
    pub ok: bool,
    pub reason: String,
    pub message: String,
}

impl Cond {
    pub fn new(type_: impl ToString, ok: bool, reason: impl ToString, message: impl Into<String>) -> Cond {
        Cond { type_: type_.to_string(), ok, reason: reason.to_string(), message: message.into() }
    }
}

/// metav1.Conditions, keeping each one's lastTransitionTime while its status stays the same.
pub fn conditions(wanted: &[Cond], generation: i64, existing: &Value, now: &str) -> Value {
    Value::Array(
        wanted
            .iter()
            .map(|c| {
                let status = if c.ok { "True" } else { "False" };
                let since = existing
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|e| e["type"] == c.type_.as_str() && e["status"] == status)
                    .and_then(|e| e["lastTransitionTime"].as_str())
                    .unwrap_or(now);
                json!({
                    "type": c.type_, "status": status, "reason": c.reason,
                    "message": truncate(&c.message), "observedGeneration": generation, "lastTransitionTime": since,
                })
            })
            .collect(),
    )
}

/// Condition messages are limited to 32 KiB by the API; stay far below.
fn truncate(s: &str) -> String {
    if s.len() <= 1024 {
        return s.to_string();
    }
    let mut end = 1024;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

fn messages(problems: &[Problem]) -> String {
    problems.iter().map(|p| p.message.as_str()).collect::<Vec<_>>().join("; ")
}

/// A GatewayClass of ours: Accepted; with a parametersRef that gives no server options,
/// Accepted=False InvalidParameters saying why (its Gateways are still served, without them).
pub fn gateway_class_status(generation: i64, existing: &Value, now: &str, parameters: Option<&Problem>) -> Value {
    let accepted = match parameters {
        None => Cond::new(
            GatewayClassConditionType::Accepted,
            true,
            GatewayClassConditionReason::Accepted,
            "picotun serves Gateways of this class through SSH tunnels opened by sidecars in the backing pods",
        ),
        Some(p) => Cond::new(
            GatewayClassConditionType::Accepted,
            false,
            GatewayClassConditionReason::InvalidParameters,
            format!("{}; its Gateways are served without these server options", p.message),
        ),
    };
    json!({"conditions": conditions(&[accepted], generation, &existing["conditions"], now)})
}

/// Everything known about one listener, to build its status.
#[derive(Default)]
pub struct ListenerFacts<'a> {
    pub name: &'a str,
    pub protocol: &'a str,
    pub attached: i32,
    /// Why the listener is not Accepted (GatewayResolution::listener_problems).
    pub problems: &'a [Problem],
    /// References that do not resolve (GatewayResolution::listener_refs): ResolvedRefs=False.
    pub refs: &'a [Problem],
    /// The route kinds it serves (GatewayResolution::listener_kinds).
    pub supported_kinds: &'a [RouteGroupKind],
    pub addresses: BTreeSet<String>,
    /// Pods that should carry this listener's tunnels but have no sidecar.
    pub missing_sidecars: usize,
    /// The listener's own hostname or TCP port belongs to someone else (reason TunnelConflict).
    pub conflict: Option<&'a Problem>,
}

/// A listener's Programmed condition, per the contract: True once its tunnels are handed to the
/// backing pods (every one of them carries the sidecar) or there is nothing to hand; the message
/// says what is still awaited. Not served (not Accepted, certificateRefs that do not resolve, a
/// hostname or port someone else owns): False, Invalid.
fn listener_programmed(l: &ListenerFacts<'_>, accepted: &Cond) -> Cond {
    let t = ListenerConditionType::Programmed;
    let certificates = [listener::INVALID_CERTIFICATE_REF, listener::REF_NOT_PERMITTED];
    if !accepted.ok {
        return Cond::new(t, false, ListenerConditionReason::Invalid, accepted.message.clone());
    }
    if let Some(p) = l.refs.iter().find(|p| certificates.contains(&p.reason)) {
        return Cond::new(t, false, ListenerConditionReason::Invalid, p.message.clone());
    }
    if let Some(c) = l.conflict {
        return Cond::new(t, false, ListenerConditionReason::Invalid, c.message.clone());
    }
    if l.missing_sidecars > 0 {
        return Cond::new(
            t,
            false,
            ListenerConditionReason::Pending,
            format!(
                "{} backing pod(s) have no picotun sidecar: label their namespace tunnels.pico.sh/injection=enabled and restart them",
                l.missing_sidecars
            ),
        );
    }
    let message = if l.attached == 0 {
        "no route attached yet: nothing to publish".to_string()
    } else if l.addresses.is_empty() {
        "the tunnels are handed to the backing pods; no sidecar has reported an address yet".to_string()
    } else {
        let list: Vec<&str> = l.addresses.iter().map(String::as_str).collect();
        format!("published at {}", list.join(", "))
    };
    Cond::new(t, true, ListenerConditionReason::Programmed, message)
}

/// A Gateway's `status`: `{"addresses": [{"type": "Hostname", "value": ..}, ..], "conditions":
/// [Accepted, Programmed], "listeners": [{"name", "supportedKinds", "attachedRoutes",
/// "conditions": [Accepted, ResolvedRefs, Programmed, Conflicted]}, ..]}`. Addresses are the hosts
/// sidecars reported (`[]` until then). Every condition carries `generation`. Usable as a
/// server-side-apply body (no nulls).
pub fn gateway_status(listeners: &[ListenerFacts<'_>], generation: i64, existing: &Value, now: &str) -> Value {
    gateway_status_with(listeners, None, generation, existing, now)
}

/// [`gateway_status`], with why the Gateway's `infrastructure.parametersRef` gives no server
/// options: Accepted=False InvalidParameters naming the bad key -- its tunnels are still
/// handed out (without those options), so Programmed says how far they are.
pub fn gateway_status_with(
    listeners: &[ListenerFacts<'_>],
    parameters: Option<&Problem>,
    generation: i64,
    existing: &Value,
    now: &str,
) -> Value {
    let old_listeners = existing["listeners"].as_array().cloned().unwrap_or_default();
    let mut all_addresses = BTreeSet::new();
    let mut listener_status = Vec::new();
    let mut valid = 0;
    let mut conflicted: Vec<&str> = Vec::new();
    let mut pending: Vec<(&str, usize)> = Vec::new();
    for l in listeners {
        let old = old_listeners.iter().find(|o| o["name"] == l.name).cloned().unwrap_or(Value::Null);
        let accepted = match l.problems.first() {
            None => {
                valid += 1;
                Cond::new(ListenerConditionType::Accepted, true, ListenerConditionReason::Accepted, "served by picotun")
            }
            Some(p) => Cond::new(ListenerConditionType::Accepted, false, p.reason, messages(l.problems)),
        };
        if accepted.ok && l.conflict.is_some() {
            conflicted.push(l.name);
        }
        let programmed = listener_programmed(l, &accepted);
        if accepted.ok && !programmed.ok && programmed.reason == ListenerConditionReason::Pending.to_string() {
            pending.push((l.name, l.missing_sidecars));
        }
        all_addresses.extend(l.addresses.iter().map(|a| host_of(a)));
        let resolved_refs = match l.refs.first() {
            None => Cond::new(
                ListenerConditionType::ResolvedRefs,
                true,
                ListenerConditionReason::ResolvedRefs,
                "every reference resolves",
            ),
            Some(p) => Cond::new(ListenerConditionType::ResolvedRefs, false, p.reason, messages(l.refs)),
        };
        let conds = [
            accepted,
            resolved_refs,
            programmed,
            match l.conflict {
                None => Cond::new(
                    ListenerConditionType::Conflicted,
                    false,
                    ListenerConditionReason::NoConflicts,
                    "no conflicts",
                ),
                Some(c) => Cond::new(ListenerConditionType::Conflicted, true, c.reason, c.message.clone()),
            },
        ];
        let kinds: Vec<Value> = l.supported_kinds.iter().map(|k| json!({"group": k.group, "kind": k.kind})).collect();
        listener_status.push(json!({
            "name": l.name,
            "supportedKinds": kinds,
            "attachedRoutes": l.attached,
            "conditions": conditions(&conds, generation, &old["conditions"], now),
        }));
    }
    let accepted = if !conflicted.is_empty() {
        // The Gateway API: ListenersNotValid on the Gateway while any listener is Conflicted,
        // Accepted as long as one is served.
        Cond::new(
            GatewayConditionType::Accepted,
            valid > conflicted.len(),
            GatewayConditionReason::ListenersNotValid,
            format!(
                "listener(s) {} are Conflicted: their hostname or port belongs to another claimant (see their conditions)",
                conflicted.join(", ")
            ),
        )
    } else if valid > 0 || listeners.is_empty() {
        Cond::new(GatewayConditionType::Accepted, true, GatewayConditionReason::Accepted, "accepted by picotun")
    } else {
        Cond::new(
            GatewayConditionType::Accepted,
            false,
            GatewayConditionReason::ListenersNotValid,
            "no listener can be served: see the listeners' conditions",
        )
    };
    let programmed = if !accepted.ok {
        Cond::new(
            GatewayConditionType::Programmed,
            false,
            GatewayConditionReason::Invalid,
            "the Gateway is not Accepted: see its Accepted condition",
        )
    } else if !pending.is_empty() {
        let pods: usize = pending.iter().map(|(_, n)| n).sum();
        let names: Vec<&str> = pending.iter().map(|(n, _)| *n).collect();
        Cond::new(
            GatewayConditionType::Programmed,
            false,
            GatewayConditionReason::Pending,
            format!(
                "waiting for {pods} backing pod(s) without the picotun sidecar (listener(s) {}): see the listeners' Programmed conditions",
                names.join(", ")
            ),
        )
    } else if all_addresses.is_empty() {
        let attached: i32 = listeners.iter().map(|l| l.attached).sum();
        Cond::new(
            GatewayConditionType::Programmed,
            true,
            GatewayConditionReason::Programmed,
            if attached == 0 {
                "no route attached yet: nothing to publish"
            } else {
                "the tunnels are handed to the backing pods; no sidecar has reported an address yet (status.addresses fills as they do)"
            },
        )
    } else {
        Cond::new(
            GatewayConditionType::Programmed,
            true,
            GatewayConditionReason::Programmed,
            "tunnels are open; status.addresses lists the public hosts",
        )
    };
    let accepted = match parameters {
        Some(p) => Cond::new(
            GatewayConditionType::Accepted,
            false,
            GatewayConditionReason::InvalidParameters,
            format!("{}; its tunnels open without these server options", p.message),
        ),
        None => accepted,
    };

    let addresses: Vec<Value> = all_addresses.into_iter().map(|h| json!({"type": "Hostname", "value": h})).collect();
    json!({
        "addresses": addresses,
        "conditions": conditions(&[accepted, programmed], generation, &existing["conditions"], now),
        "listeners": listener_status,
    })
}

/// A parentRef as status writes it: every field the route's parentRef had (group and kind are
/// defaulted by the CRD, so they are always there).
pub fn parent_ref_json(p: &ParentRef) -> Value {
    let mut out = json!({
        "group": p.group.as_deref().unwrap_or(gateway::GROUP),
        "kind": p.kind.as_deref().unwrap_or("Gateway"),
        "name": p.name,
    });
    if let Some(ns) = &p.namespace {
        out["namespace"] = json!(ns);
    }
    if let Some(s) = &p.section {
        out["sectionName"] = json!(s);
    }
    if let Some(port) = p.port {
        out["port"] = json!(port);
    }
    out
}

/// picotun's entries of a route's `status.parents`, one per parentRef to a Gateway of ours:
/// `{"parentRef": {..as the route wrote it..}, "controllerName": .., "conditions": [Accepted,
/// ResolvedRefs, PartiallyInvalid?]}`, each condition at `generation` and `now` (merge keeps the
/// times of conditions that did not change: [`merge_route_parents`]).
pub fn route_parents(
    parents: &[ParentStatus],
    route_problems: &[Problem],
    controller_name: &str,
    generation: i64,
    now: &str,
) -> Vec<Value> {
    let mut out = Vec::new();
    for p in parents {
        let mut conds = vec![
            match &p.accepted {
                Ok(()) => Cond::new(route::ACCEPTED, true, route::ACCEPTED, "attached"),
                Err(e) => Cond::new(route::ACCEPTED, false, e.reason, e.message.clone()),
            },
            match &p.resolved_refs {
                Ok(()) => Cond::new(route::RESOLVED_REFS, true, route::RESOLVED_REFS, "every backendRef resolves"),
                Err(e) => Cond::new(route::RESOLVED_REFS, false, e.reason, e.message.clone()),
            },
        ];
        if let Some(first) = route_problems.first() {
            // Names this route lost to their owners (or the allow-list refused) say so; anything
            // else is a value the tunnel server cannot honour.
            let ownership = [TUNNEL_CONFLICT, DOMAIN_NOT_ALLOWED];
            let reason = if route_problems.iter().all(|p| p.reason == first.reason) && ownership.contains(&first.reason)
            {
                first.reason
            } else {
                route::UNSUPPORTED_VALUE
            };
            conds.push(Cond::new(route::PARTIALLY_INVALID, true, reason, messages(route_problems)));
        }
        let entry = json!({
            "parentRef": parent_ref_json(&p.parent_ref),
            "controllerName": controller_name,
            "conditions": conditions(&conds, generation, &Value::Null, now),
        });
        // A route naming one parent twice gets one entry.
        if !out.iter().any(|o: &Value| o["parentRef"] == entry["parentRef"]) {
            out.push(entry);
        }
    }
    out
}

/// The parentRef fields that identify a parent, defaults filled (an entry written by another
/// version may spell the defaults out or leave them away).
fn same_parent(a: &Value, b: &Value) -> bool {
    let norm = |v: &Value| {
        (
            v["group"].as_str().unwrap_or(gateway::GROUP).to_string(),
            v["kind"].as_str().unwrap_or("Gateway").to_string(),
            v["namespace"].as_str().map(str::to_string),
            v["name"].as_str().map(str::to_string),
            v["sectionName"].as_str().map(str::to_string),
            v["port"].as_i64(),
        )
    };
    norm(a) == norm(b)
}

/// A route's new `status` from a fresh read of it (`fresh_status`: the route's `status`, from a
/// GET, not the cache) and picotun's entries (`ours`, from [`route_parents`]): every entry of
/// another controller kept as it is, in its place; ours replaced by `ours` (a parent no longer
/// attached loses its entry); the lastTransitionTime of a condition whose status did not change
/// kept. Returns the whole `status` document (`{"parents": [..], ..every other field of
/// fresh_status..}`), to be written with the fresh resourceVersion (`status.parents` is atomic).
pub fn merge_route_parents(fresh_status: &Value, ours: Vec<Value>, controller_name: &str) -> Value {
    let old = fresh_status["parents"].as_array().cloned().unwrap_or_default();
    let mut parents: Vec<Value> = old.iter().filter(|p| p["controllerName"] != controller_name).cloned().collect();
    for mut entry in ours {
        let previous = old
            .iter()
            .find(|o| o["controllerName"] == controller_name && same_parent(&o["parentRef"], &entry["parentRef"]));
        if let (Some(previous), Some(conds)) = (previous, entry["conditions"].as_array_mut()) {
            for c in conds {
                let since = previous["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|e| e["type"] == c["type"] && e["status"] == c["status"])
                    .and_then(|e| e["lastTransitionTime"].as_str());
                if let Some(since) = since {
                    c["lastTransitionTime"] = json!(since);
                }
            }
        }
        parents.push(entry);
    }
    // The API allows 32 parents per route.
    parents.truncate(32);
    let mut out = match fresh_status {
        Value::Object(_) => fresh_status.clone(),
        _ => json!({}),
    };
    out["parents"] = Value::Array(parents);
    out
}

/// True when every field `want` sets already has that value in `have` (arrays compared whole,
/// element by element; null means absent or empty). Lets the writer skip patches that change
/// nothing.
pub fn already(want: &Value, have: &Value) -> bool {
    match (want, have) {
        (Value::Null, Value::Null) => true,
        (Value::Null, Value::Array(a)) => a.is_empty(),
        (Value::Null, _) => false,
        (Value::Object(w), Value::Object(h)) => w.iter().all(|(k, v)| already(v, h.get(k).unwrap_or(&Value::Null))),
        (Value::Object(w), Value::Null) => w.values().all(|v| already(v, &Value::Null)),
        (Value::Array(w), Value::Array(h)) => w.len() == h.len() && w.iter().zip(h).all(|(a, b)| already(a, b)),
        (Value::Array(w), Value::Null) => w.is_empty(),
        (w, h) => w == h,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_of_addresses() {
        assert_eq!(host_of("https://alice-demo.tuns.sh"), "alice-demo.tuns.sh");
        assert_eq!(host_of("http://app.sandhole.test:44811"), "app.sandhole.test");
        assert_eq!(host_of("nue.tuns.sh:59123"), "nue.tuns.sh");
        assert_eq!(host_of("app.example.com"), "app.example.com");
    }

    #[test]
    fn ingress_status_lists_reported_hosts_or_clears() {
        let a = BTreeSet::from(["https://alice-demo.tuns.sh".to_string()]);
        assert_eq!(ingress_status(&a), json!({"loadBalancer": {"ingress": [{"hostname": "alice-demo.tuns.sh"}]}}));
        let empty = ingress_status(&BTreeSet::new());
        assert!(already(&empty, &json!({"loadBalancer": {}})));
        assert!(!already(&empty, &json!({"loadBalancer": {"ingress": [{"hostname": "x"}]}})));
    }

    #[test]
    fn condition_times_stay_while_status_does() {
        let first = conditions(&[Cond::new("Accepted", true, "Accepted", "ok")], 1, &Value::Null, "T1");
        let again = conditions(&[Cond::new("Accepted", true, "Accepted", "ok")], 2, &first, "T2");
        assert_eq!(again[0]["lastTransitionTime"], "T1");
        assert_eq!(again[0]["observedGeneration"], 2);
        let flipped = conditions(&[Cond::new("Accepted", false, "Nope", "no")], 2, &first, "T3");
        assert_eq!(flipped[0]["lastTransitionTime"], "T3");
        assert!(already(&again, &again.clone()));
        assert!(!already(&again, &first), "observedGeneration changed");
    }

    #[test]
    fn published_takes_only_established_tunnels_of_the_given_pods() {
        let mut reports = Reports::new();
        let p1 = ("ns".to_string(), "p1".to_string());
        let p2 = ("ns".to_string(), "p2".to_string());
        reports.insert(
            p1.clone(),
            BTreeMap::from([(
                "t".to_string(),
                Reported { state: "established".into(), public_address: Some("https://a-demo.tuns.sh".into()) },
            )]),
        );
        reports.insert(
            p2.clone(),
            BTreeMap::from([("t".to_string(), Reported { state: "connecting".into(), public_address: None })]),
        );
        let names = BTreeSet::from(["t".to_string()]);
        assert_eq!(published(&reports, [&p1, &p2], &names).len(), 1);
        assert!(published(&reports, [&p2], &names).is_empty());
    }

    fn http_kinds() -> Vec<RouteGroupKind> {
        vec![RouteGroupKind { group: gateway::GROUP.into(), kind: "HTTPRoute".into() }]
    }

    #[test]
    fn gateway_status_reports_listeners_and_addresses() {
        let bad = [Problem { reason: "PortUnavailable", message: "listener x: port 8080".into() }];
        let kinds = http_kinds();
        let listeners = [
            ListenerFacts {
                name: "web-test",
                protocol: "HTTP",
                attached: 1,
                supported_kinds: &kinds,
                addresses: BTreeSet::from(["https://alice-web-test.tuns.sh".to_string()]),
                ..Default::default()
            },
            ListenerFacts { name: "tcp", protocol: "TCP", attached: 1, missing_sidecars: 2, ..Default::default() },
            ListenerFacts { name: "x", protocol: "HTTP", problems: &bad, ..Default::default() },
        ];
        let s = gateway_status(&listeners, 3, &Value::Null, "T");
        assert_eq!(s["addresses"], json!([{"type": "Hostname", "value": "alice-web-test.tuns.sh"}]));
        assert_eq!(s["conditions"][1]["type"], "Programmed");
        assert_eq!(s["conditions"][1]["status"], "False", "the tcp listener's pods lack the sidecar: {s}");
        assert_eq!(s["conditions"][1]["reason"], "Pending");
        assert_eq!(s["listeners"][1]["conditions"][2]["reason"], "Pending");
        assert!(s["listeners"][1]["conditions"][2]["message"].as_str().unwrap().contains("2 backing pod(s)"));
        assert_eq!(s["listeners"][2]["conditions"][0]["reason"], "PortUnavailable");
        assert_eq!(s["listeners"][2]["conditions"][2]["reason"], "Invalid");
        assert_eq!(s["listeners"][0]["attachedRoutes"], 1);
        assert_eq!(
            s["listeners"][0]["supportedKinds"],
            json!([{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute"}])
        );
    }

    /// Contract decision 2 (issue 12, conformance: GatewayObservedGenerationBump, the suite's
    /// Setup): a Gateway whose tunnels are handed to pods that all carry the sidecar is
    /// Programmed before any sidecar reports an address (before: False AddressNotAssigned), and
    /// one with no routes is Programmed; addresses stay `[]` until reported; every condition of
    /// the Gateway and its listeners carries the current generation.
    #[test]
    fn a_gateway_is_programmed_once_its_tunnels_are_handed_out() {
        let kinds = http_kinds();
        let waiting = [ListenerFacts {
            name: "web",
            protocol: "HTTP",
            attached: 1,
            supported_kinds: &kinds,
            ..Default::default()
        }];
        let s = gateway_status(&waiting, 7, &Value::Null, "T");
        assert_eq!(s["conditions"][1]["status"], "True", "{s}");
        assert_eq!(s["conditions"][1]["reason"], "Programmed");
        assert!(s["conditions"][1]["message"].as_str().unwrap().contains("no sidecar has reported"), "{s}");
        assert_eq!(s["listeners"][0]["conditions"][2]["status"], "True");
        assert_eq!(s["addresses"], json!([]), "an empty list, not null: the document is an apply body");
        let empty = [ListenerFacts { name: "web", protocol: "HTTP", supported_kinds: &kinds, ..Default::default() }];
        let s2 = gateway_status(&empty, 8, &s, "T2");
        assert_eq!(s2["conditions"][1]["status"], "True");
        let mut all = s2["conditions"].as_array().unwrap().clone();
        all.extend(s2["listeners"][0]["conditions"].as_array().unwrap().iter().cloned());
        assert_eq!(all.len(), 6);
        assert!(all.iter().all(|c| c["observedGeneration"] == 8), "{all:?}");
        assert!(!status_has_null(&s2), "{s2}");
    }

    fn status_has_null(v: &Value) -> bool {
        match v {
            Value::Null => true,
            Value::Array(a) => a.iter().any(status_has_null),
            Value::Object(o) => o.values().any(status_has_null),
            _ => false,
        }
    }

    /// Issue 12, defect 7 / contract decisions 5 and 6 (conformance GatewayInvalidRouteKind,
    /// GatewaySecret*ReferenceGrant): listener references that do not resolve are
    /// ResolvedRefs=False with the resolver's reason (before: always True); supportedKinds lists
    /// only the kinds served (`[]` when none); a certificateRef that does not resolve leaves the
    /// listener Programmed=False Invalid.
    #[test]
    fn listener_refs_set_resolved_refs_and_supported_kinds() {
        let kinds_problem = [Problem { reason: listener::INVALID_ROUTE_KINDS, message: "kinds".into() }];
        let cert_problem = [Problem { reason: listener::REF_NOT_PERMITTED, message: "secret".into() }];
        let kinds = http_kinds();
        let listeners = [
            ListenerFacts { name: "only-invalid", protocol: "HTTP", refs: &kinds_problem, ..Default::default() },
            ListenerFacts {
                name: "https",
                protocol: "HTTPS",
                refs: &cert_problem,
                supported_kinds: &kinds,
                ..Default::default()
            },
        ];
        let s = gateway_status(&listeners, 1, &Value::Null, "T");
        let l0 = &s["listeners"][0];
        assert_eq!(l0["supportedKinds"], json!([]));
        assert_eq!(
            (l0["conditions"][1]["type"].as_str(), l0["conditions"][1]["status"].as_str()),
            (Some("ResolvedRefs"), Some("False"))
        );
        assert_eq!(l0["conditions"][1]["reason"], "InvalidRouteKinds");
        assert_eq!(l0["conditions"][2]["status"], "True", "route kinds alone do not stop the listener");
        let l1 = &s["listeners"][1];
        assert_eq!(l1["conditions"][1]["reason"], "RefNotPermitted");
        assert_eq!(
            (l1["conditions"][2]["status"].as_str(), l1["conditions"][2]["reason"].as_str()),
            (Some("False"), Some("Invalid"))
        );
    }

    fn parent(section: Option<&str>, port: Option<i32>) -> ParentStatus {
        ParentStatus {
            gateway: ("ns".into(), "g".into()),
            parent_ref: ParentRef {
                group: Some(gateway::GROUP.into()),
                kind: Some("Gateway".into()),
                namespace: None,
                name: "g".into(),
                section: section.map(str::to_string),
                port,
            },
            accepted: Ok(()),
            resolved_refs: Err(Problem { reason: "BackendNotFound", message: "Service ns/x does not exist".into() }),
        }
    }

    /// Issue 12, defect 6: picotun's route parent entries copy the route's parentRef whole
    /// (before: `port` was dropped and a namespace the route left out was added), and only
    /// picotun's own entries are produced.
    #[test]
    fn route_parents_are_ours_with_the_parent_ref_whole() {
        let weights = [Problem { reason: "WeightsUnsupported", message: "weights".into() }];
        let list = route_parents(&[parent(Some("web"), Some(443))], &weights, "ours", 1, "T");
        assert_eq!(list.len(), 1);
        assert_eq!(
            list[0]["parentRef"],
            json!({"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "g", "sectionName": "web", "port": 443})
        );
        assert_eq!(list[0]["controllerName"], "ours");
        assert_eq!(list[0]["conditions"][1]["reason"], "BackendNotFound");
        assert_eq!(list[0]["conditions"][2]["type"], "PartiallyInvalid");
        assert!(list[0]["conditions"].as_array().unwrap().iter().all(|c| c["observedGeneration"] == 1));
    }

    /// Issue 12, defect 6 / contract decision 8: merging into a fresh read keeps other
    /// controllers' entries untouched and in place, replaces ours, drops ours whose parentRef is
    /// no longer attached (before: never removed), keeps the lastTransitionTime of conditions
    /// whose status did not change, and keeps the status's other fields.
    #[test]
    fn merge_route_parents_replaces_only_ours() {
        let theirs = json!({"controllerName": "example.com/other", "parentRef": {"name": "g2"},
            "conditions": [{"type": "Accepted", "status": "True", "lastTransitionTime": "T0"}]});
        let fresh = json!({"parents": [
            theirs,
            {"controllerName": "ours", "parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "stale"}, "conditions": []},
            {"controllerName": "ours", "parentRef": {"name": "g", "sectionName": "web", "port": 443}, "conditions": [
                {"type": "Accepted", "status": "True", "reason": "Accepted", "lastTransitionTime": "T1"},
                {"type": "ResolvedRefs", "status": "True", "reason": "ResolvedRefs", "lastTransitionTime": "T1"}]},
        ], "futureField": 1});
        let ours = route_parents(&[parent(Some("web"), Some(443))], &[], "ours", 2, "T2");
        let s = merge_route_parents(&fresh, ours, "ours");
        let list = s["parents"].as_array().unwrap();
        assert_eq!(list.len(), 2, "{s}");
        assert_eq!(list[0], theirs, "another controller's entry, untouched");
        assert_eq!(list[1]["parentRef"]["name"], "g");
        assert_eq!(list[1]["conditions"][0]["lastTransitionTime"], "T1", "Accepted stayed True");
        assert_eq!(list[1]["conditions"][1]["lastTransitionTime"], "T2", "ResolvedRefs became False");
        assert_eq!(list[1]["conditions"][0]["observedGeneration"], 2);
        assert_eq!(s["futureField"], 1);
        // Detached from every Gateway of ours: only the other controller's entry stays.
        let s = merge_route_parents(&fresh, Vec::new(), "ours");
        assert_eq!(s["parents"], json!([theirs]));
        assert_eq!(merge_route_parents(&Value::Null, Vec::new(), "ours"), json!({"parents": []}));
    }

    /// Issue 14: a parametersRef that gives no server options is Accepted=False
    /// InvalidParameters on the GatewayClass and on the Gateway, with the message naming the key;
    /// the Gateway's Programmed still says how far its tunnels are.
    #[test]
    fn invalid_parameters_are_said_on_the_class_and_the_gateway() {
        let p = Problem { reason: "InvalidParameters", message: "ConfigMap a/b: option \"x\" is not one".into() };
        let s = gateway_class_status(1, &Value::Null, "2026-01-01T00:00:00Z", Some(&p));
        assert_eq!(s["conditions"][0]["status"], "False");
        assert_eq!(s["conditions"][0]["reason"], "InvalidParameters");
        assert!(s["conditions"][0]["message"].as_str().unwrap().contains("\"x\""), "{s}");
        let kinds = vec![RouteGroupKind { group: gateway::GROUP.into(), kind: "TCPRoute".into() }];
        let l = [ListenerFacts {
            name: "tcp",
            protocol: "TCP",
            attached: 1,
            supported_kinds: &kinds,
            ..Default::default()
        }];
        let s = gateway_status_with(&l, Some(&p), 1, &Value::Null, "2026-01-01T00:00:00Z");
        assert_eq!(
            (s["conditions"][0]["type"].as_str(), s["conditions"][0]["reason"].as_str()),
            (Some("Accepted"), Some("InvalidParameters"))
        );
        assert_eq!(s["conditions"][1]["status"], "True", "the tunnels are still handed out: {s}");
    }
}
