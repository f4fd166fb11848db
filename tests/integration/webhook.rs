//! `picotun webhook` registered with the test ground's real kube-apiserver: pods the
//! controller-manager creates are injected (or not) as the rules say, and run on kwok nodes.

use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use picotun_testground::pki::{Ca, CertAndKey};
use picotun_testground::{ControlPlane, Existing, wait_for};
use serde_json::{Value, json};

use crate::support::{
    Webhook, WebhookOptions, label_for_injection, pod_json, sidecar_count, sidecar_of, tls_client, wait_active,
};

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
    // Exposed by an annotation on the pod template, under a name of this test's own (names are
    // cluster-wide: the first to ask in the shared ground owns one).
    let demo = format!("demo-{}", picotun_testground::random_suffix());
    let expose = json!({"tunnels.pico.sh/expose": format!("http:{demo}=http")});
    deployments.create(&pp, &deployment("exposed", json!({}), json!({}), expose)).await.unwrap();
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
        let tunnels = picotun::core::tunnel::TunnelsFile::parse(&annotations["tunnels.pico.sh/tunnels"]).unwrap();
        assert_eq!(tunnels.tunnels[0].host.as_deref(), Some(demo.as_str()));
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
        .create(
            &pp,
            &deployment(
                "exposed",
                json!({}),
                json!({}),
                json!({"tunnels.pico.sh/expose": format!("http:{demo}=8080")}),
            ),
        )
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
    let tunnel = format!("tunnel http-{demo}: http {demo} -> port 8080");
    assert!(text.contains("already injected") && text.contains(&tunnel), "{text}");
    assert!(text.contains("auth: the account key from Secret picotun-ssh-key"), "{text}");
    assert!(text.contains("ticket: carries tunnels.pico.sh/injected"), "{text}");
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
        .args(["inject", "-f", "-", "--native-sidecar", "false", "--sidecar-auth", "key"])
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
    let pod: Pod = serde_saphyr::from_str(&yaml).unwrap();
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
    let tunnels = picotun::core::tunnel::TunnelsFile::parse(file).unwrap();
    assert_eq!(tunnels.tunnels.len(), 1, "{file}");
    assert_eq!(tunnels.tunnels[0].name, "ing-web-early");
    assert_eq!(tunnels.tunnels[0].target_port, 8080, "the named target port, from this pod's containers");
    // A pod the Service does not select gets none.
    let other = pods
        .create(&pp, &pod_json("other", json!({"app": "other", "tunnels.pico.sh/inject": "true"}), json!({})))
        .await
        .unwrap();
    let file = &other.metadata.annotations.as_ref().unwrap()["tunnels.pico.sh/tunnels"];
    assert!(picotun::core::tunnel::TunnelsFile::parse(file).unwrap().tunnels.is_empty(), "{file}");
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

/// `kubectl create` of `pod` (JSON): the pod the apiserver answered with, and what kubectl
/// printed on stderr -- the admission warnings a user sees.
fn kubectl_create(ground: &ControlPlane, pod: &Value) -> (Pod, String) {
    let mut child = Command::new("kubectl")
        .args(["create", "-o", "json", "-f", "-"])
        .env("KUBECONFIG", ground.kubeconfig())
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), pod.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{stderr}");
    (serde_json::from_slice(&out.stdout).unwrap(), stderr)
}

/// A name belongs to its oldest claimant across the cluster, and the webhook asks the same owners
/// as the controller: a new pod's own expose annotation does not get it a name another
/// namespace's Ingress owns, nor a custom domain the allow-list does not give its namespace.
/// Each dropped tunnel is said, with its owner, in the admission warnings.
#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn a_new_pods_expose_annotation_gets_no_name_another_namespace_owns() {
    let ground = ControlPlane::shared(Existing::Allowed).await.unwrap();
    let client = ground.client().await.unwrap();
    // Names of this test's own: the ground is shared, and names are cluster-wide.
    let name = format!("owned-{}", picotun_testground::random_suffix());
    let domain = format!("app.{name}.test");
    let owner = ground.namespace("names-owner").await.unwrap();
    let asker = ground.namespace("names-asker").await.unwrap();
    // For a pod that claims a creation time of its own, alone in its namespace (asker's claim is
    // dated by its first pod, which may share the Ingress's second; a tie goes to the namespace
    // that sorts first).
    let forger = ground.namespace("names-tardy").await.unwrap();
    for ns in [&owner, &asker, &forger] {
        label_for_injection(&client, ns.name()).await;
    }
    let ingress: k8s_openapi::api::networking::v1::Ingress = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"ingressClassName": "pico-tunnel", "rules": [{"host": name, "http": {"paths": [
            {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}]},
    }))
    .unwrap();
    Api::namespaced(client.clone(), owner.name()).create(&PostParams::default(), &ingress).await.unwrap();
    // The custom domain is the owner namespace's to use (picotun-config's
    // PICOTUN_CUSTOM_DOMAIN_ALLOW reaches the webhook as this flag).
    let allow = format!("{}=*.{name}.test", owner.name());
    let options = WebhookOptions { args: vec!["--custom-domain-allow".into(), allow], ..Default::default() };
    let mut webhook = Webhook::start_with(Some(ground), options).await;
    webhook.register(&client, &[owner.name(), asker.name(), forger.name()], true).await;
    for ns in [&owner, &asker, &forger] {
        wait_active(&Api::<Pod>::namespaced(client.clone(), ns.name())).await;
    }

    // Each pod a free name of its own too (the first to ask would own a shared one).
    let expose = |free: &str| format!("http:{name}=8080, http:{name}-{free}=8080, http:{domain}=8080");
    let pod = |ns: &str, free: &str| {
        let expose = expose(free);
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "namespace": ns, "annotations": {"tunnels.pico.sh/expose": expose}},
            "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]}})
    };
    let hosts = |pod: &Pod| -> Vec<String> {
        let file = &pod.metadata.annotations.as_ref().unwrap()["tunnels.pico.sh/tunnels"];
        let tunnels = picotun::core::tunnel::TunnelsFile::parse(file).unwrap().tunnels;
        tunnels.into_iter().filter_map(|t| t.host).collect()
    };

    // Another namespace: neither the Ingress's name nor the fenced domain; the free name it gets.
    let (created, warnings) = kubectl_create(ground, &pod(asker.name(), "b"));
    assert!(sidecar_of(&created).is_some(), "injected");
    assert_eq!(hosts(&created), [format!("{name}-b")], "{warnings}");
    let owned =
        format!("tunnel http-{name} is not opened: tuns name \"{name}\" belongs to Ingress {}/web", owner.name());
    assert!(warnings.contains(&owned), "the owner is named: {warnings}");
    let fenced = format!("custom domain {domain} is not allowed for namespace {}", asker.name());
    assert!(warnings.contains(&fenced), "{warnings}");
    // The pod keeps its annotation as written: the controller recomputes from it, by the same rule.
    assert_eq!(created.metadata.annotations.as_ref().unwrap()["tunnels.pico.sh/expose"], expose("b"));
    // A creationTimestamp the client wrote does not make a pod older than the Ingress (the
    // apiserver replaces it before admission, and the webhook drops any it is sent).
    let mut forged = pod(forger.name(), "c");
    forged["metadata"]["creationTimestamp"] = json!("2000-01-01T00:00:00Z");
    let (created, warnings) = kubectl_create(ground, &forged);
    assert_eq!(hosts(&created), [format!("{name}-c")], "{warnings}");
    // Its owner is the Ingress, or asker's pod when that was created in the Ingress's second.
    assert!(warnings.contains(&format!("tunnel http-{name} is not opened")), "{warnings}");

    // The owner's namespace may use the domain. The name is its Ingress's, not its expose
    // annotations': a different claimant, refused too.
    let (created, warnings) = kubectl_create(ground, &pod(owner.name(), "a"));
    assert_eq!(hosts(&created), [format!("{name}-a"), domain.clone()], "{warnings}");
    assert!(warnings.contains(&format!("tunnel http-{name} is not opened")), "{warnings}");
    webhook.unregister(&client).await;
}

#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn certificate_mode_mounts_no_key_and_only_key_mode_looks_for_the_key_secret() {
    let ground = ControlPlane::shared(Existing::Allowed).await.unwrap();
    let client = ground.client().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let warnings_of = |ns: &str, name: &str| {
        // kubectl prints the admission warnings a user sees.
        let pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": {"tunnels.pico.sh/inject": "true"},
                         "annotations": {"tunnels.pico.sh/startup-gate": "true"}},
            "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]}});
        let mut child = Command::new("kubectl")
            .args(["create", "-f", "-"])
            .env("KUBECONFIG", ground.kubeconfig())
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), pod.to_string().as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stderr).unwrap()
    };
    let missing = "picotun_webhook_failures_total{reason=\"key_secret_missing\"}";

    // Certificate mode: no Secret looked for, none mounted, no warning about one.
    let options = WebhookOptions { certificate_ca_dir: Some(dir.path().to_path_buf()), ..Default::default() };
    let mut certificates = Webhook::start_with(Some(ground), options).await;
    let ns = ground.namespace("auth-certificate").await.unwrap();
    label_for_injection(&client, ns.name()).await;
    certificates.register(&client, &[ns.name()], true).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    wait_active(&pods).await;
    let warnings = warnings_of(ns.name(), "web");
    assert!(!warnings.contains("Secret picotun-ssh-key"), "{warnings}");
    assert_eq!(certificates.metric(missing).await, 0);
    let pod = pods.get("web").await.unwrap();
    let text = serde_json::to_string(&pod).unwrap();
    assert!(!text.contains("picotun-ssh-key") && !text.contains("PICOTUN_KEY_FILE"), "{text}");
    assert!(!certificates.proc.log_tail(200).contains("cannot check the key Secret"));

    // The startup gate: the sidecar holds the app's containers until /tunnels-up answers (the
    // kubelet starts them after a native sidecar's startupProbe passes); readiness stays the
    // agent's own /ready.
    let sidecar = sidecar_of(&pod).unwrap();
    let startup = sidecar.startup_probe.as_ref().expect("a startupProbe");
    assert_eq!(startup.http_get.as_ref().unwrap().path.as_deref(), Some("/tunnels-up"));
    assert_eq!((startup.period_seconds, startup.failure_threshold), (Some(1), Some(300)));
    assert_eq!(sidecar.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap().path.as_deref(), Some("/ready"));
    let env = sidecar.env.as_ref().unwrap();
    assert!(env.iter().any(|e| e.name == "PICOTUN_OPEN_BEFORE_APP" && e.value.as_deref() == Some("true")));
    certificates.unregister(&client).await;

    // Key mode: the Secret's absence is said, once looked up.
    let mut keys = Webhook::start(ground, false).await;
    let ns = ground.namespace("auth-key").await.unwrap();
    label_for_injection(&client, ns.name()).await;
    keys.register(&client, &[ns.name()], true).await;
    wait_active(&Api::namespaced(client.clone(), ns.name())).await;
    let warnings = warnings_of(ns.name(), "web");
    assert!(warnings.contains("Secret picotun-ssh-key (the tunnel SSH key) does not exist"), "{warnings}");
    assert!(keys.metric(missing).await >= 1);
    keys.unregister(&client).await;
}

/// An AdmissionReview for an opted-in pod, as the apiserver sends it.
fn review() -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "u-1",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "apps", "operation": "CREATE", "userInfo": {"username": "u"}, "dryRun": false,
            "object": {"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": "p", "labels": {"tunnels.pico.sh/inject": "true"}},
                       "spec": {"containers": [{"name": "app", "image": "x"}]}},
        }
    }))
    .unwrap()
}

/// A TLS connection to the webhook's admission port, handshake done (`alpn`: protocols to offer).
async fn connect(webhook: &Webhook, alpn: &[&[u8]]) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    connect_to(webhook, &webhook.addr, alpn).await
}

/// The same to `addr` (the sidecars' port: `webhook.agent_addr`).
async fn connect_to(
    webhook: &Webhook,
    addr: &str,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::pem::PemObject::from_pem_slice(webhook.ca.cert_pem().as_bytes()).unwrap()).unwrap();
    let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await.unwrap()
}

/// Reads until the server closes the connection; the bytes, or None if it is still open after
/// `bound` (the test fails then: the server never cut it off).
async fn read_until_closed<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, bound: Duration) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut raw = Vec::new();
    let read = tokio::time::timeout(bound, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
        }
    });
    read.await.ok().map(|_| raw)
}

/// What a slow client can hold: the server cuts it off instead of waiting for ever.
#[tokio::test]
async fn clients_that_never_finish_their_headers_or_body_are_cut_off() {
    use tokio::io::AsyncWriteExt;
    let args = ["--header-read-timeout", "1s", "--body-read-timeout", "1s"];
    let options = WebhookOptions { args: args.map(str::to_string).to_vec(), ..Default::default() };
    let mut webhook = Webhook::start_with(None, options).await;
    let bound = Duration::from_secs(30);

    // HTTP/1.1 headers that never end.
    let started = Instant::now();
    let mut slow = connect(&webhook, &[b"http/1.1"]).await;
    slow.write_all(b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n").await.unwrap();
    assert!(read_until_closed(&mut slow, bound).await.is_some(), "headers never finished: still open after {bound:?}");
    eprintln!("HTTP/1.1 headers never finished: closed after {:?}", started.elapsed());
    // The sidecars' port has the same bounds.
    let mut slow = connect_to(&webhook, &webhook.agent_addr, &[b"http/1.1"]).await;
    slow.write_all(b"POST /report HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n").await.unwrap();
    assert!(read_until_closed(&mut slow, bound).await.is_some(), "agent port: headers never finished, still open");

    // HTTP/2: the connection preface, then nothing.
    let started = Instant::now();
    let mut h2 = connect(&webhook, &[b"h2"]).await;
    assert_eq!(h2.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    assert!(
        read_until_closed(&mut h2, bound).await.is_some(),
        "an h2 client with no request: still open after {bound:?}"
    );
    eprintln!("h2 without a request: closed after {:?}", started.elapsed());

    // A body that never finishes: 408, and the connection closed.
    let started = Instant::now();
    let mut body = connect(&webhook, &[b"http/1.1"]).await;
    body.write_all(
        b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"api",
    )
    .await
    .unwrap();
    let answer = read_until_closed(&mut body, bound).await.expect("a body that never finished: still open");
    let answer = String::from_utf8_lossy(&answer).to_string();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("the body did not arrive within 1s"), "{answer}");
    eprintln!("body never finished: 408 after {:?}", started.elapsed());

    // The server is fine, and says what it closed.
    let (status, text) = webhook.post("/mutate", "application/json", "", &review()).await;
    assert_eq!(status, 200, "{text}");
    let cut = webhook.metric("picotun_webhook_connections_closed_total{reason=\"header_timeout\"}").await;
    assert_eq!(cut, 3, "the HTTP/1.1 clients on both ports and the h2 client");
    assert!(webhook.proc.is_running());
}

/// With the cap reached, another connection waits for a slot and is answered once one closes;
/// with as many again waiting, one more is closed at once. Nothing crashes.
#[tokio::test]
async fn over_the_connection_cap_a_connection_waits_for_a_slot() {
    use tokio::io::AsyncWriteExt;
    // Idle connections are not cut off during the test.
    let args = ["--max-connections", "2", "--header-read-timeout", "60s", "--tls-handshake-timeout", "60s"];
    let options = WebhookOptions { args: args.map(str::to_string).to_vec(), ..Default::default() };
    let mut webhook = Webhook::start_with(None, options).await;
    let metric = |name: &'static str| {
        let webhook = &webhook;
        async move { webhook.metric(&format!("picotun_webhook_{name}")).await }
    };
    let first = connect(&webhook, &[b"http/1.1"]).await;
    let second = connect(&webhook, &[b"http/1.1"]).await;
    wait_for("two open connections", Duration::from_secs(10), Duration::from_millis(20), || async {
        Ok((metric("open_connections").await == 2).then_some(()))
    })
    .await
    .unwrap();

    // A third: accepted, held before its handshake.
    let addr = webhook.addr.clone();
    let ca = webhook.ca.cert_pem();
    let third = tokio::spawn(async move {
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(rustls::pki_types::pem::PemObject::from_pem_slice(ca.as_bytes()).unwrap()).unwrap();
        let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await.unwrap();
        let body = review();
        let head = format!(
            "POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        tls.write_all(head.as_bytes()).await.unwrap();
        tls.write_all(&body).await.unwrap();
        read_until_closed(&mut tls, Duration::from_secs(60)).await.unwrap()
    });
    wait_for("a connection waiting for a slot", Duration::from_secs(10), Duration::from_millis(20), || async {
        Ok((metric("waiting_connections").await == 1).then_some(()))
    })
    .await
    .unwrap();
    assert!(!third.is_finished(), "not answered while both slots are held");
    assert_eq!(metric("open_connections").await, 2);
    // The sidecars' port has slots of its own: a full admission port does not hold them up (nor
    // could pods crowd the apiserver out). No token: 401, answered at once.
    let (status, text) = webhook.agent_post("/report", "application/json", "", b"{}").await;
    assert_eq!(status, 401, "the agent port answers while the admission port is full: {text}");

    // Two more: the first waits too, the second finds the queue full and is closed at once.
    let fourth = tokio::net::TcpStream::connect(&webhook.addr).await.unwrap();
    wait_for("two waiting", Duration::from_secs(10), Duration::from_millis(20), || async {
        Ok((metric("waiting_connections").await == 2).then_some(()))
    })
    .await
    .unwrap();
    let mut fifth = tokio::net::TcpStream::connect(&webhook.addr).await.unwrap();
    assert!(read_until_closed(&mut fifth, Duration::from_secs(10)).await.is_some(), "the fifth is closed");
    assert_eq!(metric("connections_closed_total{reason=\"over_capacity\"}").await, 1);
    drop(fourth);

    // One slot comes free: the third is served, its admission answered.
    drop(first);
    let answer = String::from_utf8(third.await.unwrap()).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let (_, body) = answer.split_once("\r\n\r\n").unwrap();
    let review: Value = serde_json::from_str(body).unwrap();
    assert_eq!(review["response"]["allowed"], true);
    assert!(!review["response"]["patch"].is_null(), "the pod was injected");
    drop(second);
    assert!(webhook.proc.is_running());
}

/// SIGTERM: /ready goes 503 at once, the server serves on for the drain delay, then stops
/// accepting, answers the admission in flight, and exits 0.
#[tokio::test]
async fn on_sigterm_the_admission_in_flight_is_answered_and_ready_goes_503_first() {
    use tokio::io::AsyncWriteExt;
    let args = ["--drain-delay", "3s", "--body-read-timeout", "60s"];
    let options = WebhookOptions { args: args.map(str::to_string).to_vec(), ..Default::default() };
    let mut webhook = Webhook::start_with(None, options).await;
    let body = review();
    let (half, rest) = body.split_at(body.len() / 2);
    let mut in_flight = connect(&webhook, &[b"http/1.1"]).await;
    let head = format!(
        "POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    in_flight.write_all(head.as_bytes()).await.unwrap();
    in_flight.write_all(half).await.unwrap();
    wait_for("the admission in flight", Duration::from_secs(10), Duration::from_millis(20), || async {
        Ok((webhook.metric("picotun_webhook_requests_in_flight").await == 1).then_some(()))
    })
    .await
    .unwrap();

    webhook.proc.signal(nix::sys::signal::Signal::SIGTERM);
    let admin = webhook.admin.clone();
    wait_for("/ready to answer 503", Duration::from_secs(10), Duration::from_millis(20), || {
        let admin = admin.clone();
        async move {
            let status = picotun_testground::http::get(&admin, "w", "/ready").await.map(|r| r.status);
            Ok((status.as_ref().ok() == Some(&503)).then_some(()))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", webhook.proc.log_tail(20)));
    // During the drain delay a new admission is still answered, and so is a sidecar.
    let (status, text) = webhook.post("/mutate", "application/json", "", &body).await;
    assert_eq!(status, 200, "served during the drain delay: {text}");
    let (status, text) = webhook.agent_post("/report", "application/json", "", b"{}").await;
    assert_eq!(status, 401, "the sidecars' port is served during the drain delay: {text}");
    // Then both stop accepting...
    for addr in [webhook.addr.clone(), webhook.agent_addr.clone()] {
        wait_for(
            &format!("the listener on {addr} to close"),
            Duration::from_secs(20),
            Duration::from_millis(50),
            || {
                let addr = addr.clone();
                async move { Ok(tokio::net::TcpStream::connect(&addr).await.is_err().then_some(())) }
            },
        )
        .await
        .unwrap();
    }
    assert!(webhook.proc.is_running(), "still running with a request in flight");
    // ...and the request in flight is answered.
    in_flight.write_all(rest).await.unwrap();
    let answer = read_until_closed(&mut in_flight, Duration::from_secs(20)).await.expect("an answer");
    let answer = String::from_utf8(answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let review: Value = serde_json::from_str(answer.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(
        (review["response"]["uid"].as_str(), review["response"]["allowed"].as_bool()),
        (Some("u-1"), Some(true))
    );
    let status = webhook.proc.wait_exit(Duration::from_secs(20)).expect("exited");
    assert!(status.success(), "{status:?}\n{}", webhook.proc.log_tail(20));
}

/// The apiserver's /mutate and the sidecars' /report and /certificate are served on ports of
/// their own (one certificate), so a NetworkPolicy can admit every source to the one and only
/// injected namespaces to the other: each path answers 404 on the other port, saying where it is.
#[tokio::test]
async fn mutate_and_the_sidecar_endpoints_are_each_served_only_on_their_own_port() {
    let mut webhook = Webhook::start_with(None, WebhookOptions::default()).await;
    assert_ne!(webhook.port, webhook.agent_port);
    let body = |text: &str| text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();

    // The admission port: /mutate, and nothing of the sidecars'.
    let (status, text) = webhook.post("/mutate", "application/json", "", &review()).await;
    assert_eq!(status, 200, "{text}");
    for path in ["/report", "/certificate"] {
        let (status, text) = webhook.post(path, "application/json", "Authorization: Bearer x\r\n", b"{}").await;
        assert_eq!(status, 404, "{path} on the admission port: {text}");
        assert!(body(&text).contains("/report and /certificate are on --agent-listen"), "{text}");
    }
    // The sidecars' port (the same certificate: the client trusts only the test CA): /report and
    // /certificate are there (no token: 401), /mutate is not.
    for path in ["/report", "/certificate"] {
        let (status, text) = webhook.agent_post(path, "application/json", "", b"{}").await;
        assert_eq!(status, 401, "{path} on the agent port: {text}");
    }
    let (status, text) = webhook.agent_post("/mutate", "application/json", "", &review()).await;
    assert_eq!(status, 404, "/mutate on the agent port: {text}");
    assert!(body(&text).contains("/mutate is on --listen"), "{text}");
    assert_eq!(webhook.metric("picotun_webhook_requests_total{result=\"injected\"}").await, 1, "one admission only");
    assert!(webhook.proc.is_running());
}

/// A fresh namespace labeled for injection, and a webhook registered for it and in effect.
async fn injecting(prefix: &str) -> (&'static ControlPlane, kube::Client, picotun_testground::TestNamespace, Webhook) {
    let ground = ControlPlane::shared(Existing::Allowed).await.unwrap();
    let client = ground.client().await.unwrap();
    let ns = ground.namespace(prefix).await.unwrap();
    label_for_injection(&client, ns.name()).await;
    let mut webhook = Webhook::start(ground, false).await;
    webhook.register(&client, &[ns.name()], true).await;
    wait_active(&Api::namespaced(client.clone(), ns.name())).await;
    (ground, client, ns, webhook)
}

/// Defect 11: a Job a CronJob owns makes pods that are injected because the CronJob opts in (as
/// `picotun explain` reads it); before, the webhook's owner lookup stopped at the Job.
#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn a_cronjobs_pods_are_injected_from_the_cronjobs_annotation() {
    let (_, client, ns, webhook) = injecting("cronjob").await;
    let pod = crate::support::cronjob_pod(&client, ns.name()).await;
    assert!(sidecar_of(&pod).is_some(), "the CronJob's opt-in reaches its pods: {:?}", pod.spec);
    webhook.unregister(&client).await;
}

/// Defect 11: a pod with a volume of its own named like one picotun adds is created and runs
/// without the sidecar, with an admission warning that names the volume and the fix -- before,
/// the patch gave the pod the volume name twice and the apiserver rejected the pod.
#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn a_pod_with_a_volume_named_like_picotuns_runs_uninjected_with_a_warning() {
    let (ground, client, ns, webhook) = injecting("volumes").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());

    let pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "clash", "namespace": ns.name(), "labels": {"tunnels.pico.sh/inject": "true"}},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1",
            "volumeMounts": [{"name": "picotun-tunnels", "mountPath": "/data"}]}],
            "volumes": [{"name": "picotun-tunnels", "emptyDir": {}}]}});
    let (created, warnings) = kubectl_create(ground, &pod);
    assert!(sidecar_of(&created).is_none(), "not injected");
    assert!(
        warnings.contains("volume named picotun-tunnels") && warnings.contains("rename it"),
        "the warning names the volume and the fix: {warnings}"
    );
    wait_for("the pod Running", Duration::from_secs(60), Duration::from_millis(250), || async {
        let p = pods.get("clash").await.map_err(|e| e.to_string())?;
        Ok((p.status.and_then(|s| s.phase).as_deref() == Some("Running")).then_some(()))
    })
    .await
    .unwrap();
    let metrics = webhook.metrics().await;
    assert!(metrics.contains("picotun_webhook_skips_total{reason=\"volume_conflict\"} 1"), "{metrics}");
    webhook.unregister(&client).await;
}

/// Defect: a sidecar limit below the default request, or a key-secret annotation that is no
/// Secret name, gave a pod the apiserver refused (about a container its author never wrote).
/// Now the pod is created, injected, with warnings that say what was changed.
#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn sidecar_annotations_the_apiserver_would_refuse_are_mended_with_a_warning() {
    let (ground, client, ns, webhook) = injecting("mended").await;
    let pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "mended", "namespace": ns.name(), "labels": {"tunnels.pico.sh/inject": "true"},
            "annotations": {"tunnels.pico.sh/sidecar-memory-limit": "1Ki", "tunnels.pico.sh/sidecar-cpu-request": "64",
                            "tunnels.pico.sh/key-secret": ""}},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]}});
    let (created, warnings) = kubectl_create(ground, &pod);
    let sidecar = sidecar_of(&created).expect("injected");
    let resources = sidecar.resources.as_ref().unwrap();
    assert_eq!(resources.requests.as_ref().unwrap()["memory"].0, "1Ki", "{warnings}");
    assert!(warnings.contains("memory request") && warnings.contains("cpu request 64"), "{warnings}");
    assert!(warnings.contains("is not a Secret name"), "{warnings}");
    webhook.unregister(&client).await;
}

/// Admission requests the webhook has answered (its own count, from /metrics)./// Admission requests the webhook has answered (its own count, from /metrics).
async fn calls(webhook: &Webhook) -> u64 {
    webhook.metric("picotun_webhook_duration_seconds_count").await
}

/// A pod for the matchConditions tests: `owner`, an ownerReference; `host_network` as said.
fn conditions_pod(name: &str, labels: Value, annotations: Value, owner: Option<&Value>, host_network: bool) -> Pod {
    let mut pod = crate::support::pod_json(name, labels, annotations);
    pod.metadata.owner_references = owner.map(|o| vec![serde_json::from_value(o.clone()).unwrap()]);
    pod.spec.as_mut().unwrap().host_network = host_network.then_some(true);
    pod
}

/// A Deployment of no replicas (the pods it owns are the test's own, made by hand) and its
/// ReplicaSet, made by the controller-manager: (the pods' ownerReference, the workload the
/// webhook finds through it).
async fn owning_deployment(
    client: &kube::Client,
    ns: &str,
    name: &str,
    annotations: Value,
) -> (Value, picotun::core::pod::Workload) {
    let mut d = deployment(name, annotations.clone(), json!({}), json!({}));
    d.spec.as_mut().unwrap().replicas = Some(0);
    Api::<Deployment>::namespaced(client.clone(), ns).create(&PostParams::default(), &d).await.unwrap();
    let sets: Api<k8s_openapi::api::apps::v1::ReplicaSet> = Api::namespaced(client.clone(), ns);
    let rs = wait_for("the Deployment's ReplicaSet", Duration::from_secs(30), Duration::from_millis(100), || async {
        let list = sets.list(&ListParams::default().labels(&format!("app={name}"))).await.map_err(|e| e.to_string())?;
        Ok(list.items.into_iter().next())
    })
    .await
    .unwrap();
    let owner = json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs.metadata.name,
                       "uid": rs.metadata.uid, "controller": true});
    let workload = picotun::core::pod::Workload {
        reference: format!("Deployment/{name}"),
        labels: Default::default(),
        annotations: serde_json::from_value(annotations).unwrap(),
    };
    (owner, workload)
}

/// The matchConditions deploy/ ships (issue 13): the apiserver sends picotun only the pods it
/// could inject -- so a pod that does not opt in is created as if no webhook were registered --
/// and the webhook still decides for those it is sent. Each pod below is created in a namespace
/// labeled for injection, the whole shipped webhook registered (selectors and conditions);
/// whether the apiserver called the webhook is the webhook's own admission count. Every pod not
/// sent is one the webhook would have left alone (its decision, offline, on the same pod).
#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn only_pods_that_can_be_injected_reach_the_webhook() {
    let ground = ControlPlane::shared(Existing::Allowed).await.unwrap();
    let client = ground.client().await.unwrap();
    let ns = ground.namespace("conditions").await.unwrap();
    label_for_injection(&client, ns.name()).await;
    let mut webhook = Webhook::start(ground, false).await;
    webhook.register_as_shipped(&client, &[ns.name()]).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    wait_active(&pods).await;
    let (opted, opted_workload) =
        owning_deployment(&client, ns.name(), "opted", json!({"tunnels.pico.sh/inject": "true"})).await;
    let (plain, plain_workload) = owning_deployment(&client, ns.name(), "plain", json!({})).await;
    let no = json!({});
    let inject = |v: &str| json!({"tunnels.pico.sh/inject": v});
    let config = picotun::webhook::inject::InjectConfig::default();
    // What `picotun inject` writes (no ticket: offline), of a pod template and of a bare pod.
    let pre_injected = |pod: Pod, workload: Option<&picotun::core::pod::Workload>| {
        picotun::webhook::inject::mutate(&pod, ns.name(), workload, &[], false, &config).pod.expect("injected")
    };
    let mut sidecar_only = pre_injected(conditions_pod("x", inject("true"), no.clone(), None, false), None);
    sidecar_only.metadata.labels = Some([("app".to_string(), "x".to_string())].into());

    // (what, pod, its workload, sent to the webhook, injected)
    let cases = [
        (
            "no opt-in, no owner",
            conditions_pod("plain", json!({"app": "x"}), json!({"note": "x"}), None, false),
            None,
            false,
            false,
        ),
        ("label inject=true", conditions_pod("label", inject("true"), no.clone(), None, false), None, true, true),
        (
            "annotation expose",
            conditions_pod("expose", no.clone(), json!({"tunnels.pico.sh/expose": "tcp:any=8080"}), None, false),
            None,
            true,
            true,
        ),
        (
            "annotation inject=\" true \"",
            conditions_pod("spaced", no.clone(), inject(" true "), None, false),
            None,
            true,
            true,
        ),
        (
            "label inject=maybe (no meaning), no owner",
            conditions_pod("maybe", inject("maybe"), no.clone(), None, false),
            None,
            false,
            false,
        ),
        (
            "owned by a Deployment that opts in",
            conditions_pod("owned", no.clone(), no.clone(), Some(&opted), false),
            Some(&opted_workload),
            true,
            true,
        ),
        // Sent: only the webhook can look the workload up. It decides.
        (
            "owned by a Deployment that does not",
            conditions_pod("owned-plain", no.clone(), no.clone(), Some(&plain), false),
            Some(&plain_workload),
            true,
            false,
        ),
        // "false" on the pod wins over the Deployment's opt-in: not even sent.
        (
            "label inject=false, owned by a Deployment that opts in",
            conditions_pod("out-label", inject("false"), no.clone(), Some(&opted), false),
            Some(&opted_workload),
            false,
            false,
        ),
        (
            "annotation inject=false, owned by a Deployment that opts in",
            conditions_pod("out-annotation", no.clone(), inject("false"), Some(&opted), false),
            Some(&opted_workload),
            false,
            false,
        ),
        // The label is read first: "true" there opts in whatever the annotation says.
        (
            "label inject=true, annotation inject=false",
            conditions_pod("label-first", inject("true"), inject("false"), None, false),
            None,
            true,
            true,
        ),
        (
            "hostNetwork, label inject=true",
            conditions_pod("host", inject("true"), no.clone(), None, true),
            None,
            false,
            false,
        ),
        // `picotun inject` of a Deployment: the template carries the sidecar but not the opt-in.
        // Sent (it has an owner), and the webhook puts its own ticketed sidecar in its place.
        (
            "picotun inject output, opted in on the Deployment",
            {
                let mut p =
                    pre_injected(conditions_pod("pre", no.clone(), no.clone(), None, false), Some(&opted_workload));
                p.metadata.owner_references = Some(vec![serde_json::from_value(opted.clone()).unwrap()]);
                p
            },
            Some(&opted_workload),
            true,
            true,
        ),
        ("a sidecar of its own, no opt-in, no owner", sidecar_only, None, false, false),
    ];
    let dry = PostParams { dry_run: true, ..Default::default() };
    for (i, (what, pod, workload, sent, injected)) in cases.into_iter().enumerate() {
        let before = calls(&webhook).await;
        // The first for real (the pod is stored), the rest as server-side dry runs: admission
        // runs the same, and the owned pods stay away from their ReplicaSet controller.
        let params = if i == 0 { PostParams::default() } else { dry.clone() };
        let created = pods.create(&params, &pod).await.unwrap_or_else(|e| panic!("{what}: {e}"));
        let called = calls(&webhook).await - before;
        // Once: nothing after the webhook changes an injected pod (the apiserver's ServiceAccount
        // plugin finds the sidecar's API-token path taken), so it is not re-invoked.
        assert_eq!(called, u64::from(sent), "{what}: admission requests the webhook answered");
        let ticketed =
            created.metadata.annotations.as_ref().is_some_and(|a| a.contains_key("tunnels.pico.sh/injected"));
        assert_eq!(ticketed, injected, "{what}: injected by the webhook");
        assert_eq!(sidecar_count(&created), usize::from(injected || sidecar_of(&pod).is_some()), "{what}");
        // The webhook's decision stays the authority: offline, on the same pod, it says the same;
        // and a pod not sent is one it answers "allowed, unchanged, no warning".
        let offline = picotun::webhook::inject::mutate(&pod, ns.name(), workload, &[], false, &config);
        let would_inject = matches!(offline.decision, picotun::core::pod::Decision::Inject { .. });
        if !sent {
            assert!(
                !would_inject && offline.warnings.is_empty(),
                "{what}: not sent, but the webhook would act on it: {:?} {:?}",
                offline.decision,
                offline.warnings
            );
        } else if sidecar_of(&pod).is_none() {
            // (Offline there is no ticket key: a pod with a sidecar is taken as it is.)
            assert_eq!(would_inject, injected, "{what}: {:?}", offline.decision);
        }
    }
    webhook.unregister(&client).await;
}

/// A mutating webhook of the test's own over TLS on loopback: every pod it is sent gets the
/// label `label`=`value` (a JSON patch). Returns its clientConfig and the server task.
async fn labeling_webhook(label: &'static str, value: &'static str) -> (Value, tokio::task::JoinHandle<()>) {
    use rustls::pki_types::pem::PemObject;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = Ca::new("labeling-webhook-ca").unwrap();
    let serving = ca.issue_loopback_server(&[]).unwrap();
    let certs = vec![rustls::pki_types::CertificateDer::from_pem_slice(serving.cert_pem.as_bytes()).unwrap()];
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(serving.key_pem.as_bytes()).unwrap();
    let tls = rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(certs, key).unwrap();
    let app = axum::Router::new().route(
        "/mutate",
        axum::routing::post(move |axum::Json(review): axum::Json<Value>| async move {
            let path = format!("/metadata/labels/{}", label.replace('~', "~0").replace('/', "~1"));
            let patch = json!([{"op": "add", "path": path, "value": value}]);
            axum::Json(json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": {
                "uid": review["request"]["uid"], "allowed": true, "patchType": "JSONPatch",
                "patch": base64::engine::general_purpose::STANDARD.encode(patch.to_string())}}))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}/mutate", listener.local_addr().unwrap());
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let task = crate::support::serve_https(listener, acceptor, app);
    (json!({"url": url, "caBundle": base64::engine::general_purpose::STANDARD.encode(ca.cert_pem())}), task)
}

/// The conditions are evaluated on the pod as it is when picotun's turn comes, in every round:
/// an opt-in that a webhook called before picotun's adds is seen, and re-invocation (a webhook
/// called after picotun's changed the pod) reaches picotun again -- the injected pod still opts
/// in -- and leaves one sidecar. A pod that never opts in is not sent in either round.
#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn conditions_see_earlier_webhooks_opt_ins_and_let_re_invocation_through() {
    let (_, client, ns, webhook) = injecting("reinvoke").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    // Configurations are called in name order: "aa-" before picotun's "picotun-test-", "zz-" after.
    let (earlier, earlier_task) = labeling_webhook("tunnels.pico.sh/inject", "true").await;
    let (later, later_task) = labeling_webhook("touched", "yes").await;
    let suffix = picotun_testground::random_suffix();
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let scope = json!({"matchLabels": {"kubernetes.io/metadata.name": ns.name()}});
    for (name, client_config, object_selector) in [
        (format!("aa-opt-in-{suffix}"), earlier, json!({"matchLabels": {"opt-in-by-webhook": "yes"}})),
        (format!("zz-touch-{suffix}"), later, json!({})),
    ] {
        let config: MutatingWebhookConfiguration = serde_json::from_value(json!({
            "metadata": {"name": name},
            "webhooks": [{"name": "label.picotun.test", "clientConfig": client_config,
                "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
                "namespaceSelector": scope, "objectSelector": object_selector,
                "sideEffects": "None", "admissionReviewVersions": ["v1"], "failurePolicy": "Fail", "timeoutSeconds": 5}],
        }))
        .unwrap();
        configs.create(&PostParams::default(), &config).await.unwrap();
    }
    let dry = PostParams { dry_run: true, ..Default::default() };
    let label = |pod: &Pod, key: &str| pod.metadata.labels.as_ref().and_then(|l| l.get(key)).cloned();
    let mut n = 0;
    wait_for("both labeling webhooks in effect", Duration::from_secs(30), Duration::from_millis(200), || {
        n += 1;
        let (pods, dry) = (pods.clone(), dry.clone());
        async move {
            let probe = crate::support::pod_json(&format!("probe-{n}"), json!({"opt-in-by-webhook": "yes"}), json!({}));
            let p = pods.create(&dry, &probe).await.map_err(|e| e.to_string())?;
            Ok((label(&p, "touched").is_some() && label(&p, "tunnels.pico.sh/inject").is_some()).then_some(()))
        }
    })
    .await
    .unwrap();

    for (what, name, labels, sent, injected) in [
        ("opted in by an earlier webhook", "by-webhook", json!({"opt-in-by-webhook": "yes"}), 2, true),
        ("opted in by its label", "by-label", json!({"tunnels.pico.sh/inject": "true"}), 2, true),
        ("never opted in", "never", json!({"app": "c"}), 0, false),
    ] {
        let before = calls(&webhook).await;
        let pod = crate::support::pod_json(name, labels, json!({}));
        let created = pods.create(&PostParams::default(), &pod).await.unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(calls(&webhook).await - before, sent, "{what}: admission requests the webhook answered");
        assert_eq!(label(&created, "touched").as_deref(), Some("yes"), "{what}: the later webhook ran");
        assert_eq!(sidecar_count(&created), usize::from(injected), "{what}");
    }
    for name in [format!("aa-opt-in-{suffix}"), format!("zz-touch-{suffix}")] {
        let _ = configs.delete(&name, &DeleteParams::default()).await;
    }
    earlier_task.abort();
    later_task.abort();
    webhook.unregister(&client).await;
}

/// The sidecar's admin port, from the pod the apiserver stored: (containerPort, the agent's
/// PICOTUN_ADMIN_ADDR). The probes name the port, so they follow it.
fn stored_admin_port(pod: &Pod) -> (i32, String) {
    let sidecar = sidecar_of(pod).unwrap_or_else(|| panic!("injected: {:?}", pod.spec));
    let port = sidecar.ports.iter().flatten().find(|p| p.name.as_deref() == Some("picotun-admin")).unwrap();
    for probe in [&sidecar.readiness_probe, &sidecar.liveness_probe, &sidecar.startup_probe].into_iter().flatten() {
        let get = probe.http_get.as_ref().unwrap();
        assert_eq!(get.port, k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("picotun-admin".into()));
    }
    let addr = sidecar.env.iter().flatten().find(|e| e.name == "PICOTUN_ADMIN_ADDR").and_then(|e| e.value.clone());
    (port.container_port, addr.unwrap_or_default())
}

/// Issue 14: the sidecar's admin port is 7426 (no mesh's) unless a pod's
/// `tunnels.pico.sh/admin-port` moves it; a bad value never keeps the pod out: it is created,
/// injected on the default, and the user who created it sees why in kubectl's warnings.
#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn a_pod_moves_the_sidecars_admin_port_with_an_annotation_and_a_bad_one_is_a_warning() {
    let (ground, client, ns, webhook) = injecting("admin-port").await;
    let pod = |name: &str, annotations: Value, app_port: u16| {
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns.name(), "labels": {"tunnels.pico.sh/inject": "true"},
                "annotations": annotations},
            "spec": {"containers": [{"name": "app", "image": "registry.example/app:1",
                "ports": [{"name": "http", "containerPort": app_port}]}]}})
    };

    let (plain, warnings) = kubectl_create(ground, &pod("plain", json!({}), 8080));
    assert_eq!(stored_admin_port(&plain), (7426, "0.0.0.0:7426".into()));
    assert!(!warnings.contains("admin port") && !warnings.contains("pico.sh/admin-port"), "{warnings}");

    let (moved, warnings) = kubectl_create(
        ground,
        &pod("moved", json!({"tunnels.pico.sh/admin-port": "7500", "tunnels.pico.sh/startup-gate": "true"}), 8080),
    );
    assert_eq!(stored_admin_port(&moved), (7500, "0.0.0.0:7500".into()));
    assert!(sidecar_of(&moved).unwrap().startup_probe.is_some());
    assert!(!warnings.contains("admin port") && !warnings.contains("pico.sh/admin-port"), "{warnings}");

    for (name, value, said) in [
        ("typo", "75OO", "tunnels.pico.sh/admin-port: \"75OO\" is not a port number (1-65535)"),
        ("zero", "0", "tunnels.pico.sh/admin-port: \"0\" is not a port number (1-65535)"),
        ("clash", "8080", "tunnels.pico.sh/admin-port: port 8080 is already used by container app"),
    ] {
        let (created, warnings) =
            kubectl_create(ground, &pod(name, json!({"tunnels.pico.sh/admin-port": value}), 8080));
        assert_eq!(stored_admin_port(&created).0, 7426, "{name}: the default");
        assert!(warnings.contains(&format!("Warning: picotun: {said}")), "{name}: {warnings}");
        assert!(warnings.contains("the sidecar's admin port is 7426"), "{name}: {warnings}");
    }
    // An app already on the default is told how to move the sidecar.
    let (created, warnings) = kubectl_create(ground, &pod("on-default", json!({}), 7426));
    assert_eq!(stored_admin_port(&created).0, 7426);
    assert!(
        warnings.contains("admin port 7426 is also used by container app")
            && warnings.contains("with the pod annotation tunnels.pico.sh/admin-port"),
        "{warnings}"
    );
    webhook.unregister(&client).await;
}
