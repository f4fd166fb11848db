//! Proof that the tunnel servers are real: an OpenSSH client's `ssh -R` carries an HTTP request
//! to a local backend through each of them -- by Host header on sish's and sandhole's HTTP port,
//! and by a public TCP port on all three -- and that sish shares a name only when its load
//! balancer is on.

use std::time::Duration;

use picotun_testground::http::Backend;
use picotun_testground::tunnels::public_tcp_spec;
use picotun_testground::{ServerKind, SishOptions, SshClientKey, TunnelServer};

use crate::support::expect_body;

struct Fixture {
    server: TunnelServer,
    key: SshClientKey,
    backend: Backend,
    _keys: tempfile::TempDir,
}

/// A started server or a failed test: a missing binary (sish included) fails with the error that
/// says how to build it.
async fn fixture(kind: ServerKind) -> Fixture {
    let keys = tempfile::tempdir().unwrap();
    let key = SshClientKey::generate(keys.path(), "client", "ed25519").unwrap();
    let server = TunnelServer::start(kind.clone(), &[&key])
        .await
        .unwrap_or_else(|e| panic!("{} did not start: {e}", kind.name()));
    let backend = Backend::start(kind.name()).await.unwrap();
    Fixture { server, key, backend, _keys: keys }
}

async fn http_by_host_header(kind: ServerKind) {
    let f = fixture(kind).await;
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
    let f = fixture(kind).await;
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
    let f = fixture(ServerKind::Sish(SishOptions { load_balancer: true, ..Default::default() })).await;
    let second = Backend::start("second").await.unwrap();
    let _a = f.server.ssh_forward(&f.key, "alice", &format!("app:80:127.0.0.1:{}", f.backend.port()), "ssh-a").unwrap();
    let _b = f.server.ssh_forward(&f.key, "alice", &format!("app:80:127.0.0.1:{}", second.port()), "ssh-b").unwrap();
    let http = format!("127.0.0.1:{}", f.server.http_port().unwrap());
    let host = f.server.http_host("alice", "app");
    expect_body(&http, &host, "/", &f.backend.greeting()).await;
    expect_body(&http, &host, "/", &second.greeting()).await;
}

/// sish as tuns.sh runs it: a name held by one connection is not shared. A second client asking
/// for it is given a random name instead (sish prints `The subdomain app-alice.tuns.test is
/// unavailable. Assigning a random subdomain.` on its session channel), so every visitor of the
/// name reaches the first client's backend.
#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn sish_without_load_balancer_keeps_a_name_with_its_first_client() {
    let f = fixture(ServerKind::Sish(SishOptions::default())).await;
    let second = Backend::start("second").await.unwrap();
    let http = format!("127.0.0.1:{}", f.server.http_port().unwrap());
    let host = f.server.http_host("alice", "app");
    let mut a =
        f.server.ssh_forward(&f.key, "alice", &format!("app:80:127.0.0.1:{}", f.backend.port()), "ssh-a").unwrap();
    expect_body(&http, &host, "/", &f.backend.greeting()).await;
    let mut b = f.server.ssh_forward(&f.key, "alice", &format!("app:80:127.0.0.1:{}", second.port()), "ssh-b").unwrap();
    // The second forward is in place once sish logged it (under whatever name it was given).
    let log = f.server.dir().join("sish.log");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(&log).unwrap_or_default().matches("forwarding started").count() < 2 {
        assert!(b.is_running(), "the second client stays connected: {}", b.log_tail(20));
        assert!(
            tokio::time::Instant::now() < deadline,
            "sish never took the second forward: {}",
            f.server.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..6 {
        expect_body(&http, &host, "/", &f.backend.greeting()).await;
    }
    assert_eq!(second.requests(), 0, "the second client got none of the name's visitors");
    assert!(a.is_running() && b.is_running());
}

/// Fault tests need a server that can crash and come back on the same address with the same key.
#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn servers_can_be_killed_and_restarted() {
    for kind in [ServerKind::Sish(SishOptions::default()), ServerKind::Sshd, ServerKind::Sandhole(Default::default())] {
        let mut f = fixture(kind).await;
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
