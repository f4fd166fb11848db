//! picotun: expose Kubernetes workloads to the internet through pico.sh SSH tunnels.
//!
//! One binary, three modes -- `webhook` (injects the tunnel sidecar), `controller` (routes to
//! tunnels, status back) and `agent` (the sidecar). See docs/ARCHITECTURE.md.
#![forbid(unsafe_code)]

pub mod admin;
pub mod agent;
pub mod api;
pub mod ca_cli;
pub mod certs;
pub mod cli;
pub mod controller;
pub mod explain;
pub mod index;
pub mod inject_cli;
pub mod resolve;
pub mod shutdown;
pub mod sshca;
pub mod telemetry;
pub mod tunnel;
pub mod webhook;

/// The version this binary was built from.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
