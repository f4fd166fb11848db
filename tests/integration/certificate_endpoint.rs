//! `POST /certificate` on the real `picotun webhook`: the CA made by `picotun ca create` and
//! applied as a user applies it, a pod the webhook injected through the real apiserver, its token
//! from the TokenRequest API bound to it as the kubelet asks for it, and a key made for the call.
//! What must be refused is refused, with its reason.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DeleteParams, PostParams};
use picotun::sshca::{self, SshCa};
use picotun_testground::{ControlPlane, Existing, wait_for};
use serde_json::{Value, json};

use crate::report::{AUDIENCE, token};
use crate::support::{Webhook, WebhookOptions, label_for_injection, pod_json, sidecar_of, wait_active};

impl Webhook {
    /// POST /certificate (the sidecars' port); (status, body of the answer).
    pub(crate) async fn certificate(&self, token: Option<&str>, content_type: &str, body: &str) -> (u16, String) {
        let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        let (status, text) = self.agent_post("/certificate", content_type, &auth, body.as_bytes()).await;
        (status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
    }
}

/// A key as a sidecar makes it: ed25519, in memory; the public line is what it sends.
fn pod_key() -> SshCa {
    SshCa::generate("pod-key")
}

fn request(key: &SshCa) -> String {
    json!({"publicKey": key.public_line()}).to_string()
}

/// `picotun ca create`, its manifest applied to the cluster (under a name of this test's), and
/// the Secret's keys written into `dir` as the kubelet mounts a Secret: `ca` and `ca.pub`.
async fn ca_secret_mounted(client: &kube::Client, dir: &Path) -> (SshCa, String) {
    let name = format!("picotun-ssh-ca-{}", picotun_testground::random_suffix());
    let out = Command::new(env!("CARGO_BIN_EXE_picotun"))
        .args(["ca", "create", "--namespace", "pico-sh-system", "--name", &name])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!stderr.contains("PRIVATE KEY"), "the key is never on stderr: {stderr}");
    let secret: Secret = serde_saphyr::from_slice(&out.stdout).unwrap();
    crate::support::own_namespace(client).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "pico-sh-system");
    secrets.create(&PostParams::default(), &secret).await.unwrap();
    let stored = secrets.get(&name).await.unwrap();
    let data = stored.data.unwrap();
    std::fs::create_dir_all(dir).unwrap();
    for key in ["ca", "ca.pub"] {
        std::fs::write(dir.join(key), &data[key].0).unwrap();
    }
    let ca = SshCa::from_openssh(std::str::from_utf8(&data["ca"].0).unwrap()).unwrap();
    assert!(stderr.contains(&ca.public_line()), "stderr names the public line to register: {stderr}");
    assert_eq!(std::str::from_utf8(&data["ca.pub"].0).unwrap(), ca.public_line());
    (ca, name)
}

/// A namespace labeled for injection, a webhook in certificate mode registered for it.
async fn certificate_webhook(
    ground: &'static ControlPlane,
    prefix: &str,
    ca_dir: &Path,
    args: &[&str],
) -> (picotun_testground::kube_ground::TestNamespace, Webhook, Api<Pod>) {
    let client = ground.client().await.unwrap();
    let ns = ground.namespace(prefix).await.unwrap();
    label_for_injection(&client, ns.name()).await;
    let options = WebhookOptions {
        certificate_ca_dir: Some(ca_dir.to_path_buf()),
        args: args.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    };
    let mut webhook = Webhook::start_with(Some(ground), options).await;
    webhook.register(&client, &[ns.name()], true).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    wait_active(&pods).await;
    (ns, webhook, pods)
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn a_pod_the_webhook_injected_gets_a_certificate_for_its_own_key() {
    let ground = ControlPlane::shared(Existing::Allowed).await.unwrap();
    let client = ground.client().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (ca, secret_name) = ca_secret_mounted(&client, &dir.path().join("ssh-ca")).await;
    let (ns, webhook, pods) = certificate_webhook(
        ground,
        "certificate",
        &dir.path().join("ssh-ca"),
        &["--certificate-validity", "90m", "--certificate-principal", "tuns"],
    )
    .await;

    // Injected in certificate mode: the certificate URL, no key Secret anywhere in the pod.
    let pod = pods
        .create(&PostParams::default(), &pod_json("web", json!({"tunnels.pico.sh/inject": "true"}), json!({})))
        .await
        .unwrap();
    let sidecar = sidecar_of(&pod).expect("injected");
    let env: Vec<(&str, &str)> =
        sidecar.env.iter().flatten().map(|e| (e.name.as_str(), e.value.as_deref().unwrap_or(""))).collect();
    assert!(env.contains(&("PICOTUN_CERTIFICATE_URL", format!("https://{}/certificate", webhook.agent_addr).as_str())));
    assert!(env.iter().all(|(k, _)| *k != "PICOTUN_KEY_FILE"), "{env:?}");
    let text = serde_json::to_string(&pod).unwrap();
    assert!(!text.contains("picotun-ssh-key") && !text.contains("ssh-privatekey"), "no key Secret: {text}");
    assert!(pod.metadata.annotations.as_ref().unwrap()["tunnels.pico.sh/injected"].starts_with("v1."));
    // The apiserver mounts the pod's API token into every container without a mount at its path
    // when it re-runs its plugins (after the webhook changed the pod): the sidecar holds that
    // path with an empty volume of its own, so no API token reaches it.
    let mounts: Vec<(&str, &str)> =
        sidecar.volume_mounts.iter().flatten().map(|m| (m.mount_path.as_str(), m.name.as_str())).collect();
    assert_eq!(
        mounts,
        [
            ("/etc/picotun/tunnels", "picotun-tunnels"),
            ("/var/run/secrets/kubernetes.io/serviceaccount", "picotun-no-api-token"),
            ("/var/run/secrets/tunnels.pico.sh/report", "picotun-report-token")
        ],
        "no API token in the sidecar"
    );
    // ... and says nothing about it: a pod created as a user does gets no warning.
    let manifest = serde_json::to_string(&pod_json("quiet", json!({"tunnels.pico.sh/inject": "true"}), json!({})))
        .unwrap()
        .replace(
            "\"metadata\":{",
            &format!("\"apiVersion\":\"v1\",\"kind\":\"Pod\",\"metadata\":{{\"namespace\":\"{}\",", ns.name()),
        );
    let mut kubectl = Command::new("kubectl")
        .args(["create", "-f", "-"])
        .env("KUBECONFIG", ground.kubeconfig())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut kubectl.stdin.take().unwrap(), manifest.as_bytes()).unwrap();
    let created = kubectl.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&created.stderr);
    assert!(created.status.success() && !stderr.contains("Warning"), "{stderr}");

    // `picotun explain` says how its sidecar authenticates.
    let out = Command::new(env!("CARGO_BIN_EXE_picotun"))
        .args(["explain", "pod/web", "-n", ns.name()])
        .env("KUBECONFIG", ground.kubeconfig())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("auth: a short-lived SSH certificate for a key made in the pod"), "{text}");
    assert!(text.contains("ticket: carries tunnels.pico.sh/injected"), "{text}");

    let bound = token(&client, ns.name(), Some(&pod), AUDIENCE).await;
    let key = pod_key();
    let asked = now();
    let (status, body) = webhook.certificate(Some(&bound), "application/json", &request(&key)).await;
    assert_eq!(status, 200, "{body}\n{}", webhook.proc.log_tail(20));
    let answer: Value = serde_json::from_str(&body).unwrap();
    let line = answer["certificate"].as_str().unwrap();
    assert!(line.starts_with("ssh-ed25519-cert-v01@openssh.com "), "{line}");
    let cert = sshca::parse_certificate(line).unwrap();
    let key_id = format!("{}/web", ns.name());
    assert!(ca.verify(&cert, now()), "signed by the CA from the Secret, valid now");
    assert!(!SshCa::generate("other").verify(&cert, now()), "and by no other");
    assert_eq!(cert.key_id(), key_id);
    assert_eq!(cert.valid_principals(), ["tuns".to_string()]);
    assert_eq!(cert.public_key(), sshca::parse_public_key(&key.public_line()).unwrap().key_data(), "for the pod's key");
    let (after, before) = (cert.valid_after(), cert.valid_before());
    assert!(after <= asked && before >= asked + 90 * 60 && before <= now() + 90 * 60, "{after}..{before}");
    assert_eq!(before - after, 90 * 60 + sshca::CLOCK_SKEW_SECONDS, "--certificate-validity 90m");
    assert_eq!(answer["keyId"], key_id);
    assert_eq!(answer["principals"], json!(["tuns"]));
    assert_eq!((answer["validAfter"].as_u64(), answer["validBefore"].as_u64()), (Some(after), Some(before)));
    eprintln!("certificate for {key_id}: serial {}, valid {after}..{before} ({} s)", cert.serial(), before - after);

    // A second request (a renewal) gets another certificate, for the same pod.
    let (status, body) = webhook.certificate(Some(&bound), "application/json", &request(&pod_key())).await;
    assert_eq!(status, 200, "{body}");
    let renewed =
        sshca::parse_certificate(serde_json::from_str::<Value>(&body).unwrap()["certificate"].as_str().unwrap())
            .unwrap();
    assert_ne!(renewed.serial(), cert.serial());
    assert_eq!(renewed.key_id(), key_id);

    assert_eq!(webhook.metric("picotun_webhook_certificates_total{result=\"issued\"}").await, 2);
    // The log says who got what, and never carries key material or the token.
    let log = std::fs::read_to_string(webhook.proc.log_path()).unwrap();
    let issued: Vec<&str> = log.lines().filter(|l| l.contains("SSH certificate issued")).collect();
    assert_eq!(issued.len(), 2, "{log}");
    let fingerprint = sshca::parse_public_key(&key.public_line()).unwrap().fingerprint(russh::keys::HashAlg::Sha256);
    for want in [key_id.as_str(), &cert.serial().to_string(), &before.to_string(), &fingerprint.to_string()] {
        assert!(issued[0].contains(want), "{want} in {}", issued[0]);
    }
    let cert_blob = line.split_whitespace().nth(1).unwrap();
    let ca_key = base64::engine::general_purpose::STANDARD.encode(ca.to_openssh());
    for secret in [cert_blob, &ca.to_openssh(), &ca_key, &bound, key.public_line().split_whitespace().nth(1).unwrap()] {
        assert!(!log.contains(secret), "the log holds no key material or token");
    }
    webhook.unregister(&client).await;
    let _ = Api::<Secret>::namespaced(client, "pico-sh-system").delete(&secret_name, &DeleteParams::default()).await;
}

#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn certificate_requests_that_must_fail_fail_with_their_reason() {
    let ground = ControlPlane::shared(Existing::Allowed).await.unwrap();
    let client = ground.client().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_, secret_name) = ca_secret_mounted(&client, &dir.path().join("ssh-ca")).await;
    let (ns, webhook, pods) = certificate_webhook(ground, "certificate-refused", &dir.path().join("ssh-ca"), &[]).await;
    let pod = pods
        .create(&PostParams::default(), &pod_json("web", json!({"tunnels.pico.sh/inject": "true"}), json!({})))
        .await
        .unwrap();
    // Not injected: the webhook is not called for this namespace.
    let elsewhere = ground.namespace("certificate-plain").await.unwrap();
    let plain = Api::<Pod>::namespaced(client.clone(), elsewhere.name())
        .create(&PostParams::default(), &pod_json("plain", json!({}), json!({})))
        .await
        .unwrap();

    let good = token(&client, ns.name(), Some(&pod), AUDIENCE).await;
    let unbound = token(&client, ns.name(), None, AUDIENCE).await;
    let wrong_audience = token(&client, ns.name(), Some(&pod), "some-other-service").await;
    let plain_token = token(&client, elsewhere.name(), Some(&plain), AUDIENCE).await;
    let key = request(&pod_key());
    let ecdsa = json!({"publicKey": "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBEnYv9sjpD2gsJO9Pz4bYm0Ahtd0tMt0Fth+2oAQkw8nDzdLxbg16fBJKsgdCUWgEmqsJ9p1KLuWjKKtrD4QIAM="}).to_string();
    let json = "application/json";
    let big = format!(r#"{{"publicKey":"{}"}}"#, "A".repeat(5000));
    for (what, token, content_type, body, want_status, want_text) in [
        ("no token", None, json, key.as_str(), 401, "no bearer token"),
        ("garbage token", Some("not-a-token"), json, key.as_str(), 401, "not accepted"),
        ("wrong audience", Some(wrong_audience.as_str()), json, key.as_str(), 401, "not accepted"),
        ("not bound to a pod", Some(unbound.as_str()), json, key.as_str(), 403, "not bound to a pod"),
        (
            "a pod picotun did not inject",
            Some(plain_token.as_str()),
            json,
            key.as_str(),
            403,
            "no picotun-agent container",
        ),
        ("not JSON", Some(good.as_str()), "text/plain", key.as_str(), 400, "content type must be application/json"),
        ("malformed body", Some(good.as_str()), json, "{not json", 400, "publicKey"),
        ("another field", Some(good.as_str()), json, r#"{"key":"ssh-ed25519 AAAA"}"#, 400, "publicKey"),
        ("not a key", Some(good.as_str()), json, r#"{"publicKey":"hello"}"#, 400, "not an OpenSSH public key"),
        ("not ed25519", Some(good.as_str()), json, ecdsa.as_str(), 400, "ed25519 keys only"),
        ("over 4 KiB", Some(good.as_str()), json, big.as_str(), 413, "over 4096 bytes"),
    ] {
        let (code, text) = webhook.certificate(token, content_type, body).await;
        assert_eq!(code, want_status, "{what}: {text}");
        assert!(text.contains(want_text), "{what}: {text}");
    }
    // The good one, for contrast.
    assert_eq!(webhook.certificate(Some(&good), json, &key).await.0, 200);
    for (result, n) in [("unauthenticated", 3), ("forbidden", 2), ("bad_request", 6), ("issued", 1)] {
        let got = webhook.metric(&format!("picotun_webhook_certificates_total{{result=\"{result}\"}}")).await;
        assert_eq!(got, n, "{result}");
    }
    assert!(!webhook.proc.log_tail(500).contains(&good), "the token is never logged");
    webhook.unregister(&client).await;
    let _ = Api::<Secret>::namespaced(client, "pico-sh-system").delete(&secret_name, &DeleteParams::default()).await;
}

#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn without_a_ca_the_answer_says_how_to_make_one_and_a_ca_added_later_is_used() {
    let ground = ControlPlane::shared(Existing::Allowed).await.unwrap();
    let client = ground.client().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ssh-ca");
    std::fs::create_dir(&ca_dir).unwrap();
    let (ns, mut webhook, pods) = certificate_webhook(ground, "certificate-no-ca", &ca_dir, &[]).await;
    let pod = pods
        .create(&PostParams::default(), &pod_json("web", json!({"tunnels.pico.sh/inject": "true"}), json!({})))
        .await
        .unwrap();
    let bound = token(&client, ns.name(), Some(&pod), AUDIENCE).await;
    let key = request(&pod_key());
    assert_eq!(
        webhook.certificate(Some(&bound), "application/json", &key).await,
        (503, "no SSH CA is configured: create the Secret picotun-ssh-ca with picotun ca create\n".into())
    );
    assert_eq!(webhook.metric("picotun_webhook_certificates_total{result=\"no_ca\"}").await, 1);

    // The Secret appears (the kubelet fills the optional volume): used without a restart.
    let (ca, secret_name) = ca_secret_mounted(&client, &ca_dir).await;
    let signed_by = |ca: &'static SshCa| {
        let (webhook, bound, key) = (&webhook, bound.clone(), key.clone());
        async move {
            let (status, body) = webhook.certificate(Some(&bound), "application/json", &key).await;
            if status != 200 {
                return Err(format!("{status} {body}"));
            }
            let answer: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
            let cert = sshca::parse_certificate(answer["certificate"].as_str().unwrap_or_default())?;
            Ok(ca.verify(&cert, now()).then_some(()))
        }
    };
    let ca: &'static SshCa = Box::leak(Box::new(ca));
    wait_for("a certificate from the new CA", Duration::from_secs(10), Duration::from_millis(100), || signed_by(ca))
        .await
        .unwrap();
    // Rotated: the next certificates come from the new key.
    let (rotated, rotated_name) = ca_secret_mounted(&client, &ca_dir).await;
    let rotated: &'static SshCa = Box::leak(Box::new(rotated));
    wait_for("a certificate from the rotated CA", Duration::from_secs(10), Duration::from_millis(100), || {
        signed_by(rotated)
    })
    .await
    .unwrap();
    assert!(webhook.proc.is_running());
    webhook.unregister(&client).await;
    let secrets = Api::<Secret>::namespaced(client, "pico-sh-system");
    for name in [secret_name, rotated_name] {
        let _ = secrets.delete(&name, &DeleteParams::default()).await;
    }
}

/// Certificate mode (the default) cannot work without the report URL: the webhook and `picotun
/// inject` refuse to start and say what to pass.
#[test]
fn certificate_mode_without_a_report_url_says_what_to_pass() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_picotun"))
        .args(["webhook", "--cert-file", "/nonexistent/tls.crt", "--key-file", "/nonexistent/tls.key"])
        .env("KUBECONFIG", dir.path().join("none"))
        .env_remove("PICOTUN_AGENT_REPORT_URL")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--sidecar-auth certificate needs --agent-report-url") && stderr.contains("--sidecar-auth key"),
        "{stderr}"
    );

    let pod = dir.path().join("pod.yaml");
    std::fs::write(
        &pod,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {tunnels.pico.sh/inject: \"true\"}}\nspec: {containers: [{name: app, image: x}]}\n",
    )
    .unwrap();
    let inject = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_picotun"))
            .args(["inject", "-f", pod.to_str().unwrap()])
            .args(extra)
            .env_remove("PICOTUN_AGENT_REPORT_URL")
            .env_remove("PICOTUN_SIDECAR_AUTH")
            .output()
            .unwrap()
    };
    let out = inject(&[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --agent-report-url"));
    let out = inject(&["--agent-report-url", "https://picotun-webhook.pico-sh-system.svc:8444/report"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let yaml = String::from_utf8(out.stdout).unwrap();
    assert!(
        yaml.contains("PICOTUN_CERTIFICATE_URL")
            && yaml.contains("https://picotun-webhook.pico-sh-system.svc:8444/certificate")
    );
    assert!(!yaml.contains("picotun-ssh-key"), "{yaml}");
    let out = inject(&["--sidecar-auth", "key"]);
    assert!(out.status.success());
    assert!(String::from_utf8(out.stdout).unwrap().contains("picotun-ssh-key"));
}
