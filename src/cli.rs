//! Command line: one binary, one subcommand per mode.

use clap::{Parser, Subcommand};

use crate::agent::AgentArgs;
use crate::ca_cli::CaArgs;
use crate::certs::CertsArgs;
use crate::controller::ControllerArgs;
use crate::telemetry::LogFormat;
use crate::webhook::WebhookArgs;
use crate::webhook::explain::ExplainArgs;
use crate::webhook::inject_cli::InjectArgs;

#[derive(Debug, Parser)]
#[command(name = "picotun", version, about = "Expose Kubernetes workloads through pico.sh SSH tunnels")]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `picotun=debug,russh=warn`.
    #[arg(long, global = true, env = "PICOTUN_LOG", default_value = "info")]
    pub log_filter: String,
    #[arg(long, global = true, env = "PICOTUN_LOG_FORMAT", value_enum, default_value = "plain")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The tunnel sidecar: opens the pod's forwards and relays connections to the app.
    Agent(AgentArgs),
    /// The mutating admission webhook that injects the sidecar into pods as they are created.
    Webhook(Box<WebhookArgs>),
    /// Resolves Ingresses and Gateway API routes to the pods behind them, tells each pod's
    /// sidecar which tunnels to open, and writes the public addresses back into status.
    Controller(ControllerArgs),
    /// Prints the injected version of Pods and workloads (multi-document YAML), as the webhook
    /// would inject them.
    Inject(InjectArgs),
    /// Generates a CA and the webhook's serving certificate (for clusters without cert-manager)
    /// and prints the caBundle.
    Certs(CertsArgs),
    /// Says whether a pod or workload in the cluster would be injected, why, and with which tunnels.
    Explain(ExplainArgs),
    /// Makes (or imports) the SSH CA the webhook signs each sidecar's short-lived certificate with,
    /// as a Secret manifest for `kubectl apply`, and says how to register it with pico.sh.
    Ca(CaArgs),
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
