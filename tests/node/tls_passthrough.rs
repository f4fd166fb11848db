//! Issue 14: TLS passthrough on the real node through sish. A pod serves TLS with a certificate
//! of its own (the test's, from a Secret); a Gateway with a TLS listener in Passthrough mode and
//! a TLSRoute give the pod's sidecar a `tls` tunnel (sish `sni-proxy=true`); a visitor's TLS
//! client, sending the published name as SNI to sish's port 443 on loopback, completes the
//! handshake with the pod's own server and sees the pod's certificate.
//!
//! The pod's TLS server is the picotun binary itself (`picotun webhook` serves HTTPS with the
//! certificate files it is given, and starts without Kubernetes API access): the ground's other
//! image (http-echo) speaks plain HTTP only.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject};
use picotun::apiserver::index::GatewayKind;
use picotun_testground::node::PICOTUN_IMAGE;
use picotun_testground::pki::{Ca, Usage};
use picotun_testground::wait_for;
use serde_json::{Value, json};

use crate::support::{self, kubectl};

fn condition<'a>(conditions: &'a Value, type_: &str) -> &'a Value {
    conditions.as_array().and_then(|cs| cs.iter().find(|c| c["type"] == type_)).unwrap_or(&Value::Null)
}

fn apply(ground: &picotun_testground::ControlPlane, ns: &str, doc: &Value) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("doc.json");
    std::fs::write(&path, doc.to_string()).unwrap();
    println!("{}", kubectl(ground, &["-n", ns, "apply", "-f", path.to_str().unwrap()]));
}

/// The pod's TLS server: `picotun webhook` on :18443 with the Secret's certificate, no service
/// account token (so no API access), key auth for sidecars it would inject (it injects none).
fn tls_app() -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "tls-app"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "tls-app"}}, "template": {
            "metadata": {"labels": {"app": "tls-app", "tunnels.pico.sh/inject": "true"}},
            "spec": {
                "automountServiceAccountToken": false,
                "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [{
                    "name": "tls", "image": PICOTUN_IMAGE, "imagePullPolicy": "IfNotPresent",
                    "args": ["webhook", "--listen", "0.0.0.0:18443", "--agent-listen", "127.0.0.1:18444",
                             "--admin-addr", "127.0.0.1:19902", "--cert-file", "/tls/tls.crt",
                             "--key-file", "/tls/tls.key", "--sidecar-auth", "key"],
                    "ports": [{"name": "tls", "containerPort": 18443}],
                    "volumeMounts": [{"name": "cert", "mountPath": "/tls", "readOnly": true}],
                    "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                                        "capabilities": {"drop": ["ALL"]}},
                }],
                "volumes": [{"name": "cert", "secret": {"secretName": "tls-app-cert"}}],
            },
        }},
    })
}

/// One TLS handshake with SNI `name` through sish's SNI port on loopback, trusting only `ca`:
/// the certificate the server presented (DER).
async fn handshake(ca_pem: &str, name: &str) -> Result<Vec<u8>, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    let ca: rustls::pki_types::CertificateDer<'static> =
        rustls::pki_types::pem::PemObject::from_pem_slice(ca_pem.as_bytes()).map_err(|e| e.to_string())?;
    roots.add(ca).map_err(|e| e.to_string())?;
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect("127.0.0.1:443").await.map_err(|e| format!("connect: {e}"))?;
    let server_name = rustls::pki_types::ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
    let tls = tokio::time::timeout(Duration::from_secs(5), connector.connect(server_name, tcp))
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| format!("handshake: {e}"))?;
    let (_, session) = tls.get_ref();
    let chain = session.peer_certificates().ok_or("no peer certificate")?;
    Ok(chain[0].as_ref().to_vec())
}

#[tokio::test]
#[ignore = "needs the test ground with a real node (scripts/build-testground, scripts/build-node-images)"]
async fn tls_passthrough_reaches_the_pods_own_tls_server_through_sish() {
    let ground = support::ground().await;
    let client = ground.client().await.unwrap();
    let (stack, ns) = support::stack_and_namespace(ground, "tls-pass").await;
    kubectl(ground, &["apply", "-f", "deploy/base/classes.yaml"]);
    let user = &stack.user;
    // sish names an SNI forward for `secure` as it names an HTTP one: `{name}-{user}.{domain}`.
    let public = format!("secure-{user}.{}", picotun_testground::tunnels::SISH_DOMAIN);

    // The pod's own certificate, for the public name, from a CA only this test trusts.
    let ca = Ca::new("tls-passthrough-test-ca").unwrap();
    let leaf = ca.issue(&public, &[&public], &[], &[], Usage::Server).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (crt, key) = leaf.write(dir.path(), "tls").unwrap();
    kubectl(
        ground,
        &[
            "-n",
            &ns,
            "create",
            "secret",
            "tls",
            "tls-app-cert",
            &format!("--cert={}", crt.display()),
            &format!("--key={}", key.display()),
        ],
    );
    let leaf_der: Vec<u8> = {
        let der: rustls::pki_types::CertificateDer<'static> =
            rustls::pki_types::pem::PemObject::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap();
        der.as_ref().to_vec()
    };

    let started = Instant::now();
    apply(ground, &ns, &tls_app());
    apply(
        ground,
        &ns,
        &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "tls-app"},
            "spec": {"selector": {"app": "tls-app"}, "ports": [{"name": "tls", "port": 443, "targetPort": "tls"}]}}),
    );
    apply(
        ground,
        &ns,
        &json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "metadata": {"name": "tls-gateway"},
            "spec": {"gatewayClassName": "pico-tunnel", "listeners": [
                {"name": "tls", "protocol": "TLS", "port": 443, "tls": {"mode": "Passthrough"}}]}}),
    );
    apply(
        ground,
        &ns,
        &json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "TLSRoute", "metadata": {"name": "secure"},
            "spec": {"parentRefs": [{"name": "tls-gateway", "sectionName": "tls"}], "hostnames": ["secure"],
                     "rules": [{"backendRefs": [{"name": "tls-app", "port": 443}]}]}}),
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let ready = support::ready_pods(&pods, "app=tls-app", 1, Duration::from_secs(90)).await;
    let pod = ready[0].metadata.name.clone().unwrap();
    println!("pod {pod} Ready {:.1}s after apply", started.elapsed().as_secs_f32());

    // The sidecar was told to open a tls tunnel for `secure`.
    let tunnels: Value = serde_json::from_str(
        ready[0].metadata.annotations.as_ref().and_then(|a| a.get("tunnels.pico.sh/tunnels")).unwrap(),
    )
    .unwrap_or(Value::Null);
    let gateways: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &GatewayKind::Gateway.api_resource());
    let status =
        wait_for("Gateway Programmed at the TLS name", Duration::from_secs(60), Duration::from_millis(250), || async {
            let gw = gateways.get("tls-gateway").await.map_err(|e| e.to_string())?;
            let s = gw.data["status"].clone();
            let programmed = condition(&s["conditions"], "Programmed")["status"] == "True";
            let has = s["addresses"].as_array().into_iter().flatten().any(|a| a["value"] == public.as_str());
            if programmed && has { Ok(Some(s)) } else { Err(s.to_string()) }
        })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e}\ntunnels file at Ready: {tunnels}\ncontroller log:\n{}\nagent log:\n{}\nsish log:\n{}",
                stack.controller.log_tail(30),
                kubectl(ground, &["-n", &ns, "logs", &pod, "-c", "picotun-agent"]),
                stack.sish.log_tail(30)
            )
        });
    println!("Gateway status: {status}");
    let agent = kubectl(ground, &["-n", &ns, "logs", &pod, "-c", "picotun-agent"]);
    assert!(agent.contains("forward established"), "{agent}");

    // A visitor's TLS client, SNI = the published name, through sish's port 443: the pod's own
    // server answers, with the pod's certificate (verified against the test's CA for that name).
    let seen =
        wait_for("a TLS handshake through sish", Duration::from_secs(30), Duration::from_millis(250), || async {
            handshake(&ca.cert_pem(), &public).await.map(Some)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\nsish log:\n{}", stack.sish.log_tail(30)));
    assert_eq!(seen, leaf_der, "the certificate presented is the pod's own");
    println!(
        "TLS handshake with SNI {public} via 127.0.0.1:443 saw the pod's certificate {:.1}s after apply",
        started.elapsed().as_secs_f32()
    );
    // A name sish has no forward for is not routed to the pod.
    let other = format!("nobody-{user}.{}", picotun_testground::tunnels::SISH_DOMAIN);
    assert!(handshake(&ca.cert_pem(), &other).await.is_err(), "SNI {other} must not reach the pod");

    support::delete_namespace(ground, &ns).await;
    stack.remove(ground).await;
}
