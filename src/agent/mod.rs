//! `picotun agent`: the tunnel sidecar.
//!
//! ```text
//! tunnels file ──(poll, validate)──► supervisor ──watch──► connection per option set
//!                                       │                     │ russh session, forwards
//!  key file (polled) or certificate     │                     │ each (re)connect takes the
//!  from --certificate-url (renewed) ──► Credentials ─────────►│ current credential
//!                                       ▼                     ▼
//!                                   AgentState ◄──────── forwarded channel ─► proxy ─► app port
//!                                       │
//!                              admin: /live /ready /tunnels-up /metrics /status
//!                              report: POST /status to --report-url (the webhook)
//! ```

pub mod backoff;
pub mod connection;
pub mod credential;
pub mod dialect;
pub mod hostkey;
pub mod keys;
pub mod output;
#[allow(unsafe_code)]
pub mod pageout;
pub mod proxy;
pub mod report;
pub mod state;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::admin;
use crate::agent::connection::Settings;
use crate::agent::credential::Credentials;
use crate::agent::dialect::Dialect;
use crate::agent::hostkey::HostKeyPolicy;
use crate::agent::state::{AgentState, ForwardState};
use crate::core::tunnel::{TunnelKind, TunnelSpec, TunnelsFile};

/// `picotun agent` flags. Every flag has an environment fallback so the webhook can configure the
/// sidecar through env from a ConfigMap.
#[derive(Clone, Debug, clap::Args)]
pub struct AgentArgs {
    /// The tunnels file (JSON, mounted from a pod annotation through the downward API); reloaded
    /// when it changes.
    #[arg(long, env = "PICOTUN_TUNNELS_FILE", default_value = "/etc/picotun/tunnels/tunnels.json")]
    pub tunnels_file: PathBuf,
    #[command(flatten)]
    pub tunnel_server: ServerArgs,
    /// The private key (ed25519, ECDSA or RSA; OpenSSH or PEM). Reloaded when its content
    /// changes (a rotated Secret), for the next connect. Ignored with --certificate-url.
    #[arg(long, env = "PICOTUN_KEY_FILE", default_value = "/etc/picotun/ssh/id")]
    pub key_file: PathBuf,
    /// Certificate mode: make an ed25519 key in memory (never written anywhere), get a short
    /// SSH certificate for it from this URL (the webhook's /certificate, HTTPS; the token and CA
    /// are --report-token-file and --report-ca) and renew it before it expires.
    #[arg(long, env = "PICOTUN_CERTIFICATE_URL")]
    pub certificate_url: Option<String>,
    /// A file holding the key's passphrase, if it has one.
    #[arg(long, env = "PICOTUN_KEY_PASSPHRASE_FILE")]
    pub key_passphrase_file: Option<PathBuf>,
    /// known_hosts file pinning the server's host key (tuns.sh's key is built in).
    #[arg(long, env = "PICOTUN_KNOWN_HOSTS")]
    pub known_hosts: Option<PathBuf>,
    /// known_hosts lines given inline (the webhook passes its pin this way); used when
    /// --known-hosts is not given.
    #[arg(long, env = "PICOTUN_KNOWN_HOSTS_DATA", hide_env_values = true)]
    pub known_hosts_data: Option<String>,
    /// Connect without checking the server's host key. Logged as a warning on every connect.
    #[arg(long, env = "PICOTUN_INSECURE_SKIP_HOST_KEY_CHECK")]
    pub insecure_skip_host_key_check: bool,
    /// Bind address requested from a plain OpenSSH server for TCP forwards.
    #[arg(long, env = "PICOTUN_OPENSSH_BIND_ADDRESS", default_value = "localhost")]
    pub openssh_bind_address: String,
    /// Where the app listens (the pod's loopback).
    #[arg(long, env = "PICOTUN_TARGET_HOST", default_value = "127.0.0.1")]
    pub target_host: IpAddr,
    /// Open forwards without waiting for the app's port to accept connections (for a startup
    /// gate on /tunnels-up, which holds the app until the tunnels are up).
    #[arg(long, env = "PICOTUN_OPEN_BEFORE_APP")]
    pub open_before_app: bool,
    /// The admin port: /live, /ready (the tunnels file was read), /tunnels-up (every tunnel
    /// established), /metrics, /status.
    /// (The webhook sets it; the default port is the webhook's, see
    /// `api::DEFAULT_SIDECAR_ADMIN_PORT`.)
    #[arg(long, env = "PICOTUN_ADMIN_ADDR",
          default_value_t = SocketAddr::from(([0, 0, 0, 0], crate::core::api::DEFAULT_SIDECAR_ADMIN_PORT)))]
    pub admin_addr: SocketAddr,
    /// After SIGTERM: how long in-flight connections may take to finish.
    #[arg(long, env = "PICOTUN_GRACE_PERIOD", value_parser = humantime::parse_duration, default_value = "20s")]
    pub grace_period: Duration,
    /// Keepalive probe interval on the SSH connection: after this long without a word from the
    /// server the agent probes it, and again each interval; the server is declared dead (and
    /// the agent reconnects) after --keepalive-interval x --keepalive-max of silence.
    #[arg(long, env = "PICOTUN_KEEPALIVE_INTERVAL", value_parser = humantime::parse_duration, default_value = "5s")]
    pub keepalive_interval: Duration,
    /// How many keepalive intervals of silence mean the server is dead; 0: probe, never give up.
    #[arg(long, env = "PICOTUN_KEEPALIVE_MAX", default_value_t = 3)]
    pub keepalive_max: usize,
    /// How soon a replica the server gave another name (another replica holds it) first asks
    /// again; each further try waits twice as long, up to --standby-retry-max (plus up to half
    /// again of jitter). A tunnel the tunnels file marks `standby` is never asked for.
    #[arg(long, env = "PICOTUN_STANDBY_RETRY", value_parser = humantime::parse_duration, default_value = "3s")]
    pub standby_retry: Duration,
    /// The longest wait between a standing-by replica's tries.
    #[arg(long, env = "PICOTUN_STANDBY_RETRY_MAX", value_parser = humantime::parse_duration, default_value = "60s")]
    pub standby_retry_max: Duration,
    /// How long the server may take to answer a request (tcpip-forward, cancel-tcpip-forward,
    /// opening the session channel, authentication) before the connection is treated as broken
    /// and reconnected.
    #[arg(long, env = "PICOTUN_REQUEST_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub request_timeout: Duration,
    /// Bytes a connection may hold for an app that is not reading; a connection held at the
    /// limit for a second is closed.
    #[arg(long, env = "PICOTUN_MAX_BUFFERED_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_buffered_bytes: usize,
    /// The SSH receive window per channel. russh returns window credit only when half of it is
    /// used, so on a long round trip the window, not the link, bounds throughput into the pod.
    /// Default: 8 MiB for sish and sandhole, 4 MiB for OpenSSH (see `default_window_size`).
    #[arg(long, env = "PICOTUN_SSH_WINDOW_BYTES")]
    pub ssh_window_bytes: Option<u32>,
    /// Bytes read from the SSH connection's socket at once; 0 reads each packet straight from
    /// the socket (two reads per packet).
    #[arg(long, env = "PICOTUN_SSH_READ_BUFFER_BYTES", default_value_t = 64 * 1024)]
    pub ssh_read_buffer_bytes: usize,
    /// Once the tunnels are up (or a minute after start), hand the kernel back the pages of
    /// the binary that only start-up used (MADV_PAGEOUT): about half of an idle agent's RSS.
    #[arg(long, env = "PICOTUN_PAGE_OUT_AFTER_START", action = clap::ArgAction::Set, default_value_t = true)]
    pub page_out_after_start: bool,
    /// How often the tunnels file (and the key file) is checked for changes.
    #[arg(long, env = "PICOTUN_RELOAD_INTERVAL", value_parser = humantime::parse_duration, default_value = "1s")]
    pub reload_interval: Duration,
    /// Reporting the public addresses to the webhook (--report-url, --report-ca,
    /// --report-token-file, --report-interval).
    #[command(flatten)]
    pub report: report::ReportArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Key(#[from] keys::KeyError),
    #[error(transparent)]
    HostKey(#[from] hostkey::HostKeyError),
    #[error("cannot listen on the admin address {addr}: {source}")]
    Admin { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Report(#[from] report::ReportError),
}

pub use crate::core::server::ServerArgs;

/// The option set that decides which SSH connection a tunnel rides on.
type ConnectionKey = (BTreeMap<String, String>, bool);

/// A running connection task: its tunnels, its stop signal, its task.
struct ConnectionTask {
    specs: watch::Sender<Vec<TunnelSpec>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn connection_key(spec: &TunnelSpec) -> ConnectionKey {
    (spec.options.clone(), spec.kind == TunnelKind::Tls)
}

/// Runs the agent until `shutdown` is cancelled, then drains and returns.
pub async fn run(args: AgentArgs, shutdown: CancellationToken) -> Result<(), AgentError> {
    let server = args.tunnel_server.clone();
    let certificate_url = args.certificate_url.as_deref().map(str::trim).filter(|u| !u.is_empty());
    // Key mode reads the key now (a bad key stops the agent at once) and then watches the file.
    let key_file = match certificate_url {
        None => {
            let seen = keys::read(&args.key_file, args.key_passphrase_file.as_deref())?;
            let key = keys::decode(&args.key_file, &seen.0, seen.1.as_deref())?;
            Some((key, seen))
        }
        Some(_) => None,
    };
    let certificate_endpoint = certificate_url
        .map(|url| {
            report::Endpoint::new(
                "--certificate-url",
                url,
                args.report.report_ca.as_deref(),
                args.report.report_token_file.clone(),
            )
        })
        .transpose()?;
    let host_keys = match (&args.known_hosts, &args.known_hosts_data) {
        (None, Some(data)) if !args.insecure_skip_host_key_check => {
            HostKeyPolicy::from_text(data, "PICOTUN_KNOWN_HOSTS_DATA", &server.server, server.server_port)?
        }
        _ => HostKeyPolicy::resolve(
            &server.server,
            server.server_port,
            args.known_hosts.as_deref(),
            args.insecure_skip_host_key_check,
        )?,
    };
    let (credentials, credential_task) = match (key_file, certificate_endpoint) {
        (Some((key, seen)), _) => {
            info!(
                server = %format!("{}:{}", server.server, server.server_port),
                dialect = ?server.dialect,
                key = %keys::fingerprint(&key),
                host_keys = %host_keys.describe(),
                "picotun agent starting"
            );
            let credentials = Arc::new(Credentials::with_key(key, &args.key_file));
            let task = tokio::spawn(credential::watch_key_file(
                credentials.clone(),
                args.key_file.clone(),
                args.key_passphrase_file.clone(),
                seen,
                args.reload_interval,
                shutdown.clone(),
            ));
            (credentials, task)
        }
        (None, Some(endpoint)) => {
            let key = credential::generate_key();
            info!(
                server = %format!("{}:{}", server.server, server.server_port),
                dialect = ?server.dialect,
                key = %keys::fingerprint(&key),
                certificate_url = endpoint.url(),
                host_keys = %host_keys.describe(),
                "picotun agent starting (certificate mode: a key made in memory, certified by the webhook)"
            );
            let credentials = Arc::new(Credentials::for_certificates(endpoint.url()));
            let task = tokio::spawn(credential::keep_certificate(credentials.clone(), endpoint, key, shutdown.clone()));
            (credentials, task)
        }
        (None, None) => unreachable!("one of the two modes is chosen above"),
    };
    let settings = Arc::new(Settings {
        server_host: server.server.clone(),
        server_port: server.server_port,
        user: server.user.clone(),
        credentials: credentials.clone(),
        host_keys,
        dialect: server.dialect,
        openssh_bind: args.openssh_bind_address.clone(),
        target_host: args.target_host,
        keepalive_interval: args.keepalive_interval,
        keepalive_max: args.keepalive_max,
        standby_retry: args.standby_retry,
        standby_retry_max: args.standby_retry_max,
        request_timeout: args.request_timeout,
        max_buffered: args.max_buffered_bytes,
        connect_timeout: Duration::from_secs(15),
        address_timeout: Duration::from_secs(5),
        grace: args.grace_period,
        window_size: args.ssh_window_bytes.unwrap_or_else(|| connection::default_window_size(server.dialect)),
        read_buffer: args.ssh_read_buffer_bytes,
        open_before_app: args.open_before_app,
    });
    let state = Arc::new(AgentState::default());
    let reporter = report::Reporter::from_args(&args.report)?;

    let listener = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .map_err(|source| AgentError::Admin { addr: args.admin_addr, source })?;
    let admin_state = state.clone();
    let status_state = state.clone();
    let server_label = format!("{}:{}", server.server, server.server_port);
    let dialect = server.dialect;
    let status_credentials = credentials.clone();
    let status = Arc::new(move || status_document(&status_state, &status_credentials, &server_label, dialect));
    let status_route = status.clone();
    let up_state = state.clone();
    let extra = axum::Router::new()
        .route(
            "/status",
            get(move || {
                let status = status_route.clone();
                async move { Json(status()) }
            }),
        )
        .route(
            "/tunnels-up",
            get(move || {
                let state = up_state.clone();
                async move { tunnels_up(&state) }
            }),
        );
    let mut registry = prometheus_client::registry::Registry::default();
    state.metrics.register(&mut registry);
    credentials.register(&mut registry);
    if let Some(r) = &reporter {
        r.metrics.register(&mut registry);
    }
    let admin_shutdown = CancellationToken::new();
    let admin_task = tokio::spawn(admin::serve(
        listener,
        Arc::new(move || admin_state.is_ready()),
        Arc::new(registry),
        extra,
        admin_shutdown.clone(),
    ));

    // Reports go on while draining (the webhook learns the tunnels are going) and stop with the
    // admin port.
    let report_task = reporter.map(|r| {
        info!(url = r.url(), "reporting the tunnels' public addresses");
        tokio::spawn(r.run(move || status(), admin_shutdown.clone()))
    });

    if args.page_out_after_start {
        tokio::spawn(page_out_when_up(state.clone()));
    }
    supervise(&args, settings, state.clone(), shutdown).await;
    let _ = credential_task.await;
    admin_shutdown.cancel();
    let _ = admin_task.await;
    if let Some(t) = report_task {
        let _ = t.await;
    }
    info!("picotun agent stopped");
    Ok(())
}

/// Waits for the tunnels to come up (or a minute), then pages out start-up's code.
async fn page_out_when_up(state: Arc<AgentState>) {
    let started = tokio::time::Instant::now();
    while state.tunnels_up().is_err() && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    match pageout::page_out_own_executable() {
        Ok(bytes) => debug!(mib = bytes / (1024 * 1024), "paged out the binary's start-up code"),
        Err(e) => debug!(error = %e, "could not page out start-up code (MADV_PAGEOUT); RSS stays higher"),
    }
}

/// The `/status` document: served on the admin port, and what is posted to --report-url.
/// `certificate` is null in key mode; `credentialError` is the last failure to renew the
/// certificate or to reload the key file (null after a success).
fn status_document(state: &AgentState, credentials: &Credentials, server: &str, dialect: Dialect) -> serde_json::Value {
    serde_json::json!({
        "ready": state.is_ready(),
        "server": server,
        "dialect": dialect,
        "configError": state.config_error(),
        "certificate": credentials.certificate_status(),
        "credentialError": credentials.problem(),
        "tunnels": state.snapshot(),
    })
}

/// `/tunnels-up`: 200 when every tunnel is up, else 503 saying which are not and why.
fn tunnels_up(state: &AgentState) -> (StatusCode, Json<serde_json::Value>) {
    match state.tunnels_up() {
        Ok(n) => (StatusCode::OK, Json(serde_json::json!({"up": true, "tunnels": n}))),
        Err((reason, down)) => {
            let down: Vec<serde_json::Value> = down
                .iter()
                .map(|t| serde_json::json!({"name": t.name, "state": t.state, "message": t.message}))
                .collect();
            (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"up": false, "reason": reason, "notUp": down})))
        }
    }
}

/// Reads the tunnels file, keeps one connection task per option set, and passes each its
/// tunnels. Returns after shutdown, once every connection has drained.
async fn supervise(args: &AgentArgs, settings: Arc<Settings>, state: Arc<AgentState>, shutdown: CancellationToken) {
    let mut connections: BTreeMap<ConnectionKey, ConnectionTask> = BTreeMap::new();
    let mut last_text: Option<String> = None;
    let mut reload = tokio::time::interval(args.reload_interval);
    reload.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = reload.tick() => {}
            _ = shutdown.cancelled() => break,
        }
        let text = match std::fs::read_to_string(&args.tunnels_file) {
            Ok(t) => {
                state.tunnels_file_read();
                t
            }
            Err(e) => {
                let msg = format!("cannot read the tunnels file {}: {e}", args.tunnels_file.display());
                if state.config_error().as_deref() != Some(msg.as_str()) {
                    warn!("{msg}; keeping the last good configuration");
                    state.metrics.config_reload("unreadable");
                }
                state.set_config_error(Some(msg));
                continue;
            }
        };
        if last_text.as_deref() == Some(text.as_str()) {
            continue;
        }
        last_text = Some(text.clone());
        let file = match TunnelsFile::parse(&text) {
            Ok(f) => f,
            Err(e) => {
                let msg = format!("{}: {e}", args.tunnels_file.display());
                warn!("invalid tunnels file, keeping the last good configuration: {msg}");
                state.metrics.config_reload("invalid");
                state.set_config_error(Some(msg));
                continue;
            }
        };
        state.set_config_error(None);
        state.metrics.config_reload("ok");
        info!(tunnels = file.tunnels.len(), "tunnels file loaded");
        state.set_configured(&file.tunnels, ForwardState::Connecting);
        // Told to stand by: standing by at once, whatever the connection is doing.
        for spec in file.tunnels.iter().filter(|s| s.standby) {
            state.set_state(&spec.name, ForwardState::StandingBy, None, Some(connection::TOLD_TO_STAND_BY.into()));
        }

        let mut groups: BTreeMap<ConnectionKey, Vec<TunnelSpec>> = BTreeMap::new();
        for spec in file.tunnels {
            groups.entry(connection_key(&spec)).or_default().push(spec);
        }
        // Connections whose option set is gone: drain and stop.
        let gone: Vec<ConnectionKey> = connections.keys().filter(|k| !groups.contains_key(*k)).cloned().collect();
        for key in gone {
            let c = connections.remove(&key).expect("listed above");
            let _ = c.specs.send(Vec::new());
            c.stop.cancel();
            tokio::spawn(async move {
                let _ = c.task.await;
            });
        }
        for (key, specs) in groups {
            if let Some(c) = connections.get(&key) {
                // Unchanged tunnels stay untouched: the connection diffs.
                c.specs.send_if_modified(|current| {
                    let changed = *current != specs;
                    *current = specs.clone();
                    changed
                });
                continue;
            }
            let (tx, rx) = watch::channel(specs);
            let token = shutdown.child_token();
            let task = tokio::spawn(connection::run(settings.clone(), key.0.clone(), rx, state.clone(), token.clone()));
            connections.insert(key, ConnectionTask { specs: tx, stop: token, task });
        }
    }

    info!(grace = ?settings.grace, "draining: cancelling forwards, letting connections finish");
    state.start_draining();
    for (_, c) in connections {
        c.stop.cancel();
        if let Err(e) = c.task.await {
            error!(error = %e, "a connection task failed while draining");
        }
    }
}
