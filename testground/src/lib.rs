//! picotun's test ground: a real Kubernetes control plane (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler, kwok) and real SSH tunnel servers (sish, sandhole,
//! OpenSSH sshd), run as local processes on 127.0.0.1.
//!
//! The binaries are built by `scripts/build-testground` into `~/.cache/picotun/bin/current`
//! (override with `PICOTUN_TESTGROUND_BIN`). Nothing here builds anything: a missing binary is an
//! error that says which command to run.
//!
//! ```no_run
//! # async fn t() -> Result<(), picotun_testground::Error> {
//! use picotun_testground::{ControlPlane, Existing};
//! let ground = ControlPlane::shared(Existing::Allowed).await?; // one per test binary
//! let ns = ground.namespace("my-test").await?;                  // one per test
//! let client = ground.client().await?;                          // one per tokio runtime
//! # Ok(()) }
//! ```

pub mod bins;
pub mod cert_manager;
pub mod crds;
pub mod crossns;
pub mod http;
pub mod kube_ground;
pub mod node;
pub mod pki;
pub mod process;
pub mod tunnels;

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use kube_ground::{ControlPlane, Existing, TestNamespace};
pub use process::Proc;
pub use tunnels::{SandholeOptions, ServerKind, SishOptions, SshClientKey, TunnelServer};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "test-ground binary `{name}` not found in {dir}: run `scripts/build-testground` (or set \
         PICOTUN_TESTGROUND_BIN to a directory holding it){hint}"
    )]
    MissingBinary { name: String, dir: PathBuf, hint: String },
    #[error("could not start {name}: {source}")]
    Spawn { name: String, source: std::io::Error },
    #[error("{name} exited unexpectedly; its log {log} ends with:\n{tail}")]
    Exited { name: String, log: PathBuf, tail: String },
    #[error("timed out after {after:?} waiting for {what}{detail}")]
    Timeout { what: String, after: Duration, detail: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("certificate generation failed: {0}")]
    Pki(String),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    #[error("{0}")]
    Setup(String),
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io { path: path.to_path_buf(), source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A port on 127.0.0.1 that was free a moment ago, and that this process has not handed out
/// before.
///
/// It is picked below the kernel's ephemeral range (`ip_local_port_range`, 32768-60999 by
/// default), because that range is where the kernel puts every outgoing connection's source
/// port and every listener on port 0: a port taken from it is free when probed and may be some
/// other socket's a moment later, before the server it was meant for binds it (seen in CI:
/// sish's "bind: address already in use"). Below the range only an explicit bind takes a port,
/// and those are ours. Once a probe socket is closed the kernel would also give the same port
/// to the next bind of port 0 readily (274 repeats in 3000 binds here), hence the record of
/// what was handed out.
pub fn free_port() -> u16 {
    use rand::Rng;
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    let below_ephemeral = PORTS_FROM..ephemeral_ports_start();
    let tries = if below_ephemeral.is_empty() { 0 } else { 10_000 };
    let mut rng = rand::rng();
    for _ in 0..tries {
        let port = rng.random_range(below_ephemeral.clone());
        if !handed_out.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.insert(port);
            return port;
        }
    }
    // A machine whose ephemeral range starts too low to leave room: the kernel's pick.
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("binding 127.0.0.1:0 must work on any machine that runs these tests");
        if handed_out.insert(port) {
            return port;
        }
    }
}

/// The lowest port [`free_port`] hands out: above the fixed ports of the parts the ground runs
/// (the kubelet's 10248-10259, cert-manager's 9402-9403, etcd's 2379-2380).
const PORTS_FROM: u16 = 20_000;

/// The first port of the kernel's ephemeral range.
fn ephemeral_ports_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

pub(crate) fn write_file(path: &Path, contents: impl AsRef<[u8]>) -> Result<()> {
    std::fs::write(path, contents).map_err(|e| Error::io(path, e))
}

/// Polls `check` every `every` until it returns `Some`, or fails after `timeout` with the last
/// reason `check` gave (via `Err`).
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, every: Duration, check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<Option<T>, String>>,
{
    wait_for_unless(what, timeout, every, || None, check).await
}

/// Like [`wait_for`], but gives up at once when `fatal` returns an error (a process that was
/// supposed to come up has exited, say).
pub async fn wait_for_unless<T, F, Fut>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut fatal: impl FnMut() -> Option<Error>,
    mut check: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<Option<T>, String>>,
{
    let start = Instant::now();
    let mut last = String::new();
    loop {
        if let Some(e) = fatal() {
            return Err(e);
        }
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(reason) => last = reason,
        }
        if start.elapsed() >= timeout {
            let detail = if last.is_empty() { String::new() } else { format!(" (last: {last})") };
            return Err(Error::Timeout { what: what.to_string(), after: timeout, detail });
        }
        tokio::time::sleep(every).await;
    }
}

/// A short random lowercase suffix for names.
pub fn random_suffix() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..6).map(|_| (b'a' + rng.random_range(0..26)) as char).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn ports_come_from_below_the_ephemeral_range() {
        let start = super::ephemeral_ports_start();
        assert!(start > super::PORTS_FROM, "this machine's ephemeral range starts at {start}");
        for _ in 0..200 {
            let port = super::free_port();
            assert!((super::PORTS_FROM..start).contains(&port), "{port} is not in {}..{start}", super::PORTS_FROM);
        }
    }

    #[test]
    fn a_port_is_handed_out_once() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..3000 {
            assert!(seen.insert(super::free_port()), "a port was handed out twice");
        }
    }
}
