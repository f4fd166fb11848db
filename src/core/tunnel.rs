//! `TunnelSpec`: the one contract between the controller, the webhook and the agent.
//!
//! The controller (or the webhook, from annotations) writes a [`TunnelsFile`] as JSON into a pod
//! annotation; the downward API turns it into a file the agent watches. Each spec says what to
//! ask the tunnel server for (an HTTP name, a TCP port) and which local port to relay to.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

/// What the tunnel server publishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelKind {
    /// An HTTP virtual host: `{user}-{host}.tuns.sh` (or a custom domain), HTTPS at the edge.
    Http,
    /// A public TCP port on the server's host.
    Tcp,
    /// TLS passthrough routed by SNI (sish `sni-proxy`): the app terminates TLS.
    Tls,
}

impl fmt::Display for TunnelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TunnelKind::Http => "http",
            TunnelKind::Tcp => "tcp",
            TunnelKind::Tls => "tls",
        })
    }
}

/// One tunnel a pod should open.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
// No `deny_unknown_fields`: during an upgrade a newer controller may write fields an older
// sidecar does not know yet, and refusing the whole file for them would drop every tunnel.
#[serde(rename_all = "camelCase")]
pub struct TunnelSpec {
    /// Unique within the file; names the tunnel in status, metrics and logs.
    pub name: String,
    pub kind: TunnelKind,
    /// HTTP and TLS: the requested name -- a tuns name without dots (`demo`) or a custom domain
    /// with dots (`app.example.com`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// TCP: the requested public port; absent or 0 lets the server choose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_port: Option<u16>,
    /// The app's port inside the pod.
    pub target_port: u16,
    /// Server options for the SSH connection carrying this tunnel (sish: `proxy-protocol=2`,
    /// ...). Tunnels with different options need different SSH connections.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
    /// Another pod holds this name on a server that does not load-balance: the agent does not ask
    /// the server for it (state standingBy) until the controller clears this to hand it over.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub standby: bool,
}

/// The file the agent reads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TunnelsFile {
    #[serde(default)]
    pub tunnels: Vec<TunnelSpec>,
}

/// Why a tunnels file was refused. The agent keeps its last good configuration and reports this.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error(
        "not valid tunnels JSON: {0} (expected {{\"tunnels\": [{{\"name\": ..., \"kind\": \"http\", \"host\": ..., \"targetPort\": ...}}]}})"
    )]
    Json(String),
    #[error("tunnel {index}: name {name:?} must be 1-63 characters of a-z, 0-9 and '-'")]
    BadName { index: usize, name: String },
    #[error("tunnel {name:?} appears twice: tunnel names must be unique")]
    DuplicateName { name: String },
    #[error("tunnel {name:?}: kind {kind} needs `host` (a tuns name like \"demo\" or a custom domain)")]
    MissingHost { name: String, kind: TunnelKind },
    #[error("tunnel {name:?}: host {host:?} is not a valid DNS name")]
    BadHost { name: String, host: String },
    #[error("tunnel {name:?}: `host` applies to http and tls tunnels; a tcp tunnel takes `remotePort`")]
    HostOnTcp { name: String },
    #[error("tunnel {name:?}: `remotePort` applies to tcp tunnels only")]
    RemotePortOnNamed { name: String },
    #[error("tunnel {name:?}: targetPort must be 1-65535")]
    BadTargetPort { name: String },
    #[error("tunnel {name:?}: option key {key:?} must be non-empty and free of spaces and '='")]
    BadOption { name: String, key: String },
    #[error("tunnels {first:?} and {second:?} both ask for {what}")]
    Conflict { first: String, second: String, what: String },
}

impl TunnelsFile {
    /// Parses and validates; the error says what to fix.
    pub fn parse(text: &str) -> Result<TunnelsFile, SpecError> {
        // An empty file (the downward API writes one for a missing annotation) means no tunnels.
        if text.trim().is_empty() {
            return Ok(TunnelsFile::default());
        }
        let file: TunnelsFile = serde_json::from_str(text).map_err(|e| SpecError::Json(e.to_string()))?;
        file.validate()?;
        Ok(file)
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        let mut names = BTreeSet::new();
        let mut claims: BTreeMap<String, &str> = BTreeMap::new();
        for (index, t) in self.tunnels.iter().enumerate() {
            if !is_dns_label(&t.name) {
                return Err(SpecError::BadName { index, name: t.name.clone() });
            }
            if !names.insert(t.name.as_str()) {
                return Err(SpecError::DuplicateName { name: t.name.clone() });
            }
            t.validate()?;
            if let Some(claim) = t.public_claim()
                && let Some(first) = claims.insert(claim.clone(), &t.name)
            {
                return Err(SpecError::Conflict { first: first.to_string(), second: t.name.clone(), what: claim });
            }
        }
        Ok(())
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("tunnel specs always serialize")
    }
}

impl TunnelSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        let name = || self.name.clone();
        if self.target_port == 0 {
            return Err(SpecError::BadTargetPort { name: name() });
        }
        match self.kind {
            TunnelKind::Http | TunnelKind::Tls => {
                let host =
                    self.host.as_deref().ok_or_else(|| SpecError::MissingHost { name: name(), kind: self.kind })?;
                if !is_dns_name(host) {
                    return Err(SpecError::BadHost { name: name(), host: host.to_string() });
                }
                if self.remote_port.is_some() {
                    return Err(SpecError::RemotePortOnNamed { name: name() });
                }
            }
            TunnelKind::Tcp => {
                if self.host.is_some() {
                    return Err(SpecError::HostOnTcp { name: name() });
                }
            }
        }
        for key in self.options.keys() {
            if key.is_empty() || key.contains(char::is_whitespace) || key.contains('=') {
                return Err(SpecError::BadOption { name: name(), key: key.clone() });
            }
        }
        Ok(())
    }

    /// What this tunnel takes on the server, if it is exclusive: an HTTP/TLS name or a fixed
    /// TCP port. Two tunnels of one pod must not claim the same thing.
    pub fn public_claim(&self) -> Option<String> {
        match self.kind {
            TunnelKind::Http | TunnelKind::Tls => {
                Some(format!("{} name {:?}", self.kind, self.host.as_deref().unwrap_or_default()))
            }
            TunnelKind::Tcp => self.remote_port.filter(|p| *p != 0).map(|p| format!("tcp port {p}")),
        }
    }

    /// True for a name with dots: a custom domain requested as-is.
    pub fn is_custom_domain(&self) -> bool {
        self.host.as_deref().is_some_and(|h| h.contains('.'))
    }
}

/// RFC 1123 label: 1-63 of a-z, 0-9, '-', not starting or ending with '-'.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS name of RFC 1123 labels (lower case), at most 253 characters.
pub fn is_dns_name(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<TunnelsFile, SpecError> {
        TunnelsFile::parse(json)
    }

    #[test]
    fn parses_http_and_tcp() {
        let f = parse(
            r#"{"tunnels":[
                {"name":"web","kind":"http","host":"demo","targetPort":8080},
                {"name":"db","kind":"tcp","remotePort":5432,"targetPort":5432,"options":{"proxy-protocol":"2"}}]}"#,
        )
        .unwrap();
        assert_eq!(f.tunnels.len(), 2);
        assert_eq!(f.tunnels[0].host.as_deref(), Some("demo"));
        assert_eq!(f.tunnels[1].options.get("proxy-protocol").map(String::as_str), Some("2"));
        // Round trip.
        assert_eq!(parse(&f.to_json()).unwrap(), f);
    }

    #[test]
    fn empty_file_is_no_tunnels() {
        assert_eq!(parse("").unwrap(), TunnelsFile::default());
        assert_eq!(parse("  \n").unwrap(), TunnelsFile::default());
        assert_eq!(parse("{}").unwrap(), TunnelsFile::default());
    }

    #[test]
    fn refuses_what_it_cannot_do_with_a_reason() {
        let cases = [
            (r#"{"tunnels":[{"name":"w","kind":"http","targetPort":80}]}"#, "needs `host`"),
            (r#"{"tunnels":[{"name":"W","kind":"tcp","targetPort":80}]}"#, "must be 1-63"),
            (r#"{"tunnels":[{"name":"w","kind":"tcp","host":"x","targetPort":80}]}"#, "takes `remotePort`"),
            (
                r#"{"tunnels":[{"name":"w","kind":"http","host":"a","remotePort":1,"targetPort":80}]}"#,
                "tcp tunnels only",
            ),
            (r#"{"tunnels":[{"name":"w","kind":"http","host":"Bad_Name","targetPort":80}]}"#, "not a valid DNS"),
            (r#"{"tunnels":[{"name":"w","kind":"tcp","targetPort":0}]}"#, "targetPort"),
            (r#"{"tunnels":[{"name":"w","kind":"udp","targetPort":1}]}"#, "not valid tunnels JSON"),
            (
                r#"{"tunnels":[{"name":"a","kind":"tcp","targetPort":1},{"name":"a","kind":"tcp","targetPort":2}]}"#,
                "appears twice",
            ),
            (
                r#"{"tunnels":[{"name":"a","kind":"http","host":"d","targetPort":1},{"name":"b","kind":"http","host":"d","targetPort":2}]}"#,
                "both ask for",
            ),
            (r#"{"tunnels":[{"name":"a","kind":"tcp","targetPort":1,"options":{"a b":"1"}}]}"#, "option key"),
            ("[1,2", "not valid tunnels JSON"),
        ];
        for (json, want) in cases {
            let err = parse(json).unwrap_err().to_string();
            assert!(err.contains(want), "{json}: {err:?} should mention {want:?}");
        }
    }

    /// Defect 10 of issue 12: a field a newer controller writes must not make an older sidecar
    /// refuse the whole file during an upgrade.
    #[test]
    fn fields_from_a_newer_controller_are_ignored() {
        let file = parse(
            r#"{"tunnels":[{"name":"w","kind":"tcp","targetPort":1,"extra":1}],"generation":7,"holder":{"pod":"x"}}"#,
        )
        .unwrap();
        assert_eq!(file.tunnels.len(), 1);
        assert!(!file.tunnels[0].standby);
        let told =
            parse(r#"{"tunnels":[{"name":"w","kind":"http","host":"d","targetPort":1,"standby":true}]}"#).unwrap();
        assert!(told.tunnels[0].standby);
        assert!(!file.to_json().contains("standby"), "the default is not written");
    }

    #[test]
    fn two_tcp_tunnels_may_both_let_the_server_choose() {
        parse(r#"{"tunnels":[{"name":"a","kind":"tcp","targetPort":1},{"name":"b","kind":"tcp","remotePort":0,"targetPort":2}]}"#)
            .unwrap();
    }

    #[test]
    fn custom_domains_have_dots() {
        let f = parse(r#"{"tunnels":[{"name":"a","kind":"http","host":"app.example.com","targetPort":1}]}"#).unwrap();
        assert!(f.tunnels[0].is_custom_domain());
    }
}
