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
use serde_json::{Value, json};
use tokio::sync::OnceCell;

use crate::support::shipped_webhook::shipped_match_conditions;

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
    yaml_documents(std::str::from_utf8(&out.stdout).unwrap())
}

/// A multi-document YAML stream, one JSON value per document (empty documents left out).
pub(crate) fn yaml_documents(text: &str) -> Vec<Value> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text).unwrap();
    docs.into_iter().filter(|d| !d.is_null()).collect()
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
pub(crate) fn into_namespace(docs: Vec<Value>, namespace: &str) -> Vec<Value> {
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
    // Each opt-in mode as users would install it: deploy/ plus its components.
    for mode in [Mode::KeySecret, Mode::SyncKey, Mode::Restart, Mode::RouteBackends] {
        let docs = render_mode("deploy", mode);
        let env = |deployment: &str, container: &str, name: &str| {
            let d = doc(&docs, "Deployment", deployment);
            let c = &d["spec"]["template"]["spec"]["containers"][0];
            assert_eq!(c["name"], container);
            env_value(c, name).clone()
        };
        let (auth, sync, restart) = match mode {
            Mode::KeySecret => ("key", "false", "false"),
            Mode::SyncKey => ("key", "true", "false"),
            Mode::Restart => ("certificate", "false", "true"),
            _ => ("certificate", "false", "false"),
        };
        assert_eq!(env("picotun-webhook", "webhook", "PICOTUN_SIDECAR_AUTH"), auth, "{mode:?}");
        assert_eq!(env("picotun-controller", "controller", "PICOTUN_SYNC_KEY_SECRET"), sync, "{mode:?}");
        assert_eq!(env("picotun-controller", "controller", "PICOTUN_RESTART_UNINJECTED"), restart, "{mode:?}");
        // Route-backed mode: both know, and the apiserver sends every pod again (only the
        // webhook can tell which pods a route selects).
        let route_backends = if mode == Mode::RouteBackends { "true" } else { "false" };
        assert_eq!(env("picotun-controller", "controller", "PICOTUN_INJECT_ROUTE_BACKENDS"), route_backends);
        if mode == Mode::RouteBackends {
            assert_eq!(env("picotun-webhook", "webhook", "PICOTUN_INJECT_ROUTE_BACKENDS"), "true");
        }
        let conditions =
            &doc(&docs, "MutatingWebhookConfiguration", "picotun-webhook")["webhooks"][0]["matchConditions"];
        assert_eq!(conditions, &shipped_match_conditions(mode == Mode::RouteBackends), "{mode:?}");
    }
    // The conditions the tests register (read from deploy/ by support.rs) are what kustomize
    // renders; each has a name, and route-backed mode keeps all but the opt-in one.
    let hook = &doc(&with_cert_manager, "MutatingWebhookConfiguration", "picotun-webhook")["webhooks"][0];
    assert_eq!(hook["matchConditions"], shipped_match_conditions(false));
    let names =
        |c: &Value| c.as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    assert_eq!(names(&hook["matchConditions"]), ["not-host-network", "not-opted-out-by-annotation", "may-opt-in"]);
    assert_eq!(names(&shipped_match_conditions(true)), ["not-host-network", "not-opted-out-by-annotation"]);
    // The default install: certificate mode, the CA mounted (optional), no Secret rule outside
    // picotun's namespace, the NetworkPolicy and the admission policies.
    let webhook_pod = &doc(&with_cert_manager, "Deployment", "picotun-webhook")["spec"]["template"]["spec"];
    assert_eq!(env_value(&webhook_pod["containers"][0], "PICOTUN_SIDECAR_AUTH"), "certificate");
    let ca = webhook_pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "ssh-ca").unwrap();
    assert_eq!((&ca["secret"]["secretName"], &ca["secret"]["optional"]), (&json!("picotun-ssh-ca"), &json!(true)));
    for d in with_cert_manager.iter().filter(|d| d["kind"] == "ClusterRole") {
        let secrets = d["rules"].as_array().unwrap().iter().any(|r| r["resources"].to_string().contains("secrets"));
        assert!(!secrets, "ClusterRole {} grants something on Secrets in the default install", d["metadata"]["name"]);
    }
    network_policy_shape(&with_cert_manager);
    doc(&with_cert_manager, "ValidatingAdmissionPolicy", "picotun-pod-writes");
    let sets = [
        ("deploy/", with_cert_manager),
        ("deploy/without-cert-manager/", without_cert_manager),
        ("deploy/ + components/key-secret", render_mode("deploy", Mode::KeySecret)),
        ("deploy/ + components/key-secret + sync-key-secret", render_mode("deploy", Mode::SyncKey)),
        ("deploy/ + components/restart-uninjected", render_mode("deploy", Mode::Restart)),
        ("deploy/ + components/inject-route-backends", render_mode("deploy", Mode::RouteBackends)),
        ("deploy/ + components/openshift", render_mode("deploy", Mode::OpenShift)),
        ("examples/ingress/", example("ingress")),
        ("examples/gateway-api/", example("gateway-api")),
        ("examples/annotations-only/", example("annotations-only")),
    ];
    // Dry runs, with the namespaced objects in this test's namespace: applied for real, the
    // cluster-wide ones (the webhook configuration, the classes, the admission policies) would
    // meet other tests' webhooks and controllers in the shared ground. The NetworkPolicy is
    // proven this way only: the ground's bridge CNI does not enforce NetworkPolicy.
    for (what, docs) in sets {
        let docs = into_namespace(docs, ns.name());
        let out = apply(ground.kubeconfig(), &docs, true);
        let accepted = out.lines().filter(|l| l.ends_with("serverside-applied (server dry run)")).count();
        assert_eq!(accepted, docs.len(), "{what}: every object accepted:\n{out}");
    }
}

/// The webhook's NetworkPolicy, port by port, against the ports the install and the binary use:
/// the admission port (/mutate) from anywhere, the sidecars' port (/report, /certificate) only
/// from namespaces the webhook configuration selects, the admin port from anywhere, and no
/// address range to guess (a pod CIDR placeholder would fail open when wrong). Its enforcement is
/// not tested: the ground's bridge CNI does not enforce NetworkPolicy (the dry run in
/// [every_manifest_is_accepted_by_server_side_apply] proves the apiserver accepts it).
fn network_policy_shape(docs: &[Value]) {
    let policy = &doc(docs, "NetworkPolicy", "picotun-webhook")["spec"];
    assert_eq!(policy["policyTypes"], json!(["Ingress"]));
    let webhook = &doc(docs, "Deployment", "picotun-webhook")["spec"]["template"]["metadata"]["labels"];
    for (k, v) in policy["podSelector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&webhook[k], v, "the policy selects the webhook's pods");
    }
    assert!(!policy.to_string().contains("ipBlock"), "no address range: {policy}");
    let rules = policy["ingress"].as_array().unwrap();
    let rule_for = |port: &str| -> &Value {
        let mut found = rules.iter().filter(|r| r["ports"].as_array().unwrap().iter().any(|p| p["port"] == port));
        let rule = found.next().unwrap_or_else(|| panic!("no rule for port {port}: {policy}"));
        assert!(found.next().is_none(), "one rule for port {port}");
        assert_eq!(rule["ports"], json!([{"protocol": "TCP", "port": port}]), "that port alone");
        rule
    };
    assert!(rule_for("https").get("from").is_none(), "/mutate from anywhere (the apiserver): {policy}");
    assert!(rule_for("admin").get("from").is_none(), "probes and metrics from anywhere: {policy}");
    let hook = &doc(docs, "MutatingWebhookConfiguration", "picotun-webhook")["webhooks"][0];
    assert_eq!(
        rule_for("agent")["from"],
        json!([{"namespaceSelector": {"matchLabels": hook["namespaceSelector"]["matchLabels"]}}]),
        "the sidecars' port only from the namespaces the webhook injects"
    );
    assert_eq!(rules.len(), 3, "{policy}");

    // The named ports are the binary's: --listen 8443, --agent-listen 8444 (its default), and the
    // sidecars are sent to the Service's agent port, the apiserver to its https port.
    let container = &doc(docs, "Deployment", "picotun-webhook")["spec"]["template"]["spec"]["containers"][0];
    let container_port = |name: &str| {
        let ports = container["ports"].as_array().unwrap();
        ports.iter().find(|p| p["name"] == name).unwrap_or_else(|| panic!("no port {name}"))["containerPort"].clone()
    };
    assert_eq!((container_port("https"), container_port("agent")), (json!(8443), json!(8444)));
    let help = Command::new(env!("CARGO_BIN_EXE_picotun")).args(["webhook", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for default in ["[default: 0.0.0.0:8443]", "[default: 0.0.0.0:8444]"] {
        assert!(help.contains(default), "picotun webhook --help has no {default}");
    }
    let service = &doc(docs, "Service", "picotun-webhook")["spec"]["ports"];
    let service_port = |name: &str| {
        let port = service.as_array().unwrap().iter().find(|p| p["name"] == name).unwrap_or_else(|| panic!("{name}"));
        assert_eq!(port["targetPort"], name, "Service port {name} -> the container's port {name}");
        port["port"].as_u64().unwrap()
    };
    assert_eq!(hook["clientConfig"]["service"]["port"].as_u64(), Some(service_port("https")));
    assert_eq!(hook["clientConfig"]["service"]["path"], "/mutate");
    assert_eq!(
        env_value(container, "PICOTUN_AGENT_REPORT_URL").as_str(),
        Some(format!("https://picotun-webhook.pico-sh-system.svc:{}/report", service_port("agent")).as_str())
    );
}

/// The install modes: the default (certificate mode) and the opt-in components.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Default,
    KeySecret,
    /// sync-key needs key mode: both components.
    SyncKey,
    Restart,
    /// Route-backed injection (no grants of its own: not in `Every`).
    RouteBackends,
    /// Every component at once: the union of what any mode grants.
    Every,
    /// OpenShift (no fixed fsGroup; no grants of its own: not in `Every`).
    OpenShift,
}

impl Mode {
    fn components(self) -> &'static [&'static str] {
        match self {
            Mode::Default => &[],
            Mode::KeySecret => &["key-secret"],
            Mode::SyncKey => &["key-secret", "sync-key-secret"],
            Mode::Restart => &["restart-uninjected"],
            Mode::RouteBackends => &["inject-route-backends"],
            Mode::Every => &["key-secret", "sync-key-secret", "restart-uninjected"],
            Mode::OpenShift => &["openshift"],
        }
    }
}

/// `deploy/<under>` with `mode`'s components, rendered as a user's kustomization of its own
/// would (kustomize wants relative paths: the overlay sits beside a copy of deploy/).
pub(crate) fn render_mode(under: &str, mode: Mode) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("deploy");
    assert!(Command::new("cp").arg("-r").arg(repo_root().join("deploy")).arg(&copy).status().unwrap().success());
    let overlay = dir.path().join("overlay");
    std::fs::create_dir(&overlay).unwrap();
    let base = format!("../{under}");
    let components: Vec<String> = mode.components().iter().map(|c| format!("../deploy/components/{c}")).collect();
    let kustomization = json!({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [base], "components": components,
    });
    std::fs::write(overlay.join("kustomization.yaml"), kustomization.to_string()).unwrap();
    render(&overlay)
}

/// A control plane of the RBAC tests' own. They install deploy/'s objects under their real
/// names -- ClusterRoles, admission policies, the classes, a controller that watches every
/// namespace and writes the tunnels of every pod it serves -- which must not meet the webhooks
/// and controllers other tests run in the shared ground.
static INSTALL_GROUND: OnceCell<Result<ControlPlane, String>> = OnceCell::const_new();

/// One mode at a time in that ground: the identities are the real service accounts, so a test
/// of the default install must not see the grants another test's mode installed meanwhile.
static INSTALL_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn install_ground() -> &'static ControlPlane {
    INSTALL_GROUND
        .get_or_init(|| async { ControlPlane::start(StartOptions::default()).await.map_err(|e| e.to_string()) })
        .await
        .as_ref()
        .unwrap_or_else(|e| panic!("the deploy tests' control plane did not start: {e}"))
}

/// The objects that make up `account`'s permissions in the rendered manifests: the
/// ServiceAccount, the bindings naming it and the roles they bind.
fn permissions_of(docs: &[Value], account: &str) -> Vec<Value> {
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
        .cloned()
        .collect()
}

/// The admission policies and their bindings in the rendered manifests.
fn policies_of(docs: &[Value]) -> Vec<Value> {
    docs.iter()
        .filter(|d| d["kind"] == "ValidatingAdmissionPolicy" || d["kind"] == "ValidatingAdmissionPolicyBinding")
        .cloned()
        .collect()
}

fn same_object(a: &Value, b: &Value) -> bool {
    a["kind"] == b["kind"] && a["metadata"]["name"] == b["metadata"]["name"]
}

/// picotun installed in the RBAC tests' ground in `mode` -- Namespace, both service accounts with
/// their roles and bindings, the admission policies -- together with the objects `also` names
/// (kind, name), and a kubeconfig for `account`. What other modes grant is removed first.
struct Installed {
    ground: &'static ControlPlane,
    client: kube::Client,
    docs: Vec<Value>,
    identity: PathBuf,
    dir: tempfile::TempDir,
    _one_mode: tokio::sync::MutexGuard<'static, ()>,
}

async fn install(account: &str, also: &[(&str, &str)], mode: Mode) -> Installed {
    let one_mode = INSTALL_LOCK.lock().await;
    let ground = install_ground().await;
    let client = ground.client().await.unwrap();
    let docs = render_mode("deploy/base", mode);
    let mut objects = vec![doc(&docs, "Namespace", SYSTEM_NAMESPACE).clone()];
    objects.extend(also.iter().map(|(kind, name)| doc(&docs, kind, name).clone()));
    for a in ["picotun-controller", "picotun-webhook"] {
        objects.extend(permissions_of(&docs, a));
    }
    objects.extend(policies_of(&docs));
    let every = render_mode("deploy/base", Mode::Every);
    let mut others: Vec<Value> = permissions_of(&every, "picotun-controller");
    others.extend(permissions_of(&every, "picotun-webhook"));
    others.extend(policies_of(&every));
    for extra in others.iter().filter(|o| !objects.iter().any(|d| same_object(d, o))) {
        let name = extra["metadata"]["name"].as_str().unwrap();
        let kind = extra["kind"].as_str().unwrap();
        let mut cmd = kubectl(ground.kubeconfig());
        cmd.args(["delete", "--ignore-not-found", "--wait", kind, name]);
        if let Some(ns) = extra["metadata"]["namespace"].as_str() {
            cmd.args(["-n", ns]);
        }
        let (ok, _, err) = run(&mut cmd, "");
        assert!(ok, "deleting {kind}/{name}: {err}");
    }
    apply(ground.kubeconfig(), &objects, false);
    let dir = tempfile::tempdir().unwrap();
    let identity = kubeconfig_for(ground.kubeconfig(), account, dir.path());
    Installed { ground, client, docs, identity, dir, _one_mode: one_mode }
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

/// `kubectl auth can-i ARGS` answers `want`, once the apiserver's RBAC cache has the roles the
/// test just applied or removed (it follows them by watch). A grant that should be absent but is
/// there is never "no": the wait then fails.
async fn assert_can_i(kubeconfig: &Path, args: &[&str], want: bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while can_i(kubeconfig, args) != want {
        assert!(
            Instant::now() < deadline,
            "kubectl auth can-i {}: wanted {}",
            args.join(" "),
            if want { "yes" } else { "no" }
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
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
        let from_config = &e["valueFrom"]["configMapKeyRef"];
        let value = match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some("metadata.namespace") => namespace,
            Some("metadata.name") => pod,
            Some(other) => panic!("{deployment}: a downward-API field this test does not know: {other}"),
            None if from_config.is_object() => {
                let config = doc(docs, "ConfigMap", from_config["name"].as_str().unwrap());
                match config["data"][from_config["key"].as_str().unwrap()].as_str() {
                    Some(v) => v,
                    None if from_config["optional"] == true => continue,
                    None => panic!("{deployment}: {from_config} is not in the ConfigMap"),
                }
            }
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

/// `kubectl ARGS` as the holder of `kubeconfig`: (success, stdout and stderr).
fn kubectl_as(kubeconfig: &Path, args: &[&str]) -> (bool, String) {
    let (ok, out, err) = run(kubectl(kubeconfig).args(args), "");
    (ok, format!("{out}{err}"))
}

/// `kubectl ARGS` as `kubeconfig` is refused by an admission policy with `message`.
fn assert_policy_denies(kubeconfig: &Path, args: &[&str], policy: &str, message: &str) {
    let (ok, out) = kubectl_as(kubeconfig, args);
    assert!(!ok, "kubectl {}: allowed, should be denied by {policy}", args.join(" "));
    assert!(
        out.contains(&format!("ValidatingAdmissionPolicy '{policy}'")) && out.contains(message),
        "kubectl {}: {out}",
        args.join(" ")
    );
}

/// Waits until admission policy `policy` refuses the dry run `args` as `kubeconfig`: policies
/// take effect once the apiserver's admission plugin has loaded them (it follows them by watch).
async fn wait_policy_active(kubeconfig: &Path, args: &[&str], policy: &str) {
    let mut args = args.to_vec();
    args.push("--dry-run=server");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, out) = kubectl_as(kubeconfig, &args);
        if !ok && out.contains(&format!("ValidatingAdmissionPolicy '{policy}'")) {
            return;
        }
        assert!(Instant::now() < deadline, "{policy} never refused kubectl {}: {out}", args.join(" "));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The webhook as the rendered install runs it -- its args, its environment, picotun-config --
/// with what a pod gets from its volumes and ports given as files and loopback addresses here,
/// under `inst`'s identity, registered for `apps_ns` only. Returns it, the webhook
/// configuration's name, and a pod it injected.
async fn run_webhook(inst: &Installed, apps_ns: &str) -> (Proc, String, Pod) {
    let Installed { ground, client, docs, identity, dir, .. } = inst;
    let ca = Ca::new("deploy-test-webhook-ca").unwrap();
    let (cert_file, key_file) = ca.issue_loopback_server(&[]).unwrap().write(dir.path(), "tls").unwrap();
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    let port = free_port();
    let admin_addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = command_of(docs, "picotun-webhook", "picotun-webhook-test");
    cmd.env("PICOTUN_WEBHOOK_LISTEN", format!("127.0.0.1:{port}"))
        .env("PICOTUN_WEBHOOK_AGENT_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("PICOTUN_ADMIN_ADDR", &admin_addr)
        .env("PICOTUN_WEBHOOK_CERT_FILE", &cert_file)
        .env("PICOTUN_WEBHOOK_KEY_FILE", &key_file)
        .env("PICOTUN_AGENT_REPORT_CA_FILE", &ca_file)
        .env("KUBECONFIG", identity);
    let webhook = start_until_ready("picotun-webhook", cmd, &admin_addr, dir.path()).await;

    // The install's webhook configuration, pointed at it and narrowed to this test's namespace.
    let mut config = doc(docs, "MutatingWebhookConfiguration", "picotun-webhook").clone();
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
    apply(ground.kubeconfig(), &[config], false);

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
    // The sidecar is configured from the install: the webhook's image, picotun-config, the report URL.
    let container = &doc(docs, "Deployment", "picotun-webhook")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(sidecar(&injected).unwrap().image.as_deref(), container["image"].as_str());
    let config_map = &doc(docs, "ConfigMap", "picotun-config")["data"];
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

    // Opted in on a CronJob only: Job -> CronJob, both read under this identity.
    let job_pod = crate::support::cronjob_pod(client, apps_ns).await;
    assert!(sidecar(&job_pod).is_some(), "the opt-in on the CronJob was read");
    (webhook, config_name, injected)
}

#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn the_webhook_works_with_the_rbac_deploy_grants_it() {
    let inst = install("picotun-webhook", &[], Mode::Default).await;
    let (ground, client, identity) = (inst.ground, &inst.client, &inst.identity);
    let admin = ground.kubeconfig();
    let apps = labeled_namespace(ground, client, "deploy-webhook").await;
    let apps_ns = apps.name();

    // What it may not do. No Secret of a tenant, the key Secret least of all: certificate mode.
    let account = format!("--as=system:serviceaccount:{SYSTEM_NAMESPACE}:picotun-webhook");
    assert!(!can_i(admin, &["delete", "pods", "-A", &account]));
    assert_can_i(identity, &["delete", "pods", "-A"], false).await;
    assert_can_i(identity, &["list", "secrets", "-A"], false).await;
    assert_can_i(identity, &["get", "secrets", "-n", apps_ns], false).await;
    assert_can_i(identity, &["list", "secrets", "-n", apps_ns], false).await;
    assert_can_i(identity, &["get", "secrets/picotun-ssh-key", "-n", apps_ns], false).await;
    assert_can_i(identity, &["get", "secrets/picotun-ssh-key", "-A"], false).await;
    assert_can_i(identity, &["get", "secrets/picotun-ssh-key", "-n", SYSTEM_NAMESPACE], false).await;
    assert_can_i(identity, &["create", "secrets", "-n", apps_ns], false).await;
    // The CA reaches it as a volume the kubelet mounts, never through the API.
    assert_can_i(identity, &["get", "secrets/picotun-ssh-ca", "-n", SYSTEM_NAMESPACE], false).await;
    // Its ticket key, by name, in its own namespace (create cannot be narrowed by name: the
    // admission policy does that, see the policy test).
    assert_can_i(identity, &["get", "secrets/picotun-webhook-ticket", "-n", SYSTEM_NAMESPACE], true).await;
    assert_can_i(identity, &["create", "secrets", "-n", SYSTEM_NAMESPACE], true).await;
    assert_can_i(identity, &["list", "pods", "-A"], true).await;
    let (ok, err) = kubectl_as(identity, &["get", "secrets", "-n", apps_ns]);
    assert!(!ok && err.contains("forbidden"), "{err}");

    let (webhook, config_name, _) = run_webhook(&inst, apps_ns).await;
    assert_never_forbidden(&webhook);
    let _ =
        Api::<MutatingWebhookConfiguration>::all(client.clone()).delete(&config_name, &DeleteParams::default()).await;
}

#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn the_webhook_in_key_mode_works_with_what_its_component_grants() {
    let inst = install("picotun-webhook", &[], Mode::KeySecret).await;
    let (ground, client, identity) = (inst.ground, &inst.client, &inst.identity);
    let apps = labeled_namespace(ground, client, "deploy-webhook-key").await;
    let apps_ns = apps.name();
    let container = &doc(&inst.docs, "Deployment", "picotun-webhook")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(env_value(container, "PICOTUN_SIDECAR_AUTH"), "key");

    // The key Secret's existence, by name; nothing else.
    assert_can_i(identity, &["get", "secrets/picotun-ssh-key", "-n", apps_ns], true).await;
    assert_can_i(identity, &["get", "secrets/another", "-n", apps_ns], false).await;
    assert_can_i(identity, &["list", "secrets", "-A"], false).await;
    assert_can_i(identity, &["get", "secrets", "-n", apps_ns], false).await;

    let (webhook, config_name, _) = run_webhook(&inst, apps_ns).await;
    // The key-Secret check: the warning needs the Secret's existence, which the webhook may read.
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "warned", "namespace": apps_ns, "labels": {"tunnels.pico.sh/inject": "true"}},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]},
    });
    let (ok, _, err) = run(kubectl(ground.kubeconfig()).args(["create", "-f", "-"]), &pod.to_string());
    assert!(ok && err.contains("Secret picotun-ssh-key (the tunnel SSH key) does not exist"), "{err}");
    assert_never_forbidden(&webhook);
    let _ =
        Api::<MutatingWebhookConfiguration>::all(client.clone()).delete(&config_name, &DeleteParams::default()).await;
}

/// The controller as the rendered install runs it, under `inst`'s identity, ready.
async fn run_controller(inst: &Installed, pod_name: &str) -> Proc {
    let admin_addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = command_of(&inst.docs, "picotun-controller", pod_name);
    cmd.env("PICOTUN_ADMIN_ADDR", &admin_addr).env("KUBECONFIG", &inst.identity);
    start_until_ready("picotun-controller", cmd, &admin_addr, inst.dir.path()).await
}

/// An Ingress of class pico-tunnel for `host` in front of the pods labeled app=web.
fn web_ingress(namespace: &str, host: &str) -> Vec<Value> {
    vec![
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": namespace},
               "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}),
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "web", "namespace": namespace},
               "spec": {"ingressClassName": "pico-tunnel", "rules": [{"host": host, "http": {"paths": [{"path": "/", "pathType": "Prefix",
                   "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}]}}),
    ]
}

/// What every install denies the controller: Secrets (except sync-key's copies, by name) and
/// workloads (except in restart mode), deleting pods, writing Ingresses other than their status.
async fn assert_controller_denials(identity: &Path, apps_ns: &str, mode: Mode) {
    assert_can_i(identity, &["list", "secrets", "-A"], false).await;
    assert_can_i(identity, &["get", "secrets", "-n", apps_ns], false).await;
    assert_can_i(identity, &["list", "secrets", "-n", apps_ns], false).await;
    assert_can_i(identity, &["get", "secrets/another", "-n", apps_ns], false).await;
    assert_can_i(identity, &["get", "secrets/picotun-ssh-key", "-n", apps_ns], mode == Mode::SyncKey).await;
    assert_can_i(identity, &["delete", "pods", "-A"], false).await;
    assert_can_i(identity, &["update", "ingresses", "-A"], false).await;
    assert_can_i(identity, &["patch", "ingresses", "--subresource=status", "-A"], true).await;
    let restart = mode == Mode::Restart;
    for kind in ["deployments", "statefulsets", "daemonsets"] {
        assert_can_i(identity, &["patch", kind, "-A"], restart).await;
        assert_can_i(identity, &["get", kind, "-A"], restart).await;
    }
    assert_can_i(identity, &["get", "replicasets", "-A"], restart).await;
    assert_can_i(identity, &["update", "leases/picotun-controller", "-n", SYSTEM_NAMESPACE], true).await;
    assert_can_i(identity, &["update", "leases/another", "-n", SYSTEM_NAMESPACE], false).await;
    assert_can_i(identity, &["update", "leases", "-n", "default"], false).await;
}

#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn the_controller_works_with_the_rbac_deploy_grants_it() {
    let classes = [("IngressClass", "pico-tunnel"), ("GatewayClass", "pico-tunnel")];
    let inst = install("picotun-controller", &classes, Mode::Default).await;
    let (ground, client) = (inst.ground, &inst.client);
    let admin = ground.kubeconfig();
    let apps = labeled_namespace(ground, client, "deploy-controller").await;
    let apps_ns = apps.name();
    assert_controller_denials(&inst.identity, apps_ns, Mode::Default).await;

    let pod_name = "picotun-controller-test";
    let controller = run_controller(&inst, pod_name).await;

    // The Ingress walkthrough on one pod that already carries the sidecar (as the webhook
    // would have injected it).
    apply(admin, &web_ingress(apps_ns, "demo"), false);
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
        let tunnels = picotun::core::tunnel::TunnelsFile::parse(&file).map_err(|e| e.to_string())?;
        Ok(tunnels.tunnels.into_iter().find(|t| t.host.as_deref() == Some("demo")).map(|t| t.name))
    })
    .await
    .unwrap();
    // ...the sidecar reports the address it reached (the webhook's /report writes this)...
    let report = json!({"tunnels": {tunnel: {"state": "established", "publicAddress": "https://alice-demo.tuns.sh"}}});
    let patch = json!({"metadata": {"annotations": {"tunnels.pico.sh/addresses": report.to_string()}}});
    pods.patch("web-0", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    // ...and the controller writes it into the Ingress status (it may patch ingresses/status).
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

#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn the_controller_in_restart_mode_works_with_what_its_component_grants() {
    let inst = install("picotun-controller", &[("IngressClass", "pico-tunnel")], Mode::Restart).await;
    let (ground, client, identity) = (inst.ground, &inst.client, &inst.identity);
    let apps = labeled_namespace(ground, client, "deploy-restart").await;
    let apps_ns = apps.name();
    assert_controller_denials(identity, apps_ns, Mode::Restart).await;

    // A workload behind an Ingress whose pod lacks the sidecar (no webhook runs here).
    apply(ground.kubeconfig(), &web_ingress(apps_ns, "restart-me"), false);
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}}, "template": {
            // It asks for the sidecar: only such pods are restarted (defect 2 of issue 12).
            "metadata": {"labels": {"app": "web", "tunnels.pico.sh/inject": "true"}},
            "spec": {"containers": [{"name": "app", "image": "registry.example/app:1", "ports": [{"name": "http", "containerPort": 8080}]}]}}},
    }))
    .unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), apps_ns);
    deployments.create(&PostParams::default(), &deployment).await.unwrap();
    let controller = run_controller(&inst, "picotun-controller-restart-test").await;
    let started = Instant::now();
    wait_for("the restart", Duration::from_secs(60), Duration::from_millis(250), || async {
        let d = deployments.get("web").await.map_err(|e| e.to_string())?;
        let at = d.spec.and_then(|s| s.template.metadata).and_then(|m| m.annotations);
        Ok(at.is_some_and(|a| a.contains_key("tunnels.pico.sh/restartedAt")).then_some(()))
    })
    .await
    .unwrap();
    println!("restarted {} ms after the controller was ready", started.elapsed().as_millis());
    assert_never_forbidden(&controller);

    // Its patches may change the restart annotation and nothing else of a workload.
    let policy = "picotun-controller-restarts";
    let only = "may change only spec.template.metadata.annotations[\"tunnels.pico.sh/restartedAt\"] of a Deployment";
    let replicas = ["patch", "deployment", "web", "-n", apps_ns, "--type=merge", "-p", r#"{"spec":{"replicas":3}}"#];
    wait_policy_active(identity, &replicas, policy).await;
    assert_policy_denies(identity, &replicas, policy, only);
    let image = r#"{"spec":{"template":{"spec":{"containers":[{"name":"app","image":"evil.example/app:1"}]}}}}"#;
    assert_policy_denies(identity, &["patch", "deployment", "web", "-n", apps_ns, "-p", image], policy, only);
    let other = r#"{"spec":{"template":{"metadata":{"annotations":{"other":"x"}}}}}"#;
    assert_policy_denies(
        identity,
        &["patch", "deployment", "web", "-n", apps_ns, "--type=merge", "-p", other],
        policy,
        only,
    );
    let restart =
        r#"{"spec":{"template":{"metadata":{"annotations":{"tunnels.pico.sh/restartedAt":"2030-01-01T00:00:00Z"}}}}}"#;
    let (ok, out) = kubectl_as(identity, &["patch", "deployment", "web", "-n", apps_ns, "--type=merge", "-p", restart]);
    assert!(ok, "a restart is allowed: {out}");
    // The same for the other kinds it restarts.
    let template = json!({"metadata": {"labels": {"app": "other"}},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]}});
    let workloads = [
        json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db", "namespace": apps_ns},
            "spec": {"replicas": 1, "serviceName": "db", "selector": {"matchLabels": {"app": "other"}}, "template": template}}),
        json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "agent", "namespace": apps_ns},
            "spec": {"selector": {"matchLabels": {"app": "other"}}, "template": template}}),
    ];
    apply(ground.kubeconfig(), &workloads, false);
    for (kind, name, what) in [("statefulset", "db", "StatefulSet"), ("daemonset", "agent", "DaemonSet")] {
        let only =
            format!("may change only spec.template.metadata.annotations[\"tunnels.pico.sh/restartedAt\"] of a {what}");
        let slower = ["patch", kind, name, "-n", apps_ns, "--type=merge", "-p", r#"{"spec":{"minReadySeconds":30}}"#];
        assert_policy_denies(identity, &slower, policy, &only);
        let (ok, out) = kubectl_as(identity, &["patch", kind, name, "-n", apps_ns, "--type=merge", "-p", restart]);
        assert!(ok, "a restart of a {what} is allowed: {out}");
    }
}

#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn the_controller_in_sync_key_mode_works_with_what_its_component_grants() {
    let inst = install("picotun-controller", &[], Mode::SyncKey).await;
    let (ground, client, identity) = (inst.ground, &inst.client, &inst.identity);
    let apps = labeled_namespace(ground, client, "deploy-sync").await;
    let apps_ns = apps.name();
    assert_controller_denials(identity, apps_ns, Mode::SyncKey).await;
    assert_can_i(identity, &["list", "secrets/picotun-ssh-key", "-A"], true).await;

    let secrets = |ns: &str| Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), ns);
    let source: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": {"name": "picotun-ssh-key"}, "type": "kubernetes.io/ssh-auth",
        "stringData": {"ssh-privatekey": "KEY"}}))
    .unwrap();
    let _ = secrets(SYSTEM_NAMESPACE).delete("picotun-ssh-key", &DeleteParams::default()).await;
    secrets(SYSTEM_NAMESPACE).create(&PostParams::default(), &source).await.unwrap();
    let controller = run_controller(&inst, "picotun-controller-sync-test").await;
    let copy = |present: bool| {
        let api = secrets(apps_ns);
        async move {
            wait_for(
                &format!("the copy present: {present}"),
                Duration::from_secs(40),
                Duration::from_millis(250),
                || async {
                    let s = api.get_opt("picotun-ssh-key").await.map_err(|e| e.to_string())?;
                    Ok((s.is_some() == present).then_some(()))
                },
            )
            .await
            .unwrap()
        }
    };
    copy(true).await;
    let unlabel = json!({"metadata": {"labels": {"tunnels.pico.sh/injection": null}}});
    Api::<Namespace>::all(client.clone())
        .patch(apps_ns, &PatchParams::default(), &Patch::Merge(&unlabel))
        .await
        .unwrap();
    copy(false).await;
    assert_never_forbidden(&controller);

    // Its Secret writes are narrowed to its copies.
    let policy = "picotun-controller-key-copies";
    let other = ["create", "secret", "generic", "other", "-n", apps_ns, "--from-literal=k=v"];
    wait_policy_active(identity, &other, policy).await;
    assert_policy_denies(identity, &other, policy, "may write only Secrets named picotun-ssh-key");
    let unlabeled = ["create", "secret", "generic", "picotun-ssh-key", "-n", apps_ns, "--from-literal=k=v"];
    assert_policy_denies(identity, &unlabeled, policy, "never a Secret the user made");
    drop(controller);
    let _ = secrets(SYSTEM_NAMESPACE).delete("picotun-ssh-key", &DeleteParams::default()).await;
}

/// RBAC's `patch pods` is the whole pod; the admission policies narrow each identity to its
/// own annotation, on pods that carry the sidecar only, and the webhook's Secret create to its
/// ticket key.
#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn the_admission_policies_let_each_identity_change_only_its_own_annotation() {
    let inst = install("picotun-webhook", &[], Mode::Default).await;
    let (ground, client) = (inst.ground, &inst.client);
    let webhook = &inst.identity;
    let controller = kubeconfig_for(ground.kubeconfig(), "picotun-controller", inst.dir.path());
    let apps = labeled_namespace(ground, client, "deploy-policy").await;
    let ns = apps.name();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let plain: Pod = serde_json::from_value(json!({
        "metadata": {"name": "plain", "labels": {"tunnels.pico.sh/inject": "true"}},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &plain).await.unwrap();
    let mut injected =
        picotun::webhook::inject::mutate(&plain, ns, None, &[], false, &Default::default()).pod.expect("opted in");
    injected.metadata.name = Some("injected".into());
    pods.create(&PostParams::default(), &injected).await.unwrap();

    // Merge patches, as picotun sends them, by a client of each identity (kubectl annotate,
    // label and patch would GET the pod first, which the controller may not).
    let as_client = |kubeconfig: &Path| {
        let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
        async move {
            let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.unwrap();
            Api::<Pod>::namespaced(kube::Client::try_from(config).unwrap(), ns)
        }
    };
    let (as_webhook, as_controller) = (as_client(webhook).await, as_client(&controller).await);
    let patch = |api: &Api<Pod>, pod: &str, body: Value| {
        let (api, pod) = (api.clone(), pod.to_string());
        async move {
            match api.patch(&pod, &PatchParams::default(), &Patch::Merge(&body)).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(e)) => Err(e.message),
                Err(e) => panic!("{e}"),
            }
        }
    };
    let annotation = |key: &str| json!({"metadata": {"annotations": {key: random_suffix()}}});
    let label = json!({"metadata": {"labels": {"stolen": "yes"}}});
    let policy = "picotun-pod-writes";
    let denied = |result: Result<(), String>, message: &str| {
        let Err(err) = result else { panic!("allowed, should be denied by {policy}: {message}") };
        assert!(err.contains(&format!("ValidatingAdmissionPolicy '{policy}'")) && err.contains(message), "{err}");
    };
    // The policy acts once the apiserver has loaded it.
    wait_for("the pod policy", Duration::from_secs(20), Duration::from_millis(200), || async {
        let dry = PatchParams { dry_run: true, ..Default::default() };
        let refused = as_webhook.patch("injected", &dry, &Patch::Merge(&label)).await.err();
        Ok(refused.filter(|e| e.to_string().contains(policy)).map(drop))
    })
    .await
    .unwrap();

    // The webhook: the addresses annotation of injected pods, nothing else.
    let only_addresses = "may change only the annotation tunnels.pico.sh/addresses of a pod";
    denied(patch(&as_webhook, "injected", label.clone()).await, only_addresses);
    denied(patch(&as_webhook, "injected", annotation("tunnels.pico.sh/tunnels")).await, only_addresses);
    denied(patch(&as_webhook, "injected", annotation("other")).await, only_addresses);
    patch(&as_webhook, "injected", annotation("tunnels.pico.sh/addresses"))
        .await
        .expect("the webhook records addresses");
    denied(
        patch(&as_webhook, "plain", annotation("tunnels.pico.sh/addresses")).await,
        "may write only pods that carry the picotun-agent sidecar",
    );
    // The controller: the tunnels annotation, nothing else.
    let only_tunnels = "may change only the annotation tunnels.pico.sh/tunnels of a pod";
    denied(patch(&as_controller, "injected", label.clone()).await, only_tunnels);
    denied(patch(&as_controller, "injected", annotation("tunnels.pico.sh/addresses")).await, only_tunnels);
    patch(&as_controller, "injected", annotation("tunnels.pico.sh/tunnels"))
        .await
        .expect("the controller writes tunnels");
    let pod = pods.get("injected").await.unwrap();
    assert!(!pod.metadata.labels.unwrap().contains_key("stolen"));
    assert!(!pod.metadata.annotations.unwrap().contains_key("other"));

    // The webhook's Secret create: its ticket key only.
    let secrets = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), SYSTEM_NAMESPACE);
    let create =
        |name: &'static str| ["create", "secret", "generic", name, "-n", SYSTEM_NAMESPACE, "--from-literal=key=x"];
    assert_policy_denies(webhook, &create("picotun-ssh-key"), "picotun-webhook-secrets", "may create only the Secret");
    let _ = secrets.delete("picotun-webhook-ticket", &DeleteParams::default()).await;
    let (ok, out) = kubectl_as(webhook, &create("picotun-webhook-ticket"));
    assert!(ok, "its ticket key: {out}");
    let _ = secrets.delete("picotun-webhook-ticket", &DeleteParams::default()).await;
}
