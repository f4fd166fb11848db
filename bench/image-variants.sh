#!/usr/bin/env bash
# bench/image-variants.sh -- what the release profile buys: the image's binary built several ways
# (scripts/build-image's target, each variant in its own target directory), then its size and
# the agent's idle RSS (bench/agent.sh BENCH_ONLY=idle, beside ssh) for each, in one run. The
# baseline is the variant named first.
#
#   bench/image-variants.sh                    every variant below (a fat-LTO build each: 5-10
#                                              minutes apiece on 2 cores, cached after)
#   bench/image-variants.sh pie-o3 current     the named ones
#
# Variants (cargo profile settings and rustflags by environment; Cargo.toml stays as it is):
#   current     what Cargo.toml and scripts/build-image say (opt-level "s", static non-PIE)
#   pie-o3      opt-level 3, static-pie: the image before issue 13
#   pie-s       opt-level "s", static-pie
#   nonpie-o3   opt-level 3, static non-PIE
#   z           opt-level "z", static non-PIE
#   abort       opt-level "s", static non-PIE, panic = "abort"
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
cache=${PICOTUN_CACHE:-$HOME/.cache/picotun}/variants
variants=("$@")
((${#variants[@]})) || variants=(pie-o3 current pie-s nonpie-o3 z abort)
pie="-C target-feature=+crt-static"
nonpie="-C target-feature=+crt-static -C relocation-model=static"

build() { # build NAME -> prints the binary's path
  local name=$1 opt flags panic=unwind
  case $name in
    current) scripts/build-image | tail -n1; return ;; # the image's own build and cache
    pie-o3) opt=3 flags=$pie ;;
    pie-s) opt=s flags=$pie ;;
    nonpie-o3) opt=3 flags=$nonpie ;;
    z) opt=z flags=$nonpie ;;
    abort) opt=s flags=$nonpie panic=abort ;;
    *) echo "image-variants: unknown variant $name" >&2; exit 2 ;;
  esac
  CARGO_PROFILE_RELEASE_OPT_LEVEL=$opt CARGO_PROFILE_RELEASE_PANIC=$panic PICOTUN_IMAGE_RUSTFLAGS=$flags \
    CARGO_TARGET_DIR="$cache/$name/target" scripts/build-image --out "$cache/$name" | tail -n1
}

base=""
for name in "${variants[@]}"; do
  bin=$(build "$name")
  size=$(awk -v b="$(stat -c %s "$bin")" 'BEGIN { printf "%.2f", b / 1048576 }')
  rss=$(BENCH_AGENT_BIN=$bin BENCH_ONLY=idle bench/agent.sh 2>/dev/null | awk '/rss_idle_MB/ { sub("ours=", "", $3); print $3 }')
  echo "[variants] $name: $(file -b "$bin" | cut -d, -f1,4), $size MiB, agent idle RSS $rss MB" >&2
  if [[ -z $base ]]; then base=$name base_size=$size base_rss=$rss; continue; fi
  awk -v n="$name" -v s="$size" -v bs="$base_size" -v r="$rss" -v br="$base_rss" 'BEGIN {
    printf "bench: image_binary_MiB_%s ours=%s baseline=%s ratio=%.2f\n", n, s, bs, s / bs
    printf "bench: agent_rss_idle_MB_%s ours=%s baseline=%s ratio=%.2f\n", n, r, br, r / br }'
done
echo "[variants] baseline: $base" >&2
