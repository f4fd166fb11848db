//! `pod_ready`: on the test ground's real node (kubelet, containerd, runc), the time from
//! creating a pod to the pod's Ready condition, for a pod the webhook injects the sidecar into
//! ("ours": as a native sidecar, the default on this kubelet, and as a regular container,
//! `--native-sidecar=false`) and the very same pod in a namespace without injection
//! ("baseline"), interleaved, one pod at a time. Run by `bench/node.sh`; prints `bench:` lines
//! on stdout, each pod's steps on stderr.
//!
//! The clock is this process's monotonic clock: from just before the create request to the
//! first watch event that shows the pod Ready (a watch opened before the create, on that pod's
//! name). The pod's own timestamps (creationTimestamp, startedAt, lastTransitionTime) have
//! whole seconds only. The create request includes the webhook's admission for the injected
//! pods (milliseconds: bench/webhook.sh measures it).
//!
//!   BENCH_RUNS=30      measured pods of each kind
//!   BENCH_WARMUP=1     pods of each kind first, not measured
//!   BENCH_KUBELET_LOG  copy the node's kubelet log there at the end
//!
//! The stacks (sish, `picotun webhook`, `picotun controller`) and the ground are the real-node
//! tests' own: tests/node/support.rs.

#[allow(dead_code)]
#[path = "../tests/node/support.rs"]
mod support;

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;

const AGENT: &str = "picotun-agent";
const APP: &str = "echo";

/// The pod every kind creates: the examples' echo server, exposed. In a stack's namespace the
/// webhook adds the sidecar; elsewhere the annotation is only an annotation.
fn pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": "pod-ready"},
                     "annotations": {"tunnels.pico.sh/expose": format!("http:{name}=5678")}},
        "spec": {
            "terminationGracePeriodSeconds": 10,
            "containers": [{
                "name": APP, "image": "hashicorp/http-echo:1.0",
                "args": ["-text=hello from a pod", "-listen=:5678"],
                "ports": [{"name": "http", "containerPort": 5678}],
            }],
        },
    }))
    .unwrap()
}

/// When (seconds after the create request was sent) the watch first showed each step.
#[derive(Clone, Debug, Default)]
struct Marks {
    created: Option<f64>,
    scheduled: Option<f64>,
    sandbox: Option<f64>,
    agent_running: Option<f64>,
    agent_ready: Option<f64>,
    app_running: Option<f64>,
    ready: Option<f64>,
}

impl Marks {
    fn steps(&self) -> [(&'static str, Option<f64>); 7] {
        [
            ("created", self.created),
            ("scheduled", self.scheduled),
            ("sandbox", self.sandbox),
            ("agent running", self.agent_running),
            ("agent ready", self.agent_ready),
            ("app running", self.app_running),
            ("Ready", self.ready),
        ]
    }

    fn see(&mut self, pod: &Pod, at: f64) {
        let mark = |slot: &mut Option<f64>, now: bool| {
            if now && slot.is_none() {
                *slot = Some(at);
            }
        };
        let status = pod.status.as_ref();
        let condition = |type_: &str| {
            status
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == type_ && c.status == "True"))
        };
        let container = |name: &str| support::find_container_status(pod, name);
        let running =
            |name: &str| container(name).is_some_and(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()));
        mark(&mut self.scheduled, pod.spec.as_ref().is_some_and(|s| s.node_name.is_some()));
        mark(&mut self.sandbox, condition("PodReadyToStartContainers"));
        mark(&mut self.agent_running, running(AGENT));
        mark(&mut self.agent_ready, container(AGENT).is_some_and(|c| c.ready));
        mark(&mut self.app_running, running(APP));
        mark(&mut self.ready, condition("Ready"));
    }
}

/// Creates `pod` in `pods`, waits for it to be Ready, deletes it and waits until it is gone.
async fn one(pods: &Api<Pod>, name: &str) -> Marks {
    let fields = format!("metadata.name={name}");
    let version = pods.list_metadata(&ListParams::default().fields(&fields)).await.unwrap().metadata.resource_version;
    let mut events = pods
        .watch(&WatchParams::default().fields(&fields).timeout(120), &version.unwrap_or_default())
        .await
        .unwrap()
        .boxed();
    let start = Instant::now();
    pods.create(&PostParams::default(), &pod(name)).await.unwrap();
    let mut marks = Marks { created: Some(start.elapsed().as_secs_f64()), ..Default::default() };
    let mut last = None;
    let mut deleted = false;
    let deadline = start + Duration::from_secs(90);
    while !deleted {
        let event = tokio::time::timeout_at(deadline.into(), events.try_next())
            .await
            .unwrap_or_else(|_| panic!("pod {name}: no Ready and gone within 90 s; last seen: {last:#?}"))
            .unwrap()
            .unwrap_or_else(|| panic!("pod {name}: the watch ended"));
        let at = start.elapsed().as_secs_f64();
        match event {
            WatchEvent::Added(p) | WatchEvent::Modified(p) => {
                let was_ready = marks.ready.is_some();
                marks.see(&p, at);
                if !was_ready && marks.ready.is_some() {
                    pods.delete(name, &DeleteParams::default()).await.unwrap();
                }
                last = p.status;
            }
            WatchEvent::Deleted(_) => deleted = true,
            WatchEvent::Bookmark(_) => {}
            WatchEvent::Error(e) => panic!("pod {name}: watch error {e:?}"),
        }
    }
    marks
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

fn sorted(values: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    v
}

fn emit(metric: &str, ours: f64, baseline: f64) {
    println!("bench: {metric} ours={ours:.3} baseline={baseline:.3} ratio={:.2}", ours / baseline);
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The p50 of each step of `marks`, for the breakdown on stderr.
fn breakdown(kind: &str, marks: &[Marks]) {
    let Some(first) = marks.first() else { return };
    let parts: Vec<String> = (0..first.steps().len())
        .filter_map(|i| {
            let v = sorted(marks.iter().filter_map(|m| m.steps()[i].1));
            (v.len() == marks.len()).then(|| format!("{} {:.3}", first.steps()[i].0, percentile(&v, 0.5)))
        })
        .collect();
    eprintln!("[bench] {kind}: p50 seconds after the create request: {}", parts.join(", "));
    // What readiness adds once every container runs: the sidecar's probe (none for the app).
    let lag = sorted(marks.iter().filter_map(|m| Some(m.ready? - m.app_running?.max(m.agent_running.unwrap_or(0.0)))));
    eprintln!(
        "[bench] {kind}: Ready after every container runs: p50 {:.3} s, p99 {:.3} s",
        percentile(&lag, 0.5),
        percentile(&lag, 0.99)
    );
}

/// One kind of pod: where it is created, and what was measured.
struct Kind {
    name: &'static str,
    namespace: String,
    pods: Api<Pod>,
    marks: Vec<Marks>,
}

#[tokio::main]
async fn main() {
    let runs = env_usize("BENCH_RUNS", 30).max(1);
    let warmup = env_usize("BENCH_WARMUP", 1);
    let ground = support::ground().await;
    let client = ground.client().await.unwrap();
    // The sidecar as the webhook injects it on this kubelet (a native sidecar), and as a
    // regular container (`--native-sidecar=false`: kubelets before 1.29), each its own stack.
    let (native, native_ns) = support::stack_and_namespace(ground, "bench-native").await;
    let (mut regular, regular_ns) = support::stack_and_namespace(ground, "bench-regular").await;
    regular.restart_webhook_with(ground, &["--native-sidecar=false"]).await;
    let plain_ns = ground.namespace("bench-plain").await.unwrap().name().to_string();
    let kind = |name, namespace: &str| Kind {
        name,
        namespace: namespace.to_string(),
        pods: Api::namespaced(client.clone(), namespace),
        marks: Vec::new(),
    };
    let mut kinds = [kind("native", &native_ns), kind("regular", &regular_ns), kind("plain", &plain_ns)];

    for i in 0..warmup + runs {
        // Interleaved, one pod at a time; which kind goes first rotates.
        for k in 0..kinds.len() {
            let kind = &mut kinds[(i + k) % 3];
            let marks = one(&kind.pods, &format!("{}-{i}", kind.name)).await;
            eprintln!("[bench] {}{}-{i}: {marks:?}", if i < warmup { "warm-up " } else { "" }, kind.name);
            if i >= warmup {
                kind.marks.push(marks);
            }
        }
    }

    let kubelet_log = support::node(ground).dir().join("kubelet.log");
    let log = std::fs::read_to_string(&kubelet_log).unwrap_or_default();
    for kind in &kinds[..2] {
        let failed = |probe: &str| {
            log.lines()
                .filter(|l| l.contains("\"Probe failed\"") && l.contains(probe) && l.contains(&format!("\"{AGENT}\"")))
                .filter(|l| l.contains(&format!("pod=\"{}/", kind.namespace)))
                .count()
        };
        eprintln!(
            "[bench] the sidecar's failed probes in {} {} pods (kubelet log): readiness {}, startup {}, liveness {}",
            warmup + runs,
            kind.name,
            failed("probeType=\"Readiness\""),
            failed("probeType=\"Startup\""),
            failed("probeType=\"Liveness\"")
        );
    }
    if let Some(to) = std::env::var_os("BENCH_KUBELET_LOG") {
        std::fs::copy(&kubelet_log, &to).unwrap();
    }
    for kind in &kinds {
        breakdown(kind.name, &kind.marks);
    }

    let ready = |k: &Kind| sorted(k.marks.iter().map(|m| m.ready.unwrap()));
    let base = ready(&kinds[2]);
    for (kind, metric) in [(&kinds[0], "node_pod_ready"), (&kinds[1], "node_pod_ready_regular_sidecar")] {
        let ours = ready(kind);
        for (q, label) in [(0.5, "p50"), (0.99, "p99")] {
            emit(&format!("{metric}_{label}_s"), percentile(&ours, q), percentile(&base, q));
        }
        for (q, label) in [(0.5, "p50"), (0.99, "p99")] {
            let extra = percentile(&ours, q) - percentile(&base, q);
            println!("bench: {metric}_extra_{label}_s ours={extra:.3} goal=0.5");
        }
    }

    for ns in [&native_ns, &regular_ns, &plain_ns] {
        support::delete_namespace(ground, ns).await;
    }
    native.remove(ground).await;
    regular.remove(ground).await;
    ground.stop();
}
