//! deploy/ and examples/ against the test ground's apiserver: every manifest is accepted by
//! server-side apply, and the RBAC deploy/ grants is all the webhook and the controller need --
//! each runs here under a token of its own service account, not as admin, with the environment
//! its Deployment gives it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use picotun_testground::bins::{bin, repo_root};
use picotun_testground::kube_ground::StartOptions;
use picotun_testground::pki::Ca;
use picotun_testground::{ControlPlane, Existing, Proc, free_port, http, random_suffix, wait_for};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::OnceCell;

pub(crate) const SYSTEM_NAMESPACE: &str = "pico-sh-system";

/// `kubectl` of the ground's version, acting as the holder of `kubeconfig`.
pub(crate) fn kubectl(kubeconfig: &Path) -> Command {
    let mut cmd = Command::new(bin("kubectl").unwrap());
    cmd.arg("--kubeconfig").arg(kubeconfig);
    cmd
}

/// Runs `cmd` with `input` on its standard input: (success, stdout, stderr).
pub(crate) fn run(cmd: &mut Command, input: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    (out.status.success(), text(out.stdout), text(out.stderr))
}

/// `kubectl kustomize DIR`, one JSON value per document.
pub(crate) fn render(dir: &Path) -> Vec<Value> {
    let out = Command::new(bin("kubectl").unwrap()).arg("kustomize").arg(dir).output().unwrap();
    assert!(out.status.success(), "kubectl kustomize {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    serde_yaml::Deserializer::from_str(std::str::from_utf8(&out.stdout).unwrap())
        .map(|d| Value::deserialize(d).unwrap())
        .collect()
}

pub(crate) fn doc<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} in the rendered manifests"))
}

/// Server-side apply as the holder of `kubeconfig`. With `dry_run` the apiserver checks
/// everything -- schemas (CRDs included), defaults, admission -- and stores nothing. Returns what
/// kubectl printed, one line per object.
pub(crate) fn apply(kubeconfig: &Path, docs: &[Value], dry_run: bool) -> String {
    let mut cmd = kubectl(kubeconfig);
    cmd.args(["apply", "--server-side", "--force-conflicts", "--field-manager=picotun-deploy-test", "-f", "-"]);
    if dry_run {
        cmd.arg("--dry-run=server");
    }
    let list = json!({"apiVersion": "v1", "kind": "List", "items": docs});
    let (ok, out, err) = run(&mut cmd, &list.to_string());
    assert!(ok, "server-side apply refused:\n{err}\n{out}");
    out
}

/// The documents with every namespaced object moved into `namespace`.
fn into_namespace(docs: Vec<Value>, namespace: &str) -> Vec<Value> {
    docs.into_iter()
        .map(|mut d| {
            if d["metadata"].get("namespace").is_some() {
                d["metadata"]["namespace"] = namespace.into();
            }
            d
        })
        .collect()
}

pub(crate) fn env_value<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_array()
        .and_then(|env| env.iter().find(|e| e["name"] == name))
        .map(|e| &e["value"])
        .unwrap_or_else(|| panic!("no {name} in the environment of {}", container["name"]))
}

#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn every_manifest_is_accepted_by_server_side_apply() {
    let ground = ControlPlane::shared(Existing::Allowed).await.unwrap();
    let ns = ground.namespace("deploy-apply").await.unwrap();
    let root = repo_root();

    // deploy/: cert-manager issues the certificate and injects its CA.
    let with_cert_manager = render(&root.join("deploy"));
    let config = doc(&with_cert_manager, "MutatingWebhookConfiguration", "picotun-webhook");
    assert_eq!(config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"], "pico-sh-system/picotun-webhook");
    assert_eq!(doc(&with_cert_manager, "Certificate", "picotun-webhook")["spec"]["secretName"], "picotun-webhook-tls");
    let webhook =
        &doc(&with_cert_manager, "Deployment", "picotun-webhook")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(env_value(webhook, "PICOTUN_SIDECAR_IMAGE"), &webhook["image"], "sidecars run the webhook's own image");

    // deploy/without-cert-manager/, in a copy of deploy/ with certificates made where its
    // kustomization says (whatever a developer generated in the repository stays out of it).
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("deploy");
    assert!(Command::new("cp").arg("-r").arg(root.join("deploy")).arg(&copy).status().unwrap().success());
    let certs = copy.join("without-cert-manager/certs");
    let _ = std::fs::remove_dir_all(&certs);
    let out = Command::new(env!("CARGO_BIN_EXE_picotun")).arg("certs").arg("--out-dir").arg(&certs).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let without_cert_manager = render(&copy.join("without-cert-manager"));
    let config = doc(&without_cert_manager, "MutatingWebhookConfiguration", "picotun-webhook");
    let bundle: String =
        config["webhooks"][0]["clientConfig"]["caBundle"].as_str().unwrap().split_whitespace().collect();
    assert_eq!(
        base64::engine::general_purpose::STANDARD.decode(bundle).unwrap(),
        std::fs::read(certs.join("ca.crt")).unwrap(),
        "the caBundle is the generated CA"
    );
    let secret = doc(&without_cert_manager, "Secret", "picotun-webhook-tls");
    assert_eq!(secret["type"], "kubernetes.io/tls");
    let mut keys: Vec<&String> = secret["data"].as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["ca.crt", "tls.crt", "tls.key"], "the CA key stays on the user's machine");

    let example = |name: &str| {
        let docs = render(&root.join("examples").join(name));
        let namespace = docs.iter().find(|d| d["kind"] == "Namespace").expect("each example brings its namespace");
        assert_eq!(namespace["metadata"]["labels"]["tunnels.pico.sh/injection"], "enabled", "{name}");
        docs
    };
    let sets = [
        ("deploy/", with_cert_manager),
        ("deploy/without-cert-manager/", without_cert_manager),
        ("examples/ingress/", example("ingress")),
        ("examples/gateway-api/", example("gateway-api")),
        ("examples/annotations-only/", example("annotations-only")),
    ];
    // Dry runs, with the namespaced objects in this test's namespace: applied for real, the
    // cluster-wide ones (the webhook configuration, the classes) would meet other tests'
    // webhooks and controllers in the shared ground.
    for (what, docs) in sets {
        let docs = into_namespace(docs, ns.name());
        let out = apply(ground.kubeconfig(), &docs, true);
        let accepted = out.lines().filter(|l| l.ends_with("serverside-applied (server dry run)")).count();
        assert_eq!(accepted, docs.len(), "{what}: every object accepted:\n{out}");
    }
}

/// A control plane of the RBAC tests' own. They install deploy/'s objects under their real
/// names -- ClusterRoles, the classes, a controller that watches every namespace and writes the
/// tunnels of every pod it serves -- which must not meet the webhooks and controllers other tests
/// run in the shared ground.
static INSTALL_GROUND: OnceCell<Result<ControlPlane, String>> = OnceCell::const_new();

async fn install_ground() -> &'static ControlPlane {
    INSTALL_GROUND
        .get_or_init(|| async { ControlPlane::start(StartOptions::default()).await.map_err(|e| e.to_string()) })
        .await
        .as_ref()
        .unwrap_or_else(|e| panic!("the deploy tests' control plane did not start: {e}"))
}

/// The objects that make up `account`'s permissions in the rendered manifests: the
/// ServiceAccount, the bindings naming it and the roles they bind, except those in `leave_out`.
fn permissions_of(docs: &[Value], account: &str, leave_out: &[&str]) -> Vec<Value> {
    let is = |d: &Value, kinds: &[&str]| kinds.iter().any(|k| d["kind"] == *k);
    let bindings: Vec<&Value> = docs
        .iter()
        .filter(|d| is(d, &["ClusterRoleBinding", "RoleBinding"]))
        .filter(|d| d["subjects"].as_array().into_iter().flatten().any(|s| s["name"] == account))
        .collect();
    let roles = docs.iter().filter(|d| {
        is(d, &["ClusterRole", "Role"])
            && bindings
                .iter()
                .any(|b| b["roleRef"]["kind"] == d["kind"] && b["roleRef"]["name"] == d["metadata"]["name"])
    });
    std::iter::once(doc(docs, "ServiceAccount", account))
        .chain(roles)
        .chain(bindings.iter().copied())
        .filter(|d| !leave_out.iter().any(|n| d["metadata"]["name"] == *n))
        .cloned()
        .collect()
}

/// picotun's `account` installed in the RBAC tests' ground as deploy/base has it -- Namespace,
/// ServiceAccount, roles and bindings, less those named in `leave_out` -- together with the other
/// objects `also` names (kind, name), and a kubeconfig for that account.
struct Installed {
    ground: &'static ControlPlane,
    client: kube::Client,
    base: Vec<Value>,
    identity: PathBuf,
    dir: tempfile::TempDir,
}

async fn install(account: &str, also: &[(&str, &str)], leave_out: &[&str]) -> Installed {
    let ground = install_ground().await;
    let client = ground.client().await.unwrap();
    let base = render(&repo_root().join("deploy/base"));
    let mut objects = vec![doc(&base, "Namespace", SYSTEM_NAMESPACE).clone()];
    objects.extend(also.iter().map(|(kind, name)| doc(&base, kind, name).clone()));
    objects.extend(permissions_of(&base, account, leave_out));
    apply(ground.kubeconfig(), &objects, false);
    let dir = tempfile::tempdir().unwrap();
    let identity = kubeconfig_for(ground.kubeconfig(), account, dir.path());
    Installed { ground, client, base, identity, dir }
}

/// A kubeconfig that authenticates as service account `account` of picotun's namespace, with a
/// token from the TokenRequest API (`kubectl create token`).
pub(crate) fn kubeconfig_for(admin: &Path, account: &str, dir: &Path) -> PathBuf {
    let out =
        kubectl(admin).args(["create", "token", account, "-n", SYSTEM_NAMESPACE, "--duration=2h"]).output().unwrap();
    assert!(out.status.success(), "TokenRequest: {}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap();
    let out = kubectl(admin).args(["config", "view", "--raw", "--minify", "--flatten", "-o", "json"]).output().unwrap();
    let mut config: Value = serde_json::from_slice(&out.stdout).unwrap();
    config["users"][0]["user"] = json!({"token": token.trim()});
    let path = dir.join(format!("{account}.kubeconfig"));
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

/// `kubectl auth can-i ARGS`, asked by the holder of `kubeconfig`.
fn can_i(kubeconfig: &Path, args: &[&str]) -> bool {
    let out = kubectl(kubeconfig).args(["auth", "can-i"]).args(args).output().unwrap();
    match String::from_utf8_lossy(&out.stdout).trim() {
        "yes" => true,
        "no" => false,
        other => panic!("kubectl auth can-i {args:?}: {other:?} {}", String::from_utf8_lossy(&out.stderr)),
    }
}

/// The command line and environment deploy/ gives `deployment`'s container in a pod named
/// `pod`: its args, its env (values and downward-API fields) and its envFrom ConfigMaps.
pub(crate) fn command_of(docs: &[Value], deployment: &str, pod: &str) -> Command {
    let d = doc(docs, "Deployment", deployment);
    let namespace = d["metadata"]["namespace"].as_str().unwrap();
    let container = &d["spec"]["template"]["spec"]["containers"][0];
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_picotun"));
    cmd.args(container["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()));
    for from in container["envFrom"].as_array().into_iter().flatten() {
        let config = doc(docs, "ConfigMap", from["configMapRef"]["name"].as_str().unwrap());
        for (k, v) in config["data"].as_object().into_iter().flatten() {
            cmd.env(k, v.as_str().unwrap());
        }
    }
    for e in container["env"].as_array().into_iter().flatten() {
        let value = match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some("metadata.namespace") => namespace,
            Some("metadata.name") => pod,
            Some(other) => panic!("{deployment}: a downward-API field this test does not know: {other}"),
            None => e["value"].as_str().unwrap(),
        };
        cmd.env(e["name"].as_str().unwrap(), value);
    }
    cmd
}

/// Starts `cmd` and waits until `GET /ready` on `admin` answers 200.
pub(crate) async fn start_until_ready(name: &str, cmd: Command, admin: &str, log_dir: &Path) -> Proc {
    let mut proc = Proc::spawn(name, cmd, &log_dir.join(format!("{name}.log"))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http::get(admin, "admin", "/ready").await.is_ok_and(|r| r.status == 200) {
        assert!(Instant::now() < deadline && proc.is_running(), "{name} not ready: {}", proc.log_tail(30));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proc
}

/// Everything a process logged said nothing of a request the apiserver refused.
fn assert_never_forbidden(proc: &Proc) {
    let log = std::fs::read_to_string(proc.log_path()).unwrap();
    let refused: Vec<&str> = log.lines().filter(|l| l.to_lowercase().contains("forbidden")).collect();
    assert!(refused.is_empty(), "{} was refused by RBAC:\n{}", proc.name(), refused.join("\n"));
}

async fn labeled_namespace(
    ground: &ControlPlane,
    client: &kube::Client,
    prefix: &str,
) -> picotun_testground::TestNamespace {
    let ns = ground.namespace(prefix).await.unwrap();
    let patch = json!({"metadata": {"labels": {"tunnels.pico.sh/injection": "enabled"}}});
    Api::<Namespace>::all(client.clone())
        .patch(ns.name(), &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    ns
}

pub(crate) fn sidecar(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::Container> {
    let spec = pod.spec.as_ref()?;
    spec.init_containers.iter().flatten().chain(&spec.containers).find(|c| c.name == "picotun-agent")
}

fn sidecar_env<'a>(pod: &'a Pod, name: &str) -> Option<&'a str> {
    sidecar(pod)?.env.iter().flatten().find(|e| e.name == name)?.value.as_deref()
}

#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn the_webhook_works_with_the_rbac_deploy_grants_it() {
    let Installed { ground, client, base, identity, dir } = install("picotun-webhook", &[], &[]).await;
    let admin = ground.kubeconfig();
    let apps = labeled_namespace(ground, &client, "deploy-webhook").await;
    let apps_ns = apps.name();

    // What it may not do.
    let account = format!("--as=system:serviceaccount:{SYSTEM_NAMESPACE}:picotun-webhook");
    assert!(!can_i(admin, &["delete", "pods", "-A", &account]));
    assert!(!can_i(&identity, &["delete", "pods", "-A"]));
    assert!(!can_i(&identity, &["list", "secrets", "-A"]));
    assert!(!can_i(&identity, &["get", "secrets/another", "-n", apps_ns]));
    assert!(can_i(&identity, &["get", "secrets/picotun-ssh-key", "-n", apps_ns]), "the key Secret's existence");
    let (ok, _, err) = run(kubectl(&identity).args(["get", "secrets", "-n", apps_ns]), "");
    assert!(!ok && err.contains("forbidden"), "{err}");

    // The webhook as deploy/ runs it -- its args, its environment, picotun-config -- with what a
    // pod gets from its volumes and ports given as files and loopback addresses here.
    let ca = Ca::new("deploy-test-webhook-ca").unwrap();
    let (cert_file, key_file) = ca.issue_loopback_server(&[]).unwrap().write(dir.path(), "tls").unwrap();
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    let port = free_port();
    let admin_addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = command_of(&base, "picotun-webhook", "picotun-webhook-test");
    cmd.env("PICOTUN_WEBHOOK_LISTEN", format!("127.0.0.1:{port}"))
        .env("PICOTUN_ADMIN_ADDR", &admin_addr)
        .env("PICOTUN_WEBHOOK_CERT_FILE", &cert_file)
        .env("PICOTUN_WEBHOOK_KEY_FILE", &key_file)
        .env("PICOTUN_AGENT_REPORT_CA_FILE", &ca_file)
        .env("KUBECONFIG", &identity);
    let webhook = start_until_ready("picotun-webhook", cmd, &admin_addr, dir.path()).await;

    // deploy/'s webhook configuration, pointed at it and narrowed to this test's namespace.
    let mut config = doc(&base, "MutatingWebhookConfiguration", "picotun-webhook").clone();
    let config_name = format!("picotun-webhook-deploy-test-{}", random_suffix());
    config["metadata"] = json!({"name": config_name});
    let hook = &mut config["webhooks"][0];
    hook["clientConfig"] = json!({
        "url": format!("https://127.0.0.1:{port}/mutate"),
        "caBundle": base64::engine::general_purpose::STANDARD.encode(ca.cert_pem()),
    });
    hook["namespaceSelector"]["matchExpressions"].as_array_mut().unwrap().push(json!(
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": [apps_ns]}
    ));
    apply(admin, &[config], false);

    // Opted-in pods until the apiserver has picked the configuration up (failurePolicy Ignore:
    // until then they are created plain).
    let pods: Api<Pod> = Api::namespaced(client.clone(), apps_ns);
    let mut n = 0;
    let injected = wait_for("the webhook to inject", Duration::from_secs(30), Duration::from_millis(250), || {
        n += 1;
        let (pods, name) = (pods.clone(), format!("probe-{n}"));
        async move {
            let probe: Pod = serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {"tunnels.pico.sh/inject": "true"}},
                "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]},
            }))
            .unwrap();
            let created = pods.create(&PostParams::default(), &probe).await.map_err(|e| e.to_string())?;
            Ok(sidecar(&created).is_some().then_some(created))
        }
    })
    .await
    .unwrap();
    // The sidecar is configured from deploy/: the webhook's image, picotun-config, the report URL.
    let container = &doc(&base, "Deployment", "picotun-webhook")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(sidecar(&injected).unwrap().image.as_deref(), container["image"].as_str());
    let config_map = &doc(&base, "ConfigMap", "picotun-config")["data"];
    for key in ["PICOTUN_SERVER", "PICOTUN_SERVER_PORT", "PICOTUN_USER", "PICOTUN_DIALECT"] {
        assert_eq!(sidecar_env(&injected, key), config_map[key].as_str(), "{key}");
    }
    assert_eq!(sidecar_env(&injected, "PICOTUN_REPORT_URL"), env_value(container, "PICOTUN_AGENT_REPORT_URL").as_str());

    // Opted in on the Deployment only: seen through the owner lookup (ReplicaSet -> Deployment).
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "owned", "annotations": {"tunnels.pico.sh/inject": "true"}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "owned"}},
            "template": {
                "metadata": {"labels": {"app": "owned"}},
                "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]},
            },
        },
    }))
    .unwrap();
    Api::<Deployment>::namespaced(client.clone(), apps_ns).create(&PostParams::default(), &deployment).await.unwrap();
    let owned = crate::support::running_pods(&pods, "app=owned", 1).await;
    assert!(sidecar(&owned[0]).is_some(), "the opt-in on the Deployment was read");

    // The key-Secret check: the warning needs the Secret's existence, which the webhook may read.
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "warned", "namespace": apps_ns, "labels": {"tunnels.pico.sh/inject": "true"}},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]},
    });
    let (ok, _, err) = run(kubectl(admin).args(["create", "-f", "-"]), &pod.to_string());
    assert!(ok && err.contains("Secret picotun-ssh-key (the tunnel SSH key) does not exist"), "{err}");

    assert_never_forbidden(&webhook);
    let _ =
        Api::<MutatingWebhookConfiguration>::all(client.clone()).delete(&config_name, &DeleteParams::default()).await;
}

#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn the_controller_works_with_the_rbac_deploy_grants_it() {
    // Without the Secrets role: only --sync-key-secret needs it, and users may delete it.
    let classes = [("IngressClass", "pico-tunnel"), ("GatewayClass", "pico-tunnel")];
    let Installed { ground, client, base, identity, dir } =
        install("picotun-controller", &classes, &["picotun-controller-sync-key-secret"]).await;
    let admin = ground.kubeconfig();

    // What it may not do.
    assert!(!can_i(&identity, &["get", "secrets", "-A"]));
    assert!(!can_i(&identity, &["delete", "pods", "-A"]));
    assert!(!can_i(&identity, &["update", "ingresses", "-A"]), "status only");
    assert!(can_i(&identity, &["patch", "ingresses", "--subresource=status", "-A"]));
    assert!(can_i(&identity, &["update", "leases", "-n", SYSTEM_NAMESPACE]));
    assert!(!can_i(&identity, &["update", "leases", "-n", "default"]), "Leases in its own namespace only");

    let pod_name = "picotun-controller-test";
    let admin_addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = command_of(&base, "picotun-controller", pod_name);
    cmd.env("PICOTUN_ADMIN_ADDR", &admin_addr).env("KUBECONFIG", &identity);
    let controller = start_until_ready("picotun-controller", cmd, &admin_addr, dir.path()).await;

    // The Ingress walkthrough on one pod that already carries the sidecar (as the webhook
    // would have injected it).
    let apps = labeled_namespace(ground, &client, "deploy-controller").await;
    let apps_ns = apps.name();
    let objects: Vec<Value> = vec![
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": apps_ns},
               "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}),
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "web", "namespace": apps_ns},
               "spec": {"ingressClassName": "pico-tunnel", "rules": [{"host": "demo", "http": {"paths": [{"path": "/", "pathType": "Prefix",
                   "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}]}}),
    ];
    apply(admin, &objects, false);
    let plain: Pod = serde_json::from_value(json!({
        "metadata": {"name": "web-0", "labels": {"app": "web", "tunnels.pico.sh/inject": "true"}},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1", "ports": [{"name": "http", "containerPort": 8080}]}]},
    }))
    .unwrap();
    let injected =
        picotun::webhook::inject::mutate(&plain, apps_ns, None, &[], false, &Default::default()).pod.expect("opted in");
    let pods: Api<Pod> = Api::namespaced(client.clone(), apps_ns);
    pods.create(&PostParams::default(), &injected).await.unwrap();

    // The controller tells the pod's sidecar which tunnel to open (it may patch pods)...
    let tunnel = wait_for("the pod's tunnels", Duration::from_secs(60), Duration::from_millis(250), || async {
        let pod = pods.get("web-0").await.map_err(|e| e.to_string())?;
        let file = pod.metadata.annotations.unwrap_or_default().remove("tunnels.pico.sh/tunnels").unwrap_or_default();
        let tunnels = picotun::tunnel::TunnelsFile::parse(&file).map_err(|e| e.to_string())?;
        Ok(tunnels.tunnels.into_iter().find(|t| t.host.as_deref() == Some("demo")).map(|t| t.name))
    })
    .await
    .unwrap();
    // ...the sidecar reports the address it reached (the webhook's /report writes this)...
    let report = json!({"tunnels": {tunnel: {"state": "established", "publicAddress": "https://alice-demo.tuns.sh"}}});
    let patch = json!({"metadata": {"annotations": {"tunnels.pico.sh/addresses": report.to_string()}}});
    pods.patch("web-0", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    // ...and the controller writes it into the Ingress status (it may update ingresses/status).
    let ingresses: Api<Ingress> = Api::namespaced(client.clone(), apps_ns);
    wait_for("the Ingress status", Duration::from_secs(60), Duration::from_millis(250), || async {
        let ingress = ingresses.get("web").await.map_err(|e| e.to_string())?;
        let status = serde_json::to_value(ingress.status).unwrap();
        Ok((status["loadBalancer"]["ingress"][0]["hostname"] == "alice-demo.tuns.sh").then_some(()))
    })
    .await
    .unwrap();

    // It leads through its Lease, and claims its GatewayClass (gatewayclasses/status).
    let lease = Api::<Lease>::namespaced(client.clone(), SYSTEM_NAMESPACE).get("picotun-controller").await.unwrap();
    assert_eq!(lease.spec.unwrap().holder_identity.as_deref(), Some(pod_name));
    wait_for("GatewayClass pico-tunnel Accepted", Duration::from_secs(30), Duration::from_millis(250), || async {
        let out = kubectl(admin).args(["get", "gatewayclass", "pico-tunnel", "-o", "json"]).output().unwrap();
        let class: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        let accepted = class["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Accepted" && c["status"] == "True");
        Ok(accepted.then_some(()))
    })
    .await
    .unwrap();

    assert_never_forbidden(&controller);
}
