//! A real Kubernetes control plane as local processes: etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler and kwok with fake Nodes, so Deployments become
//! Running Pods. What controller-runtime's envtest does, plus the controllers and kwok.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::json;
use tokio::sync::OnceCell;

use crate::crossns::EgressProxy;
use crate::node::{NodeSetup, RealNode};
use crate::pki::{Ca, Usage, key_pair_pem};
use crate::process::{self, ProcGroup, StartTimes};
use crate::{Error, Result, bins, crds, free_port, wait_for, wait_for_unless, write_file};

/// Whether a test may run against the cluster `KUBECONFIG` points at instead of its own ground.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    /// Use `$KUBECONFIG` when it is set (the cluster must have the CRDs and schedulable nodes).
    Allowed,
    /// Always use the test ground this process starts.
    NotAllowed,
}

/// Names of the fake nodes kwok manages.
pub const NODES: [&str; 2] = ["kwok-node-0", "kwok-node-1"];
/// The name of the real node (kubelet + containerd), when the ground has one.
pub const REAL_NODE: &str = "real-node-0";
/// The taint the kwok nodes carry when a real node is beside them, so that ordinary workloads
/// run for real and only what tolerates it (scale tests) lands on kwok.
pub const KWOK_TAINT: (&str, &str) = ("kwok.x-k8s.io/node", "fake");

/// How to start a control plane.
#[derive(Clone, Debug, Default)]
pub struct StartOptions {
    /// Keep the state directory (certificates, kubeconfig, logs) when this process exits.
    pub keep_dir: bool,
    /// Where to put it; a fresh temporary directory when unset.
    pub dir: Option<PathBuf>,
    /// Start a real node ([`REAL_NODE`]: kubelet, containerd, runc, CNI) beside the kwok nodes;
    /// the kwok nodes are then tainted [`KWOK_TAINT`].
    pub real_node: bool,
}

/// A running control plane (or an existing cluster reached through `$KUBECONFIG`).
pub struct ControlPlane {
    kubeconfig: PathBuf,
    dir: PathBuf,
    ca_pem: Option<String>,
    procs: ProcGroup,
    existing: bool,
    egress: Option<EgressProxy>,
    node: Option<RealNode>,
}

static OWN: OnceCell<std::result::Result<ControlPlane, String>> = OnceCell::const_new();
static EXISTING: OnceCell<std::result::Result<ControlPlane, String>> = OnceCell::const_new();

impl ControlPlane {
    /// The control plane shared by every test of this test binary, started on first use.
    /// A failed start is remembered, so later tests fail fast with the same message.
    pub async fn shared(existing: Existing) -> Result<&'static ControlPlane> {
        let use_existing = existing == Existing::Allowed && std::env::var_os("KUBECONFIG").is_some();
        let cell = if use_existing { &EXISTING } else { &OWN };
        let res = cell
            .get_or_init(|| async move {
                let started =
                    if use_existing { Self::existing().await } else { Self::start(StartOptions::default()).await };
                started.map_err(|e| e.to_string())
            })
            .await;
        res.as_ref().map_err(|e| Error::Setup(format!("the test ground did not start: {e}")))
    }

    /// Wraps the cluster `$KUBECONFIG` points at.
    pub async fn existing() -> Result<ControlPlane> {
        let path = PathBuf::from(
            std::env::var_os("KUBECONFIG").ok_or_else(|| Error::Kubeconfig("KUBECONFIG is not set".into()))?,
        );
        let plane = ControlPlane {
            kubeconfig: path.clone(),
            dir: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            ca_pem: None,
            procs: ProcGroup::new(path.parent().unwrap_or(Path::new("."))),
            existing: true,
            egress: None,
            node: None,
        };
        plane.client().await?.apiserver_version().await?;
        Ok(plane)
    }

    /// Starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok, installs the
    /// Gateway API and cert-manager CRDs and waits until Nodes are Ready and namespace `default`
    /// has its service account.
    pub async fn start(opts: StartOptions) -> Result<ControlPlane> {
        let started = Instant::now();
        let dir = match &opts.dir {
            Some(d) => {
                std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
                d.clone()
            }
            None => tempfile::Builder::new()
                .prefix("picotun-ground-")
                .tempdir()
                .map_err(|e| Error::io(&std::env::temp_dir(), e))?
                .keep(),
        };
        if !opts.keep_dir {
            process::remove_at_exit(&dir);
        }
        let mut plane = ControlPlane {
            kubeconfig: dir.join("kubeconfig"),
            dir: dir.clone(),
            ca_pem: None,
            procs: ProcGroup::new(&dir),
            existing: false,
            egress: None,
            node: None,
        };
        if let Err(e) = plane.boot(&opts).await {
            // Whatever was started is stopped now, not at exit.
            plane.stop();
            return Err(e);
        }
        tracing::info!(dir = %dir.display(), secs = started.elapsed().as_secs_f32(), "test ground control plane ready");
        Ok(plane)
    }

    async fn boot(&mut self, opts: &StartOptions) -> Result<()> {
        let mut times = StartTimes::default();
        let dir = self.dir.clone();
        let pki = dir.join("pki");
        std::fs::create_dir_all(&pki).map_err(|e| Error::io(&pki, e))?;
        let loopback: IpAddr = [127, 0, 0, 1].into();

        // PKI: one CA signs the apiserver's serving certificate and every client certificate.
        let ca = Ca::new("picotun-testground-ca")?;
        write_file(&pki.join("ca.crt"), ca.cert_pem())?;
        let serving = ca.issue(
            "kube-apiserver",
            &[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            &[loopback, [10, 0, 0, 1].into()],
            &[],
            Usage::Server,
        )?;
        let (serving_crt, serving_key) = serving.write(&pki, "apiserver")?;
        let admin = ca.issue("admin", &[], &[], &["system:masters"], Usage::Client)?;
        let (admin_crt, admin_key) = admin.write(&pki, "admin")?;
        // The apiserver's identity towards kubelets (logs, exec, port-forward).
        let kubelet_client = ca.issue("kube-apiserver-kubelet-client", &[], &[], &["system:masters"], Usage::Client)?;
        let (kubelet_client_crt, kubelet_client_key) = kubelet_client.write(&pki, "apiserver-kubelet-client")?;
        // With a real node, everything the apiserver dials "in the cluster" (kubelets, webhooks)
        // goes through this proxy, which can reach into the node's network namespace (see
        // crossns). Without one, the apiserver dials loopback webhooks directly, as before.
        let mut egress_flags = Vec::new();
        if opts.real_node {
            let egress = EgressProxy::start(&dir.join("egress.sock"))?;
            let egress_config = dir.join("egress-selector.yaml");
            write_file(&egress_config, egress.egress_selector_config())?;
            self.egress = Some(egress);
            egress_flags.push(format!("--egress-selector-config-file={}", egress_config.display()));
            // Service webhooks are called at a ready endpoint's address (a pod IP on the real
            // node, reached through the egress proxy): there is no kube-proxy for ClusterIPs.
            egress_flags.push("--enable-aggregator-routing=true".into());
        }
        let sa_key = pki.join("service-account.key");
        let sa_pub = pki.join("service-account.pub");
        let (sa_private, sa_public) = key_pair_pem()?;
        write_file(&sa_key, sa_private)?;
        write_file(&sa_pub, sa_public)?;
        self.ca_pem = Some(ca.cert_pem());

        // etcd
        let etcd_port = free_port();
        let etcd_peer_port = free_port();
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let mut cmd = Command::new(bins::bin("etcd")?);
        cmd.args([
            "--name=ground".to_string(),
            format!("--data-dir={}", dir.join("etcd").display()),
            "--unsafe-no-fsync=true".into(),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer_port}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer_port}"),
            format!("--initial-cluster=ground=http://127.0.0.1:{etcd_peer_port}"),
            "--listen-metrics-urls=".into(),
            "--log-level=warn".into(),
        ]);
        self.spawn("etcd", cmd)?;
        self.wait_http_ok("etcd", etcd_port, "/health", "\"health\":\"true\"", Duration::from_secs(30)).await?;
        times.lap("etcd");

        // kube-apiserver
        let api_port = free_port();
        let pki_path = |f: &str| pki.join(f).display().to_string();
        let mut cmd = Command::new(bins::bin("kube-apiserver")?);
        cmd.args([
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            // Without it the apiserver looks for a default route and dies on a machine with none.
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={api_port}"),
            format!("--tls-cert-file={}", serving_crt.display()),
            format!("--tls-private-key-file={}", serving_key.display()),
            format!("--client-ca-file={}", pki_path("ca.crt")),
            // Node + NodeRestriction: the real node's kubelet gets exactly a kubelet's rights.
            "--authorization-mode=Node,RBAC".into(),
            "--enable-admission-plugins=NodeRestriction".into(),
            format!("--kubelet-client-certificate={}", kubelet_client_crt.display()),
            format!("--kubelet-client-key={}", kubelet_client_key.display()),
            format!("--kubelet-certificate-authority={}", pki_path("ca.crt")),
            // Without it logs/exec try DNS for the node's name.
            "--kubelet-preferred-address-types=InternalIP".into(),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--allow-privileged=true".into(),
            format!("--service-account-issuer=https://127.0.0.1:{api_port}/"),
            format!("--service-account-key-file={}", sa_pub.display()),
            format!("--service-account-signing-key-file={}", sa_key.display()),
            "--api-audiences=https://kubernetes.default.svc".into(),
            // No kubelets, no kube-proxy: nothing reconciles the `kubernetes` Service endpoints.
            "--endpoint-reconciler-type=none".into(),
            "--profiling=false".into(),
            "--v=0".into(),
        ]);
        cmd.args(&egress_flags);
        self.spawn("kube-apiserver", cmd)?;
        self.write_kubeconfig(api_port, &pki_path("ca.crt"), &admin_crt, &admin_key)?;
        self.wait_apiserver_ready(Duration::from_secs(90)).await?;
        times.lap("kube-apiserver");

        // kube-controller-manager: Deployments -> ReplicaSets -> Pods, garbage collection,
        // namespace deletion, service accounts and their tokens, EndpointSlices, Jobs.
        let mut cmd = Command::new(bins::bin("kube-controller-manager")?);
        cmd.args([
            format!("--kubeconfig={}", self.kubeconfig.display()),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            "--secure-port=0".into(),
            "--controllers=deployment-controller,replicaset-controller,statefulset-controller,\
             daemonset-controller,job-controller,cronjob-controller,garbage-collector-controller,\
             namespace-controller,serviceaccount-controller,serviceaccount-token-controller,\
             root-ca-certificate-publisher-controller,endpointslice-controller,disruption-controller"
                .into(),
            format!("--service-account-private-key-file={}", sa_key.display()),
            format!("--root-ca-file={}", pki_path("ca.crt")),
            "--use-service-account-credentials=false".into(),
            "--concurrent-deployment-syncs=5".into(),
        ]);
        self.spawn("kube-controller-manager", cmd)?;

        let mut cmd = Command::new(bins::bin("kube-scheduler")?);
        cmd.args([
            format!("--kubeconfig={}", self.kubeconfig.display()),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            "--secure-port=0".into(),
        ]);
        self.spawn("kube-scheduler", cmd)?;

        let client = self.client().await?;
        crds::install_all(&client).await?;
        times.lap("CRDs");

        if opts.real_node {
            let node_dir = dir.join("node");
            let ca_file = pki.join("ca.crt");
            let setup = NodeSetup {
                name: REAL_NODE,
                ca: &ca,
                ca_file: &ca_file,
                api_port,
                dir: &node_dir,
                labels: &[("picotun.dev/real-node", "true")],
            };
            let (node, node_times) = RealNode::start(setup, &client).await?;
            if let Some(egress) = &self.egress {
                egress.route_cluster_to(Some(node.netns().clone()));
            }
            tracing::info!(node = REAL_NODE, times = %node_times, "real node ready");
            eprintln!("[testground] real node {REAL_NODE} ready: {node_times}");
            self.node = Some(node);
            times.lap("real node");
        }

        // kwok: fake Nodes that report Ready and Pods that reach Running.
        self.create_nodes(&client).await?;
        let stages = dir.join("kwok-stages.yaml");
        write_file(&stages, kwok_stages()?)?;
        let mut cmd = Command::new(bins::bin("kwok")?);
        cmd.args([
            format!("--kubeconfig={}", self.kubeconfig.display()),
            // Only the fake nodes: a real node beside them is its kubelet's. (Not also
            // --manage-all-nodes=false: kwok calls any mention of it a conflict.)
            "--manage-nodes-with-label-selector=type=kwok".into(),
            format!("--config={}", stages.display()),
            format!("--server-address=127.0.0.1:{}", free_port()),
            "--node-ip=127.0.0.1".into(),
        ]);
        self.spawn("kwok", cmd)?;
        self.wait_nodes_ready(&client, Duration::from_secs(60)).await?;
        untaint_nodes(&client, opts.real_node).await?;
        wait_default_service_account(&client, "default", Duration::from_secs(60)).await?;
        times.lap("kwok nodes and the default service account");
        self.check_running()?;
        tracing::info!(%times, "test ground started");
        if opts.real_node {
            // A person is watching (`scripts/testground up`, the demo): say where the time went.
            eprintln!("[testground] started: {times}");
        }
        Ok(())
    }

    fn spawn(&self, name: &str, cmd: Command) -> Result<()> {
        self.procs.spawn(name, cmd)
    }

    /// Fails (with the log tail) if any process of the ground has exited.
    pub fn check_running(&self) -> Result<()> {
        self.procs.check_running()
    }

    fn write_kubeconfig(&self, api_port: u16, ca: &str, crt: &Path, key: &Path) -> Result<()> {
        let kubeconfig = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "picotun-ground", "cluster": {
                "server": format!("https://127.0.0.1:{api_port}"),
                "certificate-authority": ca,
            }}],
            "users": [{"name": "admin", "user": {
                "client-certificate": crt.display().to_string(),
                "client-key": key.display().to_string(),
            }}],
            "contexts": [{"name": "picotun-ground", "context": {"cluster": "picotun-ground", "user": "admin", "namespace": "default"}}],
            "current-context": "picotun-ground",
        });
        let yaml = serde_saphyr::to_string(&kubeconfig).map_err(|e| Error::Kubeconfig(e.to_string()))?;
        write_file(&self.kubeconfig, yaml)
    }

    async fn wait_http_ok(&self, what: &str, port: u16, path: &str, needle: &str, timeout: Duration) -> Result<()> {
        wait_for_unless(
            what,
            timeout,
            Duration::from_millis(100),
            || self.check_running().err(),
            || async {
                match crate::http::get(&format!("127.0.0.1:{port}"), "127.0.0.1", path).await {
                    Ok(resp) if resp.body.contains(needle) => Ok(Some(())),
                    Ok(resp) => Err(format!("{} {}", resp.status, resp.body)),
                    Err(e) => Err(e.to_string()),
                }
            },
        )
        .await
    }

    async fn wait_apiserver_ready(&self, timeout: Duration) -> Result<()> {
        let client = self.client().await?;
        wait_for_unless(
            "kube-apiserver /readyz",
            timeout,
            Duration::from_millis(250),
            || self.check_running().err(),
            || async {
                let req = http::Request::get("/readyz").body(Vec::new()).map_err(|e| e.to_string())?;
                match client.request_text(req).await {
                    Ok(body) if body.trim() == "ok" => Ok(Some(())),
                    Ok(body) => Err(body),
                    Err(e) => Err(e.to_string()),
                }
            },
        )
        .await?;
        // /readyz can be ok a moment before the default namespace exists.
        let namespaces: Api<Namespace> = Api::all(client);
        wait_for("namespace default", timeout, Duration::from_millis(200), || async {
            namespaces.get_opt("default").await.map(|n| n.map(|_| ())).map_err(|e| e.to_string())
        })
        .await
    }

    async fn create_nodes(&self, client: &Client) -> Result<()> {
        let nodes: Api<Node> = Api::all(client.clone());
        for name in NODES {
            let node: Node = serde_json::from_value(json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "annotations": {"node.alpha.kubernetes.io/ttl": "0", "kwok.x-k8s.io/node": "fake"},
                    "labels": {
                        "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64", "type": "kwok",
                        "topology.kubernetes.io/zone": format!("zone-{}", &name[name.len() - 1..]),
                    },
                },
                // No taint: every Pod the tests create should land on a kwok node.
                "spec": {},
                "status": {
                    "allocatable": {"cpu": "32", "memory": "256Gi", "pods": "110"},
                    "capacity": {"cpu": "32", "memory": "256Gi", "pods": "110"},
                },
            }))
            .expect("static node manifest");
            match nodes.create(&PostParams::default(), &node).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    async fn wait_nodes_ready(&self, client: &Client, timeout: Duration) -> Result<()> {
        let nodes: Api<Node> = Api::all(client.clone());
        wait_for_unless(
            "kwok nodes Ready",
            timeout,
            Duration::from_millis(200),
            || self.check_running().err(),
            || async {
                let list = nodes.list(&Default::default()).await.map_err(|e| e.to_string())?;
                let ready = list
                    .items
                    .iter()
                    .filter(|n| {
                        n.status
                            .as_ref()
                            .and_then(|s| s.conditions.as_ref())
                            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                    })
                    .count();
                Ok((ready >= NODES.len()).then_some(()))
            },
        )
        .await
    }

    /// The kubeconfig file (admin, `system:masters`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The directory holding certificates, kubeconfig and process logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The PEM of the CA that signed the apiserver's certificate (None for an existing cluster).
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// True when this is a cluster from `$KUBECONFIG`, not a ground this process started.
    pub fn is_existing(&self) -> bool {
        self.existing
    }

    /// The (name, PID) of every process of this ground.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.procs.pids()
    }

    /// A new client for the calling tokio runtime. (A kube `Client` runs a task on the runtime
    /// that made it, so one client cannot be shared by `#[tokio::test]`s, each of which has its
    /// own runtime.)
    pub async fn client(&self) -> Result<Client> {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig).map_err(|e| Error::Kubeconfig(e.to_string()))?;
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|e| Error::Kubeconfig(e.to_string()))?;
        Ok(Client::try_from(config)?)
    }

    /// A fresh namespace `<prefix>-<random>` whose `default` service account exists.
    pub async fn namespace(&self, prefix: &str) -> Result<TestNamespace> {
        let client = self.client().await?;
        let name = format!("{}-{}", prefix.to_lowercase().replace('_', "-"), crate::random_suffix());
        let ns: Namespace = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"picotun.dev/test": "true"}}
        }))
        .expect("static namespace manifest");
        Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await?;
        wait_default_service_account(&client, &name, Duration::from_secs(30)).await?;
        Ok(TestNamespace { name, kubeconfig: self.existing.then(|| self.kubeconfig.clone()) })
    }

    /// The real node, when the ground was started with one.
    pub fn real_node(&self) -> Option<&RealNode> {
        self.node.as_ref()
    }

    /// Stops every process of the ground (SIGTERM, then SIGKILL after a short grace).
    pub fn stop(&self) {
        if let Some(node) = &self.node {
            node.stop();
        }
        // Reverse start order: kwok and the controllers before the apiserver, etcd last.
        self.procs.stop(Duration::from_secs(3));
    }
}

/// The apiserver taints every new Node `node.kubernetes.io/not-ready` (TaintNodesByCondition);
/// in a real cluster the node-lifecycle controller lifts it once the kubelet reports Ready. kwok
/// reports Ready but that controller does not run here (it would evict pods of nodes whose
/// fake heartbeats lag), so do its one job for our fake nodes.
async fn untaint_nodes(client: &Client, beside_real_node: bool) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let taints = if beside_real_node {
        json!([{"key": KWOK_TAINT.0, "value": KWOK_TAINT.1, "effect": "NoSchedule"}])
    } else {
        serde_json::Value::Null
    };
    for name in NODES {
        let patch = json!({"spec": {"taints": taints}});
        nodes.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    }
    Ok(())
}

async fn wait_default_service_account(client: &Client, namespace: &str, timeout: Duration) -> Result<()> {
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    wait_for(&format!("service account {namespace}/default"), timeout, Duration::from_millis(100), || async {
        sas.get_opt("default").await.map(|s| s.map(|_| ())).map_err(|e| e.to_string())
    })
    .await
}

/// kwok's own stage definitions, read from the kwok module the ground was built from.
fn kwok_stages() -> Result<String> {
    let src = bins::module_source("testground/kwok/go.mod", "sigs.k8s.io/kwok")?;
    let files = [
        "kustomize/stage/node/fast/node-initialize.yaml",
        "kustomize/stage/node/heartbeat/node-heartbeat.yaml",
        "kustomize/stage/pod/fast/pod-ready.yaml",
        "kustomize/stage/pod/fast/pod-complete.yaml",
        "kustomize/stage/pod/fast/pod-delete.yaml",
    ];
    let mut out = String::new();
    for f in files {
        let path = src.join(f);
        out.push_str("---\n");
        out.push_str(&std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?);
        out.push('\n');
    }
    Ok(out)
}

/// A namespace made for one test. On an existing cluster it is deleted when dropped; the test
/// ground's own namespaces go away with the ground.
pub struct TestNamespace {
    name: String,
    kubeconfig: Option<PathBuf>,
}

impl TestNamespace {
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl std::fmt::Display for TestNamespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let Some(kubeconfig) = self.kubeconfig.clone() else { return };
        let name = self.name.clone();
        // Drop cannot await, and the test's runtime may be shutting down: use a runtime of our own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            rt.block_on(async move {
                let kc = Kubeconfig::read_from(&kubeconfig).ok()?;
                let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.ok()?;
                let client = Client::try_from(config).ok()?;
                Api::<Namespace>::all(client).delete(&name, &DeleteParams::background()).await.ok()
            })
        })
        .join();
    }
}
