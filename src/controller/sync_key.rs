//! Opt-in (`--sync-key-secret`): copy the tunnel key Secret from picotun's namespace into every
//! namespace labeled for injection, and keep the copies equal to it. Copies carry a managed-by
//! label; a Secret of that name the user made is never overwritten (a warning says so).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use std::sync::Mutex;
use tracing::{info, warn};

use super::Metrics;
use crate::api;
use crate::index::{ResolveConfig, View};

pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGER: &str = "picotun";
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
                "tunnels.pico.sh/copied-from".to_string(),
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
        let all: Api<Secret> = Api::all(self.client.clone());
        let existing = match all.list(&ListParams::default().fields(&format!("metadata.name={}", self.name))).await {
            Ok(l) => l.items,
            Err(e) => {
                metrics.error("key_sync");
                warn!(error = %e, "cannot list key Secret copies");
                return;
            }
        };
        let scope = view.scope(config);
        for ns in &view.namespaces {
            let Some(name) = ns.metadata.name.as_deref() else { continue };
            if scope.as_ref().is_some_and(|s| !s.contains(name)) {
                continue;
            }
            let labeled =
                ns.metadata.labels.as_ref().and_then(|l| l.get(api::NAMESPACE_INJECTION_LABEL)).map(String::as_str)
                    == Some("enabled");
            if !labeled || name == self.namespace || ns.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let want = copy_of(&source, name);
            let api: Api<Secret> = Api::namespaced(self.client.clone(), name);
            let result = match existing.iter().find(|s| s.metadata.namespace.as_deref() == Some(name)) {
                None => api
                    .create(&PostParams::default(), &want)
                    .await
                    .map(|_| info!(namespace = name, "copied the key Secret")),
                Some(have) => {
                    let ours = have.metadata.labels.as_ref().and_then(|l| l.get(MANAGED_BY)).map(String::as_str)
                        == Some(MANAGER);
                    if !ours {
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
