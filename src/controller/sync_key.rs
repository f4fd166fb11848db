//! Opt-in (`--sync-key-secret`): copy the tunnel key Secret from picotun's namespace into every
//! namespace labeled for injection, keep the copies equal to it, and delete a copy once its
//! namespace is no longer labeled (the account key must not stay readable where picotun is not
//! used). Copies carry a managed-by label; a Secret of that name the user made is never
//! overwritten or deleted.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams, Preconditions};
use std::sync::Mutex;
use tracing::{info, warn};

use super::Metrics;
use crate::apiserver::index::{ResolveConfig, View};
use crate::core::api;

pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGER: &str = "picotun";
/// Annotation on a copy naming its source (`namespace/name`).
pub const COPIED_FROM: &str = "tunnels.pico.sh/copied-from";
/// How often the copies are compared with the source at most (each pass would be too chatty).
pub const EVERY: Duration = Duration::from_secs(10);

pub struct KeySync {
    client: kube::Client,
    namespace: String,
    name: String,
    last: Mutex<Option<Instant>>,
}

/// The copy of `source` for `namespace`.
pub fn copy_of(source: &Secret, namespace: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: source.metadata.name.clone(),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(MANAGED_BY.to_string(), MANAGER.to_string())])),
            annotations: Some(BTreeMap::from([(
                COPIED_FROM.to_string(),
                format!(
                    "{}/{}",
                    source.metadata.namespace.as_deref().unwrap_or(""),
                    source.metadata.name.as_deref().unwrap_or("")
                ),
            )])),
            ..Default::default()
        },
        type_: source.type_.clone(),
        data: source.data.clone(),
        ..Default::default()
    }
}

/// True for a Secret picotun copied (its managed-by label), not one the user made.
pub fn is_copy(secret: &Secret) -> bool {
    secret.metadata.labels.as_ref().and_then(|l| l.get(MANAGED_BY)).map(String::as_str) == Some(MANAGER)
}

/// The namespaces whose copy should go: those holding a copy picotun made that are in scope but
/// no longer labeled for injection (or are gone from the cache). The source's own namespace is
/// never one of them.
pub fn stale_copies<'a>(
    copies: &'a [Secret],
    labeled: &std::collections::BTreeSet<&str>,
    in_scope: impl Fn(&str) -> bool,
    own_namespace: &str,
) -> Vec<&'a Secret> {
    copies
        .iter()
        .filter(|s| is_copy(s))
        .filter(|s| {
            let ns = s.metadata.namespace.as_deref().unwrap_or_default();
            ns != own_namespace && in_scope(ns) && !labeled.contains(ns)
        })
        .collect()
}

impl KeySync {
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> Self {
        KeySync { client, namespace: namespace.into(), name: name.into(), last: Mutex::new(None) }
    }

    pub async fn step(&self, view: &View, config: &ResolveConfig, metrics: &Metrics) {
        {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| t.elapsed() < EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        let source = match Api::<Secret>::namespaced(self.client.clone(), &self.namespace).get_opt(&self.name).await {
            Ok(Some(s)) => s,
            Ok(None) => {
                warn!(secret = %format!("{}/{}", self.namespace, self.name), "--sync-key-secret is on but the key Secret does not exist: create it (see deploy/README.md)");
                return;
            }
            Err(e) => {
                metrics.error("key_sync");
                warn!(error = %e, "cannot read the key Secret to copy");
                return;
            }
        };
        // Only the copies are read (by name and label): a Secret of that name the user made is
        // never fetched -- creating a copy over it fails with 409, and it is left alone.
        let all: Api<Secret> = Api::all(self.client.clone());
        let copies = ListParams::default()
            .fields(&format!("metadata.name={}", self.name))
            .labels(&format!("{MANAGED_BY}={MANAGER}"));
        let existing = match all.list(&copies).await {
            Ok(l) => l.items,
            Err(e) => {
                metrics.error("key_sync");
                warn!(error = %e, "cannot list key Secret copies");
                return;
            }
        };
        let scope = view.scope(config);
        let in_scope = |ns: &str| scope.as_ref().is_none_or(|s| s.contains(ns));
        let labeled: std::collections::BTreeSet<&str> = view
            .namespaces
            .iter()
            .filter(|ns| {
                ns.metadata.labels.as_ref().and_then(|l| l.get(api::NAMESPACE_INJECTION_LABEL)).map(String::as_str)
                    == Some("enabled")
            })
            .filter_map(|ns| ns.metadata.name.as_deref())
            .collect();
        // Copies in namespaces that left picotun go first: the account key must not stay there.
        for stale in stale_copies(&existing, &labeled, in_scope, &self.namespace) {
            let ns = stale.metadata.namespace.as_deref().unwrap_or_default();
            let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
            // Only the copy as listed: a Secret the user put there meanwhile is not touched.
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: stale.metadata.uid.clone(),
                    resource_version: stale.metadata.resource_version.clone(),
                }),
                ..Default::default()
            };
            match api.delete(&self.name, &params).await {
                Ok(_) => info!(namespace = ns, "deleted the key Secret copy: the namespace is no longer labeled"),
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                Err(e) => {
                    metrics.error("key_sync");
                    warn!(namespace = ns, error = %e, "cannot delete the key Secret copy");
                }
            }
        }
        for ns in &view.namespaces {
            let Some(name) = ns.metadata.name.as_deref() else { continue };
            if !in_scope(name) || !labeled.contains(name) {
                continue;
            }
            if name == self.namespace || ns.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let want = copy_of(&source, name);
            let api: Api<Secret> = Api::namespaced(self.client.clone(), name);
            let result = match existing.iter().find(|s| s.metadata.namespace.as_deref() == Some(name)) {
                None => match api.create(&PostParams::default(), &want).await {
                    Ok(_) => {
                        info!(namespace = name, "copied the key Secret");
                        Ok(())
                    }
                    // A Secret of that name the user made: theirs to keep.
                    Err(kube::Error::Api(s)) if s.code == 409 => continue,
                    Err(e) => Err(e),
                },
                Some(have) => {
                    if !is_copy(have) {
                        continue; // the user's own Secret: theirs to keep
                    }
                    if have.data == want.data && have.type_ == want.type_ {
                        continue;
                    }
                    let mut updated = want.clone();
                    updated.metadata.resource_version = have.metadata.resource_version.clone();
                    api.replace(&self.name, &PostParams::default(), &updated)
                        .await
                        .map(|_| info!(namespace = name, "updated the key Secret copy"))
                }
            };
            if let Err(e) = result {
                metrics.error("key_sync");
                warn!(namespace = name, error = %e, "cannot copy the key Secret");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn secret(ns: &str, managed: bool) -> Secret {
        let labels = if managed { json!({MANAGED_BY: MANAGER}) } else { json!({"owner": "user"}) };
        serde_json::from_value(json!({"metadata": {"name": "picotun-ssh-key", "namespace": ns, "labels": labels}}))
            .unwrap()
    }

    #[test]
    fn only_copies_in_unlabeled_namespaces_of_our_scope_are_stale() {
        let all = [
            secret("still-labeled", true),
            secret("unlabeled", true),
            secret("users-own", false),
            secret("other-controller", true),
            secret("pico-sh-system", true),
        ];
        let labeled = std::collections::BTreeSet::from(["still-labeled"]);
        let stale = stale_copies(&all, &labeled, |ns| ns != "other-controller", "pico-sh-system");
        let names: Vec<&str> = stale.iter().filter_map(|s| s.metadata.namespace.as_deref()).collect();
        assert_eq!(names, ["unlabeled"]);
    }
}
