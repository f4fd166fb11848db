//! Opt-in (`--restart-uninjected`): restart the workloads whose pods should carry the sidecar but
//! don't, so the webhook injects them -- one rollout at a time, each workload at most once per
//! cooldown, and only in namespaces labeled for injection (elsewhere a restart cannot help).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use kube::Resource;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::ApiResource;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use serde_json::{Value, json};
use tracing::{info, warn};

use super::Metrics;
use super::plan::Plan;
use crate::apiserver::index::View;
use crate::core::api;

/// Annotation on the pod template whose change makes the workload roll out.
pub const RESTARTED_AT: &str = "tunnels.pico.sh/restartedAt";
/// How long one rollout may take before the next workload's turn comes anyway.
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(600);
/// How often a rollout in flight is looked at. Workloads are not cached: the change that
/// finishes a rollout may be in the workload's status alone (minReadySeconds, maxSurge 0), with
/// no pod event after it to wake the controller.
pub const ROLLOUT_POLL: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct WorkloadRef {
    kind: &'static str,
    namespace: String,
    name: String,
}

impl WorkloadRef {
    fn resource(&self) -> ApiResource {
        match self.kind {
            "Deployment" => ApiResource::erase::<Deployment>(&()),
            "StatefulSet" => ApiResource::erase::<StatefulSet>(&()),
            _ => ApiResource::erase::<DaemonSet>(&()),
        }
    }

    fn api(&self, client: &kube::Client) -> Api<DynamicObject> {
        Api::namespaced_with(client.clone(), &self.namespace, &self.resource())
    }
}

pub struct Restarter {
    client: kube::Client,
    cooldown: Duration,
    last: HashMap<WorkloadRef, Instant>,
    in_flight: Option<(WorkloadRef, Instant)>,
}

/// True when a workload's rollout has finished (every replica updated and available).
pub fn rollout_done(kind: &str, o: &Value) -> bool {
    let s = &o["status"];
    let generation = o["metadata"]["generation"].as_i64().unwrap_or(0);
    let observed = s["observedGeneration"].as_i64().unwrap_or(0) >= generation;
    let n = |k: &str| s[k].as_i64().unwrap_or(0);
    observed
        && match kind {
            "Deployment" => n("updatedReplicas") == n("replicas") && n("unavailableReplicas") == 0,
            "StatefulSet" => n("updatedReplicas") == n("replicas"),
            _ => n("updatedNumberScheduled") == n("desiredNumberScheduled") && n("numberUnavailable") == 0,
        }
}

impl Restarter {
    pub fn new(client: kube::Client, cooldown: Duration) -> Self {
        Restarter { client, cooldown, last: HashMap::new(), in_flight: None }
    }

    /// True while a rollout started here has not been seen to finish (the loop must then come
    /// round every [`ROLLOUT_POLL`] to look again).
    pub fn waiting(&self) -> bool {
        self.in_flight.is_some()
    }

    pub async fn step(&mut self, plan: &Plan, view: &View, metrics: &Metrics) {
        if let Some((w, since)) = &self.in_flight {
            let done = match w.api(&self.client).get(&w.name).await {
                Ok(o) => rollout_done(w.kind, &serde_json::to_value(&o).unwrap_or_default()),
                Err(kube::Error::Api(s)) if s.code == 404 => true, // deleted: nothing rolls out
                Err(e) => {
                    // Not known to be finished: another rollout now could make two at once.
                    warn!(kind = w.kind, name = %w.name, error = %e, "cannot look at the rollout in flight");
                    false
                }
            };
            if !done && since.elapsed() < ROLLOUT_TIMEOUT {
                return;
            }
            self.in_flight = None;
        }
        let labeled = |ns: &str| {
            view.namespaces.iter().any(|n| {
                n.metadata.name.as_deref() == Some(ns)
                    && n.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(api::NAMESPACE_INJECTION_LABEL))
                        .map(String::as_str)
                        == Some("enabled")
            })
        };
        for (namespace, pod_name) in plan.missing_sidecars.keys() {
            if !labeled(namespace) {
                continue;
            }
            let Some(pod) = view.pods.iter().find(|p| {
                p.metadata.namespace.as_deref() == Some(namespace) && p.metadata.name.as_deref() == Some(pod_name)
            }) else {
                continue;
            };
            let Some(workload) =
                self.workload_of(namespace, pod.metadata.owner_references.as_deref().unwrap_or_default()).await
            else {
                continue;
            };
            if self.last.get(&workload).is_some_and(|t| t.elapsed() < self.cooldown) {
                continue;
            }
            self.last.insert(workload.clone(), Instant::now());
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            let patch = json!({"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: now}}}}});
            match workload.api(&self.client).patch(&workload.name, &PatchParams::default(), &Patch::Merge(&patch)).await
            {
                Ok(o) => {
                    info!(kind = workload.kind, namespace = %workload.namespace, name = %workload.name, "restarting so its pods get the sidecar");
                    metrics.restarts.inc();
                    let recorder = Recorder::new(
                        self.client.clone(),
                        Reporter { controller: "picotun-controller".into(), instance: None },
                    );
                    let event = Event {
                        type_: EventType::Normal,
                        reason: "RestartedForSidecar".into(),
                        note: Some(format!(
                            "pod {pod_name} backs a route but has no picotun sidecar; restarting so the webhook injects it"
                        )),
                        action: "Restart".into(),
                        secondary: None,
                    };
                    if recorder.publish(&event, &o.object_ref(&workload.resource())).await.is_err() {
                        metrics.error("event");
                    }
                    self.in_flight = Some((workload, Instant::now()));
                    return;
                }
                Err(e) => {
                    metrics.error("restart");
                    warn!(kind = workload.kind, name = %workload.name, error = %e, "cannot restart the workload");
                }
            }
        }
    }

    /// The Deployment, StatefulSet or DaemonSet that owns a pod (through its ReplicaSet).
    async fn workload_of(
        &self,
        namespace: &str,
        owners: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference],
    ) -> Option<WorkloadRef> {
        let owner = owners.iter().find(|o| o.controller == Some(true))?;
        let make = |kind: &'static str, name: &str| WorkloadRef {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        match owner.kind.as_str() {
            "StatefulSet" => Some(make("StatefulSet", &owner.name)),
            "DaemonSet" => Some(make("DaemonSet", &owner.name)),
            "ReplicaSet" => {
                let rs = Api::<ReplicaSet>::namespaced(self.client.clone(), namespace)
                    .get_metadata(&owner.name)
                    .await
                    .ok()?;
                let d = rs
                    .metadata
                    .owner_references?
                    .into_iter()
                    .find(|o| o.kind == "Deployment" && o.controller == Some(true))?;
                Some(make("Deployment", &d.name))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollouts_are_done_when_every_replica_is_updated_and_available() {
        let d = |generation: i64, obs: i64, updated: i64, unavailable: i64| json!({"metadata": {"generation": generation}, "status": {"observedGeneration": obs, "replicas": 3, "updatedReplicas": updated, "unavailableReplicas": unavailable}});
        assert!(rollout_done("Deployment", &d(2, 2, 3, 0)));
        assert!(!rollout_done("Deployment", &d(2, 1, 3, 0)), "the new generation is not observed yet");
        assert!(!rollout_done("Deployment", &d(2, 2, 1, 0)));
        assert!(!rollout_done("Deployment", &d(2, 2, 3, 1)));
    }
}
