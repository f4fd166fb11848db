//! The injected pod on the kubelet: native-sidecar ordering (the agent starts before the app,
//! stops after it, and cancels its tunnels on the server before it exits), Jobs that complete,
//! what regular-container mode does instead, live reconfiguration through the downward-API
//! file, and PodSecurity `restricted`.
//!
//! The app is the examples' echo server. It has no end of its own: where a test needs the app
//! to finish (a Job's work done), it sends the app's process SIGTERM from the host, as runc
//! would, and the echo server exits 0.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod, Service};
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, PostParams};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use picotun_testground::{ControlPlane, http, wait_for};
use serde_json::{Value, json};

use crate::support::{
    self, LogLine, Stack, container_pid, container_status, cri_log_lines, in_container, kubectl, process_alive,
    process_start_ticks, root_mount_options, stack_and_namespace,
};

const AGENT: &str = "picotun-agent";
/// The sidecar's admin port when the pod names none.
const ADMIN_PORT: u16 = picotun::core::api::DEFAULT_SIDECAR_ADMIN_PORT;
const APP: &str = "echo";
const BODY: &str = "hello from a pod\n";

async fn clean_up(ground: &ControlPlane, stack: Stack, ns: &str) {
    support::delete_namespace(ground, ns).await;
    stack.remove(ground).await;
}

/// A pod template (or bare pod) whose only container is the echo server, with the security
/// context PodSecurity `restricted` asks for and no fixed user. `annotations` opt it in.
fn echo_pod(name: &str, labels: Value, annotations: Value, restart_policy: &str) -> Value {
    json!({
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": {
            "restartPolicy": restart_policy,
            "terminationGracePeriodSeconds": 10,
            // No fixed user: each image's numeric USER runs it (65532:65532 for picotun's and the
            // echo server's), which the kubelet checks against runAsNonRoot.
            "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": APP, "image": "hashicorp/http-echo:1.0",
                "args": [format!("-text={}", BODY.trim_end()), "-listen=:5678"],
                "ports": [{"name": "http", "containerPort": 5678}],
                "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                                    "capabilities": {"drop": ["ALL"]}},
            }],
        },
    })
}

/// A bare pod (no workload) exposing `name` through sish.
fn exposed_pod(name: &str) -> Pod {
    serde_json::from_value(echo_pod(
        name,
        json!({"app": name}),
        json!({"tunnels.pico.sh/expose": format!("http:{name}=5678")}),
        "Always",
    ))
    .unwrap()
}

/// A Job whose one pod exposes `name` through sish and is done when its app exits.
fn exposed_job(name: &str) -> Job {
    let mut template =
        echo_pod(name, json!({"app": name}), json!({"tunnels.pico.sh/expose": format!("http:{name}=5678")}), "Never");
    template["metadata"].as_object_mut().unwrap().remove("name");
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"backoffLimit": 0, "template": template},
    }))
    .unwrap()
}

fn started_at(pod: &Pod, container: &str) -> Option<Timestamp> {
    container_status(pod, container).state.as_ref()?.running.as_ref()?.started_at.as_ref().map(|t| t.0)
}

fn running(c: &ContainerStatus) -> bool {
    c.state.as_ref().is_some_and(|s| s.running.is_some())
}

fn terminated_exit_code(c: &ContainerStatus) -> Option<i32> {
    c.state.as_ref()?.terminated.as_ref().map(|t| t.exit_code)
}

/// A container's process, and its start time: a PID the kernel reuses is not "still alive".
#[derive(Clone, Copy, Debug)]
struct Process {
    pid: u32,
    start: u64,
}

impl Process {
    fn of(pod: &Pod, container: &str) -> Process {
        let pid = container_pid(pod, container).unwrap_or_else(|| panic!("the process of container {container}"));
        Process { pid, start: process_start_ticks(pid).expect("a running process") }
    }

    fn alive(&self) -> bool {
        process_alive(self.pid) && process_start_ticks(self.pid) == Some(self.start)
    }

    fn terminate(&self) {
        kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM).unwrap();
    }
}

/// A container's log file, opened now so it can be read after the kubelet removed it.
struct OpenLog(std::fs::File);

impl OpenLog {
    fn open(ground: &ControlPlane, pod: &Pod, container: &str) -> OpenLog {
        let path = support::container_log_path(ground, pod, container);
        OpenLog(std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
    }

    fn lines(&mut self) -> Vec<LogLine> {
        use std::io::Seek;
        let mut text = String::new();
        self.0.rewind().unwrap();
        self.0.read_to_string(&mut text).unwrap();
        cri_log_lines(&text)
    }
}

fn find<'a>(lines: &'a [LogLine], needle: &str) -> &'a LogLine {
    lines.iter().find(|l| l.text.contains(needle)).unwrap_or_else(|| {
        panic!(
            "no log line with {needle:?} in:\n{}",
            lines.iter().map(|l| l.text.as_str()).collect::<Vec<_>>().join("\n")
        )
    })
}

fn ms_between(a: Timestamp, b: Timestamp) -> f64 {
    b.duration_since(a).as_secs_f64() * 1000.0
}

/// GET `host` through sish once: (status, body).
async fn get_once(stack: &Stack, host: &str) -> Option<(u16, String)> {
    http::get(&format!("127.0.0.1:{}", stack.http_port), host, "/").await.ok().map(|r| (r.status, r.body))
}

fn sish_log_since(stack: &Stack, offset: u64) -> String {
    let text = std::fs::read(stack.sish.dir().join("sish.log")).unwrap_or_default();
    String::from_utf8_lossy(&text[(offset as usize).min(text.len())..]).into_owned()
}

fn sish_log_len(stack: &Stack) -> u64 {
    std::fs::metadata(stack.sish.dir().join("sish.log")).map(|m| m.len()).unwrap_or(0)
}

/// What happens while a pod is deleted, watched from the host: when each container's process
/// ended, and the containers' logs to the end.
struct Teardown {
    app_gone: Duration,
    agent_gone: Duration,
    app_log: Vec<LogLine>,
    agent_log: Vec<LogLine>,
    deleted_at: Timestamp,
}

async fn delete_and_watch(ground: &ControlPlane, pods: &Api<Pod>, pod: &Pod) -> Teardown {
    let name = pod.metadata.name.clone().unwrap();
    let (app, agent) = (Process::of(pod, APP), Process::of(pod, AGENT));
    let mut app_log = OpenLog::open(ground, pod, APP);
    let mut agent_log = OpenLog::open(ground, pod, AGENT);
    let deleted_at = Timestamp::now();
    let start = Instant::now();
    pods.delete(&name, &DeleteParams::default()).await.unwrap();
    let (mut app_gone, mut agent_gone) = (None, None);
    while app_gone.is_none() || agent_gone.is_none() {
        assert!(start.elapsed() < Duration::from_secs(40), "pod {name} still running 40 s after its delete");
        // The app first: a later look that finds the agent alive means it outlived the app.
        if app_gone.is_none() && !app.alive() {
            app_gone = Some(start.elapsed());
        }
        if agent_gone.is_none() && !agent.alive() {
            agent_gone = Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    wait_for(&format!("pod {name} gone"), Duration::from_secs(30), Duration::from_millis(100), || async {
        pods.get_opt(&name).await.map(|p| p.is_none().then_some(())).map_err(|e| e.to_string())
    })
    .await
    .unwrap();
    Teardown {
        app_gone: app_gone.unwrap(),
        agent_gone: agent_gone.unwrap(),
        app_log: app_log.lines(),
        agent_log: agent_log.lines(),
        deleted_at,
    }
}

#[tokio::test]
#[ignore = "needs the test ground with a real node (scripts/build-testground, scripts/build-node-images)"]
async fn the_native_sidecar_starts_before_the_app_and_cancels_its_tunnel_after_the_app_stopped() {
    let ground = support::ground().await;
    let client = ground.client().await.unwrap();
    let (stack, ns) = stack_and_namespace(ground, "sidecar-order").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    pods.create(&PostParams::default(), &exposed_pod("order")).await.unwrap();
    let pod = support::ready_pods(&pods, "app=order", 1, Duration::from_secs(60)).await.remove(0);

    // A native sidecar: an init container that keeps running.
    let spec = pod.spec.as_ref().unwrap();
    let sidecar = spec.init_containers.iter().flatten().find(|c| c.name == AGENT).expect("the agent init container");
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    assert_eq!(spec.containers.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), vec![APP]);

    // Start order, three ways: the kernel's process start times (10 ms ticks), the kubelet's
    // startedAt (seconds), and the first lines each container logged.
    let (agent, app) = (Process::of(&pod, AGENT), Process::of(&pod, APP));
    let (agent_log, app_log) = (
        cri_log_lines(&std::fs::read_to_string(support::container_log_path(ground, &pod, AGENT)).unwrap()),
        cri_log_lines(&std::fs::read_to_string(support::container_log_path(ground, &pod, APP)).unwrap()),
    );
    let (agent_first, app_first) = (&agent_log[0], &app_log[0]);
    println!(
        "start order: agent process at tick {}, app process at tick {} ({} ms later); startedAt agent {:?}, app {:?}; \
         first log lines {:.1} ms apart:\n  agent: {}\n  app:   {}",
        agent.start,
        app.start,
        (app.start as i64 - agent.start as i64) * 10,
        started_at(&pod, AGENT),
        started_at(&pod, APP),
        ms_between(agent_first.at, app_first.at),
        agent_first.text,
        app_first.text
    );
    assert!(agent.start <= app.start, "the agent's process started before the app's (10 ms ticks)");
    assert!(agent_first.at < app_first.at, "the agent logged before the app started");
    let (agent_started, app_started) = (started_at(&pod, AGENT).unwrap(), started_at(&pod, APP).unwrap());
    assert!(agent_started <= app_started, "startedAt: agent {agent_started}, app {app_started}");

    let host = stack.sish.http_host(&stack.user, "order");
    assert_eq!(stack.get_through_sish(&host, Duration::from_secs(30)).await, BODY);

    // Delete: the kubelet stops the app, then the sidecar; the sidecar cancels its forward on
    // sish and logs the server's answer before it exits.
    let sish_offset = sish_log_len(&stack);
    let t = delete_and_watch(ground, &pods, &pod).await;
    let app_stop = find(&t.app_log, "received SIGTERM");
    let sigterm = find(&t.agent_log, "SIGTERM received");
    let drain = find(&t.agent_log, "draining: cancelling forwards");
    let cancelled = find(&t.agent_log, "forward cancelled (shutting down)");
    let stopped = find(&t.agent_log, "picotun agent stopped");
    println!(
        "delete (ms after the delete call): app got SIGTERM {:.1}, agent got SIGTERM {:.1}, forward cancelled on \
         sish {:.1}, agent stopped {:.1}; processes gone: app {:.1}, agent {:.1} (polled every 5 ms)",
        ms_between(t.deleted_at, app_stop.at),
        ms_between(t.deleted_at, sigterm.at),
        ms_between(t.deleted_at, cancelled.at),
        ms_between(t.deleted_at, stopped.at),
        t.app_gone.as_secs_f64() * 1000.0,
        t.agent_gone.as_secs_f64() * 1000.0,
    );
    println!(
        "agent's last lines:\n{}",
        t.agent_log.iter().rev().take(5).rev().map(|l| format!("  {}", l.text)).collect::<Vec<_>>().join("\n")
    );
    assert!(app_stop.at < sigterm.at, "the agent was told to stop only after the app got SIGTERM");
    assert!(t.app_gone <= t.agent_gone, "the app's process ended first");
    assert!(
        sigterm.at <= drain.at && drain.at <= cancelled.at && cancelled.at <= stopped.at,
        "SIGTERM, drain, cancel, stop, in that order"
    );
    assert!(
        cancelled.text.contains("acknowledged=true"),
        "sish acknowledged the cancel (the forward closed on the server) while the agent ran: {}",
        cancelled.text
    );
    let sish_log = sish_log_since(&stack, sish_offset);
    let stopped_line = sish_log.lines().find(|l| l.contains("forwarding stopped") && l.contains(&host));
    println!("sish: {}", stopped_line.unwrap_or("(no forwarding-stopped line)"));
    assert!(stopped_line.is_some(), "sish logged the forward of {host} stopped:\n{sish_log}");
    let after = get_once(&stack, &host).await;
    assert!(after.as_ref().is_none_or(|(s, _)| *s != 200), "nothing answers for {host} any more: {after:?}");

    clean_up(ground, stack, &ns).await;
}

async fn job_condition(jobs: &Api<Job>, name: &str) -> Option<String> {
    let job = jobs.get(name).await.ok()?;
    job.status?
        .conditions?
        .into_iter()
        .find(|c| c.status == "True" && (c.type_ == "Complete" || c.type_ == "Failed"))
        .map(|c| c.type_)
}

#[tokio::test]
#[ignore = "needs the test ground with a real node (scripts/build-testground, scripts/build-node-images)"]
async fn a_job_with_the_native_sidecar_completes_when_its_app_exits() {
    let ground = support::ground().await;
    let client = ground.client().await.unwrap();
    let (stack, ns) = stack_and_namespace(ground, "sidecar-job").await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    jobs.create(&PostParams::default(), &exposed_job("batch")).await.unwrap();
    let pod = support::ready_pods(&pods, "app=batch", 1, Duration::from_secs(60)).await.remove(0);
    let name = pod.metadata.name.clone().unwrap();
    // The Job's pod serves through its tunnel like any other.
    let host = stack.sish.http_host(&stack.user, "batch");
    assert_eq!(stack.get_through_sish(&host, Duration::from_secs(30)).await, BODY);

    // The app's work is done: it exits 0. The sidecar must not keep the pod, or the Job, alive.
    let agent = Process::of(&pod, AGENT);
    let exited = Instant::now();
    Process::of(&pod, APP).terminate();
    let condition = wait_for("the Job Complete", Duration::from_secs(60), Duration::from_millis(100), || async {
        Ok(job_condition(&jobs, "batch").await)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", kubectl(ground, &["-n", &ns, "describe", "pod", &name])));
    println!("Job {condition} {:.2}s after its app exited", exited.elapsed().as_secs_f32());
    assert_eq!(condition, "Complete");
    let job = jobs.get("batch").await.unwrap();
    assert_eq!(job.status.as_ref().and_then(|s| s.succeeded), Some(1));
    let done = pods.get(&name).await.unwrap();
    println!(
        "pod phase {:?}; app exit code {:?}, agent exit code {:?}",
        done.status.as_ref().and_then(|s| s.phase.clone()),
        terminated_exit_code(container_status(&done, APP)),
        terminated_exit_code(container_status(&done, AGENT))
    );
    assert_eq!(done.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded"));
    assert_eq!(terminated_exit_code(container_status(&done, APP)), Some(0));
    assert!(!agent.alive(), "the kubelet stopped the sidecar once the app was done");
    let logs = kubectl(ground, &["-n", &ns, "logs", &name, "-c", AGENT]);
    assert!(logs.contains("picotun agent stopped"), "the agent stopped cleanly:\n{logs}");
    let read = |c| cri_log_lines(&std::fs::read_to_string(support::container_log_path(ground, &done, c)).unwrap());
    let (app_log, agent_log) = (read(APP), read(AGENT));
    let app_stop = find(&app_log, "received SIGTERM").at;
    println!(
        "after the app's exit (ms): the agent told to stop {:.0}, the agent stopped {:.0}",
        ms_between(app_stop, find(&agent_log, "SIGTERM received").at),
        ms_between(app_stop, find(&agent_log, "picotun agent stopped").at)
    );

    clean_up(ground, stack, &ns).await;
}

/// How long a Job with the sidecar as a regular container is watched after its app exited:
/// several times what the native-sidecar Job takes to complete.
const REGULAR_JOB_WATCH: Duration = Duration::from_secs(12);

#[tokio::test]
#[ignore = "needs the test ground with a real node (scripts/build-testground, scripts/build-node-images)"]
async fn without_native_sidecars_a_job_runs_on_until_its_sidecar_exits() {
    let ground = support::ground().await;
    let client = ground.client().await.unwrap();
    let (mut stack, ns) = stack_and_namespace(ground, "regular-job").await;
    // What the webhook injects where the apiserver is older than 1.29 (`--native-sidecar=auto`
    // decides so), or when told: the sidecar as a regular container. This kubelet has native
    // sidecars, but a regular container runs the same on any kubelet.
    stack.restart_webhook_with(ground, &["--native-sidecar=false"]).await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    jobs.create(&PostParams::default(), &exposed_job("batch")).await.unwrap();
    pods.create(&PostParams::default(), &exposed_pod("plain")).await.unwrap();
    let pod = support::ready_pods(&pods, "app=batch", 1, Duration::from_secs(60)).await.remove(0);
    let name = pod.metadata.name.clone().unwrap();
    let spec = pod.spec.as_ref().unwrap();
    assert!(spec.init_containers.is_none(), "no init containers");
    assert_eq!(spec.containers.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), vec![APP, AGENT]);
    let (agent, app) = (Process::of(&pod, AGENT), Process::of(&pod, APP));
    println!(
        "regular container: app process at tick {}, agent at tick {} (the kubelet starts them in list order, \
         without waiting for one to be up)",
        app.start, agent.start
    );
    let host = stack.sish.http_host(&stack.user, "batch");
    assert_eq!(stack.get_through_sish(&host, Duration::from_secs(30)).await, BODY);

    // The app is done and exits 0; the sidecar runs on, so does the pod, and the Job never
    // completes.
    let exited = Instant::now();
    app.terminate();
    wait_for("the app container terminated", Duration::from_secs(30), Duration::from_millis(100), || async {
        let p = pods.get(&name).await.map_err(|e| e.to_string())?;
        Ok(terminated_exit_code(container_status(&p, APP)).map(|_| ()))
    })
    .await
    .unwrap();
    while exited.elapsed() < REGULAR_JOB_WATCH {
        let p = pods.get(&name).await.unwrap();
        assert_eq!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Running"), "the pod stays Running");
        assert_eq!(terminated_exit_code(container_status(&p, APP)), Some(0), "the app is done");
        assert!(running(container_status(&p, AGENT)) && agent.alive(), "the sidecar still runs");
        assert_eq!(job_condition(&jobs, "batch").await, None, "the Job neither completes nor fails");
        let job = jobs.get("batch").await.unwrap();
        assert_eq!(job.status.as_ref().and_then(|s| s.active), Some(1), "the Job's pod counts as active");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "{:.0}s after its app exited 0, the Job is still active, its pod Running: the sidecar holds it",
        exited.elapsed().as_secs_f32()
    );

    // Only the sidecar's own exit ends it (here SIGTERM, as from a delete): exit 0, the pod
    // Succeeded, the Job Complete.
    let stopped = Instant::now();
    agent.terminate();
    let condition = wait_for("the Job Complete", Duration::from_secs(60), Duration::from_millis(100), || async {
        Ok(job_condition(&jobs, "batch").await)
    })
    .await
    .unwrap();
    println!("Job {condition} {:.2}s after the sidecar was stopped", stopped.elapsed().as_secs_f32());
    assert_eq!(condition, "Complete");
    let done = pods.get(&name).await.unwrap();
    assert_eq!(done.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded"));
    assert_eq!(terminated_exit_code(container_status(&done, AGENT)), Some(0));

    // On delete, the kubelet stops both containers at once: the sidecar does not wait for the
    // app (nothing to assert about their order; the figures show it).
    let plain = support::ready_pods(&pods, "app=plain", 1, Duration::from_secs(60)).await.remove(0);
    let t = delete_and_watch(ground, &pods, &plain).await;
    let app_stop = find(&t.app_log, "received SIGTERM");
    let sigterm = find(&t.agent_log, "SIGTERM received");
    let cancelled = find(&t.agent_log, "forward cancelled (shutting down)");
    println!(
        "delete, regular container (ms after the delete call): app got SIGTERM {:.1}, agent got SIGTERM {:.1} \
         ({:+.1} ms from the app's), forward cancelled {:.1}; processes gone: app {:.1}, agent {:.1}",
        ms_between(t.deleted_at, app_stop.at),
        ms_between(t.deleted_at, sigterm.at),
        ms_between(app_stop.at, sigterm.at),
        ms_between(t.deleted_at, cancelled.at),
        t.app_gone.as_secs_f64() * 1000.0,
        t.agent_gone.as_secs_f64() * 1000.0,
    );

    clean_up(ground, stack, &ns).await;
}

fn container_ids(pod: &Pod) -> Vec<(String, Option<String>, i32)> {
    let status = pod.status.as_ref().unwrap();
    let mut ids: Vec<_> = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
        .map(|c| (c.name.clone(), c.container_id.clone(), c.restart_count))
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
#[ignore = "needs the test ground with a real node (scripts/build-testground, scripts/build-node-images)"]
async fn an_ingress_edit_reaches_the_running_sidecar_without_a_restart() {
    let ground = support::ground().await;
    let client = ground.client().await.unwrap();
    let (stack, ns) = stack_and_namespace(ground, "live-edit").await;
    kubectl(ground, &["apply", "-f", "deploy/base/classes.yaml"]);
    let mut template = echo_pod("live", json!({"app": "live", "tunnels.pico.sh/inject": "true"}), json!({}), "Always");
    template["metadata"].as_object_mut().unwrap().remove("name");
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "live"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "live"}}, "template": template},
    }))
    .unwrap();
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "live"},
        "spec": {"selector": {"app": "live"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    }))
    .unwrap();
    let ingress: Ingress = serde_json::from_value(json!({
        "metadata": {"name": "live"},
        "spec": {"ingressClassName": "pico-tunnel", "rules": [{"host": "before", "http": {"paths": [{
            "path": "/", "pathType": "Prefix",
            "backend": {"service": {"name": "live", "port": {"number": 80}}}}]}}]},
    }))
    .unwrap();
    Api::<Deployment>::namespaced(client.clone(), &ns).create(&PostParams::default(), &deployment).await.unwrap();
    Api::<Service>::namespaced(client.clone(), &ns).create(&PostParams::default(), &service).await.unwrap();
    Api::<Ingress>::namespaced(client.clone(), &ns).create(&PostParams::default(), &ingress).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod = support::ready_pods(&pods, "app=live", 1, Duration::from_secs(60)).await.remove(0);
    let (old_host, new_host) =
        (stack.sish.http_host(&stack.user, "before"), stack.sish.http_host(&stack.user, "after"));
    assert_eq!(stack.get_through_sish(&old_host, Duration::from_secs(60)).await, BODY);
    let pod = pods.get(pod.metadata.name.as_deref().unwrap()).await.unwrap();
    let before = container_ids(&pod);
    assert!(before.iter().all(|(_, id, restarts)| id.is_some() && *restarts == 0), "{before:?}");
    let agent = Process::of(&pod, AGENT);
    let file = in_container(agent.pid, "/etc/picotun/tunnels/tunnels.json");
    let read_file = || std::fs::read_to_string(&file).unwrap_or_default();
    assert!(read_file().contains("\"before\""), "the downward-API file names the first host: {}", read_file());

    // The edit, as a user makes it.
    let edited = Instant::now();
    kubectl(
        ground,
        &[
            "-n",
            &ns,
            "patch",
            "ingress",
            "live",
            "--type=json",
            "-p",
            r#"[{"op":"replace","path":"/spec/rules/0/host","value":"after"}]"#,
        ],
    );
    let name = pod.metadata.name.clone().unwrap();
    let (mut annotated, mut in_file, mut answered) = (None, None, None);
    while answered.is_none() {
        assert!(edited.elapsed() < Duration::from_secs(60), "no answer for {new_host} 60 s after the edit");
        if annotated.is_none() {
            let p = pods.get(&name).await.unwrap();
            let tunnels = p.metadata.annotations.as_ref().and_then(|a| a.get("tunnels.pico.sh/tunnels").cloned());
            if tunnels.is_some_and(|t| t.contains("\"after\"")) {
                annotated = Some(edited.elapsed());
            }
        }
        if in_file.is_none() && read_file().contains("\"after\"") {
            in_file = Some(edited.elapsed());
        }
        if let Some((200, body)) = get_once(&stack, &new_host).await {
            assert_eq!(body, BODY);
            answered = Some(edited.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = |d: Option<Duration>| d.map(|d| format!("{:.2}s", d.as_secs_f32())).unwrap_or("-".into());
    println!(
        "Ingress host edit -> pod annotation {} -> downward-API file in the sidecar {} -> first answer through sish {}",
        secs(annotated),
        secs(in_file),
        secs(answered)
    );
    assert!(in_file.is_some(), "the new host reached the sidecar through its file");

    // The same pod and containers, never restarted; the old name is gone from sish.
    let after = pods.get(&name).await.unwrap();
    assert_eq!(after.metadata.uid, pod.metadata.uid, "the same pod");
    assert_eq!(container_ids(&after), before, "the same containers, restartCount 0");
    assert!(agent.alive(), "the same agent process");
    assert_eq!(pods.list(&Default::default()).await.unwrap().items.len(), 1, "no new pod");
    let old = wait_for(
        &format!("{old_host} gone from sish"),
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async { Ok(get_once(&stack, &old_host).await.filter(|(s, _)| *s != 200)) },
    )
    .await
    .unwrap();
    println!("the old host now: {} {:?}", old.0, old.1.trim());
    let logs = kubectl(ground, &["-n", &ns, "logs", &name, "-c", AGENT]);
    assert!(logs.contains("forward cancelled (configuration changed)"), "{logs}");

    clean_up(ground, stack, &ns).await;
}

fn proc_status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field).and_then(|r| r.strip_prefix(':')))
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

#[tokio::test]
#[ignore = "needs the test ground with a real node (scripts/build-testground, scripts/build-node-images)"]
async fn under_podsecurity_restricted_the_injected_pod_runs_confined() {
    let ground = support::ground().await;
    let client = ground.client().await.unwrap();
    let (stack, ns) = stack_and_namespace(ground, "restricted").await;
    kubectl(
        ground,
        &[
            "label",
            "namespace",
            &ns,
            "pod-security.kubernetes.io/enforce=restricted",
            "pod-security.kubernetes.io/enforce-version=latest",
        ],
    );
    // PodSecurity enforces here: a pod without the restricted settings is refused.
    let refused = support::try_kubectl(
        ground,
        &["-n", &ns, "run", "unconfined", "--image=hashicorp/http-echo:1.0", "--dry-run=server", "--", "-text=x"],
    )
    .expect_err("PodSecurity refuses an unconfined pod");
    assert!(refused.contains("violates PodSecurity \"restricted:latest\""), "{refused}");

    let mut template = echo_pod(
        "confined",
        json!({"app": "confined"}),
        json!({"tunnels.pico.sh/expose": "http:confined=5678"}),
        "Always",
    );
    template["metadata"].as_object_mut().unwrap().remove("name");
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "confined"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "confined"}}, "template": template},
    }))
    .unwrap();
    Api::<Deployment>::namespaced(client.clone(), &ns).create(&PostParams::default(), &deployment).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod = wait_for("the injected pod Ready", Duration::from_secs(60), Duration::from_millis(200), || async {
        let list = pods.list(&Default::default()).await.map_err(|e| e.to_string())?;
        Ok(list.items.into_iter().find(support::is_ready))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; events:\n{}", kubectl(ground, &["-n", &ns, "get", "events"])));
    assert!(
        pod.spec.as_ref().unwrap().init_containers.iter().flatten().any(|c| c.name == AGENT),
        "admitted with the sidecar under restricted"
    );
    // It runs, and its tunnel works (the agent read its key).
    let host = stack.sish.http_host(&stack.user, "confined");
    assert_eq!(stack.get_through_sish(&host, Duration::from_secs(30)).await, BODY);

    let (agent, app) = (Process::of(&pod, AGENT), Process::of(&pod, APP));
    for (who, p) in [("agent", agent), ("app", app)] {
        let (uid, gid) = (proc_status_field(p.pid, "Uid"), proc_status_field(p.pid, "Gid"));
        let (caps, no_new_privs, seccomp) = (
            proc_status_field(p.pid, "CapEff"),
            proc_status_field(p.pid, "NoNewPrivs"),
            proc_status_field(p.pid, "Seccomp"),
        );
        let root = root_mount_options(p.pid);
        println!(
            "{who}: Uid {uid}, Gid {gid}, CapEff {caps}, NoNewPrivs {no_new_privs}, Seccomp {seccomp}, root mount {root}"
        );
        assert!(uid.split_whitespace().all(|u| u == "65532"), "{who} runs as 65532, never root: {uid}");
        assert!(gid.split_whitespace().all(|g| g == "65532"), "{who}: {gid}");
        assert_eq!(caps, "0000000000000000", "{who} has no capabilities");
        assert_eq!(no_new_privs, "1", "{who} cannot gain privileges");
        assert_eq!(seccomp, "2", "{who} runs under a seccomp filter (RuntimeDefault)");
        assert!(root.split(',').any(|o| o == "ro"), "{who}'s root is read-only: {root}");
    }

    // The key: in the agent's view a file only reading is allowed on, mounted read-only.
    let key = in_container(agent.pid, "/etc/picotun/ssh/id");
    let meta = std::fs::metadata(&key).unwrap();
    println!(
        "agent's /etc/picotun/ssh/id: mode {:o}, owner {}:{}, {} bytes",
        meta.mode() & 0o7777,
        meta.uid(),
        meta.gid(),
        meta.len()
    );
    assert_eq!(meta.mode() & 0o222, 0, "nobody may write the key");
    assert!(meta.mode() & 0o004 != 0 || meta.uid() == 65532, "the agent's user (65532, no fsGroup) may read it");
    assert!(meta.len() > 0);
    let agent_mounts = std::fs::read_to_string(format!("/proc/{}/mountinfo", agent.pid)).unwrap();
    let mount_at = |mounts: &str, at: &str| -> Option<(String, String)> {
        mounts.lines().find(|l| l.split_whitespace().nth(4) == Some(at)).map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[2].to_string(), f[5].to_string())
        })
    };
    // (device, mount options): the secret volume is a tmpfs of its own, known by its device.
    let (key_device, key_options) =
        mount_at(&agent_mounts, "/etc/picotun/ssh").expect("the key is mounted in the agent");
    println!("agent's key mount: device {key_device}, {key_options}");
    assert!(key_options.split(',').any(|o| o == "ro"), "{key_options}");
    let token_device = mount_at(&agent_mounts, "/var/run/secrets/tunnels.pico.sh/report").map(|(d, _)| d);

    // Nothing else in the pod has it: the app's filesystem has no key, no picotun directory
    // and no mount of the key's (or the report token's) tmpfs; its /proc shows only its own
    // processes, so it cannot reach the agent's root through /proc/PID/root either.
    for path in ["/etc/picotun/ssh/id", "/etc/picotun", "/var/run/secrets/tunnels.pico.sh"] {
        let seen = in_container(app.pid, path);
        assert!(!seen.exists(), "the app sees {path}");
    }
    let app_mounts = std::fs::read_to_string(format!("/proc/{}/mountinfo", app.pid)).unwrap();
    let app_devices: Vec<&str> = app_mounts.lines().filter_map(|l| l.split_whitespace().nth(2)).collect();
    assert!(!app_devices.contains(&key_device.as_str()), "the app mounts the key's tmpfs {key_device}:\n{app_mounts}");
    if let Some(token) = &token_device {
        assert!(!app_devices.contains(&token.as_str()), "the app mounts the report token's tmpfs:\n{app_mounts}");
    }
    let app_procs: Vec<String> = std::fs::read_dir(in_container(app.pid, "/proc"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().filter(|n| n.chars().all(|c| c.is_ascii_digit())).map(str::to_string))
        .collect();
    println!("the app's /etc/picotun: absent; processes in its /proc: {app_procs:?}");
    for p in &app_procs {
        let cmdline = std::fs::read(in_container(app.pid, &format!("/proc/{p}/cmdline"))).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains("picotun"),
            "the app's /proc shows the agent's process {p}"
        );
    }

    clean_up(ground, stack, &ns).await;
}

#[tokio::test]
#[ignore = "needs the test ground with a real node (scripts/build-testground, scripts/build-node-images)"]
async fn with_sish_down_pods_stay_ready_and_a_gated_pod_holds_its_app_until_its_tunnel_is_up() {
    let ground = support::ground().await;
    let client = ground.client().await.unwrap();
    let (mut stack, ns) = stack_and_namespace(ground, "readiness").await;
    let pods: Api<Pod> = Api::namespaced(client, &ns);

    // tuns.sh is down (or the key unregistered): the sidecars cannot open anything.
    stack.sish.kill();
    let plain = exposed_pod("plain");
    let mut gated = echo_pod(
        "gated",
        json!({"app": "gated"}),
        json!({"tunnels.pico.sh/expose": "http:gated=5678", "tunnels.pico.sh/startup-gate": "true"}),
        "Always",
    );
    gated["metadata"]["labels"]["app"] = "gated".into();
    let created = Instant::now();
    pods.create(&PostParams::default(), &plain).await.unwrap();
    pods.create(&PostParams::default(), &serde_json::from_value(gated).unwrap()).await.unwrap();

    // Readiness is the sidecar's own health: the pod joins its Services without its tunnel.
    let plain = support::ready_pods(&pods, "app=plain", 1, Duration::from_secs(60)).await.remove(0);
    println!("with sish down, the plain pod is Ready {:.2}s after create", created.elapsed().as_secs_f32());
    let ip: std::net::IpAddr = plain.status.as_ref().unwrap().pod_ip.as_deref().unwrap().parse().unwrap();
    let (code, body) = support::get_in_node(ground, std::net::SocketAddr::new(ip, ADMIN_PORT), "/tunnels-up").unwrap();
    println!("plain pod /tunnels-up: {code} {body}");
    assert_eq!(code, 503, "its tunnel is not up: {body}");

    // The gated pod holds its app: the sidecar's startupProbe waits for the tunnel.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let held = pods.get("gated").await.unwrap();
    let sidecar = container_status(&held, AGENT);
    assert_eq!(sidecar.started, Some(false), "the sidecar has not passed its startup gate: {sidecar:?}");
    let app = support::find_container_status(&held, APP);
    assert!(app.is_none_or(|c| !running(c)), "the app is held while the tunnel is down: {app:?}");
    assert!(!support::is_ready(&held));
    println!("{:.1}s after create, the gated pod's app has not started", created.elapsed().as_secs_f32());

    // tuns.sh is back: the tunnel opens, then the app starts, then the pod is Ready.
    stack.sish.restart().await.unwrap();
    // Container start times have whole seconds.
    let back = Timestamp::from_second(Timestamp::now().as_second()).unwrap();
    let restarted = Instant::now();
    let gated = support::ready_pods(&pods, "app=gated", 1, Duration::from_secs(60)).await.remove(0);
    let app_started = started_at(&gated, APP).expect("the app runs");
    println!(
        "gated pod Ready {:.2}s after sish came back; its app started {:.0} ms after",
        restarted.elapsed().as_secs_f32(),
        ms_between(back, app_started)
    );
    assert!(app_started >= back, "the app started only once the tunnel could be up: {app_started} vs {back}");
    let host = stack.sish.http_host(&stack.user, "gated");
    assert_eq!(stack.get_through_sish(&host, Duration::from_secs(30)).await, BODY);
    clean_up(ground, stack, &ns).await;
}

/// Issue 14: a pod whose app (or another sidecar) needs the default admin port moves picotun's
/// with `tunnels.pico.sh/admin-port`: the agent listens there, the kubelet's probes follow it (the
/// pod goes Ready) and `/status` answers there; nothing listens on the default. And a UID the
/// platform assigns (OpenShift's restricted SCC gives each namespace a range, as
/// `1000650000`) runs the sidecar: with no fixed user of its own it takes the pod's, reads its
/// key and opens its tunnel, under PodSecurity `restricted`.
#[tokio::test]
#[ignore = "needs the test ground with a real node (scripts/build-testground, scripts/build-node-images)"]
async fn a_pod_moves_the_sidecars_admin_port_and_an_assigned_uid_runs_the_sidecar() {
    let ground = support::ground().await;
    let client = ground.client().await.unwrap();
    let (stack, ns) = stack_and_namespace(ground, "admin-port").await;
    kubectl(
        ground,
        &[
            "label",
            "namespace",
            &ns,
            "pod-security.kubernetes.io/enforce=restricted",
            "pod-security.kubernetes.io/enforce-version=latest",
        ],
    );
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    let moved = echo_pod(
        "moved",
        json!({"app": "moved"}),
        json!({"tunnels.pico.sh/expose": "http:moved=5678", "tunnels.pico.sh/admin-port": "7500"}),
        "Always",
    );
    let mut assigned = echo_pod(
        "assigned",
        json!({"app": "assigned"}),
        json!({"tunnels.pico.sh/expose": "http:assigned=5678"}),
        "Always",
    );
    assigned["spec"]["securityContext"]["runAsUser"] = 1_000_650_000.into();
    for pod in [moved, assigned] {
        pods.create(&PostParams::default(), &serde_json::from_value(pod).unwrap()).await.unwrap();
    }

    let moved = support::ready_pods(&pods, "app=moved", 1, Duration::from_secs(60)).await.remove(0);
    let sidecar = moved.spec.as_ref().unwrap().init_containers.iter().flatten().find(|c| c.name == AGENT).unwrap();
    assert_eq!(sidecar.ports.as_ref().unwrap()[0].container_port, 7500);
    let ip: std::net::IpAddr = moved.status.as_ref().unwrap().pod_ip.as_deref().unwrap().parse().unwrap();
    let host = stack.sish.http_host(&stack.user, "moved");
    assert_eq!(stack.get_through_sish(&host, Duration::from_secs(30)).await, BODY);
    let (code, body) = support::get_in_node(ground, std::net::SocketAddr::new(ip, 7500), "/status").unwrap();
    println!("moved pod, /status on 7500: {code} {body}");
    assert_eq!(code, 200, "{body}");
    let status: Value = serde_json::from_str(&body).unwrap();
    assert!(body.contains("http-moved"), "its tunnel is in /status: {status}");
    let default = support::get_in_node(ground, std::net::SocketAddr::new(ip, ADMIN_PORT), "/status");
    println!("moved pod, {ADMIN_PORT}: {default:?}");
    assert!(
        matches!(&default, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "nothing listens on the default: {default:?}"
    );

    let assigned = support::ready_pods(&pods, "app=assigned", 1, Duration::from_secs(60)).await.remove(0);
    let host = stack.sish.http_host(&stack.user, "assigned");
    assert_eq!(stack.get_through_sish(&host, Duration::from_secs(30)).await, BODY);
    let agent = Process::of(&assigned, AGENT);
    let uid = proc_status_field(agent.pid, "Uid");
    println!("assigned pod's agent: Uid {uid}, Gid {}", proc_status_field(agent.pid, "Gid"));
    assert!(uid.split_whitespace().all(|u| u == "1000650000"), "the pod's UID runs the sidecar: {uid}");

    clean_up(ground, stack, &ns).await;
}
