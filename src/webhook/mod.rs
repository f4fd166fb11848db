//! `picotun webhook`: the mutating admission webhook that injects the tunnel sidecar.
//!
//! ```text
//! --listen (8443), the apiserver:
//! apiserver ─TLS─► POST /mutate ─► admission::parse ─► owner lookup (workload metadata)
//!                                      │                     │
//!                                      ▼                     ▼
//!                                 admission::answer ─► inject::mutate_owned (pure) ─► JSON patch
//!                                   (routes' tunnels and      (+ ticket tunnels.pico.sh/injected)
//!                                    name owners: the index)
//!
//! --agent-listen (8444), the sidecars:
//! sidecar ─TLS─► POST /report ──────► identity ─► checked addresses ─► pod annotation tunnels.pico.sh/addresses
//! sidecar ─TLS─► POST /certificate ─► identity ─► SSH certificate for its in-memory key (CA: --ssh-ca-dir)
//! ```
//!
//! Two listeners, one certificate: each port serves only its own paths (the rest are 404), so a
//! NetworkPolicy can let every source reach /mutate -- the apiserver is not a pod and its
//! address is not knowable -- and only injected namespaces' pods reach the sidecar endpoints.
//! Each is served by server.rs: capped connections, timeouts for slow clients, a drain on SIGTERM.

pub mod admission;
pub mod certificate;
pub mod explain;
pub mod identity;
pub mod inject;
pub mod inject_cli;
pub mod report;
pub mod server;
pub mod ticket;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use clap::ValueEnum;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::admin;
use crate::apiserver::index::{Index, ResolveConfig};
use crate::apiserver::owner::owner_workload;
use crate::core::pod::Decision;
use crate::webhook::inject::{InjectConfig, SidecarAuth};
use crate::webhook::ticket::TicketKey;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum NativeSidecar {
    /// Native sidecars when the apiserver is 1.29 or newer.
    Auto,
    True,
    False,
}

/// The Secret (in picotun's namespace, key `key`) holding the ticket HMAC key.
pub const TICKET_SECRET: &str = "picotun-webhook-ticket";
pub const TICKET_SECRET_KEY: &str = "key";

/// `picotun webhook` flags.
#[derive(Clone, Debug, clap::Args)]
pub struct WebhookArgs {
    /// Where the apiserver reaches the webhook (HTTPS): /mutate only.
    #[arg(long, env = "PICOTUN_WEBHOOK_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Where injected sidecars reach the webhook (HTTPS, the same certificate): /report and
    /// /certificate only. --agent-report-url names this port as the pods reach it.
    #[arg(long, env = "PICOTUN_WEBHOOK_AGENT_LISTEN", default_value = "0.0.0.0:8444")]
    pub agent_listen: SocketAddr,
    /// Serving certificate and key (PEM), e.g. a cert-manager Secret mounted into the pod; reloaded
    /// when they change.
    #[arg(long, env = "PICOTUN_WEBHOOK_CERT_FILE", default_value = "/etc/picotun/webhook-tls/tls.crt")]
    pub cert_file: PathBuf,
    #[arg(long, env = "PICOTUN_WEBHOOK_KEY_FILE", default_value = "/etc/picotun/webhook-tls/tls.key")]
    pub key_file: PathBuf,
    /// How often the serving certificate and the SSH CA are re-read.
    #[arg(long, env = "PICOTUN_WEBHOOK_CERT_RELOAD_INTERVAL", value_parser = humantime::parse_duration, default_value = "2s")]
    pub cert_reload_interval: Duration,
    /// The admin port: /live, /ready (only while a valid certificate is loaded, and not while
    /// shutting down), /metrics.
    #[arg(long, env = "PICOTUN_ADMIN_ADDR", default_value = "0.0.0.0:9902")]
    pub admin_addr: SocketAddr,
    /// picotun's own namespace (never injected; where the ticket key Secret lives).
    #[arg(long, env = "POD_NAMESPACE", default_value = "pico-sh-system")]
    pub namespace: String,
    #[command(flatten)]
    pub sidecar: SidecarArgs,
    /// How routes resolve: the controller's flags (the webhook resolves routes the same way, so
    /// a pod created after its route exists starts with the right tunnels).
    #[command(flatten)]
    pub resolve: crate::apiserver::index::ResolveArgs,
    #[command(flatten)]
    pub certificates: CertificateArgs,
    /// The ticket HMAC key (at least 32 bytes) as a file, instead of the Secret
    /// picotun-webhook-ticket in --namespace (which the webhook reads, or creates, at start).
    #[arg(long, env = "PICOTUN_TICKET_KEY_FILE")]
    pub ticket_key_file: Option<PathBuf>,
    /// The labels of the namespaces this webhook is registered for (its configuration's
    /// namespaceSelector): /report and /certificate serve pods of those namespaces only, since
    /// /mutate answers whoever calls it and a ticket proves only what it would inject.
    #[arg(
        long,
        env = "PICOTUN_INJECTION_NAMESPACE_SELECTOR",
        value_parser = crate::core::api::parse_label_selector,
        default_value = "tunnels.pico.sh/injection=enabled"
    )]
    pub injection_namespace_selector: kube::core::Selector,
    /// The domains the tunnel server names public addresses under (repeatable, or comma-separated):
    /// a reported address outside them (and not the custom domain its tunnel asked for) is dropped.
    /// Default: --server itself when it is a DNS name (a regional tuns.sh host adds tuns.sh).
    #[arg(long = "server-domain", env = "PICOTUN_SERVER_DOMAIN", value_delimiter = ',')]
    pub server_domains: Vec<String>,
    #[command(flatten)]
    pub server: ListenerArgs,
}

/// `/certificate`: the CA and what certificates say.
#[derive(Clone, Debug, clap::Args)]
pub struct CertificateArgs {
    /// The directory holding the SSH CA's private key as `ca` (the Secret picotun-ssh-ca,
    /// mounted); re-read when it changes. Without it /certificate answers 503.
    #[arg(long, env = "PICOTUN_SSH_CA_DIR", default_value = "/etc/picotun/ssh-ca")]
    pub ssh_ca_dir: PathBuf,
    /// How long a sidecar's certificate is valid (the agent renews at two thirds).
    #[arg(long, env = "PICOTUN_CERTIFICATE_VALIDITY", value_parser = humantime::parse_duration, default_value = "4h")]
    pub certificate_validity: Duration,
    /// Principals certificates carry (repeatable); pico.sh's `tuns` grants tunnels and nothing
    /// else of the account.
    #[arg(long = "certificate-principal", env = "PICOTUN_CERTIFICATE_PRINCIPAL", value_delimiter = ',', default_value = crate::sshca::TUNS_PRINCIPAL)]
    pub certificate_principals: Vec<String>,
}

/// The HTTPS listeners' bounds (--listen and --agent-listen each).
#[derive(Clone, Debug, clap::Args)]
pub struct ListenerArgs {
    /// Connections served at once, per listener (sidecars cannot crowd out the apiserver); more
    /// wait for a slot (as many again, each for up to the handshake timeout) or are closed.
    #[arg(long, env = "PICOTUN_WEBHOOK_MAX_CONNECTIONS", default_value_t = 512)]
    pub max_connections: usize,
    #[arg(long, env = "PICOTUN_WEBHOOK_TLS_HANDSHAKE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub tls_handshake_timeout: Duration,
    /// A request's headers (the first on a connection: its first request) must arrive within this.
    #[arg(long, env = "PICOTUN_WEBHOOK_HEADER_READ_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub header_read_timeout: Duration,
    /// A request's body must arrive within this (408 otherwise).
    #[arg(long, env = "PICOTUN_WEBHOOK_BODY_READ_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub body_read_timeout: Duration,
    /// A connection with no request for this long is closed.
    #[arg(long, env = "PICOTUN_WEBHOOK_IDLE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "90s")]
    pub idle_timeout: Duration,
    /// On SIGTERM: /ready goes 503 at once and the server keeps serving this long, so endpoints
    /// drop the pod before it stops accepting.
    #[arg(long, env = "PICOTUN_WEBHOOK_DRAIN_DELAY", value_parser = humantime::parse_duration, default_value = "5s")]
    pub drain_delay: Duration,
    /// Then requests in flight get this long to finish.
    #[arg(long, env = "PICOTUN_WEBHOOK_SHUTDOWN_TIMEOUT", value_parser = humantime::parse_duration, default_value = "20s")]
    pub shutdown_timeout: Duration,
}

/// How injected sidecars are configured (shared by `webhook` and `inject`).
#[derive(Clone, Debug, clap::Args)]
pub struct SidecarArgs {
    /// The sidecar image (normally this webhook's own image).
    #[arg(long, env = "PICOTUN_SIDECAR_IMAGE", default_value = "ghcr.io/picotun/picotun:latest")]
    pub sidecar_image: String,
    #[arg(long, env = "PICOTUN_SIDECAR_IMAGE_PULL_POLICY", default_value = "IfNotPresent")]
    pub sidecar_image_pull_policy: String,
    #[arg(long, env = "PICOTUN_NATIVE_SIDECAR", value_enum, default_value = "auto")]
    pub native_sidecar: NativeSidecar,
    /// How sidecars authenticate to the tunnel server: `certificate` (a short-lived SSH
    /// certificate per pod from this webhook's /certificate; needs --agent-report-url) or `key`
    /// (the account key Secret picotun-ssh-key mounted into every sidecar).
    #[arg(long, env = "PICOTUN_SIDECAR_AUTH", value_enum, default_value = "certificate")]
    pub sidecar_auth: SidecarAuth,
    /// Tunnel server settings given to every sidecar.
    #[command(flatten)]
    pub tunnel_server: crate::core::server::ServerArgs,
    /// A known_hosts file pinning the tunnel server's host key for every sidecar (not needed for
    /// tuns.sh, whose key is built in).
    #[arg(long, env = "PICOTUN_SIDECAR_KNOWN_HOSTS_FILE")]
    pub sidecar_known_hosts_file: Option<PathBuf>,
    /// The sidecar's admin port (/live, /ready, /metrics, /status; the probes use it). A pod
    /// whose app uses it sets its own with the annotation tunnels.pico.sh/admin-port. Why 7426:
    /// `api::DEFAULT_SIDECAR_ADMIN_PORT`.
    #[arg(long, env = "PICOTUN_SIDECAR_ADMIN_PORT", default_value_t = crate::core::api::DEFAULT_SIDECAR_ADMIN_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub sidecar_admin_port: u16,
    /// Default sidecar resources (per-pod annotations override them).
    #[arg(long, env = "PICOTUN_SIDECAR_CPU_REQUEST", default_value = "10m")]
    pub sidecar_cpu_request: String,
    #[arg(long, env = "PICOTUN_SIDECAR_MEMORY_REQUEST", default_value = "16Mi")]
    pub sidecar_memory_request: String,
    #[arg(long, env = "PICOTUN_SIDECAR_CPU_LIMIT", default_value = "500m")]
    pub sidecar_cpu_limit: String,
    #[arg(long, env = "PICOTUN_SIDECAR_MEMORY_LIMIT", default_value = "64Mi")]
    pub sidecar_memory_limit: String,
    /// Where injected sidecars POST their status so their public addresses reach Kubernetes:
    /// the webhook's /report on its --agent-listen port as pods reach it, e.g.
    /// https://picotun-webhook.pico-sh-system.svc:8444/report. Certificate mode asks the same
    /// server's /certificate. Unset: sidecars do not report (key mode only).
    #[arg(long, env = "PICOTUN_AGENT_REPORT_URL")]
    pub agent_report_url: Option<String>,
    /// PEM CA bundle the sidecars verify --agent-report-url with (the CA of the webhook's
    /// certificate); passed to them inline. Unset: their platform's CA certificates.
    #[arg(long, env = "PICOTUN_AGENT_REPORT_CA_FILE")]
    pub agent_report_ca_file: Option<PathBuf>,
}

/// Why the sidecar settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SidecarConfigError {
    #[error("cannot read --sidecar-known-hosts-file {path}: {source}")]
    KnownHosts { path: PathBuf, source: std::io::Error },
    #[error("cannot read --agent-report-ca-file {path}: {source}")]
    ReportCa { path: PathBuf, source: std::io::Error },
    #[error("--agent-report-url {0:?} must start with https:// (sidecars send a token to it)")]
    ReportUrl(String),
    #[error(
        "--sidecar-auth certificate needs --agent-report-url (sidecars get their certificate from the same server's \
         /certificate on --agent-listen), e.g. --agent-report-url https://picotun-webhook.pico-sh-system.svc:8444/report; or use \
         --sidecar-auth key to mount the account key Secret into every sidecar instead"
    )]
    CertificateWithoutReportUrl,
}

impl SidecarArgs {
    /// The sidecar configuration, with the files it names read and its settings checked.
    pub fn inject_config(&self, native: bool) -> Result<InjectConfig, SidecarConfigError> {
        let mut config = InjectConfig {
            image: self.sidecar_image.clone(),
            pull_policy: self.sidecar_image_pull_policy.clone(),
            native_sidecar: native,
            own_namespace: String::new(),
            server: self.tunnel_server.server.clone(),
            server_port: self.tunnel_server.server_port,
            user: self.tunnel_server.user.clone(),
            dialect: self
                .tunnel_server
                .dialect
                .to_possible_value()
                .map(|v| v.get_name().to_string())
                .unwrap_or_default(),
            admin_port: self.sidecar_admin_port,
            cpu_request: self.sidecar_cpu_request.clone(),
            memory_request: self.sidecar_memory_request.clone(),
            cpu_limit: self.sidecar_cpu_limit.clone(),
            memory_limit: self.sidecar_memory_limit.clone(),
            log_level: "info".into(),
            known_hosts: String::new(),
            report_url: String::new(),
            report_ca: String::new(),
            auth: self.sidecar_auth,
            ticket_key: None,
        };
        if let Some(path) = &self.sidecar_known_hosts_file {
            config.known_hosts = std::fs::read_to_string(path)
                .map_err(|source| SidecarConfigError::KnownHosts { path: path.clone(), source })?;
        }
        if let Some(url) = self.agent_report_url.as_deref().map(str::trim).filter(|u| !u.is_empty()) {
            if !url.starts_with("https://") || inject::certificate_url(url).is_none() {
                return Err(SidecarConfigError::ReportUrl(url.to_string()));
            }
            config.report_url = url.to_string();
        }
        if let Some(path) = &self.agent_report_ca_file {
            config.report_ca = std::fs::read_to_string(path)
                .map_err(|source| SidecarConfigError::ReportCa { path: path.clone(), source })?;
        }
        if config.auth == SidecarAuth::Certificate && config.report_url.is_empty() {
            return Err(SidecarConfigError::CertificateWithoutReportUrl);
        }
        Ok(config)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("the serving certificate cannot be loaded: {0}")]
    Cert(#[from] tls::CertError),
    #[error(transparent)]
    Sidecar(#[from] SidecarConfigError),
    #[error("the ticket key: {0}")]
    TicketKey(String),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

struct Metrics {
    requests: Family<ResultLabels, Counter>,
    skips: Family<ReasonLabels, Counter>,
    failures: Family<ReasonLabels, Counter>,
    duration: Histogram,
    cert_expiry: Gauge,
}

impl Metrics {
    fn new(registry: &mut Registry) -> Self {
        let m = Metrics {
            requests: Family::default(),
            skips: Family::default(),
            failures: Family::default(),
            duration: Histogram::new([0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]),
            cert_expiry: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("picotun_webhook");
        r.register(
            "requests",
            "Admission requests by result (injected, skipped, not_a_pod_create, unreadable_pod, bad_request)",
            m.requests.clone(),
        );
        r.register("skips", "Pods left alone, by reason", m.skips.clone());
        r.register("failures", "Problems answered with a warning or an error, by reason", m.failures.clone());
        r.register("duration_seconds", "Time to answer an admission request", m.duration.clone());
        r.register(
            "certificate_expiry_timestamp_seconds",
            "When the serving certificate expires (Unix time)",
            m.cert_expiry.clone(),
        );
        m
    }
}

/// Recent answers to "does this key Secret exist?", so a burst of pods (a rollout) costs the
/// apiserver one lookup, not one per pod.
#[derive(Default)]
struct SecretCache {
    seen: std::sync::Mutex<std::collections::HashMap<(String, String), (Instant, bool)>>,
}

impl SecretCache {
    const FOUND_TTL: Duration = Duration::from_secs(60);
    const MISSING_TTL: Duration = Duration::from_secs(5);

    fn get(&self, key: &(String, String)) -> Option<bool> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let (at, exists) = *seen.get(key)?;
        let ttl = if exists { Self::FOUND_TTL } else { Self::MISSING_TTL };
        (at.elapsed() < ttl).then_some(exists)
    }

    fn put(&self, key: (String, String), exists: bool) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() > 10_000 {
            seen.clear();
        }
        seen.insert(key, (Instant::now(), exists));
    }
}

struct AppState {
    secrets: SecretCache,
    config: InjectConfig,
    inject_route_backends: bool,
    client: Option<kube::Client>,
    /// The controller's index, without Pods: routes and Services, to resolve a new pod alone.
    index: Option<Index>,
    resolve: ResolveConfig,
    metrics: Metrics,
    verifier: identity::Verifier,
    reports: report::Reports,
    certificates: certificate::Certificates,
    body_read_timeout: Duration,
}

/// Reads a request body of at most `limit` bytes within `timeout`: Err is the answer to give.
async fn read_body(body: Body, limit: usize, timeout: Duration) -> Result<Bytes, (StatusCode, String)> {
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(_)) => {
            Err((StatusCode::PAYLOAD_TOO_LARGE, format!("the body is over {limit} bytes (or could not be read)")))
        }
        Err(_) => Err((StatusCode::REQUEST_TIMEOUT, format!("the body did not arrive within {timeout:?}"))),
    }
}

/// The ticket key: from `--ticket-key-file`, else the Secret in picotun's namespace, created
/// (32 random bytes) when absent; two replicas starting at once agree (409 -> read it again).
async fn ticket_key(args: &WebhookArgs, client: Option<&kube::Client>) -> Result<Option<TicketKey>, WebhookError> {
    if let Some(path) = &args.ticket_key_file {
        let bytes = std::fs::read(path)
            .map_err(|e| WebhookError::TicketKey(format!("cannot read --ticket-key-file {}: {e}", path.display())))?;
        let key = TicketKey::from_bytes(&bytes).map_err(|e| WebhookError::TicketKey(e.to_string()))?;
        info!(path = %path.display(), "ticket key read from --ticket-key-file");
        return Ok(Some(key));
    }
    let Some(client) = client else {
        warn!("no Kubernetes API access and no --ticket-key-file: pods are injected without a ticket");
        return Ok(None);
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &args.namespace);
    let fix = format!(
        "the webhook needs get and create on Secret {TICKET_SECRET} in namespace {} (deploy/ grants them), or \
         --ticket-key-file",
        args.namespace
    );
    let from = |secret: Secret| -> Result<TicketKey, WebhookError> {
        let bytes = secret.data.and_then(|mut d| d.remove(TICKET_SECRET_KEY)).map(|b| b.0).unwrap_or_default();
        TicketKey::from_bytes(&bytes).map_err(|e| {
            WebhookError::TicketKey(format!(
                "Secret {}/{TICKET_SECRET} key {TICKET_SECRET_KEY}: {e}; delete the Secret and the webhook makes a new one",
                args.namespace
            ))
        })
    };
    let api_error = |e: kube::Error| match e {
        kube::Error::Api(s) => s.message,
        other => other.to_string(),
    };
    let get = || async {
        tokio::time::timeout(Duration::from_secs(10), secrets.get_opt(TICKET_SECRET))
            .await
            .map_err(|_| WebhookError::TicketKey(format!("reading Secret {TICKET_SECRET} timed out")))?
            .map_err(|e| {
                WebhookError::TicketKey(format!("cannot read Secret {TICKET_SECRET}: {}; {fix}", api_error(e)))
            })
    };
    if let Some(secret) = get().await? {
        return from(secret).map(Some);
    }
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": TICKET_SECRET, "namespace": args.namespace,
                     "labels": {"app.kubernetes.io/name": "picotun", "app.kubernetes.io/component": "webhook"}},
        "type": "Opaque",
        "data": {TICKET_SECRET_KEY: base64::Engine::encode(&base64::engine::general_purpose::STANDARD, TicketKey::random_bytes())},
    }))
    .expect("a Secret");
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(created) => {
            info!(namespace = %args.namespace, secret = TICKET_SECRET, "ticket key created");
            from(created).map(Some)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => match get().await? {
            Some(secret) => from(secret).map(Some),
            None => Err(WebhookError::TicketKey(format!("Secret {TICKET_SECRET} vanished while it was created"))),
        },
        Err(e) => {
            Err(WebhookError::TicketKey(format!("cannot create Secret {TICKET_SECRET}: {}; {fix}", api_error(e))))
        }
    }
}

/// Runs the webhook until `shutdown`, then drains (server.rs) and returns.
pub async fn run(args: WebhookArgs, shutdown: CancellationToken) -> Result<(), WebhookError> {
    // Checked before anything else: a configuration that cannot work fails at once, with the fix.
    let mut config = args.sidecar.inject_config(true)?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cert = Arc::new(tls::ReloadingCert::new(args.cert_file.clone(), args.key_file.clone()));
    cert.reload()?;
    let client = match kube::Client::try_default().await {
        Ok(c) => Some(c),
        Err(e) => {
            warn!(error = %e, "no Kubernetes API access: workload-level opt-in (on the Deployment) is not seen");
            None
        }
    };
    config.native_sidecar = match args.sidecar.native_sidecar {
        NativeSidecar::True => true,
        NativeSidecar::False => false,
        NativeSidecar::Auto => match &client {
            Some(c) => match c.apiserver_version().await {
                Ok(v) => supports_native_sidecars(&v.major, &v.minor),
                Err(e) => {
                    warn!(error = %e, "cannot read the apiserver version; assuming native sidecars");
                    true
                }
            },
            None => true,
        },
    };
    config.own_namespace = args.namespace.clone();
    let key = ticket_key(&args, client.as_ref()).await?;
    config.ticket_key = key.clone();
    let domains = if args.server_domains.is_empty() {
        report::default_domains(&args.sidecar.tunnel_server.server)
    } else {
        args.server_domains.iter().map(|d| d.trim().trim_end_matches('.').to_ascii_lowercase()).collect()
    };
    if domains.is_empty() {
        warn!(
            server = %args.sidecar.tunnel_server.server,
            "no server domain (--server is not a DNS name and no --server-domain): reported addresses other than \
             custom domains are dropped"
        );
    }
    info!(
        native_sidecar = config.native_sidecar, sidecar_auth = config.auth.as_str(), listen = %args.listen,
        agent_listen = %args.agent_listen, server_domains = %domains.join(","), "picotun webhook starting"
    );

    // Internal tasks (admin port, watches, reloads) outlive the drain: they stop at the end.
    let internal = CancellationToken::new();
    let _stop_internal = internal.clone().drop_guard();
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    metrics.cert_expiry.set(cert.not_after().unwrap_or(0));
    let server_metrics = server::ServerMetrics::register(&mut registry);
    let reports = report::Reports::new(&mut registry, domains);
    let ca_store = Arc::new(certificate::CaStore::new(args.certificates.ssh_ca_dir.clone()));
    ca_store.reload();
    let certificates = certificate::Certificates::new(
        &mut registry,
        ca_store.clone(),
        certificate::Issuing {
            principals: args.certificates.certificate_principals.clone(),
            validity: args.certificates.certificate_validity,
        },
    );
    let index = match &client {
        Some(c) => Some(Index::start(c.clone(), false, internal.clone()).await),
        None => None,
    };
    let resolve = args.resolve.config();
    let state = Arc::new(AppState {
        secrets: SecretCache::default(),
        config,
        inject_route_backends: args.resolve.inject_route_backends,
        client,
        index,
        resolve,
        metrics,
        verifier: identity::Verifier::new(key, args.injection_namespace_selector.clone()),
        reports,
        certificates,
        body_read_timeout: args.server.body_read_timeout,
    });

    let expiry = state.clone();
    let watch_cert = cert.clone().watch(args.cert_reload_interval, move |c| {
        expiry.metrics.cert_expiry.set(c.not_after().unwrap_or(0));
    });
    let stop = internal.clone();
    tokio::spawn(async move {
        tokio::select! { _ = watch_cert => {}, _ = stop.cancelled() => {} }
    });
    let stop = internal.clone();
    let watch_ca = ca_store.clone().watch(args.cert_reload_interval);
    tokio::spawn(async move {
        tokio::select! { _ = watch_ca => {}, _ = stop.cancelled() => {} }
    });

    let admin_listener = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .map_err(|source| WebhookError::Listen { addr: args.admin_addr, source })?;
    let draining = Arc::new(AtomicBool::new(false));
    let ready_cert = cert.clone();
    let ready_state = state.clone();
    let ready_draining = draining.clone();
    let admin = tokio::spawn(admin::serve(
        admin_listener,
        // Ready with a valid certificate and complete route caches (before they are, a pod would
        // be injected without its route's tunnels), and not once shutting down.
        Arc::new(move || {
            !ready_draining.load(Ordering::SeqCst)
                && ready_cert.is_valid()
                && ready_state.index.as_ref().is_none_or(Index::is_synced)
        }),
        Arc::new(registry),
        Router::new(),
        internal.clone(),
    ));

    let mut tls_config = rustls::ServerConfig::builder().with_no_client_auth().with_cert_resolver(cert.clone());
    tls_config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls_config));
    let bind = |addr: SocketAddr| async move {
        tokio::net::TcpListener::bind(addr).await.map_err(|source| WebhookError::Listen { addr, source })
    };
    let (listener, agent_listener) = (bind(args.listen).await?, bind(args.agent_listen).await?);
    let limits = server::Limits {
        max_connections: args.server.max_connections,
        tls_handshake_timeout: args.server.tls_handshake_timeout,
        header_read_timeout: args.server.header_read_timeout,
        idle_timeout: args.server.idle_timeout,
        drain_delay: args.server.drain_delay,
        shutdown_timeout: args.server.shutdown_timeout,
    };
    // One drain for both: /ready goes 503 once, each stops accepting after the delay.
    tokio::join!(
        server::serve(
            listener,
            acceptor.clone(),
            admission_router(state.clone()),
            limits.clone(),
            server_metrics.clone(),
            shutdown.clone(),
            draining.clone(),
        ),
        server::serve(
            agent_listener,
            acceptor,
            agent_router(state.clone()),
            limits,
            server_metrics,
            shutdown,
            draining
        ),
    );
    internal.cancel();
    let _ = admin.await;
    info!("picotun webhook stopped");
    Ok(())
}

/// Native sidecars (init containers with restartPolicy Always) are on by default from 1.29.
pub fn supports_native_sidecars(major: &str, minor: &str) -> bool {
    let minor: u32 = minor.trim_end_matches('+').parse().unwrap_or(0);
    major == "1" && minor >= 29 || major.parse::<u32>().is_ok_and(|m| m > 1)
}

/// --listen: the apiserver's port.
fn admission_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .fallback(|| async {
            not_found("this is the admission port (--listen): it serves /mutate; sidecars' /report and /certificate are on --agent-listen")
        })
        .with_state(state)
}

/// --agent-listen: the sidecars' port.
fn agent_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/report", post(report::handle))
        .route("/certificate", post(certificate::handle))
        .fallback(|| async {
            not_found("this is the sidecars' port (--agent-listen): it serves /report and /certificate; /mutate is on --listen")
        })
        .with_state(state)
}

fn not_found(what: &'static str) -> Response {
    (StatusCode::NOT_FOUND, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], format!("not found: {what}\n"))
        .into_response()
}

async fn mutate(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let body = match read_body(body, admission::MAX_BODY_BYTES, state.body_read_timeout).await {
        Ok(b) => b,
        Err((status, msg)) => {
            state.metrics.requests.get_or_create(&ResultLabels { result: "bad_request".into() }).inc();
            state.metrics.failures.get_or_create(&ReasonLabels { reason: "bad_request".into() }).inc();
            warn!(reason = %msg, "unreadable admission request");
            return (status, format!("{msg}\n")).into_response();
        }
    };
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let req = match admission::parse(content_type, &body) {
        Ok(r) => r,
        Err(e) => {
            state.metrics.requests.get_or_create(&ResultLabels { result: "bad_request".into() }).inc();
            state.metrics.failures.get_or_create(&ReasonLabels { reason: "bad_request".into() }).inc();
            warn!(error = %e, "unreadable admission request");
            return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response();
        }
    };
    let span =
        info_span!("admission", uid = %req.uid, namespace = req.namespace.as_deref().unwrap_or(""), name = %req.name);
    async move {
        let admission = admission::Admission::of(&req);
        let namespace = admission.namespace.as_str();
        let mut warnings = Vec::new();
        let workload = match (admission.readable_pod(), &state.client) {
            (Some(pod), Some(client)) => {
                match owner_workload(client, namespace, pod.metadata.owner_references.as_deref().unwrap_or(&[])).await {
                    Ok(w) => w,
                    Err(e) => {
                        state.metrics.failures.get_or_create(&ReasonLabels { reason: "owner_lookup".into() }).inc();
                        warnings.push(format!("could not read the pod's workload ({e}); only the pod's own labels and annotations were considered"));
                        None
                    }
                }
            }
            _ => None,
        };
        // The same resolution the controller runs, for this one pod: created after its route, it
        // starts with the right tunnels.
        // Its own expose tunnels are kept by the same owners: never a name someone else owns.
        let (route_tunnels, owners) = match (admission.readable_pod(), &state.index) {
            (Some(pod), Some(index)) => {
                let (tunnels, owners) = index.admission_for(&state.resolve, pod, namespace);
                (tunnels, Some(owners))
            }
            _ => (Vec::new(), None),
        };
        let findings = admission::Findings {
            workload: workload.as_ref(),
            route_tunnels: &route_tunnels,
            owners: owners.as_deref(),
            warnings,
        };
        let mut answer = admission::answer(&admission, findings, state.inject_route_backends, &state.config);
        // Only key mode mounts the key Secret, so only key mode checks that it exists.
        if let (SidecarAuth::Key, Some(Decision::Inject { .. }), Some(client), Some(pod)) =
            (state.config.auth, &answer.decision, &state.client, admission.readable_pod())
            && let Some(w) = missing_key_secret(client, &state.secrets, namespace, pod).await
        {
            state.metrics.failures.get_or_create(&ReasonLabels { reason: "key_secret_missing".into() }).inc();
            answer.response.warnings.get_or_insert_with(Vec::new).push(format!("picotun: {w}"));
        }
        state.metrics.requests.get_or_create(&ResultLabels { result: answer.result.into() }).inc();
        match &answer.decision {
            Some(Decision::Skip { reason, because }) => {
                state.metrics.skips.get_or_create(&ReasonLabels { reason: reason.as_str().into() }).inc();
                debug!(reason = reason.as_str(), %because, "not injected");
            }
            Some(Decision::Inject { because }) => info!(%because, dry_run = req.dry_run, "injected"),
            None => {}
        }
        state.metrics.duration.observe(started.elapsed().as_secs_f64());
        axum::Json(answer.response.into_review()).into_response()
    }
    .instrument(span)
    .await
}

/// A warning when the Secret the sidecar will mount does not exist. Needs `get` on that Secret
/// (deploy/ grants it for the default name only); without permission, nothing is said.
async fn missing_key_secret(
    client: &kube::Client,
    cache: &SecretCache,
    namespace: &str,
    pod: &k8s_openapi::api::core::v1::Pod,
) -> Option<String> {
    let (name, _) = crate::core::api::key_secret(pod.metadata.annotations.as_ref());
    let key = (namespace.to_string(), name.clone());
    let exists = match cache.get(&key) {
        Some(e) => Some(e),
        None => {
            let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), namespace);
            match tokio::time::timeout(Duration::from_secs(1), secrets.get_metadata_opt(&name)).await {
                Ok(Ok(found)) => {
                    cache.put(key, found.is_some());
                    Some(found.is_some())
                }
                Ok(Err(e)) => {
                    debug!(error = %e, "cannot check the key Secret");
                    None
                }
                Err(_) => None,
            }
        }
    };
    match exists {
        Some(false) => Some(format!(
            "Secret {name} (the tunnel SSH key) does not exist in namespace {namespace}; the sidecar cannot start until it \
             does: kubectl -n {namespace} create secret generic {name} --from-file={}=PATH_TO_PRIVATE_KEY",
            crate::core::api::KEY_SECRET_KEY
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn native_sidecars_from_1_29() {
        assert!(super::supports_native_sidecars("1", "29"));
        assert!(super::supports_native_sidecars("1", "36+"));
        assert!(!super::supports_native_sidecars("1", "28"));
    }
}
