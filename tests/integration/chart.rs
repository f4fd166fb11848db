//! The Helm chart (deploy/chart/picotun) against deploy/: for each setting, `helm template`
//! renders the same objects as kustomize renders from deploy/ (or deploy/without-cert-manager/)
//! with the components and patches a user would write for that setting, object by object; the
//! chart passes `helm lint --strict`; what it renders is accepted by the test ground's apiserver
//! (server-side dry run); and picotun's pods, from either, meet PodSecurity `restricted` there
//! without a fixed UID (what OpenShift's restricted-v2 SCC needs). Helm is the ground's
//! (helm.sh/helm/v4 built by scripts/build-testground).

use std::path::Path;
use std::process::Command;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, Patch, PatchParams};
use picotun_testground::bins::{bin, repo_root};
use picotun_testground::{ControlPlane, Existing};
use serde_json::{Value, json};

use crate::deploy::{apply, doc, into_namespace, kubectl, render, run, yaml_documents};

const CHART: &str = "deploy/chart/picotun";

/// `helm ARGS` of the ground; (success, stdout, stderr).
fn helm(args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(bin("helm").unwrap());
    // Nothing of the developer's own helm setup (repositories, plugins, caches) is read.
    let home = tempfile::tempdir().unwrap();
    for var in ["HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"] {
        cmd.env(var, home.path());
    }
    cmd.args(args).current_dir(repo_root());
    run(&mut cmd, "")
}

/// `helm template picotun deploy/chart/picotun ARGS`, one JSON value per object.
fn helm_template(args: &[String]) -> Vec<Value> {
    let mut all = vec!["template".to_string(), "picotun".into(), CHART.into()];
    all.extend(args.iter().cloned());
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let (ok, out, err) = helm(&all);
    assert!(ok, "helm {}: {err}", all.join(" "));
    yaml_documents(&out)
}

/// One setting, said both ways: the chart's values, and what a user writes in a kustomization of
/// their own beside deploy/ for the same result.
struct Setting {
    name: &'static str,
    /// `--set`/`--set-file` arguments; `CERTS` in one stands for the directory `picotun certs` wrote.
    helm: Vec<&'static str>,
    /// deploy/ or deploy/without-cert-manager/.
    base: &'static str,
    components: Vec<&'static str>,
    /// More of the user's kustomization: images, replicas, patches.
    kustomization: Value,
}

fn settings() -> Vec<Setting> {
    let plain = |name, helm: Vec<&'static str>, components: Vec<&'static str>| Setting {
        name,
        helm,
        base: "deploy",
        components,
        kustomization: json!({}),
    };
    let without_cert_manager = vec![
        "--set",
        "certManager.enabled=false",
        "--set-file",
        "webhookTLS.crt=CERTS/tls.crt",
        "--set-file",
        "webhookTLS.key=CERTS/tls.key",
        "--set-file",
        "webhookTLS.ca=CERTS/ca.crt",
    ];
    let mut everything = without_cert_manager.clone();
    everything.extend([
        "--set",
        "auth=sync-key-secret,restartUninjected=true,injectRouteBackends=true,openshift=true",
        "--set",
        "user=alice,server.region=nue,server.port=2222,server.dialect=sish",
        "--set",
        "customDomainAllow=team-a=*.a.example.com",
        "--set",
        "server.knownHosts=[nue.tuns.sh]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB0\n",
        "--set",
        "image.repository=registry.example.com/picotun,image.tag=1.2.3,image.pullPolicy=Always",
        "--set",
        "webhook.replicas=3,controller.replicas=1",
        "--set",
        "webhook.resources.limits.memory=256Mi,controller.resources.requests.cpu=100m",
    ]);
    // A strategic-merge patch of one container of one Deployment.
    let container_patch = |deployment: &str, container: &str, mut fields: Value| {
        fields["name"] = container.into();
        let patch = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": deployment, "namespace": "pico-sh-system"},
            "spec": {"template": {"spec": {"containers": [fields]}}},
        });
        json!({"target": {"kind": "Deployment", "name": deployment}, "patch": patch.to_string()})
    };
    vec![
        plain("defaults", vec![], vec![]),
        Setting {
            name: "without cert-manager",
            helm: without_cert_manager,
            base: "deploy/without-cert-manager",
            components: vec![],
            kustomization: json!({}),
        },
        plain("auth=key-secret", vec!["--set", "auth=key-secret"], vec!["key-secret"]),
        plain("auth=sync-key-secret", vec!["--set", "auth=sync-key-secret"], vec!["key-secret", "sync-key-secret"]),
        plain("restartUninjected", vec!["--set", "restartUninjected=true"], vec!["restart-uninjected"]),
        plain("injectRouteBackends", vec!["--set", "injectRouteBackends=true"], vec!["inject-route-backends"]),
        plain("openshift", vec!["--set", "openshift=true"], vec!["openshift"]),
        Setting {
            name: "everything else at once",
            helm: everything,
            base: "deploy/without-cert-manager",
            components: vec![
                "key-secret",
                "sync-key-secret",
                "restart-uninjected",
                "inject-route-backends",
                "openshift",
            ],
            kustomization: json!({
                "images": [{"name": "ghcr.io/picotun/picotun", "newName": "registry.example.com/picotun", "newTag": "1.2.3"}],
                "replicas": [{"name": "picotun-webhook", "count": 3}, {"name": "picotun-controller", "count": 1}],
                "patches": [
                    {"target": {"kind": "ConfigMap", "name": "picotun-config"}, "patch": json!({
                        "apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": "picotun-config", "namespace": "pico-sh-system"},
                        "data": {
                            "PICOTUN_USER": "alice", "PICOTUN_SERVER": "nue.tuns.sh", "PICOTUN_SERVER_PORT": "2222",
                            "PICOTUN_CUSTOM_DOMAIN_ALLOW": "team-a=*.a.example.com",
                            "PICOTUN_SIDECAR_KNOWN_HOSTS_FILE": "/etc/picotun/config/known_hosts",
                            "known_hosts": "[nue.tuns.sh]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB0\n",
                        },
                    }).to_string()},
                    // deploy/'s replacement copies the image into PICOTUN_SIDECAR_IMAGE before an
                    // overlay's images: apply, so an overlay sets the sidecar's image itself.
                    container_patch("picotun-webhook", "webhook", json!({
                        "imagePullPolicy": "Always",
                        "env": [
                            {"name": "PICOTUN_SIDECAR_IMAGE", "value": "registry.example.com/picotun:1.2.3"},
                            {"name": "PICOTUN_SIDECAR_IMAGE_PULL_POLICY", "value": "Always"},
                        ],
                        "resources": {"limits": {"memory": "256Mi"}},
                    })),
                    container_patch("picotun-controller", "controller", json!({
                        "imagePullPolicy": "Always",
                        "resources": {"requests": {"cpu": "100m"}},
                    })),
                ],
            }),
        },
    ]
}

/// A copy of deploy/ with `picotun certs` output where deploy/without-cert-manager/ reads it,
/// and the user's kustomization beside it; rendered by kustomize.
fn render_kustomize(setting: &Setting, tree: &Path) -> Vec<Value> {
    let overlay = tree.join("overlay");
    std::fs::create_dir_all(&overlay).unwrap();
    let mut kustomization = json!({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [format!("../{}", setting.base)],
        "components": setting.components.iter().map(|c| format!("../deploy/components/{c}")).collect::<Vec<_>>(),
    });
    for (k, v) in setting.kustomization.as_object().unwrap() {
        kustomization[k] = v.clone();
    }
    std::fs::write(overlay.join("kustomization.yaml"), kustomization.to_string()).unwrap();
    render(&overlay)
}

/// A tree with a copy of deploy/ and fresh certificates in deploy/without-cert-manager/certs.
fn tree() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("deploy");
    assert!(Command::new("cp").arg("-r").arg(repo_root().join("deploy")).arg(&copy).status().unwrap().success());
    let certs = copy.join("without-cert-manager/certs");
    let _ = std::fs::remove_dir_all(&certs);
    let out = Command::new(env!("CARGO_BIN_EXE_picotun")).arg("certs").arg("--out-dir").arg(&certs).output().unwrap();
    assert!(out.status.success(), "picotun certs: {}", String::from_utf8_lossy(&out.stderr));
    dir
}

fn helm_args(setting: &Setting, tree: &Path) -> Vec<String> {
    let certs = tree.join("deploy/without-cert-manager/certs");
    setting.helm.iter().map(|a| a.replace("CERTS", certs.to_str().unwrap())).collect()
}

/// kind/namespace/name, the key objects are compared by.
fn key(d: &Value) -> String {
    let m = &d["metadata"];
    format!(
        "{}/{}/{}",
        d["kind"].as_str().unwrap_or("?"),
        m["namespace"].as_str().unwrap_or("-"),
        m["name"].as_str().unwrap_or("?")
    )
}

/// What the two renderers may differ in without a difference to the cluster: the order of a
/// container's environment (kustomize's strategic merge puts the variables a patch names first;
/// none refers to another, so their order means nothing), and line breaks in base64 (kustomize
/// wraps Secret data and the caBundle it copies from there at 70 columns; the apiserver decodes
/// both forms alike), and empty lines in CEL (kustomize writes a folded expression back with an
/// empty line before each more-indented one; CEL reads a line break as a space).
fn normalize(mut d: Value) -> Value {
    fn walk(v: &mut Value) {
        match v {
            Value::Object(map) => {
                for (k, child) in map.iter_mut() {
                    if k == "env"
                        && let Value::Array(items) = child
                    {
                        items.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
                    }
                    if k == "caBundle"
                        && let Value::String(text) = child
                    {
                        text.retain(|c| !c.is_whitespace());
                    }
                    if (k == "expression" || k == "messageExpression")
                        && let Value::String(text) = child
                    {
                        while text.contains("\n\n") {
                            *text = text.replace("\n\n", "\n");
                        }
                    }
                    walk(child);
                }
            }
            Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    walk(&mut d);
    if d["kind"] == "Secret"
        && let Some(data) = d.get_mut("data").and_then(Value::as_object_mut)
    {
        for value in data.values_mut() {
            if let Value::String(text) = value {
                text.retain(|c| !c.is_whitespace());
            }
        }
    }
    d
}

/// The paths where `a` and `b` differ, with both values.
fn differences(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                differences(
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                    &format!("{path}.{k}"),
                    out,
                );
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                differences(p, q, &format!("{path}[{i}]"), out);
            }
        }
        _ if a != b => {
            // Long strings (CEL, base64) from shortly before where they first differ.
            let (x, y) = (a.to_string(), b.to_string());
            let at = x.chars().zip(y.chars()).take_while(|(p, q)| p == q).count().saturating_sub(40);
            let short = |v: &str| v.chars().skip(at).take(160).collect::<String>();
            out.push(format!("  {path} (from char {at}): kustomize {} / helm {}", short(&x), short(&y)))
        }
        _ => {}
    }
}

/// Both renderings, object by object: the same set of objects, each the same.
fn assert_same_objects(what: &str, kustomize: Vec<Value>, helm: Vec<Value>) {
    let index = |docs: Vec<Value>| -> std::collections::BTreeMap<String, Value> {
        let mut map = std::collections::BTreeMap::new();
        for d in docs {
            let k = key(&d);
            assert!(map.insert(k.clone(), normalize(d)).is_none(), "{what}: {k} twice");
        }
        map
    };
    let (k, h) = (index(kustomize), index(helm));
    let only = |a: &std::collections::BTreeMap<String, Value>, b: &std::collections::BTreeMap<String, Value>| {
        a.keys().filter(|x| !b.contains_key(*x)).cloned().collect::<Vec<_>>()
    };
    assert!(
        only(&k, &h).is_empty() && only(&h, &k).is_empty(),
        "{what}: only kustomize renders {:?}; only helm renders {:?}",
        only(&k, &h),
        only(&h, &k)
    );
    let mut out = Vec::new();
    for (name, a) in &k {
        let mut diffs = Vec::new();
        differences(a, &h[name], "", &mut diffs);
        if !diffs.is_empty() {
            out.push(format!("{name}:\n{}", diffs.join("\n")));
        }
    }
    assert!(out.is_empty(), "{what}: the chart renders other objects than deploy/:\n{}", out.join("\n"));
}

#[test]
#[ignore = "needs the test ground (scripts/build-testground)"]
fn the_chart_renders_what_kustomize_renders_for_each_setting() {
    let tree = tree();
    for setting in settings() {
        let kustomize = render_kustomize(&setting, tree.path());
        let helm = helm_template(&helm_args(&setting, tree.path()));
        assert!(kustomize.len() >= 25, "{}: {} objects", setting.name, kustomize.len());
        assert_same_objects(setting.name, kustomize, helm);
    }
}

#[test]
#[ignore = "needs the test ground (scripts/build-testground)"]
fn the_chart_passes_helm_lint_strict() {
    let tree = tree();
    for setting in settings() {
        let mut args = vec!["lint".to_string(), "--strict".into(), CHART.into()];
        args.extend(helm_args(&setting, tree.path()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, out, err) = helm(&args);
        assert!(ok && out.contains("0 chart(s) failed"), "{}: helm lint --strict:\n{out}\n{err}", setting.name);
    }
}

#[test]
#[ignore = "needs the test ground (scripts/build-testground)"]
fn values_the_chart_cannot_use_fail_with_what_to_set() {
    let refused = |args: &[&str], says: &str| {
        let mut all = vec!["template", "picotun", CHART];
        all.extend(args);
        let (ok, _, err) = helm(&all);
        assert!(!ok && err.contains(says), "helm {}: wanted a refusal saying {says:?}, got: {err}", all.join(" "));
    };
    refused(&["--set", "auth=ssh-key"], "set certificate (the default), key-secret or sync-key-secret");
    refused(&["--set", "certManager.enabled=false"], "picotun certs --out-dir DIR");
    refused(&["--set", "server.region=nue,server.host=tunnels.example.com"], "leave it empty");
}

#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn what_the_chart_renders_is_accepted_by_server_side_apply() {
    let ground = ControlPlane::shared(Existing::Allowed).await.unwrap();
    let ns = ground.namespace("chart-apply").await.unwrap();
    let tree = tree();
    // As deploy.rs does for kustomize: the namespaced objects in this test's namespace, a dry
    // run (the cluster-wide ones would meet other tests' webhooks in the shared ground).
    for setting in settings() {
        let docs = into_namespace(helm_template(&helm_args(&setting, tree.path())), ns.name());
        let out = apply(ground.kubeconfig(), &docs, true);
        let accepted = out.lines().filter(|l| l.ends_with("serverside-applied (server dry run)")).count();
        assert_eq!(accepted, docs.len(), "{}: every object accepted:\n{out}", setting.name);
    }
}

/// The pods of picotun's Deployments, from kustomize and from the chart (OpenShift's setting
/// too), are admitted where PodSecurity enforces `restricted` -- without a runAsUser: the
/// image's numeric USER satisfies runAsNonRoot, and OpenShift assigns the UID itself.
#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn picotun_pods_meet_podsecurity_restricted_without_a_fixed_uid() {
    let ground = ControlPlane::shared(Existing::Allowed).await.unwrap();
    let client = ground.client().await.unwrap();
    let ns = ground.namespace("chart-restricted").await.unwrap();
    let labels = json!({"metadata": {"labels": {
        "pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest"}}});
    Api::<Namespace>::all(client.clone())
        .patch(ns.name(), &PatchParams::default(), &Patch::Merge(&labels))
        .await
        .unwrap();
    let tree = tree();
    let sets = [
        ("deploy/", render_kustomize(&settings()[0], tree.path())),
        ("the chart", helm_template(&[])),
        ("the chart, openshift=true", helm_template(&["--set".into(), "openshift=true".into()])),
    ];
    // The service accounts the pods name, so only PodSecurity can refuse them.
    let accounts: Vec<Value> = ["picotun-webhook", "picotun-controller"]
        .iter()
        .map(|a| json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": a, "namespace": ns.name()}}))
        .collect();
    apply(ground.kubeconfig(), &accounts, false);
    let pod_of = |docs: &[Value], deployment: &str| {
        let template = &doc(docs, "Deployment", deployment)["spec"]["template"];
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": deployment, "namespace": ns.name(), "labels": template["metadata"]["labels"]},
               "spec": template["spec"]})
    };
    let create = |pod: &Value| {
        let mut cmd = kubectl(ground.kubeconfig());
        cmd.args(["create", "--dry-run=server", "-f", "-"]);
        run(&mut cmd, &pod.to_string())
    };
    for (what, docs) in &sets {
        for deployment in ["picotun-webhook", "picotun-controller"] {
            let pod = pod_of(docs, deployment);
            assert!(!pod.to_string().contains("runAsUser"), "{what}: {deployment} fixes a UID: {pod}");
            let (ok, out, err) = create(&pod);
            assert!(ok && err.trim().is_empty(), "{what}: {deployment} under PodSecurity restricted: {out}{err}");
        }
        let webhook = &pod_of(docs, "picotun-webhook")["spec"]["securityContext"];
        let fs_group = if what.contains("openshift") { Value::Null } else { json!(65532) };
        assert_eq!(webhook["fsGroup"], fs_group, "{what}: the webhook's fsGroup");
    }
    // PodSecurity does enforce there: the same pod asking for root is refused.
    let mut root = pod_of(&sets[1].1, "picotun-controller");
    root["spec"]["securityContext"]["runAsNonRoot"] = json!(false);
    root["spec"]["containers"][0]["securityContext"]["runAsNonRoot"] = json!(false);
    let (ok, out, err) = create(&root);
    assert!(!ok && err.contains("violates PodSecurity \"restricted:latest\""), "a root pod: {out}{err}");
}

/// `helm install`, `helm upgrade` and `helm uninstall` as deploy/README.md says them, on a
/// control plane of this test's own (the chart's cluster-wide objects under their real names must
/// not meet other tests' webhooks, and the deploy tests' objects in pico-sh-system would not be
/// the release's): the chart makes its namespace, a mode's grants exist only while it is on, and
/// uninstall leaves nothing cluster-wide behind.
#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn helm_install_upgrade_and_uninstall_on_a_control_plane() {
    let ground = ControlPlane::start(picotun_testground::kube_ground::StartOptions::default()).await.unwrap();
    let kubeconfig = ground.kubeconfig().to_str().unwrap().to_string();
    let helm_on = |args: &[&str]| {
        let mut all = vec!["--kubeconfig", kubeconfig.as_str()];
        all.extend(args);
        let (ok, out, err) = helm(&all);
        assert!(ok, "helm {}: {err}\n{out}", args.join(" "));
        out
    };
    let get = |args: &[&str]| {
        let mut cmd = kubectl(ground.kubeconfig());
        cmd.args(["get", "-o", "json"]).args(args);
        let (ok, out, err) = run(&mut cmd, "");
        ok.then(|| serde_json::from_str::<Value>(&out).unwrap()).ok_or(err)
    };

    let out = helm_on(&["install", "picotun", CHART, "--set", "user=alice"]);
    assert!(out.contains("STATUS: deployed") && out.contains("picotun ca create"), "{out}");
    let namespace = get(&["namespace", "pico-sh-system"]).unwrap();
    assert_eq!(namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "restricted");
    assert_eq!(namespace["metadata"]["labels"]["app.kubernetes.io/managed-by"], "Helm", "the release's own");
    let config = get(&["-n", "pico-sh-system", "configmap", "picotun-config"]).unwrap();
    assert_eq!(config["data"]["PICOTUN_USER"], "alice");
    let webhook = get(&["-n", "pico-sh-system", "deployment", "picotun-webhook"]).unwrap();
    assert_eq!(webhook["spec"]["replicas"], 2);
    assert!(get(&["clusterrole", "picotun-webhook-key-secret"]).is_err(), "no key-mode grant in certificate mode");

    // Key mode on: its grant and the webhook's flag; then off again: the grant goes with it.
    helm_on(&["upgrade", "picotun", CHART, "--set", "user=alice,auth=key-secret,webhook.replicas=3"]);
    assert!(get(&["clusterrole", "picotun-webhook-key-secret"]).is_ok());
    let webhook = get(&["-n", "pico-sh-system", "deployment", "picotun-webhook"]).unwrap();
    assert_eq!(webhook["spec"]["replicas"], 3);
    let env = &webhook["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(crate::deploy::env_value(env, "PICOTUN_SIDECAR_AUTH"), "key");
    helm_on(&["upgrade", "picotun", CHART, "--set", "user=alice"]);
    assert!(get(&["clusterrole", "picotun-webhook-key-secret"]).is_err(), "the key-mode grant left with the mode");

    helm_on(&["uninstall", "picotun"]);
    for object in [
        &["clusterrole", "picotun-controller"][..],
        &["clusterrolebinding", "picotun-webhook"],
        &["mutatingwebhookconfiguration", "picotun-webhook"],
        &["validatingadmissionpolicy", "picotun-pod-writes"],
        &["ingressclass", "pico-tunnel"],
        &["gatewayclass", "pico-tunnel"],
    ] {
        let err = get(object).expect_err(&format!("{object:?} is left after helm uninstall"));
        assert!(err.contains("NotFound"), "{object:?}: {err}");
    }
    // The namespace goes too (its contents with it, by the namespace controller).
    if let Ok(ns) = get(&["namespace", "pico-sh-system"]) {
        assert!(ns["metadata"]["deletionTimestamp"].is_string(), "pico-sh-system is left after helm uninstall");
    }
    ground.stop();
}
