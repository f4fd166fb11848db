//! What every real-node test stands on: one test ground with a real node per test binary, and
//! a *stack* -- sish in tuns.sh's role, `picotun webhook` and `picotun controller` -- scoped to
//! the namespaces a test names, so stacks of different tests never serve each other's objects.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ContainerStatus, Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use picotun_testground::kube_ground::StartOptions;
use picotun_testground::node::{NODE_IP, PICOTUN_IMAGE, RealNode};
use picotun_testground::{
    ControlPlane, Proc, ServerKind, SishOptions, SshClientKey, TunnelServer, bins, free_port, http, random_suffix,
    wait_for,
};
use serde_json::json;
use tokio::sync::OnceCell;

#[path = "../common/shipped_webhook.rs"]
pub mod shipped_webhook;

/// The label that ties a namespace to one test's stack.
pub const STACK_LABEL: &str = "picotun.dev/node-stack";

static GROUND: OnceCell<Result<ControlPlane, String>> = OnceCell::const_new();

/// The ground of this test binary: a control plane with a real node (no existing cluster: the
/// node is what these tests are about).
pub async fn ground() -> &'static ControlPlane {
    let res = GROUND
        .get_or_init(|| async {
            ControlPlane::start(StartOptions { real_node: true, ..Default::default() }).await.map_err(|e| e.to_string())
        })
        .await;
    match res {
        Ok(g) => g,
        Err(e) => panic!("the test ground with a real node did not start: {e}"),
    }
}

pub fn node(ground: &ControlPlane) -> &RealNode {
    ground.real_node().expect("the ground was started with a real node")
}

/// `kubectl` of the ground's version, run from the repository root as a user would.
pub fn kubectl(ground: &ControlPlane, args: &[&str]) -> String {
    let out = Command::new(bins::bin_dir().join("kubectl"))
        .args(args)
        .env("KUBECONFIG", ground.kubeconfig())
        .current_dir(bins::repo_root())
        .output()
        .expect("kubectl runs");
    assert!(
        out.status.success(),
        "kubectl {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Like [`kubectl`], but returns the error output instead of panicking.
pub fn try_kubectl(ground: &ControlPlane, args: &[&str]) -> Result<String, String> {
    let out = Command::new(bins::bin_dir().join("kubectl"))
        .args(args)
        .env("KUBECONFIG", ground.kubeconfig())
        .current_dir(bins::repo_root())
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

pub struct StackOptions {
    /// IngressClass / GatewayClass the controller serves: `pico-tunnel` (deploy/'s classes, what
    /// the examples use) or a class of the test's own.
    pub class: String,
    pub sish: SishOptions,
    /// `--inject-route-backends` on the webhook.
    pub route_backends: bool,
}

/// sish, the webhook and the controller, wired as deploy/ wires them, but running on the host.
pub struct Stack {
    pub sish: TunnelServer,
    pub key: SshClientKey,
    pub webhook: Proc,
    pub controller: Proc,
    pub webhook_config: String,
    pub http_port: u16,
    pub user: String,
    /// Namespaces labeled `picotun.dev/node-stack=<scope>` are this stack's (see [`Stack::adopt`]).
    pub scope: String,
    pub dir: PathBuf,
    _work: tempfile::TempDir,
}

impl Stack {
    pub async fn start(ground: &ControlPlane, opts: StackOptions) -> Stack {
        let node = node(ground);
        let work = tempfile::Builder::new().prefix("picotun-node-test-").tempdir().unwrap();
        let dir = work.path().to_path_buf();
        let key = SshClientKey::generate(&dir, "pico_ed25519", "ed25519").unwrap();
        let sish = TunnelServer::start(ServerKind::Sish(opts.sish.clone()), &[&key]).await.unwrap();
        let http_port = sish.http_port().expect("sish serves HTTP");
        node.bridge(sish.ssh_port()).unwrap();
        let known_hosts = dir.join("known_hosts");
        std::fs::write(&known_hosts, format!("[{NODE_IP}]:{} {}\n", sish.ssh_port(), sish.host_key())).unwrap();

        let user = "alice".to_string();
        let webhook = HostWebhook::start(
            ground,
            &dir,
            &WebhookServer { port: sish.ssh_port(), dialect: "sish", user: &user, known_hosts: &known_hosts },
            &[
                // Stock sish takes keys only: the sidecars get the key Secret.
                "--sidecar-auth",
                "key",
                "--server-domain",
                picotun_testground::tunnels::SISH_DOMAIN,
            ]
            .into_iter()
            .chain(opts.route_backends.then_some("--inject-route-backends"))
            .collect::<Vec<_>>(),
        )
        .await;
        let scope = random_suffix();
        let webhook_config = webhook.register(ground, &scope).await;
        let HostWebhook { proc: webhook, .. } = webhook;

        let admin = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(picotun());
        cmd.args(["controller", "--admin-addr", &admin, "--namespace", "pico-sh-system"])
            .args(["--identity", &format!("node-test-{scope}"), "--lease-name", &format!("picotun-{scope}")])
            .args(["--ingress-class", &opts.class])
            .args(["--namespace-selector", &format!("{STACK_LABEL}={scope}")])
            .env("KUBECONFIG", ground.kubeconfig())
            .env("PICOTUN_LOG", "picotun=debug,info");
        if opts.class != "pico-tunnel" {
            cmd.args(["--gateway-controller-name", &format!("tunnels.pico.sh/{}", opts.class)]);
        }
        let mut controller = Proc::spawn("picotun-controller", cmd, &dir.join("controller.log")).unwrap();
        wait_ready(&mut controller, &admin).await;
        Stack { sish, key, webhook, controller, webhook_config, http_port, user, scope, dir, _work: work }
    }

    /// Makes `namespace` (which must exist) this stack's: labeled for its webhook and controller.
    pub fn adopt(&self, ground: &ControlPlane, namespace: &str) {
        kubectl(ground, &["label", "namespace", namespace, &format!("{STACK_LABEL}={}", self.scope), "--overwrite"]);
    }

    /// A fresh namespace of this stack's, labeled for injection.
    pub async fn namespace(&self, ground: &ControlPlane, prefix: &str) -> String {
        let ns = ground.namespace(prefix).await.unwrap().name().to_string();
        kubectl(ground, &["label", "namespace", &ns, "tunnels.pico.sh/injection=enabled"]);
        self.adopt(ground, &ns);
        ns
    }

    /// The pico key Secret in `namespace`, as the README tells users to create it.
    pub fn create_key_secret(&self, ground: &ControlPlane, namespace: &str) {
        let key = format!("--from-file=ssh-privatekey={}", self.key.private_key.display());
        kubectl(
            ground,
            &["-n", namespace, "create", "secret", "generic", "picotun-ssh-key", "--type=kubernetes.io/ssh-auth", &key],
        );
    }

    /// GET through sish's HTTP port by Host header until it answers 200; (body, attempts).
    pub async fn get_through_sish(&self, host: &str, timeout: Duration) -> String {
        let addr = format!("127.0.0.1:{}", self.http_port);
        wait_for(&format!("GET http://{host}/ through sish"), timeout, Duration::from_millis(100), || async {
            match http::get(&addr, host, "/").await {
                Ok(r) if r.status == 200 => Ok(Some(r.body)),
                Ok(r) => Err(format!("{} {:?}", r.status, r.body)),
                Err(e) => Err(e.to_string()),
            }
        })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e}\nwebhook log:\n{}\ncontroller log:\n{}",
                self.webhook.log_tail(10),
                self.controller.log_tail(20)
            )
        })
    }

    pub async fn remove(self, ground: &ControlPlane) {
        let client = ground.client().await.unwrap();
        let _ = Api::<MutatingWebhookConfiguration>::all(client)
            .delete(&self.webhook_config, &DeleteParams::default())
            .await;
    }
}

/// A stack of the test's own (deploy/'s classes, sish without load balancing) and a fresh
/// namespace of that stack's, with the key Secret in it.
pub async fn stack_and_namespace(ground: &ControlPlane, prefix: &str) -> (Stack, String) {
    let stack = Stack::start(
        ground,
        StackOptions { class: "pico-tunnel".into(), sish: Default::default(), route_backends: false },
    )
    .await;
    let ns = stack.namespace(ground, prefix).await;
    stack.create_key_secret(ground, &ns);
    (stack, ns)
}

/// The tunnel server the sidecars are told to use, as pods reach it (bridged to the node).
pub struct WebhookServer<'a> {
    pub port: u16,
    pub dialect: &'a str,
    pub user: &'a str,
    pub known_hosts: &'a Path,
}

/// `picotun webhook` on the host as deploy/ wires it: a certificate from `picotun certs` (the
/// apiserver calls it on loopback, sidecars report to it at the node's address), the image the
/// node has, the sidecars' server and pin.
pub struct HostWebhook {
    pub proc: Proc,
    pub port: u16,
    pub admin: String,
    pub certs: PathBuf,
    /// Started with --inject-route-backends: registered without the matchCondition
    /// deploy/components/inject-route-backends removes.
    pub route_backends: bool,
}

impl HostWebhook {
    pub async fn start(ground: &ControlPlane, dir: &Path, server: &WebhookServer<'_>, extra: &[&str]) -> HostWebhook {
        let node = node(ground);
        // picotun's namespace, where the webhook keeps its ticket key.
        let _ = try_kubectl(ground, &["create", "namespace", "pico-sh-system"]);
        let certs = dir.join("certs");
        let out = Command::new(picotun())
            .args(["certs", "--out-dir", certs.to_str().unwrap(), "--ip", &NODE_IP.to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "picotun certs: {}", String::from_utf8_lossy(&out.stderr));
        // The apiserver calls /mutate on loopback; sidecars reach /report and /certificate on
        // the agent port, bridged to the node's address.
        let port = free_port();
        let agent_port = free_port();
        node.bridge(agent_port).unwrap();
        let admin = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(picotun());
        cmd.args(["webhook", "--listen", &format!("127.0.0.1:{port}"), "--admin-addr", &admin])
            .args(["--agent-listen", &format!("127.0.0.1:{agent_port}")])
            .args(["--cert-file", certs.join("tls.crt").to_str().unwrap()])
            .args(["--key-file", certs.join("tls.key").to_str().unwrap()])
            .args(["--namespace", "pico-sh-system", "--sidecar-image", PICOTUN_IMAGE])
            .args(["--server", &NODE_IP.to_string(), "--server-port", &server.port.to_string()])
            .args(["--dialect", server.dialect, "--user", server.user])
            .args(["--sidecar-known-hosts-file", server.known_hosts.to_str().unwrap()])
            .args(["--agent-report-url", &format!("https://{NODE_IP}:{agent_port}/report")])
            .args(["--agent-report-ca-file", certs.join("ca.crt").to_str().unwrap()])
            .args(extra)
            .env("KUBECONFIG", ground.kubeconfig())
            .env("PICOTUN_LOG", "picotun=debug,info");
        let mut proc = Proc::spawn("picotun-webhook", cmd, &dir.join("webhook.log")).unwrap();
        wait_ready(&mut proc, &admin).await;
        let route_backends = extra.contains(&"--inject-route-backends");
        HostWebhook { proc, port, admin, certs, route_backends }
    }

    /// Registers this webhook for pods in namespaces labeled for injection and for `scope`, with
    /// the matchConditions deploy/ ships (read from deploy/); returns the configuration's name.
    pub async fn register(&self, ground: &ControlPlane, scope: &str) -> String {
        let client = ground.client().await.unwrap();
        let name = format!("picotun-node-test-{scope}");
        let ca = std::fs::read(self.certs.join("ca.crt")).unwrap();
        let config: MutatingWebhookConfiguration = serde_json::from_value(json!({
            "metadata": {"name": name},
            "webhooks": [{
                "name": "inject.tunnels.pico.sh",
                "clientConfig": {"url": format!("https://127.0.0.1:{}/mutate", self.port),
                                 "caBundle": base64::engine::general_purpose::STANDARD.encode(&ca)},
                "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                           "resources": ["pods"], "scope": "Namespaced"}],
                "namespaceSelector": {"matchExpressions": [
                    {"key": "tunnels.pico.sh/injection", "operator": "In", "values": ["enabled"]},
                    {"key": STACK_LABEL, "operator": "In", "values": [scope]},
                ]},
                "matchConditions": shipped_webhook::shipped_match_conditions(self.route_backends),
                "sideEffects": "None", "admissionReviewVersions": ["v1"], "failurePolicy": "Ignore",
                "reinvocationPolicy": "IfNeeded", "timeoutSeconds": 5,
            }],
        }))
        .unwrap();
        Api::<MutatingWebhookConfiguration>::all(client).create(&PostParams::default(), &config).await.unwrap();
        name
    }
}

pub fn picotun() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_picotun"))
}

async fn wait_ready(proc: &mut Proc, admin: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http::get(admin, "x", "/ready").await.is_ok_and(|r| r.status == 200) {
        assert!(Instant::now() < deadline && proc.is_running(), "{} not ready: {}", proc.name(), proc.log_tail(30));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Waits until exactly `count` pods matching `labels` are Ready (all containers up, as the
/// kubelet reports it); returns them.
pub async fn ready_pods(pods: &Api<Pod>, labels: &str, count: usize, timeout: Duration) -> Vec<Pod> {
    wait_for(&format!("{count} Ready pods ({labels})"), timeout, Duration::from_millis(200), || async {
        let list = pods.list(&ListParams::default().labels(labels)).await.map_err(|e| e.to_string())?;
        let states: Vec<String> = list
            .items
            .iter()
            .map(|p| {
                let s = p.status.as_ref();
                format!(
                    "{}: {} {:?}",
                    p.metadata.name.as_deref().unwrap_or("?"),
                    s.and_then(|s| s.phase.clone()).unwrap_or_default(),
                    s.and_then(|s| s.container_statuses.as_ref()).map(|cs| cs
                        .iter()
                        .map(|c| format!(
                            "{}={:?}",
                            c.name,
                            c.state
                                .as_ref()
                                .map(|st| (st.waiting.as_ref().map(|w| w.reason.clone()), st.running.is_some()))
                        ))
                        .collect::<Vec<_>>())
                )
            })
            .collect();
        let ready: Vec<Pod> = list.items.into_iter().filter(is_ready).collect();
        if ready.len() == count { Ok(Some(ready)) } else { Err(states.join("; ")) }
    })
    .await
    .unwrap()
}

/// Deletes a namespace the test made (the examples' fixed namespaces included).
pub async fn delete_namespace(ground: &ControlPlane, name: &str) {
    let client = ground.client().await.unwrap();
    let _ = Api::<Namespace>::all(client).delete(name, &DeleteParams::background()).await;
}

/// The status of container `name` in `pod`: an app container or an init container (the native
/// sidecar is one).
pub fn find_container_status<'a>(pod: &'a Pod, name: &str) -> Option<&'a ContainerStatus> {
    let status = pod.status.as_ref()?;
    status
        .container_statuses
        .iter()
        .flatten()
        .chain(status.init_container_statuses.iter().flatten())
        .find(|c| c.name == name)
}

/// Like [`find_container_status`], for a container that must have a status by now.
pub fn container_status<'a>(pod: &'a Pod, name: &str) -> &'a ContainerStatus {
    find_container_status(pod, name).unwrap_or_else(|| {
        panic!("pod {} has no status for container {name}", pod.metadata.name.as_deref().unwrap_or("?"))
    })
}

/// The host PID of a container's first process, found through the kubelet's view: the
/// container ID from the pod status, then the process whose cgroup names it.
pub fn container_pid(pod: &Pod, container: &str) -> Option<u32> {
    let id = find_container_status(pod, container)?.container_id.clone()?;
    let id = id.rsplit("://").next()?.to_string();
    let procs = std::fs::read_dir("/proc").ok()?;
    let mut found: Vec<u32> = procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| c.contains(&id)))
        .collect();
    found.sort();
    found.first().copied()
}

/// The file at `path` as seen from inside the container whose first process is `pid`.
pub fn in_container(pid: u32, path: &str) -> PathBuf {
    Path::new(&format!("/proc/{pid}/root")).join(path.trim_start_matches('/'))
}

impl Stack {
    /// Restarts the stack's webhook with the flags it runs with and `extra` after them (for
    /// instance `--native-sidecar=false`), on the same ports, and waits until it is ready.
    pub async fn restart_webhook_with(&mut self, ground: &ControlPlane, extra: &[&str]) {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", self.webhook.pid())).unwrap();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let admin = args.windows(2).find(|w| w[0] == "--admin-addr").map(|w| w[1].clone()).expect("--admin-addr");
        self.webhook.stop(Duration::from_secs(5));
        let mut cmd = Command::new(picotun());
        cmd.args(&args[1..])
            .args(extra)
            .env("KUBECONFIG", ground.kubeconfig())
            .env("PICOTUN_LOG", "picotun=debug,info");
        self.webhook = Proc::spawn("picotun-webhook", cmd, &self.dir.join("webhook.log")).unwrap();
        wait_ready(&mut self.webhook, &admin).await;
    }
}

/// The kubelet's log file of `container` in `pod` on the node (`/var/log/pods/...` inside it),
/// in the CRI format: `TIME STREAM P|F MESSAGE` a line. The current restart's file.
pub fn container_log_path(ground: &ControlPlane, pod: &Pod, container: &str) -> PathBuf {
    let meta = &pod.metadata;
    let status = pod.status.as_ref().expect("a pod with a status");
    let restarts = status
        .container_statuses
        .iter()
        .flatten()
        .chain(status.init_container_statuses.iter().flatten())
        .find(|c| c.name == container)
        .map(|c| c.restart_count)
        .unwrap_or(0);
    node(ground)
        .dir()
        .join("log/pods")
        .join(format!(
            "{}_{}_{}",
            meta.namespace.as_deref().unwrap(),
            meta.name.as_deref().unwrap(),
            meta.uid.as_deref().unwrap()
        ))
        .join(container)
        .join(format!("{restarts}.log"))
}

/// One line of a container's log as the kubelet keeps it: the time containerd read it
/// (nanoseconds) and the text.
#[derive(Clone, Debug)]
pub struct LogLine {
    pub at: k8s_openapi::jiff::Timestamp,
    pub text: String,
}

/// Parses a CRI log file's text (see [`container_log_path`]).
pub fn cri_log_lines(text: &str) -> Vec<LogLine> {
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(4, ' ');
            let at = parts.next()?.parse().ok()?;
            let (_stream, _tag) = (parts.next()?, parts.next()?);
            Some(LogLine { at, text: parts.next().unwrap_or_default().to_string() })
        })
        .collect()
}

/// When a process started, in clock ticks since boot (field 22 of /proc/PID/stat); None once
/// it is gone.
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// True while `pid` exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

/// The mount options of the root file system of the process `pid` (e.g. `ro,relatime`).
pub fn root_mount_options(pid: u32) -> String {
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root = mountinfo.lines().find(|l| l.split_whitespace().nth(4) == Some("/")).expect("a root mount");
    root.split_whitespace().nth(5).unwrap().to_string()
}

/// GET `path` from a pod's address, inside the node's network: (status, body).
pub fn get_in_node(ground: &ControlPlane, addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut conn = node(ground).netns().connect(addr, Duration::from_secs(5))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    let status = answer.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}
