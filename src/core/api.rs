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
/// The key inside that Secret (the `kubernetes.io/ssh-auth` Secret type's key).
pub const KEY_SECRET_KEY: &str = "ssh-privatekey";
/// Per-pod sidecar resource overrides (Kubernetes quantities).
pub const CPU_REQUEST: &str = "tunnels.pico.sh/sidecar-cpu-request";
pub const MEMORY_REQUEST: &str = "tunnels.pico.sh/sidecar-memory-request";
pub const CPU_LIMIT: &str = "tunnels.pico.sh/sidecar-cpu-limit";
pub const MEMORY_LIMIT: &str = "tunnels.pico.sh/sidecar-memory-limit";
/// Per-pod sidecar log filter.
pub const LOG_LEVEL: &str = "tunnels.pico.sh/log-level";
/// Set by kubectl; picotun points it at the app so `kubectl logs/exec` land there.
pub const DEFAULT_CONTAINER: &str = "kubectl.kubernetes.io/default-container";

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

/// `key=value,key2=value2` -> the labels a selector requires (empty: everything matches).
pub fn parse_selector(s: &str) -> Result<std::collections::BTreeMap<String, String>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
            _ => Err(format!("{pair:?} is not key=value (e.g. team=web)")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
