//! `demo [--check]`: picotun end to end on one machine. Brings up the test ground, a local
//! tunnel server in tuns.sh's role, the webhook and the controller; applies `examples/ingress/`;
//! runs each injected pod's sidecar as a local process with exactly the arguments, environment
//! and files the webhook gave that pod (kwok runs no containers); and fetches the public URL
//! through the tunnel server. `--check` exits with a status instead of running until Ctrl-C.
//!
//! Run it through `scripts/demo`, which builds what it needs first.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Container, Pod, Secret, Volume};
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{Api, ListParams, PostParams};
use picotun_testground::kube_ground::StartOptions;
use picotun_testground::{
    ControlPlane, Error, Proc, ServerKind, SishOptions, SshClientKey, TunnelServer, bins, free_port, http, wait_for,
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

    step(1, "test ground: etcd, kube-apiserver, controller-manager, scheduler, kwok (2 fake nodes)");
    let plane = ControlPlane::start(StartOptions { keep_dir: false, dir: None }).await?;
    let kubeconfig = plane.kubeconfig().to_path_buf();
    let client = plane.client().await?;
    info(format!("ready after {:.1}s; KUBECONFIG={}", started.elapsed().as_secs_f32(), kubeconfig.display()));

    step(2, "a local tunnel server in tuns.sh's role");
    let key = SshClientKey::generate(&dir, "pico_ed25519", "ed25519")?;
    let (server, dialect) = match TunnelServer::start(ServerKind::Sish(SishOptions::default()), &[&key]).await {
        Ok(s) => (s, "sish"),
        Err(Error::MissingBinary { .. }) => {
            info(
                "sish cannot be built here (the Go module proxy refuses it; see docs/TESTING.md): using sandhole, another real SSH tunnel server",
            );
            (TunnelServer::start(ServerKind::Sandhole(Default::default()), &[&key]).await?, "sandhole")
        }
        Err(e) => return Err(e.into()),
    };
    let http_port = server.http_port().ok_or("the tunnel server has no HTTP port")?;
    info(format!("{dialect}: ssh {}  http 127.0.0.1:{http_port}", server.ssh_addr()));

    step(3, "picotun webhook (certificates from `picotun certs`) and its MutatingWebhookConfiguration");
    let certs = dir.join("webhook-certs");
    let out = Command::new(picotun()).args(["certs", "--out-dir", certs.to_str().unwrap()]).output()?;
    if !out.status.success() {
        return Err(format!("picotun certs: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let webhook_port = free_port();
    let webhook_admin = format!("127.0.0.1:{}", free_port());
    let report_url = format!("https://127.0.0.1:{webhook_port}/report");
    let mut cmd = Command::new(picotun());
    cmd.args(["webhook", "--listen", &format!("127.0.0.1:{webhook_port}"), "--admin-addr", &webhook_admin])
        .args([
            "--cert-file",
            certs.join("tls.crt").to_str().unwrap(),
            "--key-file",
            certs.join("tls.key").to_str().unwrap(),
        ])
        .args(["--namespace", "pico-sh-system", "--sidecar-image", "picotun:demo", "--inject-route-backends"])
        .args(["--server", "127.0.0.1", "--server-port", &server.ssh_port().to_string(), "--dialect", dialect])
        .args(["--user", "demo", "--sidecar-known-hosts-file", server.known_hosts().to_str().unwrap()])
        .args(["--agent-report-url", &report_url, "--agent-report-ca-file", certs.join("ca.crt").to_str().unwrap()])
        .env("KUBECONFIG", &kubeconfig);
    let mut webhook = Proc::spawn("picotun-webhook", cmd, &dir.join("webhook.log"))?;
    wait_ready(&mut webhook, &webhook_admin, "the webhook").await?;
    let ca = std::fs::read(certs.join("ca.crt"))?;
    let config: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": "picotun-demo"},
        "webhooks": [{
            "name": "inject.tunnels.pico.sh",
            // deploy/ points at the webhook's Service; here the apiserver calls it on loopback.
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
    kubectl(&kubeconfig, &["create", "namespace", "pico-sh-system"])?;
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

    step(6, "the injected pods (kwok reports them Running; it runs no containers)");
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let running =
        wait_for("2 Running pods of example-app", Duration::from_secs(60), Duration::from_millis(250), || async {
            let list = pods.list(&ListParams::default().labels(APP_LABEL)).await.map_err(|e| e.to_string())?;
            let running: Vec<Pod> = list
                .items
                .into_iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .filter(|p| p.metadata.annotations.as_ref().is_some_and(|a| a.contains_key("tunnels.pico.sh/tunnels")))
                .collect();
            Ok((running.len() == 2).then_some(running))
        })
        .await?;
    // The controller writes each pod's tunnels once it has resolved the Ingress.
    for p in &running {
        let name = p.metadata.name.clone().unwrap_or_default();
        let tunnels =
            wait_for(&format!("tunnels on {name}"), Duration::from_secs(30), Duration::from_millis(200), || async {
                let p = pods.get(&name).await.map_err(|e| e.to_string())?;
                let t =
                    p.metadata.annotations.unwrap_or_default().remove("tunnels.pico.sh/tunnels").unwrap_or_default();
                Ok(t.contains("\"host\"").then_some(t))
            })
            .await?;
        info(format!("{name}: tunnels.pico.sh/tunnels = {tunnels}"));
    }

    step(7, "the app and the sidecars, as local processes with what the webhook gave each pod");
    let app = http::Backend::start_on(5678, "example-app").await?;
    info(format!("app: {} on 127.0.0.1:{}", app.greeting().trim(), app.port()));
    let mut sidecars = Vec::new();
    for p in &running {
        let pod = pods.get(p.metadata.name.as_deref().unwrap_or_default()).await?;
        sidecars.push(Sidecar::start(&client, &pod, &dir).await?);
    }

    step(8, "the public address, as the tunnel server assigned it, in the Ingress status");
    let ingresses: Api<Ingress> = Api::namespaced(client.clone(), NAMESPACE);
    let deadline = Instant::now() + Duration::from_secs(60);
    let host = loop {
        for s in &mut sidecars {
            s.refresh().await;
        }
        let ing = ingresses.get("example-app").await?;
        if let Some(h) =
            ing.status.and_then(|s| s.load_balancer).and_then(|l| l.ingress).and_then(|i| i.first()?.hostname.clone())
        {
            break h;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = sidecars.iter().map(|s| s.proc.log_tail(15)).collect();
            return Err(format!(
                "no address in the Ingress status after 60 s; sidecar logs:\n{}",
                logs.join("\n---\n")
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    info(kubectl(&kubeconfig, &["-n", NAMESPACE, "get", "ingress", "example-app"])?);

    step(9, &format!("GET http://{host}/ through the tunnel server (127.0.0.1:{http_port})"));
    let body =
        wait_for("an answer through the tunnel", Duration::from_secs(30), Duration::from_millis(200), || async {
            match http::get(&format!("127.0.0.1:{http_port}"), &host, "/").await {
                Ok(r) if r.status == 200 => Ok(Some(r.body)),
                _ => Ok(None),
            }
        })
        .await?;
    info(format!("200 {:?}", body.trim()));
    if body != app.greeting() {
        return Err(format!("expected {:?} through the tunnel, got {body:?}", app.greeting()).into());
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
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = int.recv() => break,
            _ = term.recv() => break,
            _ = tick.tick() => for s in &mut sidecars { s.refresh().await; },
        }
    }
    eprintln!("[demo] stopping");
    Ok(())
}

/// One pod's sidecar run locally: its volumes materialised as files under a directory of its
/// own, its container paths rewritten to point there, and the downward-API tunnels file kept
/// current from the pod's annotation (what the kubelet does).
struct Sidecar {
    pods: Api<Pod>,
    pod: String,
    tunnels_file: Option<(PathBuf, String)>,
    proc: Proc,
}

impl Sidecar {
    async fn start(client: &kube::Client, pod: &Pod, dir: &Path) -> Result<Sidecar, Box<dyn std::error::Error>> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let spec = pod.spec.as_ref().ok_or("pod without spec")?;
        let container: &Container = spec
            .init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter())
            .find(|c| c.name == "picotun-agent")
            .ok_or_else(|| format!("pod {name} has no picotun-agent sidecar: was it injected?"))?;
        let root = dir.join(&name);
        let mut mounts: BTreeMap<String, PathBuf> = BTreeMap::new();
        let mut tunnels_file = None;
        for m in container.volume_mounts.iter().flatten() {
            let volume: &Volume =
                spec.volumes.iter().flatten().find(|v| v.name == m.name).ok_or("a mount without its volume")?;
            let local = root.join(&m.name);
            std::fs::create_dir_all(&local)?;
            if let Some(d) = &volume.downward_api {
                for item in d.items.iter().flatten() {
                    let field = item.field_ref.as_ref().map(|f| f.field_path.clone()).unwrap_or_default();
                    let key = field.trim_start_matches("metadata.annotations['").trim_end_matches("']").to_string();
                    let value =
                        pod.metadata.annotations.as_ref().and_then(|a| a.get(&key)).cloned().unwrap_or_default();
                    let path = local.join(&item.path);
                    std::fs::write(&path, &value)?;
                    tunnels_file = Some((path, key));
                }
            }
            if let Some(s) = &volume.secret {
                let secret_name = s.secret_name.clone().unwrap_or_default();
                let secret = Api::<Secret>::namespaced(client.clone(), &namespace).get(&secret_name).await?;
                let data = secret.data.unwrap_or_default();
                for item in s.items.iter().flatten() {
                    let value =
                        data.get(&item.key).ok_or_else(|| format!("Secret {secret_name} has no {}", item.key))?;
                    std::fs::write(local.join(&item.path), &value.0)?;
                }
            }
            if let Some(p) = &volume.projected {
                for source in p.sources.iter().flatten() {
                    if let Some(t) = &source.service_account_token {
                        // A token bound to this pod, as the kubelet would mount it.
                        let request: TokenRequest = serde_json::from_value(json!({"spec": {
                            "audiences": t.audience.iter().collect::<Vec<_>>(),
                            "expirationSeconds": t.expiration_seconds.unwrap_or(3600),
                            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": name, "uid": pod.metadata.uid},
                        }}))?;
                        let sa = spec.service_account_name.clone().unwrap_or_else(|| "default".into());
                        let api: Api<k8s_openapi::api::core::v1::ServiceAccount> =
                            Api::namespaced(client.clone(), &namespace);
                        let token: TokenRequest =
                            api.create_subresource("token", &sa, &PostParams::default(), &request).await?;
                        let token = token.status.and_then(|s| s.token).unwrap_or_default();
                        std::fs::write(local.join(&t.path), token)?;
                    }
                }
            }
            mounts.insert(m.mount_path.clone(), local);
        }
        let rewrite = |s: &str| -> String {
            mounts
                .iter()
                .fold(s.to_string(), |acc, (from, to)| acc.replace(from.as_str(), to.to_str().unwrap_or_default()))
        };
        let admin = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(picotun());
        cmd.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
        cmd.args(container.args.iter().flatten().map(|a| rewrite(a)));
        for e in container.env.iter().flatten() {
            if let Some(v) = &e.value {
                cmd.env(&e.name, rewrite(v));
            }
        }
        // Every pod has its own network namespace in a cluster; here they share loopback.
        cmd.env("PICOTUN_ADMIN_ADDR", &admin);
        let shown: Vec<String> = container.args.iter().flatten().cloned().collect();
        info(format!("{name}: picotun {} (admin {admin})", shown.join(" ")));
        let proc = Proc::spawn(&format!("sidecar-{name}"), cmd, &root.join("agent.log"))?;
        Ok(Sidecar { pods: Api::namespaced(client.clone(), &namespace), pod: name, tunnels_file, proc })
    }

    /// Copies the pod's annotation into its downward-API file when it changed.
    async fn refresh(&mut self) {
        let Some((path, key)) = &self.tunnels_file else { return };
        let Ok(pod) = self.pods.get(&self.pod).await else { return };
        let value = pod.metadata.annotations.and_then(|mut a| a.remove(key)).unwrap_or_default();
        if std::fs::read_to_string(path).ok().as_deref() != Some(value.as_str()) {
            let _ = std::fs::write(path, value);
        }
    }
}
