//! The labels and annotations users and picotun put on objects, with typed parsers whose errors
//! say what to fix.

use crate::core::tunnel::{TunnelKind, TunnelSpec, TunnelsFile};

/// Namespace label: `enabled` opts the namespace in (the webhook's namespaceSelector).
pub const NAMESPACE_INJECTION_LABEL: &str = "tunnels.pico.sh/injection";
/// Pod (template) or workload label or annotation: `"true"` opts in, `"false"` opts out (and wins).
pub const INJECT: &str = "tunnels.pico.sh/inject";
/// Pod (template) or workload annotation exposing the pod without a route, e.g.
/// `http:demo=8080, tcp:5432=postgres` (see [`parse_expose`]).
pub const EXPOSE: &str = "tunnels.pico.sh/expose";
/// Pod annotation holding the tunnels file (JSON) the sidecar reads through the downward API.
/// Written by the webhook, later kept up to date by the controller.
pub const TUNNELS: &str = "tunnels.pico.sh/tunnels";
/// Pod annotation recording what was injected (JSON), so injection is idempotent.
pub const STATUS: &str = "tunnels.pico.sh/status";
/// Pod annotation with the public addresses the pod's sidecar reported, as compact JSON:
/// `{"tunnels":{"web":{"state":"established","publicAddress":"https://..."}}}`. Written by the
/// webhook's `/report` endpoint (the agent has no Kubernetes access); the controller reads it
/// from its pod cache into Ingress and Gateway status.
pub const ADDRESSES: &str = "tunnels.pico.sh/addresses";
/// Pod annotation: the webhook's injection ticket, `v1.<base64url HMAC-SHA256>` over the pod's
/// namespace, service account and `picotun-agent` container (see `webhook::ticket`). Written only
/// by the webhook at admission; `/report` and `/certificate` accept a pod only if it verifies.
pub const INJECTED: &str = "tunnels.pico.sh/injected";
/// Pod (template) annotation, opt-in: `"true"` holds the app until every tunnel is established
/// (the sidecar gets a startupProbe on the agent's `/tunnels-up`; native sidecars only).
pub const STARTUP_GATE: &str = "tunnels.pico.sh/startup-gate";
/// Pod annotation naming the Secret with the SSH key (default [`DEFAULT_KEY_SECRET`]).
pub const KEY_SECRET: &str = "tunnels.pico.sh/key-secret";
pub const DEFAULT_KEY_SECRET: &str = "picotun-ssh-key";
/// The key Secret a pod's annotations name ([`KEY_SECRET`]), or the default -- also when the
/// annotation is not a Secret name, which would have the apiserver refuse the pod's volume: then
/// with the warning that says so.
pub fn key_secret(annotations: Option<&std::collections::BTreeMap<String, String>>) -> (String, Option<String>) {
    match annotations.and_then(|a| a.get(KEY_SECRET)) {
        None => (DEFAULT_KEY_SECRET.to_string(), None),
        Some(v) if crate::core::tunnel::is_dns_name(v.trim()) => (v.trim().to_string(), None),
        Some(v) => (
            DEFAULT_KEY_SECRET.to_string(),
            Some(format!(
                "{KEY_SECRET}: {v:?} is not a Secret name (lower-case letters, digits, '-' and '.'); using \
                 {DEFAULT_KEY_SECRET}"
            )),
        ),
    }
}
/// The key inside that Secret (the `kubernetes.io/ssh-auth` Secret type's key).
pub const KEY_SECRET_KEY: &str = "ssh-privatekey";
/// Per-pod sidecar resource overrides (Kubernetes quantities).
pub const CPU_REQUEST: &str = "tunnels.pico.sh/sidecar-cpu-request";
pub const MEMORY_REQUEST: &str = "tunnels.pico.sh/sidecar-memory-request";
pub const CPU_LIMIT: &str = "tunnels.pico.sh/sidecar-cpu-limit";
pub const MEMORY_LIMIT: &str = "tunnels.pico.sh/sidecar-memory-limit";
/// Per-pod sidecar log filter.
pub const LOG_LEVEL: &str = "tunnels.pico.sh/log-level";
/// Pod (template) annotation: the sidecar's admin port (1-65535) for this pod, when the app (or
/// another sidecar) already uses the default. The container port, the agent's address and the
/// probes follow it; a bad value is a warning and the default is used.
pub const ADMIN_PORT: &str = "tunnels.pico.sh/admin-port";
/// The sidecar's admin port unless the webhook's --sidecar-admin-port or a pod's [`ADMIN_PORT`]
/// says otherwise: /live, /ready, /tunnels-up, /metrics, /status. Every container of a pod shares
/// its network namespace, so this port must be one nothing else in a pod listens on. 7426 ("PICO"
/// on a phone keypad) is used by no mesh or common sidecar: not Envoy's admin 9901 (Istio
/// without it, Kuma, App Mesh, Contour), Istio's 15000-15090, Linkerd's 4140/4143/4190/4191,
/// Consul's 8300-8600, 19000 and 20000-21255, Dapr's 3500/3501/9090/50001/50002, Cilium's
/// 9962-9965, the OpenTelemetry collector's 4317/4318/8888/13133; outside 9100-9999, where
/// Prometheus exporters (often sidecars) take their defaults; apart from the usual app ports
/// (3000, 5000, 8000-8081, 8443, 9000, databases); and below the kernel's ephemeral range
/// (32768+), so an outgoing connection of the app never holds it.
pub const DEFAULT_SIDECAR_ADMIN_PORT: u16 = 7426;
/// Set by kubectl; picotun points it at the app so `kubectl logs/exec` land there.
pub const DEFAULT_CONTAINER: &str = "kubectl.kubernetes.io/default-container";

/// The volumes picotun adds; no other container may mount them, and a pod of its own with one of
/// these names cannot be injected (the apiserver would refuse a duplicate volume name).
pub const TUNNELS_VOLUME: &str = "picotun-tunnels";
pub const KEY_VOLUME: &str = "picotun-ssh-key";
pub const REPORT_TOKEN_VOLUME: &str = "picotun-report-token";
/// An empty volume the sidecar mounts where the apiserver's ServiceAccount plugin would mount the
/// pod's API token (see `webhook::inject::SERVICE_ACCOUNT_TOKEN_PATH`).
pub const NO_API_TOKEN_VOLUME: &str = "picotun-no-api-token";
pub const SIDECAR_VOLUMES: [&str; 4] = [TUNNELS_VOLUME, KEY_VOLUME, REPORT_TOKEN_VOLUME, NO_API_TOKEN_VOLUME];

/// The name of the injected container.
pub const SIDECAR_NAME: &str = "picotun-agent";

/// A boolean switch value: only `"true"` and `"false"` mean anything.
pub fn switch(value: Option<&String>) -> Option<bool> {
    match value.map(|v| v.trim()) {
        Some("true") => Some(true),
        Some("false") => Some(false),
        _ => None,
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExposeError {
    #[error(
        "{EXPOSE}: item {item:?} is not KIND:NAME=PORT (e.g. \"http:demo=8080\", \"tcp:5432=postgres\", \"tcp:any=5432\")"
    )]
    Syntax { item: String },
    #[error("{EXPOSE}: item {item:?}: {reason}")]
    Invalid { item: String, reason: String },
    #[error("{EXPOSE}: port {port:?} in {item:?} is neither a number nor the name of a container port of this pod")]
    UnknownPort { item: String, port: String },
}

/// Parses the expose annotation: comma-separated `KIND:NAME=PORT` items, where KIND is `http`,
/// `tls` or `tcp`; NAME is the requested name (http/tls) or public port (tcp; `any` lets the server
/// choose); PORT is the app's port, a number or a container port name resolved by `named_port`.
pub fn parse_expose(value: &str, named_port: impl Fn(&str) -> Option<u16>) -> Result<Vec<TunnelSpec>, ExposeError> {
    let mut tunnels = Vec::new();
    for item in value.split([',', '\n']).map(str::trim).filter(|i| !i.is_empty()) {
        let syntax = || ExposeError::Syntax { item: item.to_string() };
        let (kind, rest) = item.split_once(':').ok_or_else(syntax)?;
        let (name, port) = rest.split_once('=').ok_or_else(syntax)?;
        let (kind, name, port) = (kind.trim(), name.trim(), port.trim());
        let target_port = match port.parse::<u16>() {
            Ok(p) => p,
            Err(_) => named_port(port)
                .ok_or_else(|| ExposeError::UnknownPort { item: item.to_string(), port: port.to_string() })?,
        };
        let spec = match kind {
            "http" | "tls" => TunnelSpec {
                name: format!("{kind}-{}", name.to_lowercase().replace('.', "-")),
                kind: if kind == "http" { TunnelKind::Http } else { TunnelKind::Tls },
                host: Some(name.to_string()),
                remote_port: None,
                target_port,
                options: Default::default(),
                standby: false,
            },
            "tcp" => {
                let remote_port = match name {
                    "any" | "0" => None,
                    n => Some(n.parse::<u16>().map_err(|_| ExposeError::Invalid {
                        item: item.to_string(),
                        reason: "a tcp tunnel's NAME is the public port number, or `any`".into(),
                    })?),
                };
                TunnelSpec {
                    name: format!(
                        "tcp-{}",
                        remote_port.map(|p| p.to_string()).unwrap_or_else(|| format!("any-{target_port}"))
                    ),
                    kind: TunnelKind::Tcp,
                    host: None,
                    remote_port,
                    target_port,
                    options: Default::default(),
                    standby: false,
                }
            }
            _ => return Err(syntax()),
        };
        tunnels.push(spec);
    }
    let file = TunnelsFile { tunnels };
    file.validate().map_err(|e| ExposeError::Invalid { item: value.to_string(), reason: e.to_string() })?;
    Ok(file.tunnels)
}

/// A label selector as `kubectl -l` writes it -> kube's [`Selector`](kube::core::Selector):
/// requirements separated by commas, each `key=value` (or `==`), `key!=value`,
/// `key in (a,b)`, `key notin (a,b)`, `key` (exists) or `!key` (does not exist). Empty selects
/// everything. Errors name the requirement and what to fix.
pub fn parse_label_selector(s: &str) -> Result<kube::core::Selector, String> {
    use kube::core::Expression;
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.checked_sub(1).ok_or_else(|| format!("{s:?}: a `)` without its `(`"))?,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("{s:?}: a `(` without its `)` (write key in (a,b))"));
    }
    parts.push(&s[start..]);
    let mut exprs = Vec::new();
    for part in parts.into_iter().map(str::trim).filter(|p| !p.is_empty()) {
        let key = |k: &str| -> Result<String, String> {
            let k = k.trim();
            check_label_key(k).map_err(|why| format!("{part:?}: label key {k:?} {why}"))?;
            Ok(k.to_string())
        };
        let value = |v: &str| -> Result<String, String> {
            let v = v.trim();
            check_label_value(v).map_err(|why| format!("{part:?}: label value {v:?} {why}"))?;
            Ok(v.to_string())
        };
        let set = |rest: &str| -> Result<std::collections::BTreeSet<String>, String> {
            let inner = rest
                .trim()
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| format!("{part:?}: the values go in parentheses (key in (a,b))"))?;
            inner.split(',').map(value).collect()
        };
        let expr = if let Some(k) = part.strip_prefix('!') {
            Expression::DoesNotExist(key(k)?)
        } else if let Some((k, v)) = part.split_once("!=") {
            Expression::NotEqual(key(k)?, value(v)?)
        } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
            Expression::Equal(key(k)?, value(v)?)
        } else if let Some((k, rest)) = part.split_once(" notin ") {
            Expression::NotIn(key(k)?, set(rest)?)
        } else if let Some((k, rest)) = part.split_once(" in ") {
            Expression::In(key(k)?, set(rest)?)
        } else if part.contains(['(', ')', ' ']) {
            return Err(format!(
                "{part:?} is not a label requirement: write key=value, key!=value, key in (a,b), key notin (a,b), key or !key"
            ));
        } else {
            Expression::Exists(key(part)?)
        };
        exprs.push(expr);
    }
    Ok(exprs.into_iter().collect())
}

/// A label key: an optional DNS-subdomain prefix and `/`, then a name of 1-63 characters
/// (alphanumerics, `-`, `_`, `.`, starting and ending alphanumeric).
fn check_label_key(k: &str) -> Result<(), &'static str> {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if let Some(p) = prefix {
        let dns = !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        if !dns {
            return Err("has a prefix that is not a DNS subdomain (e.g. example.com/team)");
        }
    }
    if name.is_empty() {
        return Err("is empty (write key=value)");
    }
    check_label_value(name)
}

fn check_label_value(v: &str) -> Result<(), &'static str> {
    if v.len() > 63 {
        return Err("is longer than 63 characters");
    }
    let ok = |b: u8| b.is_ascii_alphanumeric();
    let valid = v.bytes().all(|b| ok(b) || matches!(b, b'-' | b'_' | b'.'))
        && v.bytes().next().is_some_and(ok)
        && v.bytes().last().is_some_and(ok);
    if !v.is_empty() && !valid {
        return Err("may hold only letters, digits, `-`, `_` and `.`, starting and ending with a letter or digit");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_selectors_parse_as_kubectl_writes_them() {
        use kube::core::SelectorExt;
        let labels = |pairs: &[(&str, &str)]| -> std::collections::BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let sel = parse_label_selector("team in (a, b),env!=prod,example.com/owned,!legacy").unwrap();
        assert!(sel.matches(&labels(&[("team", "a"), ("env", "dev"), ("example.com/owned", "")])));
        assert!(!sel.matches(&labels(&[("team", "c"), ("example.com/owned", "")])), "team not in the set");
        assert!(!sel.matches(&labels(&[("team", "a"), ("env", "prod"), ("example.com/owned", "")])));
        assert!(!sel.matches(&labels(&[("team", "a")])), "example.com/owned must exist");
        assert!(!sel.matches(&labels(&[("team", "b"), ("example.com/owned", "x"), ("legacy", "1")])));
        let eq = parse_label_selector("picotun.dev/controller-test=x, tier==web").unwrap();
        assert!(eq.matches(&labels(&[("picotun.dev/controller-test", "x"), ("tier", "web")])));
        assert!(!eq.matches(&labels(&[("picotun.dev/controller-test", "x")])));
        assert!(parse_label_selector(" ").unwrap().selects_all());
        assert!(parse_label_selector("t notin (a)").unwrap().matches(&labels(&[])));
    }

    #[test]
    fn label_selector_errors_say_what_to_fix() {
        for (value, want) in [
            ("team in (a,b", "without its `)`"),
            ("team in a,b", "in parentheses"),
            ("=web", "is empty"),
            ("Team_=x", "starting and ending"),
            ("team=a b", "may hold only"),
            ("Ex.com/team=x", "not a DNS subdomain"),
            ("team is web", "not a label requirement"),
        ] {
            let err = parse_label_selector(value).unwrap_err();
            assert!(err.contains(want), "{value}: {err}");
        }
    }

    fn ports(name: &str) -> Option<u16> {
        (name == "web").then_some(8080)
    }

    #[test]
    fn parses_every_kind_and_named_ports() {
        let t = parse_expose("http:demo=8080, tcp:5432=5432,tcp:any=web\n tls:app.example.com=web", ports).unwrap();
        let summary: Vec<(String, Option<String>, Option<u16>, u16)> =
            t.iter().map(|s| (s.name.clone(), s.host.clone(), s.remote_port, s.target_port)).collect();
        assert_eq!(
            summary,
            vec![
                ("http-demo".into(), Some("demo".into()), None, 8080),
                ("tcp-5432".into(), None, Some(5432), 5432),
                ("tcp-any-8080".into(), None, None, 8080),
                ("tls-app-example-com".into(), Some("app.example.com".into()), None, 8080),
            ]
        );
    }

    #[test]
    fn errors_name_the_item_and_the_fix() {
        for (value, want) in [
            ("demo=8080", "is not KIND:NAME=PORT"),
            ("http:demo", "is not KIND:NAME=PORT"),
            ("udp:53=53", "is not KIND:NAME=PORT"),
            ("http:demo=metrics", "neither a number nor the name of a container port"),
            ("tcp:db=5432", "public port number, or `any`"),
            ("http:Demo=80", "not a valid DNS name"),
            ("http:demo=80,http:demo=81", "appears twice"),
        ] {
            let err = parse_expose(value, ports).unwrap_err().to_string();
            assert!(err.contains(want), "{value}: {err}");
        }
    }

    #[test]
    fn switches_are_strict() {
        assert_eq!(switch(Some(&"true".to_string())), Some(true));
        assert_eq!(switch(Some(&" false ".to_string())), Some(false));
        assert_eq!(switch(Some(&"yes".to_string())), None);
        assert_eq!(switch(None), None);
    }
}
