//! The index: reflector caches of everything resolution reads, shared in shape by the controller
//! (which also caches Pods) and the webhook (which resolves the one pod being created).
//!
//! Every watch event wakes whoever waits on [`Index::changed`]; resolution is level-triggered
//! over the whole cache, so a missed or coalesced event costs nothing but a little latency.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use gateway_api::apis::experimental::{
    gatewayclasses::GatewayClass, gateways::Gateway, httproutes::HttpRoute, referencegrants::ReferenceGrant,
    tcproutes::TcpRoute, tlsroutes::TlsRoute,
};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::Api;
use kube::core::{ApiResource, PartialObjectMeta, Resource, Selector, SelectorExt};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::core::tunnel::TunnelSpec;
use crate::resolve::cluster::{ClusterResolution, Inputs, resolve_all, resolve_with};
use crate::resolve::gateway::{self, GatewayModel, RouteModel};
use crate::resolve::ownership::{self, DomainPolicy, Ownership};
use crate::resolve::{PodKey, Snapshot};

/// What resolution needs to know about picotun's own names.
#[derive(Clone, Debug)]
pub struct ResolveConfig {
    pub ingress_class: String,
    pub gateway_controller: String,
    /// Only namespaces whose labels match are served (empty: every namespace). Lets several
    /// controllers share a cluster, each with its own namespaces.
    pub namespace_selector: Selector,
    /// Which namespaces may use which custom domains (`--custom-domain-allow`; empty: all).
    pub custom_domains: DomainPolicy,
    /// Server options from Kubernetes (GatewayClass / Gateway parametersRefs, the Ingress
    /// annotation), validated for this dialect: the controller's. None (the webhook, `explain`):
    /// not read -- the controller writes them into the pods' tunnels files.
    pub server_options: Option<crate::core::server::Dialect>,
}

/// The flags that decide how routes resolve, shared by the webhook, the controller and `explain`
/// (give the webhook and the controller the same values: `picotun-config` does).
#[derive(Clone, Debug, clap::Args)]
pub struct ResolveArgs {
    /// Pods that back an Ingress or route picotun serves count as asking for the sidecar, without
    /// an opt-in of their own: the webhook injects them, the controller calls them SidecarMissing
    /// when they lack it. Off: the controller says BackendNotInjected on the route instead.
    #[arg(long, env = "PICOTUN_INJECT_ROUTE_BACKENDS")]
    pub inject_route_backends: bool,
    /// The IngressClass picotun serves.
    #[arg(long, env = "PICOTUN_INGRESS_CLASS", default_value = crate::resolve::ingress::INGRESS_CLASS)]
    pub ingress_class: String,
    /// GatewayClasses with this controllerName are served.
    #[arg(long, env = "PICOTUN_GATEWAY_CONTROLLER_NAME", default_value = crate::resolve::gateway::GATEWAY_CONTROLLER)]
    pub gateway_controller_name: String,
    #[command(flatten)]
    pub domains: crate::resolve::ownership::DomainArgs,
}

impl ResolveArgs {
    /// The resolution these flags ask for, over every namespace.
    pub fn config(&self) -> ResolveConfig {
        ResolveConfig {
            ingress_class: self.ingress_class.clone(),
            gateway_controller: self.gateway_controller_name.clone(),
            custom_domains: self.domains.policy(),
            ..Default::default()
        }
    }
}

impl Default for ResolveConfig {
    fn default() -> Self {
        ResolveConfig {
            ingress_class: crate::resolve::ingress::INGRESS_CLASS.into(),
            gateway_controller: gateway::GATEWAY_CONTROLLER.into(),
            namespace_selector: Selector::default(),
            custom_domains: DomainPolicy::default(),
            server_options: None,
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
    TLSRoute,
    ReferenceGrant,
}

impl GatewayKind {
    pub const ALL: [GatewayKind; 6] = [
        GatewayKind::GatewayClass,
        GatewayKind::Gateway,
        GatewayKind::HTTPRoute,
        GatewayKind::TCPRoute,
        GatewayKind::TLSRoute,
        GatewayKind::ReferenceGrant,
    ];

    pub fn api_resource(self) -> ApiResource {
        match self {
            GatewayKind::GatewayClass => ApiResource::erase::<GatewayClass>(&()),
            GatewayKind::Gateway => ApiResource::erase::<Gateway>(&()),
            GatewayKind::HTTPRoute => ApiResource::erase::<HttpRoute>(&()),
            GatewayKind::TCPRoute => ApiResource::erase::<TcpRoute>(&()),
            GatewayKind::TLSRoute => ApiResource::erase::<TlsRoute>(&()),
            GatewayKind::ReferenceGrant => ApiResource::erase::<ReferenceGrant>(&()),
        }
    }
}

/// What the watches tell the index's users: a wake-up for the controller's loop when a cache
/// changed, and a count of changes, so the webhook can reuse what it resolved from the caches
/// until the count moves. Bumped after the reflector has applied the event to its store.
#[derive(Default)]
struct Changes {
    wake: Notify,
    count: std::sync::atomic::AtomicU64,
}

impl Changes {
    /// A cache changed: count it, and wake the controller.
    fn changed(&self) {
        self.counted();
        self.wake.notify_one();
    }

    /// A cache changed in a way the controller need not wake for (outside its namespaces); still
    /// counted, so nothing resolved before it is reused.
    fn counted(&self) {
        self.count.fetch_add(1, Ordering::AcqRel);
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }
}

/// The cluster's name owners and the caches they were resolved from, as of a change count.
struct Resolved {
    count: u64,
    view: Arc<View>,
    owners: Arc<Ownership>,
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
    /// The Gateway API caches: empty until their CRDs are discovered (and then watched).
    pub gateway: GatewayStores,
    /// With a namespace selector: Gateways outside the selected namespaces are left out of every
    /// [`View`], as routes and pods are left out of resolution.
    scope: Option<Relevance>,
    changed: Arc<Changes>,
    /// The webhook's last admission resolution (see [`Index::admission_for`]).
    resolved: Arc<std::sync::Mutex<Option<Resolved>>>,
    /// Watches that have listed their objects once.
    synced: Arc<AtomicUsize>,
    /// Watches started; grows when a Gateway API CRD is discovered after start.
    watches: Arc<AtomicUsize>,
    /// Whether Gateway API discovery has succeeded once (until then the index is not synced:
    /// which kinds exist is not known).
    discovered: Arc<AtomicBool>,
}

/// The Gateway API caches, one per kind, each filled once its CRD is discovered: at start, or
/// by the rediscovery every [`REDISCOVER_EVERY`] while a kind is missing.
#[derive(Clone)]
pub struct GatewayStores {
    pub classes: Store<GatewayClass>,
    pub gateways: Store<Gateway>,
    pub http_routes: Store<HttpRoute>,
    pub tcp_routes: Store<TcpRoute>,
    pub tls_routes: Store<TlsRoute>,
    pub grants: Store<ReferenceGrant>,
    /// The kinds whose watches run.
    watched: Arc<std::sync::Mutex<BTreeSet<GatewayKind>>>,
}

impl GatewayStores {
    /// Whether `kind`'s CRD was discovered and its objects are watched.
    pub fn is_watched(&self, kind: GatewayKind) -> bool {
        self.watched.lock().is_ok_and(|w| w.contains(&kind))
    }
}

/// How often discovery looks again for Gateway API CRDs that were not installed (one request
/// per API group version, only while a kind is missing).
pub const REDISCOVER_EVERY: Duration = Duration::from_secs(30);

/// Whether a change in a namespace can matter to resolution: with a namespace selector (a
/// controller sharing the cluster), changes to namespaced objects outside the selected namespaces
/// do not wake the loop -- they are filtered out of every pass anyway.
#[derive(Clone)]
struct Relevance {
    selector: Selector,
    namespaces: Store<Namespace>,
}

impl Relevance {
    fn matters(&self, namespace: Option<&str>) -> bool {
        let Some(ns) = namespace.filter(|_| !self.selector.selects_all()) else { return true };
        // A namespace not cached yet might be in scope: wake.
        self.namespaces.get(&ObjectRef::new(ns)).is_none_or(|n| namespace_selected(&self.selector, &n))
    }

    /// Strictly: the namespace is cached and selected (a cluster-scoped object always is).
    fn selects(&self, namespace: Option<&str>) -> bool {
        let Some(ns) = namespace.filter(|_| !self.selector.selects_all()) else { return true };
        self.namespaces.get(&ObjectRef::new(ns)).is_some_and(|n| namespace_selected(&self.selector, &n))
    }
}

/// Which Namespace changes can matter to a controller serving the namespaces a selector selects:
/// those of a namespace selected after the change or before it (it entered or left the scope, or
/// changed while in it). Another namespace's churn -- other tenants creating and deleting theirs
/// -- changes nothing it resolves.
struct NamespaceWakes {
    selector: Selector,
    /// The namespaces selected as of their last event.
    selected: std::collections::HashSet<String>,
}

impl NamespaceWakes {
    fn new(selector: Selector) -> Self {
        NamespaceWakes { selector, selected: Default::default() }
    }

    /// Whether this event of namespace `name` (with its labels now; `deleted` for a delete)
    /// wakes the loop.
    fn wakes(&mut self, name: &str, labels: Option<&BTreeMap<String, String>>, deleted: bool) -> bool {
        if self.selector.selects_all() {
            return true;
        }
        if !deleted && labels_selected(&self.selector, labels) {
            self.selected.insert(name.to_string());
            true
        } else {
            self.selected.remove(name)
        }
    }
}

/// Which events of a watch wake the loop.
enum Wakes {
    Always,
    /// Those of objects in the selected namespaces.
    InScope(Relevance),
    /// Those of the Namespaces themselves that can matter ([`NamespaceWakes`]).
    Namespaces(NamespaceWakes),
}

/// Whether `selector` selects namespace `n` by its labels.
fn namespace_selected(selector: &Selector, n: &Namespace) -> bool {
    labels_selected(selector, n.metadata.labels.as_ref())
}

/// Whether `selector` selects a namespace with these labels (none: no labels).
fn labels_selected(selector: &Selector, labels: Option<&BTreeMap<String, String>>) -> bool {
    static NONE: BTreeMap<String, String> = BTreeMap::new();
    selector.matches(labels.unwrap_or(&NONE))
}

fn watch<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    changed: Arc<Changes>,
    shutdown: CancellationToken,
    what: String,
    mut wakes: Wakes,
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
                        use watcher::Event::{Apply, Delete, InitApply};
                        let wake = match (&mut wakes, &event) {
                            (Wakes::InScope(r), Apply(o) | Delete(o) | InitApply(o)) => {
                                r.matters(o.meta().namespace.as_deref())
                            }
                            (Wakes::Namespaces(n), Apply(o) | Delete(o) | InitApply(o)) => n.wakes(
                                o.meta().name.as_deref().unwrap_or_default(),
                                o.meta().labels.as_ref(),
                                matches!(event, Delete(_)),
                            ),
                            _ => true,
                        };
                        if wake {
                            changed.changed();
                        } else {
                            changed.counted();
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

/// The metadata of the pods that ask for names (an expose annotation, not being deleted),
/// trimmed to what name ownership reads: namespace, name, creation time, the expose annotation.
/// Every other pod asks for nothing, so it is not kept: the webhook resolves ownership on every
/// admission, and a cache of every pod made each admission cost grow with the cluster's pods.
fn watch_pod_metadata(
    client: kube::Client,
    changed: Arc<Changes>,
    shutdown: CancellationToken,
) -> Store<PartialObjectMeta<Pod>> {
    let (reader, writer) = reflector::store();
    let stream = watcher(Api::<PartialObjectMeta<Pod>>::all(client), watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(trim_to_expose)
        .filter_map(|event| std::future::ready(event.map(only_name_asks).transpose()))
        .reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            tokio::select! {
                item = stream.next() => match item {
                    Some(Ok(_)) => changed.changed(),
                    Some(Err(e)) => warn!(watch = "Pod metadata", error = %e, "watch failed; retrying"),
                    None => break,
                },
                _ = shutdown.cancelled() => break,
            }
        }
    });
    reader
}

/// A pod's metadata trimmed to what name ownership reads.
fn trim_to_expose(o: &mut PartialObjectMeta<Pod>) {
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
}

/// Whether a pod asks for names: it has an expose annotation and is not being deleted (what
/// `ownership::expose_asks` reads).
fn asks_for_names(meta: &ObjectMeta) -> bool {
    meta.deletion_timestamp.is_none()
        && meta.annotations.as_ref().is_some_and(|a| a.contains_key(crate::core::api::EXPOSE))
}

/// A watch event on pod metadata, narrowed to the pods that ask for names: a pod that stops
/// asking (its annotation removed, its deletion begun) becomes a delete, so the store lets it
/// go; one that never asked is not stored at all (a delete of what the store lacks is a no-op).
fn only_name_asks(event: watcher::Event<PartialObjectMeta<Pod>>) -> Option<watcher::Event<PartialObjectMeta<Pod>>> {
    use watcher::Event;
    match event {
        Event::Apply(m) if !asks_for_names(&m.metadata) => Some(Event::Delete(m)),
        Event::InitApply(m) if !asks_for_names(&m.metadata) => None,
        other => Some(other),
    }
}

/// What starts one Gateway API kind's watch once its CRD is found: the watch, and a future that
/// resolves when it has listed its objects.
type Starter = Box<dyn FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send>;

impl Index {
    /// Starts the watches. Gateway API kinds whose CRDs are not installed are watched once
    /// discovery finds them (Ingress works meanwhile); `with_pods` adds a Pod cache (the
    /// controller's), otherwise a cache of the pods' metadata is kept for name ownership (the
    /// webhook's).
    pub async fn start(client: kube::Client, with_pods: bool, shutdown: CancellationToken) -> Index {
        Self::start_scoped(client, with_pods, Selector::default(), shutdown).await
    }

    /// As [`Index::start`], for a controller serving only the namespaces `selector` selects:
    /// changes elsewhere to Ingresses, Services, Pods and routes (which resolution filters out)
    /// do not wake [`Index::changed`], and Gateways elsewhere are left out of the [`View`] (so
    /// theirs do not wake it either). A Namespace wakes it when selected before or after its
    /// change; classes and ReferenceGrants always do (in-scope routes may use the grants of other
    /// namespaces).
    pub async fn start_scoped(
        client: kube::Client,
        with_pods: bool,
        selector: Selector,
        shutdown: CancellationToken,
    ) -> Index {
        let changed = Arc::new(Changes::default());
        let (namespaces, w) = reflector::store();
        let namespace_wakes = Wakes::Namespaces(NamespaceWakes::new(selector.clone()));
        watch(
            Api::<Namespace>::all(client.clone()),
            w,
            changed.clone(),
            shutdown.clone(),
            "Namespace".into(),
            namespace_wakes,
        );
        let scoped = Some(Relevance { selector, namespaces: namespaces.clone() });
        let in_scope = || scoped.clone().map_or(Wakes::Always, Wakes::InScope);
        let (ingresses, w) = reflector::store();
        let (c, s) = (changed.clone(), shutdown.clone());
        watch(Api::<Ingress>::all(client.clone()), w, c, s, "Ingress".into(), in_scope());
        let (services, w) = reflector::store();
        let (c, s) = (changed.clone(), shutdown.clone());
        watch(Api::<Service>::all(client.clone()), w, c, s, "Service".into(), in_scope());
        let pods = with_pods.then(|| {
            let (pods, w) = reflector::store();
            watch(Api::<Pod>::all(client.clone()), w, changed.clone(), shutdown.clone(), "Pod".into(), in_scope());
            pods
        });
        let pod_metadata = (!with_pods).then(|| watch_pod_metadata(client.clone(), changed.clone(), shutdown.clone()));

        // Routes and Gateways are namespaced objects users edit: only those in scope wake the
        // loop (Gateways elsewhere are left out of the View). Classes and grants always do
        // (in-scope routes may use the grants of other namespaces).
        fn typed<K>(
            client: &kube::Client,
            changed: &Arc<Changes>,
            shutdown: &CancellationToken,
            wakes: Wakes,
        ) -> (Store<K>, Starter)
        where
            K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + Debug + Send + Sync + 'static,
        {
            let (store, w) = reflector::store();
            let (client, changed, shutdown, reader) =
                (client.clone(), changed.clone(), shutdown.clone(), store.clone());
            let start: Starter = Box::new(move || {
                let what = K::kind(&()).to_string();
                watch(Api::<K>::all(client), w, changed, shutdown, what, wakes);
                wait_ready(reader)
            });
            (store, start)
        }
        let (c, s) = (&changed, &shutdown);
        let (classes, start_classes) = typed(&client, c, s, Wakes::Always);
        let (gateways, start_gateways) = typed(&client, c, s, in_scope());
        let (http_routes, start_http) = typed(&client, c, s, in_scope());
        let (tcp_routes, start_tcp) = typed(&client, c, s, in_scope());
        let (tls_routes, start_tls) = typed(&client, c, s, in_scope());
        let (grants, start_grants) = typed(&client, c, s, Wakes::Always);
        let starters: BTreeMap<GatewayKind, Starter> = BTreeMap::from([
            (GatewayKind::GatewayClass, start_classes),
            (GatewayKind::Gateway, start_gateways),
            (GatewayKind::HTTPRoute, start_http),
            (GatewayKind::TCPRoute, start_tcp),
            (GatewayKind::TLSRoute, start_tls),
            (GatewayKind::ReferenceGrant, start_grants),
        ]);
        let gateway =
            GatewayStores { classes, gateways, http_routes, tcp_routes, tls_routes, grants, watched: Arc::default() };
        let index = Index {
            ingresses,
            services,
            namespaces,
            pods,
            pod_metadata,
            gateway,
            scope: scoped,
            changed,
            resolved: Arc::default(),
            synced: Arc::default(),
            watches: Arc::default(),
            discovered: Arc::default(),
        };
        let mut waits = vec![
            wait_ready(index.ingresses.clone()),
            wait_ready(index.services.clone()),
            wait_ready(index.namespaces.clone()),
        ];
        waits.extend(index.pods.clone().map(wait_ready));
        waits.extend(index.pod_metadata.clone().map(wait_ready));
        for w in waits {
            index.track(w);
        }
        let ask = move |wanted: Vec<GatewayKind>| {
            let client = client.clone();
            async move { installed_gateway_kinds(&client, &wanted).await }
        };
        tokio::spawn(index.clone().discover(ask, REDISCOVER_EVERY, starters, shutdown));
        index
    }

    /// Counts a started watch, synced once `ready` resolves.
    fn track(&self, ready: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) {
        self.watches.fetch_add(1, Ordering::SeqCst);
        let (synced, changed) = (self.synced.clone(), self.changed.clone());
        tokio::spawn(async move {
            ready.await;
            synced.fetch_add(1, Ordering::SeqCst);
            changed.changed();
        });
    }

    /// Gateway API discovery: retried with backoff until it succeeds (a transient error at start
    /// must not turn Gateway API support off), then repeated every [`REDISCOVER_EVERY`] while a
    /// kind is missing, so CRDs installed later are served without a restart.
    async fn discover<F, Fut>(
        self,
        mut ask: F,
        every: Duration,
        mut starters: BTreeMap<GatewayKind, Starter>,
        shutdown: CancellationToken,
    ) where
        F: FnMut(Vec<GatewayKind>) -> Fut,
        Fut: std::future::Future<Output = Result<BTreeSet<GatewayKind>, kube::Error>>,
    {
        let mut backoff = DiscoveryBackoff::default();
        let mut warned = BTreeSet::new();
        while !starters.is_empty() {
            let wanted: Vec<GatewayKind> = starters.keys().copied().collect();
            let wait = match ask(wanted).await {
                Ok(installed) => {
                    for kind in installed {
                        if let Some(start) = starters.remove(&kind) {
                            info!(kind = %kind.api_resource().kind, "Gateway API CRD found: watching");
                            if let Ok(mut w) = self.gateway.watched.lock() {
                                w.insert(kind);
                            }
                            self.track(start());
                        }
                    }
                    for kind in starters.keys().filter(|k| warned.insert(**k)) {
                        let resource = kind.api_resource();
                        warn!(
                            kind = %resource.kind, version = %resource.api_version,
                            "Gateway API CRD not installed, or this identity may not list it: {} objects are not \
                             served (install the Gateway API experimental channel CRDs, or apply deploy/ again for \
                             its RBAC; either is picked up within {}s)",
                            resource.kind, every.as_secs().max(1)
                        );
                    }
                    // Counted only after the found kinds' watches: /ready never sees a
                    // discovered index without them.
                    if !self.discovered.swap(true, Ordering::SeqCst) {
                        self.changed.changed();
                    }
                    backoff.reset();
                    every
                }
                Err(e) => {
                    let wait = backoff.next();
                    warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "cannot discover the Gateway API; retrying");
                    wait
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// True once Gateway API discovery has succeeded and every watch has listed its objects
    /// (the caches are complete).
    pub fn is_synced(&self) -> bool {
        self.discovered.load(Ordering::SeqCst)
            && self.synced.load(Ordering::SeqCst) >= self.watches.load(Ordering::SeqCst)
    }

    pub async fn wait_synced(&self) {
        while !self.is_synced() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        info!(watches = self.watches.load(Ordering::SeqCst), "caches synced");
    }

    /// Resolves when something in a cache changed since the last call.
    pub async fn changed(&self) {
        self.changed.wake.notified().await
    }

    /// A consistent copy of the caches to resolve over.
    pub fn view(&self) -> View {
        let g = &self.gateway;
        let selected = |ns: Option<&str>| self.scope.as_ref().is_none_or(|s| s.selects(ns));
        View {
            ingresses: self.ingresses.state(),
            services: self.services.state(),
            namespaces: self.namespaces.state(),
            pods: self.pods.as_ref().map(|p| p.state()).unwrap_or_default(),
            pod_metadata: self.pod_metadata.as_ref().map(|p| p.state()).unwrap_or_default(),
            gateway_classes: g.classes.state(),
            gateways: g.gateways.state().into_iter().filter(|g| selected(g.metadata.namespace.as_deref())).collect(),
            http_routes: g.http_routes.state(),
            tcp_routes: g.tcp_routes.state(),
            tls_routes: g.tls_routes.state(),
            grants: g.grants.state(),
            config_maps: Default::default(),
        }
    }
}

/// Jittered exponential backoff for discovery: 1 s doubling to 30 s.
#[derive(Default)]
struct DiscoveryBackoff {
    failures: u32,
}

impl DiscoveryBackoff {
    fn next(&mut self) -> Duration {
        let base = Duration::from_secs(1).saturating_mul(1 << self.failures.min(5)).min(Duration::from_secs(30));
        self.failures += 1;
        let jitter = rand::random::<f64>() * 0.25;
        base.mul_f64(1.0 + jitter).min(Duration::from_secs(30))
    }

    fn reset(&mut self) {
        self.failures = 0;
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

/// Which of `wanted` the apiserver serves. An API group version that is not there at all (404)
/// is an answer (none of its kinds); any other error means discovery did not succeed.
async fn installed_gateway_kinds(
    client: &kube::Client,
    wanted: &[GatewayKind],
) -> Result<BTreeSet<GatewayKind>, kube::Error> {
    let mut out = BTreeSet::new();
    let mut versions: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for kind in wanted {
        let ar = kind.api_resource();
        let listed = match versions.get(&ar.api_version) {
            Some(l) => l.clone(),
            None => {
                let call = client.list_api_group_resources(&ar.api_version);
                let kinds = match tokio::time::timeout(Duration::from_secs(10), call).await {
                    Ok(Ok(list)) => list.resources.into_iter().map(|r| r.kind).collect(),
                    Ok(Err(kube::Error::Api(s))) if s.code == 404 => Vec::new(),
                    Ok(Err(e)) => return Err(e),
                    Err(_) => {
                        return Err(kube::Error::Service(
                            format!("discovery of {} timed out after 10s", ar.api_version).into(),
                        ));
                    }
                };
                versions.insert(ar.api_version.clone(), kinds.clone());
                kinds
            }
        };
        if listed.contains(&ar.kind) && may_list(client, &ar).await? {
            out.insert(*kind);
        }
    }
    Ok(out)
}

/// Whether this identity may list a kind whose CRD is installed. A kind it may not list (a
/// binary newer than its RBAC, e.g. TLSRoute before the ClusterRole was applied again) is left
/// unwatched -- and looked for again -- rather than a watch that never lists and keeps the whole
/// index, and /ready, from syncing.
async fn may_list(client: &kube::Client, ar: &ApiResource) -> Result<bool, kube::Error> {
    let api: Api<kube::core::DynamicObject> = Api::all_with(client.clone(), ar);
    let params = kube::api::ListParams::default().limit(1);
    let call = api.list_metadata(&params);
    match tokio::time::timeout(Duration::from_secs(10), call).await {
        Ok(Ok(_)) => Ok(true),
        // Said once per kind by `discover`, like a CRD that is not installed.
        Ok(Err(kube::Error::Api(s))) if s.code == 403 => Ok(false),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(kube::Error::Service(format!("listing {} timed out after 10s", ar.plural).into())),
    }
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
    pub tls_routes: Vec<Arc<TlsRoute>>,
    pub grants: Vec<Arc<ReferenceGrant>>,
    /// The ConfigMaps our GatewayClasses' and Gateways' parametersRefs name, as the controller
    /// last read them ([`View::parameter_config_maps`]); not cached by a watch.
    pub config_maps: crate::resolve::options::ConfigMaps,
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

    /// Our GatewayClasses' parametersRefs, by class name.
    pub fn class_parameter_refs(
        &self,
        config: &ResolveConfig,
    ) -> BTreeMap<String, Option<crate::resolve::options::ParametersRef>> {
        self.gateway_classes
            .iter()
            .filter(|c| c.spec.controller_name == config.gateway_controller)
            .filter_map(|c| {
                let r = c.spec.parameters_ref.as_ref().map(|r| crate::resolve::options::ParametersRef {
                    group: r.group.clone(),
                    kind: r.kind.clone(),
                    namespace: r.namespace.clone(),
                    name: r.name.clone(),
                });
                Some((c.metadata.name.clone()?, r))
            })
            .collect()
    }

    /// The ConfigMaps (namespace, name) that our GatewayClasses' and Gateways' parametersRefs
    /// name: what the controller reads for server options.
    pub fn parameter_config_maps(&self, config: &ResolveConfig) -> BTreeSet<(String, String)> {
        let is_config_map = |group: &str, kind: &str| group.is_empty() && kind == "ConfigMap";
        let mut out: BTreeSet<(String, String)> = self
            .class_parameter_refs(config)
            .into_values()
            .flatten()
            .filter(|r| is_config_map(&r.group, &r.kind))
            .filter_map(|r| Some((r.namespace?, r.name)))
            .collect();
        let ours = self.our_gateway_classes(config);
        for g in self.gateways.iter().filter(|g| ours.contains(&g.spec.gateway_class_name)) {
            if let (Some(ns), Some(r)) =
                (g.metadata.namespace.as_ref(), g.spec.infrastructure.as_ref().and_then(|i| i.parameters_ref.as_ref()))
                && is_config_map(&r.group, &r.kind)
            {
                out.insert((ns.clone(), r.name.clone()));
            }
        }
        out
    }

    /// The namespaces the controller serves; None for all of them.
    pub fn scope(&self, config: &ResolveConfig) -> Option<BTreeSet<String>> {
        if config.namespace_selector.selects_all() {
            return None;
        }
        Some(
            self.namespaces
                .iter()
                .filter(|n| namespace_selected(&config.namespace_selector, n))
                .filter_map(|n| n.metadata.name.clone())
                .collect(),
        )
    }

    /// Whether objects in `namespace` are served under `config`'s namespace selector
    /// (cluster-scoped objects always are).
    pub fn in_scope(&self, config: &ResolveConfig, namespace: Option<&str>) -> bool {
        let Some(ns) = namespace.filter(|_| !config.namespace_selector.selects_all()) else { return true };
        self.namespaces
            .iter()
            .any(|n| n.metadata.name.as_deref() == Some(ns) && namespace_selected(&config.namespace_selector, n))
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
        // A route may live elsewhere and reach this namespace through a ReferenceGrant. Asked of
        // the typed route, before its model is built: most routes reach other namespaces.
        let reaches = |reaches_into: &dyn Fn(&str) -> bool| namespace_filter.is_none_or(reaches_into);
        let mut all_routes: Vec<RouteModel> = self
            .http_routes
            .iter()
            .filter(|r| in_route_scope(&r.metadata) && reaches(&|f| gateway::http_route_reaches(r, f)))
            .map(|r| gateway::http_route_model(r))
            .collect();
        all_routes.extend(
            self.tcp_routes
                .iter()
                .filter(|r| in_route_scope(&r.metadata) && reaches(&|f| gateway::tcp_route_reaches(r, f)))
                .map(|r| gateway::tcp_route_model(r)),
        );
        all_routes.extend(
            self.tls_routes
                .iter()
                .filter(|r| in_route_scope(&r.metadata) && reaches(&|f| gateway::tls_route_reaches(r, f)))
                .map(|r| gateway::tls_route_model(r)),
        );
        let route_namespaces: BTreeSet<String> = all_routes.iter().map(|r| r.namespace.clone()).collect();
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
            // Only a route's own namespace's labels are read (a listener's allowedRoutes
            // selector): the webhook copied every namespace's labels on each admission before.
            namespace_labels: self
                .namespaces
                .iter()
                .filter(|n| n.metadata.name.as_deref().is_some_and(|name| route_namespaces.contains(name)))
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
            server_options: config.server_options.map(|dialect| crate::resolve::cluster::ServerOptionInputs {
                dialect,
                class_refs: self.class_parameter_refs(config),
                config_maps: &self.config_maps,
            }),
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
    /// A pod not yet created asks as the newest claimant, so any creationTimestamp it carries is
    /// dropped. The ground's kube-apiserver already replaces one a client wrote before it calls
    /// the webhook (webhook.rs `a_new_pods_expose_annotation...` creates such a pod); this keeps
    /// the rule from resting on that, or on whoever else sends an AdmissionReview.
    fn pending(pod: &Pod, namespace: &str) -> Pod {
        let mut pod = pod.clone();
        pod.metadata.namespace = Some(namespace.to_string());
        pod.metadata.creation_timestamp = None;
        if pod.metadata.name.is_none() {
            pod.metadata.name = Some("picotun-pod-being-created".into());
        }
        pod
    }

    /// Who owns every name across the cluster: the same table the controller resolves with.
    pub fn cluster_owners(&self, config: &ResolveConfig) -> Ownership {
        resolve_all(&self.inputs(config, Vec::new(), None, self.pod_metas().collect())).ownership
    }

    /// Who owns every name across the cluster, with `pod` (being created in `namespace`) asking
    /// too, as the newest. The webhook keeps the expose tunnels it injects to those its
    /// namespace owns (`Ownership::keep` with `Claimant::expose`).
    pub fn ownership_for(&self, config: &ResolveConfig, pod: &Pod, namespace: &str) -> Ownership {
        let pending = Self::pending(pod, namespace);
        self.cluster_owners(config).with_asks(ownership::expose_asks([&pending.metadata]))
    }

    /// The tunnels routes give a pod that is being created (the webhook): the pod is resolved
    /// alone, against the routes and Services that can reach its namespace, and keeps only the
    /// names its routes own across the whole cluster.
    pub fn route_tunnels_for(&self, config: &ResolveConfig, pod: &Pod, namespace: &str) -> Vec<TunnelSpec> {
        self.admission_for(config, pod, namespace).0
    }

    /// [`View::route_tunnels_for`] and the owners it kept them by (`ownership_for`), resolved
    /// once: the webhook keeps the pod's own expose tunnels by the same table.
    pub fn admission_for(
        &self,
        config: &ResolveConfig,
        pod: &Pod,
        namespace: &str,
    ) -> (Vec<TunnelSpec>, Arc<Ownership>) {
        self.admission_with(config, pod, namespace, &Arc::new(self.cluster_owners(config)))
    }

    /// [`View::admission_for`] with the cluster's owners already resolved (`cluster_owners`):
    /// the pod's own expose annotation asks on top of them.
    fn admission_with(
        &self,
        config: &ResolveConfig,
        pod: &Pod,
        namespace: &str,
        cluster: &Arc<Ownership>,
    ) -> (Vec<TunnelSpec>, Arc<Ownership>) {
        let pending = Self::pending(pod, namespace);
        let own = ownership::expose_asks([&pending.metadata]);
        let owners = if own.is_empty() { cluster.clone() } else { Arc::new(cluster.with_asks(own)) };
        let mut resolution =
            resolve_with(&self.inputs(config, vec![&pending], Some(namespace), Vec::new()), Some(&owners));
        let key: PodKey = (namespace.to_string(), pending.metadata.name.clone().unwrap_or_default());
        (resolution.route_tunnels.remove(&key).unwrap_or_default(), owners)
    }
}

impl Index {
    /// [`View::admission_for`] for the webhook, reusing its copy of the caches and the cluster's
    /// name owners until a cache changes: resolving the whole cluster's owners on every
    /// admission made each one cost more the more routes the cluster has. `config` must be the
    /// same on every call (the webhook's own).
    pub fn admission_for(
        &self,
        config: &ResolveConfig,
        pod: &Pod,
        namespace: &str,
    ) -> (Vec<TunnelSpec>, Arc<Ownership>) {
        // Read before the caches: a change landing meanwhile moves the count past this one, so
        // what is resolved now is not reused after it.
        let count = self.changed.count();
        let cached = self
            .resolved
            .lock()
            .ok()
            .and_then(|r| r.as_ref().filter(|r| r.count == count).map(|r| (r.view.clone(), r.owners.clone())));
        let (view, owners) = match cached {
            Some(hit) => hit,
            None => {
                let view = Arc::new(self.view());
                let owners = Arc::new(view.cluster_owners(config));
                if let Ok(mut r) = self.resolved.lock() {
                    *r = Some(Resolved { count, view: view.clone(), owners: owners.clone() });
                }
                (view, owners)
            }
        };
        view.admission_with(config, pod, namespace, &owners)
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

    /// A pod at admission is the newest claimant of its names, whatever creationTimestamp the
    /// AdmissionReview carries: one of 2000 must not make it older than a name's owner.
    #[test]
    fn a_pod_being_created_asks_as_the_newest_whatever_creation_time_it_says() {
        let config = ResolveConfig::default();
        let view = View {
            pod_metadata: vec![pod_metadata("victim", "shop-1", "2024-01-01T00:00:00Z", "http:shop=8080")],
            ..Default::default()
        };
        let mut forged = new_pod(Some("http:shop=8080"));
        forged.metadata.creation_timestamp = Some(serde_json::from_value(json!("2000-01-01T00:00:00Z")).unwrap());
        let owners = view.ownership_for(&config, &forged, "evil");
        let shop = crate::resolve::ownership::Claim::Name("shop".into());
        assert_eq!(owners.owner(&shop).unwrap().via.as_deref(), Some("shop-1"), "the victim keeps shop");
        let evil = crate::resolve::ownership::Claimant::expose("evil");
        assert!(owners.check_claim(&evil, &shop).is_err());
        let (_, owners) = view.admission_for(&config, &forged, "evil");
        assert!(owners.check_claim(&evil, &shop).is_err(), "the same through admission_for");
    }

    /// The webhook resolves the cluster's name owners once per change of the caches, not once per
    /// admission; what a change brings is seen at the next admission after the watch counts it.
    #[test]
    fn admissions_reuse_the_cluster_owners_until_a_cache_changes() {
        let (ingresses, mut ingress_writer) = reflector::store::<Ingress>();
        let (services, mut service_writer) = reflector::store::<Service>();
        for ns in ["old", "new"] {
            service_writer.apply_watcher_event(&watcher::Event::Apply((*service(ns)).clone()));
        }
        ingress_writer
            .apply_watcher_event(&watcher::Event::Apply((*ingress("new", "2025-01-01T00:00:00Z", "demo")).clone()));
        let mut index = offline_index("", &[], &[]);
        index.scope = None;
        index.ingresses = ingresses;
        index.services = services;
        let config = ResolveConfig::default();
        let tunnels = |index: &Index, ns: &str| {
            let (tunnels, _) = index.admission_for(&config, &new_pod(None), ns);
            hosts(&tunnels).iter().map(|h| h.to_string()).collect::<Vec<_>>()
        };
        assert_eq!(tunnels(&index, "new"), ["demo"], "the only Ingress asking owns demo");
        let first = index.resolved.lock().unwrap().as_ref().map(|r| Arc::as_ptr(&r.owners));

        // An older Ingress for the same name: not counted yet, so the owners resolved are reused.
        ingress_writer
            .apply_watcher_event(&watcher::Event::Apply((*ingress("old", "2024-01-01T00:00:00Z", "demo")).clone()));
        assert_eq!(tunnels(&index, "new"), ["demo"]);
        let second = index.resolved.lock().unwrap().as_ref().map(|r| Arc::as_ptr(&r.owners));
        assert_eq!(first, second, "no change counted: the same table");

        // Counted (the watch does so after the store has the object): resolved again.
        index.changed.changed();
        assert!(tunnels(&index, "new").is_empty(), "old/web is older and owns demo now");
        assert_eq!(tunnels(&index, "old"), ["demo"]);
        let third = index.resolved.lock().unwrap().as_ref().map(|r| Arc::as_ptr(&r.owners));
        assert_ne!(second, third);

        // A pod with its own expose annotation asks on top of the cached table, as the newest.
        let (_, owners) = index.admission_for(&config, &new_pod(Some("http:fresh=80, http:demo=80")), "new");
        let me = crate::resolve::ownership::Claimant::expose("new");
        assert!(owners.check_claim(&me, &crate::resolve::ownership::Claim::Name("fresh".into())).is_ok());
        assert!(owners.check_claim(&me, &crate::resolve::ownership::Claim::Name("demo".into())).is_err());
    }

    /// The webhook's pod cache holds only the pods that ask for names. It resolves ownership on
    /// every admission over what the cache holds, so a cache of every pod made each admission
    /// cost grow with the cluster (a pod with no expose annotation asks for nothing).
    #[test]
    fn the_pod_metadata_cache_keeps_only_pods_that_ask_for_names() {
        let meta = |name: &str, expose: Option<&str>, deleting: bool| {
            let mut m = PartialObjectMeta::<Pod> {
                metadata: serde_json::from_value(json!({"name": name, "namespace": "ns",
                    "creationTimestamp": "2024-01-01T00:00:00Z",
                    "labels": {"app": "web"}, "annotations": {"other": "x"}}))
                .unwrap(),
                ..Default::default()
            };
            if let Some(e) = expose {
                m.metadata.annotations.get_or_insert_default().insert(crate::core::api::EXPOSE.into(), e.into());
            }
            if deleting {
                m.metadata.deletion_timestamp = m.metadata.creation_timestamp.clone();
            }
            trim_to_expose(&mut m);
            m
        };
        let (store, mut writer) = reflector::store::<PartialObjectMeta<Pod>>();
        let mut apply = |e: watcher::Event<PartialObjectMeta<Pod>>| {
            if let Some(e) = only_name_asks(e) {
                writer.apply_watcher_event(&e);
            }
        };
        let names = |s: &Store<PartialObjectMeta<Pod>>| {
            let mut n: Vec<String> = s.state().iter().filter_map(|m| m.metadata.name.clone()).collect();
            n.sort();
            n
        };
        // The initial list: 1000 pods, two of which ask.
        apply(watcher::Event::Init);
        for i in 0..1000 {
            apply(watcher::Event::InitApply(meta(&format!("plain-{i}"), None, false)));
        }
        apply(watcher::Event::InitApply(meta("asks-1", Some("http:demo=80"), false)));
        apply(watcher::Event::InitApply(meta("asks-2", Some("http:other=80"), false)));
        apply(watcher::Event::InitDone);
        assert_eq!(names(&store), ["asks-1", "asks-2"]);
        let kept = store.state();
        let annotations = kept[0].metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations.keys().collect::<Vec<_>>(), [crate::core::api::EXPOSE], "trimmed");
        assert!(kept[0].metadata.labels.is_none());

        // A new pod that asks is kept; one that does not is not.
        apply(watcher::Event::Apply(meta("asks-3", Some("http:third=80"), false)));
        apply(watcher::Event::Apply(meta("plain-new", None, false)));
        assert_eq!(names(&store), ["asks-1", "asks-2", "asks-3"]);
        // Its annotation removed: let go. Its deletion begun: let go. Deleted: gone.
        apply(watcher::Event::Apply(meta("asks-1", None, false)));
        apply(watcher::Event::Apply(meta("asks-2", Some("http:other=80"), true)));
        apply(watcher::Event::Delete(meta("asks-3", Some("http:third=80"), false)));
        assert!(names(&store).is_empty());
        // A pod that starts asking later is kept from then on.
        apply(watcher::Event::Apply(meta("plain-7", Some("http:late=80"), false)));
        assert_eq!(names(&store), ["plain-7"]);
    }

    /// An index over hand-filled stores (no apiserver), scoped by `selector`.
    fn offline_index(selector: &str, namespaces: &[(&str, Value)], gateways: &[(&str, &str)]) -> Index {
        let (ns_store, mut w) = reflector::store::<Namespace>();
        for (name, labels) in namespaces {
            let ns = serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap();
            w.apply_watcher_event(&watcher::Event::Apply(ns));
        }
        let (gw_store, mut w) = reflector::store::<Gateway>();
        for (ns, name) in gateways {
            let gw = serde_json::from_value(json!({"metadata": {"name": name, "namespace": ns},
                "spec": {"gatewayClassName": "pico", "listeners": []}}))
            .unwrap();
            w.apply_watcher_event(&watcher::Event::Apply(gw));
        }
        let selector = crate::core::api::parse_label_selector(selector).unwrap();
        Index {
            ingresses: reflector::store().0,
            services: reflector::store().0,
            namespaces: ns_store.clone(),
            pods: None,
            pod_metadata: None,
            gateway: GatewayStores {
                classes: reflector::store().0,
                gateways: gw_store,
                http_routes: reflector::store().0,
                tcp_routes: reflector::store().0,
                tls_routes: reflector::store().0,
                grants: reflector::store().0,
                watched: Arc::default(),
            },
            scope: Some(Relevance { selector, namespaces: ns_store }),
            changed: Arc::default(),
            resolved: Arc::default(),
            synced: Arc::default(),
            watches: Arc::default(),
            discovered: Arc::default(),
        }
    }

    /// Defect 6 (first clause): a scoped controller sees only the Gateways of its namespaces, as
    /// it sees only their routes and pods -- it never writes status on another's Gateway.
    #[test]
    fn gateways_outside_the_selected_namespaces_are_not_in_the_view() {
        let index = offline_index(
            "team in (a, b), !legacy",
            &[
                ("mine", json!({"team": "a"})),
                ("old", json!({"team": "a", "legacy": "1"})),
                ("theirs", json!({"team": "c"})),
            ],
            &[("mine", "gw"), ("old", "gw"), ("theirs", "gw"), ("not-cached", "gw")],
        );
        let view = index.view();
        let namespaces: Vec<_> = view.gateways.iter().filter_map(|g| g.metadata.namespace.as_deref()).collect();
        assert_eq!(namespaces, ["mine"]);
        let config = ResolveConfig { namespace_selector: index.scope.clone().unwrap().selector, ..Default::default() };
        assert!(view.in_scope(&config, Some("mine")));
        assert!(!view.in_scope(&config, Some("old")));
        assert!(!view.in_scope(&config, Some("not-cached")));
        assert!(view.in_scope(&config, None), "cluster-scoped objects");
        assert_eq!(view.scope(&config), Some(BTreeSet::from(["mine".to_string()])));

        let everything = offline_index("", &[("theirs", json!({}))], &[("theirs", "gw"), ("not-cached", "gw")]);
        assert_eq!(everything.view().gateways.len(), 2);
    }

    /// Defect 9: until Gateway API discovery has succeeded once, the index is not synced (/ready
    /// stays false) even when every watch started so far has listed.
    #[test]
    fn the_index_is_not_synced_before_discovery_succeeds() {
        let index = offline_index("", &[], &[]);
        assert!(!index.is_synced(), "no discovery yet");
        index.discovered.store(true, Ordering::SeqCst);
        assert!(index.is_synced());
        index.watches.fetch_add(1, Ordering::SeqCst);
        assert!(!index.is_synced(), "a kind found later is watched but not listed yet");
        index.synced.fetch_add(1, Ordering::SeqCst);
        assert!(index.is_synced());
    }

    /// Defect 9: discovery that fails is retried (with backoff), and a kind missing once is
    /// looked for again: each kind's watch starts when it is found, and the index counts as
    /// discovered from the first success on.
    #[tokio::test]
    async fn discovery_retries_after_an_error_and_picks_up_kinds_installed_later() {
        let index = offline_index("", &[], &[]);
        let answers = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::from([
            Err("connection refused"),
            Ok(vec![GatewayKind::GatewayClass, GatewayKind::Gateway]),
            Ok(vec![]),
            Ok(vec![GatewayKind::HTTPRoute, GatewayKind::TCPRoute, GatewayKind::TLSRoute, GatewayKind::ReferenceGrant]),
        ])));
        let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (a, q) = (answers.clone(), asked.clone());
        let ask = move |wanted: Vec<GatewayKind>| {
            q.lock().unwrap().push(wanted.clone());
            let answer = a.lock().unwrap().pop_front().expect("asked once too often");
            async move {
                match answer {
                    Err(e) => Err(kube::Error::Service(e.into())),
                    Ok(found) => Ok(found.into_iter().filter(|k| wanted.contains(k)).collect()),
                }
            }
        };
        let started = Arc::new(std::sync::Mutex::new(Vec::new()));
        let starters: BTreeMap<GatewayKind, Starter> = GatewayKind::ALL
            .into_iter()
            .map(|kind| {
                let started = started.clone();
                let start: Starter = Box::new(move || {
                    started.lock().unwrap().push(kind);
                    Box::pin(async {})
                });
                (kind, start)
            })
            .collect();
        let run = index.clone().discover(ask, Duration::from_millis(20), starters, CancellationToken::new());
        tokio::time::timeout(Duration::from_secs(5), run).await.expect("ends once every kind is watched");
        let asked = asked.lock().unwrap().clone();
        assert_eq!(asked.len(), 4, "{asked:?}");
        assert_eq!(asked[0], GatewayKind::ALL, "after the error, everything is asked again");
        assert_eq!(
            asked[2],
            [GatewayKind::HTTPRoute, GatewayKind::TCPRoute, GatewayKind::TLSRoute, GatewayKind::ReferenceGrant]
        );
        assert_eq!(started.lock().unwrap().len(), 6);
        assert!(GatewayKind::ALL.iter().all(|k| index.gateway.is_watched(*k)));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(index.is_synced());
        assert_eq!(index.watches.load(Ordering::SeqCst), 6);
    }

    #[test]
    fn discovery_backs_off_from_a_second_to_half_a_minute() {
        let mut b = DiscoveryBackoff::default();
        let waits: Vec<Duration> = (0..8).map(|_| b.next()).collect();
        assert!(waits[0] >= Duration::from_secs(1) && waits[0] < Duration::from_millis(1300), "{waits:?}");
        assert!(waits[1] >= Duration::from_secs(2), "{waits:?}");
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(30)), "{waits:?}");
        assert!(waits[7] >= Duration::from_secs(30) * 3 / 4, "{waits:?}");
        b.reset();
        assert!(b.next() < Duration::from_millis(1300));
    }

    #[test]
    fn a_scoped_controller_is_woken_only_by_its_namespaces() {
        let (namespaces, mut writer) = reflector::store::<Namespace>();
        for (name, labels) in [("mine", json!({"team": "a"})), ("theirs", json!({"team": "b"}))] {
            let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap();
            writer.apply_watcher_event(&watcher::Event::Apply(ns));
        }
        let selector = crate::core::api::parse_label_selector("team in (a)").unwrap();
        let scoped = Relevance { selector, namespaces: namespaces.clone() };
        assert!(scoped.matters(Some("mine")));
        assert!(!scoped.matters(Some("theirs")));
        assert!(scoped.matters(Some("not-cached-yet")), "it might be in scope");
        assert!(scoped.matters(None), "cluster-scoped objects");
        let everything = Relevance { selector: Selector::default(), namespaces };
        assert!(everything.matters(Some("theirs")));
    }

    #[test]
    fn a_scoped_controller_is_woken_only_by_namespaces_in_or_leaving_its_scope() {
        let labels = |team: &str| BTreeMap::from([("team".to_string(), team.to_string())]);
        let selector = crate::core::api::parse_label_selector("team in (a)").unwrap();
        let mut wakes = NamespaceWakes::new(selector);
        assert!(!wakes.wakes("theirs", Some(&labels("b")), false), "another tenant's namespace");
        assert!(!wakes.wakes("theirs", Some(&labels("b")), true), "deleted, never in scope");
        assert!(!wakes.wakes("bare", None, false), "no labels at all");
        assert!(wakes.wakes("mine", Some(&labels("a")), false), "a namespace in scope");
        assert!(wakes.wakes("mine", Some(&labels("a")), false), "changed while in scope");
        assert!(wakes.wakes("mine", Some(&labels("b")), false), "it left the scope");
        assert!(!wakes.wakes("mine", Some(&labels("b")), false), "out of scope now");
        assert!(wakes.wakes("joined", Some(&labels("a")), false), "it entered the scope");
        assert!(wakes.wakes("joined", Some(&labels("a")), true), "deleted while in scope");
        assert!(!wakes.wakes("joined", Some(&labels("a")), true), "already gone");
        let mut everything = NamespaceWakes::new(Selector::default());
        assert!(everything.wakes("theirs", Some(&labels("b")), false), "without a selector, every namespace");
    }
}
