#!/usr/bin/env bash
# OCI pull + convert: `banger image pull` of a multi-layer image from a registry on loopback,
# against the usual pipeline on the same image in the same run: `skopeo copy` (registry -> OCI
# layout) + `umoci raw unpack` + `mkfs.ext4 -d`. Wall time cold (nothing cached) and warm (blobs
# cached, the image converted again), the re-pull of an unchanged digest, and peak RSS (banger:
# the daemon plus its child processes, sampled every 50 ms; baseline: the largest step).
#
# Usage (as root, from the repository root, after `cargo build --release --workspace --bins`):
#   bench/oci.sh [ROUNDS] [RESULTS_FILE]
# The image is built once with bench/oci-image.sh into /var/tmp/banger-bench-oci (Debian
# packages, so the first run needs the Debian mirror, as does banger's generic kernel).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3} out=${2:-bench/results/oci.md}
bin=${BANGER_BIN_DIR:-target/release}
[ -x "$bin/banger" ] || { echo "build first: cargo build --release --workspace --bins" >&2; exit 1; }
for t in docker-registry skopeo umoci mkfs.ext4; do
  command -v "$t" >/dev/null || { echo "bench/oci.sh needs $t (make test-deps)" >&2; exit 1; }
done
layout=/var/tmp/banger-bench-oci/layout
[ -f "$layout/index.json" ] || bench/oci-image.sh "$layout"

work=$(mktemp -d /var/tmp/banger-bench-oci-run-XXXXXX)
reg_pid=
cleanup() {
  HOME=$work/home "$bin/banger" daemon stop >/dev/null 2>&1 || true
  [ -n "$reg_pid" ] && kill "$reg_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# A registry of its own on loopback, with its own config and storage.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/registry.yml" <<EOF
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $work/registry}}
http: {addr: 127.0.0.1:$port}
EOF
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
reg_pid=$!
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done
ref=127.0.0.1:$port/bench/debian:1
skopeo copy -q --dest-tls-verify=false "oci:$layout:bench" "docker://$ref"

export HOME=$work/home BANGER_DAEMON_BIN=$PWD/$bin/bangerd
b() { "$PWD/$bin/banger" "$@"; }
b kernel pull generic >/dev/null 2>&1
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", b-a}'; }
median() { sort -n | awk '{a[NR]=$1} END{if (NR%2) print a[(NR+1)/2]; else printf "%.2f\n", (a[NR/2]+a[NR/2+1])/2}'; }

# Peak RSS (KiB) of the daemon and its children until the file $2 appears.
sample_rss() {
  local pid=$1 stop=$2 peak=0 cur
  while [ ! -e "$stop" ]; do
    cur=$(ps -o rss= -p "$pid" --ppid "$pid" 2>/dev/null | awk '{s+=$1} END{print s+0}')
    [ "$cur" -gt "$peak" ] && peak=$cur
    sleep 0.05
  done
  echo "$peak"
}

# One banger pull with a fresh daemon (so its peak is this pull's): prints "seconds peak_kib".
banger_pull() {
  b daemon stop >/dev/null 2>&1 || true
  b image list >/dev/null 2>&1
  local pid; pid=$(b daemon status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["daemon"]["pid"])')
  rm -f "$work/stop"
  sample_rss "$pid" "$work/stop" > "$work/rss" &
  local sampler=$! t; t=$(now)
  b image pull "$ref" "$@" >/dev/null 2>"$work/pull.log" || { cat "$work/pull.log" >&2; exit 1; }
  local took; took=$(secs "$t" "$(now)")
  touch "$work/stop"; wait "$sampler"
  echo "$took $(cat "$work/rss")"
}

# The baseline pipeline into $1 (a directory that may already hold the OCI layout): prints
# "seconds peak_kib".
baseline() {
  local dir=$1 t peak=0 m
  rm -rf "$dir/rootfs" "$dir/rootfs.ext4"
  t=$(now)
  /usr/bin/time -f %M -o "$dir/m1" skopeo copy -q --src-tls-verify=false "docker://$ref" "oci:$dir/layout:1"
  /usr/bin/time -f %M -o "$dir/m2" umoci raw unpack --image "$dir/layout:1" "$dir/rootfs" >/dev/null 2>&1
  truncate -s "$size" "$dir/rootfs.ext4"
  /usr/bin/time -f %M -o "$dir/m3" mkfs.ext4 -q -F -d "$dir/rootfs" "$dir/rootfs.ext4"
  local took; took=$(secs "$t" "$(now)")
  for f in m1 m2 m3; do m=$(tail -1 "$dir/$f"); [ "$m" -gt "$peak" ] && peak=$m; done
  echo "$took $peak"
}

: > "$work/b-cold"; : > "$work/b-warm"; : > "$work/b-same"; : > "$work/s-cold"; : > "$work/s-warm"
for r in $(seq 1 "$rounds"); do
  # banger cold: empty blob cache, new image.
  rm -rf "$HOME/.cache/banger/oci"
  banger_pull --name "cold$r" >> "$work/b-cold"
  size=$(b image list --json | python3 -c "import json,sys; print([i['size_bytes'] for i in json.load(sys.stdin) if i['name']=='cold$r'][0])")
  # banger warm: blobs cached, converted again under a new name.
  banger_pull --name "warm$r" >> "$work/b-warm"
  # Re-pull of an unchanged digest: the image is current, nothing to do.
  banger_pull --name "cold$r" >> "$work/b-same"
  b image delete "warm$r" >/dev/null; b image delete "cold$r" >/dev/null
  # Baseline cold and warm (the OCI layout from the cold run is reused: skopeo skips blobs it has).
  rm -rf "$work/base"; mkdir -p "$work/base"
  baseline "$work/base" >> "$work/s-cold"
  baseline "$work/base" >> "$work/s-warm"
done
entries=$(find "$work/base/rootfs" | wc -l)
mib=$(du -sm "$work/base/rootfs" | cut -f1)
layers=$(python3 -c "import json; m=json.load(open('$layout/index.json'))['manifests'][0]['digest'].split(':')[1]; print(len(json.load(open('$layout/blobs/sha256/'+m))['layers']))")
col() { awk -v c="$2" '{print $c}' "$work/$1" | median; }

{
  echo "# OCI pull + convert benchmark"
  echo
  echo "Command: \`bench/oci.sh $rounds\` ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(uname -r), release build)."
  echo "Image: bench/oci-image.sh (Debian bookworm minbase + python, perl, gcc, icu from Debian packages,"
  echo "then a layer of deletions): $layers gzip layers, $(du -sm "$layout" | cut -f1) MiB compressed, $mib MiB and $entries entries unpacked,"
  echo "served by docker-registry on 127.0.0.1. $rounds rounds, alternating, medians."
  echo
  echo "Baseline: \`skopeo copy docker://REF oci:DIR:1\` + \`umoci raw unpack --image DIR:1 ROOTFS\` +"
  echo "\`mkfs.ext4 -d ROOTFS\` into a file of the size banger chose. Cold: nothing cached; warm: blobs"
  echo "cached (banger's blob cache; the baseline's OCI layout), the root file system made again."
  echo "Peak RSS: banger's daemon plus its child processes (debugfs), sampled every 50 ms, each pull"
  echo "with a fresh daemon; baseline: the largest of its three steps."
  echo
  echo "| | banger | baseline | baseline/banger |"
  echo "|---|---|---|---|"
  awk -v a="$(col b-cold 1)" -v b="$(col s-cold 1)" 'BEGIN{printf "| cold pull + convert (s) | %.2f | %.2f | %.2fx |\n", a, b, b/a}'
  awk -v a="$(col b-warm 1)" -v b="$(col s-warm 1)" 'BEGIN{printf "| warm, blobs cached (s) | %.2f | %.2f | %.2fx |\n", a, b, b/a}'
  awk -v a="$(col b-same 1)" 'BEGIN{printf "| re-pull of an unchanged digest (s) | %.2f | - | - |\n", a}'
  awk -v a="$(col b-cold 2)" -v b="$(col s-cold 2)" 'BEGIN{printf "| peak RSS, cold (MiB) | %.0f | %.0f | - |\n", a/1024, b/1024}'
  awk -v a="$(col b-warm 2)" -v b="$(col s-warm 2)" 'BEGIN{printf "| peak RSS, warm (MiB) | %.0f | %.0f | - |\n", a/1024, b/1024}'
} | tee "$out"
