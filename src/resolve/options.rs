//! Server options from Kubernetes: the per-connection options a tunnel server takes
//! (`proxy-protocol=2`, `force-https=true`, ...), set the Gateway API way and for Ingresses by
//! annotation, validated against the server's dialect, and written into each tunnel's
//! `TunnelSpec::options` (the agent opens one SSH connection per option set).
//!
//! Where they come from, later overriding earlier key by key:
//! 1. the GatewayClass's `spec.parametersRef`: a ConfigMap (group "", kind ConfigMap, namespace
//!    required), its data keys the options;
//! 2. the Gateway's `spec.infrastructure.parametersRef`: a ConfigMap in the Gateway's namespace;
//! 3. for an Ingress, the annotation [`OPTIONS_ANNOTATION`]: `proxy-protocol=2 force-https=true`.
//!
//! A key the dialect does not take, or a value it cannot mean, is a problem naming the key
//! (reason [`INVALID_PARAMETERS`], as the Gateway API names it) and the whole set is not used:
//! the tunnels open without options rather than with half of them. Nothing else is lost.
//!
//! Pure: the controller reads the ConfigMaps (by name, `get` only) and hands their data in.

use std::collections::BTreeMap;

use super::Problem;
use crate::core::server::Dialect;

/// The Ingress annotation: space- or comma-separated `key=value` server options.
pub const OPTIONS_ANNOTATION: &str = "tunnels.pico.sh/options";

/// Condition reason (GatewayClass / Gateway Accepted=False, as the Gateway API names it) and
/// Event reason for options that cannot be used.
pub const INVALID_PARAMETERS: &str = "InvalidParameters";

/// Server options, key to value.
pub type Options = BTreeMap<String, String>;

/// A ConfigMap a parametersRef names: (namespace, name) -> its data, or None when it does not
/// exist (or cannot be read).
pub type ConfigMaps = BTreeMap<(String, String), Option<BTreeMap<String, String>>>;

/// What one key may be set to.
#[derive(Clone, Copy)]
enum Value {
    Bool,
    OneOf(&'static [&'static str]),
    /// A host name (DNS name, lower case).
    Host,
}

/// The options each dialect takes from Kubernetes. Options that change what a tunnel *is*
/// (`sni-proxy`, `tcp-alias`, `local-forward`, `tcp-address`) are picotun's to set from the
/// listener or route kind, not the user's; timing options (`deadline`, `auto-close`) would end
/// a tunnel picotun is asked to keep open.
fn accepted(dialect: Dialect) -> &'static [(&'static str, Value)] {
    match dialect {
        // sish: each gated by a server flag (tuns.sh's gates are not published).
        Dialect::Sish => &[
            ("proxy-protocol", Value::OneOf(&["1", "2"])),
            ("force-https", Value::Bool),
            ("strip-path", Value::Bool),
            ("host-header", Value::Host),
        ],
        // sandhole: bare-word switches; no PROXY protocol.
        Dialect::Sandhole => &[("force-https", Value::Bool)],
        // Plain sshd has no per-connection options.
        Dialect::Openssh => &[],
    }
}

/// The keys `dialect` takes, for messages.
fn keys(dialect: Dialect) -> String {
    let ks: Vec<&str> = accepted(dialect).iter().map(|(k, _)| *k).collect();
    if ks.is_empty() { "none".to_string() } else { ks.join(", ") }
}

fn dialect_name(dialect: Dialect) -> &'static str {
    match dialect {
        Dialect::Sish => "sish",
        Dialect::Sandhole => "sandhole",
        Dialect::Openssh => "openssh",
    }
}

/// Checks every option against `dialect`; `source` says where they came from (for the message).
pub fn validate(dialect: Dialect, options: &Options, source: &str) -> Result<(), Problem> {
    for (key, value) in options {
        let Some((_, kind)) = accepted(dialect).iter().find(|(k, _)| k == key) else {
            return Err(Problem {
                reason: INVALID_PARAMETERS,
                message: format!(
                    "{source}: option {key:?} is not one a {} server takes from Kubernetes (it takes: {}); no option of {source} is used",
                    dialect_name(dialect),
                    keys(dialect)
                ),
            });
        };
        let ok = match kind {
            Value::Bool => matches!(value.as_str(), "true" | "false"),
            Value::OneOf(values) => values.contains(&value.as_str()),
            Value::Host => crate::core::tunnel::is_dns_name(value),
        };
        if !ok {
            let want = match kind {
                Value::Bool => "true or false".to_string(),
                Value::OneOf(values) => values.join(" or "),
                Value::Host => "a DNS name".to_string(),
            };
            return Err(Problem {
                reason: INVALID_PARAMETERS,
                message: format!(
                    "{source}: option {key:?} is {value:?}, it must be {want}; no option of {source} is used"
                ),
            });
        }
    }
    Ok(())
}

/// Parses the Ingress annotation: `key=value` tokens separated by spaces or commas.
pub fn parse_annotation(text: &str) -> Result<Options, Problem> {
    let mut out = Options::new();
    for token in text.split([' ', ',', '\n', '\t']).filter(|t| !t.is_empty()) {
        let Some((k, v)) = token.split_once('=').filter(|(k, v)| !k.is_empty() && !v.is_empty()) else {
            return Err(Problem {
                reason: INVALID_PARAMETERS,
                message: format!(
                    "annotation {OPTIONS_ANNOTATION}: {token:?} is not key=value (e.g. \"proxy-protocol=2\"); no option is used"
                ),
            });
        };
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// A parametersRef as written: group, kind, namespace (None for a Gateway's local reference),
/// name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParametersRef {
    pub group: String,
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
}

/// The options a parametersRef gives. `None` ref: no options. `what` names the referring object
/// (`GatewayClass pico-tunnel`); `default_namespace` is the Gateway's for a local reference.
pub fn from_ref(
    dialect: Dialect,
    what: &str,
    r: Option<&ParametersRef>,
    default_namespace: Option<&str>,
    config_maps: &ConfigMaps,
) -> Result<Options, Problem> {
    let Some(r) = r else { return Ok(Options::new()) };
    if !r.group.is_empty() || r.kind != "ConfigMap" {
        return Err(Problem {
            reason: INVALID_PARAMETERS,
            message: format!(
                "{what}: parametersRef is a {}/{}; picotun takes its server options from a ConfigMap (group \"\", kind ConfigMap)",
                r.group, r.kind
            ),
        });
    }
    let Some(ns) = r.namespace.as_deref().or(default_namespace) else {
        return Err(Problem {
            reason: INVALID_PARAMETERS,
            message: format!("{what}: parametersRef to ConfigMap {} needs a namespace", r.name),
        });
    };
    let source = format!("ConfigMap {ns}/{} ({what}'s parametersRef)", r.name);
    let data = config_maps.get(&(ns.to_string(), r.name.clone())).cloned().flatten().ok_or_else(|| Problem {
        reason: INVALID_PARAMETERS,
        message: format!("{source} does not exist (or picotun may not read it)"),
    })?;
    validate(dialect, &data, &source)?;
    Ok(data)
}

/// The GatewayClass's options overridden key by key by the Gateway's.
pub fn merged(class: &Options, gateway: &Options) -> Options {
    let mut out = class.clone();
    out.extend(gateway.iter().map(|(k, v)| (k.clone(), v.clone())));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> Options {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn each_dialect_takes_its_own_keys_and_a_bad_one_is_named() {
        assert!(validate(Dialect::Sish, &opts(&[("proxy-protocol", "2"), ("force-https", "true")]), "x").is_ok());
        let bad = validate(Dialect::Sish, &opts(&[("proxy-protocol", "3")]), "ConfigMap a/b").unwrap_err();
        assert_eq!(bad.reason, INVALID_PARAMETERS);
        assert!(bad.message.contains("\"proxy-protocol\"") && bad.message.contains("1 or 2"), "{}", bad.message);
        let unknown = validate(Dialect::Sish, &opts(&[("sni-proxy", "true")]), "ConfigMap a/b").unwrap_err();
        assert!(
            unknown.message.contains("\"sni-proxy\"") && unknown.message.contains("proxy-protocol"),
            "{}",
            unknown.message
        );
        let sandhole = validate(Dialect::Sandhole, &opts(&[("proxy-protocol", "2")]), "x").unwrap_err();
        assert!(sandhole.message.contains("sandhole"), "{}", sandhole.message);
        assert!(validate(Dialect::Sandhole, &opts(&[("force-https", "true")]), "x").is_ok());
        let openssh = validate(Dialect::Openssh, &opts(&[("force-https", "true")]), "x").unwrap_err();
        assert!(openssh.message.contains("takes: none"), "{}", openssh.message);
        assert!(validate(Dialect::Sish, &opts(&[("host-header", "Not A Host")]), "x").is_err());
    }

    #[test]
    fn the_annotation_is_key_value_tokens() {
        assert_eq!(
            parse_annotation("proxy-protocol=2, force-https=true").unwrap(),
            opts(&[("proxy-protocol", "2"), ("force-https", "true")])
        );
        assert_eq!(parse_annotation("  ").unwrap(), Options::new());
        let e = parse_annotation("proxy-protocol").unwrap_err();
        assert!(e.message.contains("not key=value"), "{}", e.message);
    }

    #[test]
    fn parameters_refs_name_config_maps() {
        let maps: ConfigMaps = BTreeMap::from([
            (("infra".into(), "opts".into()), Some(BTreeMap::from([("proxy-protocol".into(), "2".into())]))),
            (("infra".into(), "bad".into()), Some(BTreeMap::from([("deadline".into(), "1h".into())]))),
            (("infra".into(), "gone".into()), None),
        ]);
        let r = |kind: &str, ns: Option<&str>, name: &str| ParametersRef {
            group: String::new(),
            kind: kind.into(),
            namespace: ns.map(str::to_string),
            name: name.into(),
        };
        let from = |x: &ParametersRef, default: Option<&str>| {
            from_ref(Dialect::Sish, "GatewayClass c", Some(x), default, &maps)
        };
        assert_eq!(from(&r("ConfigMap", Some("infra"), "opts"), None).unwrap(), opts(&[("proxy-protocol", "2")]));
        assert_eq!(from(&r("ConfigMap", None, "opts"), Some("infra")).unwrap(), opts(&[("proxy-protocol", "2")]));
        let bad = from(&r("ConfigMap", Some("infra"), "bad"), None).unwrap_err();
        assert!(bad.message.contains("\"deadline\"") && bad.message.contains("ConfigMap infra/bad"), "{}", bad.message);
        assert!(from(&r("ConfigMap", Some("infra"), "gone"), None).unwrap_err().message.contains("does not exist"));
        assert!(from(&r("ConfigMap", Some("infra"), "unknown"), None).is_err());
        assert!(from(&r("Secret", Some("infra"), "opts"), None).unwrap_err().message.contains("from a ConfigMap"));
        assert!(from(&r("ConfigMap", None, "opts"), None).unwrap_err().message.contains("needs a namespace"));
        assert_eq!(from_ref(Dialect::Sish, "x", None, None, &maps).unwrap(), Options::new());
        assert_eq!(
            merged(&opts(&[("proxy-protocol", "1"), ("force-https", "true")]), &opts(&[("proxy-protocol", "2")])),
            opts(&[("proxy-protocol", "2"), ("force-https", "true")])
        );
    }
}
