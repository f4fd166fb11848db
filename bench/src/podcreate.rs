//! `podcreate PICOTUN LOADGEN COUNT [POPULATION]`: Pod-creation latency through the test ground's real
//! kube-apiserver, for issue 13's two figures, interleaved in one run (each round creates one pod
//! of each kind, in a rotating order):
//!
//! - not opted in: a pod that does not opt in, in a namespace labeled for injection where the
//!   webhook is registered as deploy/ ships it (selectors and matchConditions), vs the same pod
//!   in a namespace no webhook is registered for. Goal 1.0x: the apiserver does not call picotun.
//! - injected: an opted-in pod, injected by picotun's webhook, vs the same pod already injected
//!   (`picotun inject`, with the same sidecar settings) created through a registered no-op
//!   webhook (`loadgen noop-webhook`, registered as deploy/ ships picotun's) -- the floor no
//!   webhook can beat: the same call, the same pod stored, no work.
//! - any change: the pre-injected pod through the no-op webhook answering with the smallest
//!   patch (one label). Any webhook that injects changes the pod, and a changed pod costs the
//!   apiserver a patch to apply and a second pass of its own mutating plugins (re-invocation):
//!   this splits the injected figure into what any change costs and what picotun adds.
//!
//! POPULATION pods (default 0) are created first in a namespace of their own that no webhook is
//! registered for -- the rest of a cluster, which an admission should not pay for.
//!
//! Prints `bench:` lines (milliseconds), and on stderr where the time goes.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use picotun_testground::bins::{bin, repo_root};
use picotun_testground::pki::Ca;
use picotun_testground::{ControlPlane, Proc, free_port, http};
use serde_json::{Value, json};

/// `picotun webhook` and `picotun inject` configure the sidecar alike: certificate mode, as
/// deploy/ installs it (the report URL is only written into the sidecar, never called here).
fn sidecar_args(ca_file: &Path) -> Vec<String> {
    let args = ["--native-sidecar", "true", "--sidecar-auth", "certificate"];
    let report = ["--agent-report-url", "https://picotun-webhook.pico-sh-system.svc:8444/report"];
    let mut out: Vec<String> = args.iter().chain(report.iter()).map(|s| s.to_string()).collect();
    out.extend(["--agent-report-ca-file".to_string(), ca_file.to_str().unwrap().to_string()]);
    out
}

/// `labels` on a pod like the ones a Deployment makes (one container, a named port, requests).
fn pod_json(labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "labels": labels},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1",
            "ports": [{"name": "http", "containerPort": 8080}],
            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]},
    })
}

/// `pod` named `name`.
fn named(pod: &Pod, name: String) -> Pod {
    let mut p = pod.clone();
    p.metadata.name = Some(name);
    p
}

/// Runs `cmd` with `input` on stdin; its stdout, or exits naming what failed.
fn run(what: &str, cmd: &mut Command, input: &[u8]) -> Vec<u8> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    if !out.status.success() {
        eprintln!("[bench] {what} failed: {}", String::from_utf8_lossy(&out.stderr));
        std::process::exit(1);
    }
    out.stdout
}

/// YAML (one object) as JSON, read by the ground's kubectl the way `kubectl apply` reads it.
fn yaml_to_json(kubeconfig: &Path, what: &str, yaml: &[u8]) -> Value {
    let mut cmd = Command::new(bin("kubectl").expect("the ground's kubectl"));
    cmd.arg("--kubeconfig").arg(kubeconfig).args(["create", "--dry-run=client", "-o", "json", "-f", "-"]);
    serde_json::from_slice(&run(&format!("kubectl reading {what}"), &mut cmd, yaml)).unwrap()
}

/// The webhook of deploy/base/webhook-configuration.yaml, pointed at `url` (trusting `ca_pem`)
/// and registered as `name` for the namespaces `namespace_selector` selects besides its own.
async fn register(client: &kube::Client, shipped: &Value, name: &str, url: String, ca_pem: &str, selector: Value) {
    let mut hook = shipped["webhooks"][0].clone();
    hook["clientConfig"] = json!({"url": url, "caBundle": base64::engine::general_purpose::STANDARD.encode(ca_pem)});
    hook["namespaceSelector"] = selector;
    let config: MutatingWebhookConfiguration =
        serde_json::from_value(json!({"metadata": {"name": name}, "webhooks": [hook]})).unwrap();
    Api::<MutatingWebhookConfiguration>::all(client.clone()).create(&PostParams::default(), &config).await.unwrap();
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

/// The value of the metric line starting with `name` on the webhook's /metrics.
async fn webhook_metric(admin: &str, name: &str) -> Option<f64> {
    let m = http::get(admin, "w", "/metrics").await.ok()?;
    m.body.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().last()).and_then(|v| v.parse().ok())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(picotun), Some(loadgen), Some(count), Some(population)) = (
        args.get(1),
        args.get(2),
        args.get(3).and_then(|c| c.parse::<usize>().ok()),
        args.get(4).map_or(Some(0), |p| p.parse::<usize>().ok()),
    ) else {
        eprintln!("usage: podcreate PICOTUN LOADGEN COUNT [POPULATION]");
        std::process::exit(2);
    };
    let ground = ControlPlane::start(Default::default()).await.expect("test ground");
    let client = ground.client().await.unwrap();
    // No webhook is registered for `plain`; picotun's for `labeled` (as deploy/ registers it:
    // the injection label); the no-op for `noop`, by name.
    let plain = ground.namespace("no-webhook").await.unwrap();
    let labeled = ground.namespace("picotun").await.unwrap();
    let noop = ground.namespace("noop-webhook").await.unwrap();
    let touch = ground.namespace("touch-webhook").await.unwrap();
    let label = json!({"metadata": {"labels": {"tunnels.pico.sh/injection": "enabled"}}});
    Api::<Namespace>::all(client.clone())
        .patch(labeled.name(), &PatchParams::default(), &Patch::Merge(&label))
        .await
        .unwrap();

    if population > 0 {
        use futures::StreamExt;
        let rest = ground.namespace("rest-of-cluster").await.unwrap();
        let api: Api<Pod> = Api::namespaced(client.clone(), rest.name());
        let pod: Pod = serde_json::from_value(pod_json(json!({"app": "other"}))).unwrap();
        let started = Instant::now();
        futures::stream::iter(0..population)
            .map(|i| {
                let (api, pod) = (api.clone(), named(&pod, format!("other-{i}")));
                async move { api.create(&PostParams::default(), &pod).await.unwrap() }
            })
            .buffer_unordered(16)
            .for_each(|_| async {})
            .await;
        eprintln!(
            "[bench] {population} pods elsewhere in the cluster, created in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("bench-ca").unwrap();
    let (cert, key) = ca.issue_loopback_server(&[]).unwrap().write(dir.path(), "tls").unwrap();
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    let (port, admin) = (free_port(), format!("127.0.0.1:{}", free_port()));
    let ticket_key = dir.path().join("ticket-key");
    std::fs::write(&ticket_key, [7u8; 32]).unwrap();
    let mut cmd = Command::new(picotun);
    cmd.args(["--log-filter", "warn", "webhook", "--listen", &format!("127.0.0.1:{port}"), "--admin-addr", &admin])
        .args(["--agent-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--cert-file", cert.to_str().unwrap(), "--key-file", key.to_str().unwrap()])
        // The ticket key from a file needs no Secret.
        .args(["--ticket-key-file", ticket_key.to_str().unwrap()])
        .args(sidecar_args(&ca_file))
        .env("KUBECONFIG", ground.kubeconfig());
    let _webhook = Proc::spawn("picotun-webhook", cmd, &dir.path().join("webhook.log")).unwrap();
    let noop_port = free_port();
    let mut cmd = Command::new(loadgen);
    cmd.args(["noop-webhook", &format!("127.0.0.1:{noop_port}"), cert.to_str().unwrap(), key.to_str().unwrap()])
        .arg(touch.name());
    let noop_webhook = Proc::spawn("noop-webhook", cmd, &dir.path().join("noop.log")).unwrap();
    while !http::get(&admin, "w", "/ready").await.is_ok_and(|r| r.status == 200) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let shipped_yaml = std::fs::read(repo_root().join("deploy/base/webhook-configuration.yaml")).unwrap();
    let shipped = yaml_to_json(ground.kubeconfig(), "deploy/base/webhook-configuration.yaml", &shipped_yaml);
    let mut selector = shipped["webhooks"][0]["namespaceSelector"].clone();
    let only_labeled = json!({"key": "kubernetes.io/metadata.name", "operator": "In", "values": [labeled.name()]});
    selector["matchExpressions"].as_array_mut().unwrap().push(only_labeled);
    let url = format!("https://127.0.0.1:{port}/mutate");
    register(&client, &shipped, "picotun-bench", url, &ca.cert_pem(), selector).await;
    let selector = json!({"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": [noop.name(), touch.name()]}]});
    let url = format!("https://127.0.0.1:{noop_port}/mutate");
    register(&client, &shipped, "picotun-bench-noop", url, &ca.cert_pem(), selector).await;

    let not_opted_in: Pod = serde_json::from_value(pod_json(json!({"app": "web"}))).unwrap();
    let opted_in_json = pod_json(json!({"app": "web", "tunnels.pico.sh/inject": "true"}));
    let opted_in: Pod = serde_json::from_value(opted_in_json.clone()).unwrap();
    // The same pod injected ahead of time, as a GitOps repository would hold it.
    let mut inject = Command::new(picotun);
    inject.args(["inject", "-f", "-", "--namespace", noop.name()]).args(sidecar_args(&ca_file));
    let yaml = run("picotun inject", &mut inject, opted_in_json.to_string().as_bytes());
    let mut pre_injected: Pod =
        serde_json::from_value(yaml_to_json(ground.kubeconfig(), "picotun inject's output", &yaml)).unwrap();
    pre_injected.metadata.namespace = None;
    let has_sidecar = |p: &Pod| {
        p.spec.as_ref().is_some_and(|s| s.init_containers.iter().flatten().any(|c| c.name == "picotun-agent"))
    };
    assert!(has_sidecar(&pre_injected), "picotun inject gave the pod no sidecar");

    let plain_api: Api<Pod> = Api::namespaced(client.clone(), plain.name());
    let labeled_api: Api<Pod> = Api::namespaced(client.clone(), labeled.name());
    let noop_api: Api<Pod> = Api::namespaced(client.clone(), noop.name());
    let touch_api: Api<Pod> = Api::namespaced(client.clone(), touch.name());
    let pp = PostParams::default();
    // Until the apiserver calls both webhooks (it picks configurations up after an informer delay).
    for i in 0.. {
        let p = labeled_api.create(&pp, &named(&opted_in, format!("warm-{i}"))).await.unwrap();
        noop_api.create(&pp, &named(&pre_injected, format!("warm-{i}"))).await.unwrap();
        let t = touch_api.create(&pp, &named(&pre_injected, format!("warm-{i}"))).await.unwrap();
        let touched = t.metadata.labels.as_ref().is_some_and(|l| l.contains_key("bench-touched"));
        if has_sidecar(&p) && touched && noop_webhook.log_tail(5).contains("answered its first admission request") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Admission requests picotun's webhook has answered, and pods it was sent that do not opt in.
    let answered = async || webhook_metric(&admin, "picotun_webhook_duration_seconds_count").await.unwrap_or(0.0);
    let not_opted_in_sent =
        async || webhook_metric(&admin, "picotun_webhook_skips_total{reason=\"not_opted_in\"}").await.unwrap_or(0.0);
    let handling = async || webhook_metric(&admin, "picotun_webhook_duration_seconds_sum").await.unwrap_or(0.0);
    let (calls_before, sent_before, handling_before) = (answered().await, not_opted_in_sent().await, handling().await);

    // Rounds of six, the order rotating so that none always follows another. The fifth, the
    // pre-injected pod with no webhook, splits the floor: a bigger pod, and a webhook call. The
    // sixth splits the injected figure: what any change costs, and what picotun adds to it.
    let kinds: [(&Api<Pod>, &Pod, &str); 6] = [
        (&plain_api, &not_opted_in, "plain"),
        (&labeled_api, &not_opted_in, "plain"),
        (&noop_api, &pre_injected, "pre"),
        (&labeled_api, &opted_in, "web"),
        (&plain_api, &pre_injected, "pre"),
        (&touch_api, &pre_injected, "pre"),
    ];
    let mut samples: [Vec<f64>; 6] = Default::default();
    let mut uninjected = 0;
    for i in 0..count {
        for k in 0..kinds.len() {
            let which = (i + k) % kinds.len();
            let (api, pod, prefix) = kinds[which];
            let pod = named(pod, format!("{prefix}-{i}"));
            let t = Instant::now();
            let created = api.create(&pp, &pod).await.unwrap();
            samples[which].push(t.elapsed().as_secs_f64() * 1000.0);
            if which == 3 && !has_sidecar(&created) {
                uninjected += 1;
            }
        }
    }
    let calls = answered().await - calls_before;
    let handled = handling().await - handling_before;
    let sent = (not_opted_in_sent().await - sent_before) as usize;
    for s in samples.iter_mut() {
        s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    }
    let [no_webhook, not_opted_in, floor, injected, big_pod, any_change] = &samples;
    let line = |metric: &str, ours: &[f64], baseline: &[f64], q: f64| {
        let (o, b) = (percentile(ours, q), percentile(baseline, q));
        println!("bench: {metric} ours={o:.2} baseline={b:.2} ratio={:.2}", o / b);
    };
    for (suffix, q) in [("p50_ms", 0.5), ("p99_ms", 0.99)] {
        line(&format!("podcreate_not_opted_in_{suffix}"), not_opted_in, no_webhook, q);
        line(&format!("podcreate_injected_{suffix}"), injected, floor, q);
    }
    // What injection costs against no webhook at all, as this benchmark measured it before the
    // floor existed (a webhook call plus a bigger pod to store).
    line("podcreate_injected_vs_no_webhook_p50_ms", injected, no_webhook, 0.5);
    // The injected figure split in two: what the apiserver charges any webhook that changes the
    // pod (a one-label patch against the floor), and what picotun adds to that.
    for (suffix, q) in [("p50_ms", 0.5), ("p99_ms", 0.99)] {
        line(&format!("podcreate_any_change_vs_floor_{suffix}"), any_change, floor, q);
        line(&format!("podcreate_injected_vs_any_change_{suffix}"), injected, any_change, q);
    }
    eprintln!(
        "[bench] p50: a plain pod, no webhook {:.2} ms; the pre-injected pod, no webhook {:.2} ms; through the no-op webhook (the floor) {:.2} ms",
        percentile(no_webhook, 0.5),
        percentile(big_pod, 0.5),
        percentile(floor, 0.5)
    );
    // More than one request per injected pod: the apiserver re-invoked the webhook (reinvocationPolicy
    // IfNeeded) because something after it changed the pod.
    eprintln!(
        "[bench] picotun's webhook answered {calls} admission requests ({:.1} per injected pod); {sent} of the {count} pods that do not opt in reached it",
        calls / count as f64
    );
    if sent > 0 || uninjected > 0 {
        eprintln!(
            "[bench] WARNING: the figures are not what they say: {sent} pods that do not opt in reached the webhook, {uninjected} opted-in pods were not injected"
        );
    }
    // Where the time goes: the webhook's own handling time, as it measured it (the measured rounds
    // only: the warm-up's first requests are slower).
    eprintln!("[bench] webhook handling: {:.2} ms on average over {calls} requests", handled / calls * 1000.0);
    if let Some(conns) = webhook_metric(&admin, "picotun_webhook_connections_total").await {
        let noop = std::fs::read_to_string(noop_webhook.log_path()).unwrap_or_default();
        let noop = noop.lines().filter(|l| l.starts_with("noop-webhook: connection")).count();
        eprintln!("[bench] TLS connections the apiserver opened: {conns} to picotun's webhook, {noop} to the no-op");
    }
    ground.stop();
}
