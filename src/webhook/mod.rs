//! `picotun webhook`: the mutating admission webhook that injects the tunnel sidecar.
//!
//! ```text
//! apiserver ─TLS─► POST /mutate ─► admission::parse ─► owner lookup (workload metadata)
//!                                      │                     │
//!                                      ▼                     ▼
//!                                 admission::answer ─► inject::mutate (pure) ─► JSON patch
//!
//! sidecar ─TLS─► POST /report ─► report: TokenReview ─► pod annotation tunnels.pico.sh/addresses
//! ```

pub mod admission;
pub mod inject;
pub mod report;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use clap::ValueEnum;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::Api;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::admin;
use crate::index::{Index, ResolveConfig};
use crate::webhook::inject::{Decision, InjectConfig, Workload};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum NativeSidecar {
    /// Native sidecars when the apiserver is 1.29 or newer.
    Auto,
    True,
    False,
}

/// `picotun webhook` flags.
#[derive(Clone, Debug, clap::Args)]
pub struct WebhookArgs {
    /// Where the apiserver reaches the webhook (HTTPS).
    #[arg(long, env = "PICOTUN_WEBHOOK_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Serving certificate and key (PEM), e.g. a cert-manager Secret mounted into the pod; reloaded
    /// when they change.
    #[arg(long, env = "PICOTUN_WEBHOOK_CERT_FILE", default_value = "/etc/picotun/webhook-tls/tls.crt")]
    pub cert_file: PathBuf,
    #[arg(long, env = "PICOTUN_WEBHOOK_KEY_FILE", default_value = "/etc/picotun/webhook-tls/tls.key")]
    pub key_file: PathBuf,
    #[arg(long, env = "PICOTUN_WEBHOOK_CERT_RELOAD_INTERVAL", value_parser = humantime::parse_duration, default_value = "2s")]
    pub cert_reload_interval: Duration,
    /// The admin port: /live, /ready (only while a valid certificate is loaded), /metrics.
    #[arg(long, env = "PICOTUN_ADMIN_ADDR", default_value = "0.0.0.0:9902")]
    pub admin_addr: SocketAddr,
    /// picotun's own namespace (never injected).
    #[arg(long, env = "POD_NAMESPACE", default_value = "pico-sh-system")]
    pub namespace: String,
    #[command(flatten)]
    pub sidecar: SidecarArgs,
    /// Inject pods that back an Ingress or route picotun serves, without an opt-in of their own.
    /// (Resolved through the same index the controller uses.)
    #[arg(long, env = "PICOTUN_INJECT_ROUTE_BACKENDS")]
    pub inject_route_backends: bool,
    /// The IngressClass the controller serves (the webhook resolves routes the same way, so a
    /// pod created after its route exists starts with the right tunnels).
    #[arg(long, env = "PICOTUN_INGRESS_CLASS", default_value = crate::resolve::ingress::INGRESS_CLASS)]
    pub ingress_class: String,
    #[arg(long, env = "PICOTUN_GATEWAY_CONTROLLER_NAME", default_value = crate::resolve::gateway::GATEWAY_CONTROLLER)]
    pub gateway_controller_name: String,
    /// Where injected sidecars POST their status so their public addresses reach Kubernetes:
    /// this webhook's /report as pods reach it, e.g.
    /// https://picotun-webhook.pico-sh-system.svc:443/report. Unset: sidecars do not report.
    #[arg(long, env = "PICOTUN_AGENT_REPORT_URL")]
    pub agent_report_url: Option<String>,
    /// PEM CA bundle the sidecars verify --agent-report-url with (the CA of this webhook's
    /// certificate); passed to them inline. Unset: their platform's CA certificates.
    #[arg(long, env = "PICOTUN_AGENT_REPORT_CA_FILE")]
    pub agent_report_ca_file: Option<PathBuf>,
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
    /// Tunnel server settings given to every sidecar.
    #[command(flatten)]
    pub tunnel_server: crate::agent::ServerArgs,
    /// A known_hosts file pinning the tunnel server's host key for every sidecar (not needed for
    /// tuns.sh, whose key is built in).
    #[arg(long, env = "PICOTUN_SIDECAR_KNOWN_HOSTS_FILE")]
    pub sidecar_known_hosts_file: Option<PathBuf>,
    #[arg(long, env = "PICOTUN_SIDECAR_ADMIN_PORT", default_value_t = 9901)]
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
}

impl SidecarArgs {
    pub fn inject_config(&self, native: bool) -> InjectConfig {
        InjectConfig {
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
        }
    }

    /// The known_hosts text for sidecars, read from --sidecar-known-hosts-file.
    pub fn known_hosts(&self) -> Result<String, std::io::Error> {
        match &self.sidecar_known_hosts_file {
            Some(p) => std::fs::read_to_string(p),
            None => Ok(String::new()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("the serving certificate cannot be loaded: {0}")]
    Cert(#[from] tls::CertError),
    #[error("cannot read --sidecar-known-hosts-file: {0}")]
    KnownHosts(std::io::Error),
    #[error("cannot read --agent-report-ca-file: {0}")]
    ReportCa(std::io::Error),
    #[error("--agent-report-url {0:?} must start with https:// (sidecars send a token to it)")]
    ReportUrl(String),
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
    connections: Counter,
}

impl Metrics {
    fn new(registry: &mut Registry) -> Self {
        let m = Metrics {
            requests: Family::default(),
            skips: Family::default(),
            failures: Family::default(),
            duration: Histogram::new([0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]),
            cert_expiry: Gauge::default(),
            connections: Counter::default(),
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
        r.register(
            "connections",
            "TLS connections accepted (the apiserver reuses them when it can)",
            m.connections.clone(),
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
    reports: report::Reports,
}

/// Runs the webhook until `shutdown`.
pub async fn run(args: WebhookArgs, shutdown: CancellationToken) -> Result<(), WebhookError> {
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
    let native = match args.sidecar.native_sidecar {
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
    info!(native_sidecar = native, listen = %args.listen, "picotun webhook starting");

    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    metrics.cert_expiry.set(cert.not_after().unwrap_or(0));
    let mut config = args.sidecar.inject_config(native);
    config.own_namespace = args.namespace.clone();
    config.known_hosts = args.sidecar.known_hosts().map_err(WebhookError::KnownHosts)?;
    if let Some(url) = args.agent_report_url.as_deref().map(str::trim).filter(|u| !u.is_empty()) {
        if !url.starts_with("https://") {
            return Err(WebhookError::ReportUrl(url.to_string()));
        }
        config.report_url = url.to_string();
    }
    if let Some(path) = &args.agent_report_ca_file {
        config.report_ca = std::fs::read_to_string(path).map_err(WebhookError::ReportCa)?;
    }
    let reports = report::Reports::new(&mut registry);
    let index = match &client {
        Some(c) => Some(Index::start(c.clone(), false, shutdown.clone()).await),
        None => None,
    };
    let resolve = ResolveConfig {
        ingress_class: args.ingress_class.clone(),
        gateway_controller: args.gateway_controller_name.clone(),
        ..Default::default()
    };
    let state = Arc::new(AppState {
        secrets: SecretCache::default(),
        config,
        inject_route_backends: args.inject_route_backends,
        client,
        index,
        resolve,
        metrics,
        reports,
    });

    let expiry = state.clone();
    tokio::spawn(cert.clone().watch(args.cert_reload_interval, move |c| {
        expiry.metrics.cert_expiry.set(c.not_after().unwrap_or(0));
    }));

    let admin_listener = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .map_err(|source| WebhookError::Listen { addr: args.admin_addr, source })?;
    let ready_cert = cert.clone();
    let ready_state = state.clone();
    let admin_shutdown = shutdown.clone();
    tokio::spawn(admin::serve(
        admin_listener,
        // Ready with a valid certificate and complete route caches: before they are, a pod
        // would be injected without its route's tunnels.
        Arc::new(move || ready_cert.is_valid() && ready_state.index.as_ref().is_none_or(Index::is_synced)),
        Arc::new(registry),
        Router::new(),
        admin_shutdown,
    ));

    let tls_config = rustls::ServerConfig::builder().with_no_client_auth().with_cert_resolver(cert.clone());
    let mut tls_config = tls_config;
    tls_config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls_config));
    let app = router(state.clone());
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| WebhookError::Listen { addr: args.listen, source })?;
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => { warn!(error = %e, "accept failed"); continue; }
            },
            _ = shutdown.cancelled() => break,
        };
        // Answers are small and latency is all that matters: no Nagle.
        let _ = tcp.set_nodelay(true);
        state.metrics.connections.inc();
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
        });
    }
    info!("picotun webhook stopped");
    Ok(())
}

/// Native sidecars (init containers with restartPolicy Always) are on by default from 1.29.
pub fn supports_native_sidecars(major: &str, minor: &str) -> bool {
    let minor: u32 = minor.trim_end_matches('+').parse().unwrap_or(0);
    major == "1" && minor >= 29 || major.parse::<u32>().is_ok_and(|m| m > 1)
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/report", post(report::handle))
        .layer(DefaultBodyLimit::max(admission::MAX_BODY_BYTES))
        .with_state(state)
}

async fn mutate(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let started = Instant::now();
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
        let mut warnings = Vec::new();
        let workload = match (admission::pod_of(&req), &state.client) {
            (Some(Ok(pod)), Some(client)) => {
                let namespace = req.namespace.clone().unwrap_or_default();
                match owner_workload(client, &namespace, pod.metadata.owner_references.as_deref().unwrap_or(&[])).await {
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
        let route_tunnels = match (admission::pod_of(&req), &state.index) {
            (Some(Ok(pod)), Some(index)) => {
                let namespace = req.namespace.clone().or_else(|| pod.metadata.namespace.clone()).unwrap_or_default();
                index.view().route_tunnels_for(&state.resolve, &pod, &namespace)
            }
            _ => Vec::new(),
        };
        let mut answer = admission::answer(
            &req,
            workload.as_ref(),
            &route_tunnels,
            state.inject_route_backends,
            &state.config,
            warnings,
        );
        if let (Some(Decision::Inject { .. }), Some(client), Some(Ok(pod))) = (&answer.decision, &state.client, admission::pod_of(&req)) {
            let namespace = req.namespace.clone().unwrap_or_default();
            if let Some(w) = missing_key_secret(client, &state.secrets, &namespace, &pod).await {
                state.metrics.failures.get_or_create(&ReasonLabels { reason: "key_secret_missing".into() }).inc();
                answer.response.warnings.get_or_insert_with(Vec::new).push(format!("picotun: {w}"));
            }
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
    let name = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(crate::api::KEY_SECRET))
        .cloned()
        .unwrap_or_else(|| crate::api::DEFAULT_KEY_SECRET.to_string());
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
            crate::api::KEY_SECRET_KEY
        )),
        _ => None,
    }
}

/// The workload that owns a pod being created: ReplicaSet -> Deployment, StatefulSet,
/// DaemonSet, Job. Metadata only, with a short timeout: admission must stay fast.
pub async fn owner_workload(
    client: &kube::Client,
    namespace: &str,
    owners: &[OwnerReference],
) -> Result<Option<Workload>, String> {
    let Some(owner) = owners.iter().find(|o| o.controller == Some(true)).or(owners.first()) else {
        return Ok(None);
    };
    let lookup = async {
        let meta = match owner.kind.as_str() {
            "ReplicaSet" => {
                let rs = Api::<ReplicaSet>::namespaced(client.clone(), namespace).get_metadata(&owner.name).await?;
                let deployment =
                    rs.metadata.owner_references.as_ref().and_then(|os| os.iter().find(|o| o.kind == "Deployment"));
                match deployment {
                    Some(d) => (
                        "Deployment",
                        Api::<Deployment>::namespaced(client.clone(), namespace).get_metadata(&d.name).await?.metadata,
                    ),
                    None => ("ReplicaSet", rs.metadata),
                }
            }
            "StatefulSet" => (
                "StatefulSet",
                Api::<StatefulSet>::namespaced(client.clone(), namespace).get_metadata(&owner.name).await?.metadata,
            ),
            "DaemonSet" => (
                "DaemonSet",
                Api::<DaemonSet>::namespaced(client.clone(), namespace).get_metadata(&owner.name).await?.metadata,
            ),
            "Job" => {
                ("Job", Api::<Job>::namespaced(client.clone(), namespace).get_metadata(&owner.name).await?.metadata)
            }
            _ => return Ok::<_, kube::Error>(None),
        };
        Ok(Some(Workload {
            reference: format!("{}/{}", meta.0, meta.1.name.clone().unwrap_or_default()),
            labels: meta.1.labels.unwrap_or_default(),
            annotations: meta.1.annotations.unwrap_or_default(),
        }))
    };
    match tokio::time::timeout(Duration::from_secs(2), lookup).await {
        Ok(Ok(w)) => Ok(w),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out after 2s".into()),
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
