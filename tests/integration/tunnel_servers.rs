//! Proof that the tunnel servers are real: an OpenSSH client's `ssh -R` carries an HTTP request
//! to a local backend through each of them -- by Host header on sish's and sandhole's HTTP port,
//! and by a public TCP port on all three.

use std::time::Duration;

use picotun_testground::http::Backend;
use picotun_testground::tunnels::public_tcp_spec;
use picotun_testground::{Error, ServerKind, SishOptions, SshClientKey, TunnelServer};

use crate::support::expect_body;

struct Fixture {
    server: TunnelServer,
    key: SshClientKey,
    backend: Backend,
    _keys: tempfile::TempDir,
}

async fn fixture(kind: ServerKind) -> Option<Fixture> {
    let keys = tempfile::tempdir().unwrap();
    let key = SshClientKey::generate(keys.path(), "client", "ed25519").unwrap();
    let server = match TunnelServer::start(kind.clone(), &[&key]).await {
        Ok(s) => s,
        // sish cannot be built on this machine (see docs/TESTING.md); its tests say so and pass
        // unless PICOTUN_REQUIRE_SISH is set.
        Err(e @ Error::MissingBinary { .. }) if matches!(kind, ServerKind::Sish(_)) => {
            if std::env::var_os("PICOTUN_REQUIRE_SISH").is_some() {
                panic!("{e}");
            }
            eprintln!("SKIPPED: {e}");
            return None;
        }
        Err(e) => panic!("{} did not start: {e}", kind.name()),
    };
    let backend = Backend::start(kind.name()).await.unwrap();
    Some(Fixture { server, key, backend, _keys: keys })
}

async fn http_by_host_header(kind: ServerKind) {
    let Some(f) = fixture(kind).await else { return };
    let spec = format!("app:80:127.0.0.1:{}", f.backend.port());
    let mut ssh = f.server.ssh_forward(&f.key, "alice", &spec, "ssh-http").unwrap();
    let host = f.server.http_host("alice", "app");
    let http = format!("127.0.0.1:{}", f.server.http_port().unwrap());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(ssh.is_running(), "ssh -R {spec} exited: {}", ssh.log_tail(20));
    expect_body(&http, &host, "/", &f.backend.greeting()).await;
    // An unknown name must not reach the backend.
    let before = f.backend.requests();
    let other = picotun_testground::http::get(&http, &f.server.http_host("alice", "nope"), "/").await.unwrap();
    assert_ne!(other.status, 200, "an unknown host is not served");
    assert_eq!(f.backend.requests(), before);
}

async fn public_tcp_port(kind: ServerKind) {
    let Some(f) = fixture(kind).await else { return };
    let (public, spec) = public_tcp_spec(f.server.kind(), f.backend.port());
    let mut ssh = f.server.ssh_forward(&f.key, "alice", &spec, "ssh-tcp").unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(ssh.is_running(), "ssh -R {spec} exited: {}", ssh.log_tail(20));
    expect_body(&format!("127.0.0.1:{public}"), "anything", "/", &f.backend.greeting()).await;
    assert!(f.backend.requests() >= 1);
}

#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn sandhole_http_by_host_header() {
    http_by_host_header(ServerKind::Sandhole(Default::default())).await;
}

#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn sandhole_public_tcp_port() {
    public_tcp_port(ServerKind::Sandhole(Default::default())).await;
}

#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn sshd_public_tcp_port() {
    public_tcp_port(ServerKind::Sshd).await;
}

#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn sish_http_by_host_header() {
    http_by_host_header(ServerKind::Sish(SishOptions::default())).await;
}

#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn sish_public_tcp_port() {
    public_tcp_port(ServerKind::Sish(SishOptions::default())).await;
}

#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn sish_with_load_balancer_serves_one_name_from_two_clients() {
    let Some(f) = fixture(ServerKind::Sish(SishOptions { load_balancer: true, ..Default::default() })).await else {
        return;
    };
    let second = Backend::start("second").await.unwrap();
    let _a = f.server.ssh_forward(&f.key, "alice", &format!("app:80:127.0.0.1:{}", f.backend.port()), "ssh-a").unwrap();
    let _b = f.server.ssh_forward(&f.key, "alice", &format!("app:80:127.0.0.1:{}", second.port()), "ssh-b").unwrap();
    let http = format!("127.0.0.1:{}", f.server.http_port().unwrap());
    let host = f.server.http_host("alice", "app");
    expect_body(&http, &host, "/", &f.backend.greeting()).await;
    expect_body(&http, &host, "/", &second.greeting()).await;
}

/// Fault tests need a server that can crash and come back on the same address with the same key.
#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn servers_can_be_killed_and_restarted() {
    for kind in [ServerKind::Sshd, ServerKind::Sandhole(Default::default())] {
        let Some(mut f) = fixture(kind).await else { return };
        let (public, spec) = public_tcp_spec(f.server.kind(), f.backend.port());
        let mut first = f.server.ssh_forward(&f.key, "alice", &spec, "ssh-before").unwrap();
        expect_body(&format!("127.0.0.1:{public}"), "x", "/", &f.backend.greeting()).await;

        let old_pid = f.server.pid().unwrap();
        f.server.kill();
        // The client notices the dead server and exits; the public port is gone.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while first.is_running() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!first.is_running(), "{}: ssh exits when the server dies", f.server.kind().name());
        // (Another test may have taken the freed port number by now: only ask that it is not ours.)
        let served = picotun_testground::http::get(&format!("127.0.0.1:{public}"), "x", "/").await;
        assert!(served.map(|r| r.body != f.backend.greeting()).unwrap_or(true), "the public port died with the server");

        f.server.restart().await.unwrap();
        assert_ne!(f.server.pid().unwrap(), old_pid);
        // Same port, same pinned host key: a new client gets through again.
        let _second = f.server.ssh_forward(&f.key, "alice", &spec, "ssh-after").unwrap();
        expect_body(&format!("127.0.0.1:{public}"), "x", "/", &f.backend.greeting()).await;
    }
}
