//! The real cert-manager -- its controller and cainjector, built from cert-manager's source and
//! run by the test ground (`picotun_testground::cert_manager`) -- doing its part of deploy/:
//!
//! - `kubectl apply -k deploy/` gets the webhook its serving certificate (Certificate Ready, the
//!   Secret the Deployment mounts, issued by picotun's own CA for the Service's names) and the
//!   MutatingWebhookConfiguration its caBundle, from cainjector;
//! - renewals of a short-lived certificate from the same CA, while pods are created without pause,
//!   lose no admission: the real `picotun webhook`, run as deploy/ runs it, follows the renewed
//!   files and the apiserver trusts it through the caBundle cainjector wrote;
//! - the path the sidecars report on (the same certificate, checked against the CA the webhook
//!   hands them) keeps working across the renewals: a real `picotun agent` posting to `/report`,
//!   and a TLS client checking the Service name the sidecars dial.

use std::collections::BTreeMap;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use picotun_testground::bins::repo_root;
use picotun_testground::cert_manager::CertManager;
use picotun_testground::kube_ground::StartOptions;
use picotun_testground::{ControlPlane, Proc, SshClientKey, TestNamespace, free_port, http, wait_for, wait_for_unless};
use serde_json::{Value, json};
use tokio::sync::OnceCell;

use crate::deploy::{
    SYSTEM_NAMESPACE, command_of, doc, env_value, kubeconfig_for, kubectl, render, run, sidecar, start_until_ready,
};
use crate::report::{AUDIENCE, metric, token};

/// How long the renewal tests' certificates live, and how long before expiry cert-manager
/// renews them: a renewal every 30 s. cert-manager's own webhook (which the ground does not run)
/// refuses a duration under 1h and a renewBefore under 5m or not below the duration; these keep
/// to that. The renewal interval (duration - renewBefore) it does not bound: 30 s leaves
/// cert-manager time to issue and the webhook time to reload between two renewals.
const SHORT_DURATION: &str = "1h";
const SHORT_RENEW_BEFORE: &str = "59m30s";
/// Renewals each renewal test waits to see served.
const RENEWALS: usize = 2;

/// A control plane of these tests' own. deploy/ is applied here for real, and its
/// MutatingWebhookConfiguration sends every pod of every namespace labeled for injection to
/// Service picotun-webhook, whose endpoints here are kwok pods that serve nothing, at addresses
/// off loopback: no namespace of this ground is ever labeled, and no other test's pods meet it.
/// (cert-manager watches the whole cluster, too.)
static GROUND: OnceCell<Result<ControlPlane, String>> = OnceCell::const_new();

/// deploy/ applied once, with its certificates issued.
struct Installed {
    ground: &'static ControlPlane,
    cert_manager: &'static CertManager,
    /// deploy/ as `kubectl kustomize` renders it.
    docs: Vec<Value>,
    applied: Instant,
    /// From `kubectl apply -k deploy/` until Certificate picotun-webhook was Ready.
    issued_after: Duration,
}

static INSTALLED: OnceCell<Result<Installed, String>> = OnceCell::const_new();

async fn installed() -> &'static Installed {
    INSTALLED.get_or_init(install).await.as_ref().unwrap_or_else(|e| panic!("{e}"))
}

async fn install() -> Result<Installed, String> {
    let ground = GROUND
        .get_or_init(|| async { ControlPlane::start(StartOptions::default()).await.map_err(|e| e.to_string()) })
        .await
        .as_ref()
        .map_err(|e| format!("the cert-manager tests' control plane did not start: {e}"))?;
    let started = Instant::now();
    let cert_manager = CertManager::shared(ground).await.map_err(|e| e.to_string())?;
    eprintln!("cert-manager controller and cainjector up after {:.1?}", started.elapsed());

    let deploy = repo_root().join("deploy");
    let docs = render(&deploy);
    let applied = Instant::now();
    let (ok, out, err) = run(kubectl(ground.kubeconfig()).arg("apply").arg("-k").arg(&deploy), "");
    if !ok {
        return Err(format!("kubectl apply -k deploy/ failed:\n{err}\n{out}"));
    }
    eprint!("kubectl apply -k deploy/:\n{out}");
    let client = ground.client().await.map_err(|e| e.to_string())?;
    let certificates = certificates(&client, SYSTEM_NAMESPACE);
    for name in ["picotun-ca", "picotun-webhook"] {
        wait_ready(&certificates, cert_manager, name).await?;
        eprintln!("Certificate {name} Ready {:.1?} after kubectl apply", applied.elapsed());
    }
    Ok(Installed { ground, cert_manager, docs, applied, issued_after: applied.elapsed() })
}

fn certificates(client: &kube::Client, namespace: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("cert-manager.io", "v1", "Certificate");
    Api::namespaced_with(client.clone(), namespace, &ApiResource::from_gvk_with_plural(&gvk, "certificates"))
}

fn is_ready(certificate: &Value) -> bool {
    certificate["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// Waits (up to 3 minutes) until Certificate `name` is Ready. On a timeout the error has its
/// status and cert-manager's logs.
async fn wait_ready(api: &Api<DynamicObject>, cert_manager: &CertManager, name: &str) -> Result<(), String> {
    wait_for_unless(
        &format!("Certificate {name} Ready"),
        Duration::from_secs(180),
        Duration::from_millis(200),
        || cert_manager.check_running().err(),
        || async {
            let certificate = serde_json::to_value(api.get(name).await.map_err(|e| e.to_string())?).unwrap();
            if is_ready(&certificate) { Ok(Some(())) } else { Err(format!("status {}", certificate["status"])) }
        },
    )
    .await
    .map_err(|e| format!("{e}\n{}", cert_manager.log_tails(30)))
}

/// A certificate's serial number (hex, colon-separated) from its PEM.
fn serial_of(pem: &[u8]) -> String {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).expect("a PEM certificate");
    pem.parse_x509().expect("an X.509 certificate").tbs_certificate.raw_serial_as_string()
}

fn roots(ca_pem: &str) -> Arc<rustls::RootCertStore> {
    use rustls::pki_types::pem::PemObject;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for ca in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(ca.expect("PEM")).unwrap();
    }
    Arc::new(roots)
}

/// Checks `leaf_pem` the way a TLS client trusting only `ca_pem` would for `name`: chain,
/// validity, name and server-auth usage.
fn verify_for(ca_pem: &str, leaf_pem: &[u8], name: &str) -> Result<(), String> {
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject};
    let verifier = rustls::client::WebPkiServerVerifier::builder(roots(ca_pem)).build().unwrap();
    let leaf = CertificateDer::from_pem_slice(leaf_pem).map_err(|e| e.to_string())?;
    let name = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
    verifier.verify_server_cert(&leaf, &[], &name, &[], UnixTime::now()).map(|_| ()).map_err(|e| e.to_string())
}

/// The serial of the certificate a new TLS connection to `addr` is served, checked by a client
/// that trusts only `ca_pem` and expects `name`.
async fn served_serial(addr: &str, ca_pem: &str, name: &str) -> Result<String, String> {
    let roots = roots(ca_pem);
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let server_name = rustls::pki_types::ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
    let handshake = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let tls = connector.connect(server_name, tcp).await.map_err(|e| e.to_string())?;
        let der = tls.get_ref().1.peer_certificates().ok_or("no certificate")?[0].to_vec();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| e.to_string())?;
        Ok(cert.tbs_certificate.raw_serial_as_string())
    };
    tokio::time::timeout(Duration::from_secs(10), handshake).await.map_err(|_| "no handshake within 10s".to_string())?
}

/// The caBundle of webhook configuration `name` once cainjector has filled it (up to a minute).
async fn injected_ca_bundle(client: &kube::Client, name: &str, cert_manager: &CertManager) -> Vec<u8> {
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    wait_for("cainjector to fill the caBundle", Duration::from_secs(60), Duration::from_millis(200), || async {
        let config = configs.get(name).await.map_err(|e| e.to_string())?;
        let bundle = config.webhooks.unwrap_or_default().first().and_then(|w| w.client_config.ca_bundle.clone());
        Ok(bundle.filter(|b| !b.0.is_empty()).map(|b| b.0))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cert_manager.log_tails(30)))
}

fn bytes<'a>(data: &'a BTreeMap<String, ByteString>, key: &str) -> &'a [u8] {
    &data.get(key).unwrap_or_else(|| panic!("the Secret has no {key}")).0
}

#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn deploy_gets_the_webhook_its_certificate_and_ca_bundle_from_the_real_cert_manager() {
    let inst = installed().await;
    let client = inst.ground.client().await.unwrap();
    let wanted = &doc(&inst.docs, "Certificate", "picotun-webhook")["spec"];
    let secret_name = wanted["secretName"].as_str().unwrap();

    // The Secret the Certificate fills is the one the webhook mounts, and the sidecars are
    // pointed at its ca.crt.
    let pod_spec = &doc(&inst.docs, "Deployment", "picotun-webhook")["spec"]["template"]["spec"];
    let volume = pod_spec["volumes"].as_array().unwrap().iter().find(|v| v["secret"].is_object()).unwrap();
    assert_eq!(volume["secret"]["secretName"], secret_name);
    let container = &pod_spec["containers"][0];
    let mount = container["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == volume["name"]).unwrap();
    assert_eq!(
        env_value(container, "PICOTUN_AGENT_REPORT_CA_FILE").as_str().unwrap(),
        format!("{}/ca.crt", mount["mountPath"].as_str().unwrap())
    );

    let secrets: Api<Secret> = Api::namespaced(client.clone(), SYSTEM_NAMESPACE);
    let secret = secrets.get(secret_name).await.unwrap();
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    let data = secret.data.unwrap();
    let (ca_pem, leaf_pem) = (bytes(&data, "ca.crt"), bytes(&data, "tls.crt"));
    assert!(!bytes(&data, "tls.key").is_empty());
    // ca.crt is picotun's own CA: Certificate picotun-ca, self-signed by Issuer picotun-selfsigned.
    let ca_secret = secrets.get("picotun-ca").await.unwrap().data.unwrap();
    assert_eq!(ca_pem, bytes(&ca_secret, "tls.crt"), "the webhook's CA is Certificate picotun-ca");

    let (_, pem) = x509_parser::pem::parse_x509_pem(leaf_pem).unwrap();
    let leaf = pem.parse_x509().unwrap();
    let (_, ca) = x509_parser::pem::parse_x509_pem(ca_pem).unwrap();
    let ca = ca.parse_x509().unwrap();
    assert!(ca.is_ca(), "picotun-ca is a CA");
    assert_eq!(leaf.issuer(), ca.subject());
    let mut names: Vec<String> = leaf
        .subject_alternative_name()
        .unwrap()
        .expect("SANs")
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .collect();
    names.sort();
    let mut want_names: Vec<String> =
        wanted["dnsNames"].as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_string()).collect();
    want_names.sort();
    assert_eq!(names, want_names, "the Service's names, as deploy/ asks");
    let common_name = leaf.subject().iter_common_name().next().and_then(|c| c.as_str().ok());
    assert_eq!(common_name, wanted["commonName"].as_str());
    let lifetime = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert_eq!(lifetime, 2160 * 3600, "duration 2160h");
    assert!(leaf.extended_key_usage().unwrap().unwrap().value.server_auth);
    match leaf.public_key().parsed().unwrap() {
        x509_parser::public_key::PublicKey::EC(point) => assert_eq!(point.key_size(), 256, "ECDSA P-256"),
        other => panic!("not an ECDSA key: {other:?}"),
    }
    for name in &want_names {
        verify_for(std::str::from_utf8(ca_pem).unwrap(), leaf_pem, name)
            .unwrap_or_else(|e| panic!("{name}: a client trusting ca.crt refuses the certificate: {e}"));
    }

    // cainjector copies ca.crt into the webhook configuration deploy/ annotated.
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let bundle = injected_ca_bundle(&client, "picotun-webhook", inst.cert_manager).await;
    let bundle_after = inst.applied.elapsed();
    assert_eq!(bundle, ca_pem, "the caBundle is the CA that signed the serving certificate");
    let config = configs.get("picotun-webhook").await.unwrap();
    assert_eq!(
        config.metadata.annotations.unwrap_or_default().get("cert-manager.io/inject-ca-from").map(String::as_str),
        Some(format!("{SYSTEM_NAMESPACE}/picotun-webhook").as_str())
    );
    eprintln!(
        "cert-manager: {secret_name} issued {:.1?} after `kubectl apply -k deploy/` (serial {}, for {}), \
         caBundle filled by cainjector by {bundle_after:.1?}",
        inst.issued_after,
        serial_of(leaf_pem),
        want_names.join(", ")
    );
}

/// `picotun webhook` as deploy/ runs it (its args, its environment, picotun-config, its service
/// account's token), serving a Certificate made from deploy/'s picotun-webhook but short-lived, so
/// the real cert-manager renews it every 30 s, from the same CA Issuer. The apiserver calls it at
/// a loopback URL through a copy of deploy/'s webhook configuration whose caBundle cainjector
/// writes, for one test namespace.
struct RenewingWebhook {
    client: kube::Client,
    ns: TestNamespace,
    certificate: String,
    config_name: String,
    port: u16,
    /// The admission port (/mutate).
    addr: String,
    /// The sidecars' port (/report, /certificate): the same certificate.
    agent_addr: String,
    admin: String,
    /// The caBundle cainjector wrote.
    ca_pem: String,
    /// The serial of every certificate the synced files held, in order.
    issued: Arc<Mutex<Vec<(String, Instant)>>>,
    webhook: Proc,
    sync: tokio::task::JoinHandle<()>,
    dir: tempfile::TempDir,
}

impl RenewingWebhook {
    async fn start(inst: &'static Installed, prefix: &str) -> RenewingWebhook {
        let client = inst.ground.client().await.unwrap();
        // Not labeled for injection: see GROUND. The webhook configuration below selects it by name.
        let ns = inst.ground.namespace(prefix).await.unwrap();
        let certificate = format!("picotun-webhook-{}", ns.name());
        let secret_name = format!("{certificate}-tls");
        let mut object = doc(&inst.docs, "Certificate", "picotun-webhook").clone();
        object["metadata"] = json!({"name": certificate, "namespace": SYSTEM_NAMESPACE});
        let spec = &mut object["spec"];
        spec["secretName"] = secret_name.clone().into();
        spec["duration"] = SHORT_DURATION.into();
        spec["renewBefore"] = SHORT_RENEW_BEFORE.into();
        // The apiserver checks the certificate against the URL's host, and the Service's names
        // cannot lead to loopback here: 127.0.0.1 and localhost join them (the Service's names
        // stay, and are what the sidecars check). Two names for one address let a test send the
        // apiserver to the webhook on a new connection (`point_at`).
        spec["ipAddresses"] = json!(["127.0.0.1"]);
        spec["dnsNames"].as_array_mut().unwrap().push("localhost".into());
        let certificates = certificates(&client, SYSTEM_NAMESPACE);
        certificates.create(&PostParams::default(), &serde_json::from_value(object).unwrap()).await.unwrap();
        let started = Instant::now();
        wait_ready(&certificates, inst.cert_manager, &certificate).await.unwrap();
        eprintln!(
            "Certificate {certificate} (duration {SHORT_DURATION}, renewBefore {SHORT_RENEW_BEFORE}) issued in {:.1?}",
            started.elapsed()
        );

        // The Secret as the kubelet projects it into the webhook pod's volume.
        let dir = tempfile::tempdir().unwrap();
        let volume = dir.path().join("webhook-tls");
        std::fs::create_dir(&volume).unwrap();
        let issued = Arc::new(Mutex::new(Vec::new()));
        let secrets: Api<Secret> = Api::namespaced(client.clone(), SYSTEM_NAMESPACE);
        let mut synced =
            SecretVolume { secrets, name: secret_name, dir: volume.clone(), last: None, issued: issued.clone() };
        while !synced.sync_once().await {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let sync = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                synced.sync_once().await;
            }
        });

        let identity = kubeconfig_for(inst.ground.kubeconfig(), "picotun-webhook", dir.path());
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let agent_addr = format!("127.0.0.1:{}", free_port());
        let admin = format!("127.0.0.1:{}", free_port());
        let mut cmd = command_of(&inst.docs, "picotun-webhook", &format!("picotun-webhook-{prefix}"));
        cmd.env("PICOTUN_WEBHOOK_LISTEN", &addr)
            .env("PICOTUN_WEBHOOK_AGENT_LISTEN", &agent_addr)
            .env("PICOTUN_ADMIN_ADDR", &admin)
            .env("PICOTUN_WEBHOOK_CERT_FILE", volume.join("tls.crt"))
            .env("PICOTUN_WEBHOOK_KEY_FILE", volume.join("tls.key"))
            .env("PICOTUN_AGENT_REPORT_CA_FILE", volume.join("ca.crt"))
            // The webhook configuration below selects this one namespace by name, not by the
            // injection label: the sidecar endpoints serve the namespaces it is registered for.
            .env("PICOTUN_INJECTION_NAMESPACE_SELECTOR", format!("kubernetes.io/metadata.name={}", ns.name()))
            .env("KUBECONFIG", &identity)
            // Failed handshakes are logged at debug level.
            .env("PICOTUN_LOG", "picotun=debug,info");
        let webhook = start_until_ready("picotun-webhook", cmd, &admin, dir.path()).await;

        // deploy/'s webhook configuration, at a loopback URL, for this namespace only, with
        // cainjector told to fill its caBundle from the short-lived Certificate. Fail instead of
        // deploy/'s Ignore: an admission the webhook lost is then a refused pod, not a plain one
        // (the test counts both).
        let mut config = doc(&inst.docs, "MutatingWebhookConfiguration", "picotun-webhook").clone();
        let config_name = format!("picotun-webhook-{}", ns.name());
        config["metadata"] = json!({
            "name": config_name,
            "annotations": {"cert-manager.io/inject-ca-from": format!("{SYSTEM_NAMESPACE}/{certificate}")},
        });
        let hook = &mut config["webhooks"][0];
        hook["clientConfig"] = json!({"url": format!("https://{addr}/mutate")});
        hook["namespaceSelector"] = json!({"matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": [ns.name()]},
        ]});
        hook["failurePolicy"] = "Fail".into();
        let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
        configs.create(&PostParams::default(), &serde_json::from_value(config).unwrap()).await.unwrap();
        let ca_pem = String::from_utf8(injected_ca_bundle(&client, &config_name, inst.cert_manager).await).unwrap();
        let on_disk = std::fs::read_to_string(volume.join("ca.crt")).unwrap();
        assert_eq!(ca_pem, on_disk, "cainjector wrote the Secret's ca.crt");

        let renewing = RenewingWebhook {
            client,
            ns,
            certificate,
            config_name,
            port,
            addr,
            agent_addr,
            admin,
            ca_pem,
            issued,
            webhook,
            sync,
            dir,
        };
        renewing.wait_active().await;
        renewing
    }

    /// Points the webhook configuration at `https://{host}:{port}/mutate`. The apiserver keeps
    /// one connection per address open while it is busy; a new host makes it open another (with a
    /// handshake, and the certificate served now) once it has seen the change.
    async fn point_at(&self, host: &str) {
        let patch = json!([{"op": "replace", "path": "/webhooks/0/clientConfig/url",
                            "value": format!("https://{host}:{}/mutate", self.port)}]);
        let patch: json_patch::Patch = serde_json::from_value(patch).unwrap();
        Api::<MutatingWebhookConfiguration>::all(self.client.clone())
            .patch(&self.config_name, &PatchParams::default(), &Patch::<()>::Json(patch))
            .await
            .unwrap();
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), self.ns.name())
    }

    /// Creates opted-in probe pods until the apiserver calls the webhook (it picks a new
    /// configuration up within a moment; until then pods are admitted plain, or refused while it
    /// has the configuration but not yet the caBundle).
    async fn wait_active(&self) {
        let mut n = 0;
        wait_for(
            "the webhook configuration to take effect",
            Duration::from_secs(30),
            Duration::from_millis(200),
            || {
                n += 1;
                let pods = self.pods();
                async move {
                    let created = pods.create(&PostParams::default(), &opted_in_pod(&format!("probe-{n}"))).await;
                    Ok(sidecar(&created.map_err(|e| e.to_string())?).is_some().then_some(()))
                }
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\nwebhook log:\n{}", self.webhook.log_tail(30)));
    }

    fn issued(&self) -> Vec<(String, Instant)> {
        self.issued.lock().unwrap().clone()
    }

    /// Follows the certificate new TLS connections to `addr` get, checked as a client trusting
    /// `ca_pem` for `name`, every 250 ms, until it has changed `renewals` times; returns the
    /// serials in order, and how many handshakes it made. Any handshake that fails fails the test.
    async fn follow_renewals(
        &self,
        addr: &str,
        renewals: usize,
        ca_pem: &str,
        name: &str,
        cert_manager: &CertManager,
    ) -> (Vec<String>, u64) {
        let started = Instant::now();
        let mut served = vec![served_serial(addr, ca_pem, name).await.unwrap()];
        let mut handshakes = 1;
        eprintln!("[{:>6.1?}] served: serial {}", started.elapsed(), served[0]);
        while served.len() <= renewals {
            assert!(
                started.elapsed() < Duration::from_secs(300),
                "{} renewals served after 5 minutes (serials served {served:?}, issued {:?})\n{}",
                served.len() - 1,
                self.issued().iter().map(|(s, _)| s).collect::<Vec<_>>(),
                cert_manager.log_tails(30)
            );
            cert_manager.check_running().unwrap();
            tokio::time::sleep(Duration::from_millis(250)).await;
            let serial = served_serial(addr, ca_pem, name)
                .await
                .unwrap_or_else(|e| panic!("handshake {handshakes} as {name} failed during the renewals: {e}"));
            handshakes += 1;
            if served.last() != Some(&serial) {
                let issued = self.issued();
                let at = issued.iter().find(|(s, _)| *s == serial).map(|(_, at)| at.elapsed());
                let at = at.map(|at| format!(" (in the synced files for {at:.1?})")).unwrap_or_default();
                eprintln!("[{:>6.1?}] served: serial {serial}{at}", started.elapsed());
                served.push(serial);
            }
        }
        eprintln!("{handshakes} TLS handshakes as {name}, none refused");
        (served, handshakes)
    }

    async fn metrics(&self) -> String {
        http::get(&self.admin, "w", "/metrics").await.map(|r| r.body).unwrap_or_default()
    }

    /// Every served serial was issued by cert-manager, in the order it issued them.
    fn assert_served_in_order(&self, served: &[String]) {
        let issued: Vec<String> = self.issued().into_iter().map(|(s, _)| s).collect();
        let mut rest = issued.iter();
        for s in served {
            assert!(rest.any(|i| i == s), "served {served:?}, issued {issued:?}");
        }
    }

    async fn finish(self, inst: &Installed) {
        self.sync.abort();
        let configs: Api<MutatingWebhookConfiguration> = Api::all(self.client.clone());
        let config = configs.get(&self.config_name).await.unwrap();
        let bundle = config.webhooks.unwrap_or_default()[0].client_config.ca_bundle.clone().unwrap().0;
        assert_eq!(bundle, self.ca_pem.as_bytes(), "the caBundle stayed the same CA across the renewals");
        let _ = configs.delete(&self.config_name, &DeleteParams::default()).await;
        let certificates = certificates(&self.client, SYSTEM_NAMESPACE);
        let certificate = serde_json::to_value(certificates.get(&self.certificate).await.unwrap()).unwrap();
        eprintln!(
            "Certificate {}: revision {}, renewal time {}",
            self.certificate, certificate["status"]["revision"], certificate["status"]["renewalTime"]
        );
        let _ = certificates.delete(&self.certificate, &DeleteParams::default()).await;
        inst.cert_manager.check_running().unwrap();
        let mut webhook = self.webhook;
        assert!(webhook.is_running(), "{}", webhook.log_tail(30));
        let log = std::fs::read_to_string(webhook.log_path()).unwrap();
        let lines = |what: &str| log.lines().filter(|l| l.contains(what)).map(str::to_string).collect::<Vec<_>>();
        let (reloads, unusable, failed) =
            (lines("serving certificate reloaded"), lines("cannot be used"), lines("TLS handshake failed"));
        // The files can be caught between two swaps (the certificate read before one, the key
        // after it): the webhook then keeps the certificate it has and takes the pair on its next
        // look. Counted, not failed.
        eprintln!(
            "the webhook reloaded its certificate {} times ({} reads caught mid-swap and skipped); {} failed TLS \
             handshakes",
            reloads.len(),
            unusable.len(),
            failed.len()
        );
        assert!(failed.is_empty(), "the webhook logged:\n{}", failed.join("\n"));
        drop(self.dir);
    }
}

/// Secret `name` as the kubelet keeps it in a pod's secret volume: this stands in for the
/// kubelet's refresh of the webhook pod's volume. Each key is a file, and every update is swapped
/// in at once as the kubelet's AtomicWriter does it: the files are links into `..data`, itself a
/// link to a fresh timestamped directory that replaces the old one by rename. The kubelet rewrites
/// the volume on its periodic pod sync, a minute or so after the Secret changed; this within
/// 200 ms. The lag does not matter to an admission: the certificate being replaced stays valid
/// (here for the rest of its hour; with deploy/'s, for the 30 days of renewBefore).
struct SecretVolume {
    secrets: Api<Secret>,
    name: String,
    dir: PathBuf,
    last: Option<BTreeMap<String, ByteString>>,
    issued: Arc<Mutex<Vec<(String, Instant)>>>,
}

impl SecretVolume {
    /// True once the files hold the Secret's current data.
    async fn sync_once(&mut self) -> bool {
        let Ok(Some(secret)) = self.secrets.get_opt(&self.name).await else { return false };
        let data = secret.data.unwrap_or_default();
        if self.last.as_ref() == Some(&data) {
            return true;
        }
        if !["tls.crt", "tls.key", "ca.crt"].iter().all(|k| data.contains_key(*k)) {
            return false;
        }
        write_atomically(&self.dir, &data).unwrap();
        self.issued.lock().unwrap().push((serial_of(&data["tls.crt"].0), Instant::now()));
        self.last = Some(data);
        true
    }
}

fn write_atomically(dir: &Path, data: &BTreeMap<String, ByteString>) -> std::io::Result<()> {
    let stamp = format!("..{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    let fresh = dir.join(&stamp);
    std::fs::create_dir(&fresh)?;
    for (key, value) in data {
        std::fs::write(fresh.join(key), &value.0)?;
    }
    let old = std::fs::read_link(dir.join("..data")).ok();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(&stamp, &tmp)?;
    std::fs::rename(&tmp, dir.join("..data"))?;
    for key in data.keys() {
        let link = dir.join(key);
        if link.symlink_metadata().is_err() {
            symlink(Path::new("..data").join(key), link)?;
        }
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old))?;
    }
    Ok(())
}

/// An opted-in pod that is never scheduled (a scheduling gate nobody lifts): admission is what
/// these tests are about, and thousands of Running kwok pods would only load the ground.
fn opted_in_pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"tunnels.pico.sh/inject": "true"}},
        "spec": {
            "schedulingGates": [{"name": "picotun.dev/admission-test"}],
            "containers": [{"name": "app", "image": "registry.example/app:1"}],
        },
    }))
    .unwrap()
}

#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn renewals_while_pods_are_created_lose_no_admission() {
    let inst = installed().await;
    let webhook = RenewingWebhook::start(inst, "renew-admission").await;
    let connections_before = metric(&webhook.metrics().await, "picotun_webhook_connections_total");

    // One pod after another, each waiting for its admission, until two renewals have been
    // served, the apiserver has connected anew, and a little after.
    let done = Arc::new(AtomicBool::new(false));
    let creator = {
        let (pods, done) = (webhook.pods(), done.clone());
        tokio::spawn(async move {
            let mut results = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let pod = opted_in_pod(&format!("pod-{}", results.len()));
                let created = pods.create(&PostParams::default(), &pod).await;
                results.push(created.map(|p| sidecar(&p).is_some()).map_err(|e| e.to_string()));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            results
        })
    };
    let (served, handshakes) =
        webhook.follow_renewals(&webhook.addr, RENEWALS, &webhook.ca_pem, "127.0.0.1", inst.cert_manager).await;
    let connections = || async { metric(&webhook.metrics().await, "picotun_webhook_connections_total") };
    // The apiserver's own connections: what the webhook accepted less the test's handshakes.
    let apiserver_during = connections().await - connections_before - handshakes;

    // The apiserver opened its connection before the first renewal and keeps it while pods keep
    // coming. Sent to the webhook by its other name, it opens a new one and checks the renewed
    // certificate against the caBundle cainjector wrote -- pods still coming all the while.
    let switched = Instant::now();
    let before_switch = connections().await;
    webhook.point_at("localhost").await;
    wait_for("the apiserver to connect anew", Duration::from_secs(60), Duration::from_millis(100), || async {
        Ok::<_, String>((connections().await > before_switch).then_some(()))
    })
    .await
    .unwrap();
    let reconnected_after = switched.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    done.store(true, Ordering::Relaxed);
    let results = creator.await.unwrap();
    let apiserver_after = connections().await - before_switch;
    let served_now = served_serial(&webhook.addr, &webhook.ca_pem, "localhost").await.unwrap();

    let created = results.iter().filter(|r| r.is_ok()).count();
    let injected = results.iter().filter(|r| matches!(r, Ok(true))).count();
    let refused: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    eprintln!(
        "renewals seen: {} (serials served in turn: {}); pods created: {created}, injected: {injected}, \
         refused: {}. The apiserver's TLS connections to the webhook: {apiserver_during} new during the renewals \
         (it kept the one from before), {apiserver_after} after it was pointed at localhost (seen \
         {reconnected_after:.1?} after the change; serial now served {served_now}); the test's own \
         handshakes: {handshakes}",
        served.len() - 1,
        served.join(" -> "),
        refused.len(),
    );
    assert!(refused.is_empty(), "pods refused during the renewals: {refused:?}");
    assert_eq!(injected, results.len(), "every pod created got the sidecar");
    assert!(created > 0);
    webhook.assert_served_in_order(&served);
    webhook.finish(inst).await;
}

#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn the_sidecars_report_path_keeps_working_across_renewals() {
    let inst = installed().await;
    let webhook = RenewingWebhook::start(inst, "renew-report").await;
    let pods = webhook.pods();

    // What the webhook gives a sidecar to reach it: deploy/'s report URL, and the CA from the
    // mounted Secret's ca.crt -- the CA cainjector put into the caBundle.
    let pod = pods.create(&PostParams::default(), &opted_in_pod("web")).await.unwrap();
    let env: BTreeMap<String, String> = sidecar(&pod)
        .expect("injected")
        .env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        .collect();
    let deployment = &doc(&inst.docs, "Deployment", "picotun-webhook")["spec"]["template"]["spec"]["containers"][0];
    let report_url = &env["PICOTUN_REPORT_URL"];
    assert_eq!(Some(report_url.as_str()), env_value(deployment, "PICOTUN_AGENT_REPORT_URL").as_str());
    let report_ca = &env["PICOTUN_REPORT_CA"];
    assert_eq!(report_ca, &webhook.ca_pem, "sidecars trust the CA the apiserver trusts");
    // The name the sidecars check the certificate against: the Service's, from the URL.
    let host = report_url.trim_start_matches("https://").split(['/', ':']).next().unwrap().to_string();

    // The sidecar, with the environment the webhook gave it. Here its Service is a loopback
    // address, its projected token one the TokenRequest API bound to the pod as the kubelet asks
    // for it, and it has no tunnels (the report path is what is tested; report.rs tunnels for real).
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token(&webhook.client, webhook.ns.name(), Some(&pod), AUDIENCE).await).unwrap();
    let tunnels = dir.path().join("tunnels.json");
    std::fs::write(&tunnels, r#"{"tunnels":[]}"#).unwrap();
    let key = SshClientKey::generate(dir.path(), "agent", "ed25519").unwrap();
    let agent_admin = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_picotun"));
    cmd.args(sidecar(&pod).unwrap().args.iter().flatten()).envs(&env);
    // The Service's agent port, here the webhook's loopback one.
    cmd.env("PICOTUN_REPORT_URL", format!("https://{}/report", webhook.agent_addr))
        .env("PICOTUN_REPORT_TOKEN_FILE", &token_file)
        // A heartbeat every second: a new connection, and handshake, for every report.
        .env("PICOTUN_REPORT_INTERVAL", "1s")
        .env("PICOTUN_TUNNELS_FILE", &tunnels)
        .env("PICOTUN_KEY_FILE", &key.private_key)
        .env("PICOTUN_ADMIN_ADDR", &agent_admin)
        // Without tunnels it dials no tunnel server; pinned to loopback all the same.
        .env("PICOTUN_SERVER", "127.0.0.1")
        .env("PICOTUN_SERVER_PORT", free_port().to_string())
        .env("PICOTUN_INSECURE_SKIP_HOST_KEY_CHECK", "true")
        .env("PICOTUN_LOG", "picotun=debug,info");
    let mut agent = Proc::spawn("picotun-agent", cmd, &dir.path().join("agent.log")).unwrap();
    let reports = |result: &'static str| {
        let admin = agent_admin.clone();
        async move {
            let text = http::get(&admin, "a", "/metrics").await.map(|r| r.body).unwrap_or_default();
            metric(&text, &format!("picotun_agent_reports_total{{result=\"{result}\"}}"))
        }
    };
    wait_for("the agent's first report", Duration::from_secs(30), Duration::from_millis(100), || async {
        Ok::<_, String>((reports("ok").await > 0).then_some(()))
    })
    .await
    .unwrap_or_else(|e| {
        panic!("{e}\nagent log:\n{}\nwebhook log:\n{}", agent.log_tail(30), webhook.webhook.log_tail(30))
    });
    let before = reports("ok").await;

    // The renewals on the sidecars' port, seen by a TLS client that checks the Service name
    // against the sidecars' CA.
    let (served, handshakes) =
        webhook.follow_renewals(&webhook.agent_addr, RENEWALS, report_ca, &host, inst.cert_manager).await;
    // The agent keeps reporting on the last certificate.
    let at_last = reports("ok").await;
    wait_for("reports on the last certificate", Duration::from_secs(30), Duration::from_millis(200), || async {
        Ok::<_, String>((reports("ok").await >= at_last + 3).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail(30)));

    let ok = reports("ok").await;
    let mut failed = 0;
    for result in ["unauthorized", "rejected", "unreachable", "token_unreadable"] {
        failed += reports(result).await;
    }
    let written = pods.get("web").await.unwrap().metadata.annotations.unwrap_or_default();
    eprintln!(
        "renewals seen: {} (serials served in turn: {}); the agent's reports: {ok} accepted ({} during the \
         renewals), {failed} failed; {handshakes} TLS handshakes as {host} trusting the sidecars' CA, none refused",
        served.len() - 1,
        served.join(" -> "),
        ok - before,
    );
    assert_eq!(failed, 0, "no report failed:\n{}", agent.log_tail(30));
    assert_eq!(
        written.get("tunnels.pico.sh/addresses").map(String::as_str),
        Some(r#"{"tunnels":{}}"#),
        "the reports reached the pod"
    );
    assert!(agent.is_running(), "{}", agent.log_tail(30));
    agent.stop(Duration::from_secs(5));
    webhook.assert_served_in_order(&served);
    webhook.finish(inst).await;
}
