//! Helpers shared by the integration tests.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use picotun_testground::pki::Ca;
use picotun_testground::{ControlPlane, Proc, free_port, http, wait_for};

/// `picotun webhook` serving HTTPS on loopback with a certificate from a test CA, ready.
pub struct Webhook {
    pub proc: Proc,
    pub port: u16,
    /// `127.0.0.1:<port>`
    pub addr: String,
    pub admin: String,
    pub ca: Ca,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub config_name: String,
    _dir: tempfile::TempDir,
}

impl Webhook {
    /// With `reporting`, injected sidecars are told to report to this webhook's /report.
    pub async fn start(ground: &ControlPlane, reporting: bool) -> Webhook {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("webhook-test-ca").unwrap();
        let (cert_file, key_file) = ca.issue_loopback_server(&[]).unwrap().write(dir.path(), "tls").unwrap();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let admin = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_picotun"));
        cmd.args(["webhook", "--listen", &addr, "--admin-addr", &admin])
            .args(["--cert-file", cert_file.to_str().unwrap(), "--key-file", key_file.to_str().unwrap()])
            .args([
                "--cert-reload-interval",
                "200ms",
                "--sidecar-image",
                "picotun:test",
                "--namespace",
                "pico-sh-system",
            ])
            .env("KUBECONFIG", ground.kubeconfig())
            .env("PICOTUN_LOG", "picotun=debug,info");
        if reporting {
            let ca_file = dir.path().join("ca.crt");
            std::fs::write(&ca_file, ca.cert_pem()).unwrap();
            cmd.args(["--agent-report-url", &format!("https://{addr}/report")])
                .args(["--agent-report-ca-file", ca_file.to_str().unwrap()]);
        }
        let mut proc = Proc::spawn("picotun-webhook", cmd, &dir.path().join("webhook.log")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !http::get(&admin, "w", "/ready").await.is_ok_and(|r| r.status == 200) {
            assert!(Instant::now() < deadline && proc.is_running(), "webhook not ready: {}", proc.log_tail(20));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Webhook { proc, port, addr, admin, ca, cert_file, key_file, config_name: String::new(), _dir: dir }
    }

    pub async fn metrics(&self) -> String {
        http::get(&self.admin, "w", "/metrics").await.map(|r| r.body).unwrap_or_default()
    }

    /// POST `path` over TLS with extra header lines; (status, the whole answer).
    pub async fn post(&self, path: &str, content_type: &str, headers: &str, body: &[u8]) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tcp = tokio::net::TcpStream::connect(&self.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = tls_client(&self.ca).connect(name, tcp).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        tls.write_all(head.as_bytes()).await.unwrap();
        let _ = tls.write_all(body).await;
        let mut raw = Vec::new();
        let _ = tls.read_to_end(&mut raw).await;
        let text = String::from_utf8_lossy(&raw).to_string();
        let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        (status, text)
    }
}

/// A TLS client trusting only `ca`.
pub fn tls_client(ca: &Ca) -> tokio_rustls::TlsConnector {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    let ca_der: rustls::pki_types::CertificateDer<'static> =
        rustls::pki_types::pem::PemObject::from_pem_slice(ca.cert_pem().as_bytes()).unwrap();
    roots.add(ca_der).unwrap();
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Polls `GET path` on `addr` with `host` until the body equals `want`, for up to 20 s, and
/// returns the number of attempts it took. Panics with the last answer otherwise.
pub async fn expect_body(addr: &str, host: &str, path: &str, want: &str) -> u32 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let last = match http::get(addr, host, path).await {
            Ok(r) if r.status == 200 && r.body == want => return attempts,
            Ok(r) => format!("{} {:?}", r.status, r.body),
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() > deadline {
            panic!("GET http://{host}{path} via {addr}: wanted {want:?}, last answer: {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits (up to 60 s) until exactly `count` pods matching `labels` are Running; returns them.
pub async fn running_pods(pods: &Api<Pod>, labels: &str, count: usize) -> Vec<Pod> {
    wait_for(
        &format!("{count} Running pods ({labels})"),
        Duration::from_secs(60),
        Duration::from_millis(250),
        || async {
            let list = pods.list(&ListParams::default().labels(labels)).await.map_err(|e| e.to_string())?;
            let running: Vec<Pod> = list
                .items
                .into_iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .collect();
            Ok((running.len() == count).then_some(running))
        },
    )
    .await
    .unwrap()
}
