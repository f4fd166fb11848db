//! The three server dialects the agent speaks: what to request for a tunnel, how to set options,
//! how to cancel, and how to learn the public address the server really assigned. Pure.

use std::collections::BTreeMap;

use crate::agent::output::ServerLine;
use crate::core::tunnel::{TunnelKind, TunnelSpec};

pub use crate::core::server::Dialect;

/// A `tcpip-forward` request: (bind address, bind port).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ForwardRequest {
    pub address: String,
    pub port: u32,
}

/// What to send on the session channel before the first forward.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionStart {
    /// No session channel at all (plain sshd would start a login shell).
    None,
    Shell,
    Exec(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DialectError {
    #[error(
        "tunnel {name:?}: a plain OpenSSH server has no HTTP or TLS names; use a tcp tunnel, or a sish/sandhole server"
    )]
    NoNames { name: String },
}

/// How a forward turned out, once the server has said where it put it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Serving at this public address, the one that was asked for.
    Public(String),
    /// The server gave another name or port than the one requested (it was taken, or not
    /// allowed): cancel at once and stand by.
    NotAsRequested(String),
}

impl Dialect {
    pub fn forward_request(&self, spec: &TunnelSpec, openssh_bind: &str) -> Result<ForwardRequest, DialectError> {
        let host = || spec.host.clone().unwrap_or_default();
        let tcp_port = u32::from(spec.remote_port.unwrap_or(0));
        Ok(match (self, spec.kind) {
            // Port 80 means "the app speaks plain HTTP"; the public side is HTTPS anyway.
            (Dialect::Sish | Dialect::Sandhole, TunnelKind::Http) => ForwardRequest { address: host(), port: 80 },
            (Dialect::Sish | Dialect::Sandhole, TunnelKind::Tls) => ForwardRequest { address: host(), port: 443 },
            // `localhost` (not a name) is what makes sish open a public TCP port.
            (Dialect::Sish | Dialect::Sandhole, TunnelKind::Tcp) => {
                ForwardRequest { address: "localhost".into(), port: tcp_port }
            }
            (Dialect::Openssh, TunnelKind::Tcp) => ForwardRequest { address: openssh_bind.into(), port: tcp_port },
            (Dialect::Openssh, TunnelKind::Http | TunnelKind::Tls) => {
                return Err(DialectError::NoNames { name: spec.name.clone() });
            }
        })
    }

    /// The session request carrying the connection's options. sish waits up to a second per
    /// forward for one, so send it first, and never wait for sish's reply to `exec`: it sends none.
    pub fn session_start(&self, options: &BTreeMap<String, String>, tls: bool) -> SessionStart {
        let mut options = options.clone();
        if tls {
            options.entry("sni-proxy".into()).or_insert_with(|| "true".into());
        }
        match self {
            Dialect::Openssh => SessionStart::None,
            _ if options.is_empty() => SessionStart::Shell,
            Dialect::Sish => {
                SessionStart::Exec(options.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" "))
            }
            // sandhole takes bare words for switches; a sish-style `sni-proxy=true` closes the connection.
            Dialect::Sandhole => SessionStart::Exec(
                options
                    .iter()
                    .map(|(k, v)| if v == "true" { k.clone() } else { format!("{k}={v}") })
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
        }
    }

    /// The `cancel-tcpip-forward` arguments: sish wants the request repeated exactly (even port
    /// 0); sandhole and OpenSSH want the port that was assigned.
    pub fn cancel_request(&self, requested: &ForwardRequest, assigned_port: u32) -> ForwardRequest {
        match self {
            Dialect::Sish => requested.clone(),
            Dialect::Sandhole | Dialect::Openssh => ForwardRequest {
                address: requested.address.clone(),
                port: if requested.port == 0 { assigned_port } else { requested.port },
            },
        }
    }

    /// Whether the server prints addresses on the session channel (else they are derived).
    pub fn prints_addresses(&self) -> bool {
        !matches!(self, Dialect::Openssh)
    }
}

/// Works out, from what the server printed after a forward request, where the forward went.
/// Feed it the lines that arrive after the request's reply; call [`AddressWatch::decide`] after
/// each batch.
pub struct AddressWatch {
    dialect: Dialect,
    spec_kind: TunnelKind,
    request: ForwardRequest,
    reply_port: u32,
    server_host: String,
    in_block: bool,
    unavailable: Option<String>,
    addresses: Vec<(String, String)>,
}

impl AddressWatch {
    pub fn new(
        dialect: Dialect,
        spec_kind: TunnelKind,
        request: ForwardRequest,
        reply_port: u32,
        server_host: &str,
    ) -> Self {
        AddressWatch {
            dialect,
            spec_kind,
            request,
            reply_port,
            server_host: server_host.to_string(),
            in_block: false,
            unavailable: None,
            addresses: Vec::new(),
        }
    }

    /// The port the forward is really on: the requested one, or the one the reply carried.
    fn effective_port(&self) -> u32 {
        if self.request.port != 0 { self.request.port } else { self.reply_port }
    }

    pub fn feed(&mut self, line: &ServerLine) {
        match (self.dialect, line) {
            (Dialect::Sish, ServerLine::SishUnavailable { what }) => self.unavailable = Some(what.clone()),
            (Dialect::Sish, ServerLine::SishBlock { .. }) => {
                // A second block start means ours ended without an address we recognised.
                self.in_block = self.addresses.is_empty();
            }
            (Dialect::Sish, ServerLine::SishAddress { label, address }) if self.in_block => {
                self.addresses.push((label.clone(), address.clone()))
            }
            (Dialect::Sandhole, ServerLine::SandholeHttp { url, requested }) if *requested == self.request.address => {
                self.addresses.push(("HTTP".into(), url.clone()))
            }
            (Dialect::Sandhole, ServerLine::SandholeTcp { address, port })
                if self.spec_kind == TunnelKind::Tcp && u32::from(*port) == self.effective_port() =>
            {
                self.addresses.push(("TCP".into(), address.clone()))
            }
            _ => {}
        }
    }

    /// The placement, once known.
    pub fn decide(&self) -> Option<Placement> {
        if self.dialect == Dialect::Openssh {
            let host = if self.server_host.contains(':') {
                format!("[{}]", self.server_host)
            } else {
                self.server_host.clone()
            };
            return Some(Placement::Public(format!("{host}:{}", self.effective_port())));
        }
        let best = ["HTTPS", "TLS", "HTTP", "TCP"]
            .iter()
            .find_map(|want| self.addresses.iter().find(|(label, _)| label == want))
            .map(|(_, a)| a.clone())?;
        if let Some(what) = &self.unavailable {
            return Some(Placement::NotAsRequested(format!("{what} was unavailable; the server assigned {best}")));
        }
        if !self.matches_request(&best) {
            return Some(Placement::NotAsRequested(format!(
                "asked for {}:{}, the server assigned {best}",
                self.request.address, self.request.port
            )));
        }
        Some(Placement::Public(best))
    }

    /// Does a printed address carry what was requested? A custom domain (with dots) must come
    /// back as it is; a name must be the host's first label, alone or joined to a user name.
    fn matches_request(&self, address: &str) -> bool {
        let host_port = address.split("://").last().unwrap_or(address);
        match self.spec_kind {
            TunnelKind::Http | TunnelKind::Tls => {
                let host = host_port.split(['/', ':']).next().unwrap_or_default().to_ascii_lowercase();
                let wanted = self.request.address.to_ascii_lowercase();
                if wanted.contains('.') {
                    host == wanted
                } else {
                    label_carries_name(host.split('.').next().unwrap_or_default(), &wanted)
                }
            }
            TunnelKind::Tcp => {
                self.request.port == 0
                    || host_port.rsplit_once(':').and_then(|(_, p)| p.parse::<u32>().ok()) == Some(self.request.port)
            }
        }
    }
}

/// Whether a host's first label is the requested `name` as a sish server names it: the name
/// alone, `{user}{sep}{name}` (tuns.sh: `alice-demo`) or `{name}{sep}{user}` (stock sish with
/// `--append-user-to-subdomain`: `demo-alice`). The separator is the server's
/// (`--append-user-to-subdomain-separator`, `-` unless changed): any run of characters that are
/// not letters or digits. The user is not checked against the SSH user: on tuns.sh it is the
/// pico account, whatever name the connection logs in as. A random name (sish's are letters and
/// digits only) or one that merely contains the name does not match.
fn label_carries_name(label: &str, name: &str) -> bool {
    let is_sep = |c: char| !c.is_ascii_alphanumeric();
    let joined = |user: &str, sep: &str| !user.is_empty() && !sep.is_empty() && sep.chars().all(is_sep);
    if label == name {
        return true;
    }
    // {user}{sep}{name}: the separator is the run of non-alphanumerics just before the name.
    let user_first = label.strip_suffix(name).is_some_and(|rest| {
        let user = rest.trim_end_matches(is_sep);
        joined(user, &rest[user.len()..])
    });
    // {name}{sep}{user}: the separator is the run just after it.
    let name_first = label.strip_prefix(name).is_some_and(|rest| {
        let user = rest.trim_start_matches(is_sep);
        joined(user, &rest[..rest.len() - user.len()])
    });
    user_first || name_first
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: TunnelKind, host: Option<&str>, remote_port: Option<u16>) -> TunnelSpec {
        TunnelSpec {
            name: "t".into(),
            kind,
            host: host.map(str::to_string),
            remote_port,
            target_port: 8080,
            options: BTreeMap::new(),
            standby: false,
        }
    }

    fn req(a: &str, p: u32) -> ForwardRequest {
        ForwardRequest { address: a.into(), port: p }
    }

    #[test]
    fn forward_requests_per_dialect() {
        let http = spec(TunnelKind::Http, Some("demo"), None);
        let tcp = spec(TunnelKind::Tcp, None, Some(5432));
        let any = spec(TunnelKind::Tcp, None, None);
        assert_eq!(Dialect::Sish.forward_request(&http, "").unwrap(), req("demo", 80));
        assert_eq!(Dialect::Sish.forward_request(&tcp, "").unwrap(), req("localhost", 5432));
        assert_eq!(Dialect::Sandhole.forward_request(&any, "").unwrap(), req("localhost", 0));
        assert_eq!(Dialect::Openssh.forward_request(&tcp, "127.0.0.1").unwrap(), req("127.0.0.1", 5432));
        assert!(Dialect::Openssh.forward_request(&http, "").unwrap_err().to_string().contains("use a tcp tunnel"));
    }

    #[test]
    fn options_per_dialect() {
        let mut o = BTreeMap::new();
        assert_eq!(Dialect::Sish.session_start(&o, false), SessionStart::Shell);
        assert_eq!(Dialect::Openssh.session_start(&o, false), SessionStart::None);
        o.insert("proxy-protocol".to_string(), "2".to_string());
        o.insert("force-https".to_string(), "true".to_string());
        assert_eq!(
            Dialect::Sish.session_start(&o, false),
            SessionStart::Exec("force-https=true proxy-protocol=2".into())
        );
        assert_eq!(
            Dialect::Sandhole.session_start(&o, false),
            SessionStart::Exec("force-https proxy-protocol=2".into())
        );
        assert_eq!(Dialect::Sandhole.session_start(&BTreeMap::new(), true), SessionStart::Exec("sni-proxy".into()));
    }

    #[test]
    fn cancels_per_dialect() {
        assert_eq!(Dialect::Sish.cancel_request(&req("localhost", 0), 41000), req("localhost", 0));
        assert_eq!(Dialect::Sandhole.cancel_request(&req("localhost", 0), 41000), req("localhost", 41000));
        assert_eq!(Dialect::Openssh.cancel_request(&req("", 5432), 0), req("", 5432));
    }

    fn watch(d: Dialect, kind: TunnelKind, r: ForwardRequest, reply: u32, lines: &[ServerLine]) -> Option<Placement> {
        let mut w = AddressWatch::new(d, kind, r, reply, "nue.tuns.sh");
        for l in lines {
            w.feed(l);
        }
        w.decide()
    }

    fn block(kind: &str, port: &str) -> ServerLine {
        ServerLine::SishBlock { kind: kind.into(), port: port.into() }
    }
    fn addr(label: &str, a: &str) -> ServerLine {
        ServerLine::SishAddress { label: label.into(), address: a.into() }
    }

    #[test]
    fn sish_http_prefers_https_and_accepts_the_user_prefix() {
        let lines = [
            block("http", "80"),
            addr("HTTP", "http://alice-demo.tuns.sh"),
            addr("HTTPS", "https://alice-demo.tuns.sh"),
        ];
        assert_eq!(
            watch(Dialect::Sish, TunnelKind::Http, req("demo", 80), 80, &lines),
            Some(Placement::Public("https://alice-demo.tuns.sh".into()))
        );
        // Nothing printed yet: undecided.
        assert_eq!(watch(Dialect::Sish, TunnelKind::Http, req("demo", 80), 80, &[block("http", "80")]), None);
    }

    #[test]
    fn sish_names_the_user_before_or_after_the_name() {
        let http = |printed: &str| {
            let lines = [block("http", "80"), addr("HTTP", printed)];
            watch(Dialect::Sish, TunnelKind::Http, req("demo", 80), 80, &lines)
        };
        // tuns.sh: {user}-{name}; stock sish with --append-user-to-subdomain: {name}-{user}. The
        // address reported is exactly the one printed, port included.
        for printed in [
            "http://alice-demo.tuns.sh",
            "http://demo-alice.tuns.test:41234",
            "http://demo-my-team.tuns.test",
            "http://my-team-demo.tuns.test",
            // Another --append-user-to-subdomain-separator, and a host sish lower-cased.
            "http://demo_alice.tuns.test",
            "http://alice--demo.tuns.test",
            "http://Demo-Alice.tuns.test",
            // The name alone (no user appended).
            "http://demo.tuns.test:8080/",
        ] {
            assert_eq!(http(printed), Some(Placement::Public(printed.into())), "{printed}");
        }
        // A name with a dash of its own, in both forms.
        let lines = [block("http", "80"), addr("HTTP", "http://my-app-alice.tuns.test")];
        assert!(matches!(
            watch(Dialect::Sish, TunnelKind::Http, req("my-app", 80), 80, &lines),
            Some(Placement::Public(_))
        ));
        // TLS (SNI) forwards are named the same way.
        let lines = [block("tls", "443"), addr("TLS", "demo-alice.tuns.test:443")];
        assert_eq!(
            watch(Dialect::Sish, TunnelKind::Tls, req("demo", 443), 443, &lines),
            Some(Placement::Public("demo-alice.tuns.test:443".into()))
        );
        // Anything else is not ours: a random name, the name inside a longer word, a user with no
        // separator, a separator with no user, another name.
        for printed in [
            "http://x7k.tuns.test",
            "http://demox.tuns.test",
            "http://xdemo.tuns.test",
            "http://alicedemo.tuns.test",
            "http://demo-.tuns.test",
            "http://-demo.tuns.test",
            "http://other-alice.tuns.test",
            "http://alice.demo.tuns.test",
        ] {
            assert!(matches!(http(printed), Some(Placement::NotAsRequested(_))), "{printed}: {:?}", http(printed));
        }
    }

    /// What sish 9609e83 printed on the session channel, byte for byte, run as the test ground
    /// runs it (`--append-user-to-subdomain`, requested names and ports honoured, no load
    /// balancer): the first connection of user alice asked for `app:80`, `localhost:38663` and
    /// `localhost:0`; a second one asked for the same name and port while the first held them.
    const SISH_FIRST: &str = "\x1b[41mPress Ctrl-C to close the session.\x1b[0m\r\n\r\n\
        Starting SSH Forwarding service for \x1b[32mhttp:80\x1b[0m. Forwarded connections can be accessed via the following methods:\r\n\
        \x1b[44mHTTP\x1b[0m: http://app-alice.tuns.test:41511\r\n\r\n\
        Starting SSH Forwarding service for \x1b[32mtcp:38663\x1b[0m. Forwarded connections can be accessed via the following methods:\r\n\
        \x1b[44mTCP\x1b[0m: tuns.test:38663\r\n\r\n\
        Starting SSH Forwarding service for \x1b[32mtcp:0\x1b[0m. Forwarded connections can be accessed via the following methods:\r\n\
        \x1b[44mTCP\x1b[0m: tuns.test:44597\r\n\r\n";
    const SISH_SECOND: &str = "\x1b[41mPress Ctrl-C to close the session.\x1b[0m\r\n\r\n\
        The subdomain \x1b[31mapp-alice.tuns.test\x1b[0m is unavailable. Assigning a random subdomain.\r\n\
        Starting SSH Forwarding service for \x1b[32mhttp:80\x1b[0m. Forwarded connections can be accessed via the following methods:\r\n\
        \x1b[44mHTTP\x1b[0m: http://d8q.tuns.test:41511\r\n\r\n\
        The TCP port \x1b[31m38663\x1b[0m is unavailable. Assigning a random port.\r\n\
        Starting SSH Forwarding service for \x1b[32mtcp:38663\x1b[0m. Forwarded connections can be accessed via the following methods:\r\n\
        \x1b[44mTCP\x1b[0m: tuns.test:14669\r\n\r\n";

    /// Splits a captured session into the lines that follow each forward's reply (sish sends one
    /// block per forward, in request order, after the reply), parsed.
    fn sish_blocks(raw: &str) -> Vec<Vec<ServerLine>> {
        let lines = crate::agent::output::LineBuffer::default().push(raw.as_bytes());
        let mut blocks: Vec<Vec<ServerLine>> = vec![Vec::new()];
        for line in lines.iter().filter_map(|l| crate::agent::output::parse_line(l)) {
            let ends_block = matches!(line, ServerLine::SishAddress { .. });
            blocks.last_mut().unwrap().push(line);
            if ends_block {
                blocks.push(Vec::new());
            }
        }
        blocks.pop();
        blocks
    }

    #[test]
    fn sish_as_captured_name_first_then_user_and_a_random_name_for_the_second_holder() {
        let first = sish_blocks(SISH_FIRST);
        assert_eq!(first.len(), 3);
        let w = |kind, r, reply, lines: &[ServerLine]| watch(Dialect::Sish, kind, r, reply, lines);
        assert_eq!(
            w(TunnelKind::Http, req("app", 80), 80, &first[0]),
            Some(Placement::Public("http://app-alice.tuns.test:41511".into()))
        );
        assert_eq!(
            w(TunnelKind::Tcp, req("localhost", 38663), 38663, &first[1]),
            Some(Placement::Public("tuns.test:38663".into()))
        );
        assert_eq!(
            w(TunnelKind::Tcp, req("localhost", 0), 44597, &first[2]),
            Some(Placement::Public("tuns.test:44597".into()))
        );
        let second = sish_blocks(SISH_SECOND);
        assert_eq!(second.len(), 2);
        for (kind, r, lines) in
            [(TunnelKind::Http, req("app", 80), &second[0]), (TunnelKind::Tcp, req("localhost", 38663), &second[1])]
        {
            let p = w(kind, r, 38663, lines);
            assert!(matches!(p, Some(Placement::NotAsRequested(ref why)) if why.contains("unavailable")), "{p:?}");
        }
        // The random name alone, without the notice, is not ours either.
        let random = [second[0][1].clone(), second[0][2].clone()];
        assert!(matches!(w(TunnelKind::Http, req("app", 80), 80, &random), Some(Placement::NotAsRequested(_))));
    }

    #[test]
    fn sish_random_name_is_not_as_requested() {
        let unavailable = ServerLine::SishUnavailable { what: "subdomain alice-demo.tuns.sh".into() };
        let lines = [unavailable, block("http", "80"), addr("HTTPS", "https://xyz.tuns.sh")];
        let p = watch(Dialect::Sish, TunnelKind::Http, req("demo", 80), 80, &lines).unwrap();
        assert!(matches!(p, Placement::NotAsRequested(ref why) if why.contains("unavailable")), "{p:?}");
        // Even without the notice, a host that does not carry the name is refused.
        let lines = [block("http", "80"), addr("HTTPS", "https://xyz.tuns.sh")];
        assert!(matches!(
            watch(Dialect::Sish, TunnelKind::Http, req("demo", 80), 80, &lines),
            Some(Placement::NotAsRequested(_))
        ));
        // A name that merely contains ours is not ours.
        let lines = [block("http", "80"), addr("HTTPS", "https://alice-demox.tuns.sh")];
        assert!(matches!(
            watch(Dialect::Sish, TunnelKind::Http, req("demo", 80), 80, &lines),
            Some(Placement::NotAsRequested(_))
        ));
    }

    #[test]
    fn sish_tcp_checks_the_printed_port_not_the_reply() {
        // sish echoes the requested port in its reply even when it bound another.
        let lines = [block("tcp", "5432"), addr("TCP", "nue.tuns.sh:41234")];
        assert!(matches!(
            watch(Dialect::Sish, TunnelKind::Tcp, req("localhost", 5432), 5432, &lines),
            Some(Placement::NotAsRequested(_))
        ));
        let lines = [block("tcp", "5432"), addr("TCP", "nue.tuns.sh:5432")];
        assert_eq!(
            watch(Dialect::Sish, TunnelKind::Tcp, req("localhost", 5432), 5432, &lines),
            Some(Placement::Public("nue.tuns.sh:5432".into()))
        );
    }

    #[test]
    fn sish_custom_domain_must_match_exactly() {
        let lines = [block("http", "80"), addr("HTTPS", "https://app.example.com")];
        assert_eq!(
            watch(Dialect::Sish, TunnelKind::Http, req("app.example.com", 80), 80, &lines),
            Some(Placement::Public("https://app.example.com".into()))
        );
    }

    #[test]
    fn sandhole_matches_by_name_and_port() {
        let lines = [
            ServerLine::SandholeHttp { url: "http://other.sandhole.test:8080".into(), requested: "other".into() },
            ServerLine::SandholeHttp { url: "http://app.sandhole.test:8080".into(), requested: "app".into() },
            ServerLine::SandholeTcp { address: "sandhole.test:46099".into(), port: 46099 },
        ];
        assert_eq!(
            watch(Dialect::Sandhole, TunnelKind::Http, req("app", 80), 80, &lines),
            Some(Placement::Public("http://app.sandhole.test:8080".into()))
        );
        assert_eq!(
            watch(Dialect::Sandhole, TunnelKind::Tcp, req("localhost", 0), 46099, &lines),
            Some(Placement::Public("sandhole.test:46099".into()))
        );
        assert_eq!(watch(Dialect::Sandhole, TunnelKind::Tcp, req("localhost", 1), 0, &lines), None);
    }

    #[test]
    fn openssh_address_comes_from_the_reply() {
        assert_eq!(
            watch(Dialect::Openssh, TunnelKind::Tcp, req("", 0), 40001, &[]),
            Some(Placement::Public("nue.tuns.sh:40001".into()))
        );
        assert_eq!(
            watch(Dialect::Openssh, TunnelKind::Tcp, req("", 5432), 0, &[]),
            Some(Placement::Public("nue.tuns.sh:5432".into()))
        );
    }
}
