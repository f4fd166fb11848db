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
use crate::resolve::gateway::ParentStatus;
use crate::resolve::ownership::{DOMAIN_NOT_ALLOWED, TUNNEL_CONFLICT};
use crate::resolve::{PodKey, Problem};

/// Route condition types and reasons (the gateway-api crate has constants for Gateways and
/// listeners only).
pub mod route {
    pub const ACCEPTED: &str = "Accepted";
    pub const RESOLVED_REFS: &str = "ResolvedRefs";
    pub const PARTIALLY_INVALID: &str = "PartiallyInvalid";
    pub const UNSUPPORTED_VALUE: &str = "UnsupportedValue";
}

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

/// An Ingress's `status.loadBalancer`: one hostname per published address.
pub fn ingress_status(addresses: &BTreeSet<String>) -> Value {
    let hosts: BTreeSet<String> = addresses.iter().map(|a| host_of(a)).collect();
    if hosts.is_empty() {
        return json!({"loadBalancer": {"ingress": null}});
    }
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

/// A GatewayClass of ours: Accepted.
pub fn gateway_class_status(generation: i64, existing: &Value, now: &str) -> Value {
    json!({"conditions": conditions(
        &[Cond::new(
            GatewayClassConditionType::Accepted,
            true,
            GatewayClassConditionReason::Accepted,
            "picotun serves Gateways of this class through SSH tunnels opened by sidecars in the backing pods",
        )],
        generation,
        &existing["conditions"],
        now,
    )})
}

/// Everything known about one listener, to build its status.
pub struct ListenerFacts<'a> {
    pub name: &'a str,
    pub protocol: &'a str,
    pub attached: i32,
    pub problems: &'a [Problem],
    pub addresses: BTreeSet<String>,
    /// Pods that should carry this listener's tunnels but have no sidecar.
    pub missing_sidecars: usize,
    /// The listener's own hostname or TCP port belongs to someone else (reason TunnelConflict).
    pub conflict: Option<&'a Problem>,
}

/// A Gateway's status: Accepted, Programmed, addresses (the hosts sidecars reported) and one
/// entry per listener.
pub fn gateway_status(listeners: &[ListenerFacts<'_>], generation: i64, existing: &Value, now: &str) -> Value {
    let old_listeners = existing["listeners"].as_array().cloned().unwrap_or_default();
    let mut all_addresses = BTreeSet::new();
    let mut listener_status = Vec::new();
    let mut valid = 0;
    let mut conflicted: Vec<&str> = Vec::new();
    for l in listeners {
        let old = old_listeners.iter().find(|o| o["name"] == l.name).cloned().unwrap_or(Value::Null);
        let kind = if l.protocol == "TCP" { "TCPRoute" } else { "HTTPRoute" };
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
        let programmed = if !accepted.ok {
            Cond::new(
                ListenerConditionType::Programmed,
                false,
                ListenerConditionReason::Invalid,
                accepted.message.clone(),
            )
        } else if let Some(c) = l.conflict {
            Cond::new(ListenerConditionType::Programmed, false, ListenerConditionReason::Invalid, c.message.clone())
        } else if l.attached == 0 {
            Cond::new(
                ListenerConditionType::Programmed,
                true,
                ListenerConditionReason::Programmed,
                "no route attached yet: nothing to publish",
            )
        } else if l.addresses.is_empty() {
            let why = if l.missing_sidecars > 0 {
                format!(
                    "{} backing pod(s) have no picotun sidecar: label their namespace tunnels.pico.sh/injection=enabled and restart them",
                    l.missing_sidecars
                )
            } else {
                "waiting for a sidecar to report the address the tunnel server assigned".to_string()
            };
            Cond::new(ListenerConditionType::Programmed, false, ListenerConditionReason::Pending, why)
        } else {
            let list: Vec<&str> = l.addresses.iter().map(String::as_str).collect();
            Cond::new(
                ListenerConditionType::Programmed,
                true,
                ListenerConditionReason::Programmed,
                format!("published at {}", list.join(", ")),
            )
        };
        all_addresses.extend(l.addresses.iter().map(|a| host_of(a)));
        let conds = [
            accepted,
            Cond::new(
                ListenerConditionType::ResolvedRefs,
                true,
                ListenerConditionReason::ResolvedRefs,
                "no references to resolve",
            ),
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
        listener_status.push(json!({
            "name": l.name,
            "supportedKinds": [{"group": "gateway.networking.k8s.io", "kind": kind}],
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
    let programmed = if !all_addresses.is_empty() {
        Cond::new(
            GatewayConditionType::Programmed,
            true,
            GatewayConditionReason::Programmed,
            "tunnels are open; status.addresses lists the public hosts",
        )
    } else {
        Cond::new(
            GatewayConditionType::Programmed,
            false,
            GatewayConditionReason::AddressNotAssigned,
            "no tunnel is open yet: see the listeners' Programmed conditions",
        )
    };
    let addresses: Vec<Value> = all_addresses.into_iter().map(|h| json!({"type": "Hostname", "value": h})).collect();
    json!({
        "addresses": if addresses.is_empty() { Value::Null } else { Value::Array(addresses) },
        "conditions": conditions(&[accepted, programmed], generation, &existing["conditions"], now),
        "listeners": listener_status,
    })
}

/// A route's `status.parents`: entries of other controllers kept, ours replaced.
pub fn route_parents(
    parents: &[ParentStatus],
    route_problems: &[Problem],
    controller_name: &str,
    generation: i64,
    existing: &Value,
    now: &str,
) -> Value {
    let old = existing["parents"].as_array().cloned().unwrap_or_default();
    let mut out: Vec<Value> = old.iter().filter(|p| p["controllerName"] != controller_name).cloned().collect();
    for p in parents {
        let mut parent_ref = json!({"group": "gateway.networking.k8s.io", "kind": "Gateway", "namespace": p.gateway.0, "name": p.gateway.1});
        if let Some(s) = &p.section {
            parent_ref["sectionName"] = json!(s);
        }
        let previous = old
            .iter()
            .find(|o| o["controllerName"] == controller_name && o["parentRef"] == parent_ref)
            .map(|o| o["conditions"].clone())
            .unwrap_or(Value::Null);
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
        out.push(json!({
            "parentRef": parent_ref,
            "controllerName": controller_name,
            "conditions": conditions(&conds, generation, &previous, now),
        }));
    }
    json!({"parents": out})
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

    #[test]
    fn gateway_status_reports_listeners_and_addresses() {
        let bad = [Problem { reason: "PortUnavailable", message: "listener x: port 8080".into() }];
        let listeners = [
            ListenerFacts {
                name: "web-test",
                protocol: "HTTP",
                attached: 1,
                problems: &[],
                addresses: BTreeSet::from(["https://alice-web-test.tuns.sh".to_string()]),
                missing_sidecars: 0,
                conflict: None,
            },
            ListenerFacts {
                name: "tcp",
                protocol: "TCP",
                attached: 1,
                problems: &[],
                addresses: BTreeSet::new(),
                missing_sidecars: 2,
                conflict: None,
            },
            ListenerFacts {
                name: "x",
                protocol: "HTTP",
                attached: 0,
                problems: &bad,
                addresses: BTreeSet::new(),
                missing_sidecars: 0,
                conflict: None,
            },
        ];
        let s = gateway_status(&listeners, 3, &Value::Null, "T");
        assert_eq!(s["addresses"], json!([{"type": "Hostname", "value": "alice-web-test.tuns.sh"}]));
        assert_eq!(s["conditions"][1]["type"], "Programmed");
        assert_eq!(s["conditions"][1]["status"], "True");
        assert_eq!(s["listeners"][1]["conditions"][2]["reason"], "Pending");
        assert!(s["listeners"][1]["conditions"][2]["message"].as_str().unwrap().contains("2 backing pod(s)"));
        assert_eq!(s["listeners"][2]["conditions"][0]["reason"], "PortUnavailable");
        assert_eq!(s["listeners"][0]["attachedRoutes"], 1);
    }

    #[test]
    fn route_parents_keep_other_controllers_entries() {
        let existing = json!({"parents": [
            {"controllerName": "example.com/other", "parentRef": {"name": "g2"}, "conditions": []},
            {"controllerName": "ours", "parentRef": {"name": "stale"}, "conditions": []},
        ]});
        let parents = [ParentStatus {
            gateway: ("ns".into(), "g".into()),
            section: Some("web".into()),
            accepted: Ok(()),
            resolved_refs: Err(Problem { reason: "BackendNotFound", message: "Service ns/x does not exist".into() }),
        }];
        let weights = [Problem { reason: "WeightsUnsupported", message: "weights".into() }];
        let s = route_parents(&parents, &weights, "ours", 1, &existing, "T");
        let list = s["parents"].as_array().unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0]["controllerName"], "example.com/other");
        assert_eq!(list[1]["parentRef"]["sectionName"], "web");
        assert_eq!(list[1]["conditions"][1]["reason"], "BackendNotFound");
        assert_eq!(list[1]["conditions"][2]["type"], "PartiallyInvalid");
    }
}
