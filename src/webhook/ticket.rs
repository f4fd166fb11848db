//! The injection ticket: what the webhook writes on a pod it injects, so `/report` and
//! `/certificate` can tell its sidecars from a container a pod author named `picotun-agent`.
//!
//! ```text
//! tunnels.pico.sh/injected: v1.<base64url, no padding, of HMAC-SHA256(key,
//!                               namespace \0 serviceAccountName \0 canonical JSON of picotun-agent)>
//! ```
//!
//! The key (32 random bytes) is the webhook's: the Secret `picotun-webhook-ticket` in picotun's
//! namespace, or `--ticket-key-file`. A pod author can copy a ticket but not make one: a copy only
//! verifies on a pod of the same namespace and service account whose agent container is exactly
//! the one the webhook injected -- which is what the webhook would have given that pod anyway.
//!
//! The canonical JSON covers what decides what the container runs and what it can reach (image,
//! command, args, env, mounts and the sources of the volumes it mounts, security context, anything
//! that executes in it), not fields the apiserver fills with defaults after admission (termination
//! message path, probe timings, resources in canonical quantity form, volume modes), so the stored
//! pod verifies as the admitted one did.
//! Pure: no I/O.

use base64::Engine;
use k8s_openapi::api::core::v1::{Container, Pod, Volume, VolumeMount};
use russh::keys::ssh_key::sha2::{Digest, Sha256};
use serde_json::{Map, Value, json};

use crate::core::api;

/// The ticket format's version prefix.
pub const TICKET_VERSION: &str = "v1";
/// Key bytes: at least this many.
pub const KEY_BYTES: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("the ticket key must be at least {KEY_BYTES} bytes, got {0}")]
    TooShort(usize),
}

/// Why a pod's ticket does not verify. The message is the reason a 403 gives.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TicketError {
    #[error("the pod has no {} container", api::SIDECAR_NAME)]
    NoSidecar,
    #[error("the pod carries no {} ticket: picotun's webhook did not inject it", api::INJECTED)]
    Missing,
    #[error("the pod's {} ticket is malformed (expected {TICKET_VERSION}.<base64url>)", api::INJECTED)]
    Malformed,
    #[error(
        "the pod's {} ticket does not match this pod: it was copied from a pod in another namespace or of another \
         service account, or the {} container was changed after picotun injected it",
        api::INJECTED,
        api::SIDECAR_NAME
    )]
    Mismatch,
}

/// The HMAC key. Its Debug shows nothing of it.
#[derive(Clone)]
pub struct TicketKey {
    key: Vec<u8>,
}

impl std::fmt::Debug for TicketKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TicketKey(..)")
    }
}

impl TicketKey {
    pub fn from_bytes(bytes: &[u8]) -> Result<TicketKey, KeyError> {
        if bytes.len() < KEY_BYTES {
            return Err(KeyError::TooShort(bytes.len()));
        }
        Ok(TicketKey { key: bytes.to_vec() })
    }

    /// 32 fresh random bytes (for the Secret the webhook creates).
    pub fn random_bytes() -> [u8; KEY_BYTES] {
        let mut bytes = [0u8; KEY_BYTES];
        rand::Rng::fill(&mut rand::rng(), &mut bytes);
        bytes
    }

    fn mac(&self, namespace: &str, service_account: &str, canonical: &str) -> [u8; 32] {
        let mut message = Vec::new();
        message.extend_from_slice(namespace.as_bytes());
        message.push(0);
        message.extend_from_slice(service_account.as_bytes());
        message.push(0);
        message.extend_from_slice(canonical.as_bytes());
        hmac_sha256(&self.key, &message)
    }

    /// The annotation value for `pod`'s agent container (and the volumes it mounts), for a pod of
    /// `namespace` running as its service account. None without an agent container.
    pub fn ticket(&self, pod: &Pod, namespace: &str) -> Option<String> {
        let mac = self.mac(namespace, service_account_of(pod), &canonical_agent(pod)?);
        Some(format!("{TICKET_VERSION}.{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac)))
    }

    /// Whether `pod`, as it is, carries a ticket this key made for it.
    pub fn verify_pod(&self, pod: &Pod, namespace: &str) -> Result<(), TicketError> {
        let canonical = canonical_agent(pod).ok_or(TicketError::NoSidecar)?;
        let ticket =
            pod.metadata.annotations.as_ref().and_then(|a| a.get(api::INJECTED)).ok_or(TicketError::Missing)?;
        let encoded = ticket.trim().strip_prefix(TICKET_VERSION).and_then(|t| t.strip_prefix('.'));
        let given = encoded
            .and_then(|e| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(e).ok())
            .filter(|m| m.len() == 32)
            .ok_or(TicketError::Malformed)?;
        let want = self.mac(namespace, service_account_of(pod), &canonical);
        if constant_time_eq(&given, &want) { Ok(()) } else { Err(TicketError::Mismatch) }
    }
}

/// The service account a pod runs as (the apiserver sets `default` when none is named).
pub fn service_account_of(pod: &Pod) -> &str {
    let spec = pod.spec.as_ref();
    spec.and_then(|s| s.service_account_name.as_deref())
        .or_else(|| spec.and_then(|s| s.service_account.as_deref()))
        .filter(|s| !s.is_empty())
        .unwrap_or("default")
}

/// The `picotun-agent` container, wherever it is (init or regular; names are unique across both).
pub fn agent_container(pod: &Pod) -> Option<&Container> {
    let spec = pod.spec.as_ref()?;
    spec.init_containers.iter().flatten().chain(spec.containers.iter()).find(|c| c.name == api::SIDECAR_NAME)
}

/// What the ticket covers: the agent container's fields (see [`canonical_container`]) and the
/// source of every volume it mounts -- so a copy cannot swap the tunnels file for a ConfigMap of
/// its own. None without an agent container.
pub fn canonical_agent(pod: &Pod) -> Option<String> {
    let container = agent_container(pod)?;
    let volumes = pod.spec.as_ref().and_then(|s| s.volumes.as_ref());
    let mounted: Map<String, Value> = container
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| {
            let source = volumes
                .and_then(|vs| vs.iter().find(|v| v.name == m.name))
                .map(volume_source)
                .unwrap_or(Value::String("missing".into()));
            (m.name.clone(), source)
        })
        .collect();
    let mut canonical: Value = serde_json::from_str(&canonical_container(container)).expect("canonical JSON parses");
    if !mounted.is_empty() {
        canonical["volumes"] = Value::Object(mounted);
    }
    Some(prune(canonical).unwrap_or(Value::Object(Map::new())).to_string())
}

/// A volume's source without its name and without what the apiserver defaults (modes, the
/// downward API's `apiVersion: v1`, a token's default lifetime).
fn volume_source(v: &Volume) -> Value {
    fn strip(v: &mut Value, parent: &str) {
        match v {
            Value::Object(map) => {
                map.remove("defaultMode");
                map.remove("mode");
                if parent == "fieldRef" && map.get("apiVersion").and_then(Value::as_str) == Some("v1") {
                    map.remove("apiVersion");
                }
                if parent == "serviceAccountToken" && map.get("expirationSeconds").and_then(Value::as_i64) == Some(3600)
                {
                    map.remove("expirationSeconds");
                }
                for (k, child) in map.iter_mut() {
                    strip(child, k);
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|i| strip(i, parent)),
            _ => {}
        }
    }
    let mut source = to(v);
    if let Value::Object(map) = &mut source {
        map.remove("name");
    }
    strip(&mut source, "");
    prune(source).unwrap_or(Value::Null)
}

/// The container fields the ticket covers, as compact JSON with sorted keys and no empty values.
pub fn canonical_container(c: &Container) -> String {
    let exec_of = |p: Option<Value>| p.and_then(|p| p.get("exec").cloned());
    let probes = json!({
        "startupProbe": exec_of(c.startup_probe.as_ref().map(to)),
        "readinessProbe": exec_of(c.readiness_probe.as_ref().map(to)),
        "livenessProbe": exec_of(c.liveness_probe.as_ref().map(to)),
    });
    let lifecycle = c.lifecycle.as_ref().map(|l| {
        json!({
            "postStart": exec_of(l.post_start.as_ref().map(to)),
            "preStop": exec_of(l.pre_stop.as_ref().map(to)),
        })
    });
    let mut security = c.security_context.as_ref().map(to);
    // Filled in by some apiservers after admission; "Default" is what absent means.
    if let Some(Value::Object(s)) = &mut security
        && s.get("procMount").and_then(Value::as_str) == Some("Default")
    {
        s.remove("procMount");
    }
    let projection = json!({
        "name": c.name,
        "image": c.image,
        "command": c.command,
        "args": c.args,
        "workingDir": c.working_dir,
        "env": c.env.as_ref().map(to),
        "envFrom": c.env_from.as_ref().map(to),
        "volumeMounts": c.volume_mounts.as_ref().map(|mounts| {
            // `readOnly: false` is stored as absent (a plain bool the apiserver omits).
            mounts.iter().map(|m| to(&VolumeMount { read_only: m.read_only.filter(|r| *r), ..m.clone() })).collect::<Vec<_>>()
        }),
        "volumeDevices": c.volume_devices.as_ref().map(to),
        "securityContext": security,
        "restartPolicy": c.restart_policy,
        "lifecycleExec": lifecycle,
        "probeExec": probes,
        // Plain bools: false is stored as absent.
        "stdin": c.stdin.filter(|b| *b),
        "stdinOnce": c.stdin_once.filter(|b| *b),
        "tty": c.tty.filter(|b| *b),
    });
    prune(projection).unwrap_or(Value::Object(Map::new())).to_string()
}

fn to<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// Drops nulls, empty strings, empty arrays and empty objects (what the apiserver omits), at
/// every depth; `None` when nothing is left. `false` and `0` stay: for pointer fields they mean
/// something different from "absent" (`allowPrivilegeEscalation: false`).
fn prune(v: Value) -> Option<Value> {
    match v {
        Value::Null => None,
        Value::String(s) if s.is_empty() => None,
        Value::Array(items) => {
            let items: Vec<Value> = items.into_iter().filter_map(prune).collect();
            (!items.is_empty()).then_some(Value::Array(items))
        }
        Value::Object(map) => {
            let map: Map<String, Value> = map.into_iter().filter_map(|(k, v)| prune(v).map(|v| (k, v))).collect();
            (!map.is_empty()).then_some(Value::Object(map))
        }
        other => Some(other),
    }
}

/// HMAC-SHA256 (RFC 2104) over the SHA-256 in the tree.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut block = [0u8; BLOCK];
    if key.len() > BLOCK {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.map(|b| b ^ byte);
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(message).finalize();
    let outer = Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize();
    outer.into()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2: key "Jefe".
        assert_eq!(
            hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block (131 bytes of 0xaa).
        assert_eq!(
            hex(&hmac_sha256(&[0xaa; 131], b"Test Using Larger Than Block-Size Key - Hash Key First")),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    fn agent(extra: Value) -> Container {
        let mut c = json!({
            "name": "picotun-agent", "image": "ghcr.io/picotun/picotun:1", "args": ["agent"],
            "env": [{"name": "PICOTUN_SERVER", "value": "tuns.sh"}],
            "volumeMounts": [{"name": "picotun-report-token", "mountPath": "/var/run/secrets/tunnels.pico.sh/report", "readOnly": true}],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": "picotun-admin"}, "periodSeconds": 5},
            "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true},
            "restartPolicy": "Always",
        });
        c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::from_value(c).unwrap()
    }

    fn pod(namespace: &str, sa: Option<&str>, container: Container, ticket: Option<String>) -> Pod {
        let mut p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": namespace},
            "spec": {"containers": [{"name": "app", "image": "app"}], "initContainers": [container],
                     "volumes": [{"name": "picotun-report-token", "projected": {"defaultMode": 292, "sources": [
                         {"serviceAccountToken": {"audience": "tunnels.pico.sh", "expirationSeconds": 3600, "path": "token"}}]}}]},
        }))
        .unwrap();
        p.spec.as_mut().unwrap().service_account_name = sa.map(str::to_string);
        if let Some(t) = ticket {
            p.metadata.annotations = Some([(api::INJECTED.to_string(), t)].into());
        }
        p
    }

    #[test]
    fn a_ticket_verifies_on_its_pod_only() {
        let key = TicketKey::from_bytes(&[9; 32]).unwrap();
        let c = agent(json!({}));
        let ticket = key.ticket(&pod("team-a", Some("web"), c.clone(), None), "team-a").unwrap();
        assert!(ticket.starts_with("v1.") && !ticket.contains('=') && !ticket.contains('+'), "{ticket}");
        assert_eq!(key.verify_pod(&pod("team-a", Some("web"), c.clone(), Some(ticket.clone())), "team-a"), Ok(()));

        let refused = |p: Pod, ns: &str| key.verify_pod(&p, ns).unwrap_err();
        let t = || Some(ticket.clone());
        assert_eq!(refused(pod("team-b", Some("web"), c.clone(), t()), "team-b"), TicketError::Mismatch);
        assert_eq!(refused(pod("team-a", Some("admin"), c.clone(), t()), "team-a"), TicketError::Mismatch);
        let changed = agent(json!({"image": "evil/agent:1"}));
        assert_eq!(refused(pod("team-a", Some("web"), changed, t()), "team-a"), TicketError::Mismatch);
        let exec = agent(json!({"lifecycle": {"postStart": {"exec": {"command": ["sh", "-c", "cat token"]}}}}));
        assert_eq!(refused(pod("team-a", Some("web"), exec, t()), "team-a"), TicketError::Mismatch);
        // The same container over a volume of another kind (a ConfigMap of the author's).
        let mut swapped = pod("team-a", Some("web"), c.clone(), t());
        swapped.spec.as_mut().unwrap().volumes = Some(vec![
            serde_json::from_value(json!({"name": "picotun-report-token", "configMap": {"name": "mine"}})).unwrap(),
        ]);
        assert_eq!(refused(swapped, "team-a"), TicketError::Mismatch);
        let other_key = TicketKey::from_bytes(&[8; 32]).unwrap();
        assert_eq!(
            other_key.verify_pod(&pod("team-a", Some("web"), c.clone(), t()), "team-a"),
            Err(TicketError::Mismatch)
        );
        assert_eq!(refused(pod("team-a", Some("web"), c.clone(), None), "team-a"), TicketError::Missing);
        for bad in ["", "v1.", "v2.abc", "v1.!!!", "v1.AAAA"] {
            assert_eq!(
                refused(pod("team-a", Some("web"), c.clone(), Some(bad.into())), "team-a"),
                TicketError::Malformed,
                "{bad}"
            );
        }
        let mut plain = pod("team-a", Some("web"), c, None);
        plain.spec.as_mut().unwrap().init_containers = None;
        assert_eq!(key.verify_pod(&plain, "team-a"), Err(TicketError::NoSidecar));
        assert_eq!(key.ticket(&plain, "team-a"), None);
    }

    #[test]
    fn no_service_account_is_default() {
        let key = TicketKey::from_bytes(&[9; 32]).unwrap();
        let c = agent(json!({}));
        let ticket = key.ticket(&pod("team-a", Some("default"), c.clone(), None), "team-a");
        assert_eq!(key.verify_pod(&pod("team-a", None, c, ticket), "team-a"), Ok(()));
    }

    #[test]
    fn volume_defaults_do_not_change_the_ticket() {
        let key = TicketKey::from_bytes(&[9; 32]).unwrap();
        let admitted = pod("team-a", Some("web"), agent(json!({})), None);
        let mut stored = admitted.clone();
        stored.spec.as_mut().unwrap().volumes = Some(vec![
            serde_json::from_value(json!(
            {"name": "picotun-report-token", "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"audience": "tunnels.pico.sh", "path": "token"}}]}}))
            .unwrap(),
        ]);
        assert_eq!(canonical_agent(&admitted), canonical_agent(&stored));
        stored.metadata.annotations =
            Some([(api::INJECTED.to_string(), key.ticket(&admitted, "team-a").unwrap())].into());
        assert_eq!(key.verify_pod(&stored, "team-a"), Ok(()));
    }

    #[test]
    fn what_the_apiserver_fills_in_after_admission_does_not_change_the_ticket() {
        let admitted = agent(json!({}));
        let stored = agent(json!({
            "terminationMessagePath": "/dev/termination-log",
            "terminationMessagePolicy": "File",
            "imagePullPolicy": "IfNotPresent",
            "readinessProbe": {"httpGet": {"path": "/ready", "port": "picotun-admin", "scheme": "HTTP"},
                               "periodSeconds": 5, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3},
            "resources": {"limits": {"cpu": "500m"}},
            "ports": [{"containerPort": 7426, "protocol": "TCP"}],
            "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "procMount": "Default"},
            "command": [],
        }));
        assert_eq!(canonical_container(&admitted), canonical_container(&stored));
        // But what changes what runs, or what it can reach, does.
        for changed in [
            json!({"args": ["agent", "--debug"]}),
            json!({"command": ["/bin/sh"]}),
            json!({"env": [{"name": "PICOTUN_SERVER", "value": "evil.example"}]}),
            json!({"volumeMounts": []}),
            json!({"securityContext": {"allowPrivilegeEscalation": true, "readOnlyRootFilesystem": true}}),
            json!({"securityContext": {"readOnlyRootFilesystem": true}}),
            json!({"readinessProbe": {"exec": {"command": ["cat", "/var/run/secrets/tunnels.pico.sh/report/token"]}}}),
            json!({"tty": true}),
        ] {
            assert_ne!(canonical_container(&admitted), canonical_container(&agent(changed.clone())), "{changed}");
        }
        // Sorted keys, no whitespace: the same bytes every time.
        let text = canonical_container(&admitted);
        assert!(text.starts_with(r#"{"args":["agent"],"env":"#), "{text}");
    }

    #[test]
    fn short_keys_are_refused_and_never_shown() {
        assert_eq!(TicketKey::from_bytes(&[1; 16]).unwrap_err(), KeyError::TooShort(16));
        let key = TicketKey::from_bytes(&[0x41; 32]).unwrap();
        assert_eq!(format!("{key:?}"), "TicketKey(..)");
        assert_ne!(TicketKey::random_bytes(), TicketKey::random_bytes());
    }
}
