//! The real node itself: it runs containers from the locally built images, `kubectl logs` and
//! `exec` reach it, pods are reachable inside its network, and nothing it made outlives the test
//! process -- no process, cgroup, mount, network namespace or veth.

use std::io::{BufRead, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use picotun_testground::kube_ground::{REAL_NODE, StartOptions};
use picotun_testground::node::PICOTUN_IMAGE;
use picotun_testground::{ControlPlane, wait_for};
use serde_json::json;

use crate::support::{self, kubectl};

/// A pod that runs the echo image on the real node (the kwok nodes are tainted away).
fn echo_pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "echo", "image": "hashicorp/http-echo:1.0",
                "args": ["-text=hello from the real node", "-listen=:5678"],
                "ports": [{"containerPort": 5678}],
                "readinessProbe": {"httpGet": {"path": "/", "port": 5678}, "periodSeconds": 1},
                "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                                    "capabilities": {"drop": ["ALL"]}},
            }],
            "terminationGracePeriodSeconds": 5,
        },
    }))
    .unwrap()
}

#[tokio::test]
#[ignore = "needs the test ground with a real node (scripts/build-testground, scripts/build-node-images)"]
async fn the_kubelet_runs_a_pod_with_logs_exec_and_a_pod_network() {
    let ground = support::ground().await;
    let client = ground.client().await.unwrap();
    let node = support::node(ground);
    assert!(
        node.images().iter().any(|i| i.contains(PICOTUN_IMAGE)),
        "picotun's image is on the node: {:?}",
        node.images()
    );
    let ns = ground.namespace("node-basics").await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    let started = std::time::Instant::now();
    pods.create(&PostParams::default(), &echo_pod("echo")).await.unwrap();
    let pod = support::ready_pods(&pods, "app=echo", 1, Duration::from_secs(60)).await.remove(0);
    println!("pod Ready {:.2}s after create", started.elapsed().as_secs_f32());
    assert_eq!(pod.spec.as_ref().unwrap().node_name.as_deref(), Some(REAL_NODE));

    // The pod's own address, inside the node's network.
    let ip: std::net::IpAddr = pod.status.as_ref().unwrap().pod_ip.as_deref().unwrap().parse().unwrap();
    let mut conn = node.netns().connect(SocketAddr::new(ip, 5678), Duration::from_secs(5)).unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("hello from the real node\n"), "{answer:?}");

    // logs and exec go apiserver -> egress proxy -> kubelet.
    let logs = wait_for("the request in kubectl logs", Duration::from_secs(10), Duration::from_millis(200), || async {
        let logs = kubectl(ground, &["-n", ns.name(), "logs", "echo"]);
        Ok(logs.contains("GET /").then_some(logs))
    })
    .await
    .unwrap();
    println!("kubectl logs echo:\n{logs}");
    let version = kubectl(ground, &["-n", ns.name(), "exec", "echo", "--", "/http-echo", "-version"]);
    assert!(!version.trim().is_empty(), "kubectl exec ran a process in the container");

    // The container is really confined: its process is not root and its root is read-only.
    let pid = support::container_pid(&pod, "echo").expect("the container's process is found by its cgroup");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(uid_line.split_whitespace().skip(1).all(|u| u == "65532"), "{uid_line}");
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root = mountinfo.lines().find(|l| l.split_whitespace().nth(4) == Some("/")).unwrap();
    assert!(root.split_whitespace().nth(5).unwrap().split(',').any(|o| o == "ro"), "read-only root: {root}");
}

/// Run only as a child of `killing_the_test_process_leaves_no_node_behind`: starts a ground
/// with a real node and a running pod, prints what must vanish, and waits to be killed.
#[tokio::test]
#[ignore = "needs the test ground with a real node (scripts/build-testground, scripts/build-node-images)"]
async fn node_kill_probe_holder() {
    if std::env::var_os("PICOTUN_NODE_KILL_PROBE").is_none() {
        return; // Run on its own, it has nothing to prove.
    }
    let plane = ControlPlane::start(StartOptions { real_node: true, ..Default::default() }).await.unwrap();
    let client = plane.client().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client, "default");
    pods.create(&PostParams::default(), &echo_pod("probe")).await.unwrap();
    let pod = support::ready_pods(&pods, "app=probe", 1, Duration::from_secs(60)).await.remove(0);
    let node = plane.real_node().unwrap();
    let mut pids: Vec<String> = plane.pids().into_iter().map(|(_, p)| p.to_string()).collect();
    pids.extend(node.pids().into_iter().map(|(_, p)| p.to_string()));
    pids.push(support::container_pid(&pod, "echo").unwrap().to_string());
    // This node's cgroup tree in every hierarchy (memory, cpu, freezer, ..., unified) -- only
    // this one's: the test binary that runs this probe may have a node of its own.
    let cgroups: Vec<String> = node.cgroup_dirs().iter().map(|d| d.display().to_string()).collect();
    assert!(cgroups.iter().all(|d| std::path::Path::new(d).is_dir()), "the node's cgroups exist: {cgroups:?}");
    println!("KILL-PROBE-DIRS {} {}", plane.dir().display(), cgroups.join(" "));
    println!("KILL-PROBE-PIDS {}", pids.join(" "));
    tokio::time::sleep(Duration::from_secs(600)).await;
}

#[test]
#[ignore = "needs the test ground with a real node (scripts/build-testground, scripts/build-node-images)"]
fn killing_the_test_process_leaves_no_node_behind() {
    let veths_before = veth_count();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["ground::node_kill_probe_holder", "--exact", "--include-ignored", "--nocapture", "--test-threads=1"])
        .env("PICOTUN_NODE_KILL_PROBE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let mut holder = KillOnDrop(child);
    let (mut pids, mut dirs) = (Vec::<i32>::new(), Vec::<PathBuf>::new());
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.unwrap();
        // libtest prints "test NAME ... " first, on the same line.
        if let Some((_, rest)) = line.split_once("KILL-PROBE-DIRS ") {
            dirs = rest.split_whitespace().map(PathBuf::from).collect();
        }
        if let Some((_, rest)) = line.split_once("KILL-PROBE-PIDS ") {
            pids = rest.split_whitespace().map(|p| p.parse().unwrap()).collect();
            break;
        }
    }
    // etcd, apiserver, controller-manager, scheduler, kwok; holder, containerd, kubelet; the app.
    assert!(pids.len() >= 9, "the holder reported its processes: {pids:?}");
    assert!(dirs.len() >= 5, "the ground's directory and the node's cgroup in each hierarchy: {dirs:?}");
    assert!(pids.iter().all(|&p| alive(p)), "all running before the kill");

    holder.0.kill().unwrap();
    holder.0.wait().unwrap();
    let killed = std::time::Instant::now();

    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    let mut last_report = std::time::Instant::now();
    while (pids.iter().any(|&p| alive(p)) || dirs.iter().any(|d| d.exists())) && std::time::Instant::now() < deadline {
        if last_report.elapsed() > Duration::from_secs(2) {
            let alive_now: Vec<i32> = pids.iter().copied().filter(|&p| alive(p)).collect();
            let dirs_now: Vec<_> = dirs.iter().filter(|d| d.exists()).collect();
            println!("{:.1}s after the kill: alive {alive_now:?}, left {dirs_now:?}", killed.elapsed().as_secs_f32());
            last_report = std::time::Instant::now();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("everything gone {:.1}s after the SIGKILL", killed.elapsed().as_secs_f32());
    let survivors: Vec<i32> = pids.iter().copied().filter(|&p| alive(p)).collect();
    assert!(survivors.is_empty(), "processes left after the test process was killed: {survivors:?}");
    let left: Vec<_> = dirs.iter().filter(|d| d.exists()).collect();
    // What holds a cgroup that is left: its processes, their state and parent.
    let holders: Vec<String> = left
        .iter()
        .flat_map(|d| {
            let procs = Command::new("find").arg(d).args(["-name", "cgroup.procs"]).output().unwrap();
            String::from_utf8_lossy(&procs.stdout)
                .lines()
                .flat_map(|f| {
                    std::fs::read_to_string(f).unwrap_or_default().lines().map(str::to_string).collect::<Vec<_>>()
                })
                .map(|pid| {
                    format!("{pid}: {}", std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default())
                })
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(left.is_empty(), "directories or cgroups left behind: {left:?}; processes in them: {holders:?}");
    assert_eq!(veth_count(), veths_before, "no veth left on the host");
}

fn veth_count() -> usize {
    let out = Command::new("ip").args(["-o", "link", "show", "type", "veth"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}
