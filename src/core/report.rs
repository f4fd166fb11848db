//! What a sidecar reports about each tunnel: the states the agent's `/status` and its reports to
//! the webhook use, and how a requested name or port is written. The webhook checks reports
//! against these; `explain` prints them.

use serde::Serialize;

use crate::core::tunnel::{TunnelKind, TunnelSpec, is_dns_label, is_dns_name};

/// Longest address kept: a 253-character host, a scheme and a port.
const MAX_ADDRESS: usize = 253 + 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ForwardState {
    /// The app's port does not accept connections yet: no forward until it does.
    WaitingForApp,
    /// The SSH connection is being (re)established.
    Connecting,
    /// Forward requested, waiting for the server's answer.
    Requesting,
    /// Serving at its public address.
    Established,
    /// Another replica holds the name (or port); retrying so one takes over when it goes.
    StandingBy,
    /// Refused or broken; retrying with backoff. `message` says why.
    Failed,
    /// Shutting down: forward cancelled, in-flight connections finishing.
    Draining,
}

impl ForwardState {
    pub fn as_str(&self) -> &'static str {
        match self {
            ForwardState::WaitingForApp => "waiting_for_app",
            ForwardState::Connecting => "connecting",
            ForwardState::Requesting => "requesting",
            ForwardState::Established => "established",
            ForwardState::StandingBy => "standing_by",
            ForwardState::Failed => "failed",
            ForwardState::Draining => "draining",
        }
    }

    pub const ALL: [ForwardState; 7] = [
        ForwardState::WaitingForApp,
        ForwardState::Connecting,
        ForwardState::Requesting,
        ForwardState::Established,
        ForwardState::StandingBy,
        ForwardState::Failed,
        ForwardState::Draining,
    ];
}

/// What a tunnel asks for, as status shows it: `demo`, `tcp:5432`, `tcp:any`.
pub fn requested_label(spec: &TunnelSpec) -> String {
    match spec.kind {
        TunnelKind::Http | TunnelKind::Tls => spec.host.clone().unwrap_or_default(),
        TunnelKind::Tcp => match spec.remote_port {
            Some(p) if p != 0 => format!("tcp:{p}"),
            _ => "tcp:any".into(),
        },
    }
}

/// Whether `address` is one `spec` can have been given: `http://` or `https://` for an http
/// tunnel, `host:port` or `tcp://host:port` for tcp (the requested port if one was), `host[:port]`
/// (or `https://`, `tls://`) for tls; the host a valid DNS name as Kubernetes and the Gateway API
/// validate hostnames (RFC 1123, lower case, not an IP address), equal to the custom domain the
/// tunnel asked for or under one of `domains`, and for a tuns name, carrying that name in its
/// first label (`demo`, `alice-demo`, `demo-alice`). `domains` None: the caller does not know the
/// server's domains (the controller), and only that check is left out. Err: (metric reason, what
/// is wrong).
pub fn check_address(
    address: &str,
    spec: &TunnelSpec,
    domains: Option<&[String]>,
) -> Result<(), (&'static str, String)> {
    if address.len() > MAX_ADDRESS {
        return Err(("bad_address", format!("longer than {MAX_ADDRESS} characters")));
    }
    let (scheme, rest) = match address.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, address),
    };
    let scheme_ok = match spec.kind {
        TunnelKind::Http => matches!(scheme, Some("http" | "https")),
        TunnelKind::Tls => matches!(scheme, None | Some("https" | "tls")),
        TunnelKind::Tcp => matches!(scheme, None | Some("tcp")),
    };
    if !scheme_ok {
        let want = match spec.kind {
            TunnelKind::Http => "http:// or https://",
            TunnelKind::Tls => "host:port, https:// or tls://",
            TunnelKind::Tcp => "host:port or tcp://host:port",
        };
        return Err(("bad_scheme", format!("a {} tunnel's address is {want}", spec.kind)));
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(|c: char| {
        matches!(c, '/' | '?' | '#' | '@' | '[' | ']' | '\\') || c.is_whitespace() || c.is_control()
    }) {
        return Err(("bad_address", "only scheme, host and port are allowed".into()));
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) => match port.parse::<u16>() {
            Ok(p) if p != 0 => (host, Some(p)),
            _ => return Err(("bad_address", format!("port {port:?} is not 1-65535"))),
        },
        None => (rest, None),
    };
    if !is_hostname(host) {
        return Err((
            "bad_host",
            "the host is not a valid DNS name (RFC 1123: lower-case labels of a-z, 0-9 and '-', not an IP address)"
                .into(),
        ));
    }
    if spec.kind == TunnelKind::Tcp {
        match (port, spec.remote_port.filter(|p| *p != 0)) {
            (None, _) => return Err(("bad_address", "a tcp address needs its port".into())),
            (Some(p), Some(want)) if p != want => {
                return Err(("not_requested", format!("the tunnel asked for port {want}, not {p}")));
            }
            _ => {}
        }
    }
    let requested = spec.host.as_deref().unwrap_or_default().to_ascii_lowercase();
    if spec.kind != TunnelKind::Tcp && requested.contains('.') {
        // A custom domain comes back as it was asked for, or not at all.
        return if host == requested {
            Ok(())
        } else {
            Err(("not_requested", format!("the tunnel asked for the custom domain {requested}")))
        };
    }
    if let Some(domains) = domains
        && !domains.iter().any(|d| host == d || host.strip_suffix(d.as_str()).is_some_and(|h| h.ends_with('.')))
    {
        return Err((
            "outside_domain",
            format!("the host is not under the tunnel server's domain ({}; --server-domain)", domains.join(", ")),
        ));
    }
    if spec.kind != TunnelKind::Tcp && !carries_name(host.split('.').next().unwrap_or_default(), &requested) {
        return Err(("not_requested", format!("the host does not carry the requested name {requested:?}")));
    }
    Ok(())
}

/// A hostname Ingress and Gateway status accept: a DNS-1123 subdomain that is not an IP address
/// (an all-digit last label is taken for one).
fn is_hostname(host: &str) -> bool {
    !host.is_empty()
        && is_dns_name(host)
        && host.split('.').all(is_dns_label)
        && !host.rsplit('.').next().is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
}

/// A host's first label carries `name`: the name alone, or joined to a user name with '-'
/// (tuns.sh `alice-demo`, stock sish `demo-alice`).
fn carries_name(label: &str, name: &str) -> bool {
    let joined = |rest: Option<&str>, strip: fn(&str) -> Option<&str>| {
        rest.and_then(strip).is_some_and(|user| !user.is_empty() && !user.starts_with('-') && !user.ends_with('-'))
    };
    label == name
        || joined(label.strip_suffix(name), |r| r.strip_suffix('-'))
        || joined(label.strip_prefix(name), |r| r.strip_prefix('-'))
}

/// The domains the tunnel server names public addresses under, when `--server-domain` is not
/// given: the server itself if it is a DNS name, and for a regional tuns.sh host (`nue.tuns.sh`)
/// tuns.sh, where its HTTP names live. An IP address gives none.
pub fn default_domains(server: &str) -> Vec<String> {
    let server = server.trim().trim_end_matches('.').to_ascii_lowercase();
    if !is_hostname(&server) {
        return Vec::new();
    }
    let mut domains = vec![server.clone()];
    if server.ends_with(".tuns.sh") {
        domains.push("tuns.sh".into());
    }
    domains
}
