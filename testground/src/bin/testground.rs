//! `testground serve --state-dir DIR`: runs the test ground in the foreground until SIGTERM or
//! SIGINT -- the control plane with a real node beside the kwok nodes, plus sshd, sandhole and
//! sish (each reachable from pods at the node's address), with one client key authorized on all
//! of them -- and writes `DIR/env.sh` with shell exports.
//! `scripts/testground up|down` runs it in the background for people.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use picotun_testground::kube_ground::StartOptions;
use picotun_testground::node::NODE_IP;
use picotun_testground::{ControlPlane, ServerKind, SishOptions, SshClientKey, TunnelServer, bins};
use tokio::signal::unix::{SignalKind, signal};

const USAGE: &str = "usage: testground serve --state-dir DIR";

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("testground: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let state_dir = match args.as_slice() {
        [cmd, flag, dir] if cmd == "serve" && flag == "--state-dir" => PathBuf::from(dir),
        _ => return Err(USAGE.into()),
    };
    let started = Instant::now();
    // A previous run's state is stale: its processes are gone (`down`, or the reaper).
    for stale in ["keys", "cluster", "env.sh"] {
        let path = state_dir.join(stale);
        let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
    }
    let keys_dir = state_dir.join("keys");
    std::fs::create_dir_all(&keys_dir)?;
    let key = SshClientKey::generate(&keys_dir, "client_ed25519", "ed25519")?;

    eprintln!("[testground] starting etcd, kube-apiserver, controller-manager, scheduler, a real node, kwok ...");
    let plane =
        ControlPlane::start(StartOptions { keep_dir: true, dir: Some(state_dir.join("cluster")), real_node: true })
            .await?;
    eprintln!("[testground] control plane ready after {:.1}s", started.elapsed().as_secs_f32());

    let mut servers = Vec::new();
    for kind in [ServerKind::Sshd, ServerKind::Sandhole(Default::default()), ServerKind::Sish(SishOptions::default())] {
        servers.push(TunnelServer::start(kind.clone(), &[&key]).await?);
    }
    // Pods on the real node reach each server's SSH port at the node's address.
    let node = plane.real_node().ok_or("the ground started without its real node")?;
    for s in &servers {
        node.bridge(s.ssh_port())?;
    }

    let mut env = String::new();
    writeln!(env, "# written by `scripts/testground up`; source it to use the ground")?;
    writeln!(env, "export KUBECONFIG={}", plane.kubeconfig().display())?;
    writeln!(env, "export PATH={}:\"$PATH\"", bins::bin_dir().display())?;
    writeln!(env, "export PICOTUN_GROUND_DIR={}", state_dir.display())?;
    writeln!(env, "export PICOTUN_SSH_KEY={}", key.private_key.display())?;
    let mut summary = String::new();
    for s in &servers {
        let upper = s.kind().name().to_uppercase();
        writeln!(env, "export PICOTUN_{upper}_SSH={}", s.ssh_addr())?;
        writeln!(env, "export PICOTUN_{upper}_KNOWN_HOSTS={}", s.known_hosts().display())?;
        writeln!(env, "export PICOTUN_{upper}_SSH_FROM_PODS={NODE_IP}:{}", s.ssh_port())?;
        write!(summary, "  {:<9} ssh {} (from pods {NODE_IP}:{})", s.kind().name(), s.ssh_addr(), s.ssh_port())?;
        if let Some(p) = s.http_port() {
            writeln!(env, "export PICOTUN_{upper}_HTTP=127.0.0.1:{p}")?;
            write!(summary, "  http 127.0.0.1:{p}")?;
        }
        writeln!(summary, "  (log {})", s.dir().display())?;
    }
    writeln!(summary, "  node      {} at {NODE_IP} (logs {}/log)", node.name(), node.dir().display())?;
    let env_file = state_dir.join("env.sh");
    std::fs::write(&env_file, &env)?;
    println!(
        "[testground] ready in {:.1}s\n  kubeconfig {}\n  logs       {}\n{summary}  exports    {}",
        started.elapsed().as_secs_f32(),
        plane.kubeconfig().display(),
        plane.dir().display(),
        env_file.display()
    );

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    eprintln!("[testground] stopping");
    drop(servers);
    plane.stop();
    let _ = std::fs::remove_file(&env_file);
    Ok(())
}
