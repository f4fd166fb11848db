//! `podcreate PICOTUN_BINARY COUNT`: Pod-creation latency through the test ground's real
//! kube-apiserver, with the picotun webhook registered (an opted-in namespace) and without (a
//! namespace the webhook is not registered for), interleaved in one run. Prints `bench:` lines.

use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use picotun_testground::pki::Ca;
use picotun_testground::{ControlPlane, Proc, free_port, http};
use serde_json::json;

fn pod(name: &str) -> Pod {
    pod_opting(name, "true")
}

fn pod_opting(name: &str, inject: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"tunnels.pico.sh/inject": inject}},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]},
    }))
    .unwrap()
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(binary), Some(count)) = (args.get(1), args.get(2).and_then(|c| c.parse::<usize>().ok())) else {
        eprintln!("usage: podcreate PICOTUN_BINARY COUNT");
        std::process::exit(2);
    };
    let ground = ControlPlane::start(Default::default()).await.expect("test ground");
    let client = ground.client().await.unwrap();
    let with = ground.namespace("with-webhook").await.unwrap();
    let without = ground.namespace("without-webhook").await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("bench-ca").unwrap();
    let (cert, key) = ca.issue_loopback_server(&[]).unwrap().write(dir.path(), "tls").unwrap();
    let (port, admin) = (free_port(), format!("127.0.0.1:{}", free_port()));
    let ticket_key = dir.path().join("ticket-key");
    std::fs::write(&ticket_key, [7u8; 32]).unwrap();
    let mut cmd = Command::new(binary);
    cmd.args(["--log-filter", "warn", "webhook", "--listen", &format!("127.0.0.1:{port}"), "--admin-addr", &admin])
        .args(["--agent-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--cert-file", cert.to_str().unwrap(), "--key-file", key.to_str().unwrap()])
        // Injection as it costs at admission: key mode needs no report endpoint, and the ticket key
        // from a file needs no Secret.
        .args(["--sidecar-auth", "key", "--ticket-key-file", ticket_key.to_str().unwrap()])
        .env("KUBECONFIG", ground.kubeconfig());
    let _webhook = Proc::spawn("picotun-webhook", cmd, &dir.path().join("webhook.log")).unwrap();
    while !http::get(&admin, "w", "/ready").await.is_ok_and(|r| r.status == 200) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let config: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": "picotun-bench"},
        "webhooks": [{
            "name": "inject.tunnels.pico.sh",
            "clientConfig": {"url": format!("https://127.0.0.1:{port}/mutate"),
                             "caBundle": base64::engine::general_purpose::STANDARD.encode(ca.cert_pem())},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": with.name()}},
            "sideEffects": "None", "admissionReviewVersions": ["v1"], "failurePolicy": "Fail", "timeoutSeconds": 5,
        }],
    }))
    .unwrap();
    Api::<MutatingWebhookConfiguration>::all(client.clone()).create(&PostParams::default(), &config).await.unwrap();

    let with_api: Api<Pod> = Api::namespaced(client.clone(), with.name());
    let without_api: Api<Pod> = Api::namespaced(client.clone(), without.name());
    // Wait until the apiserver calls the webhook.
    for i in 0.. {
        let p = with_api.create(&PostParams::default(), &pod(&format!("warm-{i}"))).await.unwrap();
        if p.spec.unwrap().init_containers.is_some_and(|c| !c.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut ours, mut base, mut called) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..count {
        for (api, samples, inject, prefix) in [
            (&with_api, &mut ours, "true", "p"),
            (&without_api, &mut base, "true", "p"),
            (&with_api, &mut called, "false", "skip"),
        ] {
            let t = Instant::now();
            api.create(&PostParams::default(), &pod_opting(&format!("{prefix}-{i}"), inject)).await.unwrap();
            samples.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    for s in [&mut ours, &mut base, &mut called] {
        s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    }
    for (metric, q) in [("pod_create_p50_ms", 0.5), ("pod_create_p99_ms", 0.99)] {
        let (o, b) = (percentile(&ours, q), percentile(&base, q));
        println!("bench: {metric} ours={o:.2} baseline={b:.2} ratio={:.2}", o / b);
    }
    // The webhook called but not injecting: separates the cost of the call from that of a bigger pod.
    for (metric, q) in [
        ("pod_create_webhook_called_no_injection_p50_ms", 0.5),
        ("pod_create_webhook_called_no_injection_p99_ms", 0.99),
    ] {
        let (o, b) = (percentile(&called, q), percentile(&base, q));
        println!("bench: {metric} ours={o:.2} baseline={b:.2} ratio={:.2}", o / b);
    }
    // Where the time goes: the webhook's own handling time, as it measured it.
    if let Ok(m) = http::get(&admin, "w", "/metrics").await {
        let value = |name: &str| {
            m.body
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().last())
                .and_then(|v| v.parse::<f64>().ok())
        };
        if let (Some(sum), Some(count)) =
            (value("picotun_webhook_duration_seconds_sum"), value("picotun_webhook_duration_seconds_count"))
        {
            eprintln!("[bench] webhook handling: {:.2} ms on average over {count} requests", sum / count * 1000.0);
        }
        if let Some(conns) = value("picotun_webhook_connections_total") {
            eprintln!("[bench] TLS connections the apiserver opened to the webhook: {conns}");
        }
    }
    ground.stop();
}
