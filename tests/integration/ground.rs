//! Proof that the test ground is a real Kubernetes: controllers turn Deployments into Running
//! Pods, the apiserver calls admission webhooks on loopback, and the CRDs picotun reads exist.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::{Json, Router, routing::post};
use base64::Engine;
use gateway_api::experimental::tcproutes::TcpRoute;
use gateway_api::gatewayclasses::GatewayClass;
use gateway_api::gateways::Gateway;
use gateway_api::httproutes::HttpRoute;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use picotun_testground::pki::Ca;
use picotun_testground::{ControlPlane, Existing, wait_for};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};

#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn deployment_becomes_running_pods() {
    let ground = ControlPlane::shared(Existing::Allowed).await.unwrap();
    let ns = ground.namespace("deploy").await.unwrap();
    let client = ground.client().await.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns.name());
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "echo"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "echo"}},
            "template": {
                "metadata": {"labels": {"app": "echo"}},
                "spec": {"containers": [{"name": "echo", "image": "registry.example/echo:1", "ports": [{"containerPort": 8080}]}]},
            },
        },
    }))
    .unwrap();
    deployments.create(&PostParams::default(), &deployment).await.unwrap();

    let replicasets: Api<ReplicaSet> = Api::namespaced(client.clone(), ns.name());
    let rs = wait_for(
        "a ReplicaSet owned by the Deployment",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            let list = replicasets.list(&ListParams::default()).await.map_err(|e| e.to_string())?;
            Ok(list.items.into_iter().find(|rs| {
                rs.metadata
                    .owner_references
                    .as_ref()
                    .is_some_and(|o| o.iter().any(|o| o.kind == "Deployment" && o.name == "echo"))
            }))
        },
    )
    .await
    .unwrap();
    assert_eq!(rs.spec.as_ref().and_then(|s| s.replicas), Some(2));

    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    let running = crate::support::running_pods(&pods, "app=echo", 2).await;
    for pod in &running {
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
        assert!(node.starts_with("kwok-node-"), "scheduled onto a kwok node, got {node:?}");
        let ready = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        assert!(ready, "pod {:?} is Ready", pod.metadata.name);
    }

    // And the Deployment reports it, as `kubectl rollout status` would read it.
    let available =
        wait_for("Deployment availableReplicas=2", Duration::from_secs(30), Duration::from_millis(250), || async {
            let d = deployments.get("echo").await.map_err(|e| e.to_string())?;
            Ok((d.status.and_then(|s| s.available_replicas) == Some(2)).then_some(()))
        })
        .await;
    available.unwrap();
}

/// A tiny HTTPS admission webhook: adds a label and counts calls.
struct TestWebhook {
    addr: SocketAddr,
    calls: Arc<AtomicU64>,
    ca_pem: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestWebhook {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start_test_webhook() -> TestWebhook {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = Ca::new("webhook-test-ca").unwrap();
    let serving = ca.issue_loopback_server(&[]).unwrap();
    let certs = vec![CertificateDer::from_pem_slice(serving.cert_pem.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(serving.key_pem.as_bytes()).unwrap();
    let tls = rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(certs, key).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

    let calls = Arc::new(AtomicU64::new(0));
    let counter = calls.clone();
    let app = Router::new().route(
        "/mutate",
        post(move |Json(review): Json<Value>| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::Relaxed);
                let uid = review["request"]["uid"].clone();
                let has_labels = review["request"]["object"]["metadata"]["labels"].is_object();
                let patch = if has_labels {
                    json!([{"op": "add", "path": "/metadata/labels/ground.picotun.dev~1mutated", "value": "yes"}])
                } else {
                    json!([{"op": "add", "path": "/metadata/labels", "value": {"ground.picotun.dev/mutated": "yes"}}])
                };
                let patch = base64::engine::general_purpose::STANDARD.encode(patch.to_string());
                Json(json!({
                    "apiVersion": "admission.k8s.io/v1",
                    "kind": "AdmissionReview",
                    "response": {"uid": uid, "allowed": true, "patchType": "JSONPatch", "patch": patch},
                }))
            }
        }),
    );

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = crate::support::serve_https(listener, acceptor, app);
    TestWebhook { addr, calls, ca_pem: ca.cert_pem(), task }
}

#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn apiserver_calls_a_loopback_mutating_webhook() {
    let ground = ControlPlane::shared(Existing::Allowed).await.unwrap();
    let ns = ground.namespace("webhook").await.unwrap();
    let client = ground.client().await.unwrap();
    let webhook = start_test_webhook().await;

    let name = format!("ground-test-{}", ns.name());
    let config: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": name},
        "webhooks": [{
            "name": "mutate.ground.picotun.dev",
            "clientConfig": {
                "url": format!("https://127.0.0.1:{}/mutate", webhook.addr.port()),
                "caBundle": base64::engine::general_purpose::STANDARD.encode(&webhook.ca_pem),
            },
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            // Only this test's namespace: other tests' pods must not see this webhook.
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns.name()}},
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "failurePolicy": "Fail",
            "timeoutSeconds": 5,
        }],
    }))
    .unwrap();
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    configs.create(&PostParams::default(), &config).await.unwrap();

    // The apiserver picks the configuration up after an informer delay: probe with pods until
    // one comes back mutated, instead of sleeping.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    let mut attempt = 0;
    let mutated = wait_for("a pod mutated by the webhook", Duration::from_secs(30), Duration::from_millis(200), || {
        attempt += 1;
        let pods = pods.clone();
        let n = attempt;
        async move {
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": format!("probe-{n}"), "labels": {"app": "probe"}},
                "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]},
            }))
            .unwrap();
            let created = pods.create(&PostParams::default(), &pod).await.map_err(|e| e.to_string())?;
            Ok(created
                .metadata
                .labels
                .filter(|l| l.get("ground.picotun.dev/mutated").map(String::as_str) == Some("yes"))
                .map(|_| n))
        }
    })
    .await
    .unwrap();

    // The patch is on the stored object, not just on the create response.
    let stored = pods.get(&format!("probe-{mutated}")).await.unwrap();
    let labels = stored.metadata.labels.unwrap_or_default();
    assert_eq!(labels.get("ground.picotun.dev/mutated").map(String::as_str), Some("yes"));
    assert_eq!(labels.get("app").map(String::as_str), Some("probe"), "the webhook's patch keeps existing labels");
    assert!(webhook.calls.load(Ordering::Relaxed) >= 1);

    configs.delete(&name, &DeleteParams::default()).await.unwrap();
}

#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn gateway_api_and_cert_manager_objects_can_be_created() {
    let ground = ControlPlane::shared(Existing::Allowed).await.unwrap();
    let ns = ground.namespace("crds").await.unwrap();
    let client = ground.client().await.unwrap();
    let pp = PostParams::default();

    let class_name = format!("pico-{}", ns.name());
    let class: GatewayClass = serde_json::from_value(json!({
        "metadata": {"name": class_name},
        "spec": {"controllerName": "tunnels.pico.sh/gateway-controller"},
    }))
    .unwrap();
    Api::<GatewayClass>::all(client.clone()).create(&pp, &class).await.unwrap();

    let gateway: Gateway = serde_json::from_value(json!({
        "metadata": {"name": "tunnels"},
        "spec": {
            "gatewayClassName": class_name,
            "listeners": [
                {"name": "web-test", "protocol": "HTTP", "port": 80, "hostname": "web-test"},
                {"name": "tcp", "protocol": "TCP", "port": 59123, "allowedRoutes": {"kinds": [{"kind": "TCPRoute"}]}},
            ],
        },
    }))
    .unwrap();
    let created = Api::<Gateway>::namespaced(client.clone(), ns.name()).create(&pp, &gateway).await.unwrap();
    assert_eq!(created.spec.listeners.len(), 2);

    let http_route: HttpRoute = serde_json::from_value(json!({
        "metadata": {"name": "http-echo"},
        "spec": {
            "parentRefs": [{"name": "tunnels", "sectionName": "web-test"}],
            "rules": [{"backendRefs": [{"name": "echo", "port": 80}]}],
        },
    }))
    .unwrap();
    let created = Api::<HttpRoute>::namespaced(client.clone(), ns.name()).create(&pp, &http_route).await.unwrap();
    // The CRD's defaults were applied by the apiserver: proof the real schema is installed.
    let rules = created.spec.rules.unwrap();
    assert!(rules[0].matches.as_ref().is_some_and(|m| !m.is_empty()), "HTTPRoute rule matches defaulted by the CRD");

    let tcp_route: TcpRoute = serde_json::from_value(json!({
        "metadata": {"name": "tcp-echo"},
        "spec": {
            "parentRefs": [{"name": "tunnels", "sectionName": "tcp"}],
            "rules": [{"backendRefs": [{"name": "echo", "port": 8080}]}],
        },
    }))
    .unwrap();
    Api::<TcpRoute>::namespaced(client.clone(), ns.name()).create(&pp, &tcp_route).await.unwrap();

    // The real schema rejects what it should: a Gateway listener without a protocol.
    let invalid: Gateway = serde_json::from_value(json!({
        "metadata": {"name": "invalid"},
        "spec": {"gatewayClassName": class_name, "listeners": [{"name": "x", "port": 80, "protocol": ""}]},
    }))
    .unwrap();
    let err = Api::<Gateway>::namespaced(client.clone(), ns.name()).create(&pp, &invalid).await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref s) if s.code == 422), "invalid Gateway rejected with 422, got {err}");

    // cert-manager: an Issuer and a Certificate (its controller does not run here).
    let cm = |kind: &str| ApiResource::from_gvk(&GroupVersionKind::gvk("cert-manager.io", "v1", kind));
    let issuer: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "cert-manager.io/v1", "kind": "Issuer",
        "metadata": {"name": "selfsigned"},
        "spec": {"selfSigned": {}},
    }))
    .unwrap();
    Api::<DynamicObject>::namespaced_with(client.clone(), ns.name(), &cm("Issuer")).create(&pp, &issuer).await.unwrap();
    let certificate: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "cert-manager.io/v1", "kind": "Certificate",
        "metadata": {"name": "webhook"},
        "spec": {
            "secretName": "webhook-tls",
            "dnsNames": ["picotun-webhook.pico-sh-system.svc"],
            "issuerRef": {"name": "selfsigned", "kind": "Issuer"},
        },
    }))
    .unwrap();
    Api::<DynamicObject>::namespaced_with(client.clone(), ns.name(), &cm("Certificate"))
        .create(&pp, &certificate)
        .await
        .unwrap();
}

/// Run only as a child of `killing_the_test_process_leaves_nothing_behind`: starts a ground and
/// tunnel servers, prints their PIDs, and waits to be killed.
#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn kill_probe_holder() {
    if std::env::var_os("PICOTUN_KILL_PROBE").is_none() {
        return; // Run on its own, it has nothing to prove.
    }
    let plane = ControlPlane::start(Default::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = picotun_testground::SshClientKey::generate(dir.path(), "client", "ed25519").unwrap();
    let sshd = picotun_testground::TunnelServer::start(picotun_testground::ServerKind::Sshd, &[&key]).await.unwrap();
    let sandhole =
        picotun_testground::TunnelServer::start(picotun_testground::ServerKind::Sandhole(Default::default()), &[&key])
            .await
            .unwrap();
    // A live tunnel through sshd, so sshd has a per-connection child in a session of its own.
    let backend = picotun_testground::http::Backend::start("kill-probe").await.unwrap();
    let (public, spec) = picotun_testground::tunnels::public_tcp_spec(sshd.kind(), backend.port());
    let client = sshd.ssh_forward(&key, "root", &spec, "ssh-kill-probe").unwrap();
    crate::support::expect_body(&format!("127.0.0.1:{public}"), "x", "/", &backend.greeting()).await;
    let sshd_children = picotun_testground::process::descendants(sshd.pid().unwrap());
    assert!(!sshd_children.is_empty(), "sshd has a session process for the tunnel");

    let mut pids: Vec<String> = plane.pids().into_iter().map(|(_, pid)| pid.to_string()).collect();
    pids.extend([sshd.pid(), sandhole.pid(), Some(client.pid())].into_iter().flatten().map(|p| p.to_string()));
    pids.extend(sshd_children.iter().map(|p| p.to_string()));
    println!("KILL-PROBE-DIRS {} {} {}", plane.dir().display(), sshd.dir().display(), sandhole.dir().display());
    println!("KILL-PROBE-PIDS {}", pids.join(" "));
    tokio::time::sleep(Duration::from_secs(600)).await;
}

#[test]
#[ignore = "needs the test ground (scripts/build-testground)"]
fn killing_the_test_process_leaves_nothing_behind() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["ground::kill_probe_holder", "--exact", "--include-ignored", "--nocapture", "--test-threads=1"])
        .env("PICOTUN_KILL_PROBE", "1")
        .env_remove("KUBECONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // If this test fails, the holder must not outlive it either.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let mut holder = KillOnDrop(child);
    let mut pids = Vec::new();
    let mut dirs = Vec::new();
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("KILL-PROBE-DIRS ") {
            dirs = rest.split_whitespace().map(std::path::PathBuf::from).collect();
        }
        if let Some(rest) = line.strip_prefix("KILL-PROBE-PIDS ") {
            pids = rest.split_whitespace().map(|p| p.parse::<i32>().unwrap()).collect();
            break;
        }
    }
    assert!(pids.len() >= 9, "the holder reported its processes (got {pids:?})");
    for &pid in &pids {
        assert!(alive(pid), "process {pid} runs before the kill");
    }

    // SIGKILL: no destructor, no panic hook, no signal handler runs in the holder.
    holder.0.kill().unwrap();
    holder.0.wait().unwrap();

    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while pids.iter().any(|&p| alive(p)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let survivors: Vec<i32> = pids.iter().copied().filter(|&p| alive(p)).collect();
    assert!(survivors.is_empty(), "processes left behind after the test process was killed: {survivors:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while dirs.iter().any(|d| d.exists()) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let left: Vec<_> = dirs.iter().filter(|d| d.exists()).collect();
    assert!(left.is_empty(), "state directories left behind: {left:?}");
}

/// True if `pid` exists and is not a zombie.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Field 3, after the parenthesised command name, is the state.
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}
