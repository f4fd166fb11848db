//! The prototype's two walkthroughs, as a user types them, on the real node through sish.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{Api, DynamicObject};
use kube::discovery::ApiResource;
use picotun_testground::tunnels::SISH_DOMAIN;
use picotun_testground::{ControlPlane, wait_for};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{self, Stack, StackOptions, kubectl};

const BODY: &str = "hello from example-app\n";

/// What the sidecar of a Ready pod logged, and that its tunnel came up.
fn agent_log_shows_established(ground: &ControlPlane, ns: &str, pod: &Pod) -> String {
    let name = pod.metadata.name.as_deref().unwrap();
    let logs = kubectl(ground, &["-n", ns, "logs", name, "-c", "picotun-agent"]);
    assert!(
        logs.contains("forward established") || logs.contains("standing by"),
        "kubectl logs {name} -c picotun-agent shows the tunnel's state; it shows:\n{logs}"
    );
    logs
}

/// The injected sidecar is a native sidecar (an init container that keeps running) named
/// picotun-agent, started by the kubelet, and the app container runs beside it.
fn assert_sidecar_ran(pod: &Pod) {
    let spec = pod.spec.as_ref().unwrap();
    let agent = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == "picotun-agent")
        .unwrap_or_else(|| panic!("pod {:?} has no picotun-agent init container", pod.metadata.name));
    assert_eq!(agent.restart_policy.as_deref(), Some("Always"), "a native sidecar");
    let status = pod.status.as_ref().unwrap();
    let agent_status =
        status.init_container_statuses.iter().flatten().find(|c| c.name == "picotun-agent").expect("agent status");
    assert!(agent_status.started == Some(true) && agent_status.ready, "the kubelet runs the agent: {agent_status:?}");
    assert!(agent_status.state.as_ref().and_then(|s| s.running.as_ref()).is_some(), "{agent_status:?}");
    assert!(status.container_statuses.iter().flatten().all(|c| c.ready), "every app container is ready");
}

/// The README's steps for an example, as a user types them -- the classes (part of deploy/), the
/// namespace, the key Secret, `kubectl apply -k examples/<example>/` -- with a stack of this
/// test's own serving the namespace; then waits for `replicas` Ready pods, each running the
/// injected sidecar. Returns the stack, the pods and when `apply -k` was run.
async fn apply_example(
    ground: &ControlPlane,
    example: &str,
    ns: &str,
    app: &str,
    replicas: usize,
) -> (Stack, Vec<Pod>, Instant) {
    let client = ground.client().await.unwrap();
    let stack = Stack::start(
        ground,
        StackOptions { class: "pico-tunnel".into(), sish: Default::default(), route_backends: false },
    )
    .await;
    kubectl(ground, &["apply", "-f", "deploy/base/classes.yaml"]);
    kubectl(ground, &["apply", "-f", &format!("examples/{example}/namespace.yaml")]);
    stack.adopt(ground, ns);
    stack.create_key_secret(ground, ns);
    let started = Instant::now();
    println!("{}", kubectl(ground, &["apply", "-k", &format!("examples/{example}/")]));
    let pods: Api<Pod> = Api::namespaced(client, ns);
    let ready = support::ready_pods(&pods, &format!("app={app}"), replicas, Duration::from_secs(90)).await;
    println!("{replicas} pods Ready {:.1}s after kubectl apply", started.elapsed().as_secs_f32());
    for pod in &ready {
        assert_sidecar_ran(pod);
    }
    (stack, ready, started)
}

#[tokio::test]
#[ignore = "needs the test ground with a real node (scripts/build-testground, scripts/build-node-images)"]
async fn ingress_walkthrough_on_the_kubelet_through_sish() {
    let ground = support::ground().await;
    let client = ground.client().await.unwrap();
    let ns = "example-ingress";
    let (stack, ready, started) = apply_example(ground, "ingress", ns, "example-app", 2).await;

    // The Ingress ADDRESS is the name sish assigned, as it printed it.
    let ingresses: Api<Ingress> = Api::namespaced(client.clone(), ns);
    let host = wait_for("the Ingress ADDRESS", Duration::from_secs(60), Duration::from_millis(200), || async {
        let ing = ingresses.get("example-app").await.map_err(|e| e.to_string())?;
        Ok(ing.status.and_then(|s| s.load_balancer).and_then(|l| l.ingress).and_then(|i| i.first()?.hostname.clone()))
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}; controller log:\n{}\nagent logs:\n{}\nwebhook log:\n{}",
            stack.controller.log_tail(10),
            stack_agent_logs(ground, ns, &ready),
            stack.webhook.log_tail(20)
        )
    });
    println!("Ingress ADDRESS {host} {:.1}s after kubectl apply", started.elapsed().as_secs_f32());
    let user = &stack.user;
    assert!(
        host == format!("{user}-demo.tuns.test") || host == format!("demo-{user}.tuns.test"),
        "the name sish gives `demo` for user {user}: {host}"
    );
    let sish_log = stack.sish.log_tail(400);
    assert!(sish_log.contains(&host) || stack_agent_logs(ground, ns, &ready).contains(&host), "sish printed {host}");
    println!("{}", kubectl(ground, &["-n", ns, "get", "ingress", "example-app"]));

    // A visitor's GET through sish reaches the app the kubelet runs.
    let body = stack.get_through_sish(&host, Duration::from_secs(30)).await;
    assert_eq!(body, BODY);
    println!("GET http://{host}/ -> {body:?} {:.1}s after kubectl apply", started.elapsed().as_secs_f32());
    for pod in &ready {
        let logs = agent_log_shows_established(ground, ns, pod);
        println!("kubectl logs {} -c picotun-agent:\n{logs}", pod.metadata.name.as_deref().unwrap());
    }
    assert!(
        stack_agent_logs(ground, ns, &ready).contains("forward established"),
        "one of the replicas serves the name (sish without load balancing gives it to one)"
    );

    support::delete_namespace(ground, ns).await;
    stack.remove(ground).await;
}

fn stack_agent_logs(ground: &ControlPlane, ns: &str, pods: &[Pod]) -> String {
    pods.iter()
        .map(|p| kubectl(ground, &["-n", ns, "logs", p.metadata.name.as_deref().unwrap(), "-c", "picotun-agent"]))
        .collect::<Vec<_>>()
        .join("\n")
}

fn gateway_api(kind: &str, version: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "gateway.networking.k8s.io".into(),
        version: version.into(),
        api_version: format!("gateway.networking.k8s.io/{version}"),
        kind: kind.into(),
        plural: plural.into(),
    }
}

fn condition<'a>(conditions: &'a Value, type_: &str) -> &'a Value {
    conditions.as_array().and_then(|cs| cs.iter().find(|c| c["type"] == type_)).unwrap_or(&Value::Null)
}

#[tokio::test]
#[ignore = "needs the test ground with a real node (scripts/build-testground, scripts/build-node-images)"]
async fn gateway_walkthrough_http_and_tcp_on_the_kubelet_through_sish() {
    let ground = support::ground().await;
    let client = ground.client().await.unwrap();
    let ns = "example-gateway-api";
    let (stack, _ready, started) = apply_example(ground, "gateway-api", ns, "tcp-echo-server", 3).await;

    let gateways: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), ns, &gateway_api("Gateway", "v1", "gateways"));
    let gateway =
        wait_for("Gateway Programmed with addresses", Duration::from_secs(60), Duration::from_millis(250), || async {
            let gw = gateways.get("tcp-echo-gateway").await.map_err(|e| e.to_string())?;
            let status = gw.data["status"].clone();
            let programmed = condition(&status["conditions"], "Programmed")["status"] == "True";
            let addresses = status["addresses"].as_array().map(|a| a.len()).unwrap_or(0);
            if programmed && addresses >= 2 { Ok(Some(status)) } else { Err(status.to_string()) }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; controller log:\n{}", stack.controller.log_tail(30)));
    println!("Gateway status: {}", serde_json::to_string_pretty(&gateway).unwrap());
    println!("{}", kubectl(ground, &["-n", ns, "get", "gateway,httproute,tcproute"]));
    let addresses: Vec<String> = gateway["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["value"].as_str().map(str::to_string))
        .collect();
    let user = &stack.user;
    let http_host = addresses
        .iter()
        .find(|a| **a == format!("{user}-web-test.tuns.test") || **a == format!("web-test-{user}.tuns.test"))
        .unwrap_or_else(|| panic!("an HTTP address for listener web-test among {addresses:?}"))
        .clone();
    // A Gateway address is a hostname without a port: sish's TCP host is its domain; the port is
    // the listener's (59123), which sish bound as requested.
    assert!(addresses.iter().any(|a| a == SISH_DOMAIN), "sish's TCP host {SISH_DOMAIN} among {addresses:?}");
    let tcp = format!("{SISH_DOMAIN}:59123");
    // HTTP by name through sish's HTTP port.
    assert_eq!(stack.get_through_sish(&http_host, Duration::from_secs(30)).await, BODY);
    // TCP: sish's public port 59123 on loopback, the same bytes over a raw connection.
    let answer =
        wait_for("an answer on sish's TCP port 59123", Duration::from_secs(30), Duration::from_millis(200), || async {
            let mut conn = tokio::net::TcpStream::connect("127.0.0.1:59123").await.map_err(|e| e.to_string())?;
            conn.write_all(b"GET / HTTP/1.1\r\nHost: tcp\r\nConnection: close\r\n\r\n")
                .await
                .map_err(|e| e.to_string())?;
            let mut raw = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut raw)).await;
            let text = String::from_utf8_lossy(&raw).to_string();
            if text.ends_with(BODY) { Ok(Some(text)) } else { Err(format!("{text:?}")) }
        })
        .await
        .unwrap();
    println!("TCP {tcp} -> {:?} {:.1}s after kubectl apply", answer.lines().next(), started.elapsed().as_secs_f32());

    support::delete_namespace(ground, ns).await;
    stack.remove(ground).await;
}
