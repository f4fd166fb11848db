//! The public address a sidecar learns reaches its pod: the real `picotun agent` tunnels through
//! sish (as tuns.sh runs it) and POSTs its status, with a token the real apiserver bound to the pod, to the real
//! `picotun webhook`'s `/report`, which checks it with a TokenReview and writes the pod's
//! `tunnels.pico.sh/addresses` annotation. And what must be refused is refused: pods the webhook
//! did not inject (whatever containers and tokens they bring), and reported tunnels the pod was
//! not asked to open or addresses the tunnel cannot have.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
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

use crate::support::{Webhook, WebhookOptions, label_for_injection, pod_json, wait_active};

impl Webhook {
    fn report_url(&self) -> String {
        format!("https://{}/report", self.agent_addr)
    }

    /// POST /report (the sidecars' port) with `token` (if any) and `body`; (status, body of the answer).
    async fn report(&self, token: Option<&str>, body: &str) -> (u16, String) {
        let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        let (status, text) = self.agent_post("/report", "application/json", &auth, body.as_bytes()).await;
        (status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
    }
}

/// A tuns name of the test's own, `app-<random>`: names belong to their first claimant across
/// the cluster (the webhook keeps a pod's expose tunnels to those its namespace owns), and the
/// ground is shared by tests running at once.
fn app_name() -> String {
    format!("app-{}", picotun_testground::random_suffix())
}

/// A namespace labeled for injection with `webhook` registered for it, ready.
async fn served_namespace(
    ground: &'static ControlPlane,
    webhook: &mut Webhook,
    prefix: &str,
) -> (picotun_testground::kube_ground::TestNamespace, Api<Pod>) {
    let client = ground.client().await.unwrap();
    let ns = ground.namespace(prefix).await.unwrap();
    label_for_injection(&client, ns.name()).await;
    webhook.register(&client, &[ns.name()], true).await;
    let pods: Api<Pod> = Api::namespaced(client, ns.name());
    wait_active(&pods).await;
    (ns, pods)
}

/// A pod the webhook injects (reporting on: the sidecar has its projected token and a ticket),
/// with the tunnel `http-<app>` asking for the name `app` (its expose annotation), or with
/// `inject` false, a plain one it leaves alone.
async fn created_pod(pods: &Api<Pod>, name: &str, inject: bool, app: &str) -> Pod {
    let pod = if inject {
        pod_json(
            name,
            json!({"app": name, "tunnels.pico.sh/inject": "true"}),
            json!({"tunnels.pico.sh/expose": format!("http:{app}=8080")}),
        )
    } else {
        pod_json(name, json!({"app": name}), json!({}))
    };
    let stored = pods.create(&PostParams::default(), &pod).await.unwrap();
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
    app: &str,
    backend_port: u16,
    report: &[(&str, String)],
    dir: &Path,
) -> (Proc, String) {
    let tunnels = dir.join("tunnels.json");
    std::fs::write(
        &tunnels,
        format!(r#"{{"tunnels":[{{"name":"http-{app}","kind":"http","host":"{app}","targetPort":{backend_port}}}]}}"#),
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
    let mut webhook = Webhook::start(ground, true).await;
    let (ns, pods) = served_namespace(ground, &mut webhook, "report").await;
    let app = app_name();
    let pod = created_pod(&pods, "web", true, &app).await;

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
    let (mut agent, admin) = start_agent(&server, &key, &app, backend.port(), &report, dir.path());

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
    assert!(public.contains(&server.http_host("alice", &app)), "{public}");

    // ...is on the pod, through the apiserver.
    let want = json!({"tunnels": {format!("http-{app}"): {"state": "established", "publicAddress": public}}});
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
    let mut webhook = Webhook::start(ground, true).await;
    let (ns, pods) = served_namespace(ground, &mut webhook, "report-refused").await;
    let app = app_name();
    let pod = created_pod(&pods, "web", true, &app).await;
    let plain = created_pod(&pods, "plain", false, &app).await;
    let status = json!({"tunnels": [
        {"name": format!("http-{app}"), "state": "established", "publicAddress": format!("https://{app}-alice.tuns.test")}]})
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
        (
            "a pod picotun did not inject",
            Some(plain_token.as_str()),
            status.as_str(),
            403,
            "no picotun-agent container",
        ),
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
    let written = format!(
        r#"{{"tunnels":{{"http-{app}":{{"state":"established","publicAddress":"https://{app}-alice.tuns.test"}}}}}}"#
    );
    assert_eq!(addresses(&pods, "web").await, Some(written));
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

/// POST /report with `token` and the tunnels given as (name, state, address).
async fn report_tunnels(webhook: &Webhook, token: &str, tunnels: &[(&str, &str, Option<&str>)]) -> (u16, String) {
    let tunnels: Vec<Value> =
        tunnels.iter().map(|(n, s, a)| json!({"name": n, "state": s, "publicAddress": a})).collect();
    webhook.report(Some(token), &json!({ "tunnels": tunnels }).to_string()).await
}

#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn what_a_report_says_is_checked_before_it_reaches_the_pod() {
    let ground = ControlPlane::shared(Existing::Allowed).await.unwrap();
    let client = ground.client().await.unwrap();
    let mut webhook = Webhook::start(ground, true).await;
    let (ns, pods) = served_namespace(ground, &mut webhook, "report-checked").await;
    // Four tunnels: two tuns names, a TCP port and a custom domain (each the test's own).
    let suffix = picotun_testground::random_suffix();
    let (app, demo, shop) = (format!("app-{suffix}"), format!("demo-{suffix}"), format!("shop-{suffix}.example.com"));
    let port = free_port();
    let shop_tunnel = format!("http-{}", shop.replace('.', "-"));
    let (app_tunnel, demo_tunnel, tcp_tunnel) = (format!("http-{app}"), format!("http-{demo}"), format!("tcp-{port}"));
    let pod = pod_json(
        "web",
        json!({"tunnels.pico.sh/inject": "true"}),
        json!({"tunnels.pico.sh/expose": format!("http:{app}=8080, http:{demo}=8080, tcp:{port}=8080, http:{shop}=8080")}),
    );
    let pod = pods.create(&PostParams::default(), &pod).await.unwrap();
    let bound = token(&client, ns.name(), Some(&pod), AUDIENCE).await;
    let dropped = |reason: &str| format!("picotun_webhook_report_entries_dropped_total{{reason=\"{reason}\"}}");

    // What the pod's tunnels can have is kept; a tunnel it was not asked to open is not.
    let (status, text) = report_tunnels(
        &webhook,
        &bound,
        &[
            (&app_tunnel, "established", Some(&format!("https://{app}-alice.tuns.test"))),
            (&demo_tunnel, "standingBy", None),
            (&tcp_tunnel, "established", Some(&format!("tuns.test:{port}"))),
            (&shop_tunnel, "established", Some(&format!("https://{shop}"))),
            ("stolen", "established", Some("https://bank-alice.tuns.test")),
        ],
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(text.starts_with("written (dropped: tunnel \"stolen\": not one of the pod's tunnels"), "{text}");
    assert_eq!(
        addresses(&pods, "web").await,
        Some(format!(
            concat!(
                r#"{{"tunnels":{{"{}":{{"state":"established","publicAddress":"https://{}-alice.tuns.test"}},"#,
                r#""{}":{{"state":"standingBy"}},"#,
                r#""{}":{{"state":"established","publicAddress":"https://{}"}},"#,
                r#""{}":{{"state":"established","publicAddress":"tuns.test:{}"}}}}}}"#
            ),
            app_tunnel, app, demo_tunnel, shop_tunnel, shop, tcp_tunnel, port
        ))
    );
    assert_eq!(webhook.metric(&dropped("unknown_tunnel")).await, 1);

    // Each bad entry goes alone, with its reason; the good one stays.
    let (status, text) = report_tunnels(
        &webhook,
        &bound,
        &[
            // Outside the server's domain: what would end up in a Gateway's addresses.
            (&app_tunnel, "established", Some(&format!("https://{app}-alice.evil.example"))),
            // Not a hostname the Gateway CRD accepts (one such value fails every status patch).
            (&shop_tunnel, "established", Some(&format!("https://S{}", &shop[1..]))),
            (&demo_tunnel, "established", Some(&format!("https://{demo}-alice.tuns.test/<script>"))),
            (&tcp_tunnel, "pwned", Some(&format!("tuns.test:{port}"))),
        ],
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(addresses(&pods, "web").await.as_deref(), Some(r#"{"tunnels":{}}"#));
    for reason in ["outside_domain", "bad_host", "bad_address", "unknown_state"] {
        assert_eq!(webhook.metric(&dropped(reason)).await, 1, "{reason}: {text}");
    }
    let other_port = format!("tuns.test:{}", port + 1);
    let (status, _) = report_tunnels(&webhook, &bound, &[(&tcp_tunnel, "established", Some(&other_port))]).await;
    assert_eq!(status, 200);
    assert_eq!(webhook.metric(&dropped("not_requested")).await, 1, "another port than the one asked for");
    let log = std::fs::read_to_string(webhook.proc.log_path()).unwrap();
    let logged = log.lines().filter(|l| l.contains("reported tunnel dropped")).count();
    assert_eq!(logged, 6, "every dropped entry is logged:\n{log}");
    webhook.unregister(&client).await;
}

#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn only_pods_the_webhook_injected_may_report_or_get_a_certificate() {
    let ground = ControlPlane::shared(Existing::Allowed).await.unwrap();
    let client = ground.client().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ssh-ca");
    std::fs::create_dir(&ca_dir).unwrap();
    std::fs::write(ca_dir.join("ca"), picotun::sshca::SshCa::generate("test-ca").to_openssh()).unwrap();
    let options = WebhookOptions { certificate_ca_dir: Some(ca_dir), ..Default::default() };
    let mut webhook = Webhook::start_with(Some(ground), options).await;
    let (ns, pods) = served_namespace(ground, &mut webhook, "ticket").await;
    let app = app_name();
    let genuine = created_pod(&pods, "genuine", true, &app).await;
    let ticket = genuine.metadata.annotations.as_ref().and_then(|a| a.get("tunnels.pico.sh/injected"));
    eprintln!("the webhook's ticket on the genuine pod: {ticket:?}");
    // Another namespace the webhook is not called for.
    let elsewhere = ground.namespace("ticket-elsewhere").await.unwrap();
    let other_pods: Api<Pod> = Api::namespaced(client.clone(), elsewhere.name());

    // The pieces of the genuine pod a pod author can copy: the sidecar container exactly as
    // stored, its volumes (the projected token among them), its annotations.
    let genuine_spec = genuine.spec.clone().unwrap();
    let mut sidecar = genuine_spec.init_containers.clone().unwrap();
    // (Without an API token mount an older webhook left on it: that volume is not copied. The
    // sidecar's own empty volume at that path is picotun's, and copied.)
    for c in &mut sidecar {
        c.volume_mounts.as_mut().unwrap().retain(|m| {
            m.mount_path != "/var/run/secrets/kubernetes.io/serviceaccount" || m.name == "picotun-no-api-token"
        });
    }
    let volumes: Vec<_> =
        genuine_spec.volumes.clone().unwrap().into_iter().filter(|v| v.name.starts_with("picotun-")).collect();
    let genuine_annotations = genuine.metadata.annotations.clone().unwrap();
    let made_by_hand = |name: &str, labels: Value, with_ticket: bool| {
        let mut pod = pod_json(name, labels, json!({}));
        let spec = pod.spec.as_mut().unwrap();
        spec.init_containers = Some(sidecar.clone());
        spec.volumes = Some(volumes.clone());
        // Else the apiserver mounts the service-account token into every container it is given,
        // the copied sidecar too, and the copy no longer matches for that reason alone.
        spec.automount_service_account_token = Some(false);
        let annotations = pod.metadata.annotations.get_or_insert_with(Default::default);
        annotations.insert(
            "tunnels.pico.sh/tunnels".into(),
            format!(r#"{{"tunnels":[{{"name":"http-{app}","kind":"http","host":"{app}","targetPort":8080}}]}}"#),
        );
        if with_ticket {
            let ticket = genuine_annotations.get("tunnels.pico.sh/injected").cloned().unwrap_or_default();
            annotations.insert("tunnels.pico.sh/injected".into(), ticket);
        }
        pod
    };
    let pp = PostParams::default();
    let status = json!({"tunnels": [
        {"name": format!("http-{app}"), "state": "established", "publicAddress": format!("https://{app}-alice.tuns.test")}]})
    .to_string();
    let key = json!({"publicKey": picotun::sshca::SshCa::generate("k").public_line()}).to_string();
    let both = |token: String| {
        let (webhook, status, key) = (&webhook, status.clone(), key.clone());
        async move {
            let report = webhook.report(Some(&token), &status).await;
            let certificate = webhook.certificate(Some(&token), "application/json", &key).await;
            (report, certificate)
        }
    };
    let refused = |what: &str, ((rs, rt), (cs, ct)): ((u16, String), (u16, String)), want: &str| {
        assert_eq!((rs, cs), (403, 403), "{what}: report {rt:?}, certificate {ct:?}");
        assert!(rt.contains(want) && ct.contains(want), "{what}: report {rt:?}, certificate {ct:?}; want {want:?}");
        eprintln!("{what}: 403 {}", rt.trim());
    };

    // 1. The author writes the sidecar and the token volume into a pod of his own (where the
    //    webhook is not called): no ticket.
    let forged = other_pods.create(&pp, &made_by_hand("forged", json!({"app": "forged"}), false)).await.unwrap();
    let answers = both(token(&client, elsewhere.name(), Some(&forged), AUDIENCE).await).await;
    refused("a sidecar added by the pod's author", answers, "carries no tunnels.pico.sh/injected ticket");

    // 2. ... with the genuine pod's ticket, copied to another namespace.
    let copied = other_pods.create(&pp, &made_by_hand("copied", json!({"app": "copied"}), true)).await.unwrap();
    let answers = both(token(&client, elsewhere.name(), Some(&copied), AUDIENCE).await).await;
    refused("a ticket copied to another namespace", answers, "does not match this pod");

    // 3. ... in the same namespace, opted out so the webhook leaves it alone.
    let opted_out = made_by_hand("opted-out", json!({"app": "x", "tunnels.pico.sh/inject": "false"}), true);
    let opted_out = pods.create(&pp, &opted_out).await.unwrap();
    assert!(opted_out.metadata.annotations.as_ref().unwrap().contains_key("tunnels.pico.sh/injected"));
    let answers = both(token(&client, ns.name(), Some(&opted_out), AUDIENCE).await).await;
    refused("a ticket copied into an opted-out pod", answers, "opts out of injection");

    // 4. ... in the same namespace, opted in, with tunnels of its own choosing: the webhook puts
    //    its own tunnels (and sidecar) in their place.
    let mut chosen = made_by_hand("chosen", json!({"app": "x", "tunnels.pico.sh/inject": "true"}), true);
    chosen.metadata.annotations.as_mut().unwrap().insert(
        "tunnels.pico.sh/tunnels".into(),
        r#"{"tunnels":[{"name":"x","kind":"http","host":"someone-elses","targetPort":8080}]}"#.into(),
    );
    let chosen = pods.create(&pp, &chosen).await.unwrap();
    assert_eq!(chosen.metadata.annotations.as_ref().unwrap()["tunnels.pico.sh/tunnels"], r#"{"tunnels":[]}"#);

    // 5. The app mounts the token volume the webhook adds.
    let mut mounting = pod_json("mounting", json!({"tunnels.pico.sh/inject": "true"}), json!({}));
    mounting.spec.as_mut().unwrap().containers[0].volume_mounts =
        Some(vec![serde_json::from_value(json!({"name": "picotun-report-token", "mountPath": "/stolen"})).unwrap()]);
    let mounting = pods.create(&pp, &mounting).await.unwrap();
    let answers = both(token(&client, ns.name(), Some(&mounting), AUDIENCE).await).await;
    refused("the app mounts the sidecar's token", answers, "container app mounts picotun-report-token, a credential");

    // 6. Every container sees every process (and so the sidecar's files through /proc).
    let mut shared = pod_json("shared", json!({"tunnels.pico.sh/inject": "true"}), json!({}));
    shared.spec.as_mut().unwrap().share_process_namespace = Some(true);
    let shared = pods.create(&pp, &shared).await.unwrap();
    let answers = both(token(&client, ns.name(), Some(&shared), AUDIENCE).await).await;
    refused("shareProcessNamespace", answers, "shareProcessNamespace");

    // 7. The admission endpoint answers whoever calls it: the author asks it to inject a pod of
    //    the namespace the webhook is not called for, and creates the answer there himself.
    let mut wanted =
        serde_json::to_value(pod_json("minted", json!({"tunnels.pico.sh/inject": "true"}), json!({}))).unwrap();
    wanted["spec"]["automountServiceAccountToken"] = false.into();
    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "forged-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                    "resource": {"group": "", "version": "v1", "resource": "pods"},
                    "namespace": elsewhere.name(), "operation": "CREATE", "userInfo": {"username": "author"},
                    "dryRun": false, "object": wanted.clone()},
    });
    let (code, answer) = webhook.post("/mutate", "application/json", "", &serde_json::to_vec(&review).unwrap()).await;
    assert_eq!(code, 200, "{answer}");
    let answer: Value = serde_json::from_str(answer.split_once("\r\n\r\n").unwrap().1).unwrap();
    // kube serializes the patch bytes as a JSON array of numbers (Go reads either form).
    let patch: Vec<u8> = match &answer["response"]["patch"] {
        Value::String(b64) => base64::engine::general_purpose::STANDARD.decode(b64).unwrap(),
        bytes => serde_json::from_value(bytes.clone()).unwrap(),
    };
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    json_patch::patch(&mut wanted, &patch).unwrap();
    assert!(wanted["metadata"]["annotations"]["tunnels.pico.sh/injected"].is_string(), "the answer carries a ticket");
    let minted = other_pods.create(&pp, &serde_json::from_value(wanted).unwrap()).await.unwrap();
    let answers = both(token(&client, elsewhere.name(), Some(&minted), AUDIENCE).await).await;
    refused("a ticket minted through /mutate for a namespace not labeled", answers, "is not labeled");

    // The genuine pod, for contrast: both answered.
    let ((rs, rt), (cs, ct)) = both(token(&client, ns.name(), Some(&genuine), AUDIENCE).await).await;
    assert_eq!((rs, cs), (200, 200), "{rt} {ct}");
    assert_eq!(webhook.metric("picotun_webhook_reports_total{result=\"forbidden\"}").await, 6);
    assert_eq!(webhook.metric("picotun_webhook_certificates_total{result=\"forbidden\"}").await, 6);
    for name in ["forged", "copied", "minted"] {
        assert_eq!(addresses(&other_pods, name).await, None, "nothing was written on {name}");
    }
    webhook.unregister(&client).await;
}
