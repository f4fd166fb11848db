//! What a sidecar reports about each tunnel: the states the agent's `/status` and its reports to
//! the webhook use, and how a requested name or port is written. The webhook checks reports
//! against these; `explain` prints them.

use serde::Serialize;

use crate::core::tunnel::{TunnelKind, TunnelSpec};

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
