//! Pushing the agent's `/status` to the webhook's `/report`, which turns the public addresses into
//! the pod's `tunnels.pico.sh/addresses` annotation: the agent itself has no Kubernetes access.
//!
//! ```text
//! AgentState ─(checked every 100 ms)─► what /report uses changed? ─(still for 200 ms)─┐
//!                                      --report-interval heartbeat ───────────────────┤
//!                                                                                       ▼
//!        POST --report-url, Authorization: Bearer <token file, re-read per post> ◄── /status JSON
//!            │ failure: jittered backoff (1 s .. 60 s), logged, counted
//! ```
//!
//! [`Endpoint`] is the HTTPS client both calls to the webhook use (this one and the certificate
//! request of `--certificate-url`): URL and CA checked at start, the token read per call.
//!
//! The token is the pod's projected service-account token for audience `tunnels.pico.sh`; the
//! kubelet rotates it, so it is read afresh for every post and never logged.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, Request, StatusCode, Uri, header};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::agent::backoff::Backoff;

/// How often the status is compared with what was last reported.
const POLL: Duration = Duration::from_millis(100);
/// A change is reported once the status has been still this long (several tunnels coming up
/// together make one post)...
const QUIET: Duration = Duration::from_millis(200);
/// ...but never later than this after the first change.
const MAX_DELAY: Duration = Duration::from_secs(1);
/// One post, connection and TLS included.
const POST_TIMEOUT: Duration = Duration::from_secs(10);

/// `picotun agent` flags for reporting to the webhook.
#[derive(Clone, Debug, clap::Args)]
pub struct ReportArgs {
    /// Where to POST the status (the webhook's /report, HTTPS), so the public addresses reach
    /// Kubernetes. Unset: no reports.
    #[arg(long, env = "PICOTUN_REPORT_URL")]
    pub report_url: Option<String>,
    /// PEM CA bundle that verifies --report-url's certificate, given inline (the webhook passes
    /// it this way). Default: the platform's CA certificates.
    #[arg(long, env = "PICOTUN_REPORT_CA", hide_env_values = true)]
    pub report_ca: Option<String>,
    /// The projected service-account token (audience tunnels.pico.sh) proving which pod reports;
    /// re-read for every post.
    #[arg(long, env = "PICOTUN_REPORT_TOKEN_FILE", default_value = "/var/run/secrets/tunnels.pico.sh/report/token")]
    pub report_token_file: PathBuf,
    /// Report at least this often, changed or not.
    #[arg(long, env = "PICOTUN_REPORT_INTERVAL", value_parser = humantime::parse_duration, default_value = "60s")]
    pub report_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{flag} {url:?}: {reason}")]
    Url { flag: &'static str, url: String, reason: String },
    #[error("--report-ca: {0} (give the PEM text of the CA that signed the webhook's certificate)")]
    Ca(String),
    #[error(
        "{flag} is set but no --report-ca was given and the platform has no CA certificates ({reason}); give the \
         PEM of the CA that signed the webhook's certificate"
    )]
    NoRoots { flag: &'static str, reason: String },
    #[error("--report-interval must be more than zero")]
    Interval,
}

/// Why one post failed; `label()` is the metric's `result`.
#[derive(Debug, thiserror::Error)]
pub enum PostError {
    #[error("cannot read the token file {path}: {reason}")]
    Token { path: String, reason: String },
    #[error("cannot reach {0}")]
    Unreachable(String),
    #[error("{status}: {reason}")]
    Refused { status: StatusCode, reason: String },
}

impl PostError {
    pub fn label(&self) -> &'static str {
        match self {
            PostError::Token { .. } => "token_unreadable",
            PostError::Unreachable(_) => "unreachable",
            PostError::Refused { status, .. }
                if *status == StatusCode::UNAUTHORIZED || *status == StatusCode::FORBIDDEN =>
            {
                "unauthorized"
            }
            PostError::Refused { .. } => "rejected",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

/// `picotun_agent_reports_total{result}`.
#[derive(Default)]
pub struct ReportMetrics {
    reports: Family<ResultLabels, Counter>,
}

impl ReportMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.sub_registry_with_prefix("picotun_agent").register(
            "reports",
            "Status reports to --report-url by result (ok, unauthorized, rejected, unreachable, token_unreadable)",
            self.reports.clone(),
        );
    }

    fn count(&self, result: &str) {
        self.reports.get_or_create(&ResultLabels { result: result.to_string() }).inc();
    }
}

/// An HTTPS endpoint of the webhook that the agent calls with its pod-bound token: `/report`
/// and `/certificate`. The URL and CA are checked when it is made; the token is read per call.
pub struct Endpoint {
    url: String,
    /// `host[:port]` for the Host header.
    authority: String,
    /// For the TCP connection (no brackets around an IPv6 address).
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    path: String,
    tls: tokio_rustls::TlsConnector,
    token_file: PathBuf,
}

impl Endpoint {
    /// `flag` names the option the URL came from, for the error. `ca` is PEM text; without it
    /// the platform's CA certificates verify the server.
    pub fn new(flag: &'static str, url: &str, ca: Option<&str>, token_file: PathBuf) -> Result<Endpoint, ReportError> {
        let bad = |reason: &str| ReportError::Url { flag, url: url.to_string(), reason: reason.to_string() };
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("must start with https:// (the token must not travel in clear text)"));
        }
        let authority = uri.authority().ok_or_else(|| bad("has no host"))?.as_str().to_string();
        if authority.contains('@') {
            return Err(bad("must not carry user information"));
        }
        let host = uri.host().ok_or_else(|| bad("has no host"))?.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(host.to_string()).map_err(|_| bad("the host is not a valid name"))?;
        let path = uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());

        let mut roots = rustls::RootCertStore::empty();
        match ca.map(str::trim).filter(|c| !c.is_empty()) {
            Some(pem) => {
                let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
                    .collect::<Result<_, _>>()
                    .map_err(|e| ReportError::Ca(format!("not PEM: {e}")))?;
                if certs.is_empty() {
                    return Err(ReportError::Ca("holds no CERTIFICATE block".into()));
                }
                for c in certs {
                    roots.add(c).map_err(|e| ReportError::Ca(e.to_string()))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    let why = found.errors.first().map(|e| e.to_string()).unwrap_or_else(|| "none found".into());
                    return Err(ReportError::NoRoots { flag, reason: why });
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ReportError::Ca(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Endpoint {
            url: url.to_string(),
            host: host.to_string(),
            port: uri.port_u16().unwrap_or(443),
            authority,
            server_name,
            path,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            token_file,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// POSTs `body` (JSON) with the token as it is in the file now; the answer's body (at most
    /// `limit` bytes) on a 2xx, the status and the server's reason otherwise.
    pub async fn post(&self, body: Bytes, limit: usize) -> Result<Bytes, PostError> {
        let token = read_token(&self.token_file)?;
        let unreachable = |e: &dyn std::fmt::Display| PostError::Unreachable(format!("{}: {e}", self.url));
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port)).await.map_err(|e| unreachable(&e))?;
        let _ = tcp.set_nodelay(true);
        let tls = self.tls.connect(self.server_name.clone(), tcp).await.map_err(|e| unreachable(&e))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, Body>(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| unreachable(&e))?;
        // Drives the connection; it ends when `sender` is dropped after the answer.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut authorization = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| PostError::Token {
            path: self.token_file.display().to_string(),
            reason: "holds characters a token cannot have".into(),
        })?;
        authorization.set_sensitive(true);
        let request = Request::post(self.path.as_str())
            .header(header::HOST, self.authority.as_str())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, authorization)
            .body(Body::from(body))
            .map_err(|e| unreachable(&e))?;
        let response = sender.send_request(request).await.map_err(|e| unreachable(&e))?;
        let status = response.status();
        if status.is_success() {
            return axum::body::to_bytes(Body::new(response.into_body()), limit).await.map_err(|e| unreachable(&e));
        }
        let text = axum::body::to_bytes(Body::new(response.into_body()), 4096).await.unwrap_or_default();
        let reason = String::from_utf8_lossy(&text).trim().to_string();
        Err(PostError::Refused { status, reason })
    }
}

/// Where and how to post.
pub struct Reporter {
    endpoint: Endpoint,
    interval: Duration,
    pub metrics: ReportMetrics,
}

impl Reporter {
    /// A reporter when --report-url is set; the URL and CA are checked now, so a mistake stops
    /// the agent at start rather than failing every post.
    pub fn from_args(args: &ReportArgs) -> Result<Option<Reporter>, ReportError> {
        let Some(url) = args.report_url.as_deref().map(str::trim).filter(|u| !u.is_empty()) else {
            return Ok(None);
        };
        if args.report_interval.is_zero() {
            return Err(ReportError::Interval);
        }
        let endpoint = Endpoint::new("--report-url", url, args.report_ca.as_deref(), args.report_token_file.clone())?;
        Ok(Some(Reporter { endpoint, interval: args.report_interval, metrics: ReportMetrics::default() }))
    }

    pub fn url(&self) -> &str {
        self.endpoint.url()
    }

    /// Reports `status()` (the /status document) until `shutdown`.
    pub async fn run(self, status: impl Fn() -> Value, shutdown: CancellationToken) {
        let mut sent: Option<Value> = None;
        let mut pending: Option<Pending> = None;
        let mut heartbeat = Instant::now();
        let mut retry_at: Option<Instant> = None;
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let mut failing = false;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = shutdown.cancelled() => return,
            }
            let doc = status();
            let seen = fingerprint(&doc);
            let now = Instant::now();
            if sent.as_ref() == Some(&seen) {
                pending = None;
            } else {
                match &mut pending {
                    Some(p) if p.seen == seen => {}
                    Some(p) => {
                        p.seen = seen.clone();
                        p.changed = now;
                    }
                    None => pending = Some(Pending { seen: seen.clone(), first: now, changed: now }),
                }
            }
            let change_due = pending.as_ref().is_some_and(|p| now - p.changed >= QUIET || now - p.first >= MAX_DELAY);
            if !(change_due || now >= heartbeat) || retry_at.is_some_and(|r| now < r) {
                continue;
            }
            let body = Bytes::from(serde_json::to_vec(&doc).unwrap_or_default());
            let outcome = tokio::select! {
                r = tokio::time::timeout(POST_TIMEOUT, self.post(body)) => {
                    r.unwrap_or_else(|_| Err(PostError::Unreachable(format!("{}: no answer within {POST_TIMEOUT:?}", self.url()))))
                }
                _ = shutdown.cancelled() => return,
            };
            match outcome {
                Ok(()) => {
                    self.metrics.count("ok");
                    if failing {
                        info!(url = %self.url(), "status report accepted again");
                    } else {
                        debug!(url = %self.url(), "status reported");
                    }
                    failing = false;
                    sent = Some(seen);
                    pending = None;
                    heartbeat = Instant::now() + self.interval;
                    retry_at = None;
                    backoff.reset();
                }
                Err(e) => {
                    self.metrics.count(e.label());
                    let wait = backoff.next_delay();
                    warn!(url = %self.url(), error = %e, retry_in = ?wait, "status report failed");
                    failing = true;
                    retry_at = Some(Instant::now() + wait);
                }
            }
        }
    }

    async fn post(&self, body: Bytes) -> Result<(), PostError> {
        self.endpoint.post(body, 4096).await.map(|_| ())
    }
}

/// A change not yet reported.
struct Pending {
    seen: Value,
    first: Instant,
    changed: Instant,
}

pub fn read_token(path: &std::path::Path) -> Result<String, PostError> {
    let unreadable = |reason: String| PostError::Token { path: path.display().to_string(), reason };
    let token = std::fs::read_to_string(path).map_err(|e| unreadable(e.to_string()))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(unreadable("it is empty".into()));
    }
    Ok(token.to_string())
}

/// What of a /status document the webhook keeps: the tunnels' names, states and addresses.
/// Only a change here is worth a post (connection counts and timestamps are not).
pub fn fingerprint(status: &Value) -> Value {
    let tunnels: Vec<Value> = status["tunnels"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| json!([t["name"], t["state"], t["publicAddress"]]))
        .collect();
    Value::Array(tunnels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(url: &str, ca: Option<&str>) -> ReportArgs {
        ReportArgs {
            report_url: Some(url.into()),
            report_ca: ca.map(Into::into),
            report_token_file: "/nonexistent/token".into(),
            report_interval: Duration::from_secs(60),
        }
    }

    fn ca_pem() -> String {
        rcgen::generate_simple_self_signed(vec!["picotun-webhook.pico-sh-system.svc".into()]).unwrap().cert.pem()
    }

    #[test]
    fn only_names_states_and_addresses_matter() {
        let a = json!({"ready": true, "tunnels": [
            {"name": "web", "state": "established", "publicAddress": "https://u-web.tuns.sh", "activeConnections": 0, "since": 1},
        ]});
        let busier = json!({"ready": true, "tunnels": [
            {"name": "web", "state": "established", "publicAddress": "https://u-web.tuns.sh", "activeConnections": 7, "since": 1},
        ]});
        let moved = json!({"ready": true, "tunnels": [
            {"name": "web", "state": "established", "publicAddress": "https://u-web2.tuns.sh", "activeConnections": 0, "since": 2},
        ]});
        assert_eq!(fingerprint(&a), fingerprint(&busier));
        assert_ne!(fingerprint(&a), fingerprint(&moved));
        assert_ne!(fingerprint(&a), fingerprint(&json!({"tunnels": []})));
        assert_eq!(fingerprint(&json!({})), json!([]));
    }

    #[test]
    fn urls_and_cas_are_checked_at_start() {
        let pem = ca_pem();
        let r = Reporter::from_args(&args("https://picotun-webhook.pico-sh-system.svc/report", Some(&pem)))
            .unwrap()
            .unwrap();
        let e = &r.endpoint;
        assert_eq!((e.host.as_str(), e.port, e.path.as_str()), ("picotun-webhook.pico-sh-system.svc", 443, "/report"));
        let r = Reporter::from_args(&args("https://[::1]:8443/report", Some(&pem))).unwrap().unwrap();
        let e = &r.endpoint;
        assert_eq!((e.host.as_str(), e.port, e.authority.as_str()), ("::1", 8443, "[::1]:8443"));
        assert!(matches!(e.server_name, ServerName::IpAddress(_)));

        let err = |url: &str, ca: Option<&str>| Reporter::from_args(&args(url, ca)).err().unwrap().to_string();
        assert!(err("http://webhook/report", Some(&pem)).contains("must start with https://"));
        assert!(err("not a url at all", Some(&pem)).contains("not a URL"));
        assert!(err("https://user:pw@webhook/report", Some(&pem)).contains("user information"));
        assert!(err("https://webhook/report", Some("hello")).contains("no CERTIFICATE block"));
        let no_url = ReportArgs { report_url: None, ..args("x", None) };
        assert!(Reporter::from_args(&no_url).unwrap().is_none(), "no URL, no reporter");
        let zero = ReportArgs { report_interval: Duration::ZERO, ..args("https://webhook/report", Some(&pem)) };
        assert!(Reporter::from_args(&zero).is_err());
    }

    #[test]
    fn the_token_is_read_fresh_and_must_not_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").unwrap();
        assert_eq!(read_token(&path).unwrap(), "first");
        std::fs::write(&path, "second").unwrap();
        assert_eq!(read_token(&path).unwrap(), "second", "the kubelet's rotation is seen at once");
        std::fs::write(&path, " \n").unwrap();
        assert!(read_token(&path).unwrap_err().to_string().contains("empty"));
        let missing = read_token(&dir.path().join("nope")).unwrap_err();
        assert_eq!(missing.label(), "token_unreadable");
    }

    #[test]
    fn failures_have_metric_labels() {
        let refused = |status| PostError::Refused { status, reason: String::new() }.label();
        assert_eq!(refused(StatusCode::UNAUTHORIZED), "unauthorized");
        assert_eq!(refused(StatusCode::FORBIDDEN), "unauthorized");
        assert_eq!(refused(StatusCode::BAD_REQUEST), "rejected");
        assert_eq!(PostError::Unreachable("x".into()).label(), "unreachable");
    }
}
