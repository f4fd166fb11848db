#!/usr/bin/env bash
# bench/agent.sh -- the picotun agent against `ssh -N -R` (the prototype's data path), side by
# side in one run, through one local OpenSSH sshd restricted to one cipher so both use the same.
#
# Prints `bench: <metric> ours=<x> baseline=<y> ratio=<ours/baseline>` lines:
#   throughput (MB/s, higher is better) into and out of the "pod", 1 stream and 8 in parallel,
#   and what each costs the client per GiB moved: CPU milliseconds and page faults (lower is
#   better; unlike MB/s, these hardly depend on what else the two cores are running), and the
#   CPU milliseconds of the sshd process serving it; into the pod also the TCP ACKs the
#   client's SSH connection sends per MiB (on one machine the server's CPU processes them);
#   64-byte round trip p50/p99 and new-connection setup p50/p99 (microseconds, lower is better);
#   client RSS idle and peak under load (MB, lower is better), the peak also per throughput
#   figure;
#   throughput with 100 ms of added round-trip time on the SSH hop (a userspace delay relay);
#   seconds until a server gone silent is noticed (keepalive), the agent vs ssh with the same
#   probe interval and count.
# Everything runs on 127.0.0.1 and is stopped by PID when the script exits, however it exits.
#
#   bench/agent.sh            full run (about 2 minutes)
#   BENCH_MIB=64 bench/agent.sh   smaller transfers
#   BENCH_AGENT_ARGS="--ssh-window-bytes 2097152" bench/agent.sh   try agent settings
#   BENCH_AGENT_BIN=target/release/picotun bench/agent.sh   another build as ours
#   BENCH_ONLY=idle bench/agent.sh   only the idle RSS (bench/image-variants.sh uses it)
#   BENCH_ONLY=throughput bench/agent.sh   stop after the throughput figures (and their CPU cost)
#   BENCH_PERF=FILE bench/agent.sh   perf profiles of the agent and ssh, each with its sshd
#   BENCH_PERF_STAT=FILE bench/agent.sh   their syscall and context-switch counts (see below)
#   BENCH_PIN=shared|apart bench/agent.sh   each client on its sshd's CPU, or on the other (below)
#   BENCH_RFS=1 bench/agent.sh   receive work on the receiver's CPU, as a real NIC does (below)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

# BENCH_RFS=1: the whole run inside a network namespace of its own whose loopback steers each
# segment's receive processing to the CPU the receiving process last ran on (RPS with receive
# flow steering). Plain loopback does that work inside the sender's sendmsg, so the server pays
# for waking and acknowledging its client; a real NIC with RSS/RFS does it on the receiver's
# side. Needs root. rps_sock_flow_entries is machine-wide: its old value is put back on exit,
# and the namespace is removed.
if [[ ${BENCH_RFS:-} == 1 ]]; then
  [[ $(id -u) -eq 0 ]] || { echo "[bench] BENCH_RFS needs root (a network namespace, sysctl)" >&2; exit 1; }
  netns=picotun-bench-$$
  flow_entries=$(sysctl -n net.core.rps_sock_flow_entries)
  # shellcheck disable=SC2064 # the values are fixed now
  trap "ip netns del $netns 2>/dev/null; sysctl -q net.core.rps_sock_flow_entries=$flow_entries" EXIT
  trap 'exit 130' INT TERM
  ip netns add "$netns"
  ip -n "$netns" link set lo up
  sysctl -q net.core.rps_sock_flow_entries=32768
  cpus=$(printf '%x' $(((1 << $(nproc)) - 1)))
  ip netns exec "$netns" sh -c "echo $cpus >/sys/class/net/lo/queues/rx-0/rps_cpus &&
    echo 32768 >/sys/class/net/lo/queues/rx-0/rps_flow_cnt"
  echo "[bench] BENCH_RFS: in network namespace $netns, loopback receive steered to the reader's CPU" >&2
  status=0
  ip netns exec "$netns" env BENCH_RFS=inside "$0" "$@" || status=$?
  exit "$status"
fi
mib=${BENCH_MIB:-256}
delay_mib=${BENCH_DELAY_MIB:-64}
cipher=aes256-gcm@openssh.com

"$repo/scripts/install-deps"
# Ours is the binary the sidecar runs: the image's (scripts/build-image: static musl, the release
# profile), or BENCH_AGENT_BIN.
agent_bin=${BENCH_AGENT_BIN:-}
if [[ -z $agent_bin ]]; then
  echo "[bench] building the image's binary (scripts/build-image)" >&2
  agent_bin=$("$repo/scripts/build-image" 2>/dev/null | tail -n1)
fi
echo "[bench] building the load generator" >&2
cargo build --release --locked --quiet -p picotun-bench --bin loadgen
loadgen=$repo/target/release/loadgen

source "$repo/bench/lib.sh"
rss_mb() { awk -v f="$2" '$1 == f":" { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }

# --- sshd, restricted to one cipher ---
ssh-keygen -q -t ed25519 -N "" -f "$work/host" -C bench-host
ssh-keygen -q -t ed25519 -N "" -f "$work/client" -C bench-client
cp "$work/client.pub" "$work/authorized_keys"
sshd_port=$(free_port)
cat >"$work/sshd_config" <<EOF
Port $sshd_port
ListenAddress 127.0.0.1
HostKey $work/host
PidFile none
AuthorizedKeysFile $work/authorized_keys
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowTcpForwarding remote
GatewayPorts clientspecified
PermitListen any
PermitOpen none
PermitTTY no
Ciphers $cipher
ClientAliveInterval 5
EOF
[[ $(id -u) -ne 0 ]] || mkdir -p /run/sshd
start sshd /usr/sbin/sshd -D -e -f "$work/sshd_config"
wait_port "$sshd_port"
user=$(id -un)

# --- the app: sink, source, echo ---
sink=$(free_port); source=$(free_port); echo_port=$(free_port)
start apps "$loadgen" apps "127.0.0.1:$sink" "127.0.0.1:$source" "127.0.0.1:$echo_port"
wait_port "$echo_port"

# --- ours and the baseline, each holding three public ports on sshd ---
# start_pair <label> <ssh port>: sets O_SINK O_SOURCE O_ECHO B_SINK B_SOURCE B_ECHO AGENT_PID SSH_PID
# AGENT_ADMIN
start_pair() {
  local label=$1 port=$2
  echo "[$label-known_hosts]" >/dev/null
  printf '[127.0.0.1]:%s %s\n' "$port" "$(cut -d' ' -f1,2 "$work/host.pub")" >"$work/known_hosts_$label"
  O_SINK=$(free_port); O_SOURCE=$(free_port); O_ECHO=$(free_port)
  B_SINK=$(free_port); B_SOURCE=$(free_port); B_ECHO=$(free_port)
  cat >"$work/tunnels_$label.json" <<EOF
{"tunnels":[
 {"name":"sink","kind":"tcp","remotePort":$O_SINK,"targetPort":$sink},
 {"name":"source","kind":"tcp","remotePort":$O_SOURCE,"targetPort":$source},
 {"name":"echo","kind":"tcp","remotePort":$O_ECHO,"targetPort":$echo_port}]}
EOF
  local admin; admin=$(free_port)
  AGENT_ADMIN=127.0.0.1:$admin
  start "agent-$label" "$agent_bin" --log-filter warn agent --tunnels-file "$work/tunnels_$label.json" \
    --server 127.0.0.1 --server-port "$port" --user "$user" --key-file "$work/client" \
    --known-hosts "$work/known_hosts_$label" --dialect openssh --openssh-bind-address 127.0.0.1 \
    --admin-addr "127.0.0.1:$admin" ${BENCH_AGENT_ARGS:-}
  AGENT_PID=${pids[-1]}
  start "ssh-$label" ssh -N -T -F /dev/null -p "$port" -i "$work/client" -o IdentitiesOnly=yes -o BatchMode=yes \
    -o StrictHostKeyChecking=yes -o "UserKnownHostsFile=$work/known_hosts_$label" -o Ciphers=$cipher \
    -o ServerAliveInterval=5 -o ExitOnForwardFailure=yes \
    -R "127.0.0.1:$B_SINK:127.0.0.1:$sink" -R "127.0.0.1:$B_SOURCE:127.0.0.1:$source" \
    -R "127.0.0.1:$B_ECHO:127.0.0.1:$echo_port" "$user@127.0.0.1"
  SSH_PID=${pids[-1]}
  for _ in $(seq 1 200); do
    curl -fs "127.0.0.1:$admin/ready" >/dev/null 2>&1 && break
    sleep 0.1
  done
  curl -fs "127.0.0.1:$admin/ready" >/dev/null || { cat "$work/agent-$label.log" >&2; exit 1; }
  wait_port "$B_ECHO"
}

start_pair direct "$sshd_port"
# Idle: 5 s after both are up (the agent hands back its start-up pages once its tunnels are up;
# what it touches again while idle comes back within a few seconds).
sleep 5
agent_idle=$(rss_mb "$AGENT_PID" VmRSS); ssh_idle=$(rss_mb "$SSH_PID" VmRSS)
# Where the idle RSS is: anonymous (heap, stacks, pages written at start -- relocations) vs
# file-backed (the binary's and libraries' pages read, shared with every process mapping them).
rss_split() { awk '/^Rss:/ {r = $2} /^Anonymous:/ {a = $2} END { printf "anonymous %.1f MB, file-backed %.1f MB", a / 1024, (r - a) / 1024 }' "/proc/$1/smaps_rollup"; }
echo "[bench] idle RSS: agent $agent_idle MB ($(rss_split "$AGENT_PID")), ssh $ssh_idle MB ($(rss_split "$SSH_PID"))" >&2
# BENCH_SMAPS=FILE: the idle agent's /proc/PID/smaps, mapping by mapping.
[[ -z ${BENCH_SMAPS:-} ]] || cp "/proc/$AGENT_PID/smaps" "$BENCH_SMAPS"
[[ -z ${BENCH_HOOK:-} ]] || $BENCH_HOOK "$AGENT_PID"
if [[ ${BENCH_ONLY:-} == idle ]]; then
  emit rss_idle_MB "$agent_idle" "$ssh_idle"
  exit 0
fi
echo "[bench] agent $(${agent_bin} --version), OpenSSH $(ssh -V 2>&1 | cut -d, -f1), cipher $cipher, ${mib} MiB transfers" >&2

measure() { "$loadgen" measure "$@"; }
# A transfer takes well under a second, so one is at the mercy of whatever else the two cores
# run: each figure is the median of BENCH_REPEAT transfers (default 5), ours and the baseline
# taking turns.
repeat=${BENCH_REPEAT:-5}
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
# throughput_pair METRIC DIR OURS_PORT BASELINE_PORT MIB [STREAMS]
# CPU time (user + system, clock ticks) and minor page faults a process has used so far: what a
# transfer costs, whatever else the cores ran meanwhile (throughput alone is at its mercy).
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
minor_faults() { awk '{ print $10 }' "/proc/$1/stat"; }
tick_hz=$(getconf CLK_TCK)
# sshd_session_of CLIENT_PID: the sshd process serving that client's connection (found by the
# client's local port), so the server's share of a transfer's cost is counted too.
sshd_session_of() {
  local port
  port=$(ss -tnpH "dport = :$sshd_port" | grep "pid=$1," | awk '{ sub(/.*:/, "", $4); print $4; exit }')
  ss -tnpH "sport = :$sshd_port" | awk -v peer="127.0.0.1:$port" '$5 == peer' | grep -o 'pid=[0-9]*' | head -n1 | cut -d= -f2
}
srv_ticks() { if [[ -n $1 ]]; then cpu_ticks "$1"; else echo 0; fi; }
# pure_acks <client pid>: the segments without data the client's SSH connection has sent so far,
# its TCP ACKs (and window updates). A receiver that reads each segment as it lands keeps its
# window open and acknowledges every second segment; one that lets segments queue sends fewer.
pure_acks() {
  ss -tinpH "dport = :$sshd_port" | awk -v pid="pid=$1," -v client="$1" '
    index($0, pid) { mine = 1; next }
    mine { for (i = 1; i <= NF; i++) { split($i, kv, ":"); v[kv[1]] = kv[2] }
           print v["segs_out"] - v["data_segs_out"]; found = 1; exit }
    END { if (!found) { print "[bench] ss shows no SSH connection of process " client > "/dev/stderr"; exit 1 } }'
}
AGENT_SSHD=$(sshd_session_of "$AGENT_PID"); SSH_SSHD=$(sshd_session_of "$SSH_PID")
[[ -n $AGENT_SSHD && -n $SSH_SSHD && $AGENT_SSHD != "$SSH_SSHD" ]] || { echo "[bench] cannot tell the sshd sessions apart" >&2; exit 1; }
# BENCH_PIN: where each client runs beside the sshd process serving it, to tell the client's own
# cost from the scheduler's. "shared": the client and its sshd on CPU 0, taking turns, so a
# transfer's speed is set by the two processes' CPU per byte alone and no wakeup crosses CPUs.
# "apart": the sshd on CPU 0 and the client on CPU 1, so every wakeup of a sleeping client is an
# interrupt to the other CPU (the unpinned runs mostly end up like this). Unset: no pinning.
case ${BENCH_PIN:-} in
  "") ;;
  shared | apart)
    [[ $(nproc) -ge 2 ]] || { echo "[bench] BENCH_PIN needs 2 CPUs" >&2; exit 1; }
    client_cpu=0; [[ $BENCH_PIN == apart ]] && client_cpu=1
    for pid in "$AGENT_PID" "$SSH_PID"; do taskset -a -p -c "$client_cpu" "$pid" >/dev/null; done
    for pid in "$AGENT_SSHD" "$SSH_SSHD"; do taskset -a -p -c 0 "$pid" >/dev/null; done
    echo "[bench] pinned ($BENCH_PIN): the sshd sessions on CPU 0, the clients on CPU $client_cpu" >&2
    ;;
  *) echo "[bench] BENCH_PIN is shared, apart or unset, not '$BENCH_PIN'" >&2; exit 1 ;;
esac
# perf_during_transfer OUT PERF_ARGS...: runs `perf PERF_ARGS` on the agent and the sshd process
# serving it during one transfer into the pod (written to OUT), then on ssh and its sshd (OUT.ssh).
perf_during_transfer() {
  local out=$1 side watched port file perf_pid
  shift
  for side in "$AGENT_PID,$AGENT_SSHD $O_SINK $out" "$SSH_PID,$SSH_SSHD $B_SINK $out.ssh"; do
    read -r watched port file <<<"$side"
    perf "$@" -p "$watched" -o "$file" -- sleep 2 >/dev/null 2>&1 &
    perf_pid=$!
    pids+=("$perf_pid")
    measure in "127.0.0.1:$port" "$mib" >/dev/null
    wait "$perf_pid" || true
  done
}
# BENCH_PERF=FILE: CPU profiles (`perf report -i FILE --sort comm,dso,sym` tells the client and
# its sshd apart).
if [[ -n ${BENCH_PERF:-} ]]; then
  perf_during_transfer "$BENCH_PERF" record -q -g
fi
# BENCH_PERF_STAT=FILE: per process, the syscalls, context switches and CPU time: how often each
# client sleeps and is woken, and what its server pays for that.
if [[ -n ${BENCH_PERF_STAT:-} ]]; then
  events=context-switches,cpu-clock
  for call in read write writev recvfrom sendto poll ppoll epoll_wait epoll_pwait; do events+=",syscalls:sys_enter_$call"; done
  perf_during_transfer "$BENCH_PERF_STAT" stat --per-thread -e "$events"
fi
# The peak RSS of each throughput figure on its own: writing 5 to clear_refs resets a process's
# VmHWM, so each figure's peak is read after its turns (and the overall peak kept as the largest).
reset_peak() { echo 5 >"/proc/$1/clear_refs"; }
peak_o=0; peak_b=0
larger() { awk -v a="$1" -v b="$2" 'BEGIN { print (a > b) ? a : b }'; }
throughput_pair() {
  local metric=$1 dir=$2 port_o=$3 port_b=$4 n=$5 streams=${6:-1} ours=() base=() i
  local cpu_o=0 cpu_b=0 flt_o=0 flt_b=0 srv_o=0 srv_b=0 ack_o=0 ack_b=0 t0 f0 s0 a0 p_o p_b
  # ACKs are counted into the pod only, where the client receives, and only on the direct pair.
  local acks=; [[ $dir == in && -n $AGENT_SSHD ]] && acks=1
  reset_peak "$AGENT_PID"; reset_peak "$SSH_PID"
  for ((i = 0; i < repeat; i++)); do
    t0=$(cpu_ticks "$AGENT_PID"); f0=$(minor_faults "$AGENT_PID"); s0=$(srv_ticks "$AGENT_SSHD")
    [[ -z $acks ]] || a0=$(pure_acks "$AGENT_PID")
    ours+=("$(measure "$dir" "127.0.0.1:$port_o" "$n" "$streams")")
    cpu_o=$((cpu_o + $(cpu_ticks "$AGENT_PID") - t0)); flt_o=$((flt_o + $(minor_faults "$AGENT_PID") - f0))
    srv_o=$((srv_o + $(srv_ticks "$AGENT_SSHD") - s0))
    [[ -z $acks ]] || ack_o=$((ack_o + $(pure_acks "$AGENT_PID") - a0))
    t0=$(cpu_ticks "$SSH_PID"); f0=$(minor_faults "$SSH_PID"); s0=$(srv_ticks "$SSH_SSHD")
    [[ -z $acks ]] || a0=$(pure_acks "$SSH_PID")
    base+=("$(measure "$dir" "127.0.0.1:$port_b" "$n" "$streams")")
    cpu_b=$((cpu_b + $(cpu_ticks "$SSH_PID") - t0)); flt_b=$((flt_b + $(minor_faults "$SSH_PID") - f0))
    srv_b=$((srv_b + $(srv_ticks "$SSH_SSHD") - s0))
    [[ -z $acks ]] || ack_b=$((ack_b + $(pure_acks "$SSH_PID") - a0))
  done
  echo "[bench] $metric: ours ${ours[*]}, baseline ${base[*]}" >&2
  p_o=$(rss_mb "$AGENT_PID" VmHWM); p_b=$(rss_mb "$SSH_PID" VmHWM)
  peak_o=$(larger "$peak_o" "$p_o"); peak_b=$(larger "$peak_b" "$p_b")
  emit "${metric%_MBps}_rss_peak_MB" "$p_o" "$p_b"
  emit "$metric" "$(printf '%s\n' "${ours[@]}" | median)" "$(printf '%s\n' "${base[@]}" | median)"
  # Per GiB moved, summed over the turns: CPU milliseconds and page faults of the client alone.
  local gib; gib=$(awk -v n="$n" -v r="$repeat" 'BEGIN { print n * r / 1024 }')
  emit "${metric%_MBps}_cpu_ms_per_GiB" "$(awk -v t="$cpu_o" -v h="$tick_hz" -v g="$gib" 'BEGIN { printf "%.0f", t * 1000 / h / g }')" \
    "$(awk -v t="$cpu_b" -v h="$tick_hz" -v g="$gib" 'BEGIN { printf "%.0f", t * 1000 / h / g }')"
  [[ -z $AGENT_SSHD ]] || emit "${metric%_MBps}_sshd_cpu_ms_per_GiB" "$(awk -v t="$srv_o" -v h="$tick_hz" -v g="$gib" 'BEGIN { printf "%.0f", t * 1000 / h / g }')" \
    "$(awk -v t="$srv_b" -v h="$tick_hz" -v g="$gib" 'BEGIN { printf "%.0f", t * 1000 / h / g }')"
  [[ -z $acks ]] || emit "${metric%_MBps}_tcp_acks_per_MiB" "$(awk -v a="$ack_o" -v m="$n" -v r="$repeat" 'BEGIN { printf "%.2f", a / m / r }')" \
    "$(awk -v a="$ack_b" -v m="$n" -v r="$repeat" 'BEGIN { printf "%.2f", a / m / r }')"
  emit "${metric%_MBps}_page_faults_per_GiB" "$(awk -v f="$flt_o" -v g="$gib" 'BEGIN { printf "%.0f", f / g }')" \
    "$(awk -v f="$flt_b" -v g="$gib" 'BEGIN { printf "%.0f", f / g }')"
}
for dir in in out; do
  port_o=$O_SINK; port_b=$B_SINK
  [[ $dir == out ]] && { port_o=$O_SOURCE; port_b=$B_SOURCE; }
  throughput_pair "throughput_${dir}_1stream_MBps" "$dir" "$port_o" "$port_b" "$mib"
  throughput_pair "throughput_${dir}_8streams_MBps" "$dir" "$port_o" "$port_b" "$mib" 8
done
[[ ${BENCH_ONLY:-} != throughput ]] || exit 0
read -r o50 o99 < <(measure rtt "127.0.0.1:$O_ECHO" 2000)
read -r b50 b99 < <(measure rtt "127.0.0.1:$B_ECHO" 2000)
emit rtt_p50_us "$o50" "$b50"
emit rtt_p99_us "$o99" "$b99"
read -r o50 o99 < <(measure setup "127.0.0.1:$O_ECHO" 200)
read -r b50 b99 < <(measure setup "127.0.0.1:$B_ECHO" 200)
emit conn_setup_p50_us "$o50" "$b50"
emit conn_setup_p99_us "$o99" "$b99"
emit rss_idle_MB "$agent_idle" "$ssh_idle"
# The largest of the throughput figures' peaks, and of what the small-message runs since reached.
emit rss_loaded_peak_MB "$(larger "$peak_o" "$(rss_mb "$AGENT_PID" VmHWM)")" "$(larger "$peak_b" "$(rss_mb "$SSH_PID" VmHWM)")"

# --- 100 ms round trip on the SSH hop ---
delay_port=$(free_port)
start delay "$loadgen" delay "127.0.0.1:$delay_port" "127.0.0.1:$sshd_port" 50
wait_port "$delay_port"
start_pair delayed "$delay_port"
AGENT_SSHD="" SSH_SSHD="" # behind the relay: the sessions are not told apart; not counted
repeat=1 # seconds per transfer already: the delay, not the cores, decides
throughput_pair throughput_in_100ms_rtt_MBps in "$O_SINK" "$B_SINK" "$delay_mib"
throughput_pair throughput_out_100ms_rtt_MBps out "$O_SOURCE" "$B_SOURCE" "$delay_mib"

# --- keepalive: a server that goes silent ---
# Both clients probe every 5 s and give up after 3 probes' worth of silence (the agent's
# defaults; ServerAliveInterval=5 ServerAliveCountMax=3 for ssh). They reach sshd through a relay
# that is then stopped (SIGSTOP): the TCP connection stays up, the kernel still takes the bytes,
# and not one SSH message comes back -- a silent server, as a frozen VM or a dropped route shows
# it. Measured: stop -> the agent's tunnel leaves `established` / ssh exits. The goal is
# interval x max + 1 s (16 s); the relay starts again before the next run.
freeze_port=$(free_port)
start freeze "$loadgen" delay "127.0.0.1:$freeze_port" "127.0.0.1:$sshd_port" 0
freeze_pid=${pids[-1]}
wait_port "$freeze_port"
BENCH_AGENT_ARGS="${BENCH_AGENT_ARGS:-} --keepalive-interval 5s --keepalive-max 3" start_pair frozen "$freeze_port"
sleep 1
kill -STOP "$freeze_pid"
froze=$(date +%s.%N)
agent_seen="" ssh_seen=""
while [[ -z $agent_seen || -z $ssh_seen ]]; do
  now=$(date +%s.%N)
  if [[ -z $agent_seen ]] && ! curl -fs "$AGENT_ADMIN/status" | grep -q '"state":"established"'; then
    agent_seen=$(awk -v a="$now" -v b="$froze" 'BEGIN { printf "%.1f", a - b }')
  fi
  if [[ -z $ssh_seen ]] && ! kill -0 "$SSH_PID" 2>/dev/null; then
    ssh_seen=$(awk -v a="$now" -v b="$froze" 'BEGIN { printf "%.1f", a - b }')
  fi
  if awk -v a="$now" -v b="$froze" 'BEGIN { exit !(a - b > 60) }'; then
    echo "[bench] keepalive: after 60 s of silence agent=${agent_seen:-not yet} ssh=${ssh_seen:-not yet}" >&2
    break
  fi
  sleep 0.1
done
kill -CONT "$freeze_pid"
emit keepalive_silent_server_detected_s "${agent_seen:-60}" "${ssh_seen:-60}"
echo "[bench] keepalive: goal interval x max + 1 s = 16 s (5 s x 3)" >&2
