//! Proof that the tunnel servers are real: an OpenSSH client's `ssh -R` carries an HTTP request
//! to a local backend through each of them -- by Host header on sish's and sandhole's HTTP port,
//! and by a public TCP port on all three -- and that sish shares a name only when its load
//! balancer is on.

use std::time::Duration;

use picotun_testground::http::Backend;
use picotun_testground::tunnels::{SshdOptions, public_tcp_spec};
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

/// `ssh-keygen -s ca -I id -n principals -V validity` on a copy of `key`'s public half; the
/// certificate file.
fn sign_with_ssh_keygen(
    ca: &SshClientKey,
    key: &SshClientKey,
    dir: &std::path::Path,
    name: &str,
    principals: &str,
    validity: &str,
) -> std::path::PathBuf {
    let public = dir.join(format!("{name}.pub"));
    std::fs::write(&public, format!("{}\n", key.public_line)).unwrap();
    let out = std::process::Command::new("ssh-keygen")
        .args(["-q", "-s"])
        .arg(&ca.private_key)
        .args(["-I", &format!("test/{name}"), "-n", principals, "-V", validity])
        .arg(&public)
        .output()
        .unwrap();
    assert!(out.status.success(), "ssh-keygen -s: {}", String::from_utf8_lossy(&out.stderr));
    dir.join(format!("{name}-cert.pub"))
}

/// sshd trusting a CA (TrustedUserCAKeys) for the principal `tuns` (AuthorizedPrincipalsFile),
/// with no authorized keys: a certificate from that CA carrying `tuns` logs in and its forward
/// carries traffic; an expired one, one for `pgs`, one from another CA and the bare key are
/// refused. Certificates made with OpenSSH's own ssh-keygen, used by OpenSSH's client: the
/// ground, not picotun, is what this proves.
#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn sshd_takes_certificates_from_its_trusted_ca_for_tuns_only() {
    let dir = tempfile::tempdir().unwrap();
    let ca = SshClientKey::generate(dir.path(), "ca", "ed25519").unwrap();
    let other_ca = SshClientKey::generate(dir.path(), "other-ca", "ed25519").unwrap();
    let key = SshClientKey::generate(dir.path(), "client", "ed25519").unwrap();
    let options = SshdOptions { trusted_user_ca_keys: vec![ca.public_line.clone()], ..Default::default() };
    let server = TunnelServer::start_sshd(&options, &[]).await.unwrap();
    let backend = Backend::start("certified").await.unwrap();
    let user = server.login_user("alice");

    let good = sign_with_ssh_keygen(&ca, &key, dir.path(), "good", "tuns", "-5m:+10m");
    let (public, spec) = public_tcp_spec(server.kind(), backend.port());
    let mut ssh = server.ssh_forward_with_certificate(&key, &good, &user, &spec, "ssh-good").unwrap();
    expect_body(&format!("127.0.0.1:{public}"), "x", "/", &backend.greeting()).await;
    assert!(ssh.is_running());
    let log = std::fs::read_to_string(server.dir().join("sshd.log")).unwrap();
    let accepted = log
        .lines()
        .find(|l| l.contains("Accepted publickey") && l.contains("ID test/good"))
        .unwrap_or_else(|| panic!("{log}"));
    eprintln!("sshd: {accepted}");

    // (name, certificate, what sshd logs about it)
    let cases = [
        (
            "expired",
            sign_with_ssh_keygen(&ca, &key, dir.path(), "expired", "tuns", "20200101:20200102"),
            "Certificate invalid: expired",
        ),
        (
            "pgs",
            sign_with_ssh_keygen(&ca, &key, dir.path(), "pgs", "pgs", "-5m:+10m"),
            "Certificate does not contain an authorized principal",
        ),
        (
            "other-ca",
            sign_with_ssh_keygen(&other_ca, &key, dir.path(), "other-ca", "tuns", "-5m:+10m"),
            "Failed publickey",
        ),
    ];
    for (name, cert, reason) in &cases {
        let (_, spec) = public_tcp_spec(server.kind(), backend.port());
        let before = std::fs::read_to_string(server.dir().join("sshd.log")).unwrap().len();
        let mut ssh = server.ssh_forward_with_certificate(&key, cert, &user, &spec, &format!("ssh-{name}")).unwrap();
        let status = ssh.wait_exit(Duration::from_secs(10));
        assert!(status.is_some_and(|s| !s.success()), "{name}: ssh must fail: {}", ssh.log_tail(20));
        assert!(ssh.log_tail(40).contains("Permission denied"), "{name}: {}", ssh.log_tail(40));
        let log = std::fs::read_to_string(server.dir().join("sshd.log")).unwrap();
        let said: Vec<&str> = log[before..].lines().filter(|l| l.contains("ertificate") || l.contains("CA")).collect();
        eprintln!("sshd on the {name} certificate: {said:?}");
        assert!(said.iter().any(|l| l.contains(reason)), "{name}: {said:?}");
        assert!(!log[before..].contains("Accepted publickey"), "{name}: {}", &log[before..]);
    }
    // The bare key is not authorized either: certificates only.
    let (_, spec) = public_tcp_spec(server.kind(), backend.port());
    let mut bare = server.ssh_forward(&key, &user, &spec, "ssh-bare").unwrap();
    assert!(bare.wait_exit(Duration::from_secs(10)).is_some_and(|s| !s.success()), "{}", bare.log_tail(20));
}
