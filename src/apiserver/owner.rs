//! The workload a pod belongs to, looked up through its owner references (metadata only): the
//! webhook reads opt-in and expose annotations from it, `explain` prints it.

use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::Api;

use crate::core::pod::Workload;

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
