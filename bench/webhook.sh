#!/usr/bin/env bash
# bench/webhook.sh -- the picotun webhook under AdmissionReview load over TLS, and Pod creation
# through the test ground's real kube-apiserver with and without the webhook, in one run.
#
# Prints `bench: <metric> ours=<x> baseline=<y> ratio=<ours/baseline>` lines:
#   admission load: "ours" = pods that opt in (decision + injection + JSON patch), "baseline" =
#   the same server answering pods that do not (decision only: allowed, no patch). Closed loop at
#   8 connections (requests/s, p50/p99 in microseconds), then paced at 1000 requests/s.
#   pod creation through the apiserver (bench/src/podcreate.rs), p50/p99 in milliseconds,
#   interleaved: a pod that does not opt in, in a labeled namespace with the webhook registered as
#   deploy/ ships it (matchConditions), vs no webhook at all (goal 1.0x: it is not called); and
#   an injected pod vs the same pod pre-injected by `picotun inject` through a registered no-op
#   webhook (`loadgen noop-webhook`), the floor no webhook can beat; and that injected figure
#   split in two: the same pre-injected pod given a one-label patch by the no-op webhook (what
#   the apiserver charges any webhook that changes a pod) vs the floor, and injected vs that.
# BENCH_PODS (default 100) rounds of pod creation; BENCH_POPULATION (default 0) pods created
# first elsewhere in the cluster, which an admission should not pay for.
# Everything runs on 127.0.0.1 and is stopped by PID when the script exits.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
seconds=${BENCH_SECONDS:-10}
pods=${BENCH_PODS:-100}
population=${BENCH_POPULATION:-0}

"$repo/scripts/install-deps"
bin_dir=$("$repo/scripts/build-testground" | tail -n1)
export PICOTUN_TESTGROUND_BIN=$bin_dir
echo "[bench] building release binaries" >&2
cargo build --release --locked --quiet -p picotun -p picotun-bench
picotun=$repo/target/release/picotun
loadgen=$repo/target/release/loadgen
source "$repo/bench/lib.sh"

"$picotun" certs --out-dir "$work/certs" >/dev/null 2>&1
port=$(free_port); admin=$(free_port); agent=$(free_port)
# No cluster credentials: the pure admission path (no owner lookups) is what is measured here --
# key mode (certificate mode needs a report URL) and the ticket key from a file (no Secret).
head -c 32 /dev/urandom >"$work/ticket-key"
start webhook env -u KUBECONFIG HOME="$work" "$picotun" --log-filter warn webhook --listen "127.0.0.1:$port" \
  --agent-listen "127.0.0.1:$agent" --admin-addr "127.0.0.1:$admin" \
  --cert-file "$work/certs/tls.crt" --key-file "$work/certs/tls.key" --native-sidecar true \
  --sidecar-auth key --ticket-key-file "$work/ticket-key"
for _ in $(seq 1 100); do curl -fs "127.0.0.1:$admin/ready" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fs "127.0.0.1:$admin/ready" >/dev/null || { echo "[bench] the webhook did not become ready" >&2; exit 1; }
webhook_pid=${pids[-1]}

review() { # review FILE LABELS_JSON
  cat >"$1" <<JSON
{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"bench",
 "kind":{"group":"","version":"v1","kind":"Pod"},"resource":{"group":"","version":"v1","resource":"pods"},
 "namespace":"apps","operation":"CREATE","userInfo":{"username":"bench"},
 "object":{"apiVersion":"v1","kind":"Pod","metadata":{"generateName":"web-","labels":$2,
  "annotations":{"tunnels.pico.sh/expose":"http:demo=http"}},
  "spec":{"containers":[{"name":"web","image":"nginx:1.27","ports":[{"name":"http","containerPort":8080}],
   "resources":{"requests":{"cpu":"100m","memory":"64Mi"}}}]}}}}
JSON
}
review "$work/ours.json" '{"app":"web","tunnels.pico.sh/inject":"true"}'
review "$work/base.json" '{"app":"web","tunnels.pico.sh/inject":"false"}'

load() { "$loadgen" admission "127.0.0.1:$port" "$work/certs/ca.crt" "$@"; }
read -r o_rps o50 o99 o_err < <(load "$work/ours.json" 8 "$seconds")
read -r b_rps b50 b99 b_err < <(load "$work/base.json" 8 "$seconds")
emit admission_closed_loop_rps "$o_rps" "$b_rps"
emit admission_closed_loop_p50_us "$o50" "$b50"
emit admission_closed_loop_p99_us "$o99" "$b99"
read -r _ o50 o99 o_err2 < <(load "$work/ours.json" 16 "$seconds" 1000)
read -r _ b50 b99 b_err2 < <(load "$work/base.json" 16 "$seconds" 1000)
emit admission_1000rps_p50_us "$o50" "$b50"
emit admission_1000rps_p99_us "$o99" "$b99"
echo "[bench] injection adds $((o99 - b99)) us at p99 at 1000 requests/s; errors: ${o_err}/${b_err}/${o_err2}/${b_err2}; webhook RSS $(awk '/VmHWM/ {print $2}' "/proc/$webhook_pid/status") kB peak" >&2

"$repo/target/release/podcreate" "$picotun" "$loadgen" "$pods" "$population"
