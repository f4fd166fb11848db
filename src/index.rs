//! The index: reflector caches of everything resolution reads, shared in shape by the controller
//! (which also caches Pods) and the webhook (which resolves the one pod being created).
//!
//! Every watch event wakes whoever waits on [`Index::changed`]; resolution is level-triggered
//! over the whole cache, so a missed or coalesced event costs nothing but a little latency.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::StreamExt;
use gateway_api::apis::experimental::{
    gatewayclasses::GatewayClass, gateways::Gateway, httproutes::HttpRoute, referencegrants::ReferenceGrant,
    tcproutes::TcpRoute,
};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{Api, DynamicObject};
use kube::core::{ApiResource, Resource};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::resolve::cluster::{ClusterResolution, Inputs, resolve_all};
use crate::resolve::gateway::{self, GatewayModel, RouteModel};
use crate::resolve::{PodKey, Snapshot};
use crate::tunnel::TunnelSpec;

/// What resolution needs to know about picotun's own names.
#[derive(Clone, Debug)]
pub struct ResolveConfig {
    pub ingress_class: String,
    pub gateway_controller: String,
    /// Only namespaces whose labels include all of these are served (empty: every namespace).
    /// Lets several controllers share a cluster, each with its own namespaces.
    pub namespace_selector: BTreeMap<String, String>,
}

impl Default for ResolveConfig {
    fn default() -> Self {
        ResolveConfig {
            ingress_class: crate::resolve::ingress::INGRESS_CLASS.into(),
            gateway_controller: gateway::GATEWAY_CONTROLLER.into(),
            namespace_selector: BTreeMap::new(),
        }
    }
}

/// The Gateway API kinds picotun reads, as dynamic objects: resolution reads their JSON, so the
/// index keeps working across Gateway API versions whose generated Rust types differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum GatewayKind {
    GatewayClass,
    Gateway,
    HTTPRoute,
    TCPRoute,
    ReferenceGrant,
}

impl GatewayKind {
    pub const ALL: [GatewayKind; 5] = [
        GatewayKind::GatewayClass,
        GatewayKind::Gateway,
        GatewayKind::HTTPRoute,
        GatewayKind::TCPRoute,
        GatewayKind::ReferenceGrant,
    ];

    pub fn api_resource(self) -> ApiResource {
        match self {
            GatewayKind::GatewayClass => ApiResource::erase::<GatewayClass>(&()),
            GatewayKind::Gateway => ApiResource::erase::<Gateway>(&()),
            GatewayKind::HTTPRoute => ApiResource::erase::<HttpRoute>(&()),
            GatewayKind::TCPRoute => ApiResource::erase::<TcpRoute>(&()),
            GatewayKind::ReferenceGrant => ApiResource::erase::<ReferenceGrant>(&()),
        }
    }
}

/// Reflector caches, each filled by a watch that retries with backoff.
#[derive(Clone)]
pub struct Index {
    pub ingresses: Store<Ingress>,
    pub services: Store<Service>,
    pub namespaces: Store<Namespace>,
    /// Only the controller caches Pods; the webhook resolves the pod it is given.
    pub pods: Option<Store<Pod>>,
    /// Only the kinds whose CRDs are installed.
    pub gateway: BTreeMap<GatewayKind, Store<DynamicObject>>,
    changed: Arc<Notify>,
    synced: Arc<AtomicUsize>,
    watches: usize,
}

fn watch<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    changed: Arc<Notify>,
    shutdown: CancellationToken,
    what: String,
) where
    K: Resource + Clone + serde::de::DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let stream = watcher(api, watcher::Config::default().any_semantic())
        .default_backoff()
        // managedFields are most of an object's size and resolution never reads them.
        .modify(|o| o.meta_mut().managed_fields = None)
        .reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            tokio::select! {
                item = stream.next() => match item {
                    Some(Ok(_)) => changed.notify_one(),
                    Some(Err(e)) => warn!(watch = %what, error = %e, "watch failed; retrying"),
                    None => break,
                },
                _ = shutdown.cancelled() => break,
            }
        }
    });
}

fn watch_dynamic(
    api: Api<DynamicObject>,
    resource: ApiResource,
    changed: Arc<Notify>,
    shutdown: CancellationToken,
) -> Store<DynamicObject> {
    let what = resource.kind.clone();
    let writer = reflector::store::Writer::new(resource);
    let reader = writer.as_reader();
    watch(api, writer, changed, shutdown, what);
    reader
}

impl Index {
    /// Starts the watches. Gateway API kinds whose CRDs are not installed are skipped with a
    /// warning (Ingress still works); `with_pods` adds a Pod cache (the controller's).
    pub async fn start(client: kube::Client, with_pods: bool, shutdown: CancellationToken) -> Index {
        let changed = Arc::new(Notify::new());
        let mut watches = 3;
        let (ingresses, w) = reflector::store();
        watch(Api::<Ingress>::all(client.clone()), w, changed.clone(), shutdown.clone(), "Ingress".into());
        let (services, w) = reflector::store();
        watch(Api::<Service>::all(client.clone()), w, changed.clone(), shutdown.clone(), "Service".into());
        let (namespaces, w) = reflector::store();
        watch(Api::<Namespace>::all(client.clone()), w, changed.clone(), shutdown.clone(), "Namespace".into());
        let pods = if with_pods {
            watches += 1;
            let (pods, w) = reflector::store();
            watch(Api::<Pod>::all(client.clone()), w, changed.clone(), shutdown.clone(), "Pod".into());
            Some(pods)
        } else {
            None
        };
        let installed = installed_gateway_kinds(&client).await;
        let mut gateway = BTreeMap::new();
        for kind in GatewayKind::ALL {
            let resource = kind.api_resource();
            if !installed.contains(&kind) {
                warn!(
                    kind = %resource.kind, version = %resource.api_version,
                    "Gateway API CRD not installed: {} objects are not served (install the Gateway API experimental channel CRDs and restart)",
                    resource.kind
                );
                continue;
            }
            watches += 1;
            let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
            gateway.insert(kind, watch_dynamic(api, resource, changed.clone(), shutdown.clone()));
        }
        let index = Index { ingresses, services, namespaces, pods, gateway, changed, synced: Arc::default(), watches };
        index.count_synced();
        index
    }

    fn count_synced(&self) {
        let mut waits: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>> = vec![
            wait_ready(self.ingresses.clone()),
            wait_ready(self.services.clone()),
            wait_ready(self.namespaces.clone()),
        ];
        if let Some(p) = &self.pods {
            waits.push(wait_ready(p.clone()));
        }
        for s in self.gateway.values() {
            waits.push(wait_ready(s.clone()));
        }
        for w in waits {
            let synced = self.synced.clone();
            let changed = self.changed.clone();
            tokio::spawn(async move {
                w.await;
                synced.fetch_add(1, Ordering::SeqCst);
                changed.notify_one();
            });
        }
    }

    /// True once every watch has listed its objects (the caches are complete).
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst) >= self.watches
    }

    pub async fn wait_synced(&self) {
        while !self.is_synced() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        info!(watches = self.watches, "caches synced");
    }

    /// Resolves when something in a cache changed since the last call.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// A consistent copy of the caches to resolve over.
    pub fn view(&self) -> View {
        let dynamic = |k: GatewayKind| self.gateway.get(&k).map(|s| s.state()).unwrap_or_default();
        View {
            ingresses: self.ingresses.state(),
            services: self.services.state(),
            namespaces: self.namespaces.state(),
            pods: self.pods.as_ref().map(|p| p.state()).unwrap_or_default(),
            gateway_classes: dynamic(GatewayKind::GatewayClass),
            gateways: dynamic(GatewayKind::Gateway),
            http_routes: dynamic(GatewayKind::HTTPRoute),
            tcp_routes: dynamic(GatewayKind::TCPRoute),
            grants: dynamic(GatewayKind::ReferenceGrant),
        }
    }
}

fn wait_ready<K>(store: Store<K>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
where
    K: kube::runtime::reflector::Lookup + Clone + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    Box::pin(async move {
        let _ = store.wait_until_ready().await;
    })
}

async fn installed_gateway_kinds(client: &kube::Client) -> BTreeSet<GatewayKind> {
    let mut out = BTreeSet::new();
    for kind in GatewayKind::ALL {
        let ar = kind.api_resource();
        match client.list_api_group_resources(&ar.api_version).await {
            Ok(list) if list.resources.iter().any(|r| r.kind == ar.kind) => {
                out.insert(kind);
            }
            Ok(_) => {}
            Err(e) => warn!(group = %ar.api_version, error = %e, "cannot discover the Gateway API"),
        }
    }
    out
}

/// A copy of the caches, taken at one moment.
#[derive(Default)]
pub struct View {
    pub ingresses: Vec<Arc<Ingress>>,
    pub services: Vec<Arc<Service>>,
    pub namespaces: Vec<Arc<Namespace>>,
    pub pods: Vec<Arc<Pod>>,
    pub gateway_classes: Vec<Arc<DynamicObject>>,
    pub gateways: Vec<Arc<DynamicObject>>,
    pub http_routes: Vec<Arc<DynamicObject>>,
    pub tcp_routes: Vec<Arc<DynamicObject>>,
    pub grants: Vec<Arc<DynamicObject>>,
}

/// A dynamic object as the JSON document the apiserver serves.
pub fn json_of(o: &DynamicObject) -> Value {
    serde_json::to_value(o).unwrap_or(Value::Null)
}

impl View {
    /// Names of the GatewayClasses picotun serves.
    pub fn our_gateway_classes(&self, config: &ResolveConfig) -> BTreeSet<String> {
        self.gateway_classes
            .iter()
            .filter(|c| c.data["spec"]["controllerName"].as_str() == Some(config.gateway_controller.as_str()))
            .filter_map(|c| c.metadata.name.clone())
            .collect()
    }

    /// The namespaces the controller serves; None for all of them.
    pub fn scope(&self, config: &ResolveConfig) -> Option<BTreeSet<String>> {
        if config.namespace_selector.is_empty() {
            return None;
        }
        Some(
            self.namespaces
                .iter()
                .filter(|n| {
                    let labels = n.metadata.labels.as_ref();
                    config.namespace_selector.iter().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
                })
                .filter_map(|n| n.metadata.name.clone())
                .collect(),
        )
    }

    fn inputs<'a>(
        &'a self,
        config: &'a ResolveConfig,
        pods: Vec<&'a Pod>,
        namespace_filter: Option<&str>,
    ) -> Inputs<'a> {
        let scope = self.scope(config);
        let in_scope = |ns: Option<&str>| {
            namespace_filter.is_none_or(|f| ns == Some(f))
                && scope.as_ref().is_none_or(|s| ns.is_some_and(|ns| s.contains(ns)))
        };
        let routes = |kind: &str, objs: &[Arc<DynamicObject>]| -> Vec<RouteModel> {
            objs.iter()
                .filter(|o| {
                    scope.as_ref().is_none_or(|s| o.metadata.namespace.as_ref().is_some_and(|ns| s.contains(ns)))
                })
                .map(|o| gateway::route_from_json(kind, &json_of(o)))
                // A route may live elsewhere and reach this namespace through a ReferenceGrant.
                .filter(|r| namespace_filter.is_none_or(|f| r.rules.iter().flatten().any(|b| b.namespace == f)))
                .collect()
        };
        let mut all_routes = routes("HTTPRoute", &self.http_routes);
        all_routes.extend(routes("TCPRoute", &self.tcp_routes));
        Inputs {
            ingress_class: &config.ingress_class,
            ingresses: self
                .ingresses
                .iter()
                .map(|i| i.as_ref())
                .filter(|i| in_scope(i.metadata.namespace.as_deref()))
                .collect(),
            our_gateway_classes: self.our_gateway_classes(config),
            gateways: self
                .gateways
                .iter()
                .map(|g| gateway::gateway_from_json(&json_of(g)))
                .collect::<Vec<GatewayModel>>(),
            routes: all_routes,
            grants: self.grants.iter().map(|g| gateway::grant_from_json(&json_of(g))).collect(),
            namespace_labels: self
                .namespaces
                .iter()
                .filter_map(|n| Some((n.metadata.name.clone()?, n.metadata.labels.clone().unwrap_or_default())))
                .collect(),
            snapshot: Snapshot::new(
                self.services.iter().map(|s| s.as_ref()).filter(|s| in_scope(s.metadata.namespace.as_deref())),
                pods.into_iter().filter(|p| in_scope(p.metadata.namespace.as_deref())),
            ),
        }
    }

    /// Resolves the whole cluster (the controller).
    pub fn resolve(&self, config: &ResolveConfig) -> ClusterResolution {
        resolve_all(&self.inputs(config, self.pods.iter().map(|p| p.as_ref()).collect(), None))
    }

    /// The tunnels routes give a pod that is being created (the webhook): the pod is resolved
    /// alone, against the routes and Services that can reach its namespace.
    pub fn route_tunnels_for(&self, config: &ResolveConfig, pod: &Pod, namespace: &str) -> Vec<TunnelSpec> {
        // A pod being created may have only a generateName; give it a name resolution can key on.
        let mut pod = pod.clone();
        pod.metadata.namespace = Some(namespace.to_string());
        let name = pod.metadata.name.clone().unwrap_or_else(|| "picotun-pod-being-created".into());
        pod.metadata.name = Some(name.clone());
        let resolution = resolve_all(&self.inputs(config, vec![&pod], Some(namespace)));
        let key: PodKey = (namespace.to_string(), name);
        resolution.route_tunnels.get(&key).cloned().unwrap_or_default()
    }
}
