#!/usr/bin/env bash
# bench/controller.sh -- `picotun controller` under 1000 routes over 2000 pods in 100 namespaces, on
# a fresh test ground of its own (real etcd + kube-apiserver + controller-manager + kwok), against
# the time the apiserver of a second fresh ground needs just to accept the same objects.
#
# Per namespace: 20 pods that already carry the sidecar (and its report of the public address),
# 10 Services (2 pods each), 5 Ingresses (class pico-tunnel) and 5 HTTPRoutes on the namespace's
# Gateway (class pico-tunnel). Phase 1 applies everything (32 requests in flight) to a running
# controller and waits, by watches, until every pod carries its tunnels file and every Ingress,
# HTTPRoute, Gateway and the GatewayClass shows its status; phase 2 edits 100 routes (a new host on
# 50 Ingresses and 50 HTTPRoutes, and their pods' new reports) and waits again.
#
# Prints `bench: <metric> ours=<x> baseline=<y> ratio=<ours/baseline>` lines:
#   controller_converge_seconds       phase 1 convergence vs the same creates with no controller
#   controller_edit_converge_seconds  phase 2 convergence vs the same edits with no controller
#   controller_peak_rss_mb            the controller's VmHWM, alone (no measured baseline; goal 150 MB)
#   controller_cpu_share              the controller's CPU seconds in phase 1 vs kube-apiserver +
#                                     etcd in the same window (the share of the three on stderr)
# Targets (issue 5): convergence under 60 s, under 150 MB, the apiserver -- not the controller --
# the bottleneck. Progress, per-process CPU and the controller's own metrics go to stderr.
# Everything runs on 127.0.0.1 and is stopped by PID when the script exits, however it exits
# (the test ground's reaper stops the control planes and the controller).
#
# Knobs (environment):
#   BENCH_NAMESPACES=100      namespaces
#   BENCH_PODS_PER_NS=20      pods per namespace (even, >= 4): half as many Services and routes,
#                             the first half of the routes Ingresses, the rest HTTPRoutes
#   BENCH_EDITS=100           routes edited in phase 2
#   BENCH_CONCURRENCY=32      requests in flight while applying
#   BENCH_TIMEOUT=300         seconds to wait for convergence before failing
#   BENCH_SETTLE=5            seconds to watch for writes after each convergence (should be none)
#   BENCH_CONTROLLER_LOG=info the controller's log filter (e.g. picotun=debug,info)
#   BENCH_CONTROLLER_ARGS=    extra controller flags (e.g. "--write-concurrency 64")
#   BENCH_LEADER_ELECTION=false  run the controller with a Lease (in namespace default) or not
#   BENCH_LOG_DIR=            keep the controller's log there (default: removed at exit)
#
#   bench/controller.sh                                    full run (a few minutes)
#   BENCH_NAMESPACES=5 BENCH_PODS_PER_NS=4 bench/controller.sh   quick small run
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

"$repo/scripts/install-deps"
bin_dir=$("$repo/scripts/build-testground" | tail -n1)
export PICOTUN_TESTGROUND_BIN=$bin_dir
echo "[bench] building release binaries" >&2
cargo build --release --locked --quiet -p picotun -p picotun-bench
source "$repo/bench/lib.sh"

# controllerload starts the control planes and the controller through the test ground, whose
# reaper stops each of them by process group when controllerload exits, however it exits; lib.sh
# stops controllerload itself (and its process tree) when this script exits.
"$repo/target/release/controllerload" "$repo/target/release/picotun" &
pids+=($!)
wait "${pids[-1]}"
