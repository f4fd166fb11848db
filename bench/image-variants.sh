#!/usr/bin/env bash
# bench/image-variants.sh -- what the release profile buys: the image's binary built several ways
# (scripts/build-image's target and flags, each variant in its own target directory), then its
# size and the agent's idle RSS (bench/agent.sh BENCH_ONLY=idle, against ssh) for each, in one
# run. The baseline is the variant named first.
#
#   bench/image-variants.sh                      every variant below (a fat-LTO build each:
#                                                5-10 minutes apiece on 2 cores, cached after)
#   bench/image-variants.sh current s-nonpie     the named ones
#
# Variants (cargo profile settings by environment, so Cargo.toml stays as it is):
#   current     what Cargo.toml says
#   pie-o3      opt-level 3, static-pie (the profile before issue 13)
#   nonpie-o3   opt-level 3, static non-PIE (-C relocation-model=static)
#   s-nonpie    opt-level "s", static non-PIE
#   z-nonpie    opt-level "z", static non-PIE
#   s-abort     opt-level "s", non-PIE, panic = "abort"
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
cache=${PICOTUN_CACHE:-$HOME/.cache/picotun}/variants
variants=("$@")
((${#variants[@]})) || variants=(current pie-o3 nonpie-o3 s-nonpie z-nonpie s-abort)

build() { # build NAME -> prints the binary's path
  local name=$1 opt=3 reloc=static panic=unwind
  case $name in
    current) ;;
    pie-o3) reloc=pie ;;
    nonpie-o3) ;;
    s-nonpie) opt='"s"' ;;
    z-nonpie) opt='"z"' ;;
    s-abort) opt='"s"'; panic=abort ;;
    *) echo "image-variants: unknown variant $name" >&2; exit 2 ;;
  esac
  local env=()
  if [[ $name != current ]]; then
    env=(CARGO_PROFILE_RELEASE_OPT_LEVEL="${opt//\"/}" CARGO_PROFILE_RELEASE_PANIC="$panic"
      CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=$reloc")
  fi
  if [[ $name == current ]]; then
    scripts/build-image | tail -n1 # the image's own build and cache
  else
    env "${env[@]}" CARGO_TARGET_DIR="$cache/$name/target" scripts/build-image --out "$cache/$name" | tail -n1
  fi
}

base_size="" base_rss=""
for name in "${variants[@]}"; do
  bin=$(build "$name")
  size=$(awk -v b="$(stat -c %s "$bin")" 'BEGIN { printf "%.1f", b / 1048576 }')
  rss=$(BENCH_AGENT_BIN=$bin BENCH_ONLY=idle bench/agent.sh 2>/dev/null | awk '/rss_idle_MB/ { sub("ours=", "", $3); print $3 }')
  kind=$(file -b "$bin" | cut -d, -f1,2)
  if [[ -z $base_size ]]; then base_size=$size base_rss=$rss base=$name; fi
  echo "[variants] $name: $kind" >&2
  awk -v n="$name" -v b="$base" -v s="$size" -v bs="$base_size" -v r="$rss" -v br="$base_rss" 'BEGIN {
    printf "bench: image_binary_MiB_%s ours=%s baseline=%s ratio=%.2f (baseline %s)\n", n, s, bs, s / bs, b
    printf "bench: agent_rss_idle_MB_%s ours=%s baseline=%s ratio=%.2f (baseline %s)\n", n, r, br, r / br, b }'
done
