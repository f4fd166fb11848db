//! The ConfigMaps GatewayClass and Gateway parametersRefs name (server options,
//! resolve::options), read by name with `get` -- never listed or watched, so the controller
//! caches no one else's configuration and needs no `list` on ConfigMaps. Each is read again every
//! [`REFRESH`] while it is referenced; a change wakes the loop.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use tracing::warn;

use crate::resolve::options::ConfigMaps;

/// How often a referenced ConfigMap is read again (edits take effect within this).
pub const REFRESH: Duration = Duration::from_secs(10);

/// A ConfigMap's data as read (None: it does not exist or cannot be read), and when.
type Read = (Instant, Option<BTreeMap<String, String>>);

/// The ConfigMaps read so far, with when.
#[derive(Default)]
pub struct ParameterMaps {
    read: BTreeMap<(String, String), Read>,
}

impl ParameterMaps {
    /// Reads the `wanted` ConfigMaps not read within [`REFRESH`], forgets the others; true when
    /// anything differs from before (resolve again).
    pub async fn refresh(&mut self, client: &kube::Client, wanted: &BTreeSet<(String, String)>) -> bool {
        let mut changed = false;
        let before = self.read.len();
        self.read.retain(|k, _| wanted.contains(k));
        changed |= self.read.len() != before;
        for key in wanted {
            if self.read.get(key).is_some_and(|(at, _)| at.elapsed() < REFRESH) {
                continue;
            }
            let (ns, name) = key;
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
            let data = match tokio::time::timeout(Duration::from_secs(5), api.get_opt(name)).await {
                Ok(Ok(found)) => found.map(|c| c.data.unwrap_or_default()),
                Ok(Err(e)) => {
                    warn!(configmap = %format!("{ns}/{name}"), error = %e, "cannot read a parametersRef ConfigMap");
                    None
                }
                Err(_) => {
                    // Keep what was read before rather than dropping the options on a slow call.
                    if let Some((at, _)) = self.read.get_mut(key) {
                        *at = Instant::now();
                    }
                    continue;
                }
            };
            let old = self.read.insert(key.clone(), (Instant::now(), data.clone()));
            changed |= old.is_none_or(|(_, d)| d != data);
        }
        changed
    }

    /// What was read, for resolution.
    pub fn snapshot(&self) -> ConfigMaps {
        self.read.iter().map(|(k, (_, d))| (k.clone(), d.clone())).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.read.is_empty()
    }
}
