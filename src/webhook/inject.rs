//! Which pods get the tunnel sidecar, and what it looks like. Pure: a Pod (and what is known about
//! its workload and routes) in, a decision and an injected Pod out. The webhook, `picotun inject`
//! and `picotun explain` all go through here.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, DownwardAPIVolumeFile, DownwardAPIVolumeSource, EmptyDirVolumeSource,
    EnvVar, HTTPGetAction, KeyToPath, ObjectFieldSelector, Pod, Probe, ProjectedVolumeSource, ResourceRequirements,
    SeccompProfile, SecretVolumeSource, SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount,
    VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::core::api;
use crate::core::pod::{self, Decision, SkipReason, Workload, is_injected, lookup, tunnels_for};
use crate::core::tunnel::{TunnelSpec, TunnelsFile};
use crate::resolve::ownership::{Claimant, Ownership};
use crate::webhook::ticket::TicketKey;

/// How the webhook injects: from its flags.
#[derive(Clone, Debug)]
pub struct InjectConfig {
    pub image: String,
    pub pull_policy: String,
    /// An init container with `restartPolicy: Always` (Kubernetes >= 1.29) rather than a
    /// regular container.
    pub native_sidecar: bool,
    /// picotun's own namespace: never injected.
    pub own_namespace: String,
    pub server: String,
    pub server_port: u16,
    pub user: String,
    pub dialect: String,
    pub admin_port: u16,
    pub cpu_request: String,
    pub memory_request: String,
    pub cpu_limit: String,
    pub memory_limit: String,
    pub log_level: String,
    /// known_hosts lines pinning the server's host key, passed to every sidecar (empty: the
    /// agent's built-in tuns.sh key).
    pub known_hosts: String,
    /// Where sidecars POST their status (the webhook's `/report`); empty: they do not report.
    pub report_url: String,
    /// PEM CA bundle the sidecars verify `report_url` with, passed inline (empty: the agent's
    /// platform roots).
    pub report_ca: String,
    /// How sidecars authenticate to the tunnel server.
    pub auth: SidecarAuth,
    /// Signs the injection ticket (`tunnels.pico.sh/injected`). None (offline: `picotun inject`,
    /// `explain`): no ticket is written, and a pod carrying the sidecar counts as injected.
    pub ticket_key: Option<TicketKey>,
}

/// How an injected sidecar proves itself to the tunnel server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SidecarAuth {
    /// A short-lived SSH certificate per pod, from the webhook's `/certificate` (the sidecar's key
    /// is made in memory and never leaves it). Needs `--agent-report-url`.
    Certificate,
    /// The account key from the Secret `picotun-ssh-key` in the pod's namespace, mounted into
    /// the sidecar. Whoever can read that Secret, or create pods in that namespace, owns the
    /// pico.sh account.
    Key,
}

impl SidecarAuth {
    pub fn as_str(&self) -> &'static str {
        match self {
            SidecarAuth::Certificate => "certificate",
            SidecarAuth::Key => "key",
        }
    }
}

/// `https://host:port/report` -> `https://host:port/certificate`: the same server, beside /report.
pub fn certificate_url(report_url: &str) -> Option<String> {
    let rest = report_url.strip_prefix("https://")?;
    let authority = rest.split(['/', '?', '#']).next().filter(|a| !a.is_empty())?;
    Some(format!("https://{authority}/certificate"))
}

/// The audience of the projected token a sidecar proves its pod with; `/report` accepts no other.
pub const REPORT_AUDIENCE: &str = "tunnels.pico.sh";
/// Where that token is mounted in the sidecar.
pub const REPORT_TOKEN_DIR: &str = "/var/run/secrets/tunnels.pico.sh/report";
pub use crate::core::api::{KEY_VOLUME, NO_API_TOKEN_VOLUME, REPORT_TOKEN_VOLUME, TUNNELS_VOLUME};
/// The startup gate: the agent's `/tunnels-up` polled every second, for up to five minutes
/// before the kubelet restarts the sidecar (and tries again).
pub const STARTUP_GATE_PERIOD_SECONDS: i32 = 1;
pub const STARTUP_GATE_FAILURE_THRESHOLD: i32 = 300;
/// The projected token's lifetime; the kubelet rotates it at 80%, the agent re-reads it per post.
pub const REPORT_TOKEN_SECONDS: i64 = 3600;

impl Default for InjectConfig {
    fn default() -> Self {
        InjectConfig {
            image: "ghcr.io/picotun/picotun:latest".into(),
            pull_policy: "IfNotPresent".into(),
            native_sidecar: true,
            own_namespace: "pico-sh-system".into(),
            server: "tuns.sh".into(),
            server_port: 22,
            user: "picotun".into(),
            dialect: "sish".into(),
            admin_port: api::DEFAULT_SIDECAR_ADMIN_PORT,
            cpu_request: "10m".into(),
            memory_request: "16Mi".into(),
            cpu_limit: "500m".into(),
            memory_limit: "64Mi".into(),
            log_level: "info".into(),
            known_hosts: String::new(),
            report_url: String::new(),
            report_ca: String::new(),
            // Certificates need a report URL, which a default has not: the key is what works alone.
            auth: SidecarAuth::Key,
            ticket_key: None,
        }
    }
}

/// What a pod is asked to do, and the answer.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub decision: Decision,
    /// The injected pod (None when skipped).
    pub pod: Option<Pod>,
    pub tunnels: Vec<TunnelSpec>,
    /// Problems the user should know about; never a reason to deny.
    pub warnings: Vec<String>,
}

/// Decides whether `pod` in `namespace` gets the sidecar. `route_tunnels` are the tunnels routes
/// picotun serves give this pod (empty until the controller knows of any); a pod backing one is
/// injected when `inject_route_backends` is on.
pub fn decide(
    pod: &Pod,
    namespace: &str,
    workload: Option<&Workload>,
    route_tunnels: &[TunnelSpec],
    inject_route_backends: bool,
    config: &InjectConfig,
) -> Decision {
    decide_owned(pod, namespace, workload, route_tunnels, None, inject_route_backends, config)
}

/// [`decide`], knowing who owns every name across the cluster (the webhook): a re-invoked pod
/// is picotun's own when it carries the tunnels [`owned_tunnels`] gives it.
pub fn decide_owned(
    pod: &Pod,
    namespace: &str,
    workload: Option<&Workload>,
    route_tunnels: &[TunnelSpec],
    owners: Option<&Ownership>,
    inject_route_backends: bool,
    config: &InjectConfig,
) -> Decision {
    if let Some(never) = pod::never_injected(pod, namespace, &config.own_namespace) {
        return never;
    }
    let skip = |reason, because: String| Decision::Skip { reason, because };
    if is_injected(pod) {
        match &config.ticket_key {
            // Offline there is no key to check with: the sidecar is taken as it is.
            None => return skip(SkipReason::AlreadyInjected, format!("already carries {}", api::SIDECAR_NAME)),
            // Re-invocation: picotun's own sidecar, with the tunnels picotun gives this pod. (A
            // ticketed spec copied into a new pod with tunnels of its own choosing is not.)
            Some(key)
                if key.verify_pod(pod, namespace).is_ok()
                    && lookup(&pod.metadata.annotations, api::TUNNELS).is_some_and(|current| {
                        let stripped = strip_sidecar(pod);
                        let tunnels =
                            owned_tunnels(&stripped, namespace, workload, route_tunnels, owners, &mut Vec::new());
                        *current == TunnelsFile { tunnels }.to_json()
                    }) =>
            {
                return skip(SkipReason::AlreadyInjected, format!("already injected by picotun ({})", api::INJECTED));
            }
            // A sidecar picotun did not put there (or changed since): decided like any pod, and
            // if injected, replaced by picotun's own (see `mutate`).
            Some(_) => {}
        }
    }
    pod::opted_in(pod, workload, route_tunnels, inject_route_backends)
}

/// Decides, and injects when the answer is yes.
pub fn mutate(
    pod: &Pod,
    namespace: &str,
    workload: Option<&Workload>,
    route_tunnels: &[TunnelSpec],
    inject_route_backends: bool,
    config: &InjectConfig,
) -> Outcome {
    mutate_owned(pod, namespace, workload, route_tunnels, None, inject_route_backends, config)
}

/// [`mutate`], knowing who owns every name across the cluster (the webhook, from its index):
/// the pod's own expose tunnels are kept to those its namespace owns ([`owned_tunnels`]), as the
/// controller keeps them, so a new pod never starts with a name someone else owns.
pub fn mutate_owned(
    pod: &Pod,
    namespace: &str,
    workload: Option<&Workload>,
    route_tunnels: &[TunnelSpec],
    owners: Option<&Ownership>,
    inject_route_backends: bool,
    config: &InjectConfig,
) -> Outcome {
    let decision = decide_owned(pod, namespace, workload, route_tunnels, owners, inject_route_backends, config);
    if !matches!(decision, Decision::Inject { .. }) {
        return Outcome { decision, pod: None, tunnels: Vec::new(), warnings: Vec::new() };
    }
    let mut warnings = Vec::new();
    // A sidecar without a valid ticket (written by hand, or by `picotun inject` offline) is
    // replaced by the one picotun injects: the ticket is only ever written over picotun's own.
    let stripped;
    let pod = if is_injected(pod) {
        // The apiserver re-runs its own plugins after a webhook changed a pod (reinvocation), and
        // its ServiceAccount plugin then mounts the token into picotun's sidecar too: re-injected
        // quietly, without that token (the agent needs no Kubernetes API access).
        let own_remounted = config
            .ticket_key
            .as_ref()
            .is_some_and(|key| key.verify_pod(&without_service_account_token(pod), namespace).is_ok());
        if !own_remounted {
            warnings.push(format!(
                "the pod carries a {} container without a valid {} ticket; replaced by the one picotun injects",
                api::SIDECAR_NAME,
                api::INJECTED
            ));
        }
        stripped = strip_sidecar(pod);
        &stripped
    } else {
        pod
    };
    let tunnels = owned_tunnels(pod, namespace, workload, route_tunnels, owners, &mut warnings);
    let mut injected = inject(pod, &tunnels, config, &mut warnings);
    let conflicts = volume_conflicts(&injected);
    if !conflicts.is_empty() {
        let because = format!(
            "the pod has its own volume{} named {}, as picotun names the sidecar's; rename {} in the pod \
             (template) and recreate it to get the sidecar",
            if conflicts.len() > 1 { "s" } else { "" },
            conflicts.join(", "),
            if conflicts.len() > 1 { "them" } else { "it" },
        );
        warnings.push(format!("not injected: {because}"));
        // Admitted as it came (never a pod the apiserver would reject for a duplicate volume
        // name), with the warning.
        let decision = Decision::Skip { reason: SkipReason::VolumeConflict, because };
        return Outcome { decision, pod: None, tunnels: Vec::new(), warnings };
    }
    if let Some(value) = config.ticket_key.as_ref().and_then(|key| key.ticket(&injected, namespace)) {
        injected.metadata.annotations.get_or_insert_with(BTreeMap::new).insert(api::INJECTED.into(), value);
    }
    for (container, volume) in foreign_mounts(&injected) {
        warnings.push(format!(
            "container {container} mounts {volume}, a credential of the sidecar: /report and /certificate refuse this pod"
        ));
    }
    // The pod carries everything its tunnels are computed from (route tunnels + its own expose
    // annotation), so the controller can recompute them from the pod alone, without the
    // workload that was there at admission.
    if let Some(expose) = workload.and_then(|w| w.annotations.get(api::EXPOSE))
        && lookup(&pod.metadata.annotations, api::EXPOSE).is_none()
    {
        injected.metadata.annotations.get_or_insert_with(BTreeMap::new).insert(api::EXPOSE.into(), expose.clone());
    }
    Outcome { decision, pod: Some(injected), tunnels, warnings }
}

/// The names of volumes that appear more than once in `injected`: a volume of the pod's own named
/// like one [`inject`] added. The apiserver would reject such a pod.
pub fn volume_conflicts(injected: &Pod) -> Vec<String> {
    let mut seen = std::collections::BTreeSet::new();
    let mut twice: Vec<String> = injected
        .spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter(|v| !seen.insert(v.name.as_str()))
        .map(|v| v.name.clone())
        .collect();
    twice.dedup();
    twice
}

/// Where the apiserver's ServiceAccount plugin mounts a pod's API token into its containers.
pub const SERVICE_ACCOUNT_TOKEN_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// `pod` with no API-token mount on the sidecar (its own empty [`NO_API_TOKEN_VOLUME`] stays).
fn without_service_account_token(pod: &Pod) -> Pod {
    let mut pod = pod.clone();
    let spec = pod.spec.as_mut();
    for c in spec.into_iter().flat_map(|s| s.init_containers.iter_mut().flatten().chain(s.containers.iter_mut())) {
        if c.name == api::SIDECAR_NAME
            && let Some(mounts) = c.volume_mounts.as_mut()
        {
            mounts.retain(|m| m.mount_path != SERVICE_ACCOUNT_TOKEN_PATH || m.name == NO_API_TOKEN_VOLUME);
        }
    }
    pod
}

/// `pod` without what `inject` adds: the sidecar, picotun's volumes and annotations.
pub fn strip_sidecar(pod: &Pod) -> Pod {
    let mut pod = pod.clone();
    if let Some(spec) = pod.spec.as_mut() {
        spec.containers.retain(|c| c.name != api::SIDECAR_NAME);
        if let Some(init) = spec.init_containers.as_mut() {
            init.retain(|c| c.name != api::SIDECAR_NAME);
        }
        if spec.init_containers.as_ref().is_some_and(Vec::is_empty) {
            spec.init_containers = None;
        }
        if let Some(volumes) = spec.volumes.as_mut() {
            volumes.retain(|v| !api::SIDECAR_VOLUMES.contains(&v.name.as_str()));
        }
    }
    if let Some(a) = pod.metadata.annotations.as_mut() {
        for key in [api::TUNNELS, api::STATUS, api::INJECTED] {
            a.remove(key);
        }
    }
    pod
}

/// Containers other than the sidecar (init, regular, ephemeral) that mount one of the sidecar's
/// credentials -- its token volume, the key Secret volume, or any projected token volume for
/// [`REPORT_AUDIENCE`]: (container, volume). (The tunnels file is the pod's own annotation.)
pub fn foreign_mounts(pod: &Pod) -> Vec<(String, String)> {
    let Some(spec) = pod.spec.as_ref() else { return Vec::new() };
    let guarded: Vec<&str> = spec
        .volumes
        .iter()
        .flatten()
        .filter(|v| {
            [KEY_VOLUME, REPORT_TOKEN_VOLUME].contains(&v.name.as_str())
                || v.projected.as_ref().is_some_and(|p| {
                    p.sources.iter().flatten().any(|s| {
                        s.service_account_token.as_ref().is_some_and(|t| t.audience.as_deref() == Some(REPORT_AUDIENCE))
                    })
                })
        })
        .map(|v| v.name.as_str())
        .collect();
    let containers = spec.init_containers.iter().flatten().chain(spec.containers.iter());
    let mut found: Vec<(String, String)> = containers
        .filter(|c| c.name != api::SIDECAR_NAME)
        .flat_map(|c| c.volume_mounts.iter().flatten().map(move |m| (c.name.clone(), m.name.clone())))
        .chain(
            spec.ephemeral_containers
                .iter()
                .flatten()
                .flat_map(|c| c.volume_mounts.iter().flatten().map(move |m| (c.name.clone(), m.name.clone()))),
        )
        .filter(|(_, volume)| guarded.contains(&volume.as_str()))
        .collect();
    found.dedup();
    found
}

/// [`tunnels_for`] less the expose tunnels whose tuns name, custom domain or public TCP port the
/// namespace's expose annotations do not own across the cluster (or may not use: the custom-domain
/// allow-list), with a warning naming the owner for each. Route tunnels come already kept by the
/// same table (`View::admission_for`). `owners` None (offline): nothing is dropped.
pub fn owned_tunnels(
    pod: &Pod,
    namespace: &str,
    workload: Option<&Workload>,
    route_tunnels: &[TunnelSpec],
    owners: Option<&Ownership>,
    warnings: &mut Vec<String>,
) -> Vec<TunnelSpec> {
    let mut tunnels = tunnels_for(pod, workload, route_tunnels, warnings);
    let Some(owners) = owners else { return tunnels };
    // tunnels_for appends the annotation's tunnels after the routes'.
    let exposed = tunnels.split_off(route_tunnels.len().min(tunnels.len()));
    let claimant = Claimant::expose(namespace);
    for spec in exposed {
        match owners.check(&claimant, &spec) {
            Ok(()) => tunnels.push(spec),
            Err(problem) => {
                warnings.push(format!("{}: tunnel {} is not opened: {}", api::EXPOSE, spec.name, problem.message))
            }
        }
    }
    tunnels
}

/// The value of a quantity [`is_quantity`] accepts, in base units (cores, bytes), to compare
/// two; None for anything else.
pub fn quantity_value(s: &str) -> Option<f64> {
    let s = s.trim();
    if !is_quantity(s) {
        return None;
    }
    let digits_end = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    let number: f64 = number.parse().ok()?;
    let scale = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exponent => 10f64.powi(exponent[1..].parse::<i32>().ok()?),
    };
    Some(number * scale)
}

/// A Kubernetes quantity as the apiserver accepts it (`100m`, `64Mi`, `1.5`, `1e3`).
pub fn is_quantity(s: &str) -> bool {
    let digits_end = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    let number_ok = !number.is_empty() && number.matches('.').count() <= 1 && number != ".";
    let suffix_ok = matches!(
        suffix,
        "" | "n" | "u" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei"
    ) || suffix.strip_prefix(['e', 'E']).is_some_and(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && e.chars().all(|c| c.is_ascii_digit())
    });
    number_ok && suffix_ok
}

/// The TCP ports the pod's own containers (init and regular, not the sidecar) declare, and the
/// app ports its tunnels forward to: (port, who uses it).
fn ports_in_use(pod: &Pod, tunnels: &[TunnelSpec]) -> Vec<(u16, String)> {
    let spec = pod.spec.as_ref();
    let containers = spec.into_iter().flat_map(|s| s.init_containers.iter().flatten().chain(s.containers.iter()));
    let declared = containers.filter(|c| c.name != api::SIDECAR_NAME).flat_map(|c| {
        c.ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| u16::try_from(p.container_port).ok())
            .map(|p| (p, format!("container {}", c.name)))
    });
    let forwarded = tunnels.iter().map(|t| (t.target_port, format!("tunnel {}", t.name)));
    declared.chain(forwarded).collect()
}

/// The sidecar's admin port for `pod`: its [`api::ADMIN_PORT`] annotation when that is a port
/// nothing else in the pod uses, else `default`. A bad annotation is a warning (the pod is still
/// injected, on the default), and so is a default the pod already uses.
pub fn admin_port(pod: &Pod, tunnels: &[TunnelSpec], default: u16, warnings: &mut Vec<String>) -> u16 {
    let in_use = ports_in_use(pod, tunnels);
    let user = |port: u16| in_use.iter().find(|(p, _)| *p == port).map(|(_, who)| who.clone());
    let key = api::ADMIN_PORT;
    let chosen = match lookup(&pod.metadata.annotations, key).map(|v| v.trim()) {
        None => None,
        Some(v) => match v.parse::<u16>() {
            Ok(0) | Err(_) => {
                warnings.push(format!(
                    "{key}: {v:?} is not a port number (1-65535); the sidecar's admin port is {default}"
                ));
                None
            }
            Ok(port) => match user(port) {
                Some(who) => {
                    warnings.push(format!(
                        "{key}: port {port} is already used by {who}; the sidecar's admin port is {default}"
                    ));
                    None
                }
                None => Some(port),
            },
        },
    };
    let port = chosen.unwrap_or(default);
    if chosen.is_none()
        && let Some(who) = user(port)
    {
        warnings.push(format!(
            "the sidecar's admin port {port} is also used by {who}: one of them will fail to listen; give the sidecar \
             another port with the pod annotation {key}"
        ));
    }
    port
}

/// Adds the sidecar, its volumes and annotations to a copy of `pod`.
pub fn inject(pod: &Pod, tunnels: &[TunnelSpec], config: &InjectConfig, warnings: &mut Vec<String>) -> Pod {
    let admin_port = admin_port(pod, tunnels, config.admin_port, warnings);
    let mut pod = pod.clone();
    let annotations = pod.metadata.annotations.get_or_insert_with(BTreeMap::new);
    let mut quantity = |key: &str, default: &str| -> Quantity {
        match annotations.get(key) {
            Some(v) if is_quantity(v.trim()) => Quantity(v.trim().to_string()),
            Some(v) => {
                warnings
                    .push(format!("{key}: {v:?} is not a Kubernetes quantity (like 100m or 64Mi); using {default}"));
                Quantity(default.to_string())
            }
            None => Quantity(default.to_string()),
        }
    };
    let (mut requests, mut limits, mut lowered) = (BTreeMap::new(), BTreeMap::new(), Vec::new());
    for (resource, request_key, request_default, limit_key, limit_default) in [
        ("cpu", api::CPU_REQUEST, &config.cpu_request, api::CPU_LIMIT, &config.cpu_limit),
        ("memory", api::MEMORY_REQUEST, &config.memory_request, api::MEMORY_LIMIT, &config.memory_limit),
    ] {
        let (mut request, limit) = (quantity(request_key, request_default), quantity(limit_key, limit_default));
        // The apiserver refuses a container whose request exceeds its limit: a limit set below
        // the (default) request lowers the request to it.
        if let (Some(r), Some(l)) = (quantity_value(&request.0), quantity_value(&limit.0))
            && r > l
        {
            lowered.push(format!(
                "the sidecar's {resource} request {} is above its limit {} (set by {request_key} and {limit_key}); \
                 requesting {}",
                request.0, limit.0, limit.0
            ));
            request = limit.clone();
        }
        requests.insert(resource.to_string(), request);
        limits.insert(resource.to_string(), limit);
    }
    warnings.extend(lowered);
    let resources = ResourceRequirements { requests: Some(requests), limits: Some(limits), ..Default::default() };
    let (key_secret, bad_key_secret) = api::key_secret(Some(annotations));
    if matches!(config.auth, SidecarAuth::Key) {
        // Only key mode mounts the Secret.
        warnings.extend(bad_key_secret);
    }
    let log_level = annotations.get(api::LOG_LEVEL).cloned().unwrap_or_else(|| config.log_level.clone());
    let gate = match (api::switch(annotations.get(api::STARTUP_GATE)), annotations.get(api::STARTUP_GATE)) {
        (Some(true), _) if config.native_sidecar => true,
        (Some(true), _) => {
            warnings.push(format!(
                "{}: the startup gate needs native sidecars (Kubernetes 1.29+); the app is not held",
                api::STARTUP_GATE
            ));
            false
        }
        (None, Some(v)) => {
            warnings.push(format!("{}: {v:?} is neither \"true\" nor \"false\"; no startup gate", api::STARTUP_GATE));
            false
        }
        _ => false,
    };
    annotations.insert(api::TUNNELS.to_string(), TunnelsFile { tunnels: tunnels.to_vec() }.to_json());
    annotations.insert(
        api::STATUS.to_string(),
        serde_json::json!({"version": crate::VERSION, "sidecar": api::SIDECAR_NAME, "native": config.native_sidecar})
            .to_string(),
    );
    let spec = pod.spec.get_or_insert_with(Default::default);
    if let Some(app) = spec.containers.first() {
        annotations.entry(api::DEFAULT_CONTAINER.to_string()).or_insert_with(|| app.name.clone());
    }

    let env = |name: &str, value: String| EnvVar { name: name.into(), value: Some(value), ..Default::default() };
    let report = !config.report_url.is_empty();
    let certificate_url = match config.auth {
        SidecarAuth::Key => None,
        SidecarAuth::Certificate => {
            let url = certificate_url(&config.report_url);
            if url.is_none() {
                // Refused at start by the webhook and `picotun inject`; said here all the same.
                warnings.push(
                    "certificate mode needs an https --agent-report-url; the sidecar has no way to authenticate".into(),
                );
            }
            url
        }
    };
    let probe = |path: &str| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("picotun-admin".into()),
            ..Default::default()
        }),
        period_seconds: Some(5),
        failure_threshold: Some(3),
        ..Default::default()
    };
    let mut sidecar = Container {
        name: api::SIDECAR_NAME.into(),
        image: Some(config.image.clone()),
        image_pull_policy: Some(config.pull_policy.clone()),
        args: Some(vec!["agent".into()]),
        env: Some(
            vec![
                env("PICOTUN_TUNNELS_FILE", "/etc/picotun/tunnels/tunnels.json".into()),
                match (config.auth, &certificate_url) {
                    (SidecarAuth::Key, _) => env("PICOTUN_KEY_FILE", "/etc/picotun/ssh/id".into()),
                    (SidecarAuth::Certificate, url) => env("PICOTUN_CERTIFICATE_URL", url.clone().unwrap_or_default()),
                },
                env("PICOTUN_SERVER", config.server.clone()),
                env("PICOTUN_SERVER_PORT", config.server_port.to_string()),
                env("PICOTUN_USER", config.user.clone()),
                env("PICOTUN_DIALECT", config.dialect.clone()),
                env("PICOTUN_ADMIN_ADDR", format!("0.0.0.0:{admin_port}")),
                env("PICOTUN_LOG", log_level),
            ]
            .into_iter()
            .chain(
                (!config.known_hosts.is_empty()).then(|| env("PICOTUN_KNOWN_HOSTS_DATA", config.known_hosts.clone())),
            )
            .chain(report.then(|| env("PICOTUN_REPORT_URL", config.report_url.clone())))
            .chain((report && !config.report_ca.is_empty()).then(|| env("PICOTUN_REPORT_CA", config.report_ca.clone())))
            .chain(report.then(|| env("PICOTUN_REPORT_TOKEN_FILE", format!("{REPORT_TOKEN_DIR}/token"))))
            .chain(gate.then(|| env("PICOTUN_OPEN_BEFORE_APP", "true".into())))
            .collect(),
        ),
        ports: Some(vec![ContainerPort {
            name: Some("picotun-admin".into()),
            container_port: i32::from(admin_port),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        // Ready when the agent is up, whatever the tunnel server does: a tuns.sh outage must not
        // take the pod out of its Services. Tunnels are in /status, metrics and the route status.
        readiness_probe: Some(probe("/ready")),
        liveness_probe: Some(probe("/live")),
        // Opt-in: a native sidecar's startupProbe holds the app's containers until it passes.
        startup_probe: gate.then(|| Probe {
            period_seconds: Some(STARTUP_GATE_PERIOD_SECONDS),
            failure_threshold: Some(STARTUP_GATE_FAILURE_THRESHOLD),
            ..probe("/tunnels-up")
        }),
        resources: Some(resources),
        // No fixed user or group: the image's numeric USER (65532:65532, the Dockerfile) runs it,
        // which the kubelet checks against runAsNonRoot -- PodSecurity restricted asks no more --
        // and OpenShift's restricted SCC can give the pod a UID of its namespace's range. Every
        // file the sidecar reads is mode 0444 or its pod's own, so any UID will do.
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: TUNNELS_VOLUME.into(),
                mount_path: "/etc/picotun/tunnels".into(),
                read_only: Some(true),
                ..Default::default()
            },
            // The agent needs no Kubernetes API access. A mount already at the token's path keeps
            // the apiserver's ServiceAccount plugin from adding the API token to the sidecar when
            // it runs again after this webhook changed the pod -- a change that would make the
            // apiserver call the webhook a second time (re-invocation), for every injected pod.
            VolumeMount {
                name: NO_API_TOKEN_VOLUME.into(),
                mount_path: SERVICE_ACCOUNT_TOKEN_PATH.into(),
                read_only: Some(true),
                ..Default::default()
            },
        ]),
        // Native sidecar: started before the app, stopped after it, and not holding Jobs open.
        restart_policy: config.native_sidecar.then(|| "Always".to_string()),
        ..Default::default()
    };
    if config.auth == SidecarAuth::Key {
        sidecar.volume_mounts.get_or_insert_with(Vec::new).push(VolumeMount {
            name: KEY_VOLUME.into(),
            mount_path: "/etc/picotun/ssh".into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    if report {
        sidecar.volume_mounts.get_or_insert_with(Vec::new).push(VolumeMount {
            name: REPORT_TOKEN_VOLUME.into(),
            mount_path: REPORT_TOKEN_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    if config.native_sidecar {
        spec.init_containers.get_or_insert_with(Vec::new).push(sidecar);
    } else {
        spec.containers.push(sidecar);
    }
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    volumes.push(Volume {
        name: TUNNELS_VOLUME.into(),
        downward_api: Some(DownwardAPIVolumeSource {
            items: Some(vec![DownwardAPIVolumeFile {
                path: "tunnels.json".into(),
                field_ref: Some(ObjectFieldSelector {
                    field_path: format!("metadata.annotations['{}']", api::TUNNELS),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    });
    volumes.push(Volume {
        name: NO_API_TOKEN_VOLUME.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    });
    if config.auth == SidecarAuth::Key {
        volumes.push(Volume {
            name: KEY_VOLUME.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(key_secret),
                items: Some(vec![KeyToPath {
                    key: api::KEY_SECRET_KEY.into(),
                    path: "id".into(),
                    ..Default::default()
                }]),
                // Readable by the sidecar's non-root user without an fsGroup on the pod; only the
                // sidecar mounts this volume.
                default_mode: Some(0o444),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    if report {
        // A token bound to this pod (the kubelet requests it with the pod as boundObjectRef),
        // for this audience only: it proves to `/report` which pod speaks, and is useless
        // against the apiserver. Mounted only into the sidecar.
        volumes.push(Volume {
            name: REPORT_TOKEN_VOLUME.into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(REPORT_AUDIENCE.into()),
                        expiration_seconds: Some(REPORT_TOKEN_SECONDS),
                        path: "token".into(),
                    }),
                    ..Default::default()
                }]),
                // As for the key: readable by the sidecar's user without an fsGroup.
                default_mode: Some(0o444),
            }),
            ..Default::default()
        });
    }
    pod
}

/// The JSON patch from `before` to `after`.
pub fn patch(before: &Pod, after: &Pod) -> json_patch::Patch {
    let before = serde_json::to_value(before).expect("pods serialize");
    let after = serde_json::to_value(after).expect("pods serialize");
    json_patch::diff(&before, &after)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::ticket;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    fn app(labels: serde_json::Value, annotations: serde_json::Value) -> Pod {
        pod(json!({
            "metadata": {"generateName": "web-", "labels": labels, "annotations": annotations},
            "spec": {"containers": [{"name": "web", "image": "nginx", "ports": [{"name": "http", "containerPort": 8080}]}]},
        }))
    }

    fn cfg() -> InjectConfig {
        InjectConfig::default()
    }

    fn decide_simple(p: &Pod, ns: &str, w: Option<&Workload>) -> Decision {
        decide(p, ns, w, &[], false, &cfg())
    }

    fn workload(annotations: &[(&str, &str)]) -> Workload {
        Workload {
            reference: "Deployment/web".into(),
            labels: BTreeMap::new(),
            annotations: annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    /// Defect 11: a pod with its own volume named like one picotun adds is admitted as it came,
    /// with a warning naming the volume and the fix -- not patched into a pod the apiserver
    /// rejects for a duplicate volume name. picotun's own volumes (re-invocation) are no conflict.
    #[test]
    fn a_volume_named_like_picotuns_is_a_warning_not_a_broken_pod() {
        let mut p = app(json!({"tunnels.pico.sh/inject": "true"}), json!({}));
        p.spec.as_mut().unwrap().volumes = Some(vec![
            Volume { name: "data".into(), ..Default::default() },
            Volume { name: TUNNELS_VOLUME.into(), ..Default::default() },
        ]);
        let out = mutate(&p, "apps", None, &[], false, &cfg());
        assert!(
            matches!(out.decision, Decision::Skip { reason: SkipReason::VolumeConflict, .. }),
            "{:?}",
            out.decision
        );
        assert!(out.pod.is_none(), "admitted unchanged");
        let warning = out.warnings.join("\n");
        assert!(warning.contains("picotun-tunnels") && warning.contains("rename it"), "{warning}");

        // The volume picotun did not add in this mode (no report token without reporting) is
        // the pod's to name.
        p.spec.as_mut().unwrap().volumes.as_mut().unwrap()[1].name = REPORT_TOKEN_VOLUME.into();
        let out = mutate(&p, "apps", None, &[], false, &cfg());
        assert!(matches!(out.decision, Decision::Inject { .. }), "{:?}", out.decision);
        assert!(volume_conflicts(out.pod.as_ref().unwrap()).is_empty());

        // Injected once, injected again (re-invocation): picotun's own volumes, no conflict.
        let plain = app(json!({"tunnels.pico.sh/inject": "true"}), json!({}));
        let once = mutate(&plain, "apps", None, &[], false, &cfg()).pod.unwrap();
        let key = ticket::TicketKey::from_bytes(&[7; 32]).unwrap();
        let keyed = InjectConfig { ticket_key: Some(key), ..cfg() };
        let again = mutate(&once, "apps", None, &[], false, &keyed);
        assert!(matches!(again.decision, Decision::Inject { .. }), "{:?}", again.decision);
        assert!(volume_conflicts(again.pod.as_ref().unwrap()).is_empty());
    }

    #[test]
    fn opt_in_by_pod_label_or_annotation_or_workload() {
        let by_label = app(json!({"tunnels.pico.sh/inject": "true"}), json!({}));
        assert!(
            matches!(decide_simple(&by_label, "apps", None), Decision::Inject { because } if because.contains("pod label"))
        );
        let by_annotation = app(json!({}), json!({"tunnels.pico.sh/inject": "true"}));
        assert!(
            matches!(decide_simple(&by_annotation, "apps", None), Decision::Inject { because } if because.contains("pod annotation"))
        );
        let plain = app(json!({}), json!({}));
        let w = workload(&[("tunnels.pico.sh/inject", "true")]);
        assert!(
            matches!(decide_simple(&plain, "apps", Some(&w)), Decision::Inject { because } if because.contains("Deployment/web annotation"))
        );
        assert!(matches!(decide_simple(&plain, "apps", None), Decision::Skip { reason: SkipReason::NotOptedIn, .. }));
        let exposed = app(json!({}), json!({"tunnels.pico.sh/expose": "http:demo=8080"}));
        assert!(matches!(decide_simple(&exposed, "apps", None), Decision::Inject { .. }));
    }

    #[test]
    fn false_anywhere_wins() {
        let p = app(json!({"tunnels.pico.sh/inject": "true"}), json!({}));
        let w = workload(&[("tunnels.pico.sh/inject", "false")]);
        assert!(matches!(decide_simple(&p, "apps", Some(&w)), Decision::Skip { reason: SkipReason::OptedOut, .. }));
        let p = app(json!({"tunnels.pico.sh/inject": "false"}), json!({"tunnels.pico.sh/expose": "http:demo=8080"}));
        let w = workload(&[("tunnels.pico.sh/inject", "true")]);
        assert!(matches!(decide_simple(&p, "apps", Some(&w)), Decision::Skip { reason: SkipReason::OptedOut, .. }));
    }

    #[test]
    fn never_system_own_namespace_host_network_or_twice() {
        let p = app(json!({"tunnels.pico.sh/inject": "true"}), json!({}));
        for ns in ["kube-system", "kube-public", "kube-node-lease"] {
            assert!(matches!(decide_simple(&p, ns, None), Decision::Skip { reason: SkipReason::SystemNamespace, .. }));
        }
        assert!(matches!(
            decide_simple(&p, "pico-sh-system", None),
            Decision::Skip { reason: SkipReason::OwnNamespace, .. }
        ));
        let mut host = p.clone();
        host.spec.as_mut().unwrap().host_network = Some(true);
        assert!(matches!(decide_simple(&host, "apps", None), Decision::Skip { reason: SkipReason::HostNetwork, .. }));
        let injected = mutate(&p, "apps", None, &[], false, &cfg()).pod.unwrap();
        assert!(matches!(
            decide_simple(&injected, "apps", None),
            Decision::Skip { reason: SkipReason::AlreadyInjected, .. }
        ));
        assert!(patch(&injected, &injected).0.is_empty());
    }

    #[test]
    fn route_backends_only_with_the_switch() {
        let p = app(json!({}), json!({}));
        let route = vec![TunnelSpec {
            name: "http-demo".into(),
            kind: crate::core::tunnel::TunnelKind::Http,
            host: Some("demo".into()),
            remote_port: None,
            target_port: 8080,
            options: Default::default(),
            standby: false,
        }];
        assert!(matches!(decide(&p, "apps", None, &route, false, &cfg()), Decision::Skip { .. }));
        assert!(matches!(decide(&p, "apps", None, &route, true, &cfg()), Decision::Inject { .. }));
        let out = mutate(&p, "apps", None, &route, true, &cfg());
        assert_eq!(out.tunnels, route);
    }

    /// Defect: each quantity was checked alone, so a limit below the (default) request -- or a
    /// key-secret that is no Secret name -- gave a pod the apiserver refuses, about a container
    /// its author never wrote.
    #[test]
    fn annotations_never_give_a_sidecar_the_apiserver_refuses() {
        let sidecar_of = |annotations: serde_json::Value| {
            let out =
                mutate(&app(json!({"tunnels.pico.sh/inject": "true"}), annotations), "apps", None, &[], false, &cfg());
            let pod = out.pod.unwrap();
            let spec = pod.spec.unwrap();
            (spec.init_containers.unwrap().remove(0), spec.volumes.unwrap_or_default(), out.warnings)
        };
        let (d, _, warnings) = sidecar_of(json!({}));
        assert!(warnings.is_empty(), "{warnings:?}");
        let defaults = d.resources.unwrap();

        let (sidecar, _, warnings) = sidecar_of(json!({"tunnels.pico.sh/sidecar-memory-limit": "1Ki",
            "tunnels.pico.sh/sidecar-cpu-request": "64"}));
        let r = sidecar.resources.unwrap();
        let (requests, limits) = (r.requests.unwrap(), r.limits.unwrap());
        assert_eq!((requests["memory"].0.as_str(), limits["memory"].0.as_str()), ("1Ki", "1Ki"), "{warnings:?}");
        let cpu_limit = &defaults.limits.as_ref().unwrap()["cpu"].0;
        assert_eq!((&requests["cpu"].0, &limits["cpu"].0), (cpu_limit, cpu_limit), "{warnings:?}");
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("cpu request 64 is above its limit"), "{warnings:?}");
        assert!(warnings[1].contains("memory request") && warnings[1].contains("requesting 1Ki"), "{warnings:?}");

        for bad in ["", "My_Key", "-key"] {
            let (_, volumes, warnings) = sidecar_of(json!({"tunnels.pico.sh/key-secret": bad}));
            let names: Vec<_> = volumes.iter().filter_map(|v| v.secret.as_ref()?.secret_name.clone()).collect();
            if !names.is_empty() {
                assert_eq!(names, [api::DEFAULT_KEY_SECRET], "{bad:?}");
            }
            assert!(warnings.iter().any(|w| w.contains("is not a Secret name")), "{bad:?}: {warnings:?}");
        }
        assert_eq!(
            api::key_secret(Some(&BTreeMap::from([(api::KEY_SECRET.to_string(), " my-key ".to_string())]))).0,
            "my-key"
        );
    }

    #[test]
    fn injects_a_hardened_native_sidecar_with_its_tunnels() {
        let p = app(
            json!({}),
            json!({"tunnels.pico.sh/expose": "http:demo=http", "tunnels.pico.sh/sidecar-memory-limit": "128Mi"}),
        );
        let out = mutate(&p, "apps", None, &[], false, &cfg());
        assert!(out.warnings.is_empty(), "{:?}", out.warnings);
        let injected = out.pod.unwrap();
        let spec = injected.spec.as_ref().unwrap();
        assert_eq!(spec.containers.len(), 1, "the app's containers are untouched");
        let sidecar = &spec.init_containers.as_ref().unwrap()[0];
        assert_eq!(sidecar.name, "picotun-agent");
        assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
        let sc = sidecar.security_context.as_ref().unwrap();
        assert_eq!(
            (sc.run_as_non_root, sc.read_only_root_filesystem, sc.allow_privilege_escalation),
            (Some(true), Some(true), Some(false))
        );
        // The image's user, or the one OpenShift's SCC assigns.
        assert_eq!((sc.run_as_user, sc.run_as_group), (None, None));
        assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_ref().unwrap(), &vec!["ALL".to_string()]);
        assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
        let limits = sidecar.resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert_eq!(limits["memory"].0, "128Mi");
        let a = injected.metadata.annotations.as_ref().unwrap();
        assert_eq!(a["kubectl.kubernetes.io/default-container"], "web");
        let file = TunnelsFile::parse(&a["tunnels.pico.sh/tunnels"]).unwrap();
        assert_eq!(file.tunnels[0].target_port, 8080, "named port resolved");
        assert!(a.contains_key("tunnels.pico.sh/status"));
        let volumes: Vec<&str> = spec.volumes.as_ref().unwrap().iter().map(|v| v.name.as_str()).collect();
        assert_eq!(volumes, vec!["picotun-tunnels", "picotun-no-api-token", "picotun-ssh-key"]);
        // The patch only adds.
        let p = patch(&p, &injected);
        assert!(p.0.iter().all(|op| matches!(op, json_patch::PatchOperation::Add(_))), "{p:?}");
    }

    #[test]
    fn a_configured_host_key_pin_reaches_the_sidecar() {
        let p = app(json!({"tunnels.pico.sh/inject": "true"}), json!({}));
        let config = InjectConfig { known_hosts: "[tunnels.example]:2222 ssh-ed25519 AAAA".into(), ..cfg() };
        let injected = mutate(&p, "apps", None, &[], false, &config).pod.unwrap();
        let env = injected.spec.unwrap().init_containers.unwrap()[0].env.clone().unwrap();
        assert!(env.iter().any(|e| e.name == "PICOTUN_KNOWN_HOSTS_DATA"
            && e.value.as_deref() == Some("[tunnels.example]:2222 ssh-ed25519 AAAA")));
        let plain = mutate(&p, "apps", None, &[], false, &cfg()).pod.unwrap();
        assert!(
            !plain.spec.unwrap().init_containers.unwrap()[0]
                .env
                .as_ref()
                .unwrap()
                .iter()
                .any(|e| e.name == "PICOTUN_KNOWN_HOSTS_DATA")
        );
    }

    #[test]
    fn reporting_adds_a_bound_token_for_the_sidecar_only() {
        let p = app(json!({"tunnels.pico.sh/inject": "true"}), json!({}));
        let config = InjectConfig {
            report_url: "https://picotun-webhook.pico-sh-system.svc:8444/report".into(),
            report_ca: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
            ..cfg()
        };
        let injected = mutate(&p, "apps", None, &[], false, &config).pod.unwrap();
        let spec = injected.spec.unwrap();
        let sidecar = &spec.init_containers.as_ref().unwrap()[0];
        let env: BTreeMap<&str, &str> =
            sidecar.env.iter().flatten().map(|e| (e.name.as_str(), e.value.as_deref().unwrap_or(""))).collect();
        assert_eq!(env["PICOTUN_REPORT_URL"], "https://picotun-webhook.pico-sh-system.svc:8444/report");
        assert_eq!(env["PICOTUN_REPORT_CA"], config.report_ca);
        assert_eq!(env["PICOTUN_REPORT_TOKEN_FILE"], "/var/run/secrets/tunnels.pico.sh/report/token");
        let mount = sidecar.volume_mounts.iter().flatten().find(|m| m.name == "picotun-report-token").unwrap();
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            ("/var/run/secrets/tunnels.pico.sh/report", Some(true))
        );
        assert!(
            spec.containers.iter().all(|c| c.volume_mounts.iter().flatten().all(|m| m.name != "picotun-report-token")),
            "the app never sees the token"
        );
        let volume = spec.volumes.iter().flatten().find(|v| v.name == "picotun-report-token").unwrap();
        let sources = volume.projected.as_ref().unwrap().sources.as_ref().unwrap();
        let token = sources[0].service_account_token.as_ref().unwrap();
        assert_eq!(
            (token.audience.as_deref(), token.expiration_seconds, token.path.as_str()),
            (Some("tunnels.pico.sh"), Some(3600), "token")
        );

        // Without a CA, no PICOTUN_REPORT_CA (the agent falls back to platform roots).
        let no_ca = InjectConfig { report_ca: String::new(), ..config };
        let injected = mutate(&p, "apps", None, &[], false, &no_ca).pod.unwrap();
        let sidecar = &injected.spec.unwrap().init_containers.unwrap()[0];
        assert!(sidecar.env.iter().flatten().all(|e| e.name != "PICOTUN_REPORT_CA"));

        // Without a URL, nothing of it.
        let plain = mutate(&p, "apps", None, &[], false, &cfg()).pod.unwrap();
        let text = serde_json::to_string(&plain).unwrap();
        assert!(!text.contains("PICOTUN_REPORT") && !text.contains("picotun-report-token"), "{text}");
    }

    #[test]
    fn a_workload_expose_annotation_is_copied_onto_the_pod() {
        let w = workload(&[("tunnels.pico.sh/expose", "http:demo=http")]);
        let plain = app(json!({}), json!({}));
        let out = mutate(&plain, "apps", Some(&w), &[], false, &cfg());
        let annotations = out.pod.unwrap().metadata.annotations.unwrap();
        assert_eq!(annotations["tunnels.pico.sh/expose"], "http:demo=http");
        // The pod's own annotation is what counted, and stays as it is.
        let own = app(json!({}), json!({"tunnels.pico.sh/expose": "tcp:any=8080"}));
        let out = mutate(&own, "apps", Some(&w), &[], false, &cfg());
        assert_eq!(out.tunnels[0].name, "tcp-any-8080");
        assert_eq!(out.pod.unwrap().metadata.annotations.unwrap()["tunnels.pico.sh/expose"], "tcp:any=8080");
        // Opted in another way: nothing is added.
        let opted = app(json!({"tunnels.pico.sh/inject": "true"}), json!({}));
        let out = mutate(&opted, "apps", Some(&workload(&[])), &[], false, &cfg());
        assert!(!out.pod.unwrap().metadata.annotations.unwrap().contains_key("tunnels.pico.sh/expose"));
        // What the pod carries recomputes the same tunnels without the workload.
        let injected = mutate(&plain, "apps", Some(&w), &[], false, &cfg());
        let again = tunnels_for(injected.pod.as_ref().unwrap(), None, &[], &mut Vec::new());
        assert_eq!(again, injected.tunnels);
    }

    #[test]
    fn regular_container_when_native_sidecars_are_off() {
        let p = app(json!({"tunnels.pico.sh/inject": "true"}), json!({}));
        let config = InjectConfig { native_sidecar: false, ..cfg() };
        let injected = mutate(&p, "apps", None, &[], false, &config).pod.unwrap();
        let spec = injected.spec.unwrap();
        assert_eq!(spec.containers.len(), 2);
        assert!(spec.containers[1].restart_policy.is_none());
        assert!(spec.init_containers.is_none());
    }

    #[test]
    fn bad_annotations_warn_and_still_inject() {
        let p = app(
            json!({}),
            json!({"tunnels.pico.sh/inject": "true", "tunnels.pico.sh/expose": "http:demo", "tunnels.pico.sh/sidecar-cpu-limit": "lots"}),
        );
        let out = mutate(&p, "apps", None, &[], false, &cfg());
        assert!(out.pod.is_some());
        assert_eq!(out.warnings.len(), 2, "{:?}", out.warnings);
        assert!(out.warnings.iter().any(|w| w.contains("is not KIND:NAME=PORT")));
        assert!(out.warnings.iter().any(|w| w.contains("not a Kubernetes quantity")));
    }

    fn env_of(sidecar: &Container) -> BTreeMap<&str, &str> {
        sidecar.env.iter().flatten().map(|e| (e.name.as_str(), e.value.as_deref().unwrap_or(""))).collect()
    }

    fn certificate_cfg() -> InjectConfig {
        InjectConfig {
            report_url: "https://picotun-webhook.pico-sh-system.svc:8444/report".into(),
            auth: SidecarAuth::Certificate,
            ticket_key: Some(TicketKey::from_bytes(&[7; 32]).unwrap()),
            ..cfg()
        }
    }

    #[test]
    fn certificate_mode_mounts_no_key_and_names_the_certificate_url() {
        let p = app(json!({"tunnels.pico.sh/inject": "true"}), json!({}));
        let out = mutate(&p, "apps", None, &[], false, &certificate_cfg());
        assert!(out.warnings.is_empty(), "{:?}", out.warnings);
        let injected = out.pod.unwrap();
        let spec = injected.spec.as_ref().unwrap();
        let sidecar = &spec.init_containers.as_ref().unwrap()[0];
        let env = env_of(sidecar);
        assert_eq!(env["PICOTUN_CERTIFICATE_URL"], "https://picotun-webhook.pico-sh-system.svc:8444/certificate");
        assert!(!env.contains_key("PICOTUN_KEY_FILE"));
        assert_eq!(env["PICOTUN_REPORT_TOKEN_FILE"], "/var/run/secrets/tunnels.pico.sh/report/token");
        let volumes: Vec<&str> = spec.volumes.iter().flatten().map(|v| v.name.as_str()).collect();
        assert_eq!(
            volumes,
            ["picotun-tunnels", "picotun-no-api-token", "picotun-report-token"],
            "no key Secret volume"
        );
        let mounts: Vec<&str> = sidecar.volume_mounts.iter().flatten().map(|m| m.name.as_str()).collect();
        assert_eq!(mounts, ["picotun-tunnels", "picotun-no-api-token", "picotun-report-token"]);
        let text = serde_json::to_string(&injected).unwrap();
        assert!(!text.contains("picotun-ssh-key") && !text.contains("ssh-privatekey"), "{text}");

        // Key mode, with reporting: as before, the key Secret and the token.
        let key_mode = InjectConfig { auth: SidecarAuth::Key, ..certificate_cfg() };
        let injected = mutate(&p, "apps", None, &[], false, &key_mode).pod.unwrap();
        let spec = injected.spec.as_ref().unwrap();
        let sidecar = &spec.init_containers.as_ref().unwrap()[0];
        assert_eq!(env_of(sidecar)["PICOTUN_KEY_FILE"], "/etc/picotun/ssh/id");
        assert!(!env_of(sidecar).contains_key("PICOTUN_CERTIFICATE_URL"));
        let volumes: Vec<&str> = spec.volumes.iter().flatten().map(|v| v.name.as_str()).collect();
        assert_eq!(volumes, ["picotun-tunnels", "picotun-no-api-token", "picotun-ssh-key", "picotun-report-token"]);

        // Certificate mode without a report URL cannot work: said, and no key is mounted instead.
        let no_url = InjectConfig { report_url: String::new(), ..certificate_cfg() };
        let out = mutate(&p, "apps", None, &[], false, &no_url);
        assert!(out.warnings.iter().any(|w| w.contains("certificate mode needs")), "{:?}", out.warnings);
        assert!(!serde_json::to_string(&out.pod).unwrap().contains("picotun-ssh-key"));
    }

    #[test]
    fn certificate_urls_sit_beside_report() {
        assert_eq!(
            certificate_url("https://picotun-webhook.pico-sh-system.svc:8444/report").as_deref(),
            Some("https://picotun-webhook.pico-sh-system.svc:8444/certificate")
        );
        assert_eq!(
            certificate_url("https://10.0.0.1:8443/x/report?a=b").as_deref(),
            Some("https://10.0.0.1:8443/certificate")
        );
        assert_eq!(certificate_url("https://host").as_deref(), Some("https://host/certificate"));
        assert_eq!(certificate_url("http://host/report"), None);
        assert_eq!(certificate_url("https:///report"), None);
    }

    #[test]
    fn the_startup_gate_holds_the_app_until_the_tunnels_are_up() {
        let p = app(json!({}), json!({"tunnels.pico.sh/inject": "true", "tunnels.pico.sh/startup-gate": "true"}));
        let out = mutate(&p, "apps", None, &[], false, &certificate_cfg());
        assert!(out.warnings.is_empty(), "{:?}", out.warnings);
        let injected = out.pod.unwrap();
        let sidecar = &injected.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0];
        let startup = sidecar.startup_probe.as_ref().expect("a startupProbe");
        let get = startup.http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some("/tunnels-up"));
        assert_eq!(get.port, IntOrString::String("picotun-admin".into()));
        assert_eq!((startup.period_seconds, startup.failure_threshold), (Some(1), Some(300)));
        assert_eq!(env_of(sidecar)["PICOTUN_OPEN_BEFORE_APP"], "true");
        // Readiness stays the agent's own.
        assert_eq!(
            sidecar.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap().path.as_deref(),
            Some("/ready")
        );

        // Without the annotation (or with "false"): neither.
        for annotations in [
            json!({"tunnels.pico.sh/inject": "true"}),
            json!({"tunnels.pico.sh/inject": "true", "tunnels.pico.sh/startup-gate": "false"}),
        ] {
            let plain = mutate(&app(json!({}), annotations), "apps", None, &[], false, &certificate_cfg()).pod.unwrap();
            let sidecar = &plain.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0];
            assert!(sidecar.startup_probe.is_none());
            assert!(!env_of(sidecar).contains_key("PICOTUN_OPEN_BEFORE_APP"));
        }
        // A regular-container sidecar cannot hold the app: said, and nothing added.
        let regular = InjectConfig { native_sidecar: false, ..certificate_cfg() };
        let out = mutate(&p, "apps", None, &[], false, &regular);
        assert!(out.warnings.iter().any(|w| w.contains("needs native sidecars")), "{:?}", out.warnings);
        assert!(out.pod.unwrap().spec.unwrap().containers[1].startup_probe.is_none());
        let typo = app(json!({}), json!({"tunnels.pico.sh/inject": "true", "tunnels.pico.sh/startup-gate": "yes"}));
        let out = mutate(&typo, "apps", None, &[], false, &certificate_cfg());
        assert!(out.warnings.iter().any(|w| w.contains("neither \"true\" nor \"false\"")), "{:?}", out.warnings);
    }

    /// The admin port as the sidecar, the kubelet's probes and a port-forward see it.
    fn admin_of(sidecar: &Container) -> (i32, String) {
        let ports = sidecar.ports.as_ref().unwrap();
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0].name.as_deref(), Some("picotun-admin"));
        let probes = [&sidecar.readiness_probe, &sidecar.liveness_probe, &sidecar.startup_probe];
        for probe in probes.into_iter().flatten() {
            // By name: the probes follow the container port wherever it is.
            assert_eq!(probe.http_get.as_ref().unwrap().port, IntOrString::String("picotun-admin".into()));
        }
        (ports[0].container_port, env_of(sidecar)["PICOTUN_ADMIN_ADDR"].to_string())
    }

    fn injected_sidecar(out: &Outcome) -> Container {
        out.pod.as_ref().expect("injected").spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0].clone()
    }

    #[test]
    fn the_admin_port_is_one_no_mesh_uses_and_a_pod_can_choose_its_own() {
        let plain = app(json!({"tunnels.pico.sh/inject": "true"}), json!({}));
        let out = mutate(&plain, "apps", None, &[], false, &cfg());
        assert!(out.warnings.is_empty(), "{:?}", out.warnings);
        assert_eq!(admin_of(&injected_sidecar(&out)), (7426, "0.0.0.0:7426".into()));
        // The webhook's flag moves every pod's.
        let flag = InjectConfig { admin_port: 7000, ..cfg() };
        assert_eq!(admin_of(&injected_sidecar(&mutate(&plain, "apps", None, &[], false, &flag))).0, 7000);

        // The annotation moves one pod's, startup gate included; re-invocation sees picotun's own.
        let key = TicketKey::from_bytes(&[7; 32]).unwrap();
        let keyed = InjectConfig { ticket_key: Some(key), ..cfg() };
        let own = app(
            json!({}),
            json!({"tunnels.pico.sh/inject": "true", "tunnels.pico.sh/admin-port": " 15999 ", "tunnels.pico.sh/startup-gate": "true"}),
        );
        let out = mutate(&own, "apps", None, &[], false, &keyed);
        assert!(out.warnings.is_empty(), "{:?}", out.warnings);
        let sidecar = injected_sidecar(&out);
        assert!(sidecar.startup_probe.is_some());
        assert_eq!(admin_of(&sidecar), (15999, "0.0.0.0:15999".into()));
        let injected = out.pod.unwrap();
        assert!(matches!(
            decide(&injected, "apps", None, &[], false, &keyed),
            Decision::Skip { reason: SkipReason::AlreadyInjected, .. }
        ));
    }

    /// A bad annotation never keeps a pod out: it is said, and the sidecar takes the default.
    #[test]
    fn a_bad_admin_port_annotation_is_a_warning_and_the_default() {
        for (value, said) in [
            ("0", "is not a port number (1-65535)"),
            ("65536", "is not a port number (1-65535)"),
            ("-1", "is not a port number (1-65535)"),
            ("admin", "is not a port number (1-65535)"),
            ("", "is not a port number (1-65535)"),
            // The app's declared port (named `http`), and a tunnel's app port it does not declare.
            ("8080", "port 8080 is already used by container web"),
            ("9000", "port 9000 is already used by tunnel tcp-any-9000"),
        ] {
            let p =
                app(json!({}), json!({"tunnels.pico.sh/expose": "tcp:any=9000", "tunnels.pico.sh/admin-port": value}));
            let out = mutate(&p, "apps", None, &[], false, &cfg());
            assert!(matches!(out.decision, Decision::Inject { .. }), "{value}: {:?}", out.decision);
            assert_eq!(out.warnings.len(), 1, "{value}: {:?}", out.warnings);
            let warning = &out.warnings[0];
            assert!(warning.starts_with("tunnels.pico.sh/admin-port: "), "{warning}");
            assert!(warning.contains(said) && warning.ends_with("the sidecar's admin port is 7426"), "{warning}");
            assert_eq!(admin_of(&injected_sidecar(&out)).0, 7426, "{value}");
        }
        // A UDP port of the same number is no clash.
        let mut udp = app(json!({"tunnels.pico.sh/inject": "true"}), json!({"tunnels.pico.sh/admin-port": "5353"}));
        udp.spec.as_mut().unwrap().containers[0].ports.as_mut().unwrap().push(ContainerPort {
            container_port: 5353,
            protocol: Some("UDP".into()),
            ..Default::default()
        });
        let out = mutate(&udp, "apps", None, &[], false, &cfg());
        assert!(out.warnings.is_empty(), "{:?}", out.warnings);
        assert_eq!(admin_of(&injected_sidecar(&out)).0, 5353);
    }

    /// An app already on the default port (an init container counts too) is told how to move the
    /// sidecar; the pod is injected as asked.
    #[test]
    fn an_app_on_the_default_admin_port_is_told_about_the_annotation() {
        let mut p = app(json!({"tunnels.pico.sh/inject": "true"}), json!({}));
        p.spec.as_mut().unwrap().init_containers = Some(vec![Container {
            name: "mesh".into(),
            ports: Some(vec![ContainerPort { container_port: 7426, ..Default::default() }]),
            ..Default::default()
        }]);
        let out = mutate(&p, "apps", None, &[], false, &cfg());
        assert_eq!(out.warnings.len(), 1, "{:?}", out.warnings);
        assert!(
            out.warnings[0].contains("admin port 7426 is also used by container mesh")
                && out.warnings[0].contains("tunnels.pico.sh/admin-port"),
            "{:?}",
            out.warnings
        );
        let sidecar = out.pod.unwrap().spec.unwrap().init_containers.unwrap().pop().unwrap();
        assert_eq!(admin_of(&sidecar).0, 7426);
    }

    /// Issue 13: the apiserver re-runs its ServiceAccount plugin after the webhook changed a pod;
    /// a token mount it added to the sidecar changed the pod again and had the webhook called a
    /// second time for every injected pod. A mount of the sidecar's own at that path (an empty
    /// volume: the agent needs no API access) keeps the plugin off it.
    #[test]
    fn the_sidecar_holds_the_api_token_path_with_an_empty_volume_of_its_own() {
        for config in [cfg(), certificate_cfg()] {
            let injected =
                mutate(&app(json!({"tunnels.pico.sh/inject": "true"}), json!({})), "apps", None, &[], false, &config)
                    .pod
                    .unwrap();
            let sidecar = ticket::agent_container(&injected).unwrap();
            let mount = sidecar.volume_mounts.iter().flatten().find(|m| m.mount_path == SERVICE_ACCOUNT_TOKEN_PATH);
            let mount = mount.expect("a mount at the API token's path");
            assert_eq!((mount.name.as_str(), mount.read_only), (NO_API_TOKEN_VOLUME, Some(true)));
            let volumes = injected.spec.as_ref().unwrap().volumes.as_ref().unwrap();
            let volume = volumes.iter().find(|v| v.name == NO_API_TOKEN_VOLUME).unwrap();
            assert_eq!(volume.empty_dir, Some(EmptyDirVolumeSource::default()));
            // Only the sidecar mounts it, and stripping the sidecar takes it away.
            let spec = injected.spec.as_ref().unwrap();
            assert!(
                spec.containers.iter().all(|c| c.volume_mounts.iter().flatten().all(|m| m.name != NO_API_TOKEN_VOLUME))
            );
            let stripped = strip_sidecar(&injected);
            assert!(stripped.spec.unwrap().volumes.iter().flatten().all(|v| v.name != NO_API_TOKEN_VOLUME));
        }
    }

    #[test]
    fn the_webhook_tickets_what_it_injects_and_replaces_what_it_did_not() {
        let config = certificate_cfg();
        let key = config.ticket_key.clone().unwrap();
        let p = app(json!({"tunnels.pico.sh/inject": "true"}), json!({}));
        let injected = mutate(&p, "apps", None, &[], false, &config).pod.unwrap();
        assert!(injected.metadata.annotations.as_ref().unwrap()["tunnels.pico.sh/injected"].starts_with("v1."));
        assert_eq!(key.verify_pod(&injected, "apps"), Ok(()));
        // Re-invocation: left alone.
        assert!(matches!(
            decide(&injected, "apps", None, &[], false, &config),
            Decision::Skip { reason: SkipReason::AlreadyInjected, .. }
        ));

        // A pod that brings its own picotun-agent and a token volume, opted in: the webhook puts
        // its own sidecar in their place, and tickets that.
        let mut forged = injected.clone();
        forged.metadata.annotations.as_mut().unwrap().remove("tunnels.pico.sh/injected");
        let agent = forged.spec.as_mut().unwrap().init_containers.as_mut().unwrap().get_mut(0).unwrap();
        agent.image = Some("evil/agent:1".into());
        assert!(matches!(decide(&forged, "apps", None, &[], false, &config), Decision::Inject { .. }));
        let out = mutate(&forged, "apps", None, &[], false, &config);
        assert!(out.warnings.iter().any(|w| w.contains("replaced by the one picotun injects")), "{:?}", out.warnings);
        let replaced = out.pod.unwrap();
        assert_eq!(sidecar_count(&replaced), 1);
        assert_eq!(
            ticket::agent_container(&replaced).unwrap().image.as_deref(),
            Some("ghcr.io/picotun/picotun:latest")
        );
        assert_eq!(key.verify_pod(&replaced, "apps"), Ok(()));
        assert_eq!(replaced.spec.as_ref().unwrap().volumes.as_ref().unwrap().len(), 3, "no volume twice");
        // Not opted in: left as it is, and without a ticket its sidecar is refused later.
        let mut unasked = forged.clone();
        unasked.metadata.labels.as_mut().unwrap().remove("tunnels.pico.sh/inject");
        assert!(matches!(
            decide(&unasked, "apps", None, &[], false, &config),
            Decision::Skip { reason: SkipReason::NotOptedIn, .. }
        ));
        // Reinvoked after the apiserver mounted the API token into the sidecar too: re-injected
        // without it, and without a warning.
        let mut remounted = injected.clone();
        let sidecar = remounted.spec.as_mut().unwrap().init_containers.as_mut().unwrap().get_mut(0).unwrap();
        sidecar.volume_mounts.as_mut().unwrap().push(
            serde_json::from_value(
                json!({"name": "kube-api-access-x", "mountPath": SERVICE_ACCOUNT_TOKEN_PATH, "readOnly": true}),
            )
            .unwrap(),
        );
        assert!(matches!(decide(&remounted, "apps", None, &[], false, &config), Decision::Inject { .. }));
        let out = mutate(&remounted, "apps", None, &[], false, &config);
        assert!(out.warnings.is_empty(), "{:?}", out.warnings);
        let again = out.pod.unwrap();
        assert_eq!(ticket::agent_container(&again), ticket::agent_container(&injected), "no API token in the sidecar");
        assert_eq!(key.verify_pod(&again, "apps"), Ok(()));
        // A ticketed spec copied into a new pod with tunnels of its own choosing: picotun's
        // tunnels are written over them.
        let mut copied = injected.clone();
        copied.metadata.annotations.as_mut().unwrap().insert(
            "tunnels.pico.sh/tunnels".into(),
            r#"{"tunnels":[{"name":"x","kind":"http","host":"someone-elses","targetPort":80}]}"#.into(),
        );
        assert!(matches!(decide(&copied, "apps", None, &[], false, &config), Decision::Inject { .. }));
        let fixed = mutate(&copied, "apps", None, &[], false, &config).pod.unwrap();
        assert_eq!(fixed.metadata.annotations.as_ref().unwrap()["tunnels.pico.sh/tunnels"], r#"{"tunnels":[]}"#);
        assert_eq!(key.verify_pod(&fixed, "apps"), Ok(()));
        // A ticket from another namespace is no ticket here.
        assert!(matches!(decide(&injected, "other", None, &[], false, &config), Decision::Inject { .. }));
        // Offline (no key): a pod with the sidecar counts as injected, as before.
        assert!(matches!(
            decide(&forged, "apps", None, &[], false, &cfg()),
            Decision::Skip { reason: SkipReason::AlreadyInjected, .. }
        ));
    }

    /// At admission a pod's own expose tunnels are kept to the names its namespace owns across
    /// the cluster (the controller's table): an older claimant's name, or a custom domain the
    /// allow-list does not give the namespace, is not injected, and a warning names the owner.
    #[test]
    fn expose_tunnels_for_names_someone_else_owns_are_not_injected() {
        use crate::resolve::ownership::{self, Ask, Claim, DomainPolicy};
        let since = Some("2024-01-01T00:00:00Z".parse().unwrap());
        let policy = DomainPolicy::new(vec![ownership::parse_domain_rule("team-a=*.a.example.com").unwrap()]);
        let owners = ownership::ownership(
            [Ask { claimant: Claimant::ingress("team-a", "web"), claim: Claim::Name("demo".into()), since, via: None }],
            &policy,
        );
        let p = app(
            json!({}),
            json!({"tunnels.pico.sh/expose": "http:demo=8080, http:mine=8080, http:b.a.example.com=8080"}),
        );
        let route = TunnelSpec {
            name: "ing-web-early".into(),
            kind: crate::core::tunnel::TunnelKind::Http,
            host: Some("early".into()),
            remote_port: None,
            target_port: 8080,
            options: Default::default(),
            standby: false,
        };
        let config = certificate_cfg();
        let out = mutate_owned(&p, "team-b", None, std::slice::from_ref(&route), Some(&owners), false, &config);
        let names: Vec<&str> = out.tunnels.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["ing-web-early", "http-mine"], "{:?}", out.warnings);
        let file = &out.pod.as_ref().unwrap().metadata.annotations.as_ref().unwrap()["tunnels.pico.sh/tunnels"];
        assert_eq!(*file, TunnelsFile { tunnels: out.tunnels.clone() }.to_json());
        let said = out.warnings.join("\n");
        assert!(
            said.contains("tunnel http-demo is not opened: tuns name \"demo\" belongs to Ingress team-a/web"),
            "{said}"
        );
        assert!(said.contains("custom domain b.a.example.com is not allowed for namespace team-b"), "{said}");
        // Re-invoked, the pod carries the tunnels it was given: picotun's own, left alone.
        let injected = out.pod.unwrap();
        assert!(matches!(
            decide_owned(&injected, "team-b", None, std::slice::from_ref(&route), Some(&owners), false, &config),
            Decision::Skip { reason: SkipReason::AlreadyInjected, .. }
        ));
        // The domain is team-a's to use; demo is its Ingress's, not its expose annotations'.
        // Offline: nothing is dropped.
        let out = mutate_owned(&p, "team-a", None, &[], Some(&owners), false, &config);
        let hosts: Vec<_> = out.tunnels.iter().filter_map(|t| t.host.as_deref()).collect();
        assert_eq!(hosts, ["mine", "b.a.example.com"], "{:?}", out.warnings);
        assert_eq!(mutate(&p, "team-b", None, &[], false, &config).tunnels.len(), 3);
    }

    #[test]
    fn an_app_container_mounting_picotuns_volumes_is_warned_about() {
        let mut p = app(json!({"tunnels.pico.sh/inject": "true"}), json!({}));
        p.spec.as_mut().unwrap().containers[0].volume_mounts =
            Some(vec![serde_json::from_value(json!({"name": "picotun-report-token", "mountPath": "/t"})).unwrap()]);
        let out = mutate(&p, "apps", None, &[], false, &certificate_cfg());
        assert!(
            out.warnings
                .iter()
                .any(|w| w.contains("container web mounts picotun-report-token, a credential of the sidecar")),
            "{:?}",
            out.warnings
        );
        assert_eq!(foreign_mounts(&out.pod.unwrap()), [("web".to_string(), "picotun-report-token".to_string())]);
    }

    fn sidecar_count(pod: &Pod) -> usize {
        let spec = pod.spec.as_ref().unwrap();
        spec.init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter())
            .filter(|c| c.name == api::SIDECAR_NAME)
            .count()
    }

    #[test]
    fn quantities() {
        for ok in ["100m", "64Mi", "1", "0.5", "1e3", "2Gi", "1.5G"] {
            assert!(is_quantity(ok), "{ok}");
        }
        for bad in ["", "lots", "Mi", "1.2.3", "1e", "64MB", "-"] {
            assert!(!is_quantity(bad), "{bad}");
        }
        assert_eq!(quantity_value("500m"), Some(0.5));
        assert_eq!(quantity_value("64Mi"), Some(64.0 * 1024.0 * 1024.0));
        assert_eq!(quantity_value("1e3"), Some(1000.0));
        assert_eq!(quantity_value("1.5G"), Some(1.5e9));
        assert_eq!(quantity_value("64MB"), None);
        assert!(quantity_value("1") > quantity_value("500m"));
    }
}
