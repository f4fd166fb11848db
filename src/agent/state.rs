//! What the agent knows about its tunnels, shared by the connection tasks (writers) and the
//! admin port (/ready, /status, /metrics readers).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use std::fmt::Write as _;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::core::tunnel::{TunnelKind, TunnelSpec};

pub use crate::core::report::{ForwardState, requested_label};

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TunnelStatus {
    pub name: String,
    pub kind: TunnelKind,
    /// What was asked for: `demo`, `tcp:5432`, `tcp:any`.
    pub requested: String,
    pub target_port: u16,
    pub state: ForwardState,
    /// The address the server really assigned, as it reported it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Unix seconds of the last state change.
    pub since: u64,
    /// Filled in by `snapshot` from the open connections.
    pub active_connections: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TunnelLabels {
    pub tunnel: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub tunnel: String,
    pub state: ForwardState,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    /// From the visitor to the app.
    In,
    /// From the app to the visitor.
    Out,
}

// Lower-case label values, as Prometheus users expect.
impl EncodeLabelValue for ForwardState {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        encoder.write_str(self.as_str())
    }
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        encoder.write_str(match self {
            Direction::In => "in",
            Direction::Out => "out",
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub tunnel: String,
    pub direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// The agent's Prometheus metrics.
#[derive(Default)]
pub struct Metrics {
    pub tunnel_state: Family<StateLabels, Gauge>,
    pub connections_total: Family<TunnelLabels, Counter>,
    pub connections_active: Family<TunnelLabels, Gauge>,
    pub bytes_total: Family<BytesLabels, Counter>,
    pub ssh_connects_total: Counter,
    pub reconnects_total: Counter,
    pub errors_total: Family<ReasonLabels, Counter>,
    pub config_reloads_total: Family<ReasonLabels, Counter>,
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("picotun_agent");
        r.register("tunnel_state", "1 for the state each tunnel is in", self.tunnel_state.clone());
        r.register("connections", "Proxied connections accepted", self.connections_total.clone());
        r.register("connections_active", "Proxied connections open now", self.connections_active.clone());
        r.register("bytes", "Bytes proxied, by direction (in = towards the app)", self.bytes_total.clone());
        r.register("ssh_connects", "SSH connections established", self.ssh_connects_total.clone());
        r.register("reconnects", "SSH reconnect attempts after a failure or loss", self.reconnects_total.clone());
        r.register("errors", "Errors by reason", self.errors_total.clone());
        r.register(
            "config_reloads",
            "Tunnels file loads by result (ok, invalid, unreadable)",
            self.config_reloads_total.clone(),
        );
    }

    /// Counts a tunnels-file load: `ok`, `invalid` or `unreadable`.
    pub fn config_reload(&self, result: &str) {
        self.config_reloads_total.get_or_create(&ReasonLabels { reason: result.to_string() }).inc();
    }

    pub fn error(&self, reason: &str) {
        self.errors_total.get_or_create(&ReasonLabels { reason: reason.to_string() }).inc();
    }
}

/// Shared state of one agent.
#[derive(Default)]
pub struct AgentState {
    tunnels: Mutex<BTreeMap<String, TunnelStatus>>,
    /// Open visitor connections by tunnel name. Apart from `tunnels`, whose entries come and go
    /// with the configuration: a removed tunnel's connections run until they end, and the
    /// shutdown's grace period waits for them too.
    open_connections: Mutex<BTreeMap<String, u64>>,
    config_error: Mutex<Option<String>>,
    config_loaded: AtomicBool,
    tunnels_file_read: AtomicBool,
    draining: AtomicBool,
    generation: AtomicU64,
    pub metrics: Metrics,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl AgentState {
    /// Makes the status list match the configured tunnels: new ones start in `state`, removed
    /// ones disappear (with their metrics), others keep what they have.
    pub fn set_configured(&self, specs: &[TunnelSpec], state: ForwardState) {
        let mut tunnels = self.tunnels.lock().unwrap_or_else(|p| p.into_inner());
        let keep: std::collections::BTreeSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        let removed: Vec<String> = tunnels.keys().filter(|k| !keep.contains(k.as_str())).cloned().collect();
        for name in removed {
            tunnels.remove(&name);
            for s in ForwardState::ALL {
                self.metrics.tunnel_state.remove(&StateLabels { tunnel: name.clone(), state: s });
            }
        }
        for spec in specs {
            let entry = tunnels.entry(spec.name.clone()).or_insert_with(|| TunnelStatus {
                name: spec.name.clone(),
                kind: spec.kind,
                requested: requested_label(spec),
                target_port: spec.target_port,
                state,
                public_address: None,
                message: None,
                since: now(),
                active_connections: 0,
            });
            entry.kind = spec.kind;
            entry.requested = requested_label(spec);
            entry.target_port = spec.target_port;
            let current = entry.state;
            self.export_state(&spec.name, current);
        }
        self.config_loaded.store(true, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a state change of one tunnel (ignored for tunnels no longer configured).
    pub fn set_state(&self, name: &str, state: ForwardState, address: Option<String>, message: Option<String>) {
        let mut tunnels = self.tunnels.lock().unwrap_or_else(|p| p.into_inner());
        let Some(t) = tunnels.get_mut(name) else { return };
        if t.state != state || t.public_address != address || t.message != message {
            t.since = now();
        }
        t.state = state;
        t.public_address = address;
        t.message = message;
        self.export_state(name, state);
    }

    fn export_state(&self, name: &str, state: ForwardState) {
        for s in ForwardState::ALL {
            self.metrics
                .tunnel_state
                .get_or_create(&StateLabels { tunnel: name.to_string(), state: s })
                .set(i64::from(s == state));
        }
    }

    pub fn connection_opened(&self, name: &str) {
        let labels = TunnelLabels { tunnel: name.to_string() };
        self.metrics.connections_total.get_or_create(&labels).inc();
        self.metrics.connections_active.get_or_create(&labels).inc();
        *self.open_connections.lock().unwrap_or_else(|p| p.into_inner()).entry(name.to_string()).or_default() += 1;
    }

    pub fn connection_closed(&self, name: &str) {
        self.metrics.connections_active.get_or_create(&TunnelLabels { tunnel: name.to_string() }).dec();
        let mut open = self.open_connections.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(name) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(name);
            }
        }
    }

    pub fn add_bytes(&self, name: &str, direction: Direction, n: u64) {
        self.metrics.bytes_total.get_or_create(&BytesLabels { tunnel: name.to_string(), direction }).inc_by(n);
    }

    pub fn set_config_error(&self, error: Option<String>) {
        *self.config_error.lock().unwrap_or_else(|p| p.into_inner()) = error;
    }

    pub fn config_error(&self) -> Option<String> {
        self.config_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The tunnels file has been read (valid or not: a broken one is reported in /status).
    pub fn tunnels_file_read(&self) {
        self.tunnels_file_read.store(true, Ordering::Relaxed);
    }

    /// Ready (the sidecar's readinessProbe) once the tunnels file has been read, until draining.
    /// Tunnel state is deliberately not part of it: a tunnel server's outage must not take the
    /// pod out of its Services (see [`AgentState::tunnels_up`] for the opt-in startup gate).
    pub fn is_ready(&self) -> bool {
        self.tunnels_file_read.load(Ordering::Relaxed) && !self.is_draining()
    }

    /// `/tunnels-up`: Ok when a configuration has loaded, nothing is draining, and every tunnel
    /// is established -- or deliberately standing by for a name another replica holds, which
    /// would otherwise hold a rollout on a server without load balancing forever. Otherwise
    /// the reason and the tunnels that are not up.
    pub fn tunnels_up(&self) -> Result<usize, (String, Vec<TunnelStatus>)> {
        if !self.config_loaded.load(Ordering::Relaxed) {
            return Err(("no valid tunnels file has been loaded yet".into(), Vec::new()));
        }
        if self.is_draining() {
            return Err(("shutting down".into(), Vec::new()));
        }
        let tunnels = self.tunnels.lock().unwrap_or_else(|p| p.into_inner());
        let down: Vec<TunnelStatus> = tunnels
            .values()
            .filter(|t| !matches!(t.state, ForwardState::Established | ForwardState::StandingBy))
            .cloned()
            .collect();
        if down.is_empty() {
            Ok(tunnels.len())
        } else {
            Err((format!("{} of {} tunnels are not established", down.len(), tunnels.len()), down))
        }
    }

    pub fn snapshot(&self) -> Vec<TunnelStatus> {
        let tunnels = self.tunnels.lock().unwrap_or_else(|p| p.into_inner());
        let open = self.open_connections.lock().unwrap_or_else(|p| p.into_inner());
        tunnels
            .values()
            .map(|t| TunnelStatus { active_connections: open.get(&t.name).copied().unwrap_or(0), ..t.clone() })
            .collect()
    }

    /// Every open visitor connection of the pod, of configured tunnels and removed ones.
    pub fn total_active_connections(&self) -> u64 {
        self.open_connections.lock().unwrap_or_else(|p| p.into_inner()).values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> TunnelSpec {
        TunnelSpec {
            name: name.into(),
            kind: TunnelKind::Http,
            host: Some(name.into()),
            remote_port: None,
            target_port: 80,
            options: Default::default(),
            standby: false,
        }
    }

    #[test]
    fn ready_once_the_file_is_read_whatever_the_tunnels_do() {
        let s = AgentState::default();
        assert!(!s.is_ready(), "the tunnels file has not been read yet");
        s.tunnels_file_read();
        assert!(s.is_ready(), "read, even before a valid configuration");
        s.set_configured(&[spec("a"), spec("b")], ForwardState::Connecting);
        assert!(s.is_ready(), "tunnels still connecting (the tunnel server may be down)");
        s.set_state("a", ForwardState::Failed, None, Some("refused".into()));
        assert!(s.is_ready());
        s.start_draining();
        assert!(!s.is_ready(), "draining takes the pod out of its Services first");
    }

    #[test]
    fn tunnels_up_only_when_every_tunnel_is_served_or_standing_by() {
        let s = AgentState::default();
        assert!(s.tunnels_up().unwrap_err().0.contains("no valid tunnels file"));
        s.set_configured(&[], ForwardState::Connecting);
        assert_eq!(s.tunnels_up(), Ok(0), "nothing to serve");
        s.set_configured(&[spec("a"), spec("b")], ForwardState::Connecting);
        let (why, down) = s.tunnels_up().unwrap_err();
        assert_eq!(why, "2 of 2 tunnels are not established");
        assert_eq!(down.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        s.set_state("a", ForwardState::Established, Some("https://u-a.tuns.sh".into()), None);
        let (_, down) = s.tunnels_up().unwrap_err();
        assert_eq!(down.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["b"]);
        s.set_state("b", ForwardState::StandingBy, None, Some("held by another replica".into()));
        assert_eq!(s.tunnels_up(), Ok(2));
        s.start_draining();
        assert_eq!(s.tunnels_up().unwrap_err().0, "shutting down");
    }

    /// Defect: the counts lived in the status entries, so a tunnel removed and added back (an
    /// Ingress deleted and re-applied) started again at 0 while its old connections still ran;
    /// as they closed the count went negative, and the pod-wide sum that the shutdown's grace
    /// period waits on said nothing was in flight while connections still were.
    #[test]
    fn open_connections_are_counted_across_configuration_changes() {
        let s = AgentState::default();
        let active =
            |s: &AgentState, name: &str| s.snapshot().iter().find(|t| t.name == name).map(|t| t.active_connections);
        s.set_configured(&[spec("web")], ForwardState::Connecting);
        for _ in 0..3 {
            s.connection_opened("web");
        }
        s.set_configured(&[], ForwardState::Connecting);
        assert_eq!(s.total_active_connections(), 3, "a removed tunnel's connections still run");
        s.set_configured(&[spec("web")], ForwardState::Connecting);
        assert_eq!(active(&s, "web"), Some(3), "added back: its connections are still open");
        s.connection_opened("web");
        for _ in 0..3 {
            s.connection_closed("web");
        }
        assert_eq!(active(&s, "web"), Some(1));
        assert_eq!(s.total_active_connections(), 1, "one still open: the grace period waits for it");
        s.connection_closed("web");
        s.connection_closed("web");
        assert_eq!(active(&s, "web"), Some(0), "never below zero");
        assert_eq!(s.total_active_connections(), 0);
    }

    #[test]
    fn removed_tunnels_leave_status_and_metrics() {
        let s = AgentState::default();
        s.set_configured(&[spec("a"), spec("b")], ForwardState::Connecting);
        s.set_configured(&[spec("b")], ForwardState::Connecting);
        assert_eq!(s.snapshot().iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), vec!["b"]);
        let mut registry = Registry::default();
        s.metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("tunnel=\"b\"") && !text.contains("tunnel=\"a\""), "{text}");
    }
}
