#!/usr/bin/env bash
# bench/node.sh -- pod create -> Ready on the test ground's real node (kubelet, containerd, runc):
# a pod the webhook injects the picotun-agent sidecar into ("ours") against the same pod in a
# namespace without injection ("baseline"), interleaved, one pod at a time, BENCH_RUNS of each.
# The sidecar both ways: native (the default on this kubelet) and a regular container
# (--native-sidecar=false, for kubelets before 1.29). The driver is bench/pod_ready.rs, on the
# real-node tests' ground and stack (tests/node/support.rs).
#
# Prints `bench: <metric> ours=<x> baseline=<y> ratio=<ours/baseline>` lines:
#   node_pod_ready_p50_s, _p99_s                    the native sidecar
#   node_pod_ready_regular_sidecar_p50_s, _p99_s    the regular-container sidecar
#     seconds from sending the create request to the first watch event showing the pod Ready
#     (this process's monotonic clock: the pod's own timestamps have whole seconds only)
#   ..._extra_p50_s, ..._extra_p99_s                ours - baseline, against goal=0.5
# and on stderr each pod's steps as the watch saw them (scheduled, sandbox, sidecar running and
# ready, app running, Ready) and the sidecar's failed probes in the kubelet's log.
#
#   bench/node.sh                        30 pods of each kind (about 5 minutes once built)
#   BENCH_RUNS=10 bench/node.sh          fewer
#   BENCH_KUBELET_LOG=FILE bench/node.sh keep the kubelet's log
#   PICOTUN_NODE_IMAGES=DIR bench/node.sh  images built already (scripts/build-node-images --out DIR)
#
# Needs root, as tests/node do (namespaces, cgroups, mounts). The ground stops with the driver,
# however it exits: the node's processes, namespaces, mounts and cgroups go with it.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
[[ $(id -u) -eq 0 ]] || { echo "[bench] the real node needs root, as tests/node do" >&2; exit 1; }

"$repo/scripts/install-deps"
bin_dir=$("$repo/scripts/build-testground" | tail -n1)
export PICOTUN_TESTGROUND_BIN=$bin_dir
# The sidecar runs the image's binary: built from this tree unless given.
if [[ -z ${PICOTUN_NODE_IMAGES:-} ]]; then
  PICOTUN_NODE_IMAGES=$("$repo/scripts/build-node-images" | tail -n1)
fi
export PICOTUN_NODE_IMAGES
echo "[bench] test ground binaries $PICOTUN_TESTGROUND_BIN, node images $PICOTUN_NODE_IMAGES" >&2
# The dev profile, as the tests: the driver only waits, and the webhook's few milliseconds at
# admission are bench/webhook.sh's figure.
cargo bench --locked --profile dev -p picotun --bench pod_ready
