//! `picotun webhook` registered with the test ground's real kube-apiserver: pods the
//! controller-manager creates are injected (or not) as the rules say, and run on kwok nodes.

use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use picotun_testground::pki::{Ca, CertAndKey};
use picotun_testground::{ControlPlane, Existing, wait_for};
use serde_json::{Value, json};

use crate::support::{Webhook, tls_client};

impl Webhook {
    /// Registers the webhook for pods in `namespaces`; with `require_label`, only where the
    /// namespace carries the injection label (as deploy/ registers it).
    async fn register(&mut self, client: &kube::Client, namespaces: &[&str], require_label: bool) {
        self.config_name = format!("picotun-test-{}", picotun_testground::random_suffix());
        let mut selector = json!({"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": namespaces}]});
        if require_label {
            selector["matchLabels"] = json!({"tunnels.pico.sh/injection": "enabled"});
        }
        let config: MutatingWebhookConfiguration = serde_json::from_value(json!({
            "metadata": {"name": self.config_name},
            "webhooks": [{
                "name": "inject.tunnels.pico.sh",
                "clientConfig": {
                    "url": format!("https://127.0.0.1:{}/mutate", self.port),
                    "caBundle": base64::engine::general_purpose::STANDARD.encode(self.ca.cert_pem()),
                },
                "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "scope": "Namespaced"}],
                "namespaceSelector": selector,
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                // Fail, so a webhook error shows up in the test instead of a silently plain pod.
                "failurePolicy": "Fail",
                "reinvocationPolicy": "IfNeeded",
                "timeoutSeconds": 5,
            }],
        }))
        .unwrap();
        Api::<MutatingWebhookConfiguration>::all(client.clone()).create(&PostParams::default(), &config).await.unwrap();
    }

    async fn unregister(&self, client: &kube::Client) {
        let _ = Api::<MutatingWebhookConfiguration>::all(client.clone())
            .delete(&self.config_name, &DeleteParams::default())
            .await;
    }
}

async fn label_for_injection(client: &kube::Client, ns: &str) {
    let patch = json!({"metadata": {"labels": {"tunnels.pico.sh/injection": "enabled"}}});
    Api::<Namespace>::all(client.clone()).patch(ns, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
}

fn pod_json(name: &str, labels: Value, annotations: Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1", "ports": [{"name": "http", "containerPort": 8080}]}]},
    }))
    .unwrap()
}

fn sidecar_of(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::Container> {
    let spec = pod.spec.as_ref()?;
    spec.init_containers.iter().flatten().chain(spec.containers.iter()).find(|c| c.name == "picotun-agent")
}

fn sidecar_count(pod: &Pod) -> usize {
    let spec = pod.spec.as_ref().unwrap();
    spec.init_containers.iter().flatten().chain(spec.containers.iter()).filter(|c| c.name == "picotun-agent").count()
}

/// Creates opted-in probe pods until the apiserver has picked the configuration up.
async fn wait_active(pods: &Api<Pod>) {
    let mut n = 0;
    wait_for("the webhook configuration to take effect", Duration::from_secs(30), Duration::from_millis(200), || {
        n += 1;
        let pods = pods.clone();
        let name = format!("probe-{n}");
        async move {
            let p = pod_json(&name, json!({"tunnels.pico.sh/inject": "true"}), json!({}));
            let created = pods.create(&PostParams::default(), &p).await.map_err(|e| e.to_string())?;
            Ok(sidecar_of(&created).is_some().then_some(()))
        }
    })
    .await
    .unwrap();
}

fn deployment(
    name: &str,
    deploy_annotations: Value,
    template_labels: Value,
    template_annotations: Value,
) -> Deployment {
    let mut labels = json!({"app": name});
    labels.as_object_mut().unwrap().extend(template_labels.as_object().unwrap().clone());
    serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": deploy_annotations},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": labels, "annotations": template_annotations},
                "spec": {"containers": [{"name": "app", "image": "registry.example/app:1", "ports": [{"name": "http", "containerPort": 8080}]}]},
            },
        },
    }))
    .unwrap()
}

async fn running_pods(pods: &Api<Pod>, app: &str) -> Vec<Pod> {
    crate::support::running_pods(pods, &format!("app={app}"), 2).await
}

#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn deployments_in_a_labeled_namespace_get_running_injected_pods() {
    let ground = ControlPlane::shared(Existing::Allowed).await.unwrap();
    let client = ground.client().await.unwrap();
    let labeled = ground.namespace("inject").await.unwrap();
    let unlabeled = ground.namespace("plain").await.unwrap();
    label_for_injection(&client, labeled.name()).await;
    let mut webhook = Webhook::start(ground, false).await;
    webhook.register(&client, &[labeled.name(), unlabeled.name()], true).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), labeled.name());
    wait_active(&pods).await;

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), labeled.name());
    let pp = PostParams::default();
    // Exposed by an annotation on the pod template.
    deployments
        .create(&pp, &deployment("exposed", json!({}), json!({}), json!({"tunnels.pico.sh/expose": "http:demo=http"})))
        .await
        .unwrap();
    // Opted in on the Deployment object itself, not its template.
    deployments
        .create(&pp, &deployment("on-workload", json!({"tunnels.pico.sh/inject": "true"}), json!({}), json!({})))
        .await
        .unwrap();
    // Opted out on the template, although the Deployment opts in.
    deployments
        .create(
            &pp,
            &deployment(
                "opted-out",
                json!({"tunnels.pico.sh/inject": "true"}),
                json!({"tunnels.pico.sh/inject": "false"}),
                json!({}),
            ),
        )
        .await
        .unwrap();

    for pod in running_pods(&pods, "exposed").await {
        let sidecar = sidecar_of(&pod).expect("injected");
        assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"), "a native sidecar");
        assert_eq!(sidecar.image.as_deref(), Some("picotun:test"));
        let annotations = pod.metadata.annotations.as_ref().unwrap();
        let tunnels = picotun::tunnel::TunnelsFile::parse(&annotations["tunnels.pico.sh/tunnels"]).unwrap();
        assert_eq!(tunnels.tunnels[0].host.as_deref(), Some("demo"));
        assert_eq!(tunnels.tunnels[0].target_port, 8080, "the named port resolved");
        assert_eq!(annotations["kubectl.kubernetes.io/default-container"], "app");
    }
    for pod in running_pods(&pods, "on-workload").await {
        assert!(sidecar_of(&pod).is_some(), "opt-in on the Deployment is honoured");
    }
    for pod in running_pods(&pods, "opted-out").await {
        assert!(sidecar_of(&pod).is_none(), "\"false\" on the template wins");
    }

    // The unlabeled namespace: the apiserver does not even ask.
    let plain: Api<Deployment> = Api::namespaced(client.clone(), unlabeled.name());
    plain
        .create(&pp, &deployment("exposed", json!({}), json!({}), json!({"tunnels.pico.sh/expose": "http:demo=8080"})))
        .await
        .unwrap();
    for pod in running_pods(&Api::namespaced(client.clone(), unlabeled.name()), "exposed").await {
        assert!(sidecar_of(&pod).is_none(), "unlabeled namespace untouched");
    }
    let metrics = webhook.metrics().await;
    assert!(metrics.contains("picotun_webhook_skips_total{reason=\"opted_out\"} 2"), "{metrics}");

    // `picotun explain` tells the same story from the cluster's objects.
    let explain = |object: String, ns: String| {
        let out = Command::new(env!("CARGO_BIN_EXE_picotun"))
            .args(["explain", &object, "-n", &ns])
            .env("KUBECONFIG", ground.kubeconfig())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let text = explain("deployment/on-workload".into(), labeled.name().into());
    assert!(
        text.contains(
            "would be injected, because of the Deployment/on-workload annotation tunnels.pico.sh/inject=true"
        ),
        "{text}"
    );
    let text = explain("deployment/opted-out".into(), labeled.name().into());
    assert!(text.contains("not injected: pod label tunnels.pico.sh/inject=false"), "{text}");
    let injected = running_pods(&pods, "exposed").await;
    let text = explain(format!("pod/{}", injected[0].metadata.name.as_ref().unwrap()), labeled.name().into());
    assert!(text.contains("already injected") && text.contains("tunnel http-demo: http demo -> port 8080"), "{text}");
    let text = explain("deployment/exposed".into(), unlabeled.name().into());
    assert!(text.contains("NOT labeled tunnels.pico.sh/injection=enabled"), "{text}");
    webhook.unregister(&client).await;
    drop(webhook.proc);
}

#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn system_namespaces_dry_run_and_reinvocation() {
    let ground = ControlPlane::shared(Existing::NotAllowed).await.unwrap();
    let client = ground.client().await.unwrap();
    let ns = ground.namespace("dryrun").await.unwrap();
    label_for_injection(&client, ns.name()).await;
    let mut webhook = Webhook::start(ground, false).await;
    // Scoped to kube-system too, without the label: the webhook itself must refuse it.
    webhook.register(&client, &[ns.name(), "kube-system"], false).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    wait_active(&pods).await;

    let system: Api<Pod> = Api::namespaced(client.clone(), "kube-system");
    let name = format!("opted-in-{}", picotun_testground::random_suffix());
    let created = system
        .create(&PostParams::default(), &pod_json(&name, json!({"tunnels.pico.sh/inject": "true"}), json!({})))
        .await
        .unwrap();
    assert!(sidecar_of(&created).is_none(), "kube-system is never injected");
    let _ = system.delete(&name, &DeleteParams::default()).await;
    assert!(webhook.metrics().await.contains("picotun_webhook_skips_total{reason=\"system_namespace\"} 1"));

    // Server-side dry run: the answer shows the sidecar, nothing is stored.
    let dry = PostParams { dry_run: true, ..Default::default() };
    let shown = pods
        .create(&dry, &pod_json("dry", json!({}), json!({"tunnels.pico.sh/expose": "tcp:any=8080"})))
        .await
        .unwrap();
    assert!(sidecar_of(&shown).is_some());
    assert!(pods.get_opt("dry").await.unwrap().is_none(), "a dry run stores nothing");

    // A pod that already carries the sidecar (e.g. from `picotun inject`) is left as it is.
    let outcome = picotun::webhook::inject::mutate(
        &pod_json("pre", json!({"tunnels.pico.sh/inject": "true"}), json!({})),
        ns.name(),
        None,
        &[],
        false,
        &picotun::webhook::inject::InjectConfig::default(),
    );
    let stored = pods.create(&PostParams::default(), outcome.pod.as_ref().unwrap()).await.unwrap();
    assert_eq!(sidecar_count(&stored), 1, "injected once, not twice");

    // Bad input straight to the webhook: clear errors, no crash.
    for (content_type, body, want) in [
        ("text/plain", "{}", "content type must be application/json"),
        ("application/json", "{not json", "malformed AdmissionReview"),
        ("application/json", r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#, "no request"),
    ] {
        let (status, text) = webhook.post("/mutate", content_type, "", body.as_bytes()).await;
        assert_eq!(status, 400, "{text}");
        assert!(text.contains(want), "{text}");
    }
    let (status, _) = webhook.post("/mutate", "application/json", "", &vec![b' '; 5 * 1024 * 1024]).await;
    assert_eq!(status, 413, "an oversized body is refused");
    assert!(webhook.proc.is_running());
    webhook.unregister(&client).await;
}

#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn a_rotated_certificate_is_served_without_a_failed_admission() {
    let ground = ControlPlane::shared(Existing::NotAllowed).await.unwrap();
    let client = ground.client().await.unwrap();
    let ns = ground.namespace("rotate").await.unwrap();
    label_for_injection(&client, ns.name()).await;
    let mut webhook = Webhook::start(ground, false).await;
    webhook.register(&client, &[ns.name()], true).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    wait_active(&pods).await;
    let before = served_cert(&webhook.ca, &webhook.addr).await;

    // Pods keep being created while the files are replaced (key first, then the certificate:
    // the mismatched moment in between must not be served).
    let creator = {
        let pods = pods.clone();
        tokio::spawn(async move {
            let mut results = Vec::new();
            for i in 0..40 {
                let p = pod_json(&format!("during-{i}"), json!({"tunnels.pico.sh/inject": "true"}), json!({}));
                results.push(pods.create(&PostParams::default(), &p).await.map(|p| sidecar_of(&p).is_some()));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            results
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let renewed: CertAndKey = webhook.ca.issue_loopback_server(&[]).unwrap();
    std::fs::write(&webhook.key_file, &renewed.key_pem).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(&webhook.cert_file, &renewed.cert_pem).unwrap();

    let results = creator.await.unwrap();
    let failures: Vec<_> = results.iter().filter(|r| !matches!(r, Ok(true))).collect();
    assert!(failures.is_empty(), "every admission during the swap succeeded and injected: {failures:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut after = served_cert(&webhook.ca, &webhook.addr).await;
    while after == before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = served_cert(&webhook.ca, &webhook.addr).await;
    }
    assert_ne!(after, before, "new connections get the new certificate");
    let renewed_der = rustls::pki_types::pem::PemObject::from_pem_slice(renewed.cert_pem.as_bytes())
        .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
        .unwrap();
    assert_eq!(after, renewed_der);
    assert!(webhook.proc.is_running());
    webhook.unregister(&client).await;
}

/// The certificate a fresh TLS connection is served.
async fn served_cert(ca: &Ca, addr: &str) -> Vec<u8> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tls_client(ca).connect(name, tcp).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// A raw HTTPS POST /mutate; (status, body).
/// `picotun inject -f -` and `picotun certs`, as a user runs them.
#[test]
fn inject_and_certs_commands() {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_picotun"))
        .args(["inject", "-f", "-", "--native-sidecar", "false"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  labels: {tunnels.pico.sh/inject: \"true\"}\nspec:\n  containers: [{name: app, image: x}]\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let yaml = String::from_utf8(out.stdout).unwrap();
    let pod: Pod = serde_yaml::from_str(&yaml).unwrap();
    assert_eq!(pod.spec.unwrap().containers.len(), 2, "a regular sidecar container with --native-sidecar false");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Pod/p: injected (pod label tunnels.pico.sh/inject=true"));

    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_picotun"))
        .args(["certs", "--out-dir", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let bundle = String::from_utf8(out.stdout).unwrap();
    let ca = base64::engine::general_purpose::STANDARD.decode(bundle.trim()).unwrap();
    assert_eq!(ca, std::fs::read(dir.path().join("ca.crt")).unwrap(), "the printed caBundle is ca.crt");
    for f in ["tls.crt", "tls.key", "ca.key"] {
        assert!(dir.path().join(f).exists(), "{f}");
    }
}

#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn a_pod_created_after_its_route_starts_with_the_routes_tunnels() {
    let ground = ControlPlane::shared(Existing::Allowed).await.unwrap();
    let client = ground.client().await.unwrap();
    let ns = ground.namespace("inject-routes").await.unwrap();
    label_for_injection(&client, ns.name()).await;
    let pp = PostParams::default();
    let service: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]},
    }))
    .unwrap();
    Api::namespaced(client.clone(), ns.name()).create(&pp, &service).await.unwrap();
    let ingress: k8s_openapi::api::networking::v1::Ingress = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"ingressClassName": "pico-tunnel", "rules": [{"host": "early", "http": {"paths": [
            {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}]},
    }))
    .unwrap();
    Api::namespaced(client.clone(), ns.name()).create(&pp, &ingress).await.unwrap();
    // Ready only once its route caches are complete.
    let mut webhook = Webhook::start(ground, false).await;
    webhook.register(&client, &[ns.name()], true).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    wait_active(&pods).await;

    // Opted in, and backing the Ingress: the tunnels file holds the route's tunnel from the start,
    // before any controller has seen the pod.
    let created = pods
        .create(&pp, &pod_json("web-1", json!({"app": "web", "tunnels.pico.sh/inject": "true"}), json!({})))
        .await
        .unwrap();
    let file = &created.metadata.annotations.as_ref().unwrap()["tunnels.pico.sh/tunnels"];
    let tunnels = picotun::tunnel::TunnelsFile::parse(file).unwrap();
    assert_eq!(tunnels.tunnels.len(), 1, "{file}");
    assert_eq!(tunnels.tunnels[0].name, "ing-web-early");
    assert_eq!(tunnels.tunnels[0].target_port, 8080, "the named target port, from this pod's containers");
    // A pod the Service does not select gets none.
    let other = pods
        .create(&pp, &pod_json("other", json!({"app": "other", "tunnels.pico.sh/inject": "true"}), json!({})))
        .await
        .unwrap();
    let file = &other.metadata.annotations.as_ref().unwrap()["tunnels.pico.sh/tunnels"];
    assert!(picotun::tunnel::TunnelsFile::parse(file).unwrap().tunnels.is_empty(), "{file}");
    // `picotun explain` resolves the routes the same way.
    Api::<Deployment>::namespaced(client.clone(), ns.name())
        .create(&pp, &deployment("web", json!({}), json!({}), json!({})))
        .await
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_picotun"))
        .args(["explain", "deployment/web", "-n", ns.name(), "--inject-route-backends"])
        .env("KUBECONFIG", ground.kubeconfig())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("backs a route picotun serves") && text.contains("tunnel ing-web-early: http"), "{text}");
    webhook.unregister(&client).await;
    drop(webhook.proc);
}
