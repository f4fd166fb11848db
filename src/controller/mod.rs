//! `picotun controller`: routes to backends to tunnels, and the truth back in status.
//!
//! Level-triggered: every change in the caches (Ingresses, Gateway API objects, Services, Pods,
//! Namespaces) wakes one loop that resolves the whole cluster (pure, `resolve::cluster`), plans
//! the writes that differ from the caches (pure, `plan`), and -- on the leader only -- hands them
//! to the writer's work queue (`writer`) without waiting for them. No finalizers: deleting a route simply
//! resolves to fewer tunnels, so nothing can be left stuck when picotun is uninstalled.

pub mod assign;
pub mod lease;
pub mod params;
pub mod plan;
pub mod restart;
pub mod status;
pub mod sync_key;
pub mod writer;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::Api;
use kube::runtime::events::{Recorder, Reporter};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span};

use crate::admin;
use crate::apiserver::index::{Index, ResolveConfig};
use plan::{Note, Plan};

/// `picotun controller` flags.
#[derive(Clone, Debug, clap::Args)]
pub struct ControllerArgs {
    /// picotun's own namespace: the leader Lease and the key Secret to copy live here.
    #[arg(long, env = "PICOTUN_NAMESPACE", default_value = "pico-sh-system")]
    pub namespace: String,
    /// The admin port: /live, /ready (after every cache has synced), /metrics.
    #[arg(long, env = "PICOTUN_ADMIN_ADDR", default_value = "0.0.0.0:9903")]
    pub admin_addr: SocketAddr,
    /// How routes resolve (the webhook and `explain` take the same flags).
    #[command(flatten)]
    pub resolve: crate::apiserver::index::ResolveArgs,
    /// Elect one leader among replicas with a Lease; only the leader writes.
    #[arg(long, env = "PICOTUN_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    #[arg(long, env = "PICOTUN_LEASE_NAME", default_value = "picotun-controller")]
    pub lease_name: String,
    /// How long a leader that stopped renewing keeps the Lease.
    #[arg(long, env = "PICOTUN_LEASE_DURATION", value_parser = humantime::parse_duration, default_value = "15s")]
    pub lease_duration: Duration,
    /// This replica's name in the Lease (default: the host name and process id).
    #[arg(long, env = "PICOTUN_IDENTITY")]
    pub identity: Option<String>,
    /// Restart workloads whose pods should carry the sidecar but don't, one rollout at a time.
    #[arg(long, env = "PICOTUN_RESTART_UNINJECTED", default_value_t = false, action = clap::ArgAction::Set)]
    pub restart_uninjected: bool,
    /// A workload is restarted at most once per this interval (a webhook that is down would
    /// otherwise cause restart after restart).
    #[arg(long, env = "PICOTUN_RESTART_COOLDOWN", value_parser = humantime::parse_duration, default_value = "30m")]
    pub restart_cooldown: Duration,
    /// Copy the key Secret from picotun's namespace into every namespace labeled for injection
    /// and keep the copies in sync.
    #[arg(long, env = "PICOTUN_SYNC_KEY_SECRET", default_value_t = false, action = clap::ArgAction::Set)]
    pub sync_key_secret: bool,
    #[arg(long, env = "PICOTUN_KEY_SECRET_NAME", default_value = crate::core::api::DEFAULT_KEY_SECRET)]
    pub key_secret_name: String,
    /// Serve only the namespaces this label selector selects, written as `kubectl -l` takes it
    /// (`team=web`, `env!=prod`, `team in (a,b)`, `owned`, `!legacy`, comma-separated; default:
    /// every namespace), so several controllers can share a cluster.
    #[arg(long, env = "PICOTUN_NAMESPACE_SELECTOR", value_parser = crate::core::api::parse_label_selector, default_value = "")]
    pub namespace_selector: kube::core::Selector,
    /// Resolve everything at least this often, even when nothing changed.
    #[arg(long, env = "PICOTUN_RESYNC_INTERVAL", value_parser = humantime::parse_duration, default_value = "5m")]
    pub resync_interval: Duration,
    /// Writes in flight at once (the writer's workers).
    #[arg(long, env = "PICOTUN_WRITE_CONCURRENCY", default_value_t = 32)]
    pub write_concurrency: usize,
    /// The tunnel server shares one name among several connections (load balancing). Off
    /// (tuns.sh): one pod holds each name and the others' tunnels files say standby.
    #[arg(long, env = "PICOTUN_SERVER_LOAD_BALANCING", default_value_t = false, action = clap::ArgAction::Set)]
    pub server_load_balancing: bool,
    /// How the tunnel server speaks (give it the webhook's `--dialect`): which server options
    /// from GatewayClass / Gateway parametersRefs and the Ingress annotation it takes.
    #[arg(long, env = "PICOTUN_DIALECT", value_enum, default_value = "sish")]
    pub dialect: crate::core::server::Dialect,
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(
        "cannot reach the Kubernetes API: {0} (in a cluster, check the service account; outside, check KUBECONFIG)"
    )]
    Client(#[source] kube::Error),
    #[error(
        "cannot list {what}: {source} -- the controller's service account lacks RBAC for it (apply deploy/ again, or see its ClusterRole)"
    )]
    Forbidden { what: &'static str, source: kube::Error },
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriteLabels {
    kind: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone)]
pub struct Metrics {
    reconciles: Counter,
    duration: Histogram,
    writes: Family<WriteLabels, Counter>,
    errors: Family<ReasonLabels, Counter>,
    tunnels: Family<StateLabels, Gauge>,
    problems: Family<ReasonLabels, Gauge>,
    leader: Gauge,
    restarts: Counter,
    queue_depth: Gauge,
    retries: Counter,
    repeats: Counter,
}

impl Metrics {
    fn new(registry: &mut Registry) -> Self {
        let m = Metrics {
            reconciles: Counter::default(),
            duration: Histogram::new([0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            writes: Family::default(),
            errors: Family::default(),
            tunnels: Family::default(),
            problems: Family::default(),
            leader: Gauge::default(),
            restarts: Counter::default(),
            queue_depth: Gauge::default(),
            retries: Counter::default(),
            repeats: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("picotun_controller");
        r.register("reconciles", "Passes over the whole cluster", m.reconciles.clone());
        r.register("reconcile_duration_seconds", "Time to resolve, plan and apply one pass", m.duration.clone());
        r.register(
            "writes",
            "Write calls by object kind and result (ok, unchanged, gone, conflict, failed, timeout)",
            m.writes.clone(),
        );
        r.register(
            "errors",
            "Errors by reason (pod_patch, status_patch, event, event_dropped, restart, key_sync)",
            m.errors.clone(),
        );
        r.register("write_queue_depth", "Objects waiting to be written (not in flight)", m.queue_depth.clone());
        r.register("write_retries", "Writes queued again after a failure, timeout or conflict", m.retries.clone());
        r.register(
            "write_repeats",
            "Writes of the value last written to the same object (someone else changed it meanwhile)",
            m.repeats.clone(),
        );
        r.register(
            "tunnels",
            "Tunnels routes give pods, by state: established (a sidecar reported it), pending, standby (another replica holds the name), missing_sidecar",
            m.tunnels.clone(),
        );
        r.register("problems", "Standing problems reported on users' objects, by reason", m.problems.clone());
        r.register("leader", "1 while this replica holds the leader Lease", m.leader.clone());
        r.register("workload_restarts", "Workloads restarted so their pods get the sidecar", m.restarts.clone());
        m
    }

    fn error(&self, reason: &str) {
        self.errors.get_or_create(&ReasonLabels { reason: reason.into() }).inc();
    }

    fn observe(&self, plan: &Plan) {
        for state in ["established", "pending", "standby", "missing_sidecar"] {
            self.tunnels
                .get_or_create(&StateLabels { state: state.into() })
                .set(plan.tunnel_states.get(state).copied().unwrap_or(0));
        }
        self.problems.clear();
        for (reason, n) in &plan.problem_counts {
            self.problems.get_or_create(&ReasonLabels { reason: reason.clone() }).set(*n);
        }
    }
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}

/// Runs the controller until `shutdown`.
pub async fn run(args: ControllerArgs, shutdown: CancellationToken) -> Result<(), ControllerError> {
    let client = kube::Client::try_default().await.map_err(ControllerError::Client)?;
    // Fail fast with a clear message rather than a watch that retries forever.
    for (what, probe) in [
        (
            "ingresses",
            Api::<Ingress>::all(client.clone()).list_metadata(&kube::api::ListParams::default().limit(1)).await.err(),
        ),
        ("pods", Api::<Pod>::all(client.clone()).list_metadata(&kube::api::ListParams::default().limit(1)).await.err()),
    ] {
        if let Some(e) = probe {
            return Err(match &e {
                kube::Error::Api(s) if s.code == 403 => ControllerError::Forbidden { what, source: e },
                _ => ControllerError::Client(e),
            });
        }
    }
    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let config = ResolveConfig {
        namespace_selector: args.namespace_selector.clone(),
        server_options: Some(args.dialect),
        ..args.resolve.config()
    };
    let mut parameter_maps = params::ParameterMaps::default();
    let index = Index::start_scoped(client.clone(), true, args.namespace_selector.clone(), shutdown.clone()).await;

    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let admin_listener = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .map_err(|source| ControllerError::Listen { addr: args.admin_addr, source })?;
    let ready_index = index.clone();
    tokio::spawn(admin::serve(
        admin_listener,
        Arc::new(move || ready_index.is_synced()),
        Arc::new(registry),
        Router::new(),
        shutdown.clone(),
    ));

    let mut leader = if args.leader_election {
        lease::spawn(
            client.clone(),
            lease::LeaseConfig {
                namespace: args.namespace.clone(),
                name: args.lease_name.clone(),
                identity: identity.clone(),
                duration: args.lease_duration,
            },
            shutdown.clone(),
        )
    } else {
        lease::Leadership::always()
    };
    info!(%identity, leader_election = args.leader_election, "picotun controller starting");

    tokio::select! {
        _ = index.wait_synced() => {}
        _ = shutdown.cancelled() => return Ok(()),
    }
    let recorder = Recorder::new(
        client.clone(),
        Reporter { controller: "picotun-controller".into(), instance: Some(identity.clone()) },
    );
    // Asked before every write: fenced by the Lease's expiry (lease::Leadership::may_write).
    let may_write: writer::MayWrite = {
        let leader = leader.clone();
        Arc::new(move || leader.may_write().then(|| leader.remaining()))
    };
    let stop_writing = CancellationToken::new();
    let (writer, writer_tasks) = writer::Writer::start(
        client.clone(),
        recorder,
        args.resolve.gateway_controller_name.clone(),
        may_write,
        metrics.clone(),
        args.write_concurrency,
        stop_writing.clone(),
    );
    let opts = plan::Options {
        own_namespace: args.namespace.clone(),
        inject_route_backends: args.resolve.inject_route_backends,
        server_load_balancing: args.server_load_balancing,
    };
    // Standing problems already published as Events (while they last).
    let mut published: BTreeSet<Note> = BTreeSet::new();
    let mut restarter = restart::Restarter::new(client.clone(), args.restart_cooldown);
    let key_sync =
        args.sync_key_secret.then(|| sync_key::KeySync::new(client.clone(), &args.namespace, &args.key_secret_name));

    // Secrets are not watched (that would cache every Secret in the cluster): with --sync-key-secret
    // the source is compared every few seconds instead.
    let wake_every = if key_sync.is_some() { args.resync_interval.min(sync_key::EVERY) } else { args.resync_interval };
    loop {
        let mut view = index.view();
        // The ConfigMaps parametersRefs name, read (by name) before the pass resolves.
        parameter_maps.refresh(&client, &view.parameter_config_maps(&config)).await;
        view.config_maps = parameter_maps.snapshot();
        let is_leader = leader.may_write();
        metrics.leader.set(i64::from(is_leader));
        let started = Instant::now();
        let span = info_span!("reconcile", leader = is_leader);
        let _enter = span.enter();
        let resolution = view.resolve(&config);
        let now = k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
        let plan = plan::plan(&view, &resolution, &config, &opts, &now);
        metrics.observe(&plan);
        drop(_enter);
        if is_leader {
            let writes = plan.writes.len();
            writer.offer(plan.writes.clone());
            // Standing problems: published when they appear, forgotten when they go.
            let current: BTreeSet<Note> = plan.problems.iter().cloned().collect();
            published.retain(|n| current.contains(n));
            for n in current.difference(&published) {
                writer.note(n.clone());
            }
            published.extend(current);
            debug!(writes, "plan handed to the writer");
            if args.restart_uninjected {
                restarter.step(&plan, &view, &metrics).await;
            }
            if let Some(k) = &key_sync {
                k.step(&view, &config, &metrics).await;
            }
        }
        metrics.reconciles.inc();
        metrics.duration.observe(started.elapsed().as_secs_f64());
        debug!(writes = plan.writes.len(), elapsed_ms = started.elapsed().as_millis() as u64, "pass done");

        // A rollout in flight is looked at again soon: its end may change nothing we cache.
        let wake = if is_leader && restarter.waiting() { wake_every.min(restart::ROLLOUT_POLL) } else { wake_every };
        // Referenced ConfigMaps are not watched: look at them again soon.
        let wake = if parameter_maps.is_empty() { wake } else { wake.min(params::REFRESH) };
        tokio::select! {
            _ = index.changed() => {}
            _ = leader.changed() => {}
            _ = tokio::time::sleep(wake) => {}
            _ = shutdown.cancelled() => break,
        }
        // Coalesce a burst of watch events (a rollout, an apply of many objects) into one pass.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Stop taking new writes; let the calls under way end (each within its timeout). Only then
    // may another replica take over: released after the drain, never beside it.
    stop_writing.cancel();
    writer.drain(writer::CALL_TIMEOUT).await;
    for t in writer_tasks {
        t.abort();
    }
    leader.release().await;
    info!("picotun controller stopped");
    Ok(())
}
