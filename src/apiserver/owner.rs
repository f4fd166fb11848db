//! The workload a pod belongs to, looked up through its owner references (metadata only): the
//! webhook reads opt-in and expose annotations from it, `explain` prints it.

use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::Api;

use crate::core::pod::Workload;

/// The workload that owns a pod being created: ReplicaSet -> Deployment, StatefulSet,
/// DaemonSet, Job -> CronJob (as `explain` reads it: users annotate the CronJob). Metadata only, with a short timeout: admission must stay fast.
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
                match next_owner(&rs.metadata.owner_references, "Deployment") {
                    Some(d) => (
                        "Deployment",
                        Api::<Deployment>::namespaced(client.clone(), namespace).get_metadata(d).await?.metadata,
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
                let job = Api::<Job>::namespaced(client.clone(), namespace).get_metadata(&owner.name).await?;
                match next_owner(&job.metadata.owner_references, "CronJob") {
                    Some(c) => (
                        "CronJob",
                        Api::<CronJob>::namespaced(client.clone(), namespace).get_metadata(c).await?.metadata,
                    ),
                    None => ("Job", job.metadata),
                }
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

/// The name of the owner of `kind` one hop up (its controller first).
fn next_owner<'a>(owners: &'a Option<Vec<OwnerReference>>, kind: &str) -> Option<&'a str> {
    let owners = owners.as_deref().unwrap_or(&[]);
    let of_kind = |o: &&OwnerReference| o.kind == kind;
    owners
        .iter()
        .filter(of_kind)
        .find(|o| o.controller == Some(true))
        .or_else(|| owners.iter().find(of_kind))
        .map(|o| o.name.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(kind: &str, name: &str, controller: bool) -> OwnerReference {
        OwnerReference { kind: kind.into(), name: name.into(), controller: Some(controller), ..Default::default() }
    }

    #[test]
    fn the_next_hop_is_the_controlling_owner_of_that_kind() {
        let owners = Some(vec![owner("CronJob", "other", false), owner("CronJob", "nightly", true)]);
        assert_eq!(next_owner(&owners, "CronJob"), Some("nightly"));
        assert_eq!(next_owner(&Some(vec![owner("CronJob", "only", false)]), "CronJob"), Some("only"));
        assert_eq!(next_owner(&owners, "Deployment"), None);
        assert_eq!(next_owner(&None, "CronJob"), None);
    }
}
