//! Who a public name belongs to. Across the cluster a tuns name, a custom domain or a fixed public
//! TCP port belongs to one claimant -- an Ingress, an HTTPRoute, TCPRoute or TLSRoute (through its Gateway's
//! listener), or the expose annotations of one namespace -- so that no tenant can ask for another's
//! name and take its traffic on a server that load-balances (or flap it on one that does not).
//!
//! The rule, as the Gateway API resolves conflicts between routes: the oldest claim wins, then the
//! first by namespace/name (then kind). A route's claim is as old as the route
//! (`creationTimestamp`); the expose annotations of a namespace are one claimant, and its claim on
//! a name is as old as the oldest live pod of that namespace asking for it. An object without a
//! creation time (a pod being admitted) is the newest. Later claimants get no tunnel for the name,
//! and a `TunnelConflict` problem naming the owner.
//!
//! An optional allow-list ([`DomainPolicy`], the controller's `--custom-domain-allow`) says which
//! namespaces may use which custom domains; a domain it refuses is no claim at all (it cannot block
//! a namespace that is allowed) and gets a `DomainNotAllowed` problem.
//!
//! Pure: [`ownership`] takes every claim and answers; the controller and the webhook (at
//! admission) ask the same table, so a new pod is never given a name someone else owns.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;

use super::Problem;
use crate::core::api;
use crate::core::tunnel::{TunnelKind, TunnelSpec, is_dns_name};

/// Condition / Event reason for a name that belongs to another claimant.
pub const TUNNEL_CONFLICT: &str = "TunnelConflict";
/// Condition / Event reason for a custom domain the allow-list does not give this namespace.
pub const DOMAIN_NOT_ALLOWED: &str = "DomainNotAllowed";

/// What a tunnel takes on the tunnel server that nobody else may have.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Claim {
    /// An HTTP or TLS name: a tuns name (no dots) or a custom domain. HTTP and TLS share names
    /// on the server (both are served on its HTTPS port), so they are one claim.
    Name(String),
    /// A fixed public TCP port (a port the server picks is nobody's claim).
    TcpPort(u16),
}

impl Claim {
    pub fn of(spec: &TunnelSpec) -> Option<Claim> {
        match spec.kind {
            TunnelKind::Http | TunnelKind::Tls => spec.host.as_deref().map(|h| Claim::Name(h.to_ascii_lowercase())),
            TunnelKind::Tcp => spec.remote_port.filter(|p| *p != 0).map(Claim::TcpPort),
        }
    }

    pub fn custom_domain(&self) -> Option<&str> {
        match self {
            Claim::Name(h) if h.contains('.') => Some(h),
            _ => None,
        }
    }
}

impl fmt::Display for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Claim::Name(h) if h.contains('.') => write!(f, "custom domain {h}"),
            Claim::Name(h) => write!(f, "tuns name {h:?}"),
            Claim::TcpPort(p) => write!(f, "public TCP port {p}"),
        }
    }
}

/// The kinds of object that claim names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ClaimantKind {
    Ingress,
    HTTPRoute,
    TCPRoute,
    TLSRoute,
    /// The `tunnels.pico.sh/expose` annotations of the pods of one namespace, together.
    Expose,
}

/// One claimant. For [`ClaimantKind::Expose`] the name is empty: the namespace is the claimant.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Claimant {
    pub kind: ClaimantKind,
    pub namespace: String,
    pub name: String,
}

impl Claimant {
    pub fn ingress(namespace: &str, name: &str) -> Claimant {
        Claimant { kind: ClaimantKind::Ingress, namespace: namespace.into(), name: name.into() }
    }

    /// `kind` is `HTTPRoute`, `TCPRoute` or `TLSRoute`.
    pub fn route(kind: &str, namespace: &str, name: &str) -> Claimant {
        let kind = match kind {
            "TCPRoute" => ClaimantKind::TCPRoute,
            "TLSRoute" => ClaimantKind::TLSRoute,
            _ => ClaimantKind::HTTPRoute,
        };
        Claimant { kind, namespace: namespace.into(), name: name.into() }
    }

    pub fn expose(namespace: &str) -> Claimant {
        Claimant { kind: ClaimantKind::Expose, namespace: namespace.into(), name: String::new() }
    }
}

impl fmt::Display for Claimant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ClaimantKind::Expose => write!(f, "the {} annotations of namespace {}", api::EXPOSE, self.namespace),
            kind => write!(f, "{kind:?} {}/{}", self.namespace, self.name),
        }
    }
}

/// A claimant asking for a claim, since a time (None: not created yet, the newest of all).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ask {
    pub claimant: Claimant,
    pub claim: Claim,
    pub since: Option<Timestamp>,
    /// For expose annotations: the oldest pod asking (said in messages).
    pub via: Option<String>,
}

impl Ask {
    /// Oldest first, then namespace/name, then kind; not-yet-created last.
    fn rank(&self) -> (bool, Option<Timestamp>, &str, &str, ClaimantKind) {
        (self.since.is_none(), self.since, &self.claimant.namespace, &self.claimant.name, self.claimant.kind)
    }

    /// The claimant, the pod (expose annotations) and since when, for messages.
    pub fn describe(&self) -> String {
        let via = self.via.as_deref().map(|p| format!(", pod {p}")).unwrap_or_default();
        match self.since {
            Some(t) => format!("{}{via}, asking since {}", self.claimant, t.strftime("%Y-%m-%dT%H:%M:%SZ")),
            None => format!("{}{via}", self.claimant),
        }
    }
}

/// One `--custom-domain-allow` rule: namespace `namespace` (or `*`, every namespace) may use
/// `pattern`, a domain (`app.example.com`) or every name under one (`*.example.com`, any depth).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainRule {
    pub namespace: String,
    pub pattern: String,
}

impl DomainRule {
    fn matches(&self, namespace: &str, host: &str) -> bool {
        let namespace_ok = self.namespace == "*" || self.namespace == namespace;
        let host_ok = match self.pattern.strip_prefix("*.") {
            Some(suffix) => host.strip_suffix(suffix).is_some_and(|rest| rest.len() > 1 && rest.ends_with('.')),
            None => self.pattern == host,
        };
        namespace_ok && host_ok
    }
}

impl fmt::Display for DomainRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.namespace, self.pattern)
    }
}

/// Parses `NAMESPACE=PATTERN` (clap value parser for `--custom-domain-allow`).
pub fn parse_domain_rule(s: &str) -> Result<DomainRule, String> {
    let (namespace, pattern) =
        s.split_once('=').map(|(n, p)| (n.trim(), p.trim().to_ascii_lowercase())).ok_or_else(|| {
            format!("{s:?} is not NAMESPACE=DOMAIN (e.g. team-a=*.a.example.com or team-b=b.example.com)")
        })?;
    if namespace.is_empty() {
        return Err(format!("{s:?}: the namespace is empty (use * for every namespace)"));
    }
    let name = pattern.strip_prefix("*.").unwrap_or(&pattern);
    if !is_dns_name(name) || !name.contains('.') {
        return Err(format!(
            "{s:?}: {pattern:?} is not a custom domain or *.domain (tuns names without dots are always allowed)"
        ));
    }
    Ok(DomainRule { namespace: namespace.into(), pattern })
}

/// Which namespaces may use which custom domains. No rules: every namespace may use any.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DomainPolicy {
    pub rules: Vec<DomainRule>,
}

impl DomainPolicy {
    pub fn new(rules: Vec<DomainRule>) -> DomainPolicy {
        DomainPolicy { rules }
    }

    /// True if `namespace` may ask for `host`. Tuns names (no dots) are always allowed.
    pub fn allows(&self, namespace: &str, host: &str) -> bool {
        self.rules.is_empty() || !host.contains('.') || self.rules.iter().any(|r| r.matches(namespace, host))
    }

    fn refusal(&self, claimant: &Claimant, host: &str) -> Problem {
        let for_others: Vec<String> =
            self.rules.iter().filter(|r| r.matches(&r.namespace, host)).map(|r| r.to_string()).collect();
        let allowed = if for_others.is_empty() {
            "no rule allows it".to_string()
        } else {
            format!("it is allowed by {}", for_others.join(", "))
        };
        Problem {
            reason: DOMAIN_NOT_ALLOWED,
            message: format!(
                "custom domain {host} is not allowed for namespace {} (picotun's --custom-domain-allow: {allowed}): {} gets no tunnel for it",
                claimant.namespace, claimant
            ),
        }
    }
}

/// Comma-separated rules (one `--custom-domain-allow` value); empty: none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DomainRules(pub Vec<DomainRule>);

/// Parses `NS=DOMAIN[,NS=DOMAIN...]`; an empty value is no rule (an unset setting in a ConfigMap).
pub fn parse_domain_rules(s: &str) -> Result<DomainRules, String> {
    s.split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(parse_domain_rule)
        .collect::<Result<_, _>>()
        .map(DomainRules)
}

/// `picotun controller` flag (the webhook can flatten the same, so both ask one policy).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct DomainArgs {
    /// Which namespaces may use which custom domains: NAMESPACE=DOMAIN or NAMESPACE=*.DOMAIN
    /// (any depth), NAMESPACE `*` for every namespace; repeatable and/or comma-separated. None
    /// given (or empty): every namespace may use any custom domain. Tuns names are not affected.
    #[arg(long = "custom-domain-allow", env = "PICOTUN_CUSTOM_DOMAIN_ALLOW", value_parser = parse_domain_rules, action = clap::ArgAction::Append)]
    pub custom_domain_allow: Vec<DomainRules>,
}

impl DomainArgs {
    pub fn policy(&self) -> DomainPolicy {
        DomainPolicy::new(self.custom_domain_allow.iter().flat_map(|r| r.0.iter().cloned()).collect())
    }
}

/// Who owns each claim.
#[derive(Clone, Debug, Default)]
pub struct Ownership {
    owners: BTreeMap<Claim, Ask>,
    policy: DomainPolicy,
}

/// The owner of every claim asked for: the oldest allowed ask (see the module documentation).
pub fn ownership(asks: impl IntoIterator<Item = Ask>, policy: &DomainPolicy) -> Ownership {
    let mut table = Ownership { owners: BTreeMap::new(), policy: policy.clone() };
    table.add(asks);
    table
}

impl Ownership {
    /// The same table with more asks: what [`ownership`] gives for all of them together (the
    /// owner of a claim is its best-ranked allowed ask, whatever order they come in).
    pub fn with_asks(&self, asks: impl IntoIterator<Item = Ask>) -> Ownership {
        let mut table = self.clone();
        table.add(asks);
        table
    }

    fn add(&mut self, asks: impl IntoIterator<Item = Ask>) {
        for ask in asks {
            if let Some(host) = ask.claim.custom_domain()
                && !self.policy.allows(&ask.claimant.namespace, host)
            {
                continue;
            }
            match self.owners.get(&ask.claim) {
                Some(best) if best.rank() <= ask.rank() => {}
                _ => {
                    self.owners.insert(ask.claim.clone(), ask);
                }
            }
        }
    }

    pub fn owner(&self, claim: &Claim) -> Option<&Ask> {
        self.owners.get(claim)
    }

    pub fn policy(&self) -> &DomainPolicy {
        &self.policy
    }

    /// May `claimant` open a tunnel for `claim`? A claim nobody else asks for is its own (a pod
    /// being admitted asks for names not in the table yet).
    pub fn check_claim(&self, claimant: &Claimant, claim: &Claim) -> Result<(), Problem> {
        if let Some(host) = claim.custom_domain()
            && !self.policy.allows(&claimant.namespace, host)
        {
            return Err(self.policy.refusal(claimant, host));
        }
        match self.owners.get(claim) {
            Some(owner) if owner.claimant != *claimant => Err(Problem {
                reason: TUNNEL_CONFLICT,
                message: format!(
                    "{claim} belongs to {} (the oldest claim wins, then namespace/name): {claimant} gets no tunnel for it",
                    owner.describe()
                ),
            }),
            _ => Ok(()),
        }
    }

    pub fn check(&self, claimant: &Claimant, spec: &TunnelSpec) -> Result<(), Problem> {
        Claim::of(spec).map_or(Ok(()), |c| self.check_claim(claimant, &c))
    }

    /// The specs `claimant` may open, and a problem for each claim it may not (once per claim).
    pub fn keep(&self, claimant: &Claimant, specs: Vec<TunnelSpec>) -> (Vec<TunnelSpec>, Vec<Problem>) {
        let mut kept = Vec::new();
        let mut problems: Vec<Problem> = Vec::new();
        for spec in specs {
            match self.check(claimant, &spec) {
                Ok(()) => kept.push(spec),
                Err(p) => {
                    if !problems.contains(&p) {
                        problems.push(p);
                    }
                }
            }
        }
        (kept, problems)
    }
}

/// The asks of the expose annotations of live pods (only their metadata is read: the webhook
/// keeps nothing more of pods). Named target ports do not matter to what is asked for.
pub fn expose_asks<'a>(pods: impl IntoIterator<Item = &'a ObjectMeta>) -> Vec<Ask> {
    let mut out = Vec::new();
    for meta in pods {
        if meta.deletion_timestamp.is_some() {
            continue;
        }
        let (Some(namespace), Some(value)) =
            (meta.namespace.as_deref(), meta.annotations.as_ref().and_then(|a| a.get(api::EXPOSE)))
        else {
            continue;
        };
        let Ok(specs) = api::parse_expose(value, |_| Some(1)) else { continue };
        for spec in specs {
            if let Some(claim) = Claim::of(&spec) {
                out.push(Ask {
                    claimant: Claimant::expose(namespace),
                    claim,
                    since: meta.creation_timestamp.as_ref().map(|t| t.0),
                    via: meta.name.clone(),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The webhook adds a new pod's asks to a table resolved earlier: the same owners as
    /// resolving all the asks together, whichever comes first.
    #[test]
    fn adding_asks_to_a_table_gives_the_table_of_all_of_them() {
        let at = |y: i16| {
            Some(
                k8s_openapi::jiff::civil::date(y, 1, 1)
                    .at(0, 0, 0, 0)
                    .to_zoned(k8s_openapi::jiff::tz::TimeZone::UTC)
                    .unwrap()
                    .timestamp(),
            )
        };
        let ask = |ns: &str, name: &str, since, via: Option<&str>| Ask {
            claimant: Claimant::ingress(ns, "web"),
            claim: Claim::Name(name.into()),
            since,
            via: via.map(str::to_string),
        };
        let all = vec![
            ask("a", "demo", at(2024), None),
            ask("b", "demo", at(2023), None),
            ask("c", "other", at(2025), None),
            ask("d", "other", None, Some("new-pod")),
            ask("e", "fresh", None, Some("new-pod")),
        ];
        let policy = DomainPolicy::default();
        let together = ownership(all.clone(), &policy);
        for split in 0..=all.len() {
            let (before, after) = all.split_at(split);
            let added = ownership(before.to_vec(), &policy).with_asks(after.to_vec());
            for claim in ["demo", "other", "fresh"] {
                let claim = Claim::Name(claim.into());
                assert_eq!(
                    added.owner(&claim).map(|a| &a.claimant),
                    together.owner(&claim).map(|a| &a.claimant),
                    "{claim} with the first {split} asks resolved before"
                );
            }
        }
        assert_eq!(together.owner(&Claim::Name("demo".into())).unwrap().claimant, Claimant::ingress("b", "web"));
        assert_eq!(together.owner(&Claim::Name("other".into())).unwrap().claimant, Claimant::ingress("c", "web"));
    }
    use serde_json::json;

    fn at(s: &str) -> Option<Timestamp> {
        Some(s.parse().unwrap())
    }

    fn ask(claimant: Claimant, claim: Claim, since: Option<Timestamp>) -> Ask {
        Ask { claimant, claim, since, via: None }
    }

    fn name(h: &str) -> Claim {
        Claim::Name(h.into())
    }

    #[test]
    fn the_oldest_claim_wins_then_namespace_and_name() {
        let a = Claimant::ingress("team-a", "web");
        let b = Claimant::route("HTTPRoute", "team-b", "web");
        let c = Claimant::expose("team-c");
        let o = ownership(
            [
                ask(b.clone(), name("demo"), at("2024-01-01T00:00:00Z")),
                ask(a.clone(), name("demo"), at("2025-01-01T00:00:00Z")),
                ask(c.clone(), Claim::TcpPort(5432), None),
                ask(a.clone(), name("same-time"), at("2024-06-01T00:00:00Z")),
                ask(b.clone(), name("same-time"), at("2024-06-01T00:00:00Z")),
            ],
            &DomainPolicy::default(),
        );
        assert_eq!(o.owner(&name("demo")).unwrap().claimant, b, "older");
        assert_eq!(o.owner(&name("same-time")).unwrap().claimant, a, "same age: team-a/web before team-b/web");
        assert_eq!(o.owner(&Claim::TcpPort(5432)).unwrap().claimant, c, "the only claimant, not created yet");
        let err = o.check_claim(&a, &name("demo")).unwrap_err();
        assert_eq!(err.reason, TUNNEL_CONFLICT);
        assert!(err.message.contains("HTTPRoute team-b/web") && err.message.contains("2024-01-01"), "{}", err.message);
        assert!(o.check_claim(&b, &name("demo")).is_ok());
        assert!(o.check_claim(&a, &name("nobody-asks")).is_ok(), "a claim nobody else asks for is free");
    }

    #[test]
    fn a_claimant_not_created_yet_loses_to_every_existing_one() {
        let old = Claimant::expose("old");
        let new = Claimant::expose("new");
        let o = ownership(
            [ask(new.clone(), name("demo"), None), ask(old.clone(), name("demo"), at("2020-01-01T00:00:00Z"))],
            &DomainPolicy::default(),
        );
        assert_eq!(o.owner(&name("demo")).unwrap().claimant, old);
        assert!(o.check_claim(&new, &name("demo")).is_err());
    }

    #[test]
    fn the_allow_list_refuses_domains_and_refused_asks_claim_nothing() {
        let rules = ["team-a=*.a.example.com", "team-b=b.example.com", "*=shared.example.com"];
        let policy = DomainPolicy::new(rules.iter().map(|r| parse_domain_rule(r).unwrap()).collect());
        assert!(policy.allows("team-a", "x.a.example.com"));
        assert!(policy.allows("team-a", "y.x.a.example.com"), "any depth");
        assert!(!policy.allows("team-a", "a.example.com"), "*.d does not cover d itself");
        assert!(!policy.allows("team-a", "xa.example.com"));
        assert!(!policy.allows("team-b", "x.a.example.com"));
        assert!(policy.allows("team-b", "b.example.com"));
        assert!(policy.allows("anyone", "shared.example.com"));
        assert!(policy.allows("anyone", "demo"), "tuns names are not affected");
        assert!(DomainPolicy::default().allows("anyone", "x.a.example.com"), "no rules: all allowed");

        // team-b asked first, but may not have it: team-a, allowed, owns it.
        let a = Claimant::ingress("team-a", "web");
        let b = Claimant::ingress("team-b", "web");
        let o = ownership(
            [
                ask(b.clone(), name("x.a.example.com"), at("2020-01-01T00:00:00Z")),
                ask(a.clone(), name("x.a.example.com"), at("2025-01-01T00:00:00Z")),
            ],
            &policy,
        );
        assert_eq!(o.owner(&name("x.a.example.com")).unwrap().claimant, a);
        let refused = o.check_claim(&b, &name("x.a.example.com")).unwrap_err();
        assert_eq!(refused.reason, DOMAIN_NOT_ALLOWED);
        assert!(refused.message.contains("team-a=*.a.example.com"), "{}", refused.message);

        for bad in ["team-a", "=x.example.com", "team-a=demo", "team-a=*.", "team-a=Bad_Name.com"] {
            assert!(parse_domain_rule(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_domain_rules("").unwrap(), DomainRules::default(), "an empty setting is no rule");
        assert_eq!(parse_domain_rules(" a=x.example.com , b=*.y.example.com ").unwrap().0.len(), 2);
        assert!(parse_domain_rules("a=x.example.com,bad").is_err());
    }

    #[test]
    fn expose_annotations_ask_per_namespace_dated_by_the_oldest_pod_asking() {
        let pod = |ns: &str, name: &str, created: &str, expose: &str| -> ObjectMeta {
            serde_json::from_value(json!({"name": name, "namespace": ns, "creationTimestamp": created,
                "annotations": {"tunnels.pico.sh/expose": expose}}))
            .unwrap()
        };
        let mut deleting = pod("a", "going", "2019-01-01T00:00:00Z", "http:demo=80");
        deleting.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time("2025-01-01T00:00:00Z".parse().unwrap()));
        let pods = [
            pod("a", "a-2", "2023-01-01T00:00:00Z", "http:demo=web, tcp:5432=5432"),
            pod("a", "a-1", "2022-01-01T00:00:00Z", "http:demo=8080"),
            pod("b", "b-1", "2021-01-01T00:00:00Z", "tcp:5432=5432, tcp:any=80"),
            pod("b", "broken", "2000-01-01T00:00:00Z", "nonsense"),
            deleting,
        ];
        let asks = expose_asks(&pods);
        assert_eq!(asks.len(), 4, "{asks:?}");
        let o = ownership(asks, &DomainPolicy::default());
        let demo = o.owner(&name("demo")).unwrap();
        assert_eq!((demo.claimant.clone(), demo.via.as_deref()), (Claimant::expose("a"), Some("a-1")));
        assert_eq!(o.owner(&Claim::TcpPort(5432)).unwrap().claimant, Claimant::expose("b"));
        let err = o.check_claim(&Claimant::expose("a"), &Claim::TcpPort(5432)).unwrap_err();
        assert!(err.message.contains("namespace b, pod b-1"), "{}", err.message);
    }

    #[test]
    fn http_and_tls_share_names_and_tcp_any_is_no_claim() {
        let spec = |kind: TunnelKind, host: Option<&str>, port: Option<u16>| TunnelSpec {
            name: "t".into(),
            kind,
            host: host.map(str::to_string),
            remote_port: port,
            target_port: 1,
            options: Default::default(),
            standby: false,
        };
        assert_eq!(Claim::of(&spec(TunnelKind::Http, Some("Demo"), None)), Some(name("demo")));
        assert_eq!(Claim::of(&spec(TunnelKind::Tls, Some("demo"), None)), Some(name("demo")));
        assert_eq!(Claim::of(&spec(TunnelKind::Tcp, None, Some(0))), None);
        assert_eq!(Claim::of(&spec(TunnelKind::Tcp, None, None)), None);
        assert_eq!(Claim::of(&spec(TunnelKind::Tcp, None, Some(22))), Some(Claim::TcpPort(22)));
    }
}
