//! Certificate mode on the real node: the injected sidecar -- the image's binary, read-only root,
//! no Secret mounted -- makes its own key, gets a short certificate from the webhook with its
//! pod-bound token, logs in to OpenSSH sshd trusting picotun's CA for principal `tuns` (stock sish
//! and sandhole take keys only), renews it, and carries visitors. A sidecar a pod author wrote
//! himself, with the same container name and token, gets no certificate.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use picotun_testground::node::{NODE_IP, PICOTUN_IMAGE};
use picotun_testground::tunnels::SshdOptions;
use picotun_testground::{TunnelServer, free_port, http, random_suffix, wait_for};
use serde_json::{Value, json};

use crate::support::{
    self, HostWebhook, STACK_LABEL, WebhookServer, container_pid, get_in_node, kubectl, root_mount_options,
};

const AGENT: &str = "picotun-agent";
/// Short, so the test sees a renewal (at two thirds of it).
const VALIDITY_SECONDS: u64 = 30;

/// The sidecar's /status, read at the pod's address inside the node.
fn sidecar_status(ground: &picotun_testground::ControlPlane, pod: &Pod) -> Option<Value> {
    let ip = pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()?;
    let (code, body) =
        get_in_node(ground, SocketAddr::new(ip, picotun::core::api::DEFAULT_SIDECAR_ADMIN_PORT), "/status").ok()?;
    (code == 200).then(|| serde_json::from_str(&body).ok()).flatten()
}

/// One HTTP GET through the forward sshd holds on host loopback.
fn get_through_forward(port: u16) -> std::io::Result<String> {
    let mut conn = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(3))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    Ok(answer)
}

fn echo_container(text: &str) -> Value {
    json!({"name": "app", "image": "docker.io/hashicorp/http-echo:1.0", "args": [format!("-text={text}")],
           "ports": [{"containerPort": 5678}],
           "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "allowPrivilegeEscalation": false,
                               "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}})
}

#[tokio::test]
#[ignore = "needs the test ground with a real node (scripts/build-testground, scripts/build-node-images)"]
async fn a_sidecar_logs_in_with_a_certificate_of_its_own_key_and_a_forged_sidecar_gets_none() {
    let ground = support::ground().await;
    let client = ground.client().await.unwrap();
    let node = support::node(ground);
    let work = tempfile::Builder::new().prefix("picotun-node-cert-").tempdir().unwrap();
    let dir = work.path();
    let scope = random_suffix();

    // The CA as a user makes it: `picotun ca create | kubectl apply`, here under a name of this
    // test's; the webhook on the host reads what a mount of that Secret would show.
    let _ = support::try_kubectl(ground, &["create", "namespace", "pico-sh-system"]);
    let secret = format!("picotun-ssh-ca-{scope}");
    let ca = Command::new(support::picotun()).args(["ca", "create", "--name", &secret]).output().unwrap();
    assert!(ca.status.success(), "picotun ca create: {}", String::from_utf8_lossy(&ca.stderr));
    let instructions = String::from_utf8_lossy(&ca.stderr);
    assert!(!instructions.contains("PRIVATE KEY"), "the private key goes to stdout only:\n{instructions}");
    let mut apply = Command::new(picotun_testground::bins::bin_dir().join("kubectl"))
        .args(["apply", "--server-side", "-f", "-"])
        .env("KUBECONFIG", ground.kubeconfig())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    apply.stdin.take().unwrap().write_all(&ca.stdout).unwrap();
    assert!(apply.wait().unwrap().success(), "kubectl apply of the CA Secret");
    let ca_dir = dir.join("ssh-ca");
    std::fs::create_dir_all(&ca_dir).unwrap();
    for key in ["ca", "ca.pub"] {
        let jsonpath = format!("jsonpath={{.data.{}}}", key.replace('.', "\\."));
        let b64 = kubectl(ground, &["-n", "pico-sh-system", "get", "secret", &secret, "-o", &jsonpath]);
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64.trim()).unwrap();
        std::fs::write(ca_dir.join(key), bytes).unwrap();
    }
    let ca_public = std::fs::read_to_string(ca_dir.join("ca.pub")).unwrap();
    assert!(instructions.contains(ca_public.trim()), "stderr says what to register with pico.sh");

    // sshd trusting that CA for principal `tuns`, with no authorized keys at all.
    let sshd = TunnelServer::start_sshd(
        &SshdOptions { trusted_user_ca_keys: vec![ca_public.trim().to_string()], authorized_principals: vec![] },
        &[],
    )
    .await
    .unwrap();
    node.bridge(sshd.ssh_port()).unwrap();
    let known_hosts = dir.join("known_hosts");
    std::fs::write(&known_hosts, format!("[{NODE_IP}]:{} {}\n", sshd.ssh_port(), sshd.host_key())).unwrap();
    let user = sshd.login_user("tuns");
    let validity = format!("{VALIDITY_SECONDS}s");
    let webhook = HostWebhook::start(
        ground,
        dir,
        &WebhookServer { port: sshd.ssh_port(), dialect: "openssh", user: &user, known_hosts: &known_hosts },
        &[
            "--sidecar-auth",
            "certificate",
            "--ssh-ca-dir",
            ca_dir.to_str().unwrap(),
            "--certificate-validity",
            &validity,
        ],
    )
    .await;
    let config = webhook.register(ground, &scope).await;

    let ns = ground.namespace("cert").await.unwrap().name().to_string();
    kubectl(
        ground,
        &["label", "namespace", &ns, "tunnels.pico.sh/injection=enabled", &format!("{STACK_LABEL}={scope}")],
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);

    // 1. An injected pod: its sidecar's certificate logs in, and visitors reach the app.
    let public_port = free_port();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "web", "labels": {"app": "web"},
                     "annotations": {"tunnels.pico.sh/inject": "true",
                                     "tunnels.pico.sh/expose": format!("tcp:{public_port}=5678")}},
        "spec": {"containers": [echo_container("hello through a certificate")]},
    }))
    .unwrap();
    let created = Instant::now();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let pod = support::ready_pods(&pods, "app=web", 1, Duration::from_secs(60)).await.remove(0);
    let spec = pod.spec.as_ref().unwrap();
    assert!(
        spec.volumes.iter().flatten().all(|v| v.secret.is_none()),
        "certificate mode mounts no Secret: {:?}",
        spec.volumes
    );
    let annotations = pod.metadata.annotations.as_ref().unwrap();
    assert!(annotations.contains_key("tunnels.pico.sh/injected"), "the webhook recorded what it injected");

    let answer = wait_for(
        "GET through the certificate's forward",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            match get_through_forward(public_port) {
                Ok(a) if a.contains("hello through a certificate") => Ok(Some(a)),
                Ok(a) => Err(a),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\nsshd:\n{}\nwebhook:\n{}", sshd.log_tail(20), webhook.proc.log_tail(20)));
    println!(
        "visitor answered {:.2}s after the pod was created: {:?}",
        created.elapsed().as_secs_f32(),
        answer.lines().last()
    );
    let status = sidecar_status(ground, &pod).expect("the sidecar's /status");
    let first = status["certificate"].clone();
    println!("sidecar certificate: {first}");
    assert_eq!(first["keyId"], format!("{ns}/web"));
    assert_eq!(first["principals"], json!(["tuns"]));
    let login = sshd.log_tail(200);
    assert!(login.contains(&format!("ID {ns}/web")), "sshd saw the pod's certificate:\n{login}");

    // The sidecar container: read-only root, no key anywhere in its file system.
    let pid = container_pid(&pod, AGENT).expect("the sidecar's process");
    let root = root_mount_options(pid);
    assert!(root.split(',').any(|o| o == "ro"), "the sidecar's root is read-only: {root}");
    assert!(!support::in_container(pid, "/etc/picotun/ssh").exists(), "no key directory in the sidecar");

    // 2. Renewal: before the first certificate expires the sidecar has a new one, and visitors
    // are still served.
    let renewed = wait_for(
        "a renewed certificate",
        Duration::from_secs(VALIDITY_SECONDS + 15),
        Duration::from_millis(500),
        || async {
            let now = sidecar_status(ground, &pod).map(|s| s["certificate"].clone());
            match now {
                Some(c) if c["validBefore"] != first["validBefore"] && !c.is_null() => Ok(Some(c)),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await
    .unwrap();
    println!("renewed: {renewed} (first valid before {})", first["validBefore"]);
    assert!(renewed["validBefore"].as_u64() > first["validBefore"].as_u64());
    let again = get_through_forward(public_port).unwrap();
    assert!(again.contains("hello through a certificate"), "{again}");

    // 3. A sidecar the pod author wrote himself -- the container name, the image, the env and a
    // projected token of the audience -- in a pod that opted out of injection: no certificate.
    let forged_port = free_port();
    let report_env = webhook_sidecar_env(&pods, "web").await;
    let forged: Pod = serde_json::from_value(json!({
        "metadata": {"name": "forged", "labels": {"app": "forged"},
                     "annotations": {"tunnels.pico.sh/inject": "false",
                                     "tunnels.pico.sh/tunnels": json!({"tunnels": [{"name": "tcp-x", "kind": "tcp",
                                         "remotePort": forged_port, "targetPort": 5678}]}).to_string()}},
        "spec": {
            "containers": [echo_container("forged"), {
                "name": AGENT, "image": PICOTUN_IMAGE, "imagePullPolicy": "IfNotPresent", "args": ["agent"],
                "env": report_env,
                "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "allowPrivilegeEscalation": false,
                                    "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]},
                                    "seccompProfile": {"type": "RuntimeDefault"}},
                "volumeMounts": [{"name": "tunnels", "mountPath": "/etc/picotun/tunnels", "readOnly": true},
                                 {"name": "token", "mountPath": "/var/run/secrets/tunnels.pico.sh/report", "readOnly": true}],
            }],
            "volumes": [
                {"name": "tunnels", "downwardAPI": {"items": [{"path": "tunnels.json",
                    "fieldRef": {"fieldPath": "metadata.annotations['tunnels.pico.sh/tunnels']"}}]}},
                {"name": "token", "projected": {"defaultMode": 0o444, "sources": [{"serviceAccountToken":
                    {"audience": "tunnels.pico.sh", "expirationSeconds": 3600, "path": "token"}}]}},
            ],
        },
    }))
    .unwrap();
    pods.create(&PostParams::default(), &forged).await.unwrap();
    let forged = support::ready_pods(&pods, "app=forged", 1, Duration::from_secs(60)).await.remove(0);
    let refusal =
        wait_for("the forged sidecar's refusal", Duration::from_secs(30), Duration::from_millis(300), || async {
            let status = sidecar_status(ground, &forged);
            match status.as_ref().map(|s| s["credentialError"].clone()) {
                Some(Value::String(e)) if !e.is_empty() => Ok(Some(e)),
                other => Err(format!("{other:?}")),
            }
        })
        .await
        .unwrap();
    println!("forged sidecar: {refusal}");
    assert!(refusal.contains("403"), "{refusal}");
    assert!(get_through_forward(forged_port).is_err(), "the forged sidecar opened nothing");
    let metrics = http::get(&webhook.admin, "w", "/metrics").await.unwrap().body;
    let certificates: Vec<&str> =
        metrics.lines().filter(|l| l.starts_with("picotun_webhook_certificates_total")).collect();
    println!("{}", certificates.join("\n"));
    assert!(!sshd.log_tail(400).contains(&format!("ID {ns}/forged")), "no login as the forged pod");

    let _ = Api::<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration>::all(client.clone())
        .delete(&config, &DeleteParams::default())
        .await;
    let _ = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), "pico-sh-system")
        .delete(&secret, &DeleteParams::default())
        .await;
    support::delete_namespace(ground, &ns).await;
}

/// The env the webhook gave the injected sidecar of `pod`: what a forger would copy.
async fn webhook_sidecar_env(pods: &Api<Pod>, pod: &str) -> Value {
    let pod = pods.get(pod).await.unwrap();
    let spec = pod.spec.unwrap();
    let sidecar = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .find(|c| c.name == AGENT)
        .expect("the injected sidecar")
        .clone();
    serde_json::to_value(sidecar.env.unwrap_or_default()).unwrap()
}
