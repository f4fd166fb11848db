//! The tunnel server a sidecar talks to: its address, the SSH user and how it speaks. The agent
//! takes these as flags; the webhook takes the same flags and passes them into every sidecar.

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    /// tuns.sh and any sish: names on port 80, public TCP via `localhost`, `key=value` options.
    Sish,
    /// sandhole: like sish, but bare-word options and cancels by assigned port.
    Sandhole,
    /// Plain OpenSSH sshd: public TCP ports only.
    Openssh,
}

/// Which tunnel server, as whom, in which dialect: shared by the agent and by the webhook, which
/// hands the same settings to every sidecar it injects.
#[derive(Clone, Debug, clap::Args)]
pub struct ServerArgs {
    /// The tunnel server. A regional tuns.sh host (nue.tuns.sh, ash.tuns.sh) keeps tunnels on one
    /// instance.
    #[arg(long, env = "PICOTUN_SERVER", default_value = "tuns.sh")]
    pub server: String,
    #[arg(long, env = "PICOTUN_SERVER_PORT", default_value_t = 22)]
    pub server_port: u16,
    /// The SSH user name (on tuns.sh it matters only when one key is on several accounts).
    #[arg(long, env = "PICOTUN_USER", default_value = "picotun")]
    pub user: String,
    /// How the server speaks: sish (tuns.sh), sandhole, or openssh.
    #[arg(long, env = "PICOTUN_DIALECT", value_enum, default_value = "sish")]
    pub dialect: Dialect,
}
