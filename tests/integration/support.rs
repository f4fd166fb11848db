//! Helpers shared by the integration tests.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Container, Namespace, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use picotun_testground::pki::Ca;
use picotun_testground::{ControlPlane, Proc, free_port, http, wait_for};

#[path = "../common/shipped_webhook.rs"]
pub mod shipped_webhook;

/// `picotun webhook` serving HTTPS on loopback with a certificate from a test CA, ready: the
/// admission port (`--listen`, /mutate) and the sidecars' port (`--agent-listen`, /report and
/// /certificate).
pub struct Webhook {
    pub proc: Proc,
    pub port: u16,
    /// `127.0.0.1:<port>`: /mutate.
    pub addr: String,
    pub agent_port: u16,
    /// `127.0.0.1:<agent_port>`: /report, /certificate.
    pub agent_addr: String,
    pub admin: String,
    pub ca: Ca,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub config_name: String,
    /// Started with --inject-route-backends: registered without the matchCondition
    /// deploy/components/inject-route-backends removes.
    pub route_backends: bool,
    _dir: tempfile::TempDir,
}

/// How to start the webhook beyond the defaults every test gets.
#[derive(Clone, Debug, Default)]
pub struct WebhookOptions {
    /// Injected sidecars are told to report to this webhook's /report.
    pub reporting: bool,
    /// Certificate mode (`--sidecar-auth certificate`, reporting on) with the SSH CA in this
    /// directory (`ca`, as the Secret picotun-ssh-ca is mounted); None: key mode.
    pub certificate_ca_dir: Option<PathBuf>,
    /// More flags, last.
    pub args: Vec<String>,
}

/// The `picotun` binary under test: this build, or `PICOTUN_TEST_BINARY` (to see a test fail on
/// an older build; flags that build does not know are left out, see [`known_flags`]).
pub fn picotun_binary() -> PathBuf {
    std::env::var_os("PICOTUN_TEST_BINARY").map(PathBuf::from).unwrap_or_else(|| env!("CARGO_BIN_EXE_picotun").into())
}

/// `args` without the `--flags` (and their values) that `picotun <subcommand>` of the binary under
/// test does not list in its --help: the same test runs against an older build.
pub fn known_flags(subcommand: &str, args: Vec<String>) -> Vec<String> {
    if std::env::var_os("PICOTUN_TEST_BINARY").is_none() {
        return args;
    }
    let help = Command::new(picotun_binary()).args([subcommand, "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).to_string();
    let mut out = Vec::new();
    let mut args = args.into_iter().peekable();
    while let Some(arg) = args.next() {
        let unknown =
            arg.starts_with("--") && !help.contains(&format!("{arg} ")) && !help.contains(&format!("{arg}\n"));
        if unknown {
            eprintln!("known_flags: {} has no {arg}; left out", picotun_binary().display());
            if args.peek().is_some_and(|v| !v.starts_with("--")) {
                args.next();
            }
        } else {
            out.push(arg);
        }
    }
    out
}

impl Webhook {
    /// Key mode (the account key Secret mounted into sidecars); with `reporting`, injected
    /// sidecars are told to report to this webhook's /report.
    pub async fn start(ground: &ControlPlane, reporting: bool) -> Webhook {
        Self::start_with(Some(ground), WebhookOptions { reporting, ..Default::default() }).await
    }

    /// Against `ground`'s apiserver, or (None) with no Kubernetes API at all: the HTTPS server
    /// alone, for tests of the server itself.
    pub async fn start_with(ground: Option<&ControlPlane>, options: WebhookOptions) -> Webhook {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("webhook-test-ca").unwrap();
        let (cert_file, key_file) = ca.issue_loopback_server(&[]).unwrap().write(dir.path(), "tls").unwrap();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let agent_port = free_port();
        let agent_addr = format!("127.0.0.1:{agent_port}");
        let admin = format!("127.0.0.1:{}", free_port());
        let mut args: Vec<String> =
            ["webhook", "--listen", &addr, "--agent-listen", &agent_addr, "--admin-addr", &admin]
                .into_iter()
                .chain(["--cert-file", cert_file.to_str().unwrap(), "--key-file", key_file.to_str().unwrap()])
                .chain([
                    "--cert-reload-interval",
                    "200ms",
                    "--sidecar-image",
                    "picotun:test",
                    "--namespace",
                    "pico-sh-system",
                ])
                // The test ground's tunnel servers name public addresses under these.
                .chain(["--server-domain", "tuns.test,sandhole.test"])
                .map(str::to_string)
                .collect();
        let mut cmd = Command::new(picotun_binary());
        match ground {
            Some(ground) => {
                // The ticket key Secret lives in picotun's namespace (made by the webhook).
                own_namespace(&ground.client().await.unwrap()).await;
                cmd.env("KUBECONFIG", ground.kubeconfig());
            }
            None => {
                cmd.env("KUBECONFIG", dir.path().join("no-such-kubeconfig")).env_remove("KUBERNETES_SERVICE_HOST");
            }
        }
        if options.reporting || options.certificate_ca_dir.is_some() {
            let ca_file = dir.path().join("ca.crt");
            std::fs::write(&ca_file, ca.cert_pem()).unwrap();
            args.extend(["--agent-report-url".into(), format!("https://{agent_addr}/report")]);
            args.extend(["--agent-report-ca-file".into(), ca_file.to_str().unwrap().into()]);
        }
        match &options.certificate_ca_dir {
            Some(ca_dir) => args.extend(
                ["--sidecar-auth", "certificate", "--ssh-ca-dir", ca_dir.to_str().unwrap()].map(str::to_string),
            ),
            None => args.extend(["--sidecar-auth", "key"].map(str::to_string)),
        }
        args.extend(options.args.iter().cloned());
        cmd.args(known_flags("webhook", args)).env("PICOTUN_LOG", "picotun=debug,info");
        let mut proc = Proc::spawn("picotun-webhook", cmd, &dir.path().join("webhook.log")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !http::get(&admin, "w", "/ready").await.is_ok_and(|r| r.status == 200) {
            assert!(Instant::now() < deadline && proc.is_running(), "webhook not ready: {}", proc.log_tail(20));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Webhook {
            proc,
            port,
            addr,
            agent_port,
            agent_addr,
            admin,
            ca,
            cert_file,
            key_file,
            config_name: String::new(),
            route_backends: options.args.iter().any(|a| a == "--inject-route-backends"),
            _dir: dir,
        }
    }

    /// A metric's value (0 when absent): the line starting with `line_prefix`.
    pub async fn metric(&self, line_prefix: &str) -> u64 {
        let text = self.metrics().await;
        text.lines().find_map(|l| l.strip_prefix(line_prefix).and_then(|v| v.trim().parse().ok())).unwrap_or(0)
    }

    /// Registers the webhook for pods in `namespaces`; with `require_label`, only where the
    /// namespace carries the injection label (as deploy/ registers it). With the matchConditions
    /// deploy/ ships (read from deploy/), so every test of injection through the apiserver runs
    /// through them.
    pub async fn register(&mut self, client: &kube::Client, namespaces: &[&str], require_label: bool) {
        let mut selector = serde_json::json!({"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": namespaces}]});
        if require_label {
            selector["matchLabels"] = serde_json::json!({"tunnels.pico.sh/injection": "enabled"});
        }
        let hook = serde_json::json!({
            "name": "inject.tunnels.pico.sh",
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "scope": "Namespaced"}],
            "namespaceSelector": selector,
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "reinvocationPolicy": "IfNeeded",
            "timeoutSeconds": 5,
        });
        self.register_hook(client, hook).await;
    }

    /// Registers the webhook exactly as deploy/ does -- its namespaceSelector (narrowed to
    /// `namespaces` as well), objectSelector, matchConditions, re-invocation -- but pointed at
    /// this process.
    pub async fn register_as_shipped(&mut self, client: &kube::Client, namespaces: &[&str]) {
        let mut hook = shipped_webhook::shipped_webhook();
        let scope = serde_json::json!({"key": "kubernetes.io/metadata.name", "operator": "In", "values": namespaces});
        hook["namespaceSelector"]["matchExpressions"].as_array_mut().unwrap().push(scope);
        self.register_hook(client, hook).await;
    }

    /// `hook` pointed at this webhook, with the matchConditions deploy/ ships for its mode.
    async fn register_hook(&mut self, client: &kube::Client, mut hook: serde_json::Value) {
        self.config_name = format!("picotun-test-{}", picotun_testground::random_suffix());
        hook["clientConfig"] = serde_json::json!({
            "url": format!("https://127.0.0.1:{}/mutate", self.port),
            "caBundle": base64::engine::general_purpose::STANDARD.encode(self.ca.cert_pem()),
        });
        hook["matchConditions"] = shipped_webhook::shipped_match_conditions(self.route_backends);
        // Fail, so a webhook error -- or a condition the apiserver cannot evaluate on some pod --
        // shows up in the test instead of a silently plain pod.
        hook["failurePolicy"] = "Fail".into();
        let config: MutatingWebhookConfiguration =
            serde_json::from_value(serde_json::json!({"metadata": {"name": self.config_name}, "webhooks": [hook]}))
                .unwrap();
        Api::<MutatingWebhookConfiguration>::all(client.clone())
            .create(&kube::api::PostParams::default(), &config)
            .await
            .unwrap();
    }

    pub async fn unregister(&self, client: &kube::Client) {
        let _ = Api::<MutatingWebhookConfiguration>::all(client.clone())
            .delete(&self.config_name, &kube::api::DeleteParams::default())
            .await;
    }

    pub async fn metrics(&self) -> String {
        http::get(&self.admin, "w", "/metrics").await.map(|r| r.body).unwrap_or_default()
    }

    /// POST `path` to the admission port over TLS with extra header lines; (status, the whole
    /// answer).
    pub async fn post(&self, path: &str, content_type: &str, headers: &str, body: &[u8]) -> (u16, String) {
        self.post_to(&self.addr, path, content_type, headers, body).await
    }

    /// The same, to the sidecars' port.
    pub async fn agent_post(&self, path: &str, content_type: &str, headers: &str, body: &[u8]) -> (u16, String) {
        self.post_to(&self.agent_addr, path, content_type, headers, body).await
    }

    async fn post_to(&self, addr: &str, path: &str, content_type: &str, headers: &str, body: &[u8]) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = tls_client(&self.ca).connect(name, tcp).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        tls.write_all(head.as_bytes()).await.unwrap();
        let _ = tls.write_all(body).await;
        let mut raw = Vec::new();
        let _ = tls.read_to_end(&mut raw).await;
        let text = String::from_utf8_lossy(&raw).to_string();
        let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        (status, text)
    }
}

/// A TLS client trusting only `ca`.
pub fn tls_client(ca: &Ca) -> tokio_rustls::TlsConnector {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    let ca_der: rustls::pki_types::CertificateDer<'static> =
        rustls::pki_types::pem::PemObject::from_pem_slice(ca.cert_pem().as_bytes()).unwrap();
    roots.add(ca_der).unwrap();
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Polls `GET path` on `addr` with `host` until the body equals `want`, for up to 20 s, and
/// returns the number of attempts it took. Panics with the last answer otherwise.
pub async fn expect_body(addr: &str, host: &str, path: &str, want: &str) -> u32 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let last = match http::get(addr, host, path).await {
            Ok(r) if r.status == 200 && r.body == want => return attempts,
            Ok(r) => format!("{} {:?}", r.status, r.body),
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() > deadline {
            panic!("GET http://{host}{path} via {addr}: wanted {want:?}, last answer: {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits (up to 60 s) until exactly `count` pods matching `labels` are Running; returns them.
pub async fn running_pods(pods: &Api<Pod>, labels: &str, count: usize) -> Vec<Pod> {
    wait_for(
        &format!("{count} Running pods ({labels})"),
        Duration::from_secs(60),
        Duration::from_millis(250),
        || async {
            let list = pods.list(&ListParams::default().labels(labels)).await.map_err(|e| e.to_string())?;
            let running: Vec<Pod> = list
                .items
                .into_iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .collect();
            Ok((running.len() == count).then_some(running))
        },
    )
    .await
    .unwrap()
}

/// picotun's namespace, pico-sh-system, created if it is not there yet.
pub async fn own_namespace(client: &kube::Client) {
    let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": "pico-sh-system"}})).unwrap();
    let _ = Api::all(client.clone()).create(&PostParams::default(), &ns).await;
}

pub async fn label_for_injection(client: &kube::Client, ns: &str) {
    let patch = serde_json::json!({"metadata": {"labels": {"tunnels.pico.sh/injection": "enabled"}}});
    Api::<Namespace>::all(client.clone()).patch(ns, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
}

pub fn pod_json(name: &str, labels: serde_json::Value, annotations: serde_json::Value) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1", "ports": [{"name": "http", "containerPort": 8080}]}]},
    }))
    .unwrap()
}

pub fn sidecar_of(pod: &Pod) -> Option<&Container> {
    let spec = pod.spec.as_ref()?;
    spec.init_containers.iter().flatten().chain(spec.containers.iter()).find(|c| c.name == "picotun-agent")
}

pub fn sidecar_count(pod: &Pod) -> usize {
    let spec = pod.spec.as_ref().unwrap();
    spec.init_containers.iter().flatten().chain(spec.containers.iter()).filter(|c| c.name == "picotun-agent").count()
}

/// Creates opted-in probe pods until the apiserver has picked the configuration up.
pub async fn wait_active(pods: &Api<Pod>) {
    let mut n = 0;
    wait_for("the webhook configuration to take effect", Duration::from_secs(30), Duration::from_millis(200), || {
        n += 1;
        let pods = pods.clone();
        let name = format!("probe-{n}");
        async move {
            let p = pod_json(&name, serde_json::json!({"tunnels.pico.sh/inject": "true"}), serde_json::json!({}));
            let created = pods.create(&PostParams::default(), &p).await.map_err(|e| e.to_string())?;
            Ok(sidecar_of(&created).is_some().then_some(()))
        }
    })
    .await
    .unwrap();
}

/// Serves `app` over TLS on `listener` until the task is aborted: a test's own HTTPS endpoint.
pub fn serve_https(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    app: axum::Router,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    })
}

/// A CronJob named `nightly` that opts in by annotation (only there), and its Job's pod, which
/// is returned once it exists. The CronJob is suspended: the test makes its Job itself, with the
/// controller owner reference, as the CronJob controller would, rather than waiting for the
/// schedule.
pub async fn cronjob_pod(client: &kube::Client, ns: &str) -> Pod {
    let template = serde_json::json!({"metadata": {"labels": {"app": "nightly"}}, "spec": {"restartPolicy": "Never",
        "containers": [{"name": "job", "image": "registry.example/job:1"}]}});
    let cronjob: CronJob = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "nightly", "annotations": {"tunnels.pico.sh/inject": "true"}},
        "spec": {"schedule": "@daily", "suspend": true, "jobTemplate": {"spec": {"template": template}}},
    }))
    .unwrap();
    let pp = PostParams::default();
    let cronjob = Api::<CronJob>::namespaced(client.clone(), ns).create(&pp, &cronjob).await.unwrap();
    let job: Job = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "nightly-1", "ownerReferences": [{"apiVersion": "batch/v1", "kind": "CronJob",
            "name": "nightly", "uid": cronjob.metadata.uid, "controller": true, "blockOwnerDeletion": true}]},
        "spec": {"template": template},
    }))
    .unwrap();
    Api::<Job>::namespaced(client.clone(), ns).create(&pp, &job).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    wait_for("the Job's pod", Duration::from_secs(60), Duration::from_millis(250), || async {
        let list = pods.list(&ListParams::default().labels("app=nightly")).await.map_err(|e| e.to_string())?;
        Ok(list.items.into_iter().next())
    })
    .await
    .unwrap()
}
