#!/usr/bin/env bash
# `banger vm run --rm -- true` split into phases, and the workspace copy of a 10k-file repo
# against `tar | ssh` of the same tree into the same VM, in one run, in a private netns.
#
# Usage (as root, from the repository root, after `cargo build --workspace --bins` and `make agent`):
#   bench/vm-run.sh ROOTFS KERNEL INITRD [RESULTS_FILE]
# The image must contain git and tar (the slim test image does).
set -euo pipefail
cd "$(dirname "$0")/.."
rootfs=$1 kernel=$2 initrd=$3 out=${4:-bench/results/vm-run.md}
source bench/lib.sh

# Stamp each stderr line of `vm run` with the seconds since start.
stamp() { local t0=$1; while IFS= read -r line; do
  printf '%s %s\n' "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.2f", b-a}')" "$line"; done; }
t0=$(date +%s.%N)
b vm run --image bench --rm -- true 2>&1 >/dev/null | stamp "$t0" > "$home/phases.txt"
t_end=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.2f", b-a}')
at() { awk -v pat="$1" 'index($0, pat) { print $1; exit }' "$home/phases.txt"; }

# A 10k-file repo.
repo=$home/repo10k
mkdir -p "$repo"
for d in $(seq 0 99); do mkdir -p "$repo/d$d"; for f in $(seq 0 99); do echo "file $d/$f" > "$repo/d$d/f$f.txt"; done; done
git -C "$repo" init -q && git -C "$repo" add . && GIT_AUTHOR_NAME=b GIT_AUTHOR_EMAIL=b@example.invalid \
  GIT_COMMITTER_NAME=b GIT_COMMITTER_EMAIL=b@example.invalid git -C "$repo" commit -q -m files
b vm run "$repo" --image bench --name copy -- true 2> "$home/copy.txt" >/dev/null
banger_copy=$(sed -n 's/^copied .* in \([0-9.]*\)s$/\1/p' "$home/copy.txt")
t1=$(date +%s.%N)
tar -C "$repo" -cf - . | b vm ssh copy -- 'mkdir -p /root/repo2 && tar -x -C /root/repo2 -f -'
t2=$(date +%s.%N)
tar_copy=$(awk -v a="$t1" -v b="$t2" 'BEGIN{printf "%.2f", b-a}')
files=$(b vm ssh copy -- 'find /root/repo -path /root/repo/.git -prune -o -type f -print | wc -l')
b vm delete --force copy >/dev/null 2>&1

{
  echo "# vm run benchmark"
  echo
  echo "Command: \`bench/vm-run.sh ROOTFS KERNEL INITRD\` ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, QEMU TCG,"
  echo "no hardware KVM on this host). Image: $(basename "$(dirname "$rootfs")"); 1 vCPU, 512 MiB."
  echo
  echo "## \`banger vm run --rm -- true\`: seconds since start when each phase began"
  echo
  echo "| phase | started at (s) |"
  echo "|---|---|"
  echo "| spec resolved | $(at 'spec:') |"
  echo "| image check + create: allocate | $(at '==> allocate') |"
  echo "| clone root disk | $(at '==> clone root disk') |"
  echo "| prepare work disk | $(at '==> prepare work disk') |"
  echo "| network | $(at '==> network') |"
  echo "| boot (VMM start) | $(at '==> boot') |"
  echo "| wait for agent | $(at '==> wait for agent') |"
  echo "| wait for ssh | $(at '==> wait for ssh') |"
  echo "| VM up, command starts | $(at 'is up at') |"
  echo "| deleted (end) | $(at 'deleted VM') |"
  echo "| total wall time | $t_end |"
  echo
  echo "## Workspace copy of a $files-file repo (plus .git)"
  echo
  echo "| method | seconds |"
  echo "|---|---|"
  echo "| banger (git ls-files + one tar stream over ssh) | $banger_copy |"
  echo "| baseline: \`tar -cf - . \| ssh VM tar -x\` | $tar_copy |"
  awk -v a="$banger_copy" -v b="$tar_copy" 'BEGIN{printf "| ratio banger/baseline | %.2f |\n", a/b}'
} | tee "$out"
