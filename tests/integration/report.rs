//! The public address a sidecar learns reaches its pod: the real `picotun agent` tunnels through
//! sish (as tuns.sh runs it) and POSTs its status, with a token the real apiserver bound to the pod, to the real
//! `picotun webhook`'s `/report`, which checks it with a TokenReview and writes the pod's
//! `tunnels.pico.sh/addresses` annotation. And what must be refused is refused.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, PostParams};
use picotun_testground::http::{self, Backend};
use picotun_testground::{
    ControlPlane, Existing, Proc, ServerKind, SishOptions, SshClientKey, TunnelServer, free_port, wait_for,
};
use serde_json::{Value, json};

const ADDRESSES: &str = "tunnels.pico.sh/addresses";
pub(crate) const AUDIENCE: &str = "tunnels.pico.sh";

use crate::support::Webhook;

impl Webhook {
    fn report_url(&self) -> String {
        format!("https://{}/report", self.addr)
    }

    /// POST /report with `token` (if any) and `body`; (status, body of the answer).
    async fn report(&self, token: Option<&str>, body: &str) -> (u16, String) {
        let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        let (status, text) = self.post("/report", "application/json", &auth, body.as_bytes()).await;
        (status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
    }
}

/// A pod as the webhook injects it with reporting on (the apiserver validates the projected token
/// volume; the sidecar is what `/report` requires), or a plain one.
async fn injected_pod(client: &kube::Client, namespace: &str, name: &str, inject: bool) -> Pod {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": name}, "annotations": {"tunnels.pico.sh/expose": "http:app=8080"}},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]},
    }))
    .unwrap();
    let pod = if inject {
        let config = picotun::webhook::inject::InjectConfig {
            report_url: "https://picotun-webhook.pico-sh-system.svc:443/report".into(),
            ..Default::default()
        };
        picotun::webhook::inject::mutate(&pod, namespace, None, &[], false, &config).pod.unwrap()
    } else {
        pod
    };
    let stored = Api::<Pod>::namespaced(client.clone(), namespace).create(&PostParams::default(), &pod).await.unwrap();
    let volumes = stored.spec.as_ref().and_then(|s| s.volumes.as_ref());
    assert_eq!(inject, volumes.is_some_and(|v| v.iter().any(|v| v.name == "picotun-report-token")));
    stored
}

/// A token of the namespace's `default` service account from the TokenRequest API, for
/// `audience`, bound to `pod` if given (as the kubelet requests projected tokens).
pub(crate) async fn token(client: &kube::Client, namespace: &str, pod: Option<&Pod>, audience: &str) -> String {
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![audience.into()]),
            expiration_seconds: Some(600),
            bound_object_ref: pod.map(|p| BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: p.metadata.name.clone(),
                uid: p.metadata.uid.clone(),
            }),
        }),
        ..Default::default()
    };
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let answer = sas.create_token_request("default", &PostParams::default(), &request).await.unwrap();
    answer.status.and_then(|s| s.token).expect("the TokenRequest API returns a token")
}

async fn addresses(pods: &Api<Pod>, name: &str) -> Option<String> {
    let pod = pods.get(name).await.unwrap();
    pod.metadata.annotations.and_then(|mut a| a.remove(ADDRESSES))
}

pub(crate) fn metric(text: &str, line_prefix: &str) -> u64 {
    text.lines().find_map(|l| l.strip_prefix(line_prefix).and_then(|v| v.trim().parse().ok())).unwrap_or(0)
}

fn start_agent(
    server: &TunnelServer,
    key: &SshClientKey,
    backend_port: u16,
    report: &[(&str, String)],
    dir: &Path,
) -> (Proc, String) {
    let tunnels = dir.join("tunnels.json");
    std::fs::write(
        &tunnels,
        format!(r#"{{"tunnels":[{{"name":"web","kind":"http","host":"app","targetPort":{backend_port}}}]}}"#),
    )
    .unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_picotun"));
    cmd.arg("agent")
        .args(["--tunnels-file", tunnels.to_str().unwrap()])
        .args(["--server", "127.0.0.1", "--server-port", &server.ssh_port().to_string()])
        .args(["--user", &server.login_user("alice"), "--dialect", "sish"])
        .args(["--key-file", key.private_key.to_str().unwrap()])
        .args(["--known-hosts", server.known_hosts().to_str().unwrap()])
        .args(["--admin-addr", &admin, "--reload-interval", "200ms"])
        .env("PICOTUN_LOG", "picotun=debug,info");
    // The same environment variables the webhook gives an injected sidecar.
    for (name, value) in report {
        cmd.env(name, value);
    }
    (Proc::spawn("picotun-agent", cmd, &dir.join("agent.log")).unwrap(), admin)
}

#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn a_sidecar_reports_the_address_sish_assigned_onto_its_pod() {
    let ground = ControlPlane::shared(Existing::Allowed).await.unwrap();
    let client = ground.client().await.unwrap();
    let ns = ground.namespace("report").await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    let pod = injected_pod(&client, ns.name(), "web", true).await;
    let webhook = Webhook::start(ground, true).await;

    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token(&client, ns.name(), Some(&pod), AUDIENCE).await).unwrap();
    let key = SshClientKey::generate(dir.path(), "agent", "ed25519").unwrap();
    let server = TunnelServer::start(ServerKind::Sish(SishOptions::default()), &[&key]).await.unwrap();
    let backend = Backend::start("app").await.unwrap();
    let report = [
        ("PICOTUN_REPORT_URL", webhook.report_url()),
        ("PICOTUN_REPORT_CA", webhook.ca.cert_pem()),
        ("PICOTUN_REPORT_TOKEN_FILE", token_file.to_str().unwrap().to_string()),
        // Heartbeats often enough to see that an unchanged status is not written again.
        ("PICOTUN_REPORT_INTERVAL", "1s".to_string()),
    ];
    let (mut agent, admin) = start_agent(&server, &key, backend.port(), &report, dir.path());

    // What the agent learned from sish...
    let public = wait_for("the tunnel to be established", Duration::from_secs(30), Duration::from_millis(100), || {
        let admin = admin.clone();
        async move {
            let status: Value = http::get(&admin, "a", "/status")
                .await
                .ok()
                .and_then(|r| serde_json::from_str(&r.body).ok())
                .ok_or("no /status yet")?;
            let t = &status["tunnels"][0];
            Ok((t["state"] == "established").then(|| t["publicAddress"].as_str().unwrap_or_default().to_string()))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail(30)));
    assert!(public.contains(&server.http_host("alice", "app")), "{public}");

    // ...is on the pod, through the apiserver.
    let want = json!({"tunnels": {"web": {"state": "established", "publicAddress": public}}});
    let started = Instant::now();
    let seen = wait_for("the addresses annotation", Duration::from_secs(20), Duration::from_millis(100), || {
        let pods = pods.clone();
        let want = want.clone();
        async move {
            let current = addresses(&pods, "web").await;
            let parsed = current.as_deref().and_then(|c| serde_json::from_str::<Value>(c).ok());
            if parsed == Some(want) { Ok(Some(())) } else { Err(format!("annotation is {current:?}")) }
        }
    })
    .await;
    if let Err(e) = seen {
        panic!("{e}\nagent log:\n{}\nwebhook log:\n{}", agent.log_tail(30), webhook.proc.log_tail(30));
    }
    eprintln!("addresses annotation written {:?} after the tunnel was established", started.elapsed());
    let agent_metrics = http::get(&admin, "a", "/metrics").await.unwrap().body;
    assert!(metric(&agent_metrics, "picotun_agent_reports_total{result=\"ok\"}") >= 1, "{agent_metrics}");
    let metrics = webhook.metrics().await;
    assert!(metric(&metrics, "picotun_webhook_reports_total{result=\"written\"}") >= 1, "{metrics}");
    assert!(agent.is_running());

    // The tunnel goes (the app's tunnels change): the annotation follows within a second or so.
    std::fs::write(dir.path().join("tunnels.json"), r#"{"tunnels":[]}"#).unwrap();
    wait_for("the annotation to drop the tunnel", Duration::from_secs(10), Duration::from_millis(100), || {
        let pods = pods.clone();
        async move {
            let current = addresses(&pods, "web").await;
            Ok((current.as_deref() == Some(r#"{"tunnels":{}}"#)).then_some(()))
        }
    })
    .await
    .unwrap();
    // Heartbeats go on, but an unchanged status is not written again.
    let count =
        |text: &str, result: &str| metric(text, &format!("picotun_webhook_reports_total{{result=\"{result}\"}}"));
    let before = webhook.metrics().await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let after = webhook.metrics().await;
    assert_eq!(count(&after, "written"), count(&before, "written"), "{after}");
    assert!(count(&after, "unchanged") >= count(&before, "unchanged") + 2, "heartbeats arrive: {after}");
    assert!(agent.is_running());
}

#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn reports_without_a_pod_bound_token_or_with_a_broken_body_are_refused() {
    let ground = ControlPlane::shared(Existing::Allowed).await.unwrap();
    let client = ground.client().await.unwrap();
    let ns = ground.namespace("report-refused").await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    let pod = injected_pod(&client, ns.name(), "web", true).await;
    let plain = injected_pod(&client, ns.name(), "plain", false).await;
    let webhook = Webhook::start(ground, true).await;
    let status = json!({"tunnels": [{"name": "web", "state": "established", "publicAddress": "https://web.example"}]})
        .to_string();

    let wrong_audience = token(&client, ns.name(), Some(&pod), "some-other-service").await;
    let unbound = token(&client, ns.name(), None, AUDIENCE).await;
    let good = token(&client, ns.name(), Some(&pod), AUDIENCE).await;
    let plain_token = token(&client, ns.name(), Some(&plain), AUDIENCE).await;
    for (what, token, body, want_status, want_text) in [
        ("no token", None, status.as_str(), 401, "no bearer token"),
        ("garbage token", Some("not-a-token"), status.as_str(), 401, "not accepted"),
        ("wrong audience", Some(wrong_audience.as_str()), status.as_str(), 401, "not accepted"),
        ("not bound to a pod", Some(unbound.as_str()), status.as_str(), 403, "not bound to a pod"),
        ("malformed body", Some(good.as_str()), "{not json", 400, "not an agent /status document"),
        ("wrong shape", Some(good.as_str()), r#"{"tunnels":{"web":1}}"#, 400, "not an agent /status document"),
        ("a pod picotun did not inject", Some(plain_token.as_str()), status.as_str(), 403, "no picotun-agent sidecar"),
    ] {
        let (code, text) = webhook.report(token, body).await;
        assert_eq!(code, want_status, "{what}: {text}");
        assert!(text.contains(want_text), "{what}: {text}");
        if let Some(t) = token {
            assert!(!text.contains(t), "{what}: the token is never echoed");
        }
    }
    let (code, _) = webhook.report(Some(&good), &" ".repeat(65 * 1024)).await;
    assert_eq!(code, 413, "a body over 64 KiB");
    assert_eq!(addresses(&pods, "web").await, None, "nothing was written by a refused report");
    assert_eq!(addresses(&pods, "plain").await, None);

    // The same pod with the right token: written once, then unchanged.
    assert_eq!(webhook.report(Some(&good), &status).await, (200, "written\n".into()));
    assert_eq!(webhook.report(Some(&good), &status).await, (200, "unchanged\n".into()));
    assert_eq!(
        addresses(&pods, "web").await.as_deref(),
        Some(r#"{"tunnels":{"web":{"state":"established","publicAddress":"https://web.example"}}}"#)
    );
    let metrics = webhook.metrics().await;
    for (result, n) in [("unauthenticated", 3), ("forbidden", 2), ("bad_request", 3), ("written", 1), ("unchanged", 1)]
    {
        assert_eq!(
            metric(&metrics, &format!("picotun_webhook_reports_total{{result=\"{result}\"}}")),
            n,
            "{result}: {metrics}"
        );
    }
    assert!(!webhook.proc.log_tail(200).contains(&good), "the token is never logged");
}
