//! `controllerload PICOTUN_BINARY`: `picotun controller` under a cluster's worth of routes, on a
//! fresh test ground of its own, against the time the same ground's apiserver needs just to accept
//! the same objects (a second fresh ground, no controller). Prints `bench:` lines; progress and
//! the controller's own metrics go to stderr.
//!
//! The cluster (per namespace, `BENCH_NAMESPACES` of them): `BENCH_PODS_PER_NS` pods that already
//! carry the sidecar and a sidecar report naming their tunnel's public address, one Service per
//! two pods, and one route per Service: the first half Ingresses (class `pico-tunnel`), the rest
//! HTTPRoutes attached to the namespace's Gateway (class `pico-tunnel`, one HTTP listener on 80).
//! Namespaces, the IngressClass and the GatewayClass are made before the clock starts (they are
//! the install, not the load); everything else is applied with `BENCH_CONCURRENCY` requests in
//! flight.
//!
//! Converged means, as seen by watches on the apiserver: every pod carries exactly its tunnels
//! file, every Ingress shows its reported host, every HTTPRoute has an Accepted parent for its
//! current generation and hostname, every Gateway is Programmed with exactly its routes' hosts,
//! and the GatewayClass is Accepted.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use picotun_testground::{ControlPlane, Proc, free_port, http};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

const CLASS: &str = "pico-tunnel";
const GATEWAY_CONTROLLER: &str = "tunnels.pico.sh/gateway-controller";
const INGRESS_CONTROLLER: &str = "tunnels.pico.sh/ingress-controller";
const GATEWAY: &str = "gw";
const LISTENER: &str = "http";
const TARGET_PORT: u16 = 5678;
const TUNNELS: &str = "tunnels.pico.sh/tunnels";
const ADDRESSES: &str = "tunnels.pico.sh/addresses";
const DOMAIN: &str = "tuns.test";

/// The knobs, from the environment (see bench/controller.sh).
struct Knobs {
    namespaces: usize,
    pods_per_ns: usize,
    concurrency: usize,
    edits: usize,
    timeout: Duration,
    settle: Duration,
    controller_log: String,
    controller_args: Vec<String>,
    leader_election: bool,
    log_dir: Option<PathBuf>,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v.parse().unwrap_or_else(|_| {
            eprintln!("{name}={v:?} is not a valid value");
            std::process::exit(2)
        }),
        _ => default,
    }
}

impl Knobs {
    fn from_env() -> Knobs {
        let k = Knobs {
            namespaces: env_or("BENCH_NAMESPACES", 100),
            pods_per_ns: env_or("BENCH_PODS_PER_NS", 20),
            concurrency: env_or("BENCH_CONCURRENCY", 32),
            edits: env_or("BENCH_EDITS", 100),
            timeout: Duration::from_secs(env_or("BENCH_TIMEOUT", 300)),
            settle: Duration::from_secs(env_or("BENCH_SETTLE", 5)),
            controller_log: env_or("BENCH_CONTROLLER_LOG", "info".to_string()),
            controller_args: env_or("BENCH_CONTROLLER_ARGS", String::new())
                .split_whitespace()
                .map(str::to_string)
                .collect(),
            leader_election: env_or("BENCH_LEADER_ELECTION", false),
            log_dir: std::env::var_os("BENCH_LOG_DIR").filter(|d| !d.is_empty()).map(PathBuf::from),
        };
        if k.namespaces == 0 || k.pods_per_ns < 4 || !k.pods_per_ns.is_multiple_of(2) || k.concurrency == 0 {
            eprintln!("BENCH_NAMESPACES must be >= 1 and BENCH_PODS_PER_NS an even number >= 4");
            std::process::exit(2);
        }
        k
    }
}

// --- the cluster this benchmark applies ---------------------------------------------------------

/// One route: Service `svc-<index>` selects pods `p-<2 index>` and `p-<2 index + 1>`.
#[derive(Clone, Debug)]
struct Route {
    ns: String,
    index: usize,
    ingress: bool,
    host: String,
}

impl Route {
    fn name(&self) -> String {
        if self.ingress { format!("ing-{}", self.index) } else { format!("route-{}", self.index) }
    }

    fn service(&self) -> String {
        format!("svc-{}", self.index)
    }

    fn pods(&self) -> [String; 2] {
        [format!("p-{}", 2 * self.index), format!("p-{}", 2 * self.index + 1)]
    }

    /// The tunnel picotun names for this route (src/resolve: `tunnel_name(["ing", ingress, host])`
    /// and `tunnel_name(["gw", gateway namespace, gateway, listener, host])`). Every part here is
    /// already lowercase letters, digits and single '-', and short, so the name is the parts joined.
    fn tunnel(&self) -> String {
        if self.ingress {
            format!("ing-{}-{}", self.name(), self.host)
        } else {
            format!("gw-{}-{GATEWAY}-{LISTENER}-{}", self.ns, self.host)
        }
    }

    fn public_host(&self) -> String {
        format!("{}.{DOMAIN}", self.host)
    }

    fn tunnels_file(&self) -> Value {
        json!({"tunnels": [{"name": self.tunnel(), "kind": "http", "host": self.host, "targetPort": TARGET_PORT}]})
    }

    /// What the sidecar would report once the tunnel server assigned the address.
    fn report(&self) -> String {
        json!({"tunnels": {self.tunnel(): {"state": "established", "publicAddress": format!("https://{}", self.public_host())}}})
            .to_string()
    }

    fn edited(&self) -> Route {
        Route { host: format!("{}-v2", self.host), ..self.clone() }
    }
}

struct Layout {
    namespaces: Vec<String>,
    routes: Vec<Route>,
    pods_per_ns: usize,
}

impl Layout {
    fn new(k: &Knobs) -> Layout {
        let namespaces: Vec<String> = (0..k.namespaces).map(|i| format!("bench-{i:03}")).collect();
        let services = k.pods_per_ns / 2;
        let ingresses = services - services / 2;
        let mut routes = Vec::new();
        for ns in &namespaces {
            for index in 0..services {
                let ingress = index < ingresses;
                let host = format!("{}{index}-{ns}", if ingress { "i" } else { "r" });
                routes.push(Route { ns: ns.clone(), index, ingress, host });
            }
        }
        Layout { namespaces, routes, pods_per_ns: k.pods_per_ns }
    }

    /// Which routes phase 2 edits: half Ingresses, half HTTPRoutes, spread over the namespaces.
    fn edited(&self, edits: usize) -> Vec<usize> {
        let by_kind = |ingress: bool, n: usize| {
            let mut idx: Vec<usize> = (0..self.routes.len()).filter(|&i| self.routes[i].ingress == ingress).collect();
            idx.sort_by_key(|&i| (self.routes[i].index, self.routes[i].ns.clone()));
            idx.truncate(n);
            idx
        };
        let mut out = by_kind(true, edits - edits / 2);
        out.extend(by_kind(false, edits / 2));
        out
    }
}

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    let api_version = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
    ApiResource { group: group.into(), version: version.into(), api_version, kind: kind.into(), plural: plural.into() }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    Pod,
    Service,
    Ingress,
    HTTPRoute,
    Gateway,
    GatewayClass,
}

impl Kind {
    fn resource(self) -> ApiResource {
        match self {
            Kind::Pod => ApiResource::erase::<Pod>(&()),
            Kind::Service => resource("", "v1", "Service", "services"),
            Kind::Ingress => ApiResource::erase::<Ingress>(&()),
            Kind::HTTPRoute => resource("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes"),
            Kind::Gateway => resource("gateway.networking.k8s.io", "v1", "Gateway", "gateways"),
            Kind::GatewayClass => resource("gateway.networking.k8s.io", "v1", "GatewayClass", "gatewayclasses"),
        }
    }
}

/// One request of the load.
enum Op {
    Create { kind: Kind, ns: String, obj: Value },
    Patch { kind: Kind, ns: String, name: String, patch: Value },
}

fn object(kind: Kind, ns: &str, name: &str, rest: Value) -> Value {
    let ar = kind.resource();
    let mut o = json!({"apiVersion": ar.api_version, "kind": ar.kind, "metadata": {"name": name, "namespace": ns}});
    if let (Some(o), Value::Object(rest)) = (o.as_object_mut(), rest) {
        for (k, v) in rest {
            if k == "metadata" {
                for (mk, mv) in v.as_object().cloned().unwrap_or_default() {
                    o["metadata"][mk] = mv;
                }
            } else {
                o.insert(k, v);
            }
        }
    }
    o
}

fn ingress_rules(r: &Route) -> Value {
    json!([{"host": r.host, "http": {"paths": [{"path": "/", "pathType": "Prefix",
        "backend": {"service": {"name": r.service(), "port": {"number": 80}}}}]}}])
}

/// Every object of the load, namespace by namespace: the Gateway, Services, Pods, then routes.
fn creates(layout: &Layout) -> Vec<Op> {
    let mut ops = Vec::new();
    for ns in &layout.namespaces {
        let create = |kind, name: &str, rest| Op::Create { kind, ns: ns.clone(), obj: object(kind, ns, name, rest) };
        let routes: Vec<&Route> = layout.routes.iter().filter(|r| &r.ns == ns).collect();
        ops.push(create(
            Kind::Gateway,
            GATEWAY,
            json!({"spec": {"gatewayClassName": CLASS, "listeners": [{"name": LISTENER, "protocol": "HTTP", "port": 80}]}}),
        ));
        for r in &routes {
            ops.push(create(
                Kind::Service,
                &r.service(),
                json!({"spec": {"selector": {"app": r.service()},
                    "ports": [{"name": "web", "port": 80, "targetPort": "http"}]}}),
            ));
        }
        for r in &routes {
            for (i, pod) in r.pods().iter().enumerate() {
                ops.push(create(
                    Kind::Pod,
                    pod,
                    json!({
                        "metadata": {"labels": {"app": r.service()},
                            "annotations": {TUNNELS: "{\"tunnels\":[]}", ADDRESSES: r.report()}},
                        "spec": {"nodeName": picotun_testground::kube_ground::NODES[i % 2], "containers": [
                            {"name": "app", "image": "registry.example/app:1",
                             "ports": [{"name": "http", "containerPort": TARGET_PORT}]},
                            {"name": "picotun-agent", "image": "picotun:bench", "args": ["agent"]},
                        ]},
                    }),
                ));
            }
        }
        for r in &routes {
            let spec = if r.ingress {
                json!({"spec": {"ingressClassName": CLASS, "rules": ingress_rules(r)}})
            } else {
                json!({"spec": {"parentRefs": [{"name": GATEWAY}], "hostnames": [r.host],
                    "rules": [{"backendRefs": [{"name": r.service(), "port": 80}]}]}})
            };
            ops.push(create(if r.ingress { Kind::Ingress } else { Kind::HTTPRoute }, &r.name(), spec));
        }
    }
    debug_assert_eq!(ops.len(), layout.namespaces.len() * (1 + layout.pods_per_ns / 2 * 2 + layout.pods_per_ns));
    ops
}

/// Phase 2: a new host on each edited route, and the new report on its pods.
fn edits(layout: &Layout, edited: &[usize]) -> Vec<Op> {
    let mut ops = Vec::new();
    for &i in edited {
        let r = layout.routes[i].edited();
        let (kind, patch) = if r.ingress {
            (Kind::Ingress, json!({"spec": {"rules": ingress_rules(&r)}}))
        } else {
            (Kind::HTTPRoute, json!({"spec": {"hostnames": [r.host]}}))
        };
        ops.push(Op::Patch { kind, ns: r.ns.clone(), name: r.name(), patch });
        for pod in r.pods() {
            let patch = json!({"metadata": {"annotations": {ADDRESSES: r.report()}}});
            ops.push(Op::Patch { kind: Kind::Pod, ns: r.ns.clone(), name: pod, patch });
        }
    }
    ops
}

// --- applying it --------------------------------------------------------------------------------

fn retryable(e: &kube::Error) -> bool {
    match e {
        // 403: a namespace's service account not there yet; 409 on a patch: a conflict.
        kube::Error::Api(s) => matches!(s.code, 403 | 409 | 429 | 500 | 503 | 504),
        _ => true,
    }
}

async fn run_op(client: kube::Client, op: Op) -> Result<u32, String> {
    let mut retries = 0;
    loop {
        let result = match &op {
            Op::Create { kind, ns, obj } => {
                let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &kind.resource());
                let obj: DynamicObject = serde_json::from_value(obj.clone()).map_err(|e| e.to_string())?;
                match api.create(&PostParams::default(), &obj).await {
                    // A retried create whose first attempt went through.
                    Err(kube::Error::Api(s)) if s.code == 409 && retries > 0 => Ok(()),
                    r => r.map(drop),
                }
            }
            Op::Patch { kind, ns, name, patch } => {
                let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &kind.resource());
                api.patch(name, &PatchParams::default(), &Patch::Merge(patch)).await.map(drop)
            }
        };
        match result {
            Ok(()) => return Ok(retries),
            Err(e) if retries < 20 && retryable(&e) => {
                retries += 1;
                tokio::time::sleep(Duration::from_millis(50 * u64::from(retries))).await;
            }
            Err(e) => {
                let what = match &op {
                    Op::Create { obj, .. } => format!("create {} {}", obj["kind"], obj["metadata"]["name"]),
                    Op::Patch { kind, name, .. } => format!("patch {kind:?} {name}"),
                };
                return Err(format!("{what}: {e}"));
            }
        }
    }
}

/// Runs every op with `concurrency` in flight; the wall time and the number of retries.
async fn run_ops(client: &kube::Client, ops: Vec<Op>, concurrency: usize) -> Result<(Duration, u32), String> {
    let started = Instant::now();
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut set = JoinSet::new();
    let mut retries = 0;
    for op in ops {
        let permit = permits.clone().acquire_owned().await.expect("semaphore open");
        let client = client.clone();
        set.spawn(async move {
            let r = run_op(client, op).await;
            drop(permit);
            r
        });
        while let Some(done) = set.try_join_next() {
            retries += done.map_err(|e| e.to_string())??;
        }
    }
    while let Some(done) = set.join_next().await {
        retries += done.map_err(|e| e.to_string())??;
    }
    Ok((started.elapsed(), retries))
}

/// The install, before any clock starts: classes, namespaces and their default service accounts
/// (Pods are refused until those exist).
async fn setup(client: &kube::Client, layout: &Layout) -> Result<(), String> {
    let e = |e: kube::Error| e.to_string();
    let class: IngressClass =
        serde_json::from_value(json!({"metadata": {"name": CLASS}, "spec": {"controller": INGRESS_CONTROLLER}}))
            .map_err(|e| e.to_string())?;
    Api::<IngressClass>::all(client.clone()).create(&PostParams::default(), &class).await.map_err(e)?;
    let gc: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
        "metadata": {"name": CLASS}, "spec": {"controllerName": GATEWAY_CONTROLLER}}))
    .map_err(|e| e.to_string())?;
    Api::<DynamicObject>::all_with(client.clone(), &Kind::GatewayClass.resource())
        .create(&PostParams::default(), &gc)
        .await
        .map_err(e)?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for ns in &layout.namespaces {
        let n: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).map_err(|e| e.to_string())?;
        namespaces.create(&PostParams::default(), &n).await.map_err(e)?;
    }
    let sas: Api<ServiceAccount> = Api::all(client.clone());
    let wanted: BTreeSet<&str> = layout.namespaces.iter().map(String::as_str).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let list = sas.list(&ListParams::default().fields("metadata.name=default")).await.map_err(e)?;
        let have = list.items.iter().filter(|s| wanted.contains(s.metadata.namespace.as_deref().unwrap_or(""))).count();
        if have == wanted.len() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("only {have} of {} namespaces got their default service account", wanted.len()));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// --- watching for convergence -------------------------------------------------------------------

type Key = (Kind, String, String);

/// What converged means for one object.
enum Want {
    Pod { tunnels: Value },
    Ingress { hostname: String },
    Route { hostname: String },
    Gateway { hosts: BTreeSet<String> },
    Class,
}

fn condition<'a>(conditions: &'a Value, type_: &str) -> &'a Value {
    conditions.as_array().and_then(|cs| cs.iter().find(|c| c["type"] == type_)).unwrap_or(&Value::Null)
}

/// True, and for this generation.
fn current(conditions: &Value, type_: &str, generation: i64) -> bool {
    let c = condition(conditions, type_);
    c["status"] == "True" && c["observedGeneration"].as_i64() == Some(generation)
}

fn satisfied(want: &Want, o: &DynamicObject) -> bool {
    let generation = o.metadata.generation.unwrap_or(0);
    let status = &o.data["status"];
    match want {
        Want::Pod { tunnels } => o
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(TUNNELS))
            .and_then(|t| serde_json::from_str::<Value>(t).ok())
            .is_some_and(|t| t == *tunnels),
        Want::Ingress { hostname } => status["loadBalancer"]["ingress"] == json!([{"hostname": hostname}]),
        Want::Route { hostname } => {
            o.data["spec"]["hostnames"] == json!([hostname])
                && status["parents"].as_array().into_iter().flatten().any(|p| {
                    p["controllerName"] == GATEWAY_CONTROLLER
                        && current(&p["conditions"], "Accepted", generation)
                        && current(&p["conditions"], "ResolvedRefs", generation)
                })
        }
        Want::Gateway { hosts } => {
            let have: BTreeSet<String> = status["addresses"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a["value"].as_str().map(str::to_string))
                .collect();
            current(&status["conditions"], "Programmed", generation) && have == *hosts
        }
        Want::Class => current(&status["conditions"], "Accepted", generation),
    }
}

fn wants(layout: &Layout, routes: &[Route]) -> HashMap<Key, Want> {
    let mut out = HashMap::new();
    out.insert((Kind::GatewayClass, String::new(), CLASS.to_string()), Want::Class);
    let mut gateways: BTreeMap<&str, BTreeSet<String>> =
        layout.namespaces.iter().map(|ns| (ns.as_str(), BTreeSet::new())).collect();
    for r in routes {
        for pod in r.pods() {
            out.insert((Kind::Pod, r.ns.clone(), pod), Want::Pod { tunnels: r.tunnels_file() });
        }
        let hostname = r.public_host();
        if r.ingress {
            out.insert((Kind::Ingress, r.ns.clone(), r.name()), Want::Ingress { hostname });
        } else {
            gateways.entry(r.ns.as_str()).or_default().insert(hostname);
            out.insert((Kind::HTTPRoute, r.ns.clone(), r.name()), Want::Route { hostname: r.host.clone() });
        }
    }
    for (ns, hosts) in gateways {
        out.insert((Kind::Gateway, ns.to_string(), GATEWAY.to_string()), Want::Gateway { hosts });
    }
    out
}

#[derive(Default)]
struct Tracker {
    want: HashMap<Key, Want>,
    seen: HashMap<Key, DynamicObject>,
    ok: HashSet<Key>,
    /// When every wanted object last became satisfied (None while some is not).
    converged_at: Option<Instant>,
    /// Watches that finished their initial list.
    synced: usize,
    /// Watch events by kind: what changed, and how often.
    events: BTreeMap<Kind, u64>,
    /// Changes of what the controller writes (a pod's tunnels file, an object's status), by
    /// object: more than one per object and phase is a rewrite worth explaining.
    changes: HashMap<Key, u32>,
    /// Per kind, the first object changed twice in a phase: (key, before, after).
    rewrites: BTreeMap<Kind, (Key, Value, Value)>,
}

impl Tracker {
    fn reevaluate(&mut self, key: &Key) {
        let good = match (self.want.get(key), self.seen.get(key)) {
            (Some(w), Some(o)) => satisfied(w, o),
            _ => false,
        };
        if good {
            self.ok.insert(key.clone());
        } else {
            self.ok.remove(key);
        }
        self.check();
    }

    fn check(&mut self) {
        if self.ok.len() == self.want.len() {
            self.converged_at.get_or_insert_with(Instant::now);
        } else {
            self.converged_at = None;
        }
    }

    fn set_want(&mut self, want: HashMap<Key, Want>) {
        self.want = want;
        self.ok.clear();
        let keys: Vec<Key> = self.want.keys().cloned().collect();
        for k in &keys {
            self.reevaluate(k);
        }
        self.check();
    }

    /// What is still missing, by kind, with a few examples.
    fn missing(&self) -> String {
        let mut by_kind: BTreeMap<Kind, Vec<&Key>> = BTreeMap::new();
        for k in self.want.keys().filter(|k| !self.ok.contains(*k)) {
            by_kind.entry(k.0).or_default().push(k);
        }
        let mut out = String::new();
        for (kind, keys) in by_kind {
            out.push_str(&format!("\n  {kind:?}: {} not converged", keys.len()));
            for k in keys.iter().take(3) {
                let state = match self.seen.get(*k) {
                    None => "not seen".to_string(),
                    Some(o) if kind == Kind::Pod => format!(
                        "tunnels={}",
                        o.metadata.annotations.as_ref().and_then(|a| a.get(TUNNELS)).cloned().unwrap_or_default()
                    ),
                    Some(o) => format!("generation={:?} status={}", o.metadata.generation, o.data["status"]),
                };
                out.push_str(&format!("\n    {}/{}: {state:.600}", k.1, k.2));
            }
        }
        out
    }
}

/// The next item of a stream. (The bench crate has no `futures`: a `WatchStreamExt` bound brings
/// `Stream::poll_next` along.)
async fn next<S: WatchStreamExt + Unpin>(s: &mut S) -> Option<S::Item> {
    std::future::poll_fn(|cx| Pin::new(&mut *s).poll_next(cx)).await
}

fn watch(client: &kube::Client, kind: Kind, tracker: Arc<Mutex<Tracker>>) -> tokio::task::AbortHandle {
    let ar = kind.resource();
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let task = tokio::spawn(async move {
        let mut stream = Box::pin(watcher(api, watcher::Config::default().any_semantic()).default_backoff());
        let key = |o: &DynamicObject| {
            (kind, o.metadata.namespace.clone().unwrap_or_default(), o.metadata.name.clone().unwrap_or_default())
        };
        while let Some(item) = next(&mut stream).await {
            let mut t = tracker.lock().unwrap_or_else(|p| p.into_inner());
            if let Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) = &item {
                *t.events.entry(kind).or_default() += 1;
            }
            match item {
                Ok(watcher::Event::Apply(mut o) | watcher::Event::InitApply(mut o)) => {
                    o.metadata.managed_fields = None;
                    let k = key(&o);
                    let before = t.seen.get(&k).map(written);
                    let after = written(&o);
                    if before.as_ref().is_some_and(|b| *b != after) {
                        let n = t.changes.entry(k.clone()).or_default();
                        *n += 1;
                        if *n == 2 && !t.rewrites.contains_key(&kind) {
                            t.rewrites.insert(kind, (k.clone(), before.unwrap_or_default(), after));
                        }
                    }
                    t.seen.insert(k.clone(), o);
                    t.reevaluate(&k);
                }
                Ok(watcher::Event::Delete(o)) => {
                    let k = key(&o);
                    t.seen.remove(&k);
                    t.reevaluate(&k);
                }
                Ok(watcher::Event::InitDone) => t.synced += 1,
                Ok(watcher::Event::Init) => {}
                Err(e) => eprintln!("[bench] watch of {kind:?} failed (retrying): {e}"),
            }
        }
    });
    task.abort_handle()
}

const WATCHED: [Kind; 5] = [Kind::Pod, Kind::Ingress, Kind::HTTPRoute, Kind::Gateway, Kind::GatewayClass];

/// Starts a watch per kind; their abort handles (stop them before the control plane goes).
async fn start_watches(client: &kube::Client, tracker: &Arc<Mutex<Tracker>>) -> Vec<tokio::task::AbortHandle> {
    let handles = WATCHED.iter().map(|&kind| watch(client, kind, tracker.clone())).collect();
    while tracker.lock().unwrap().synced < WATCHED.len() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    handles
}

/// What the controller writes on an object: a pod's tunnels file, anything else's status.
fn written(o: &DynamicObject) -> Value {
    match o.metadata.annotations.as_ref().and_then(|a| a.get(TUNNELS)) {
        Some(t) => Value::String(t.clone()),
        None => o.data["status"].clone(),
    }
}

/// Objects the controller changed since the last call, and how often, by kind; with the first
/// object it changed twice.
fn take_changes(tracker: &Arc<Mutex<Tracker>>) -> String {
    let mut t = tracker.lock().unwrap();
    let changes = std::mem::take(&mut t.changes);
    let mut by_kind: BTreeMap<Kind, (u32, u32)> = BTreeMap::new();
    for (k, n) in &changes {
        let e = by_kind.entry(k.0).or_default();
        e.0 += 1;
        e.1 += n;
    }
    let mut out: Vec<String> = by_kind.iter().map(|(k, (o, n))| format!("{k:?} {n} on {o}")).collect();
    if out.is_empty() {
        out.push("none".into());
    }
    let mut text = out.join(", ");
    for ((kind, ns, name), before, after) in std::mem::take(&mut t.rewrites).into_values() {
        text.push_str(&format!(
            "\n[bench]   {kind:?} {ns}/{name} changed again:\n    from {before:.1500}\n    to   {after:.1500}"
        ));
    }
    text
}

/// Watch events by kind since the last call.
fn take_events(tracker: &Arc<Mutex<Tracker>>) -> String {
    let events = std::mem::take(&mut tracker.lock().unwrap().events);
    let parts: Vec<String> = events.iter().map(|(k, n)| format!("{k:?} {n}")).collect();
    if parts.is_empty() { "none".into() } else { parts.join(", ") }
}

/// Waits until every wanted object is satisfied; the instant it became so.
async fn converged(tracker: &Arc<Mutex<Tracker>>, started: Instant, timeout: Duration) -> Result<Instant, String> {
    loop {
        {
            let t = tracker.lock().unwrap();
            if let Some(at) = t.converged_at {
                return Ok(at);
            }
            if started.elapsed() > timeout {
                return Err(format!("not converged after {} s:{}", timeout.as_secs(), t.missing()));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// --- processes: CPU and memory ------------------------------------------------------------------

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of a process, in ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: field 3 (state) is f[0], utime (14) f[11], stime (15) f[12].
    f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
}

fn status_kb(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(&format!("{field}:")))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0.0)
}

/// CPU seconds per process name between two samples.
struct Cpu {
    pids: Vec<(String, u32)>,
    tick: f64,
}

impl Cpu {
    fn sample(&self) -> BTreeMap<String, u64> {
        self.pids.iter().map(|(n, p)| (n.clone(), cpu_ticks(*p))).collect()
    }

    fn since(&self, before: &BTreeMap<String, u64>) -> BTreeMap<String, f64> {
        self.sample()
            .into_iter()
            .map(|(n, t)| (n.clone(), (t - before.get(&n).copied().unwrap_or(0)) as f64 / self.tick))
            .collect()
    }
}

fn cpu_line(cpu: &BTreeMap<String, f64>) -> String {
    cpu.iter().map(|(n, s)| format!("{n} {s:.1}")).collect::<Vec<_>>().join(", ")
}

// --- the controller's metrics -------------------------------------------------------------------

async fn metrics(admin: &str) -> BTreeMap<String, f64> {
    let body = http::get(admin, "bench", "/metrics").await.map(|r| r.body).unwrap_or_default();
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(k, v)| v.parse::<f64>().ok().map(|v| (k.to_string(), v)))
        .collect()
}

/// What the controller did between two snapshots, in words.
fn describe(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> (f64, String) {
    let d = |k: &str| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
    let passes = d("picotun_controller_reconciles_total");
    let seconds = d("picotun_controller_reconcile_duration_seconds_sum");
    let count = d("picotun_controller_reconcile_duration_seconds_count");
    // The slowest pass: the smallest bucket holding every pass of the window.
    let mut buckets: Vec<(f64, f64)> = after
        .keys()
        .filter_map(|k| {
            let le =
                k.strip_prefix("picotun_controller_reconcile_duration_seconds_bucket{le=\"")?.strip_suffix("\"}")?;
            Some((if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? }, d(k)))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let max = buckets.iter().find(|(_, c)| *c >= count).map_or(f64::NAN, |(le, _)| *le);
    let mut writes = 0.0;
    let mut parts = Vec::new();
    for k in after.keys().filter(|k| {
        k.starts_with("picotun_controller_writes_total{")
            || k.starts_with("picotun_controller_errors_total{")
            || k.starts_with("picotun_controller_write_retries_total")
            // Writes of a value already written to the object: none while nobody else changes it.
            || k.starts_with("picotun_controller_write_repeats_total")
    }) {
        let n = d(k);
        if n > 0.0 {
            if k.contains("result=\"ok\"") {
                writes += n;
            }
            parts.push(format!("{}={n}", k.trim_start_matches("picotun_controller_")));
        }
    }
    let avg = if count > 0.0 { seconds / count * 1000.0 } else { 0.0 };
    let text = format!(
        "{passes} passes, {seconds:.2} s in passes (avg {avg:.1} ms, slowest <= {max} s); {writes} writes ok: {}",
        if parts.is_empty() { "none".to_string() } else { parts.join(" ") }
    );
    (writes, text)
}

// --- the runs -----------------------------------------------------------------------------------

struct Ours {
    converge: f64,
    edit_converge: f64,
    peak_rss_mb: f64,
    controller_cpu: f64,
    apiserver_etcd_cpu: f64,
    /// Writes of a value the controller had already written to the same object.
    repeats: f64,
    /// Write calls that changed something, both phases, and one per object of phase 1.
    writes: f64,
    ideal: usize,
}

struct Baseline {
    create: f64,
    edit: f64,
}

fn log_dir(k: &Knobs, tmp: &Path) -> PathBuf {
    let dir = k.log_dir.clone().unwrap_or_else(|| tmp.to_path_buf());
    std::fs::create_dir_all(&dir).expect("log directory");
    dir
}

async fn start_ground(what: &str) -> Result<ControlPlane, String> {
    eprintln!("[bench] starting a fresh control plane ({what})");
    let t = Instant::now();
    let ground = ControlPlane::start(Default::default()).await.map_err(|e| e.to_string())?;
    eprintln!("[bench] control plane up in {:.1} s", t.elapsed().as_secs_f64());
    Ok(ground)
}

/// Watches a converged cluster for `settle`: a converged controller should write nothing more.
async fn settle(
    k: &Knobs,
    admin: &str,
    tracker: &Arc<Mutex<Tracker>>,
    cpu: &Cpu,
    before: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    take_events(tracker);
    take_changes(tracker);
    let c = cpu.sample();
    tokio::time::sleep(k.settle).await;
    let after = metrics(admin).await;
    let controller_cpu = cpu.since(&c).get("picotun-controller").copied().unwrap_or(0.0);
    let (writes, text) = describe(before, &after);
    eprintln!(
        "[bench] {} s after convergence: {text}; controller CPU {controller_cpu:.2} s; watch events: {}; changes: {}",
        k.settle.as_secs(),
        take_events(tracker),
        take_changes(tracker)
    );
    if writes > 0.0 {
        eprintln!("[bench] WARNING: the controller kept writing after everything had converged");
    }
    after
}

/// Waits until kwok has reported every pod Running, so the edits of phase 2 (and of the baseline)
/// meet a quiet cluster.
async fn wait_pods_running(client: &kube::Client, pods: usize) -> Result<(), String> {
    let started = Instant::now();
    let api: Api<Pod> = Api::all(client.clone());
    let params = ListParams::default().fields("status.phase=Running").labels("app");
    loop {
        let running = api.list_metadata(&params).await.map_err(|e| e.to_string())?.items.len();
        if running >= pods {
            eprintln!("[bench] all {pods} pods Running ({:.1} s of waiting)", started.elapsed().as_secs_f64());
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(300) {
            return Err(format!("only {running} of {pods} pods Running after 300 s"));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The Events the controller published so far, by reason.
async fn events_published(client: &kube::Client) -> String {
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::all(client.clone());
    let Ok(list) = api.list(&ListParams::default()).await else { return "(cannot list Events)".into() };
    let mut by_reason: BTreeMap<String, usize> = BTreeMap::new();
    for e in list.items.iter().filter(|e| e.reporting_controller.as_deref() == Some("picotun-controller")) {
        *by_reason.entry(e.reason.clone().unwrap_or_default()).or_default() += 1;
    }
    let total: usize = by_reason.values().sum();
    let parts: Vec<String> = by_reason.iter().map(|(r, n)| format!("{r} {n}")).collect();
    format!("{total} ({})", parts.join(", "))
}

async fn run_ours(k: &Knobs, layout: &Layout, binary: &str, tmp: &Path) -> Result<Ours, String> {
    let ground = start_ground("with picotun controller").await?;
    let client = ground.client().await.map_err(|e| e.to_string())?;
    setup(&client, layout).await?;

    let admin = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(binary);
    cmd.args(["controller", "--admin-addr", &admin, "--namespace", "default"])
        .args(["--leader-election", if k.leader_election { "true" } else { "false" }])
        // Both pods of a Service open its tunnel, as the expected tunnels files say (without
        // load balancing one of them would be told to stand by).
        .args(["--server-load-balancing", "true"])
        .args(&k.controller_args)
        .env("KUBECONFIG", ground.kubeconfig())
        .env("PICOTUN_LOG", &k.controller_log);
    let log = log_dir(k, tmp).join("controller.log");
    let mut controller = Proc::spawn("picotun-controller", cmd, &log).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http::get(&admin, "bench", "/ready").await.is_ok_and(|r| r.status == 200) {
        if Instant::now() > deadline || !controller.is_running() {
            return Err(format!("the controller did not get ready:\n{}", controller.log_tail(30)));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = controller.pid();
    eprintln!(
        "[bench] controller ready (pid {pid}, RSS {:.1} MB, log {})",
        status_kb(pid, "VmRSS") / 1024.0,
        log.display()
    );

    let mut pids = ground.pids();
    pids.push(("picotun-controller".into(), pid));
    pids.push(("bench".into(), std::process::id()));
    let cpu = Cpu { pids, tick: clock_ticks() };

    let tracker = Arc::new(Mutex::new(Tracker::default()));
    let watches = start_watches(&client, &tracker).await;
    tracker.lock().unwrap().set_want(wants(layout, &layout.routes));

    // Phase 1: everything at once.
    let ops = creates(layout);
    let n = ops.len();
    eprintln!(
        "[bench] phase 1: applying {n} objects ({} routes, {} pods)",
        layout.routes.len(),
        layout.routes.len() * 2
    );
    let m0 = metrics(&admin).await;
    let c0 = cpu.sample();
    let t0 = Instant::now();
    let (applied, retries) = run_ops(&client, ops, k.concurrency).await?;
    eprintln!("[bench] phase 1: all {n} creates accepted after {:.2} s ({retries} retries)", applied.as_secs_f64());
    let done = converged(&tracker, t0, k.timeout).await.map_err(|e| format!("phase 1: {e}"))?;
    let cpu1 = cpu.since(&c0);
    let converge = done.duration_since(t0).as_secs_f64();
    let m1 = metrics(&admin).await;
    let rss1 = status_kb(pid, "VmHWM") / 1024.0;
    eprintln!("[bench] phase 1: converged after {converge:.2} s; controller peak RSS {rss1:.1} MB");
    eprintln!("[bench] phase 1 CPU seconds: {}", cpu_line(&cpu1));
    eprintln!("[bench] phase 1 controller: {}", describe(&m0, &m1).1);
    let ideal = layout.routes.len() * 3 + layout.namespaces.len() + 1;
    eprintln!(
        "[bench] phase 1: one write per object would be {ideal} writes (pods, Ingresses, HTTPRoutes, Gateways, the GatewayClass)"
    );

    eprintln!("[bench] phase 1 watch events: {}", take_events(&tracker));
    eprintln!("[bench] phase 1 Events published by the controller: {}", events_published(&client).await);
    eprintln!("[bench] phase 1 changes by the controller (writes seen): {}", take_changes(&tracker));
    let m2 = settle(k, &admin, &tracker, &cpu, &m1).await;
    wait_pods_running(&client, layout.routes.len() * 2).await?;

    // Phase 2: edit routes.
    let edited = layout.edited(k.edits);
    let mut routes = layout.routes.clone();
    for &i in &edited {
        routes[i] = routes[i].edited();
    }
    tracker.lock().unwrap().set_want(wants(layout, &routes));
    let ops = edits(layout, &edited);
    take_events(&tracker);
    take_changes(&tracker);
    let epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    eprintln!(
        "[bench] phase 2: editing {} routes ({} requests with the pods' new reports) at {:.3} (Unix time)",
        edited.len(),
        ops.len(),
        epoch.as_secs_f64()
    );
    let c2 = cpu.sample();
    let t2 = Instant::now();
    let (applied, _) = run_ops(&client, ops, k.concurrency).await?;
    eprintln!("[bench] phase 2: edits accepted after {:.2} s", applied.as_secs_f64());
    let done = converged(&tracker, t2, k.timeout).await.map_err(|e| format!("phase 2: {e}"))?;
    let edit_converge = done.duration_since(t2).as_secs_f64();
    let cpu2 = cpu.since(&c2);
    let m3 = metrics(&admin).await;
    eprintln!("[bench] phase 2: converged after {edit_converge:.2} s");
    eprintln!("[bench] phase 2 CPU seconds: {}", cpu_line(&cpu2));
    eprintln!("[bench] phase 2 controller: {}", describe(&m2, &m3).1);
    eprintln!("[bench] phase 2 watch events: {}", take_events(&tracker));
    eprintln!("[bench] phase 2 changes by the controller (writes seen): {}", take_changes(&tracker));
    let m4 = settle(k, &admin, &tracker, &cpu, &m3).await;
    let (writes, _) = describe(&m0, &m4);
    let repeats = m4.get("picotun_controller_write_repeats_total").copied().unwrap_or(0.0);
    let peak_rss_mb = status_kb(pid, "VmHWM") / 1024.0;
    eprintln!("[bench] controller peak RSS {peak_rss_mb:.1} MB, now {:.1} MB", status_kb(pid, "VmRSS") / 1024.0);

    for w in watches {
        w.abort();
    }
    controller.stop(Duration::from_secs(3));
    ground.stop();
    let get = |n: &str| cpu1.get(n).copied().unwrap_or(0.0);
    Ok(Ours {
        converge,
        edit_converge,
        peak_rss_mb,
        controller_cpu: get("picotun-controller"),
        apiserver_etcd_cpu: get("kube-apiserver") + get("etcd"),
        repeats,
        writes,
        ideal,
    })
}

async fn run_baseline(k: &Knobs, layout: &Layout) -> Result<Baseline, String> {
    let ground = start_ground("baseline: no controller").await?;
    let client = ground.client().await.map_err(|e| e.to_string())?;
    setup(&client, layout).await?;
    let mut pids = ground.pids();
    pids.push(("bench".into(), std::process::id()));
    let cpu = Cpu { pids, tick: clock_ticks() };
    let ops = creates(layout);
    let n = ops.len();
    let c0 = cpu.sample();
    let (create, retries) = run_ops(&client, ops, k.concurrency).await?;
    eprintln!("[bench] baseline: all {n} creates accepted after {:.2} s ({retries} retries)", create.as_secs_f64());
    eprintln!("[bench] baseline CPU seconds: {}", cpu_line(&cpu.since(&c0)));
    // Let the ground's own controllers (kwok, EndpointSlices) settle as they did before phase 2.
    wait_pods_running(&client, layout.routes.len() * 2).await?;
    tokio::time::sleep(k.settle).await;
    let edited = layout.edited(k.edits);
    let (edit, _) = run_ops(&client, edits(layout, &edited), k.concurrency).await?;
    eprintln!(
        "[bench] baseline: {} route edits and their pods' reports accepted after {:.2} s",
        edited.len(),
        edit.as_secs_f64()
    );
    ground.stop();
    Ok(Baseline { create: create.as_secs_f64(), edit: edit.as_secs_f64() })
}

fn line(metric: &str, ours: f64, baseline: f64, precision: usize) {
    let ratio = if baseline == 0.0 { "inf".to_string() } else { format!("{:.2}", ours / baseline) };
    println!("bench: {metric} ours={ours:.precision$} baseline={baseline:.precision$} ratio={ratio}");
}

#[tokio::main]
async fn main() {
    let Some(binary) = std::env::args().nth(1) else {
        eprintln!("usage: controllerload PICOTUN_BINARY   (knobs: see bench/controller.sh)");
        std::process::exit(2);
    };
    let k = Knobs::from_env();
    let layout = Layout::new(&k);
    let tmp = tempfile::tempdir().expect("temporary directory");
    eprintln!(
        "[bench] {} namespaces x {} pods: {} pods, {} Services, {} routes; {} edits; {} requests in flight",
        k.namespaces,
        k.pods_per_ns,
        k.namespaces * k.pods_per_ns,
        layout.routes.len(),
        layout.routes.len(),
        k.edits.min(layout.routes.len()),
        k.concurrency
    );
    let ours = match run_ours(&k, &layout, &binary, tmp.path()).await {
        Ok(o) => o,
        Err(e) => {
            eprintln!("[bench] FAILED: {e}");
            std::process::exit(1);
        }
    };
    let base = match run_baseline(&k, &layout).await {
        Ok(b) => b,
        Err(e) => {
            eprintln!("[bench] FAILED (baseline): {e}");
            std::process::exit(1);
        }
    };
    line("controller_converge_seconds", ours.converge, base.create, 2);
    line("controller_edit_converge_seconds", ours.edit_converge, base.edit, 2);
    // No process does what the controller does without it, so there is no measured baseline for
    // its memory: the figure is printed alone, with the goal beside it (never as `baseline=`).
    println!("bench: controller_peak_rss_mb ours={:.1} goal=150", ours.peak_rss_mb);
    let share = ours.controller_cpu / (ours.controller_cpu + ours.apiserver_etcd_cpu) * 100.0;
    println!(
        "# controller_cpu_share: ours = the controller's CPU seconds in phase 1, baseline = kube-apiserver + etcd CPU seconds in the same window; the controller's share of the three = {share:.1}%"
    );
    line("controller_cpu_share", ours.controller_cpu, ours.apiserver_etcd_cpu, 2);
    // Counts, not timings: no baseline. Repeats should be 0 (no write repeated for an object
    // nobody else changed); writes against one per object of phase 1 plus the edits of phase 2.
    println!("bench: controller_write_repeats ours={}", ours.repeats);
    println!("bench: controller_writes ours={} one_per_object={}", ours.writes, ours.ideal);
}
