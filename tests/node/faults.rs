//! Faults with real containers, through sish as tuns.sh runs it: sish killed and restarted, the
//! app container crashing under a live tunnel, and replicas on sish without load balancing (one
//! serves, the others stand by, Ready, and one takes over when the serving pod goes).
//!
//! Each test has its own stack (sish, webhook, controller) and namespace, and runs an echo app
//! whose answer names the pod (`-text=hello from $(POD_NAME)`, the downward API), so a visitor's
//! answer says which replica served it. Figures are printed, never asserted.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use picotun_testground::{ControlPlane, wait_for};
use serde_json::{Value, json};

use crate::support::{self, Stack, container_status, kubectl};

/// The app every test here runs: `replicas` echo pods opted in for the sidecar, a Service, and an
/// Ingress of class `pico-tunnel` for host `host`.
async fn deploy_echo(ground: &ControlPlane, ns: &str, app: &str, host: &str, replicas: i32) {
    let client = ground.client().await.unwrap();
    kubectl(ground, &["apply", "-f", "deploy/base/classes.yaml"]);
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": app},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": app}},
            "template": {
                "metadata": {"labels": {"app": app, "tunnels.pico.sh/inject": "true"}},
                "spec": {
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 65532,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "terminationGracePeriodSeconds": 10,
                    "containers": [{
                        "name": "echo", "image": "hashicorp/http-echo:1.0",
                        "args": ["-text=hello from $(POD_NAME)", "-listen=:5678"],
                        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                        "ports": [{"name": "http", "containerPort": 5678}],
                        "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                                            "capabilities": {"drop": ["ALL"]}},
                    }],
                },
            },
        },
    }))
    .unwrap();
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": app},
        "spec": {"selector": {"app": app}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    }))
    .unwrap();
    let ingress: Ingress = serde_json::from_value(json!({
        "metadata": {"name": app},
        "spec": {
            "ingressClassName": "pico-tunnel",
            "rules": [{"host": host, "http": {"paths": [{"path": "/", "pathType": "Prefix",
                "backend": {"service": {"name": app, "port": {"number": 80}}}}]}}],
        },
    }))
    .unwrap();
    // Routes first, so the webhook gives the pods their tunnel as they are created.
    let pp = PostParams::default();
    Api::<Service>::namespaced(client.clone(), ns).create(&pp, &service).await.unwrap();
    Api::<Ingress>::namespaced(client.clone(), ns).create(&pp, &ingress).await.unwrap();
    Api::<Deployment>::namespaced(client, ns).create(&pp, &deployment).await.unwrap();
}

/// The Ingress ADDRESS: the name sish assigned, as a sidecar reported it.
async fn ingress_address(ground: &ControlPlane, stack: &Stack, ns: &str, name: &str) -> String {
    let client = ground.client().await.unwrap();
    let ingresses: Api<Ingress> = Api::namespaced(client, ns);
    wait_for("the Ingress ADDRESS", Duration::from_secs(60), Duration::from_millis(200), || async {
        let ing = ingresses.get(name).await.map_err(|e| e.to_string())?;
        Ok(ing.status.and_then(|s| s.load_balancer).and_then(|l| l.ingress).and_then(|i| i.first()?.hostname.clone()))
    })
    .await
    .unwrap_or_else(|e| {
        panic!("{e}; controller log (all logs in {}):\n{}", stack.dir.display(), stack.controller.log_tail(20))
    })
}

fn pod_name(pod: &Pod) -> &str {
    pod.metadata.name.as_deref().unwrap_or("?")
}

/// (container ID, restart count) of container `name`.
fn container_run(pod: &Pod, name: &str) -> Run {
    let c = container_status(pod, name);
    (c.container_id.clone().unwrap_or_default(), c.restart_count)
}

/// One tunnel as a sidecar reported it: (tunnel, state, public address).
type Reported = (String, String, Option<String>);

/// (container ID, restart count) of one container.
type Run = (String, i32);

/// What the pod's sidecar last reported for each tunnel (`tunnels.pico.sh/addresses`).
fn reported(pod: &Pod) -> Vec<Reported> {
    let Some(raw) = pod.metadata.annotations.as_ref().and_then(|a| a.get("tunnels.pico.sh/addresses")) else {
        return Vec::new();
    };
    let value: Value = serde_json::from_str(raw).unwrap_or(Value::Null);
    value["tunnels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(name, t)| {
                    (
                        name.clone(),
                        t["state"].as_str().unwrap_or("?").to_string(),
                        t["publicAddress"].as_str().map(str::to_string),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn agent_logs(ground: &ControlPlane, ns: &str, pod: &str) -> String {
    support::try_kubectl(ground, &["-n", ns, "logs", pod, "-c", "picotun-agent"]).unwrap_or_else(|e| e)
}

/// What one visitor got: a GET by Host header to sish's HTTP port, bounded to `BOUND`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Answer {
    Status(u16, String),
    /// The connection closed (or was reset) before any byte of an answer.
    Closed(String),
    Refused,
    /// No answer within the bound: a hang.
    TimedOut,
}

/// How long sish stays down in the restart test.
const SISH_DOWNTIME: Duration = Duration::from_secs(5);

const BOUND: Duration = Duration::from_secs(5);

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Answer::Status(s, body) => write!(f, "{s} {body:?}"),
            Answer::Closed(why) => write!(f, "connection closed without an answer ({why})"),
            Answer::Refused => f.write_str("connection refused"),
            Answer::TimedOut => write!(f, "no answer within {BOUND:?}"),
        }
    }
}

async fn visit(port: u16, host: &str) -> Answer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: picotun-faults\r\nConnection: close\r\n\r\n");
    let attempt = async {
        let mut conn = match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Answer::Refused,
            Err(e) => return Answer::Closed(e.to_string()),
        };
        if let Err(e) = conn.write_all(request.as_bytes()).await {
            return Answer::Closed(e.to_string());
        }
        let mut raw = Vec::new();
        let read = conn.read_to_end(&mut raw).await;
        if raw.is_empty() {
            return Answer::Closed(read.err().map(|e| e.to_string()).unwrap_or_else(|| "EOF".into()));
        }
        let text = String::from_utf8_lossy(&raw);
        let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.trim().to_string()).unwrap_or_default();
        Answer::Status(status, body.chars().take(80).collect())
    };
    tokio::time::timeout(BOUND, attempt).await.unwrap_or(Answer::TimedOut)
}

/// Consecutive equal answers, collapsed: (first seen, last seen, answer, how many).
#[derive(Default)]
struct Timeline {
    start: Option<Instant>,
    runs: Vec<(Duration, Duration, Answer, usize)>,
}

impl Timeline {
    fn new(start: Instant) -> Timeline {
        Timeline { start: Some(start), runs: Vec::new() }
    }

    fn push(&mut self, answer: Answer) {
        let at = self.start.expect("started").elapsed();
        match self.runs.last_mut() {
            Some((_, last, a, n)) if *a == answer => {
                *last = at;
                *n += 1;
            }
            _ => self.runs.push((at, at, answer, 1)),
        }
    }

    fn print(&self, what: &str) {
        println!("{what}:");
        for (first, last, answer, n) in &self.runs {
            println!("  {:>6.2}s..{:>6.2}s  {n:>3} x {answer}", first.as_secs_f32(), last.as_secs_f32());
        }
    }

    fn answers(&self) -> impl Iterator<Item = &Answer> {
        self.runs.iter().map(|(_, _, a, _)| a)
    }
}

fn is_ok(answer: &Answer) -> bool {
    matches!(answer, Answer::Status(200, _))
}

/// One test's world: its stack, a namespace of its own with the key Secret, `replicas` echo pods
/// Ready behind an Ingress for `host`, and the public name sish gave it.
struct Scene {
    stack: Stack,
    ns: String,
    pods: Api<Pod>,
    ready: Vec<Pod>,
    host: String,
}

async fn scene(ground: &ControlPlane, prefix: &str, host: &str, replicas: usize) -> Scene {
    let client = ground.client().await.unwrap();
    let (stack, ns) = support::stack_and_namespace(ground, prefix).await;
    deploy_echo(ground, &ns, "echo", host, replicas as i32).await;
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    let ready = support::ready_pods(&pods, "app=echo", replicas, Duration::from_secs(90)).await;
    let host = ingress_address(ground, &stack, &ns, "echo").await;
    Scene { stack, ns, pods, ready, host }
}

#[tokio::test]
#[ignore = "needs the test ground with a real node (scripts/build-testground, scripts/build-node-images)"]
async fn sish_killed_and_restarted_the_pods_tunnels_come_back_without_a_pod_restart() {
    let ground = support::ground().await;
    let Scene { mut stack, ns, pods, ready: before, host } = scene(ground, "faults-sish", "comeback", 2).await;
    let body = stack.get_through_sish(&host, Duration::from_secs(30)).await;
    println!("before: GET http://{host}/ -> {body:?}");
    let runs: Vec<(String, Run, Run)> = before
        .iter()
        .map(|p| (pod_name(p).to_string(), container_run(p, "picotun-agent"), container_run(p, "echo")))
        .collect();

    // sish crashes: every tunnel's SSH connection drops with it.
    stack.sish.kill();
    let killed = Instant::now();
    let down = visit(stack.http_port, &host).await;
    println!("sish SIGKILLed; a visitor gets: {down}");
    assert!(!is_ok(&down), "sish is down, nothing answers: {down}");
    for (pod, _, _) in &runs {
        let logs = wait_for(
            &format!("{pod}'s agent to notice the lost connection"),
            Duration::from_secs(30),
            Duration::from_millis(200),
            || async {
                let logs = agent_logs(ground, &ns, pod);
                Ok(logs.contains("tunnel connection down").then_some(logs))
            },
        )
        .await
        .unwrap();
        let line = logs.lines().find(|l| l.contains("tunnel connection down")).unwrap_or_default();
        println!("{pod} noticed after {:.1}s: {line}", killed.elapsed().as_secs_f32());
    }

    // Down for a while, as a crashed server is: the agents keep retrying with backoff.
    tokio::time::sleep(SISH_DOWNTIME.saturating_sub(killed.elapsed())).await;
    for (pod, _, _) in &runs {
        let logs = agent_logs(ground, &ns, pod);
        let tries = logs.lines().filter(|l| l.contains("tunnel connection down")).count();
        let last = logs.lines().rfind(|l| l.contains("tunnel connection down")).unwrap_or_default();
        println!("{pod}: {tries} failed connects while sish was down; last: {last}");
    }

    // Back on the same port with the same host key: the agents reconnect by themselves.
    stack.sish.restart().await.unwrap();
    let restarted = Instant::now();
    println!("sish restarted {:.1}s after the kill", killed.elapsed().as_secs_f32());
    let mut timeline = Timeline::new(restarted);
    let deadline = restarted + Duration::from_secs(60);
    loop {
        let answer = visit(stack.http_port, &host).await;
        let ok = is_ok(&answer);
        timeline.push(answer);
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no answer through sish 60s after its restart; sish log:\n{}\nagent logs:\n{}",
            stack.sish.log_tail(40),
            runs.iter().map(|(p, _, _)| agent_logs(ground, &ns, p)).collect::<Vec<_>>().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recovery = restarted.elapsed();
    timeline.print("visitors after sish's restart");
    println!("recovery: {:.2}s from sish's restart to the first 200 through it", recovery.as_secs_f32());

    // Every pod is the same: no container restarted, the same containers run, and each agent
    // holds the name or stands by for it again.
    let after = support::ready_pods(&pods, "app=echo", 2, Duration::from_secs(30)).await;
    for (pod, agent, app) in &runs {
        let now = after.iter().find(|p| pod_name(p) == pod).unwrap_or_else(|| panic!("pod {pod} is still there"));
        assert_eq!(&container_run(now, "picotun-agent"), agent, "{pod}: the sidecar was not restarted");
        assert_eq!(&container_run(now, "echo"), app, "{pod}: the app was not restarted");
        assert_eq!(agent.1, 0, "{pod}: restartCount of picotun-agent");
        println!("{pod}: picotun-agent {} restartCount {}, echo restartCount {}", agent.0, agent.1, app.1);
    }
    let states = wait_for(
        "one agent established again and the other standing by",
        Duration::from_secs(30),
        Duration::from_millis(250),
        || async {
            let mut states = Vec::new();
            for (pod, _, _) in &runs {
                let p = pods.get(pod).await.map_err(|e| e.to_string())?;
                states.push((pod.clone(), reported(&p)));
            }
            let established = states.iter().filter(|(_, r)| r.iter().any(|t| t.1 == "established")).count();
            let standing = states.iter().filter(|(_, r)| r.iter().any(|t| t.1 == "standingBy")).count();
            if established == 1 && standing == 1 { Ok(Some(states)) } else { Err(format!("{states:?}")) }
        },
    )
    .await
    .unwrap();
    for (pod, r) in &states {
        println!("{pod} reports {r:?}");
        // A told standby reports standingBy even while it reconnects: wait for its new connection.
        let reconnected =
            wait_for("the agent to connect again", Duration::from_secs(30), Duration::from_millis(250), || async {
                let logs = agent_logs(ground, &ns, pod);
                let connects = logs.lines().filter(|l| l.contains(": connected ")).count();
                Ok((connects >= 2).then_some(()))
            })
            .await;
        let logs = agent_logs(ground, &ns, pod);
        let connects = logs.lines().filter(|l| l.contains(": connected ")).count();
        assert!(reconnected.is_ok(), "{pod}'s agent connected again by itself (connected lines: {connects}):\n{logs}");
        // On that new connection: the name again, or standing by for it.
        let since = &logs[logs.rfind(": connected ").unwrap()..];
        let line = since.lines().find(|l| l.contains("forward established") || l.contains("standing by"));
        assert!(line.is_some(), "{pod}'s agent asked for the name again after reconnecting:\n{logs}");
        println!("{pod} after reconnecting: {}", line.unwrap_or_default());
    }
    assert_eq!(ingress_address(ground, &stack, &ns, "echo").await, host, "the same public name after the restart");

    support::delete_namespace(ground, &ns).await;
    stack.remove(ground).await;
}

#[tokio::test]
#[ignore = "needs the test ground with a real node (scripts/build-testground, scripts/build-node-images)"]
async fn the_app_crashing_keeps_the_tunnel_visitors_get_a_clean_error_then_traffic_resumes() {
    let ground = support::ground().await;
    let Scene { stack, ns, pods, ready, host } = scene(ground, "faults-app", "crash", 1).await;
    let pod = ready[0].clone();
    let name = pod_name(&pod).to_string();
    let body = stack.get_through_sish(&host, Duration::from_secs(30)).await;
    assert_eq!(body, format!("hello from {name}\n"));
    let agent = container_run(&pod, "picotun-agent");
    let app = container_run(&pod, "echo");
    let agent_pid = support::container_pid(&pod, "picotun-agent").expect("the sidecar's process");
    let tunnels = support::in_container(agent_pid, "/etc/picotun/tunnels/tunnels.json");
    let tunnels = std::fs::read_to_string(&tunnels).unwrap_or_else(|e| panic!("{}: {e}", tunnels.display()));
    println!("the sidecar (process {agent_pid}) holds {tunnels}");

    // The app's process dies (SIGKILL from the host, as an OOM kill or a crash would end it),
    // twice: the kubelet restarts it at once the first time, after its crash-loop backoff (10s)
    // the second.
    let mut now = pod.clone();
    for round in 1..=2 {
        let pid = support::container_pid(&now, "echo").expect("the app container's process");
        kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
        let crashed = Instant::now();
        println!("crash {round}: SIGKILLed the app container's process {pid} ({name}/echo)");

        let mut timeline = Timeline::new(crashed);
        let deadline = crashed + Duration::from_secs(40);
        let mut failed = false;
        loop {
            let answer = visit(stack.http_port, &host).await;
            let ok = is_ok(&answer);
            failed |= !ok;
            timeline.push(answer);
            if ok && failed {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "traffic did not resume within 40s of crash {round}; agent log:\n{}",
                agent_logs(ground, &ns, &name)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let resumed = crashed.elapsed();
        timeline.print(&format!("crash {round}: visitors after the app's crash"));
        let outage: Vec<&Answer> = timeline.answers().filter(|a| !is_ok(a)).collect();
        let first_error = timeline.runs.iter().find(|r| !is_ok(&r.2)).map(|r| r.0).unwrap_or_default();
        let last_error = timeline.runs.iter().rev().find(|r| !is_ok(&r.2)).map(|r| r.1).unwrap_or_default();
        println!(
            "crash {round}: outage: errors seen from {:.2}s to {:.2}s after the crash; first 200 again {:.2}s after it",
            first_error.as_secs_f32(),
            last_error.as_secs_f32(),
            resumed.as_secs_f32()
        );
        assert!(!outage.is_empty(), "a visitor saw the app down");
        for answer in &outage {
            assert!(
                matches!(answer, Answer::Status(s, _) if *s >= 500) || matches!(answer, Answer::Closed(_)),
                "while the app is down a visitor gets a clean error (a 5xx or a closed connection), not {answer}"
            );
        }

        // The kubelet restarted the app; the sidecar ran on untouched, on the same SSH connection.
        now = wait_for(
            "the app's restart in the pod status",
            Duration::from_secs(30),
            Duration::from_millis(200),
            || async {
                let p = pods.get(&name).await.map_err(|e| e.to_string())?;
                Ok((container_run(&p, "echo").1 == app.1 + round && support::is_ready(&p)).then_some(p))
            },
        )
        .await
        .unwrap();
    }
    let agent_now = container_run(&now, "picotun-agent");
    println!(
        "echo: restartCount {} -> {}; picotun-agent {} restartCount {}",
        app.1,
        container_run(&now, "echo").1,
        agent_now.0,
        agent_now.1
    );
    assert_eq!(agent_now, agent, "the sidecar kept running: same container, not restarted");
    assert_eq!(support::container_pid(&now, "picotun-agent"), Some(agent_pid), "the same sidecar process all along");
    let logs = agent_logs(ground, &ns, &name);
    let connects = logs.lines().filter(|l| l.contains(": connected ")).count();
    let established = logs.lines().filter(|l| l.contains("forward established")).count();
    assert_eq!((connects, established), (1, 1), "one SSH connection and one forward all along:\n{logs}");
    assert!(!logs.contains("tunnel connection down"), "the tunnel never dropped:\n{logs}");
    let refused: Vec<&str> = logs.lines().filter(|l| l.contains("refused the connection")).collect();
    println!("agent log while the app was down ({} lines), first: {:?}", refused.len(), refused.first());
    assert_eq!(stack.get_through_sish(&host, Duration::from_secs(10)).await, format!("hello from {name}\n"));

    support::delete_namespace(ground, &ns).await;
    stack.remove(ground).await;
}

/// Waits until the live (not terminating) pods of `app=echo` are `count`, all Ready, exactly one
/// of them reporting its tunnel established and the others standing by; (holder, each pod's
/// name, Ready and report).
async fn one_holder(
    ground: &ControlPlane,
    stack: &Stack,
    ns: &str,
    pods: &Api<Pod>,
    count: usize,
) -> (String, Vec<(String, bool, Vec<Reported>)>) {
    // The controller may move the name once while the pods start (a pod that got it before it
    // was Ready is not eligible, the oldest Ready one is told to take it), and the reports lag
    // the move: a state is steady when the same pod still holds it a few seconds later.
    let mut found = observe_one_holder(stack, pods, count).await;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let again = observe_one_holder(stack, pods, count).await;
        let steady = again.0 == found.0;
        found = again;
        if steady {
            break;
        }
    }
    for (name, ready, r) in &found.1 {
        let logs = agent_logs(ground, ns, name);
        let said = if logs.contains("forward established") { "forward established" } else { "standing by" };
        println!("  {name}: Ready={ready} reports {r:?}; its agent's log: {said:?}");
    }
    found
}

async fn observe_one_holder(
    stack: &Stack,
    pods: &Api<Pod>,
    count: usize,
) -> (String, Vec<(String, bool, Vec<Reported>)>) {
    let what = format!("{count} Ready replicas, one established, {} standing by", count - 1);
    wait_for(&what, Duration::from_secs(60), Duration::from_millis(250), || async {
        let list = pods.list(&ListParams::default().labels("app=echo")).await.map_err(|e| e.to_string())?;
        let states: Vec<(String, bool, Vec<Reported>)> = list
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .map(|p| (pod_name(p).to_string(), support::is_ready(p), reported(p)))
            .collect();
        let holders: Vec<&String> =
            states.iter().filter(|(_, _, r)| r.iter().any(|t| t.1 == "established")).map(|s| &s.0).collect();
        let standing = states.iter().filter(|(_, _, r)| r.iter().any(|t| t.1 == "standingBy")).count();
        match holders[..] {
            [h] if states.len() == count && standing == count - 1 && states.iter().all(|s| s.1) => {
                Ok(Some((h.clone(), states.clone())))
            }
            _ => Err(format!("{states:?}")),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nwebhook log:\n{}", stack.webhook.log_tail(20)))
}

/// GETs through sish until a pod other than `holder` answers 200; (that pod, time since
/// `since`, what visitors saw).
async fn watch_takeover(stack: &Stack, host: &str, holder: &str, since: Instant) -> (String, Duration, Timeline) {
    let mut timeline = Timeline::new(since);
    let deadline = since + Duration::from_secs(40);
    loop {
        let answer = visit(stack.http_port, host).await;
        let from = match &answer {
            Answer::Status(200, body) => body.strip_prefix("hello from ").map(str::to_string),
            _ => None,
        };
        timeline.push(answer);
        if let Some(from) = from.filter(|f| f != holder) {
            return (from, since.elapsed(), timeline);
        }
        if Instant::now() > deadline {
            timeline.print("visitors");
            panic!("no other replica answered within 40s after {holder} went; sish log:\n{}", stack.sish.log_tail(30));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
#[ignore = "needs the test ground with a real node (scripts/build-testground, scripts/build-node-images)"]
async fn replicas_without_load_balancing_one_serves_the_others_stand_by_ready_and_one_takes_over() {
    let ground = support::ground().await;
    let Scene { stack, ns, pods, host, .. } = scene(ground, "faults-replicas", "standby", 3).await;

    // One pod holds the name, the others stand by -- and all three are Ready.
    println!("3 replicas on sish without load balancing:");
    let (holder, states) = one_holder(ground, &stack, &ns, &pods, 3).await;
    // While the pods start, the controller may move the name once: a pod that got it on sish
    // before it was Ready is not eligible to hold it, and the oldest Ready one is told to take it.
    // What must hold is the steady state: the holder's agent has it, every other one stands by
    // (the last word of each standby's log is standing by).
    for (name, _, _) in &states {
        let logs = agent_logs(ground, &ns, name);
        if *name == holder {
            assert!(logs.contains("forward established"), "{name}'s agent log:\n{logs}");
        } else {
            let last = logs.rfind("standing by").zip(logs.rfind("forward established"));
            assert!(
                logs.contains("standing by") && last.is_none_or(|(stood, had)| stood > had),
                "{name}'s agent log ends standing by:\n{logs}"
            );
        }
    }
    let body = stack.get_through_sish(&host, Duration::from_secs(30)).await;
    assert_eq!(body, format!("hello from {holder}\n"), "the holder serves the name");
    println!("GET http://{host}/ -> {body:?}");

    // Defect 13 of issue 12: the controller tells the standbys (`standby: true` in their tunnels
    // files), and a told standby asks sish for nothing -- before, every standby re-requested the
    // name every 3-4.5 s for the life of the Deployment, each try making and cancelling a random
    // public name on sish.
    let told = |p: &Pod| {
        p.metadata.annotations.as_ref().and_then(|a| a.get("tunnels.pico.sh/tunnels")).is_some_and(|t| {
            let file: Value = serde_json::from_str(t).unwrap_or(Value::Null);
            file["tunnels"].as_array().is_some_and(|ts| !ts.is_empty() && ts.iter().all(|t| t["standby"] == true))
        })
    };
    wait_for(
        "the controller to mark exactly the standbys",
        Duration::from_secs(30),
        Duration::from_millis(250),
        || async {
            let list = pods.list(&ListParams::default().labels("app=echo")).await.map_err(|e| e.to_string())?;
            let live: Vec<&Pod> = list.items.iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect();
            let marked: Vec<&str> = live.iter().filter(|p| told(p)).map(|p| pod_name(p)).collect();
            let others: Vec<&str> = live.iter().filter(|p| pod_name(p) != holder).map(|p| pod_name(p)).collect();
            if marked == others {
                Ok(Some(()))
            } else {
                Err(format!("standby in the files of {marked:?}, want {others:?}"))
            }
        },
    )
    .await
    .unwrap();
    let forwards = |log: &str| log.lines().filter(|l| l.contains("forwarding started")).count();
    let before = forwards(&stack.sish.log_tail(1_000_000));
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = forwards(&stack.sish.log_tail(1_000_000));
    println!("forwards sish started in 10 s of steady state with 2 standbys: {}", after - before);
    assert_eq!(after, before, "no standby asked sish for anything:\n{}", stack.sish.log_tail(20));

    // 1. The serving pod is deleted. The controller sees it terminating and hands the name to a
    // Ready standby (its tunnels file loses `standby`, the kubelet refreshes the file, the agent
    // asks); the pod the Deployment starts in the deleted one's place may ask sooner, since the
    // webhook does not know of the others at admission -- whoever sish gives the name keeps it.
    let standbys: Vec<String> = states.iter().map(|s| s.0.clone()).filter(|n| *n != holder).collect();
    let deleted = Instant::now();
    pods.delete(&holder, &DeleteParams::default()).await.unwrap();
    let (successor, takeover, timeline) = watch_takeover(&stack, &host, &holder, deleted).await;
    timeline.print(&format!("visitors after deleting {holder}"));
    let who = if standbys.contains(&successor) { "a standby" } else { "the Deployment's replacement pod" };
    println!(
        "takeover (delete): {:.2}s from deleting {holder} to the first 200 from {successor} ({who})",
        takeover.as_secs_f32()
    );
    println!("after the takeover:");
    let (holder, states) = one_holder(ground, &stack, &ns, &pods, 3).await;
    assert_eq!(holder, successor, "the pod that answered holds the name");

    // 2. The serving pod goes with no replacement -- a scale-down that removes exactly it (the
    // lowest pod-deletion-cost goes first): one of the standbys must take over.
    let standbys: Vec<String> = states.iter().map(|s| s.0.clone()).filter(|n| *n != holder).collect();
    kubectl(ground, &["-n", &ns, "annotate", "pod", &holder, "controller.kubernetes.io/pod-deletion-cost=-1000"]);
    let scaled = Instant::now();
    kubectl(ground, &["-n", &ns, "scale", "deployment", "echo", "--replicas=2"]);
    let (successor, takeover, timeline) = watch_takeover(&stack, &host, &holder, scaled).await;
    timeline.print(&format!("visitors after scaling down to 2 (removes {holder})"));
    println!(
        "takeover (scale-down): {:.2}s from the scale-down to the first 200 from the standby {successor}",
        takeover.as_secs_f32()
    );
    assert!(standbys.contains(&successor), "a standby ({standbys:?}) took over, not {successor}");
    let logs = agent_logs(ground, &ns, &successor);
    let stood = logs.find("standing by").unwrap_or_else(|| panic!("{successor} stood by:\n{logs}"));
    let took = logs.find("forward established").unwrap_or_else(|| panic!("{successor} took over:\n{logs}"));
    assert!(stood < took, "{successor} stood by, then took over:\n{logs}");
    println!("after the scale-down:");
    let (holder, _) = one_holder(ground, &stack, &ns, &pods, 2).await;
    assert_eq!(holder, successor);
    assert_eq!(ingress_address(ground, &stack, &ns, "echo").await, host, "the Ingress keeps its ADDRESS");

    support::delete_namespace(ground, &ns).await;
    stack.remove(ground).await;
}
