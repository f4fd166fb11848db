//! Certificate mode (`picotun agent --certificate-url`) against the test ground's real OpenSSH
//! sshd trusting an SSH CA (TrustedUserCAKeys, principal `tuns` in AuthorizedPrincipalsFile):
//! the built agent makes its key in memory, gets it certified, logs in with the certificate,
//! renews it, and says what to check when the server refuses it.
//!
//! The issuer here is a small HTTPS endpoint in the test process speaking the webhook's
//! `/certificate` protocol and signing with picotun's own CA code (`picotun::sshca::SshCa`);
//! each test tells it how to misbehave. The webhook's real endpoint has tests of its own.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use picotun::sshca::{CertRequest, SshCa, certificate_line};
use picotun_testground::http::{self, Backend};
use picotun_testground::pki::Ca;
use picotun_testground::process::Signal;
use picotun_testground::tunnels::SshdOptions;
use picotun_testground::{TunnelServer, free_port, wait_for};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::agent::{Agent, dial_addr, echo_app, echo_line, file, tcp_tunnel};
use crate::support::expect_body;

const KEY_ID: &str = "team-a/web-0";

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// How the issuer answers.
struct Policy {
    ca: Arc<SshCa>,
    principals: Vec<String>,
    validity: u64,
    /// Sign as if it were this many seconds ago (more than the validity plus the CA's 300 s of
    /// backdating: an expired certificate).
    backdate: u64,
    /// Answer this instead of a certificate.
    refuse: Option<(StatusCode, String)>,
}

impl Policy {
    fn new(ca: &Arc<SshCa>, validity: u64) -> Policy {
        Policy { ca: ca.clone(), principals: vec!["tuns".into()], validity, backdate: 0, refuse: None }
    }
}

/// A certificate the issuer handed out.
#[derive(Clone, Debug)]
struct Signed {
    at: f64,
    serial: u64,
    valid_before: u64,
    public_key: String,
}

struct Shared {
    token_file: PathBuf,
    policy: Mutex<Policy>,
    signed: Mutex<Vec<Signed>>,
    refused: Mutex<u32>,
}

/// The webhook's `POST /certificate`, reduced to what these tests need: the bearer token must be
/// the token file's content, the body `{"publicKey": ...}`.
struct Issuer {
    url: String,
    tls_ca: String,
    token_file: PathBuf,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Drop for Issuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn certificate(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let token = std::fs::read_to_string(&shared.token_file).unwrap();
    let bearer = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if bearer != format!("Bearer {}", token.trim()) {
        return (StatusCode::UNAUTHORIZED, "the token was not accepted").into_response();
    }
    let policy = shared.policy.lock().unwrap();
    if let Some((status, reason)) = &policy.refuse {
        *shared.refused.lock().unwrap() += 1;
        return (*status, reason.clone()).into_response();
    }
    let Some(public_key) =
        serde_json::from_slice::<Value>(&body).ok().and_then(|v| v["publicKey"].as_str().map(String::from))
    else {
        return (StatusCode::BAD_REQUEST, "body must be {\"publicKey\": ...}").into_response();
    };
    let request =
        CertRequest { key_id: KEY_ID.into(), principals: policy.principals.clone(), validity_seconds: policy.validity };
    let now = unix_now();
    let cert = match policy.ca.sign(&public_key, &request, now as u64 - policy.backdate) {
        Ok(c) => c,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    shared.signed.lock().unwrap().push(Signed {
        at: now,
        serial: cert.serial(),
        valid_before: cert.valid_before(),
        public_key: public_key.clone(),
    });
    axum::Json(json!({
        "certificate": certificate_line(&cert),
        "keyId": cert.key_id(),
        "principals": cert.valid_principals(),
        "validAfter": cert.valid_after(),
        "validBefore": cert.valid_before(),
    }))
    .into_response()
}

impl Issuer {
    async fn start(policy: Policy) -> Issuer {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, format!("pod-token-{}\n", free_port())).unwrap();
        let ca = Ca::new("issuer-test-ca").unwrap();
        let serving = ca.issue_loopback_server(&[]).unwrap();
        use rustls::pki_types::pem::PemObject;
        let certs = rustls::pki_types::CertificateDer::pem_slice_iter(serving.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(serving.key_pem.as_bytes()).unwrap();
        let tls = rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(certs, key).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let shared = Arc::new(Shared {
            token_file: token_file.clone(),
            policy: Mutex::new(policy),
            signed: Mutex::new(Vec::new()),
            refused: Mutex::new(0),
        });
        let app = Router::new().route("/certificate", post(certificate)).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://127.0.0.1:{}/certificate", listener.local_addr().unwrap().port());
        let task = crate::support::serve_https(listener, acceptor, app);
        Issuer { url, tls_ca: ca.cert_pem(), token_file, shared, task, _dir: dir }
    }

    fn set(&self, change: impl FnOnce(&mut Policy)) {
        change(&mut self.shared.policy.lock().unwrap());
    }

    fn signed(&self) -> Vec<Signed> {
        self.shared.signed.lock().unwrap().clone()
    }
}

/// sshd trusting `ca` for principal `tuns`, with no authorized keys: certificates only.
async fn sshd_trusting(ca: &SshCa) -> TunnelServer {
    let options = SshdOptions { trusted_user_ca_keys: vec![ca.public_line()], ..Default::default() };
    TunnelServer::start_sshd(&options, &[]).await.unwrap()
}

/// Empty directories the agent gets as its working directory, TMPDIR and HOME.
struct Scratch {
    cwd: tempfile::TempDir,
    tmp: tempfile::TempDir,
    home: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            cwd: tempfile::tempdir().unwrap(),
            tmp: tempfile::tempdir().unwrap(),
            home: tempfile::tempdir().unwrap(),
        }
    }

    /// Every file or directory in any of them.
    fn contents(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).unwrap().flatten() {
                out.push(entry.path());
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&entry.path(), out);
                }
            }
        }
        let mut out = Vec::new();
        for d in [&self.cwd, &self.tmp, &self.home] {
            walk(d.path(), &mut out);
        }
        out
    }
}

/// The agent in certificate mode, configured as the webhook configures the sidecar (env), with
/// no key file anywhere and everything at debug level.
fn certified_agent(server: &TunnelServer, issuer: &Issuer, tunnels: &str, scratch: &Scratch) -> Agent {
    Agent::launch(server, tunnels, &["--keepalive-interval", "1s"], |cmd| {
        cmd.env("PICOTUN_CERTIFICATE_URL", &issuer.url)
            .env("PICOTUN_REPORT_CA", &issuer.tls_ca)
            .env("PICOTUN_REPORT_TOKEN_FILE", &issuer.token_file)
            // The default key file path must not matter: it does not exist here.
            .env("PICOTUN_KEY_FILE", "/nonexistent/id")
            .env("TMPDIR", scratch.tmp.path())
            .env("HOME", scratch.home.path())
            .current_dir(scratch.cwd.path());
    })
}

fn metric(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.trim().parse().ok()))
}

fn sshd_log(server: &TunnelServer) -> String {
    std::fs::read_to_string(server.dir().join("sshd.log")).unwrap_or_default()
}

/// Lines of `log` that are sshd accepting a certificate with our key id.
fn cert_logins(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("Accepted publickey") && l.contains(&format!("ID {KEY_ID}")))
        .map(String::from)
        .collect()
}

/// The serial sshd logged for a login: `... ID team-a/web-0 (serial 123) CA ...`.
fn logged_serial(line: &str) -> u64 {
    let after = line.split("(serial ").nth(1).unwrap_or_else(|| panic!("no serial in {line}"));
    after.split(')').next().unwrap().parse().unwrap()
}

/// No key material in the log: no PEM block, and every long base64 or hex run is a SHA256
/// fingerprint (`SHA256:` + 43 characters).
fn assert_no_key_material(log: &str) {
    assert!(!log.contains("PRIVATE KEY"), "a private key block in the log");
    assert!(!log.contains("AAAAC3NzaC1lZDI1NTE5"), "an ed25519 key or certificate blob in the log");
    let is_b64 = |c: char| c.is_ascii_alphanumeric() || c == '+' || c == '/' || c == '=';
    for line in log.lines() {
        let mut run_start = None;
        for (i, c) in line.char_indices().chain(std::iter::once((line.len(), ' '))) {
            match (is_b64(c), run_start) {
                (true, None) => run_start = Some(i),
                (false, Some(start)) => {
                    let run = &line[start..i];
                    if run.len() >= 40 {
                        assert!(
                            line[..start].ends_with("SHA256:"),
                            "a long base64/hex run that is not a fingerprint: {run:?} in {line}"
                        );
                    }
                    run_start = None;
                }
                _ => {}
            }
        }
    }
}

/// A certificate from the issuer logs in to sshd, the forward carries traffic, /status and the
/// metrics show the certificate; the key is made in memory: nothing is written to the agent's
/// working directory, TMPDIR or HOME, and the log holds fingerprints and key ids only.
#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn a_certificate_logs_in_and_its_forward_carries_traffic_with_no_key_on_disk() {
    let ca = Arc::new(SshCa::generate("picotun-test-ca"));
    let issuer = Issuer::start(Policy::new(&ca, 3600)).await;
    let server = sshd_trusting(&ca).await;
    let backend = Backend::start("certified").await.unwrap();
    let scratch = Scratch::new();
    let started = Instant::now();
    let mut agent = certified_agent(&server, &issuer, &file(&[tcp_tunnel("raw", None, backend.port())]), &scratch);
    let t = agent.wait_tunnel("raw", "established", Duration::from_secs(20)).await;
    eprintln!("certificate obtained and tunnel established {:?} after start", started.elapsed());
    expect_body(&dial_addr(t["publicAddress"].as_str().unwrap()), "x", "/", &backend.greeting()).await;

    let signed = issuer.signed();
    assert_eq!(signed.len(), 1);
    assert!(signed[0].public_key.starts_with("ssh-ed25519 "), "{:?}", signed[0]);
    let status = agent.status().await.unwrap();
    let cert = &status["certificate"];
    assert_eq!(cert["keyId"], KEY_ID, "{status}");
    assert_eq!(cert["principals"], json!(["tuns"]));
    assert_eq!(cert["validBefore"], signed[0].valid_before);
    assert_eq!(cert["validAfter"], signed[0].valid_before - 3600 - 300);
    assert!(status["credentialError"].is_null(), "{status}");
    let metrics = agent.metrics().await;
    assert_eq!(
        metric(&metrics, "picotun_agent_certificate_expiry_timestamp_seconds"),
        Some(signed[0].valid_before as f64),
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "picotun_agent_certificate_renewals_total{result=\"ok\"}"), Some(1.0), "{metrics}");
    assert_eq!(http::get(&agent.admin, "a", "/ready").await.unwrap().status, 200);
    assert_eq!(http::get(&agent.admin, "a", "/tunnels-up").await.unwrap().status, 200);

    // sshd saw a certificate login, with our key id and the serial the issuer signed.
    let logins = cert_logins(&sshd_log(&server));
    assert_eq!(logins.len(), 1, "{}", sshd_log(&server));
    assert!(logins[0].contains("ED25519-CERT"), "{}", logins[0]);
    assert_eq!(logged_serial(&logins[0]), signed[0].serial);
    eprintln!("sshd: {}", logins[0]);

    // Stop it as the kubelet does, then look for anything it left behind.
    agent.proc.signal(Signal::SIGTERM);
    let exit = agent.proc.wait_exit(Duration::from_secs(30));
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}: {}", agent.proc.log_tail(20));
    assert_eq!(scratch.contents(), Vec::<PathBuf>::new(), "the agent wrote nothing to its cwd, TMPDIR or HOME");
    let log = std::fs::read_to_string(agent.proc.log_path()).unwrap();
    assert!(log.contains("certificate obtained") && log.contains(KEY_ID), "{log}");
    assert_no_key_material(&log);
    let public_blob = signed[0].public_key.split_whitespace().nth(1).unwrap();
    assert!(!log.contains(public_blob), "not even the public half is logged (fingerprints only)");
}

/// Which certificates sshd refuses, and what the agent then says in /status and its log: each
/// message names the key id and validBefore and says what to check, and the pod stays Ready.
#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn refused_certificates_say_what_to_check() {
    let ca = Arc::new(SshCa::generate("picotun-test-ca"));
    let other_ca = Arc::new(SshCa::generate("someone-elses-ca"));
    let server = sshd_trusting(&ca).await;
    let backend = Backend::start("refused").await.unwrap();

    struct Case {
        name: &'static str,
        policy: Policy,
        /// In the tunnel's message (and the log).
        says: Vec<String>,
        /// The agent itself refused it (never offered to the server).
        refused_by_agent: bool,
    }
    let cases = vec![
        Case {
            name: "signed by another CA",
            policy: Policy::new(&other_ca, 3600),
            says: vec![
                format!("signed by CA {}", other_ca.fingerprint()),
                "TrustedUserCAKeys".into(),
                "validBefore".into(),
            ],
            refused_by_agent: false,
        },
        Case {
            name: "principal pgs, not tuns",
            policy: Policy { principals: vec!["pgs".into()], ..Policy::new(&ca, 3600) },
            says: vec!["does not carry the principal \"tuns\"".into(), "AuthorizedPrincipalsFile".into()],
            refused_by_agent: false,
        },
        Case {
            name: "expired",
            policy: Policy { backdate: 7200, ..Policy::new(&ca, 3600) },
            says: vec!["expired at".into(), "check the issuer's clock".into()],
            refused_by_agent: true,
        },
        Case {
            name: "the issuer refuses",
            policy: Policy {
                refuse: Some((StatusCode::FORBIDDEN, "pod team-a/web-0 was not injected by picotun".into())),
                ..Policy::new(&ca, 3600)
            },
            says: vec!["403 Forbidden: pod team-a/web-0 was not injected by picotun".into()],
            refused_by_agent: true,
        },
    ];
    for case in cases {
        let issuer = Issuer::start(case.policy).await;
        let scratch = Scratch::new();
        let before = sshd_log(&server).len();
        let started = Instant::now();
        let agent = certified_agent(&server, &issuer, &file(&[tcp_tunnel("raw", None, backend.port())]), &scratch);
        let a = &agent;
        let says = &case.says;
        let t = wait_for(case.name, Duration::from_secs(20), Duration::from_millis(100), || async move {
            let s = a.status().await.unwrap_or_default();
            let t = s["tunnels"][0].clone();
            let msg = t["message"].as_str().unwrap_or_default();
            if says.iter().all(|part| msg.contains(part.as_str())) { Ok(Some(t)) } else { Err(format!("{s}")) }
        })
        .await
        .unwrap_or_else(|e| panic!("{}: {e}\nagent log:\n{}", case.name, agent.proc.log_tail(20)));
        let detected = started.elapsed();
        let message = t["message"].as_str().unwrap().to_string();
        eprintln!("{}: said after {detected:?}: {message}", case.name);
        assert_eq!(t["state"], "connecting", "{t}");
        if !message.contains("403") {
            assert!(message.contains(KEY_ID), "{}: names the key id: {message}", case.name);
        }
        let status = agent.status().await.unwrap();
        let metrics = agent.metrics().await;
        if case.refused_by_agent {
            assert!(status["credentialError"].as_str().is_some_and(|e| e.contains(&says[0])), "{status}");
            assert!(status["certificate"].is_null(), "{status}");
            assert!(metrics.contains("picotun_agent_ssh_connects_total 0\n"), "never offered: {metrics}");
            assert!(!sshd_log(&server)[before..].contains("Accepted"), "sshd saw no login");
        } else {
            // The server refused it: the log says the same as /status.
            assert!(metrics.contains("picotun_agent_errors_total{reason=\"certificate_refused\"}"), "{metrics}");
            let log = std::fs::read_to_string(agent.proc.log_path()).unwrap();
            assert!(log.lines().any(|l| l.contains("tunnel connection down") && l.contains(&says[0])), "{log}");
            assert_eq!(status["certificate"]["keyId"], KEY_ID);
            let sshd_text = sshd_log(&server);
            let sshd_said: Vec<&str> = sshd_text[before..]
                .lines()
                .filter(|l| l.contains("ertificate") || l.contains("principal") || l.contains("CA"))
                .map(str::trim)
                .collect();
            eprintln!("{}: sshd said {sshd_said:?}", case.name);
            assert!(!sshd_log(&server)[before..].contains("Accepted"));
        }
        // The pod stays Ready; /tunnels-up holds the reason.
        assert_eq!(http::get(&agent.admin, "a", "/ready").await.unwrap().status, 200);
        let up = http::get(&agent.admin, "a", "/tunnels-up").await.unwrap();
        assert_eq!(up.status, 503);
        assert!(up.body.contains(&*says[0].replace('"', "\\\"")), "{}", up.body);
        assert_no_key_material(&std::fs::read_to_string(agent.proc.log_path()).unwrap());
        assert_eq!(scratch.contents(), Vec::<PathBuf>::new());
    }
}

/// Writes a deterministic byte stream through `conn` to the echo app and checks what comes
/// back, until `done()`; returns the bytes that made the round trip.
async fn transfer_until(conn: TcpStream, mut done: impl FnMut() -> bool) -> u64 {
    let pattern = |i: u64| (i.wrapping_mul(2654435761) >> 13) as u8;
    let (mut r, mut w) = conn.into_split();
    let reader = tokio::spawn(async move {
        let mut got = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n =
                tokio::time::timeout(Duration::from_secs(10), r.read(&mut buf)).await.expect("echo stalled").unwrap();
            if n == 0 {
                return got;
            }
            for (k, b) in buf[..n].iter().enumerate() {
                assert_eq!(*b, pattern(got + k as u64), "byte {} came back wrong", got + k as u64);
            }
            got += n as u64;
        }
    });
    let mut sent = 0u64;
    let chunk = 64 * 1024;
    while !done() {
        let data: Vec<u8> = (sent..sent + chunk).map(pattern).collect();
        w.write_all(&data).await.unwrap();
        sent += chunk;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    w.shutdown().await.unwrap();
    let got = reader.await.unwrap();
    assert_eq!(got, sent, "every byte came back");
    got
}

/// Certificates valid for 6 s, sshd trusting their CA, an echo app behind a TCP tunnel on
/// public port `remote`, and the agent holding it with the first certificate issued.
struct ShortLived {
    issuer: Issuer,
    server: TunnelServer,
    echo: tokio::task::JoinHandle<()>,
    remote: u16,
    scratch: Scratch,
    agent: Agent,
    first: Signed,
}

impl ShortLived {
    async fn start() -> ShortLived {
        let ca = Arc::new(SshCa::generate("picotun-test-ca"));
        let issuer = Issuer::start(Policy::new(&ca, 6)).await;
        let server = sshd_trusting(&ca).await;
        let (echo_port, echo) = echo_app().await;
        let remote = free_port();
        let scratch = Scratch::new();
        let mut agent =
            certified_agent(&server, &issuer, &file(&[tcp_tunnel("raw", Some(remote), echo_port)]), &scratch);
        agent.wait_tunnel("raw", "established", Duration::from_secs(20)).await;
        let first = issuer.signed()[0].clone();
        ShortLived { issuer, server, echo, remote, scratch, agent, first }
    }
}

/// Certificates valid for 6 s: the agent renews each at 2/3 of its validity; a transfer runs
/// across several renewals and past the first certificate's expiry on the session that
/// certificate opened; then a forced reconnect (sshd restarted) logs in with a renewed one.
#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn renewal_across_expiry_keeps_a_long_transfer_alive() {
    let ShortLived { issuer, mut server, echo: _echo, remote, scratch: _scratch, mut agent, first } =
        ShortLived::start().await;
    // The kubelet rotates the projected token: renewals must read it afresh (the issuer checks
    // the file's content at each request).
    std::fs::write(&issuer.token_file, "rotated-pod-token\n").unwrap();

    let conn = TcpStream::connect(("127.0.0.1", remote)).await.unwrap();
    let started = Instant::now();
    let bytes = transfer_until(conn, || {
        let signed = issuer.signed();
        assert!(started.elapsed() < Duration::from_secs(90), "no renewals: {signed:?}");
        signed.len() >= 4 && unix_now() > first.valid_before as f64 + 2.0
    })
    .await;
    let signed = issuer.signed();
    let gaps: Vec<String> = signed.windows(2).map(|w| format!("{:.1}s", w[1].at - w[0].at)).collect();
    eprintln!(
        "transfer: {bytes} bytes in {:?} on one session; {} certificates issued ({} renewals, {gaps:?} apart); the \
         first expired {:.1}s before the transfer ended",
        started.elapsed(),
        signed.len(),
        signed.len() - 1,
        unix_now() - first.valid_before as f64
    );
    let metrics = agent.metrics().await;
    assert!(metrics.contains("picotun_agent_ssh_connects_total 1\n"), "one session throughout: {metrics}");
    assert!(!metrics.contains("result=\"unauthorized\""), "the rotated token was used: {metrics}");
    assert!(signed.iter().all(|s| s.public_key == first.public_key), "one key, renewed certificates");
    let status = agent.status().await.unwrap();
    assert!(status["certificate"]["validBefore"].as_u64().unwrap() > first.valid_before, "{status}");
    assert_eq!(
        metric(&metrics, "picotun_agent_certificate_expiry_timestamp_seconds"),
        status["certificate"]["validBefore"].as_f64(),
        "{metrics}"
    );

    // A forced reconnect after the first certificate expired: it logs in with a renewed one.
    let before = sshd_log(&server).len();
    server.kill();
    agent.wait_tunnel("raw", "connecting", Duration::from_secs(15)).await;
    server.restart().await.unwrap();
    let restarted = Instant::now();
    agent.wait_tunnel("raw", "established", Duration::from_secs(40)).await;
    eprintln!("reconnected {:?} after sshd came back", restarted.elapsed());
    let log = sshd_log(&server);
    let logins = cert_logins(&log[before..]);
    assert_eq!(logins.len(), 1, "{}", &log[before..]);
    let serial = logged_serial(&logins[0]);
    let used = issuer.signed().into_iter().find(|s| s.serial == serial).expect("a certificate the issuer signed");
    assert_ne!(serial, first.serial, "not the first certificate");
    assert!(used.valid_before > first.valid_before && unix_now() > first.valid_before as f64);
    eprintln!("sshd: {}", logins[0].trim());
    let mut conn = BufReader::new(TcpStream::connect(("127.0.0.1", remote)).await.unwrap());
    assert_eq!(echo_line(&mut conn, "after the reconnect").await, "after the reconnect");
    assert_no_key_material(&std::fs::read_to_string(agent.proc.log_path()).unwrap());
}

/// When the issuer is down past the certificate's expiry, the session that certificate opened
/// and the visitor connection on it stay up (servers check certificates at login only); a
/// reconnect then waits for a fresh certificate instead of offering the expired one, and goes
/// ahead as soon as the issuer is back.
#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn past_expiry_sessions_stay_up_and_reconnects_wait_for_a_fresh_certificate() {
    let ShortLived { issuer, mut server, echo: _echo, remote, scratch: _scratch, mut agent, first } =
        ShortLived::start().await;
    issuer.set(|p| {
        p.refuse = Some((
            StatusCode::SERVICE_UNAVAILABLE,
            "no SSH CA is configured: create the Secret picotun-ssh-ca with picotun ca create".into(),
        ))
    });
    let mut conn = BufReader::new(TcpStream::connect(("127.0.0.1", remote)).await.unwrap());
    assert_eq!(echo_line(&mut conn, "before expiry").await, "before expiry");
    while unix_now() < first.valid_before as f64 + 1.0 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(echo_line(&mut conn, "after expiry").await, "after expiry", "the visitor's connection stays");
    let status = agent.status().await.unwrap();
    assert_eq!(status["tunnels"][0]["state"], "established", "{status}");
    assert!(status["credentialError"].as_str().unwrap().contains("503"), "{status}");
    let failed = *issuer.shared.refused.lock().unwrap();
    eprintln!("{failed} renewals refused by the issuer by the time the first certificate had expired");
    assert!(failed >= 2, "renewal retried: {failed}");

    // A reconnect now: no certificate to offer, so the agent waits and says why.
    let before = sshd_log(&server).len();
    server.kill();
    server.restart().await.unwrap();
    let a = &agent;
    let t = wait_for("waiting for a certificate", Duration::from_secs(20), Duration::from_millis(100), || async move {
        let s = a.status().await.unwrap_or_default();
        let t = s["tunnels"][0].clone();
        Ok(t["message"].as_str().is_some_and(|m| m.contains("connecting waits for a renewed one")).then_some(t))
    })
    .await
    .unwrap();
    let message = t["message"].as_str().unwrap();
    eprintln!("while the issuer is down: {message}");
    assert!(message.contains(KEY_ID) && message.contains("expired at") && message.contains("503"), "{message}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = sshd_log(&server);
    assert!(
        !log[before..].contains("Accepted") && !log[before..].contains("ertificate"),
        "nothing offered: {}",
        &log[before..]
    );
    assert_eq!(http::get(&agent.admin, "a", "/ready").await.unwrap().status, 200);

    // The issuer is back: the next renewal lets the reconnect through.
    issuer.set(|p| p.refuse = None);
    let healed = Instant::now();
    let t = agent.wait_tunnel("raw", "established", Duration::from_secs(60)).await;
    eprintln!("re-established {:?} after the issuer came back", healed.elapsed());
    assert!(t["message"].is_null(), "{t}");
    let mut conn = BufReader::new(TcpStream::connect(("127.0.0.1", remote)).await.unwrap());
    assert_eq!(echo_line(&mut conn, "with a fresh one").await, "with a fresh one");
    assert_eq!(cert_logins(&sshd_log(&server)[before..]).len(), 1);
    let metrics = agent.metrics().await;
    eprintln!(
        "renewals: {:?} ok, {:?} rejected",
        metric(&metrics, "picotun_agent_certificate_renewals_total{result=\"ok\"}"),
        metric(&metrics, "picotun_agent_certificate_renewals_total{result=\"rejected\"}")
    );
}
