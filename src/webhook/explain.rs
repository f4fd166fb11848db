//! `picotun explain KIND/NAME`: whether a pod or workload in the cluster would be injected, and
//! why -- which namespace label, pod or workload label or annotation decided -- and which tunnels
//! it would get. Reads the cluster; changes nothing.

use std::fmt::Write as _;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Namespace, Pod, PodTemplateSpec};
use kube::Client;
use kube::api::Api;

use crate::apiserver::index::ResolveConfig;
use crate::apiserver::owner::owner_workload;
use crate::core::api;
use crate::core::pod::{self, Decision, SkipReason, Workload};
use crate::core::tunnel::TunnelsFile;
use crate::webhook::inject::{self, InjectConfig};

#[derive(Clone, Debug, clap::Args)]
pub struct ExplainArgs {
    /// `pod/NAME`, `deployment/NAME`, `statefulset/NAME`, `daemonset/NAME`, `job/NAME`,
    /// `cronjob/NAME` or `replicaset/NAME`.
    pub object: String,
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// picotun's own namespace (never injected).
    #[arg(long, env = "POD_NAMESPACE", default_value = "pico-sh-system")]
    pub own_namespace: String,
    /// Routes resolve as the webhook resolves them at admission: the same flags.
    #[command(flatten)]
    pub resolve: crate::apiserver::index::ResolveArgs,
}

impl ExplainArgs {
    pub fn resolve_config(&self) -> ResolveConfig {
        self.resolve.config()
    }
}

/// The kinds `explain` reads, by the names kubectl accepts for them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Pod,
    Deployment,
    StatefulSet,
    DaemonSet,
    ReplicaSet,
    Job,
    CronJob,
}

/// `sts`, `statefulset`, `statefulsets`, `StatefulSet`, `statefulsets.apps`, ...: the singular,
/// plural and short names of every supported kind, any case, with or without the API group.
fn parse_kind(kind: &str) -> Option<Kind> {
    let kind = kind.to_ascii_lowercase();
    let name = kind.split_once('.').map_or(kind.as_str(), |(k, _)| k);
    Some(match name {
        "po" | "pod" | "pods" => Kind::Pod,
        "deploy" | "deployment" | "deployments" => Kind::Deployment,
        "sts" | "statefulset" | "statefulsets" => Kind::StatefulSet,
        "ds" | "daemonset" | "daemonsets" => Kind::DaemonSet,
        "rs" | "replicaset" | "replicasets" => Kind::ReplicaSet,
        "job" | "jobs" => Kind::Job,
        "cj" | "cronjob" | "cronjobs" => Kind::CronJob,
        _ => return None,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error(
        "{0:?} is not KIND/NAME with KIND one of pod (po), deployment (deploy), statefulset (sts), daemonset (ds), replicaset (rs), job, cronjob (cj)"
    )]
    BadObject(String),
    #[error("{what} not found in namespace {namespace}")]
    NotFound { what: String, namespace: String },
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot reach the cluster: {0}")]
    Config(String),
}

pub async fn run(args: &ExplainArgs) -> Result<String, ExplainError> {
    let client = Client::try_default().await.map_err(|e| ExplainError::Config(e.to_string()))?;
    explain(&client, args).await
}

fn pod_from_template(t: Option<PodTemplateSpec>) -> Pod {
    let t = t.unwrap_or_default();
    Pod { metadata: t.metadata.unwrap_or_default(), spec: t.spec, status: None }
}

pub async fn explain(client: &Client, args: &ExplainArgs) -> Result<String, ExplainError> {
    let (kind, name) = args.object.split_once('/').ok_or_else(|| ExplainError::BadObject(args.object.clone()))?;
    let ns = args.namespace.as_str();
    let not_found = || ExplainError::NotFound { what: args.object.clone(), namespace: ns.to_string() };
    let workload_of = |reference: String, meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| Workload {
        reference,
        labels: meta.labels.clone().unwrap_or_default(),
        annotations: meta.annotations.clone().unwrap_or_default(),
    };
    let kind = parse_kind(kind).ok_or_else(|| ExplainError::BadObject(args.object.clone()))?;
    let (pod, workload) = match kind {
        Kind::Pod => {
            let pod = Api::<Pod>::namespaced(client.clone(), ns).get_opt(name).await?.ok_or_else(not_found)?;
            let owners = pod.metadata.owner_references.clone().unwrap_or_default();
            let workload = owner_workload(client, ns, &owners).await.unwrap_or(None);
            (pod, workload)
        }
        Kind::Deployment => {
            let d = Api::<Deployment>::namespaced(client.clone(), ns).get_opt(name).await?.ok_or_else(not_found)?;
            (
                pod_from_template(d.spec.map(|s| s.template)),
                Some(workload_of(format!("Deployment/{name}"), &d.metadata)),
            )
        }
        Kind::StatefulSet => {
            let s = Api::<StatefulSet>::namespaced(client.clone(), ns).get_opt(name).await?.ok_or_else(not_found)?;
            (
                pod_from_template(s.spec.map(|s| s.template)),
                Some(workload_of(format!("StatefulSet/{name}"), &s.metadata)),
            )
        }
        Kind::DaemonSet => {
            let d = Api::<DaemonSet>::namespaced(client.clone(), ns).get_opt(name).await?.ok_or_else(not_found)?;
            (pod_from_template(d.spec.map(|s| s.template)), Some(workload_of(format!("DaemonSet/{name}"), &d.metadata)))
        }
        Kind::ReplicaSet => {
            let r = Api::<ReplicaSet>::namespaced(client.clone(), ns).get_opt(name).await?.ok_or_else(not_found)?;
            (
                pod_from_template(r.spec.and_then(|s| s.template)),
                Some(workload_of(format!("ReplicaSet/{name}"), &r.metadata)),
            )
        }
        Kind::Job => {
            let j = Api::<Job>::namespaced(client.clone(), ns).get_opt(name).await?.ok_or_else(not_found)?;
            (pod_from_template(j.spec.map(|s| s.template)), Some(workload_of(format!("Job/{name}"), &j.metadata)))
        }
        Kind::CronJob => {
            let c = Api::<CronJob>::namespaced(client.clone(), ns).get_opt(name).await?.ok_or_else(not_found)?;
            let t = c.spec.job_template.spec.map(|s| s.template);
            (pod_from_template(t), Some(workload_of(format!("CronJob/{name}"), &c.metadata)))
        }
    };

    let mut out = String::new();
    let namespace = Api::<Namespace>::all(client.clone()).get_opt(ns).await?;
    let labelled = namespace
        .and_then(|n| n.metadata.labels)
        .is_some_and(|l| l.get(api::NAMESPACE_INJECTION_LABEL).map(String::as_str) == Some("enabled"));
    let _ = writeln!(out, "{} in namespace {ns}:", args.object);
    if labelled {
        let _ = writeln!(
            out,
            "  namespace {ns}: labeled {}=enabled: the webhook is called for its pods",
            api::NAMESPACE_INJECTION_LABEL
        );
    } else {
        let _ = writeln!(
            out,
            "  namespace {ns}: NOT labeled {}=enabled: the webhook is not called for its pods \
             (kubectl label namespace {ns} {}=enabled)",
            api::NAMESPACE_INJECTION_LABEL,
            api::NAMESPACE_INJECTION_LABEL
        );
    }
    if let Some(w) = &workload {
        let _ = writeln!(out, "  workload: {}", w.reference);
    }
    let config = InjectConfig { own_namespace: args.own_namespace.clone(), ..Default::default() };
    let route_tunnels = route_tunnels(client, &pod, ns, &args.resolve_config()).await;
    let decision =
        inject::decide(&pod, ns, workload.as_ref(), &route_tunnels, args.resolve.inject_route_backends, &config);
    let would = if labelled { "would be" } else { "would be (once the namespace is labeled)" };
    match &decision {
        Decision::Inject { because } => {
            let _ = writeln!(out, "  decision: {would} injected, because of the {because}");
            let mut warnings = Vec::new();
            let tunnels = pod::tunnels_for(&pod, workload.as_ref(), &route_tunnels, &mut warnings);
            describe_tunnels(&mut out, &TunnelsFile { tunnels });
            if api::switch(pod.metadata.annotations.as_ref().and_then(|a| a.get(api::STARTUP_GATE))) == Some(true) {
                let _ = writeln!(
                    out,
                    "  startup gate: the app's containers start once every tunnel is up ({}=true)",
                    api::STARTUP_GATE
                );
            }
            for w in warnings {
                let _ = writeln!(out, "  warning: {w}");
            }
        }
        Decision::Skip { reason: SkipReason::AlreadyInjected, .. } => {
            let _ = writeln!(out, "  decision: already injected (carries {})", api::SIDECAR_NAME);
            if let Some(file) = pod.metadata.annotations.as_ref().and_then(|a| a.get(api::TUNNELS)) {
                match TunnelsFile::parse(file) {
                    Ok(f) => describe_tunnels(&mut out, &f),
                    Err(e) => {
                        let _ = writeln!(out, "  warning: its {} annotation is invalid: {e}", api::TUNNELS);
                    }
                }
            }
            describe_sidecar(&mut out, &pod);
        }
        Decision::Skip { because, .. } => {
            let _ = writeln!(out, "  decision: not injected: {because}");
        }
    }
    Ok(out)
}

/// The tunnels the routes picotun serves give this pod, resolved as the webhook does (with
/// `config` from the same flags); none when the routes cannot be read within a few seconds.
async fn route_tunnels(
    client: &Client,
    pod: &k8s_openapi::api::core::v1::Pod,
    ns: &str,
    config: &ResolveConfig,
) -> Vec<crate::core::tunnel::TunnelSpec> {
    let stop = tokio_util::sync::CancellationToken::new();
    let index = crate::apiserver::index::Index::start(client.clone(), false, stop.clone()).await;
    let synced = tokio::time::timeout(std::time::Duration::from_secs(10), index.wait_synced()).await.is_ok();
    let tunnels = if synced { index.view().route_tunnels_for(config, pod, ns) } else { Vec::new() };
    stop.cancel();
    tunnels
}

/// How an injected pod's sidecar authenticates, whether it can report, and its startup gate.
fn describe_sidecar(out: &mut String, pod: &Pod) {
    let Some(sidecar) = crate::webhook::ticket::agent_container(pod) else { return };
    let env = |name: &str| sidecar.env.iter().flatten().find(|e| e.name == name).and_then(|e| e.value.clone());
    match env("PICOTUN_CERTIFICATE_URL") {
        Some(url) => {
            let _ = writeln!(out, "  auth: a short-lived SSH certificate for a key made in the pod, from {url}");
        }
        None => {
            let (secret, _) = api::key_secret(pod.metadata.annotations.as_ref());
            let _ = writeln!(out, "  auth: the account key from Secret {secret}, mounted into the sidecar");
        }
    }
    if pod.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(api::INJECTED)) {
        let _ = writeln!(
            out,
            "  ticket: carries {} (the webhook checks it on every report and certificate)",
            api::INJECTED
        );
    } else {
        let _ = writeln!(
            out,
            "  warning: no {} ticket: /report and /certificate refuse this sidecar (the webhook did not inject it); \
             recreate the pod with the webhook running",
            api::INJECTED
        );
    }
    for (container, volume) in inject::foreign_mounts(pod) {
        let _ =
            writeln!(out, "  warning: container {container} mounts {volume}: /report and /certificate refuse this pod");
    }
    if pod.spec.as_ref().and_then(|s| s.share_process_namespace) == Some(true) {
        let _ = writeln!(out, "  warning: shareProcessNamespace is on: /report and /certificate refuse this pod");
    }
    if sidecar.startup_probe.is_some() {
        let _ = writeln!(out, "  startup gate: on (the app's containers started once every tunnel was up)");
    }
}

fn describe_tunnels(out: &mut String, file: &TunnelsFile) {
    if file.tunnels.is_empty() {
        let _ =
            writeln!(out, "  tunnels: none yet (add a {} annotation, or a route the controller serves)", api::EXPOSE);
    }
    for t in &file.tunnels {
        let requested = crate::core::report::requested_label(t);
        let _ = writeln!(out, "  tunnel {}: {} {requested} -> port {}", t.name, t.kind, t.target_port);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// Defect 11: `explain sts/x` failed (the plural trimmed to "st"); every kubectl name works.
    #[test]
    fn every_kind_by_its_kubectl_names() {
        for (names, kind) in [
            (&["po", "pod", "pods", "Pod"][..], Kind::Pod),
            (&["deploy", "deployment", "deployments", "deployments.apps"], Kind::Deployment),
            (&["sts", "statefulset", "statefulsets", "StatefulSet"], Kind::StatefulSet),
            (&["ds", "daemonset", "daemonsets"], Kind::DaemonSet),
            (&["rs", "replicaset", "replicasets"], Kind::ReplicaSet),
            (&["job", "jobs", "jobs.batch"], Kind::Job),
            (&["cj", "cronjob", "cronjobs"], Kind::CronJob),
        ] {
            for name in names {
                assert_eq!(parse_kind(name), Some(kind), "{name}");
            }
        }
        for bad in ["st", "d", "r", "service", ""] {
            assert_eq!(parse_kind(bad), None, "{bad}");
        }
    }

    /// Defect 11: explain resolves routes with the flags the webhook resolves them with.
    #[test]
    fn explain_resolves_with_the_ingress_class_it_is_given() {
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            explain: ExplainArgs,
        }
        let cli = Cli::parse_from([
            "explain",
            "sts/web",
            "--ingress-class",
            "pico-team-a",
            "--gateway-controller-name",
            "example.com/gw",
            "--custom-domain-allow",
            "team-a=*.example.com",
        ]);
        let config = cli.explain.resolve_config();
        assert_eq!(config.ingress_class, "pico-team-a");
        assert_eq!(config.gateway_controller, "example.com/gw");
        assert_eq!(format!("{:?}", config.custom_domains), format!("{:?}", cli.explain.resolve.domains.policy()));
        let defaults = Cli::parse_from(["explain", "po/x"]).explain.resolve_config();
        assert_eq!(defaults.ingress_class, crate::resolve::ingress::INGRESS_CLASS);
    }
}
