//! A real node: kubelet + containerd + runc + CNI, running the pods' containers for real.
//!
//! kwok marks pods Running but runs nothing. This node runs them: Debian's runc and CNI
//! plugins, containerd and the kubelet built from their Go modules, images imported from local
//! tarballs (`scripts/build-node-images`; the node never pulls). The recipe and every trap on the
//! way are in the shared real-node notes; in short:
//!
//! - **Isolation.** Everything runs inside a holder process made with
//!   `unshare --mount --net --pid --fork`: a private mount namespace (tmpfs over /run and
//!   /var/lib, the node's /var/log, bind-mounted sysctl files so the kubelet's kernel tunables
//!   never reach the host), a network namespace with its own loopback and a veth pair (both ends
//!   inside) for the node IP, and a PID namespace whose init is the holder's child: when it dies,
//!   the kernel kills every process in the namespace -- containerd, its shims, the containers.
//! - **cgroups** (v1 here): the kubelet's `cgroupRoot` is a tree of this node's own in every
//!   hierarchy, removed when the node stops (and by the reaper if the test process dies).
//! - **Traffic.** No route joins the host and the node. The kubelet and pods reach host
//!   services (apiserver, tunnel servers, webhooks) through [`PortBridge`]s listening inside the
//!   node's namespace on the same port numbers; the apiserver reaches the kubelet and pods
//!   through the ground's [`EgressProxy`](crate::crossns::EgressProxy).

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use crate::crossns::{Netns, PortBridge};
use crate::pki::{Ca, Usage};
use crate::process::{self, ProcGroup, StartTimes};
use crate::{Error, Result, bins, wait_for, wait_for_unless, write_file};

/// The node's address inside its network namespace; pods dial host services here.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 2);
/// Pod addresses (the CNI bridge's range), inside the node's namespace only.
pub const POD_CIDR: &str = "10.244.0.0/24";
/// The pause image the sandbox uses; imported from `scripts/build-node-images`.
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.10";
/// picotun's image as deploy/ names it (`scripts/build-node-images` builds it from the binary
/// `scripts/build-image` makes, exactly what the Dockerfile ships).
pub const PICOTUN_IMAGE: &str = "ghcr.io/picotun/picotun:0.1.0";

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// What the node needs from the control plane that hosts it.
pub struct NodeSetup<'a> {
    pub name: &'a str,
    pub ca: &'a Ca,
    pub ca_file: &'a Path,
    pub api_port: u16,
    pub dir: &'a Path,
    pub labels: &'a [(&'a str, &'a str)],
}

/// A running real node.
pub struct RealNode {
    name: String,
    dir: PathBuf,
    netns: Netns,
    cgroup: String,
    // Reverse start order on stop: kubelet, containerd, then the holder (which takes the rest).
    procs: ProcGroup,
    bridges: Mutex<Vec<PortBridge>>,
    images: Vec<String>,
}

/// The directory holding the image tarballs (`$PICOTUN_NODE_IMAGES`, or `<cache>/images`).
pub fn images_dir() -> PathBuf {
    std::env::var_os("PICOTUN_NODE_IMAGES").map(PathBuf::from).unwrap_or_else(|| bins::cache_dir().join("images"))
}

impl RealNode {
    /// Starts the node and waits until it is Ready (and untainted).
    pub async fn start(setup: NodeSetup<'_>, client: &Client) -> Result<(RealNode, StartTimes)> {
        let mut times = StartTimes::default();
        let dir = setup.dir.to_path_buf();
        for sub in ["log", "sysctl", "cni", "pki", "images"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
        }
        let tarballs = image_tarballs()?;
        for tool in ["unshare", "nsenter", "ip", "python3"] {
            which(tool)?;
        }
        let runc = bins::bin("runc")?;
        let cni_bin = bins::bin("cni")?;
        let containerd = bins::bin("containerd")?;
        let ctr = bins::bin("ctr")?;
        let kubelet = bins::bin("kubelet")?;
        bins::bin("containerd-shim-runc-v2")?;

        // The holder. Its child (PID 1 of the new PID namespace) reaps orphans -- containerd's
        // shims are re-parented to it -- and its death takes every process of the node along.
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--mount",
            "--net",
            "--pid",
            "--fork",
            "--kill-child=SIGKILL",
            "--propagation",
            "private",
            "--mount-proc",
        ]);
        cmd.args(["python3", "-c", INIT_PY]);
        let procs = ProcGroup::new(&dir);
        procs.spawn("node-holder", cmd)?;
        let holder_pid = procs.pids()[0].1;
        let mut node = RealNode {
            name: setup.name.to_string(),
            dir: dir.clone(),
            netns: Netns::of_pid(holder_pid)?,
            cgroup: format!("picotun-{}-{}", setup.name, crate::random_suffix()),
            procs,
            bridges: Mutex::new(Vec::new()),
            images: Vec::new(),
        };
        let init_pid = wait_for(
            "the node holder's init process",
            Duration::from_secs(10),
            Duration::from_millis(20),
            || async move {
                let children = std::fs::read_to_string(format!("/proc/{holder_pid}/task/{holder_pid}/children"))
                    .map_err(|e| e.to_string())?;
                Ok(children.split_whitespace().next().and_then(|p| p.parse::<u32>().ok()))
            },
        )
        .await?;
        // The netns handle from the holder itself is the same namespace; take it from init too,
        // which is what nsenter enters.
        node.netns = Netns::of_pid(init_pid)?;
        let enter = move |program: &Path| {
            let mut c = Command::new("nsenter");
            c.args(["-t", &init_pid.to_string(), "-m", "-n", "-p", "--"]).arg(program);
            c
        };

        // Inside: loopback, the node IP, the private mounts, the sysctl files.
        let sysctl_dir = dir.join("sysctl");
        let mut script = String::from("set -eu\n");
        script += "ip link set lo up\n";
        script += "ip link add node0 type veth peer name node1\n";
        script += &format!("ip addr add {NODE_IP}/30 dev node0\n");
        script += "ip link set node0 up\nip link set node1 up\n";
        script += "mount -t tmpfs -o mode=0755 tmpfs /run\nmount -t tmpfs -o mode=0755 tmpfs /var/lib\n";
        script += &format!("mount --bind {} /var/log\n", dir.join("log").display());
        // What the kubelet's setupKernelTunables wants, in files of our own: it reads (and may
        // write) these instead of the host's.
        for (key, value) in KUBELET_SYSCTLS {
            let file = sysctl_dir.join(key.replace('/', "."));
            write_file(&file, format!("{value}\n"))?;
            script += &format!("mount --bind {} /proc/sys/{key}\n", file.display());
        }
        let status = enter(Path::new("bash"))
            .args(["-c", &script])
            .output()
            .map_err(|e| Error::Spawn { name: "nsenter (node setup)".into(), source: e })?;
        if !status.status.success() {
            return Err(Error::Setup(format!(
                "setting up the node's namespaces failed: {}",
                String::from_utf8_lossy(&status.stderr).trim()
            )));
        }
        times.lap("namespaces");

        // cgroups: this node's own root in every v1 hierarchy (and the unified one).
        node.make_cgroups()?;

        // The kubelet reaches the apiserver on the node's own 127.0.0.1.
        node.bridge(setup.api_port)?;

        // PKI: the kubelet's client certificate (Node authorizer identity) and serving
        // certificate (the apiserver verifies it for logs/exec).
        let pki = dir.join("pki");
        let client_cert =
            setup.ca.issue(&format!("system:node:{}", setup.name), &[], &[], &["system:nodes"], Usage::Client)?;
        let (client_crt, client_key) = client_cert.write(&pki, "kubelet-client")?;
        let serving = setup.ca.issue(setup.name, &[setup.name], &[IpAddr::V4(NODE_IP)], &[], Usage::Server)?;
        let (serving_crt, serving_key) = serving.write(&pki, "kubelet-serving")?;
        let kubeconfig = dir.join("kubelet.kubeconfig");
        write_file(
            &kubeconfig,
            serde_json::to_string_pretty(&json!({
                "apiVersion": "v1", "kind": "Config",
                "clusters": [{"name": "ground", "cluster": {
                    "server": format!("https://127.0.0.1:{}", setup.api_port),
                    "certificate-authority": setup.ca_file.display().to_string()}}],
                "users": [{"name": "kubelet", "user": {
                    "client-certificate": client_crt.display().to_string(),
                    "client-key": client_key.display().to_string()}}],
                "contexts": [{"name": "ground", "context": {"cluster": "ground", "user": "kubelet"}}],
                "current-context": "ground",
            }))
            .expect("static kubeconfig"),
        )?;

        // containerd.
        let cni_conf = dir.join("cni");
        write_file(&cni_conf.join("10-ground.conflist"), cni_config())?;
        let containerd_conf = dir.join("containerd.toml");
        write_file(&containerd_conf, containerd_config(&runc, &cni_bin, &cni_conf))?;
        let bin_dir = containerd.parent().expect("a binary has a directory").to_path_buf();
        let path_env = format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", bin_dir.display());
        let mut cmd = enter(&containerd);
        cmd.env("PATH", &path_env).arg("--config").arg(&containerd_conf);
        node.spawn("containerd", cmd)?;
        let socket = PathBuf::from("/run/containerd/containerd.sock");
        {
            let ctr = ctr.clone();
            let enter_ctr = enter;
            wait_for_unless(
                "containerd to answer",
                Duration::from_secs(30),
                Duration::from_millis(100),
                || node.check_running().err(),
                || {
                    let out = enter_ctr(&ctr).args(["--address", &socket.display().to_string(), "version"]).output();
                    async move {
                        match out {
                            Ok(o) if o.status.success() => Ok(Some(())),
                            Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
                            Err(e) => Err(e.to_string()),
                        }
                    }
                },
            )
            .await?;
        }
        times.lap("containerd");

        // Images, from tarballs; `imagePullPolicy` as the manifests set it must never pull.
        for tarball in &tarballs {
            let out = enter(&ctr)
                .args(["--address", &socket.display().to_string(), "-n", "k8s.io", "images", "import"])
                .arg(tarball)
                .output()
                .map_err(|e| Error::Spawn { name: "ctr images import".into(), source: e })?;
            if !out.status.success() {
                return Err(Error::Setup(format!(
                    "importing {} into the node failed: {}",
                    tarball.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
        }
        let out = enter(&ctr)
            .args(["--address", &socket.display().to_string(), "-n", "k8s.io", "images", "ls", "-q"])
            .output()
            .map_err(|e| Error::Spawn { name: "ctr images ls".into(), source: e })?;
        node.images = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with("sha256:") && !l.trim().is_empty())
            .map(str::to_string)
            .collect();
        times.lap("images");

        // The kubelet.
        let resolv = dir.join("resolv.conf");
        write_file(&resolv, "# the test ground has no DNS\nsearch cluster.local\noptions ndots:1\n")?;
        let kubelet_conf = dir.join("kubelet.yaml");
        write_file(&kubelet_conf, kubelet_config(&node.cgroup, setup.ca_file, &serving_crt, &serving_key, &resolv))?;
        let labels: Vec<String> = setup.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut cmd = enter(&kubelet);
        cmd.env("PATH", &path_env).args([
            format!("--config={}", kubelet_conf.display()),
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--hostname-override={}", setup.name),
            format!("--node-ip={NODE_IP}"),
            "--root-dir=/var/lib/kubelet".into(),
            format!("--node-labels={}", labels.join(",")),
            "--v=1".into(),
        ]);
        node.spawn("kubelet", cmd)?;
        let nodes: Api<Node> = Api::all(client.clone());
        let name = setup.name.to_string();
        wait_for_unless(
            &format!("node {name} Ready"),
            Duration::from_secs(60),
            Duration::from_millis(100),
            || node.check_running().err(),
            || async {
                let n = nodes.get_opt(&name).await.map_err(|e| e.to_string())?;
                let ready = n
                    .as_ref()
                    .and_then(|n| n.status.as_ref())
                    .and_then(|s| s.conditions.as_ref())
                    .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
                match ready {
                    Some(c) if c.status == "True" => Ok(Some(())),
                    Some(c) => Err(format!("Ready={}: {}", c.status, c.message.clone().unwrap_or_default())),
                    None => Err("not registered yet".into()),
                }
            },
        )
        .await?;
        // As for the kwok nodes: the node-lifecycle controller that would lift the not-ready
        // taint the kubelet registered with does not run here.
        nodes.patch(&name, &PatchParams::default(), &Patch::Merge(&json!({"spec": {"taints": null}}))).await?;
        times.lap("kubelet");
        Ok((node, times))
    }

    fn spawn(&self, name: &str, cmd: Command) -> Result<()> {
        self.procs.spawn(name, cmd)
    }

    /// Fails (with the log tail) if any process of the node has exited.
    pub fn check_running(&self) -> Result<()> {
        self.procs.check_running()
    }

    fn make_cgroups(&self) -> Result<()> {
        for hierarchy in cgroup_hierarchies() {
            let dir = hierarchy.join(&self.cgroup);
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            process::remove_cgroup_at_exit(&dir);
            // A new v1 cpuset starts with no CPUs and no memory nodes: give it the parent's.
            if hierarchy.ends_with("cpuset") {
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    let parent =
                        std::fs::read_to_string(hierarchy.join(f)).map_err(|e| Error::io(&hierarchy.join(f), e))?;
                    write_file(&dir.join(f), parent.trim())?;
                }
            }
        }
        Ok(())
    }

    /// Makes host port 127.0.0.1:`port` reachable from the node and its pods as
    /// `NODE_IP:port` (and the node's own 127.0.0.1:`port`).
    pub fn bridge(&self, port: u16) -> Result<()> {
        let mut bridges = self.bridges.lock().unwrap_or_else(|p| p.into_inner());
        if bridges.iter().any(|b| b.port() == port) {
            return Ok(());
        }
        bridges.push(PortBridge::start(&self.netns, port)?);
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The node's directory: configuration, certificates and the logs of containerd, the kubelet
    /// and the containers (`log/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The node's cgroup tree in every hierarchy (the kubelet's `cgroupRoot`).
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        cgroup_hierarchies().into_iter().map(|h| h.join(&self.cgroup)).collect()
    }

    /// The image names imported into the node.
    pub fn images(&self) -> &[String] {
        &self.images
    }

    /// (name, PID) of the node's processes (the holder first).
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.procs.pids()
    }

    /// Stops the kubelet, containerd and the holder (with it every container), then removes the
    /// node's cgroups.
    pub fn stop(&self) {
        self.bridges.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.procs.stop(Duration::from_secs(3));
        for hierarchy in cgroup_hierarchies() {
            let dir = hierarchy.join(&self.cgroup);
            if remove_cgroup_tree(&dir, Duration::from_secs(30)) {
                process::forget_cgroup_at_exit(&dir);
            }
        }
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The mounted cgroup hierarchies (v1 controllers, the named systemd one, the unified one).
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else { return Vec::new() };
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, target, fstype) = (f.next()?, f.next()?, f.next()?);
            (target.starts_with(CGROUP_ROOT) && (fstype == "cgroup" || fstype == "cgroup2"))
                .then(|| PathBuf::from(target))
        })
        .collect()
}

/// rmdir depth-first (cgroupfs refuses rm -r); retried while the killed processes leave.
/// True when the tree is gone.
pub fn remove_cgroup_tree(dir: &Path, patience: Duration) -> bool {
    fn dirs_depth_first(dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs_depth_first(&e.path(), out);
                }
            }
        }
        out.push(dir.to_path_buf());
    }
    let start = Instant::now();
    loop {
        if !dir.exists() {
            return true;
        }
        let mut all = Vec::new();
        dirs_depth_first(dir, &mut all);
        for d in &all {
            let _ = std::fs::remove_dir(d);
        }
        if !dir.exists() {
            return true;
        }
        if start.elapsed() > patience {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn which(tool: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join(tool)).find(|p| p.is_file()))
        .ok_or_else(|| Error::MissingBinary {
            name: tool.into(),
            dir: "$PATH".into(),
            hint: "; scripts/install-deps installs it (util-linux, iproute2, python3)".into(),
        })
}

fn image_tarballs() -> Result<Vec<PathBuf>> {
    let dir = images_dir();
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| {
            Error::Setup(format!("no node images in {} ({e}): run `scripts/build-node-images`", dir.display()))
        })?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "tar"))
        .collect();
    found.sort();
    if found.is_empty() {
        return Err(Error::Setup(format!("no image tarballs in {}: run `scripts/build-node-images`", dir.display())));
    }
    Ok(found)
}

/// PID 1 of the node's PID namespace: reaps whatever is re-parented to it until killed.
const INIT_PY: &str = r#"
import os, signal, time
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.5)
"#;

/// What the kubelet's setupKernelTunables sets machine-wide, answered by files of our own.
const KUBELET_SYSCTLS: [(&str, &str); 6] = [
    ("vm/overcommit_memory", "1"),
    ("vm/panic_on_oom", "0"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
    ("kernel/keys/root_maxkeys", "1000000"),
    ("kernel/keys/root_maxbytes", "25000000"),
];

fn cni_config() -> String {
    json!({
        "cniVersion": "1.0.0",
        "name": "ground",
        "plugins": [
            {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]], "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "portmap", "capabilities": {"portMappings": true}},
        ],
    })
    .to_string()
}

fn containerd_config(runc: &Path, cni_bin: &Path, cni_conf: &Path) -> String {
    format!(
        r#"version = 3
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.blockfile", "io.containerd.snapshotter.v1.erofs", "io.containerd.differ.v1.erofs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing", "io.containerd.nri.v1.nri"]

[grpc]
  address = "/run/containerd/containerd.sock"

[ttrpc]
  address = "/run/containerd/containerd.sock.ttrpc"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{PAUSE_IMAGE}"

[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = false
  # No CAP_SYS_RESOURCE on these machines: runc cannot lower a process's oom_score_adj.
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{cni_bin}"]
    conf_dir = "{cni_conf}"
"#,
        runc = runc.display(),
        cni_bin = cni_bin.display(),
        cni_conf = cni_conf.display(),
    )
}

fn kubelet_config(cgroup_root: &str, ca: &Path, crt: &Path, key: &Path, resolv: &Path) -> String {
    json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        // cgroup v1 hierarchies, no swap accounting, no systemd: see the shared real-node notes.
        "failCgroupV1": false,
        "failSwapOn": false,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": format!("/{cgroup_root}"),
        "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
        "authentication": {
            "anonymous": {"enabled": false},
            "webhook": {"enabled": true},
            "x509": {"clientCAFile": ca.display().to_string()},
        },
        "authorization": {"mode": "Webhook"},
        "tlsCertFile": crt.display().to_string(),
        "tlsPrivateKeyFile": key.display().to_string(),
        "address": NODE_IP.to_string(),
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "resolvConf": resolv.display().to_string(),
        "clusterDomain": "cluster.local",
        "registerNode": true,
        "serializeImagePulls": false,
        // The machine's disk is shared with everything else; never evict test pods for it.
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "nodeStatusUpdateFrequency": "2s",
        "syncFrequency": "10s",
        "fileCheckFrequency": "10s",
        "protectKernelDefaults": false,
        "makeIPTablesUtilChains": false,
        "maxPods": 110,
        "shutdownGracePeriod": "0s",
    })
    .to_string()
}
