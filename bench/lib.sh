# Shared by the bench/*.sh scripts (sourced): process bookkeeping and output.
# Every process started with `start` is stopped by PID -- with its whole process tree -- when the
# script exits, however it exits.

work=$(mktemp -d /tmp/picotun-bench.XXXXXX)
pids=()
tree() { local c; for c in $(cat /proc/"$1"/task/*/children 2>/dev/null); do tree "$c"; done; echo "$1"; }
cleanup() {
  local all=() p
  for p in "${pids[@]}"; do all+=($(tree "$p")); done
  for p in "${all[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 0.3
  for p in "${all[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  [[ -n ${BENCH_KEEP:-} ]] && echo "[bench] kept $work" >&2 || rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# start NAME CMD...: runs CMD in the background, output in $work/NAME.log.
start() { local name=$1; shift; "$@" >"$work/$name.log" 2>&1 & pids+=($!); }
# free_port: a port free now, below the kernel's ephemeral range (where outgoing connections and
# port-0 listeners land, so nothing else takes it before our server binds it), and not handed out
# before in this run (the kernel's own pick of port 0 repeats a just-closed port readily).
free_port() {
  python3 - "$work/ports" <<'PY'
import os, random, socket, sys
start = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
taken = set(open(sys.argv[1]).read().split()) if os.path.exists(sys.argv[1]) else set()
if start <= 20000:
    sys.exit(f"the ephemeral range starts at {start}: no room for free_port below it")
for _ in range(10000):
    port = random.randrange(20000, start)
    if str(port) in taken:
        continue
    try:
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", port)); s.close()
    except OSError:
        continue
    open(sys.argv[1], "a").write(f"{port}\n"); print(port); break
else:
    sys.exit("no free port below the ephemeral range")
PY
}
wait_port() { for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "[bench] nothing listens on $1" >&2; return 1; }
# emit METRIC OURS BASELINE: the line every benchmark prints.
emit() { awk -v m="$1" -v o="$2" -v b="$3" 'BEGIN { r = (b == 0) ? "inf" : sprintf("%.2f", o / b); printf "bench: %s ours=%s baseline=%s ratio=%s\n", m, o, b, r }'; }
