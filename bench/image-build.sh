#!/usr/bin/env bash
# Wall time and size of `banger image build` for the slim and the full recipe.
#
# Usage (as root, from the repository root, after `cargo build --release --workspace --bins`):
#   bench/image-build.sh [RESULTS_FILE]
# Each build runs in a fresh temporary HOME (its own daemon and store) so nothing is cached.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/image-build.md}
bin=${BANGER_BIN_DIR:-target/release}
[ -x "$bin/banger" ] || { echo "build first: cargo build --release --workspace --bins" >&2; exit 1; }

row() {
  local recipe=$1 home
  home=$(mktemp -d /var/tmp/banger-bench-XXXXXX)
  local start end
  start=$(date +%s.%N)
  HOME=$home BANGER_DAEMON_BIN=$bin/bangerd "$bin/banger" image build "$recipe" >/dev/null
  end=$(date +%s.%N)
  local img=$home/.local/state/banger/images/$recipe/rootfs.ext4
  local apparent ondisk
  apparent=$(stat -c %s "$img")
  ondisk=$(( $(stat -c %b "$img") * $(stat -c %B "$img") ))
  HOME=$home "$bin/banger" daemon stop >/dev/null 2>&1 || true
  rm -rf "$home"
  awk -v r="$recipe" -v s="$start" -v e="$end" -v a="$apparent" -v d="$ondisk" \
    'BEGIN { printf "| %s | %.1f | %.0f | %.0f |\n", r, e - s, a / 1048576, d / 1048576 }'
}

{
  echo "# Image build benchmark"
  echo
  echo "Command: \`bench/image-build.sh\` ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(uname -r))."
  echo "Each build starts from an empty store and downloads every package from the Debian mirror."
  echo
  echo "| recipe | wall time (s) | rootfs apparent size (MiB) | rootfs on disk (MiB) |"
  echo "|---|---|---|---|"
  row debian-bookworm-slim
  row debian-bookworm
} | tee "$out"
