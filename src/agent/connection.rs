//! One SSH connection to the tunnel server, shared by every tunnel of the pod with the same
//! server options. It connects (pinned host key, the current credential: one client key, or a
//! certificate for the agent's own key), starts the session the dialect wants, opens each
//! forward once the app's port answers (at once with --open-before-app), learns the public
//! address from what the server prints, keeps the forwards matching the configuration, and
//! reconnects with jittered backoff when the connection is lost.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use russh::client::{self, Handle, Msg};
use russh::keys::PrivateKeyWithHashAlg;
use russh::keys::PublicKeyOrCertificate;
use russh::{Channel, ChannelMsg, Disconnect};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::agent::backoff::{Backoff, StandbyRetry};
use crate::agent::credential::{self, Credential, Credentials};
use crate::agent::dialect::{AddressWatch, Dialect, ForwardRequest, Placement, SessionStart};
use crate::agent::hostkey::{HostKeyPolicy, fingerprint};
use crate::agent::output::{LineBuffer, ServerLine, parse_line};
use crate::agent::proxy::{self, Relay};
use crate::agent::state::{AgentState, ForwardState};
use crate::core::tunnel::{TunnelKind, TunnelSpec};

/// Everything a connection needs that does not change with the tunnels file.
pub struct Settings {
    pub server_host: String,
    pub server_port: u16,
    pub user: String,
    /// What each (re)connect logs in with: read afresh for every attempt.
    pub credentials: Arc<Credentials>,
    pub host_keys: HostKeyPolicy,
    pub dialect: Dialect,
    pub openssh_bind: String,
    pub target_host: IpAddr,
    pub keepalive_interval: Duration,
    pub keepalive_max: usize,
    /// The first wait before a replica standing by asks again; it doubles up to
    /// `standby_retry_max` (see [`StandbyRetry`]).
    pub standby_retry: Duration,
    pub standby_retry_max: Duration,
    /// How long a global request (tcpip-forward, cancel-tcpip-forward) or a channel open may go
    /// unanswered before the connection is treated as broken.
    pub request_timeout: Duration,
    pub max_buffered: usize,
    pub connect_timeout: Duration,
    pub address_timeout: Duration,
    pub grace: Duration,
    pub window_size: u32,
    /// Bytes read from the server's socket at once (see `connect`); 0: unbuffered.
    pub read_buffer: usize,
    /// Open forwards without waiting for the app's port (the startup gate holds the app until
    /// the tunnels are up, so waiting for it would wait forever).
    pub open_before_app: bool,
}

/// The receive window per channel when `--ssh-window-bytes` is not given.
///
/// A window is what the server may send before it hears back, so it bounds throughput at
/// window / round trip, and below that, since russh returns credit only once half the window
/// is used: over a 100 ms round trip 8 MiB moved 39 MB/s into the pod, 2.1x ssh's. sish (Go's x/crypto/ssh) and sandhole only wait for window credit; they read
/// no further ahead. OpenSSH's sshd reads ahead into one buffer as far as the window allows and
/// compacts that buffer as it drains it, so a large window costs sshd CPU with every byte: with
/// 8 MiB it spent 1.7-2x the CPU per GiB sending to us that it spent sending to ssh (which
/// offers 2 MiB but returns credit every few packets), and one stream into the pod fell to
/// 0.72-0.85x of ssh. 4 MiB is the compromise measured (bench/agent.sh,
/// `*_sshd_cpu_ms_per_GiB`, docs/performance.md): sshd within 1.1x, and a 100 ms round trip at
/// ssh's throughput, where 2 MiB (sshd even) gave 0.6x of it.
pub fn default_window_size(dialect: Dialect) -> u32 {
    match dialect {
        Dialect::Sish | Dialect::Sandhole => 8 * 1024 * 1024,
        Dialect::Openssh => 4 * 1024 * 1024,
    }
}

/// russh's keepalive settings for "the server is dead after `interval` x `max` without a word
/// from it, with a probe every `interval` to draw one".
///
/// russh counts each `keepalive_interval` of silence, probing each time, and gives up on the
/// count *after* `keepalive_max` -- at (max + 1) x interval, which is also what OpenSSH's
/// ServerAliveCountMax does. Passing our max straight through detected a silent server with
/// `--keepalive-interval 5s --keepalive-max 3` after 20 s instead of 15. russh's max of 0 means
/// "never give up", so a max of 1 probes twice as often instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RusshKeepalive {
    interval: Option<Duration>,
    max: usize,
}

impl RusshKeepalive {
    fn for_silence(interval: Duration, max: usize) -> Self {
        match max {
            // --keepalive-max 0: probe, never give up (the server's own keepalives or TCP decide).
            0 => Self { interval: Some(interval), max: 0 },
            1 => Self { interval: Some(interval / 2), max: 1 },
            n => Self { interval: Some(interval), max: n - 1 },
        }
    }

    /// When russh gives up on a server that went silent just after its last word.
    #[cfg(test)]
    fn gives_up_after(self) -> Option<Duration> {
        let interval = self.interval?;
        (self.max > 0).then(|| interval * (self.max as u32 + 1))
    }
}

/// How long data the agent sent may stay unacknowledged by the server before the kernel gives
/// the connection up (TCP_USER_TIMEOUT): the same `interval` x `max` of silence as the
/// keepalives; none for `--keepalive-max 0` (never give up).
///
/// The keepalives alone miss a server that goes silent while the agent is sending: once the
/// socket's buffers are full, russh's session loop waits in its write with no limit, and its
/// keepalive timer, checked between writes, never runs. The kernel's limit covers that wait,
/// zero-window probes included (a frozen server's kernel still answers those).
fn unacknowledged_limit(interval: Duration, max: usize) -> Option<Duration> {
    (max > 0).then(|| interval.saturating_mul(u32::try_from(max).unwrap_or(u32::MAX)))
}

/// Why a connection attempt or a live connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("cannot reach {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error(
        "the server at {addr} presented host key {presented}, which is not pinned ({pinned}); if the server's key \
         really changed, update --known-hosts"
    )]
    HostKeyMismatch { addr: String, presented: String, pinned: String },
    #[error(
        "the server refused key {fingerprint} for user {user:?}: register the key's public half with the tunnel \
         service (pico.sh: `ssh pico.sh` -> keys) or check the user name"
    )]
    AuthRefused { user: String, fingerprint: String },
    /// The whole message: what was offered and what to check ([`credential::refusal`]).
    #[error("{0}")]
    CertificateRefused(String),
    #[error("SSH error: {0}")]
    Ssh(String),
    #[error("connection lost")]
    Lost,
    /// The server did not answer a request in time: the connection is treated as broken.
    #[error("the server did not answer {request} within {timeout:?}; reconnecting")]
    RequestTimeout { request: String, timeout: Duration },
}

impl ConnError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            ConnError::Unreachable { .. } => "unreachable",
            ConnError::HostKeyMismatch { .. } => "host_key_mismatch",
            ConnError::AuthRefused { .. } => "auth_refused",
            ConnError::CertificateRefused(_) => "certificate_refused",
            ConnError::Ssh(_) => "ssh",
            ConnError::Lost => "connection_lost",
            ConnError::RequestTimeout { .. } => "request_timeout",
        }
    }
}

/// Forwarded channels arrive keyed by (address, port); this maps them to the app.
#[derive(Default)]
struct Routes {
    by_key: Mutex<HashMap<(String, u32), Relay>>,
}

impl Routes {
    fn insert(&self, keys: &[(String, u32)], relay: &Relay) {
        let mut map = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        for k in keys {
            map.insert(k.clone(), relay.clone());
        }
    }

    fn remove(&self, tunnel: &str) {
        self.by_key.lock().unwrap_or_else(|p| p.into_inner()).retain(|_, r| r.tunnel != tunnel);
    }

    /// Exact (address, port) first. Servers differ in what they put in `forwarded-tcpip`
    /// (sish: requested address and reply port; OpenSSH: the bound address), so fall back to
    /// the one route on that port, then the one route with that address.
    fn lookup(&self, address: &str, port: u32) -> Option<Relay> {
        let map = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = map.get(&(address.to_string(), port)) {
            return Some(r.clone());
        }
        let unique = |f: &dyn Fn(&(String, u32)) -> bool| {
            let mut names: Vec<&Relay> = map.iter().filter(|(k, _)| f(k)).map(|(_, r)| r).collect();
            names.dedup_by(|a, b| a.tunnel == b.tunnel);
            let first = names.first().map(|r| r.tunnel.clone());
            (names.iter().all(|r| Some(&r.tunnel) == first.as_ref()) && !names.is_empty()).then(|| names[0].clone())
        };
        unique(&|k| k.1 == port && port != 0).or_else(|| unique(&|k| k.0 == address))
    }
}

struct Handler {
    settings: Arc<Settings>,
    routes: Arc<Routes>,
    state: Arc<AgentState>,
    host_key_problem: Arc<Mutex<Option<ConnError>>>,
}

impl client::Handler for Handler {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        // For a host certificate this is the certified key; certificates earn no extra trust.
        let key = key.public_key();
        if self.settings.host_keys.accepts(&key) {
            if matches!(self.settings.host_keys, HostKeyPolicy::Insecure) {
                warn!(
                    presented = %fingerprint(&key),
                    "host key NOT checked (--insecure-skip-host-key-check): anyone on the path can read this pod's traffic"
                );
            }
            return Ok(true);
        }
        let problem = ConnError::HostKeyMismatch {
            addr: format!("{}:{}", self.settings.server_host, self.settings.server_port),
            presented: fingerprint(&key),
            pinned: self.settings.host_keys.describe(),
        };
        *self.host_key_problem.lock().unwrap_or_else(|p| p.into_inner()) = Some(problem);
        Ok(false)
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let Some(relay) = self.routes.lookup(connected_address, connected_port) else {
            warn!(
                connected_address,
                connected_port, "a connection arrived for a forward this agent does not hold; rejecting"
            );
            self.state.metrics.error("unknown_forward");
            // Dropping `reply` rejects the channel.
            return Ok(());
        };
        // Everything from here on runs in its own task: handler methods block the session loop.
        let originator = format!("{originator_address}:{originator_port}");
        tokio::spawn(proxy::serve(channel, reply, relay, originator, self.state.clone()));
        Ok(())
    }
}

/// A forward this connection holds.
struct Held {
    spec: TunnelSpec,
    request: ForwardRequest,
    reply_port: u32,
}

/// Keeps one SSH connection (one option set) up for as long as `shutdown` is not cancelled,
/// holding the forwards `specs` asks for. On shutdown: cancels the forwards, waits for in-flight
/// connections up to the grace period, disconnects.
pub async fn run(
    settings: Arc<Settings>,
    options: BTreeMap<String, String>,
    mut specs: watch::Receiver<Vec<TunnelSpec>>,
    state: Arc<AgentState>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut first = true;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        if !first {
            state.metrics.reconnects_total.inc();
        }
        first = false;
        // The credential of the moment; without one (no certificate yet, or it expired before a
        // renewal came), wait for one rather than offer what the server would refuse.
        let credential = match settings.credentials.current() {
            Some(c) => c,
            None => {
                let why = settings.credentials.waiting_reason();
                info!(reason = %why, "waiting for a credential before connecting");
                set_not_served(&state, &specs.borrow(), Some(why.clone()));
                let mut wait = std::pin::pin!(settings.credentials.next_usable());
                loop {
                    tokio::select! {
                        c = &mut wait => break c,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {
                            // Keep the reason current (the last failed renewal).
                            let why = settings.credentials.waiting_reason();
                            set_not_served(&state, &specs.borrow(), Some(why));
                        }
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        };
        let started = Instant::now();
        set_not_served(&state, &specs.borrow(), None);
        match session(&settings, &credential, &options, &mut specs, &state, &shutdown).await {
            Ok(()) => return,
            Err(e) => {
                state.metrics.error(e.metric_label());
                set_not_served(&state, &specs.borrow(), Some(e.to_string()));
                // A connection that lived a while starts the backoff over.
                if started.elapsed() > Duration::from_secs(60) {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                warn!(error = %e, retry_in = ?delay, "tunnel connection down");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    }
}

/// What `/status` says of a tunnel told to stand by (`standby` in the tunnels file).
pub const TOLD_TO_STAND_BY: &str =
    "another replica holds this name (standby in the tunnels file): not asking the server for it";

/// The state of tunnels this connection is not serving now: `connecting` (with `why`), except
/// those the tunnels file tells to stand by, which stand by whatever the connection does.
fn set_not_served(state: &AgentState, specs: &[TunnelSpec], why: Option<String>) {
    for s in specs {
        if s.standby {
            state.set_state(&s.name, ForwardState::StandingBy, None, Some(TOLD_TO_STAND_BY.into()));
        } else {
            state.set_state(&s.name, ForwardState::Connecting, None, why.clone());
        }
    }
}

/// Awaits an answer from the server for at most `--request-timeout`.
///
/// Why a request that times out ends the connection: SSH answers global requests in order, so a
/// tcpip-forward the server never answers holds every later request (the next forward, each
/// cancel) behind it, and the server's own keepalives still arrive, which keeps russh's liveness
/// check quiet -- the session would be wedged for good. Nothing on this connection can make
/// progress, so it is dropped and reconnected with the usual backoff, which restores every
/// forward.
async fn answered<T>(
    settings: &Settings,
    tunnel: &str,
    request: &str,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, ConnError> {
    match tokio::time::timeout(settings.request_timeout, fut).await {
        Ok(v) => Ok(v),
        Err(_) => {
            warn!(
                tunnel,
                request,
                timeout = ?settings.request_timeout,
                "the server did not answer in time; treating the connection as broken"
            );
            Err(ConnError::RequestTimeout {
                request: if tunnel.is_empty() { request.to_string() } else { format!("{request} for {tunnel}") },
                timeout: settings.request_timeout,
            })
        }
    }
}

async fn connect(
    settings: &Arc<Settings>,
    credential: &Credential,
    routes: &Arc<Routes>,
    state: &Arc<AgentState>,
) -> Result<Handle<Handler>, ConnError> {
    let addr = format!("{}:{}", settings.server_host, settings.server_port);
    let probes = RusshKeepalive::for_silence(settings.keepalive_interval, settings.keepalive_max);
    let config = Arc::new(client::Config {
        keepalive_interval: probes.interval,
        keepalive_max: probes.max,
        inactivity_timeout: None,
        window_size: settings.window_size,
        channel_buffer_size: 1024,
        preferred: russh::Preferred {
            // AES-GCM runs on the CPU's AES instructions; ChaCha20 is the fallback.
            cipher: std::borrow::Cow::Borrowed(&[
                russh::cipher::AES_256_GCM,
                russh::cipher::AES_128_GCM,
                russh::cipher::CHACHA20_POLY1305,
                russh::cipher::AES_256_CTR,
            ]),
            ..Default::default()
        },
        ..Default::default()
    });
    let host_key_problem = Arc::new(Mutex::new(None));
    let handler = Handler {
        settings: settings.clone(),
        routes: routes.clone(),
        state: state.clone(),
        host_key_problem: host_key_problem.clone(),
    };
    let connecting = async {
        let tcp = tokio::net::TcpStream::connect((settings.server_host.as_str(), settings.server_port)).await?;
        // Without it every new visitor connection pays Nagle's delay on the SSH hop.
        tcp.set_nodelay(true)?;
        socket2::SockRef::from(&tcp)
            .set_tcp_user_timeout(unacknowledged_limit(settings.keepalive_interval, settings.keepalive_max))?;
        // russh reads each packet with two exact reads (its length, then the rest): straight
        // from the socket that is two syscalls per packet. A read buffer takes what the kernel
        // holds in one. 0: unbuffered, as russh's own connect (a 1-byte buffer is never used:
        // every read asks for at least a byte and goes straight to the socket).
        let stream = tokio::io::BufReader::with_capacity(settings.read_buffer.max(1), tcp);
        client::connect_stream(config, stream, handler).await
    };
    let mut handle = match tokio::time::timeout(settings.connect_timeout, connecting).await {
        Err(_) => {
            return Err(ConnError::Unreachable {
                addr,
                reason: format!("no answer within {:?}", settings.connect_timeout),
            });
        }
        Ok(Err(e)) => {
            if let Some(problem) = host_key_problem.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return Err(problem);
            }
            return Err(match e {
                russh::Error::IO(io) => ConnError::Unreachable { addr, reason: io.to_string() },
                other => ConnError::Ssh(other.to_string()),
            });
        }
        Ok(Ok(h)) => h,
    };
    let authenticating = async {
        match credential {
            Credential::Key(key) => {
                let hash = handle.best_supported_rsa_hash().await.map_err(|e| ConnError::Ssh(e.to_string()))?.flatten();
                handle
                    .authenticate_publickey(settings.user.clone(), PrivateKeyWithHashAlg::new(key.clone(), hash))
                    .await
            }
            Credential::Certificate(issued) => {
                handle
                    .authenticate_openssh_cert(settings.user.clone(), issued.key.clone(), issued.certificate.clone())
                    .await
            }
        }
        .map_err(|e| ConnError::Ssh(e.to_string()))
    };
    let auth = answered(settings, "", "authentication", authenticating).await??;
    if !auth.success() {
        return Err(match credential {
            Credential::Key(key) => ConnError::AuthRefused {
                user: settings.user.clone(),
                fingerprint: crate::agent::keys::fingerprint(key),
            },
            Credential::Certificate(issued) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                ConnError::CertificateRefused(credential::refusal(issued, &settings.user, now))
            }
        });
    }
    Ok(handle)
}

/// Drains the session channel for as long as it is open -- an undrained channel stalls the
/// whole connection -- and publishes the lines that matter.
fn spawn_session_reader(mut channel: Channel<Msg>, lines: broadcast::Sender<ServerLine>) {
    tokio::spawn(
        async move {
            let mut buffer = LineBuffer::default();
            while let Some(msg) = channel.wait().await {
                let data = match &msg {
                    ChannelMsg::Data { data } => data.as_ref(),
                    ChannelMsg::ExtendedData { data, .. } => data.as_ref(),
                    _ => continue,
                };
                for line in buffer.push(data) {
                    debug!(%line, "server says");
                    if let Some(parsed) = parse_line(&line) {
                        let _ = lines.send(parsed);
                    }
                }
            }
        }
        .instrument(info_span!("session-output")),
    );
}

async fn session(
    settings: &Arc<Settings>,
    credential: &Credential,
    options: &BTreeMap<String, String>,
    specs: &mut watch::Receiver<Vec<TunnelSpec>>,
    state: &Arc<AgentState>,
    shutdown: &CancellationToken,
) -> Result<(), ConnError> {
    let routes = Arc::new(Routes::default());
    let handle = tokio::select! {
        h = connect(settings, credential, &routes, state) => h?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    state.metrics.ssh_connects_total.inc();
    info!(
        server = %format!("{}:{}", settings.server_host, settings.server_port),
        user = %settings.user,
        credential = %credential.describe(),
        "connected"
    );

    let result = serve(settings, options, specs, state, shutdown, &handle, &routes).await;
    if result.is_err() && !handle.is_closed() {
        // Broken but not closed (a request went unanswered): say goodbye rather than leave the
        // server holding this connection's forwards until it notices.
        let bye = handle.disconnect(Disconnect::ByApplication, "picotun agent reconnecting", "en");
        let _ = tokio::time::timeout(Duration::from_secs(1), bye).await;
    }
    result
}

/// The forwards of one connected session, kept matching `specs` until shutdown or an error.
async fn serve(
    settings: &Arc<Settings>,
    options: &BTreeMap<String, String>,
    specs: &mut watch::Receiver<Vec<TunnelSpec>>,
    state: &Arc<AgentState>,
    shutdown: &CancellationToken,
    handle: &Handle<Handler>,
    routes: &Arc<Routes>,
) -> Result<(), ConnError> {
    let (handle, routes) = (handle, routes);
    let (lines_tx, _) = broadcast::channel(256);
    let tls = specs.borrow().iter().any(|s| s.kind == TunnelKind::Tls);
    let start = settings.dialect.session_start(options, tls);
    if start != SessionStart::None {
        let channel = answered(settings, "", "the session channel", handle.channel_open_session())
            .await?
            .map_err(|e| ConnError::Ssh(e.to_string()))?;
        match &start {
            // sish never answers exec: do not wait for a reply.
            SessionStart::Exec(cmd) => channel.exec(false, cmd.as_bytes()).await,
            SessionStart::Shell => channel.request_shell(false).await,
            SessionStart::None => Ok(()),
        }
        .map_err(|e| ConnError::Ssh(e.to_string()))?;
        spawn_session_reader(channel, lines_tx.clone());
    }

    let mut held: BTreeMap<String, Held> = BTreeMap::new();
    // Tunnels told to stand by, logged once per connection (and again after a change).
    let mut told: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    // Tunnels waiting for their next attempt, and when.
    let mut retry_at: BTreeMap<String, Instant> = BTreeMap::new();
    let mut forward_backoff: BTreeMap<String, Backoff> = BTreeMap::new();
    // Replicas standing by on their own (the server gave another name), per tunnel.
    let mut standby_retry: BTreeMap<String, StandbyRetry> = BTreeMap::new();
    // The specs of the last pass: a tunnel whose spec changed starts its waits over.
    let mut last: BTreeMap<String, TunnelSpec> = BTreeMap::new();
    loop {
        if handle.is_closed() {
            return Err(ConnError::Lost);
        }
        let desired: Vec<TunnelSpec> = specs.borrow_and_update().clone();
        for d in &desired {
            if last.get(&d.name).is_some_and(|l| l != d) {
                // A changed spec (the controller cleared `standby`, or moved the name) is tried at
                // once, with its back-offs from the start.
                retry_at.remove(&d.name);
                standby_retry.remove(&d.name);
                forward_backoff.remove(&d.name);
            }
        }
        last = desired.iter().map(|d| (d.name.clone(), d.clone())).collect();
        standby_retry.retain(|name, _| last.contains_key(name));
        forward_backoff.retain(|name, _| last.contains_key(name));

        // Cancel what is no longer wanted (or changed).
        let stale: Vec<String> = held
            .iter()
            .filter(|(name, h)| !desired.iter().any(|d| &d.name == *name && *d == h.spec))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            let h = held.remove(&name).expect("listed above");
            cancel(settings, handle, routes, &h).await?;
            info!(tunnel = %name, "forward cancelled (configuration changed)");
        }
        retry_at.retain(|name, _| desired.iter().any(|d| &d.name == name));
        told.retain(|name| desired.iter().any(|d| &d.name == name && d.standby));

        // Open what is wanted and due.
        let now = Instant::now();
        for spec in &desired {
            if held.contains_key(&spec.name) || retry_at.get(&spec.name).is_some_and(|t| *t > now) {
                continue;
            }
            if shutdown.is_cancelled() || handle.is_closed() {
                break;
            }
            if spec.standby {
                // The controller gave this name to another pod on a server that does not
                // load-balance: asking would only make the server assign (and us cancel) a random
                // name, again and again. Wait for the controller to clear the flag.
                state.set_state(&spec.name, ForwardState::StandingBy, None, Some(TOLD_TO_STAND_BY.into()));
                if told.insert(spec.name.clone()) {
                    info!(tunnel = %spec.name, "standing by: the controller gave this name to another pod (standby in the tunnels file)");
                }
                continue;
            }
            let target = SocketAddr::new(settings.target_host, spec.target_port);
            if !settings.open_before_app && !app_ready(target).await {
                state.set_state(
                    &spec.name,
                    ForwardState::WaitingForApp,
                    None,
                    Some(format!("waiting for the app to accept connections on {target}")),
                );
                retry_at.insert(spec.name.clone(), now + Duration::from_secs(1));
                continue;
            }
            let backoff = forward_backoff
                .entry(spec.name.clone())
                .or_insert_with(|| Backoff::new(Duration::from_secs(1), Duration::from_secs(30)));
            match open_forward(settings, handle, routes, state, &lines_tx, spec).await {
                Ok(h) => {
                    backoff.reset();
                    standby_retry.remove(&spec.name);
                    held.insert(spec.name.clone(), h);
                }
                Err(Retry::StandBy(why)) => {
                    // The server gave this name to another connection: the race before the
                    // controller assigns the name, or a pod running without it. Each try costs
                    // the server a forward (on sish a random public name, made and cancelled), so
                    // the tries back off -- --standby-retry doubling up to --standby-retry-max,
                    // jittered so replicas spread out -- and start over when the spec changes.
                    let delay = standby_retry
                        .entry(spec.name.clone())
                        .or_insert_with(|| StandbyRetry::new(settings.standby_retry, settings.standby_retry_max))
                        .next_delay();
                    debug!(tunnel = %spec.name, retry_in = ?delay, "standing by");
                    retry_at.insert(spec.name.clone(), now + delay);
                    state.set_state(&spec.name, ForwardState::StandingBy, None, Some(why));
                }
                Err(Retry::Failed(why)) => {
                    let delay = backoff.next_delay();
                    warn!(tunnel = %spec.name, error = %why, retry_in = ?delay, "forward failed");
                    state.metrics.error("forward_refused");
                    retry_at.insert(spec.name.clone(), now + delay);
                    state.set_state(&spec.name, ForwardState::Failed, None, Some(why));
                }
                Err(Retry::ConnectionLost) => return Err(ConnError::Lost),
                Err(Retry::Broken(e)) => return Err(e),
            }
        }

        let next_retry = retry_at.values().min().copied();
        tokio::select! {
            changed = specs.changed() => {
                if changed.is_err() { return drain(settings, handle, routes, state, held).await; }
            }
            _ = async { tokio::time::sleep_until(next_retry.unwrap_or(now + Duration::from_secs(3600)).into()).await }, if next_retry.is_some() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {} // notice a closed handle
            _ = shutdown.cancelled() => return drain(settings, handle, routes, state, held).await,
        }
    }
}

enum Retry {
    StandBy(String),
    Failed(String),
    ConnectionLost,
    /// The server stopped answering: the connection is dropped.
    Broken(ConnError),
}

async fn app_ready(target: SocketAddr) -> bool {
    matches!(tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(target)).await, Ok(Ok(_)))
}

async fn open_forward(
    settings: &Arc<Settings>,
    handle: &Handle<Handler>,
    routes: &Arc<Routes>,
    state: &Arc<AgentState>,
    lines: &broadcast::Sender<ServerLine>,
    spec: &TunnelSpec,
) -> Result<Held, Retry> {
    let request =
        settings.dialect.forward_request(spec, &settings.openssh_bind).map_err(|e| Retry::Failed(e.to_string()))?;
    let relay = Relay {
        tunnel: spec.name.clone(),
        target: SocketAddr::new(settings.target_host, spec.target_port),
        max_buffered: settings.max_buffered,
        connect_timeout: Duration::from_secs(5),
    };
    state.set_state(&spec.name, ForwardState::Requesting, None, None);
    // Routes first: a visitor can arrive right after the reply.
    routes.insert(&[(request.address.clone(), request.port)], &relay);
    // Subscribe before asking, so no line about this forward is missed.
    let mut heard = lines.subscribe();
    let asked = handle.tcpip_forward(request.address.clone(), request.port);
    let reply_port = match answered(settings, &spec.name, "tcpip-forward", asked).await.map_err(|e| {
        routes.remove(&spec.name);
        Retry::Broken(e)
    })? {
        Ok(port) => port,
        Err(russh::Error::RequestDenied) => {
            routes.remove(&spec.name);
            let why = format!("the server refused the forward {}:{}", request.address, request.port);
            // A name or fixed port another client holds: stand by rather than fail.
            let exclusive = spec.kind != TunnelKind::Tcp || request.port != 0;
            return Err(if exclusive && settings.dialect != Dialect::Openssh {
                Retry::StandBy(format!("{why} (held by another replica?)"))
            } else {
                Retry::Failed(why)
            });
        }
        Err(_) => {
            routes.remove(&spec.name);
            return Err(Retry::ConnectionLost);
        }
    };
    if reply_port != 0 && reply_port != request.port {
        routes.insert(&[(request.address.clone(), reply_port)], &relay);
    }
    let held = Held { spec: spec.clone(), request: request.clone(), reply_port };

    let mut watch = AddressWatch::new(settings.dialect, spec.kind, request.clone(), reply_port, &settings.server_host);
    let deadline = tokio::time::Instant::now() + settings.address_timeout;
    let placement = loop {
        if let Some(p) = watch.decide() {
            break Some(p);
        }
        match tokio::time::timeout_at(deadline, heard.recv()).await {
            Ok(Ok(line)) => {
                watch.feed(&line);
                // The rest of a block arrives in the same message: take it before deciding.
                while let Ok(more) = heard.try_recv() {
                    watch.feed(&more);
                }
            }
            Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
            Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => break None,
        }
    };
    match placement {
        Some(Placement::Public(address)) => {
            info!(tunnel = %spec.name, %address, "forward established");
            state.set_state(&spec.name, ForwardState::Established, Some(address), None);
            Ok(held)
        }
        Some(Placement::NotAsRequested(why)) => {
            // Never leave a stray public endpoint on a name or port nobody asked for.
            cancel(settings, handle, routes, &held).await.map_err(Retry::Broken)?;
            info!(tunnel = %spec.name, reason = %why, "standing by");
            Err(Retry::StandBy(why))
        }
        None => {
            let why = "the server accepted the forward but printed no address for it".to_string();
            warn!(tunnel = %spec.name, "{why}");
            state.set_state(&spec.name, ForwardState::Established, None, Some(why));
            Ok(held)
        }
    }
}

/// Cancels a held forward; true when the server acknowledged it (the name or port is free on
/// the server once this returns), false when it refused; an error when it did not answer within
/// --request-timeout (the connection is then broken, see [`answered`]).
async fn cancel(
    settings: &Arc<Settings>,
    handle: &Handle<Handler>,
    routes: &Arc<Routes>,
    held: &Held,
) -> Result<bool, ConnError> {
    let c = settings.dialect.cancel_request(&held.request, held.reply_port);
    let asked = handle.cancel_tcpip_forward(c.address.clone(), c.port);
    let answer = answered(settings, &held.spec.name, "cancel-tcpip-forward", asked).await;
    routes.remove(&held.spec.name);
    Ok(match answer? {
        Ok(()) => true,
        Err(e) => {
            debug!(tunnel = %held.spec.name, error = %e, "cancel-tcpip-forward not acknowledged");
            false
        }
    })
}

/// Shutdown: no new visitors (forwards cancelled), in-flight connections get the grace period.
async fn drain(
    settings: &Arc<Settings>,
    handle: &Handle<Handler>,
    routes: &Arc<Routes>,
    state: &Arc<AgentState>,
    held: BTreeMap<String, Held>,
) -> Result<(), ConnError> {
    for h in held.values() {
        // Logged after the server's answer: a pod's log shows its tunnels were closed on the
        // server while the sidecar still ran (the kubelet stops it after the app).
        let answer = cancel(settings, handle, routes, h).await;
        state.set_state(&h.spec.name, ForwardState::Draining, None, Some("shutting down".into()));
        match answer {
            Ok(acknowledged) => info!(tunnel = %h.spec.name, acknowledged, "forward cancelled (shutting down)"),
            // Later requests would wait behind the unanswered one: stop asking, drain, go.
            Err(_) => break,
        }
    }
    let deadline = Instant::now() + settings.grace;
    while state.total_active_connections() > 0 && Instant::now() < deadline && !handle.is_closed() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left = state.total_active_connections();
    if left > 0 {
        warn!(connections = left, "grace period over; closing connections still open");
    }
    let _ = handle.disconnect(Disconnect::ByApplication, "picotun agent shutting down", "en").await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn default_window_is_smaller_for_openssh() {
        use super::{Dialect, default_window_size};
        assert_eq!(default_window_size(Dialect::Openssh), 4 * 1024 * 1024, "sshd reads ahead to fill it");
        assert_eq!(default_window_size(Dialect::Sish), 8 * 1024 * 1024);
        assert_eq!(default_window_size(Dialect::Sandhole), 8 * 1024 * 1024);
    }

    use super::*;

    #[test]
    fn a_silent_server_is_given_up_on_after_interval_times_max() {
        let s = Duration::from_secs;
        for (interval, max) in [(s(5), 3), (s(1), 2), (s(5), 1), (s(30), 10)] {
            let probes = RusshKeepalive::for_silence(interval, max);
            assert_eq!(probes.gives_up_after(), Some(interval * max as u32), "interval {interval:?} max {max}");
        }
    }

    #[test]
    fn unacknowledged_data_is_given_up_after_the_keepalives_silence() {
        let five = Duration::from_secs(5);
        assert_eq!(unacknowledged_limit(five, 3), Some(Duration::from_secs(15)));
        assert_eq!(unacknowledged_limit(five, 1), Some(five));
        assert_eq!(unacknowledged_limit(five, 0), None, "--keepalive-max 0: never give up");
        assert_eq!(unacknowledged_limit(Duration::MAX, usize::MAX), Some(Duration::MAX), "saturates");
    }

    #[test]
    fn keepalive_max_zero_probes_and_never_gives_up() {
        let probes = RusshKeepalive::for_silence(Duration::from_secs(5), 0);
        assert_eq!(probes.interval, Some(Duration::from_secs(5)));
        assert_eq!(probes.gives_up_after(), None);
    }
}
