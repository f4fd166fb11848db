//! The real cert-manager on a test-ground control plane: its controller (Issuers, Certificates,
//! CertificateRequests, renewals) and its CA injector (`cert-manager.io/inject-ca-from` ->
//! `caBundle`), built from cert-manager's source by `scripts/build-testground` and run out of
//! cluster as local processes against the ground's apiserver. The ground already installs
//! cert-manager's CRDs (at the same version, `testground/crds/go.mod`).
//!
//! cert-manager's own admission webhook (validation beyond the CRD schemas, such as a Certificate
//! duration of at least 1h) is not run: the apiserver would have to reach it through a Service.
//! Tests keep to what it would accept.
//!
//! ```no_run
//! # async fn t() -> Result<(), picotun_testground::Error> {
//! use picotun_testground::{ControlPlane, cert_manager::CertManager};
//! let ground = ControlPlane::start(Default::default()).await?;
//! let cert_manager = CertManager::start(&ground).await?;
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

use crate::process::{self, Proc};
use crate::{ControlPlane, Error, Result, bins, free_port, wait_for_unless};

/// The controller's binary in the test ground's bin directory.
pub const CONTROLLER: &str = "cert-manager-controller";
/// The CA injector's binary in the test ground's bin directory.
pub const CAINJECTOR: &str = "cert-manager-cainjector";

/// cert-manager's controller and cainjector, running against one control plane.
pub struct CertManager {
    kubeconfig: PathBuf,
    dir: PathBuf,
    procs: Mutex<Vec<Proc>>,
    controller_metrics: String,
    cainjector_metrics: String,
}

static SHARED: OnceCell<std::result::Result<CertManager, String>> = OnceCell::const_new();

impl CertManager {
    /// cert-manager for `ground`, started on the first call and shared by every test of this test
    /// binary (cert-manager watches the whole cluster: one per control plane). A failed start is
    /// remembered, so later tests fail fast with the same message. Every call must name the same
    /// control plane.
    pub async fn shared(ground: &ControlPlane) -> Result<&'static CertManager> {
        let res = SHARED.get_or_init(|| async { Self::start(ground).await.map_err(|e| e.to_string()) }).await;
        let cert_manager = res.as_ref().map_err(|e| Error::Setup(format!("cert-manager did not start: {e}")))?;
        if cert_manager.kubeconfig != ground.kubeconfig() {
            return Err(Error::Setup(format!(
                "cert-manager already runs in this test binary for the control plane of {}, not {}",
                cert_manager.kubeconfig.display(),
                ground.kubeconfig().display()
            )));
        }
        Ok(cert_manager)
    }

    /// Starts the controller and the cainjector against `ground` (its admin kubeconfig) and waits
    /// until both serve their metrics and the controller's /livez answers.
    pub async fn start(ground: &ControlPlane) -> Result<CertManager> {
        let started = Instant::now();
        // Both binaries are checked before anything starts, so one message names what is missing.
        let missing: Vec<&str> = [CONTROLLER, CAINJECTOR].into_iter().filter(|b| bins::bin(b).is_err()).collect();
        if !missing.is_empty() {
            return Err(Error::MissingBinary {
                name: missing.join("` and `"),
                dir: bins::bin_dir(),
                hint: "; they are built from cert-manager's source tarball (cmd/controller, cmd/cainjector; \
                       see shared/third_party/README.md)"
                    .into(),
            });
        }
        let dir = tempfile::Builder::new()
            .prefix("picotun-cert-manager-")
            .tempdir()
            .map_err(|e| Error::io(&std::env::temp_dir(), e))?
            .keep();
        process::remove_at_exit(&dir);
        let kubeconfig = ground.kubeconfig().to_path_buf();
        let controller_metrics = format!("127.0.0.1:{}", free_port());
        let cainjector_metrics = format!("127.0.0.1:{}", free_port());
        let healthz = format!("127.0.0.1:{}", free_port());
        let cert_manager = CertManager {
            kubeconfig: kubeconfig.clone(),
            dir: dir.clone(),
            procs: Mutex::new(Vec::new()),
            controller_metrics: controller_metrics.clone(),
            cainjector_metrics: cainjector_metrics.clone(),
        };
        let common = |metrics: &str| {
            [
                format!("--kubeconfig={}", kubeconfig.display()),
                // One replica, out of cluster: no Lease to win first.
                "--leader-elect=false".to_string(),
                // The default 0.0.0.0:9402 may be taken, and nothing here listens beyond loopback.
                format!("--metrics-listen-address={metrics}"),
                "--v=2".into(),
            ]
        };
        let mut cmd = Command::new(bins::bin(CONTROLLER)?);
        cmd.args(common(&controller_metrics)).args([
            // The liveness server (default 0.0.0.0:9403); hidden in --help, but a flag.
            format!("--internal-healthz-listen-address={healthz}"),
            // ClusterIssuers' Secrets would live here (cert-manager's default namespace is not
            // made by the ground).
            "--cluster-resource-namespace=kube-system".into(),
        ]);
        cert_manager.spawn(CONTROLLER, cmd)?;
        let mut cmd = Command::new(bins::bin(CAINJECTOR)?);
        // cainjector's --kubeconfig shadows controller-runtime's flag of the same name, and
        // controller-runtime, which makes the client, then finds none: it reads $KUBECONFIG.
        cmd.args(common(&cainjector_metrics)).env("KUBECONFIG", &kubeconfig);
        cert_manager.spawn(CAINJECTOR, cmd)?;

        let up = async {
            cert_manager.wait_http_ok("cert-manager controller /livez", &healthz, "/livez").await?;
            cert_manager.wait_http_ok("cert-manager controller metrics", &controller_metrics, "/metrics").await?;
            cert_manager.wait_http_ok("cert-manager cainjector metrics", &cainjector_metrics, "/metrics").await
        };
        if let Err(e) = up.await {
            cert_manager.stop();
            return Err(e);
        }
        tracing::info!(dir = %dir.display(), secs = started.elapsed().as_secs_f32(), "cert-manager running");
        Ok(cert_manager)
    }

    fn spawn(&self, name: &str, cmd: Command) -> Result<()> {
        let proc = Proc::spawn(name, cmd, &self.dir.join(format!("{name}.log")))?;
        self.procs.lock().unwrap_or_else(|p| p.into_inner()).push(proc);
        Ok(())
    }

    async fn wait_http_ok(&self, what: &str, addr: &str, path: &str) -> Result<()> {
        wait_for_unless(
            what,
            Duration::from_secs(60),
            Duration::from_millis(100),
            || self.check_running().err(),
            || async {
                match crate::http::get(addr, "127.0.0.1", path).await {
                    Ok(resp) if resp.status == 200 => Ok(Some(())),
                    Ok(resp) => Err(format!("{} {:.200}", resp.status, resp.body)),
                    Err(e) => Err(e.to_string()),
                }
            },
        )
        .await
    }

    /// Fails (with the log tail) if the controller or the cainjector has exited.
    pub fn check_running(&self) -> Result<()> {
        for p in self.procs.lock().unwrap_or_else(|p| p.into_inner()).iter_mut() {
            p.check_running()?;
        }
        Ok(())
    }

    /// The (name, PID) of the controller and the cainjector.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.procs.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|p| (p.name().to_string(), p.pid())).collect()
    }

    /// The last `lines` lines of each process's log, headed by its name: for failure messages.
    pub fn log_tails(&self, lines: usize) -> String {
        let procs = self.procs.lock().unwrap_or_else(|p| p.into_inner());
        procs.iter().map(|p| format!("--- {} ({})\n{}", p.name(), p.log_path().display(), p.log_tail(lines))).collect()
    }

    /// The controller's Prometheus metrics address (`127.0.0.1:PORT`).
    pub fn controller_metrics(&self) -> &str {
        &self.controller_metrics
    }

    /// The cainjector's Prometheus metrics address (`127.0.0.1:PORT`).
    pub fn cainjector_metrics(&self) -> &str {
        &self.cainjector_metrics
    }

    /// The directory holding the logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops both (SIGTERM, then SIGKILL after a short grace). Idempotent.
    pub fn stop(&self) {
        let mut procs = self.procs.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(mut p) = procs.pop() {
            p.stop(Duration::from_secs(3));
        }
    }
}

impl Drop for CertManager {
    fn drop(&mut self) {
        self.stop();
    }
}
