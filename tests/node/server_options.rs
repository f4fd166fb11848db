//! Issue 14: server options from Kubernetes, end to end on the real node through sish. A
//! Gateway's `infrastructure.parametersRef` names a ConfigMap with `proxy-protocol: "2"`; the
//! controller writes the option into the pods' tunnels files, the sidecar asks sish for it on its
//! SSH connection, and sish puts a PROXY v2 header before each visitor's bytes -- so the app (the
//! ground's http-echo with `-proxy-protocol`, which parses the header) sees the visitor's own
//! loopback address and port.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject};
use picotun::apiserver::index::GatewayKind;
use picotun_testground::wait_for;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{self, kubectl};

/// The sish TCP port the listener asks for (the walkthrough's is 59123).
const PORT: u16 = 59124;

fn apply(ground: &picotun_testground::ControlPlane, ns: &str, doc: &Value) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("doc.json");
    std::fs::write(&path, doc.to_string()).unwrap();
    println!("{}", kubectl(ground, &["-n", ns, "apply", "-f", path.to_str().unwrap()]));
}

fn tunnels_of(pod: &Pod) -> Value {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("tunnels.pico.sh/tunnels"))
        .and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or(Value::Null)
}

/// One request through sish's public TCP port from `visitor` (a loopback address of the test's
/// choosing): the `X-Proxy-Source` the app answered with, and the port the visitor used.
async fn visit(visitor: std::net::Ipv4Addr) -> Result<(String, std::net::SocketAddr), String> {
    let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket.bind((visitor, 0).into()).map_err(|e| format!("bind {visitor}: {e}"))?;
    let mut conn = socket.connect(([127, 0, 0, 1], PORT).into()).await.map_err(|e| format!("connect: {e}"))?;
    let local = conn.local_addr().map_err(|e| e.to_string())?;
    conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut raw)).await;
    let text = String::from_utf8_lossy(&raw).to_string();
    let source = text
        .lines()
        .find_map(|l| l.strip_prefix("X-Proxy-Source: "))
        .map(str::to_string)
        .ok_or_else(|| format!("no X-Proxy-Source in {text:?}"))?;
    Ok((source, local))
}

#[tokio::test]
#[ignore = "needs the test ground with a real node (scripts/build-testground, scripts/build-node-images)"]
async fn proxy_protocol_from_a_gateway_config_map_shows_the_app_the_visitor() {
    let ground = support::ground().await;
    let client = ground.client().await.unwrap();
    let (stack, ns) = support::stack_and_namespace(ground, "proxy-opts").await;
    kubectl(ground, &["apply", "-f", "deploy/base/classes.yaml"]);
    let started = Instant::now();
    apply(
        ground,
        &ns,
        &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "server-options"},
            "data": {"proxy-protocol": "2"}}),
    );
    apply(
        ground,
        &ns,
        &json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "proxy-app"},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "proxy-app"}}, "template": {
                "metadata": {"labels": {"app": "proxy-app", "tunnels.pico.sh/inject": "true"}},
                "spec": {"containers": [{"name": "echo", "image": "hashicorp/http-echo:1.0",
                    "args": ["-text=hello", "-listen=:5678", "-proxy-protocol"],
                    "ports": [{"name": "http", "containerPort": 5678}]}]}}}}),
    );
    apply(
        ground,
        &ns,
        &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "proxy-app"},
            "spec": {"selector": {"app": "proxy-app"}, "ports": [{"port": 80, "targetPort": "http"}]}}),
    );
    apply(
        ground,
        &ns,
        &json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "metadata": {"name": "opts"},
            "spec": {"gatewayClassName": "pico-tunnel",
                     "infrastructure": {"parametersRef": {"group": "", "kind": "ConfigMap", "name": "server-options"}},
                     "listeners": [{"name": "tcp", "protocol": "TCP", "port": PORT,
                                    "allowedRoutes": {"kinds": [{"kind": "TCPRoute"}]}}]}}),
    );
    apply(
        ground,
        &ns,
        &json!({"apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": "TCPRoute", "metadata": {"name": "proxy-app"},
            "spec": {"parentRefs": [{"name": "opts", "sectionName": "tcp"}],
                     "rules": [{"backendRefs": [{"name": "proxy-app", "port": 80}]}]}}),
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let ready = support::ready_pods(&pods, "app=proxy-app", 1, Duration::from_secs(90)).await;
    let pod = ready[0].metadata.name.clone().unwrap();

    // The option is in the pod's tunnels file.
    let file =
        wait_for("the option in the tunnels file", Duration::from_secs(30), Duration::from_millis(250), || async {
            let p = pods.get(&pod).await.map_err(|e| e.to_string())?;
            let t = tunnels_of(&p);
            if t["tunnels"][0]["options"] == json!({"proxy-protocol": "2"}) { Ok(Some(t)) } else { Err(t.to_string()) }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\ncontroller log:\n{}", stack.controller.log_tail(30)));
    println!("tunnels file: {file}");
    let gateways: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &GatewayKind::Gateway.api_resource());
    wait_for("the Gateway Programmed with an address", Duration::from_secs(60), Duration::from_millis(250), || async {
        let s = gateways.get("opts").await.map_err(|e| e.to_string())?.data["status"].clone();
        let accepted =
            s["conditions"].as_array().into_iter().flatten().any(|c| c["type"] == "Accepted" && c["status"] == "True");
        let addressed = s["addresses"].as_array().is_some_and(|a| !a.is_empty());
        if accepted && addressed { Ok(Some(())) } else { Err(s.to_string()) }
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}\nagent log:\n{}\nsish log:\n{}",
            kubectl(ground, &["-n", &ns, "logs", &pod, "-c", "picotun-agent"]),
            stack.sish.log_tail(30)
        )
    });

    // A visitor from 127.0.0.7: the app sees that address and the visitor's own port.
    let visitor = std::net::Ipv4Addr::new(127, 0, 0, 7);
    let (source, local) =
        wait_for("a visit through sish", Duration::from_secs(30), Duration::from_millis(250), || async {
            visit(visitor).await.map(Some)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\nsish log:\n{}", stack.sish.log_tail(30)));
    assert_eq!(source, local.to_string(), "the app sees the visitor, not the sidecar or sish");
    println!(
        "visitor {local} -> the app saw X-Proxy-Source: {source}, {:.1}s after apply",
        started.elapsed().as_secs_f32()
    );

    support::delete_namespace(ground, &ns).await;
    stack.remove(ground).await;
}
