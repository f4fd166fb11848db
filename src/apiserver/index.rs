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
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::Api;
use kube::core::{ApiResource, PartialObjectMeta, Resource};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::core::tunnel::TunnelSpec;
use crate::resolve::cluster::{ClusterResolution, Inputs, resolve_all, resolve_with};
use crate::resolve::gateway::{self, GatewayModel, RouteModel};
use crate::resolve::ownership::{DomainPolicy, Ownership};
use crate::resolve::{PodKey, Snapshot};

/// What resolution needs to know about picotun's own names.
#[derive(Clone, Debug)]
pub struct ResolveConfig {
    pub ingress_class: String,
    pub gateway_controller: String,
    /// Only namespaces whose labels include all of these are served (empty: every namespace).
    /// Lets several controllers share a cluster, each with its own namespaces.
    pub namespace_selector: BTreeMap<String, String>,
    /// Which namespaces may use which custom domains (`--custom-domain-allow`; empty: all).
    pub custom_domains: DomainPolicy,
}

impl Default for ResolveConfig {
    fn default() -> Self {
        ResolveConfig {
            ingress_class: crate::resolve::ingress::INGRESS_CLASS.into(),
            gateway_controller: gateway::GATEWAY_CONTROLLER.into(),
            namespace_selector: BTreeMap::new(),
            custom_domains: DomainPolicy::default(),
        }
    }
}

/// The Gateway API kinds picotun reads (typed, from the `gateway-api` crate's experimental
/// channel, a superset of the standard one), and where their CRDs are discovered.
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
    /// Without the Pod cache, the pods' metadata (name, creation time, expose annotation): who
    /// owns which name depends on the expose annotations of every namespace.
    pub pod_metadata: Option<Store<PartialObjectMeta<Pod>>>,
    /// Only the kinds whose CRDs are installed.
    pub gateway: GatewayStores,
    changed: Arc<Notify>,
    synced: Arc<AtomicUsize>,
    watches: usize,
}

/// The Gateway API caches, each present only when its CRD is installed.
#[derive(Clone, Default)]
pub struct GatewayStores {
    pub classes: Option<Store<GatewayClass>>,
    pub gateways: Option<Store<Gateway>>,
    pub http_routes: Option<Store<HttpRoute>>,
    pub tcp_routes: Option<Store<TcpRoute>>,
    pub grants: Option<Store<ReferenceGrant>>,
}

impl GatewayStores {
    fn count(&self) -> usize {
        [
            self.classes.is_some(),
            self.gateways.is_some(),
            self.http_routes.is_some(),
            self.tcp_routes.is_some(),
            self.grants.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count()
    }
}

/// Whether a change in a namespace can matter to resolution: with a namespace selector (a
/// controller sharing the cluster), changes to namespaced objects outside the selected namespaces
/// do not wake the loop -- they are filtered out of every pass anyway.
#[derive(Clone)]
struct Relevance {
    selector: BTreeMap<String, String>,
    namespaces: Store<Namespace>,
}

impl Relevance {
    fn matters(&self, namespace: Option<&str>) -> bool {
        let Some(ns) = namespace.filter(|_| !self.selector.is_empty()) else { return true };
        // A namespace not cached yet might be in scope: wake.
        self.namespaces.get(&ObjectRef::new(ns)).is_none_or(|n| {
            let labels = n.metadata.labels.as_ref();
            self.selector.iter().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
        })
    }
}

fn watch<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    changed: Arc<Notify>,
    shutdown: CancellationToken,
    what: String,
    relevance: Option<Relevance>,
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
                    Some(Ok(event)) => {
                        let wake = match (&relevance, &event) {
                            (
                                Some(r),
                                watcher::Event::Apply(o) | watcher::Event::Delete(o) | watcher::Event::InitApply(o),
                            ) => r.matters(o.meta().namespace.as_deref()),
                            _ => true,
                        };
                        if wake {
                            changed.notify_one();
                        }
                    }
                    Some(Err(e)) => warn!(watch = %what, error = %e, "watch failed; retrying"),
                    None => break,
                },
                _ = shutdown.cancelled() => break,
            }
        }
    });
}

/// The metadata of every pod, trimmed to what name ownership reads: namespace, name, creation
/// and deletion times, the expose annotation.
fn watch_pod_metadata(
    client: kube::Client,
    changed: Arc<Notify>,
    shutdown: CancellationToken,
) -> Store<PartialObjectMeta<Pod>> {
    let (reader, writer) = reflector::store();
    let stream = watcher(Api::<PartialObjectMeta<Pod>>::all(client), watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(|o| {
            let m = &mut o.metadata;
            m.managed_fields = None;
            m.labels = None;
            m.owner_references = None;
            m.finalizers = None;
            m.annotations = m
                .annotations
                .take()
                .map(|a| a.into_iter().filter(|(k, _)| k == crate::core::api::EXPOSE).collect::<BTreeMap<_, _>>())
                .filter(|a| !a.is_empty());
        })
        .reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            tokio::select! {
                item = stream.next() => match item {
                    Some(Ok(_)) => changed.notify_one(),
                    Some(Err(e)) => warn!(watch = "Pod metadata", error = %e, "watch failed; retrying"),
                    None => break,
                },
                _ = shutdown.cancelled() => break,
            }
        }
    });
    reader
}

impl Index {
    /// Starts the watches. Gateway API kinds whose CRDs are not installed are skipped with a
    /// warning (Ingress still works); `with_pods` adds a Pod cache (the controller's), otherwise
    /// a cache of the pods' metadata is kept for name ownership (the webhook's).
    pub async fn start(client: kube::Client, with_pods: bool, shutdown: CancellationToken) -> Index {
        Self::start_scoped(client, with_pods, BTreeMap::new(), shutdown).await
    }

    /// As [`Index::start`], for a controller serving only the namespaces labeled with all of
    /// `selector`: changes elsewhere to Ingresses, Services, Pods and routes (which resolution
    /// filters out) do not wake [`Index::changed`]. Namespaces, classes, Gateways and
    /// ReferenceGrants always do (in-scope routes may use those of other namespaces).
    pub async fn start_scoped(
        client: kube::Client,
        with_pods: bool,
        selector: BTreeMap<String, String>,
        shutdown: CancellationToken,
    ) -> Index {
        let changed = Arc::new(Notify::new());
        let mut watches = 3;
        let (namespaces, w) = reflector::store();
        watch(Api::<Namespace>::all(client.clone()), w, changed.clone(), shutdown.clone(), "Namespace".into(), None);
        let scoped = Some(Relevance { selector, namespaces: namespaces.clone() });
        let (ingresses, w) = reflector::store();
        let (c, s) = (changed.clone(), shutdown.clone());
        watch(Api::<Ingress>::all(client.clone()), w, c, s, "Ingress".into(), scoped.clone());
        let (services, w) = reflector::store();
        let (c, s) = (changed.clone(), shutdown.clone());
        watch(Api::<Service>::all(client.clone()), w, c, s, "Service".into(), scoped.clone());
        let pods = if with_pods {
            watches += 1;
            let (pods, w) = reflector::store();
            watch(Api::<Pod>::all(client.clone()), w, changed.clone(), shutdown.clone(), "Pod".into(), scoped.clone());
            Some(pods)
        } else {
            None
        };
        let pod_metadata = if with_pods {
            None
        } else {
            watches += 1;
            Some(watch_pod_metadata(client.clone(), changed.clone(), shutdown.clone()))
        };
        let installed = installed_gateway_kinds(&client).await;
        for kind in GatewayKind::ALL {
            if !installed.contains(&kind) {
                let resource = kind.api_resource();
                warn!(
                    kind = %resource.kind, version = %resource.api_version,
                    "Gateway API CRD not installed: {} objects are not served (install the Gateway API experimental channel CRDs and restart)",
                    resource.kind
                );
            }
        }
        let mut gateway = GatewayStores::default();
        // Routes are namespaced objects users edit: only those in scope wake the loop. Classes,
        // Gateways and grants always do (in-scope routes may use those of other namespaces).
        fn typed<K>(
            client: &kube::Client,
            changed: &Arc<Notify>,
            shutdown: &CancellationToken,
            relevance: Option<Relevance>,
        ) -> Store<K>
        where
            K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + Debug + Send + Sync + 'static,
        {
            let (store, w) = reflector::store();
            let what = K::kind(&()).to_string();
            watch(Api::<K>::all(client.clone()), w, changed.clone(), shutdown.clone(), what, relevance);
            store
        }
        let (c, s) = (&changed, &shutdown);
        if installed.contains(&GatewayKind::GatewayClass) {
            gateway.classes = Some(typed(&client, c, s, None));
        }
        if installed.contains(&GatewayKind::Gateway) {
            gateway.gateways = Some(typed(&client, c, s, None));
        }
        if installed.contains(&GatewayKind::HTTPRoute) {
            gateway.http_routes = Some(typed(&client, c, s, scoped.clone()));
        }
        if installed.contains(&GatewayKind::TCPRoute) {
            gateway.tcp_routes = Some(typed(&client, c, s, scoped.clone()));
        }
        if installed.contains(&GatewayKind::ReferenceGrant) {
            gateway.grants = Some(typed(&client, c, s, None));
        }
        watches += gateway.count();
        let index = Index {
            ingresses,
            services,
            namespaces,
            pods,
            pod_metadata,
            gateway,
            changed,
            synced: Arc::default(),
            watches,
        };
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
        if let Some(p) = &self.pod_metadata {
            waits.push(wait_ready(p.clone()));
        }
        let g = &self.gateway;
        waits.extend(g.classes.clone().map(wait_ready));
        waits.extend(g.gateways.clone().map(wait_ready));
        waits.extend(g.http_routes.clone().map(wait_ready));
        waits.extend(g.tcp_routes.clone().map(wait_ready));
        waits.extend(g.grants.clone().map(wait_ready));
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
        let g = &self.gateway;
        View {
            ingresses: self.ingresses.state(),
            services: self.services.state(),
            namespaces: self.namespaces.state(),
            pods: self.pods.as_ref().map(|p| p.state()).unwrap_or_default(),
            pod_metadata: self.pod_metadata.as_ref().map(|p| p.state()).unwrap_or_default(),
            gateway_classes: g.classes.as_ref().map(|s| s.state()).unwrap_or_default(),
            gateways: g.gateways.as_ref().map(|s| s.state()).unwrap_or_default(),
            http_routes: g.http_routes.as_ref().map(|s| s.state()).unwrap_or_default(),
            tcp_routes: g.tcp_routes.as_ref().map(|s| s.state()).unwrap_or_default(),
            grants: g.grants.as_ref().map(|s| s.state()).unwrap_or_default(),
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
    /// The webhook's stand-in for `pods`: their metadata, for name ownership.
    pub pod_metadata: Vec<Arc<PartialObjectMeta<Pod>>>,
    pub gateway_classes: Vec<Arc<GatewayClass>>,
    pub gateways: Vec<Arc<Gateway>>,
    pub http_routes: Vec<Arc<HttpRoute>>,
    pub tcp_routes: Vec<Arc<TcpRoute>>,
    pub grants: Vec<Arc<ReferenceGrant>>,
}

/// An object as the JSON document the apiserver serves.
pub fn json_of(o: &impl serde::Serialize) -> Value {
    serde_json::to_value(o).unwrap_or(Value::Null)
}

impl View {
    /// Names of the GatewayClasses picotun serves.
    pub fn our_gateway_classes(&self, config: &ResolveConfig) -> BTreeSet<String> {
        self.gateway_classes
            .iter()
            .filter(|c| c.spec.controller_name == config.gateway_controller)
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
        expose_pods: Vec<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
    ) -> Inputs<'a> {
        let scope = self.scope(config);
        let in_scope = |ns: Option<&str>| {
            namespace_filter.is_none_or(|f| ns == Some(f))
                && scope.as_ref().is_none_or(|s| ns.is_some_and(|ns| s.contains(ns)))
        };
        let in_route_scope =
            |meta: &ObjectMeta| scope.as_ref().is_none_or(|s| meta.namespace.as_ref().is_some_and(|ns| s.contains(ns)));
        // A route may live elsewhere and reach this namespace through a ReferenceGrant.
        let reaches =
            |r: &RouteModel| namespace_filter.is_none_or(|f| r.rules.iter().flatten().any(|b| b.namespace == f));
        let mut all_routes: Vec<RouteModel> = self
            .http_routes
            .iter()
            .filter(|r| in_route_scope(&r.metadata))
            .map(|r| gateway::http_route_model(r))
            .filter(reaches)
            .collect();
        all_routes.extend(
            self.tcp_routes
                .iter()
                .filter(|r| in_route_scope(&r.metadata))
                .map(|r| gateway::tcp_route_model(r))
                .filter(reaches),
        );
        Inputs {
            ingress_class: &config.ingress_class,
            ingresses: self
                .ingresses
                .iter()
                .map(|i| i.as_ref())
                .filter(|i| in_scope(i.metadata.namespace.as_deref()))
                .collect(),
            our_gateway_classes: self.our_gateway_classes(config),
            gateways: self.gateways.iter().map(|g| gateway::gateway_model(g)).collect::<Vec<GatewayModel>>(),
            routes: all_routes,
            grants: self.grants.iter().map(|g| gateway::grant_model(g)).collect(),
            namespace_labels: self
                .namespaces
                .iter()
                .filter_map(|n| Some((n.metadata.name.clone()?, n.metadata.labels.clone().unwrap_or_default())))
                .collect(),
            snapshot: Snapshot::new(
                self.services.iter().map(|s| s.as_ref()).filter(|s| in_scope(s.metadata.namespace.as_deref())),
                pods.into_iter().filter(|p| in_scope(p.metadata.namespace.as_deref())),
            ),
            expose_pods: expose_pods
                .into_iter()
                .filter(|m| scope.as_ref().is_none_or(|s| m.namespace.as_ref().is_some_and(|ns| s.contains(ns))))
                .collect(),
            domains: &config.custom_domains,
        }
    }

    /// The metadata of every pod known (the controller's Pod cache, or the webhook's metadata
    /// cache): whose expose annotations ask for which names.
    fn pod_metas(&self) -> impl Iterator<Item = &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta> {
        self.pods.iter().map(|p| &p.metadata).chain(self.pod_metadata.iter().map(|m| &m.metadata))
    }

    /// Resolves the whole cluster (the controller).
    pub fn resolve(&self, config: &ResolveConfig) -> ClusterResolution {
        resolve_all(&self.inputs(
            config,
            self.pods.iter().map(|p| p.as_ref()).collect(),
            None,
            self.pod_metas().collect(),
        ))
    }

    /// A pod being created may have only a generateName: give it a name resolution can key on.
    fn pending(pod: &Pod, namespace: &str) -> Pod {
        let mut pod = pod.clone();
        pod.metadata.namespace = Some(namespace.to_string());
        if pod.metadata.name.is_none() {
            pod.metadata.name = Some("picotun-pod-being-created".into());
        }
        pod
    }

    /// Who owns every name across the cluster, with `pod` (being created in `namespace`) asking
    /// too: the same table the controller resolves with. The webhook keeps the expose tunnels
    /// it injects to those its namespace owns (`Ownership::keep` with `Claimant::expose`).
    pub fn ownership_for(&self, config: &ResolveConfig, pod: &Pod, namespace: &str) -> Ownership {
        let pending = Self::pending(pod, namespace);
        let metas = self.pod_metas().chain(std::iter::once(&pending.metadata)).collect();
        resolve_all(&self.inputs(config, Vec::new(), None, metas)).ownership
    }

    /// The tunnels routes give a pod that is being created (the webhook): the pod is resolved
    /// alone, against the routes and Services that can reach its namespace, and keeps only the
    /// names its routes own across the whole cluster.
    pub fn route_tunnels_for(&self, config: &ResolveConfig, pod: &Pod, namespace: &str) -> Vec<TunnelSpec> {
        self.admission_for(config, pod, namespace).0
    }

    /// [`View::route_tunnels_for`] and the owners it kept them by (`ownership_for`), resolved
    /// once: the webhook keeps the pod's own expose tunnels by the same table.
    pub fn admission_for(&self, config: &ResolveConfig, pod: &Pod, namespace: &str) -> (Vec<TunnelSpec>, Ownership) {
        let owners = self.ownership_for(config, pod, namespace);
        let pending = Self::pending(pod, namespace);
        let mut resolution =
            resolve_with(&self.inputs(config, vec![&pending], Some(namespace), Vec::new()), Some(owners));
        let key: PodKey = (namespace.to_string(), pending.metadata.name.clone().unwrap_or_default());
        (resolution.route_tunnels.remove(&key).unwrap_or_default(), resolution.ownership)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ingress(ns: &str, created: &str, host: &str) -> Arc<Ingress> {
        Arc::new(
            serde_json::from_value(json!({"metadata": {"name": "web", "namespace": ns, "creationTimestamp": created},
                "spec": {"ingressClassName": "pico-tunnel", "rules": [{"host": host, "http": {"paths": [
                    {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}]}}))
            .unwrap(),
        )
    }

    fn service(ns: &str) -> Arc<Service> {
        Arc::new(
            serde_json::from_value(json!({"metadata": {"name": "web", "namespace": ns},
                "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}))
            .unwrap(),
        )
    }

    fn new_pod(expose: Option<&str>) -> Pod {
        let annotations = expose.map(|e| json!({"tunnels.pico.sh/expose": e})).unwrap_or(json!({}));
        serde_json::from_value(
            json!({"metadata": {"generateName": "web-", "labels": {"app": "web"}, "annotations": annotations},
            "spec": {"containers": [{"name": "c", "image": "x"}]}}),
        )
        .unwrap()
    }

    fn pod_metadata(ns: &str, name: &str, created: &str, expose: &str) -> Arc<PartialObjectMeta<Pod>> {
        Arc::new(PartialObjectMeta::<Pod> {
            metadata: serde_json::from_value(json!({"name": name, "namespace": ns, "creationTimestamp": created,
                "annotations": {"tunnels.pico.sh/expose": expose}}))
            .unwrap(),
            ..Default::default()
        })
    }

    fn hosts(tunnels: &[TunnelSpec]) -> Vec<&str> {
        tunnels.iter().filter_map(|t| t.host.as_deref()).collect()
    }

    /// The webhook at admission asks the same owners as the controller: a new pod is never
    /// given a name another namespace owns -- whether an Ingress or an expose annotation owns it.
    #[test]
    fn a_pod_being_created_gets_only_the_names_its_routes_own() {
        let config = ResolveConfig::default();
        let mut view = View {
            ingresses: vec![
                ingress("old", "2024-01-01T00:00:00Z", "demo"),
                ingress("new", "2025-01-01T00:00:00Z", "demo"),
            ],
            services: vec![service("old"), service("new")],
            ..Default::default()
        };
        assert_eq!(hosts(&view.route_tunnels_for(&config, &new_pod(None), "old")), ["demo"]);
        assert!(view.route_tunnels_for(&config, &new_pod(None), "new").is_empty(), "old/web owns demo");

        // An expose annotation older than both, in a third namespace (the webhook caches only
        // pod metadata): it owns demo, so neither Ingress's new pods get it.
        view.pod_metadata = vec![pod_metadata("third", "t-1", "2020-01-01T00:00:00Z", "http:demo=80")];
        assert!(view.route_tunnels_for(&config, &new_pod(None), "old").is_empty());
        let owners = view.ownership_for(&config, &new_pod(Some("http:demo=80")), "third");
        let owner = owners.owner(&crate::resolve::ownership::Claim::Name("demo".into())).unwrap();
        assert_eq!(owner.via.as_deref(), Some("t-1"));

        // A new pod's own expose annotation asks too, as the newest: it owns a name nobody has,
        // and not one someone has.
        let owners = view.ownership_for(&config, &new_pod(Some("http:fresh=80, http:demo=80")), "new");
        let me = crate::resolve::ownership::Claimant::expose("new");
        let fresh = crate::resolve::ownership::Claim::Name("fresh".into());
        assert!(owners.check_claim(&me, &fresh).is_ok());
        assert!(owners.check_claim(&me, &crate::resolve::ownership::Claim::Name("demo".into())).is_err());
    }

    #[test]
    fn a_scoped_controller_is_woken_only_by_its_namespaces() {
        let (namespaces, mut writer) = reflector::store::<Namespace>();
        for (name, labels) in [("mine", json!({"team": "a"})), ("theirs", json!({"team": "b"}))] {
            let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap();
            writer.apply_watcher_event(&watcher::Event::Apply(ns));
        }
        let scoped =
            Relevance { selector: BTreeMap::from([("team".into(), "a".into())]), namespaces: namespaces.clone() };
        assert!(scoped.matters(Some("mine")));
        assert!(!scoped.matters(Some("theirs")));
        assert!(scoped.matters(Some("not-cached-yet")), "it might be in scope");
        assert!(scoped.matters(None), "cluster-scoped objects");
        let everything = Relevance { selector: BTreeMap::new(), namespaces };
        assert!(everything.matters(Some("theirs")));
    }
}
