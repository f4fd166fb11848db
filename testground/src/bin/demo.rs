//! `demo [--check]`: picotun end to end on one machine. Brings up the test ground with a real
//! node (kubelet + containerd: the pods' containers really run), sish in tuns.sh's role, the
//! webhook and the controller; applies `examples/ingress/` as a user would; waits for the
//! kubelet to run the app and the injected `picotun-agent` sidecar; and fetches the public URL
//! through sish. `--check` exits with a status instead of running until Ctrl-C.
//!
//! Run it through `scripts/demo`, which builds what it needs first.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{Api, ListParams, PostParams};
use picotun_testground::kube_ground::StartOptions;
use picotun_testground::node::{NODE_IP, PICOTUN_IMAGE};
use picotun_testground::{
    ControlPlane, Proc, ServerKind, SishOptions, SshClientKey, TunnelServer, bins, free_port, http, wait_for,
};
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};

const NAMESPACE: &str = "example-ingress";
const APP_LABEL: &str = "app=example-app";

fn step(n: u32, what: &str) {
    eprintln!("\n[demo] {n}. {what}");
}

fn info(what: impl std::fmt::Display) {
    eprintln!("[demo]    {}", what.to_string().trim().replace('\n', "\n[demo]    "));
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let check = std::env::args().any(|a| a == "--check");
    match run(check).await {
        Ok(()) => {}
        Err(e) => {
            eprintln!("\n[demo] FAILED: {e}");
            std::process::exit(1);
        }
    }
}

fn picotun() -> PathBuf {
    std::env::var_os("PICOTUN_BIN").map(PathBuf::from).unwrap_or_else(|| bins::repo_root().join("target/debug/picotun"))
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<String, Box<dyn std::error::Error>> {
    let out = Command::new(bins::bin_dir().join("kubectl"))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .current_dir(bins::repo_root())
        .output()?;
    if !out.status.success() {
        return Err(format!("kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn wait_ready(proc: &mut Proc, admin: &str, what: &str) -> Result<(), Box<dyn std::error::Error>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http::get(admin, "demo", "/ready").await.is_ok_and(|r| r.status == 200) {
        if Instant::now() > deadline || !proc.is_running() {
            return Err(format!("{what} did not become ready; its log:\n{}", proc.log_tail(30)).into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn run(check: bool) -> Result<(), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let work = tempfile::Builder::new().prefix("picotun-demo-").tempdir()?;
    let dir = work.path().to_path_buf();
    picotun_testground::process::remove_at_exit(&dir);

    step(
        1,
        "test ground: etcd, kube-apiserver, controller-manager, scheduler and a real node (kubelet, containerd, runc, CNI)",
    );
    let plane = ControlPlane::start(StartOptions { keep_dir: false, dir: None, real_node: true }).await?;
    let kubeconfig = plane.kubeconfig().to_path_buf();
    let client = plane.client().await?;
    let node = plane.real_node().ok_or("the ground started without its real node")?;
    info(format!("ready after {:.1}s; KUBECONFIG={}", started.elapsed().as_secs_f32(), kubeconfig.display()));
    info(format!("node {} at {NODE_IP}; images: {}", node.name(), node.images().join(", ")));

    step(2, "sish in tuns.sh's role (requested names honoured, the user in the name, no load balancing)");
    let key = SshClientKey::generate(&dir, "pico_ed25519", "ed25519")?;
    let server = TunnelServer::start(ServerKind::Sish(SishOptions::default()), &[&key]).await?;
    let http_port = server.http_port().ok_or("sish has no HTTP port")?;
    // Pods dial the node's address; the ground relays that port to sish on the host's loopback.
    node.bridge(server.ssh_port())?;
    let known_hosts = dir.join("known_hosts");
    std::fs::write(&known_hosts, format!("[{NODE_IP}]:{} {}\n", server.ssh_port(), server.host_key()))?;
    info(format!(
        "sish: ssh {} (pods: {NODE_IP}:{})  http 127.0.0.1:{http_port}",
        server.ssh_addr(),
        server.ssh_port()
    ));

    step(3, "picotun webhook (certificates from `picotun certs`) and its MutatingWebhookConfiguration");
    let certs = dir.join("webhook-certs");
    let out = Command::new(picotun())
        .args(["certs", "--out-dir", certs.to_str().unwrap(), "--ip", &NODE_IP.to_string()])
        .output()?;
    if !out.status.success() {
        return Err(format!("picotun certs: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    // /mutate for the apiserver on loopback; /report for the sidecars on a port of its own,
    // bridged to the node's address.
    let webhook_port = free_port();
    let agent_port = free_port();
    node.bridge(agent_port)?;
    let webhook_admin = format!("127.0.0.1:{}", free_port());
    let report_url = format!("https://{NODE_IP}:{agent_port}/report");
    let mut cmd = Command::new(picotun());
    cmd.args(["webhook", "--listen", &format!("127.0.0.1:{webhook_port}"), "--admin-addr", &webhook_admin])
        .args(["--agent-listen", &format!("127.0.0.1:{agent_port}")])
        .args([
            "--cert-file",
            certs.join("tls.crt").to_str().unwrap(),
            "--key-file",
            certs.join("tls.key").to_str().unwrap(),
        ])
        .args(["--namespace", "pico-sh-system", "--sidecar-image", PICOTUN_IMAGE, "--inject-route-backends"])
        .args(["--server", &NODE_IP.to_string(), "--server-port", &server.ssh_port().to_string(), "--dialect", "sish"])
        .args(["--user", "alice", "--sidecar-known-hosts-file", known_hosts.to_str().unwrap()])
        .args(["--agent-report-url", &report_url, "--agent-report-ca-file", certs.join("ca.crt").to_str().unwrap()])
        // Stock sish takes keys only (tuns.sh also takes certificates from a CA the account
        // registered, deploy/'s default): the sidecar mounts the key Secret of its namespace.
        .args(["--sidecar-auth", "key", "--server-domain", picotun_testground::tunnels::SISH_DOMAIN])
        .env("KUBECONFIG", &kubeconfig);
    // picotun's namespace, where the webhook keeps the key its injection tickets are signed with.
    kubectl(&kubeconfig, &["create", "namespace", "pico-sh-system"])?;
    let mut webhook = Proc::spawn("picotun-webhook", cmd, &dir.join("webhook.log"))?;
    wait_ready(&mut webhook, &webhook_admin, "the webhook").await?;
    let ca = std::fs::read(certs.join("ca.crt"))?;
    let config: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": "picotun-demo"},
        "webhooks": [{
            "name": "inject.tunnels.pico.sh",
            // deploy/ points at the webhook's Service; here the webhook runs on the host, and the
            // apiserver calls it on loopback.
            "clientConfig": {"url": format!("https://127.0.0.1:{webhook_port}/mutate"),
                             "caBundle": base64::engine::general_purpose::STANDARD.encode(&ca)},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "scope": "Namespaced"}],
            "namespaceSelector": {"matchLabels": {"tunnels.pico.sh/injection": "enabled"}},
            "sideEffects": "None", "admissionReviewVersions": ["v1"], "failurePolicy": "Ignore",
            "reinvocationPolicy": "IfNeeded", "timeoutSeconds": 5,
        }],
    }))?;
    Api::<MutatingWebhookConfiguration>::all(client.clone()).create(&PostParams::default(), &config).await?;
    info(format!("listening on 127.0.0.1:{webhook_port}; sidecars report to {report_url}"));

    step(4, "picotun controller");
    let controller_admin = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(picotun());
    cmd.args(["controller", "--admin-addr", &controller_admin, "--namespace", "pico-sh-system", "--identity", "demo"])
        .env("KUBECONFIG", &kubeconfig);
    let mut controller = Proc::spawn("picotun-controller", cmd, &dir.join("controller.log"))?;
    wait_ready(&mut controller, &controller_admin, "the controller").await?;
    info(format!("ready; metrics on http://{controller_admin}/metrics"));

    step(5, "kubectl apply: the IngressClass, the key Secret, and examples/ingress/");
    info(kubectl(&kubeconfig, &["apply", "-f", "deploy/base/classes.yaml"])?.trim());
    info(kubectl(&kubeconfig, &["apply", "-f", "examples/ingress/namespace.yaml"])?.trim());
    let key_path = key.private_key.to_str().unwrap().to_string();
    info(
        kubectl(
            &kubeconfig,
            &[
                "-n",
                NAMESPACE,
                "create",
                "secret",
                "generic",
                "picotun-ssh-key",
                "--type=kubernetes.io/ssh-auth",
                &format!("--from-file=ssh-privatekey={key_path}"),
            ],
        )?
        .trim(),
    );
    info(kubectl(&kubeconfig, &["apply", "-k", "examples/ingress/"])?);

    step(6, "the kubelet runs the app and the injected picotun-agent sidecar");
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let ready =
        wait_for("2 Ready pods of example-app", Duration::from_secs(90), Duration::from_millis(250), || async {
            let list = pods.list(&ListParams::default().labels(APP_LABEL)).await.map_err(|e| e.to_string())?;
            let ready: Vec<Pod> = list.items.into_iter().filter(is_ready).collect();
            Ok((ready.len() == 2).then_some(ready))
        })
        .await?;
    info(kubectl(&kubeconfig, &["-n", NAMESPACE, "get", "pods", "-o", "wide"])?);

    step(7, "the public address, as sish assigned it, in the Ingress status");
    let ingresses: Api<Ingress> = Api::namespaced(client.clone(), NAMESPACE);
    let host =
        wait_for("an address in the Ingress status", Duration::from_secs(60), Duration::from_millis(250), || async {
            let ing = ingresses.get("example-app").await.map_err(|e| e.to_string())?;
            Ok(ing
                .status
                .and_then(|s| s.load_balancer)
                .and_then(|l| l.ingress)
                .and_then(|i| i.first()?.hostname.clone()))
        })
        .await;
    let host = match host {
        Ok(h) => h,
        Err(e) => {
            let mut logs = String::new();
            for p in &ready {
                let name = p.metadata.name.clone().unwrap_or_default();
                logs += &kubectl(&kubeconfig, &["-n", NAMESPACE, "logs", &name, "-c", "picotun-agent", "--tail=15"])
                    .unwrap_or_else(|e| e.to_string());
            }
            return Err(format!("{e}; the sidecars' logs:\n{logs}").into());
        }
    };
    info(kubectl(&kubeconfig, &["-n", NAMESPACE, "get", "ingress", "example-app"])?);
    let first = ready[0].metadata.name.clone().unwrap_or_default();
    info(format!("kubectl -n {NAMESPACE} logs {first} -c picotun-agent"));
    info(kubectl(&kubeconfig, &["-n", NAMESPACE, "logs", &first, "-c", "picotun-agent", "--tail=6"])?);

    step(8, &format!("GET http://{host}/ through sish (127.0.0.1:{http_port})"));
    let body =
        wait_for("an answer through the tunnel", Duration::from_secs(30), Duration::from_millis(200), || async {
            match http::get(&format!("127.0.0.1:{http_port}"), &host, "/").await {
                Ok(r) if r.status == 200 => Ok(Some(r.body)),
                Ok(r) => Err(format!("{} {:?}", r.status, r.body)),
                Err(e) => Err(e.to_string()),
            }
        })
        .await?;
    info(format!("200 {:?}", body.trim()));
    if body.trim() != "hello from example-app" {
        return Err(format!("expected \"hello from example-app\" through the tunnel, got {body:?}").into());
    }
    eprintln!(
        "\n[demo] OK in {:.0}s: https://{{user}}-demo.tuns.sh is, here, http://{host} on 127.0.0.1:{http_port}",
        started.elapsed().as_secs_f32()
    );
    eprintln!("[demo] try: curl -H 'Host: {host}' http://127.0.0.1:{http_port}/");
    if check {
        return Ok(());
    }
    eprintln!("[demo] KUBECONFIG={} kubectl get pods,ingress -A   -- Ctrl-C stops everything", kubeconfig.display());
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = int.recv() => {},
        _ = term.recv() => {},
    }
    eprintln!("[demo] stopping");
    Ok(())
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}
