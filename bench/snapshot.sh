#!/usr/bin/env bash
# Warm starts: `banger vm run --rm -- true` restored from the image's warm snapshot against the
# same run booted cold (`--cold`), alternating rounds, medians, phases; the first run, which boots
# cold and keeps the snapshot; `vm fork -n 4` of a running VM; the warm snapshot's size. In one
# run, in a private netns.
#
# Usage (as root, from the repository root, after `cargo build --workspace --bins` and `make agent`):
#   bench/snapshot.sh ROOTFS KERNEL INITRD [RESULTS_FILE] [ROUNDS]
# e.g. with the slim test image:
#   S=$(echo target/banger-test-cache/slim-*/home/.local/state/banger)
#   bench/snapshot.sh $S/images/debian-bookworm-slim/rootfs.ext4 $S/kernels/debian-bookworm-slim/{vmlinuz,initrd.img}
set -euo pipefail
cd "$(dirname "$0")/.."
rootfs=$1 kernel=$2 initrd=$3 out=${4:-bench/results/snapshot.md} rounds=${5:-5}
case $rounds in '' | *[!0-9]* | 0) echo "ROUNDS must be a positive number, not '$rounds'" >&2; exit 2 ;; esac
source bench/lib.sh

# banger inside the namespace, given up on after $1 seconds (for the clean-up, which must end).
bt() { timeout "$1" ip netns exec "$ns" "$PWD/$bin/banger" "${@:2}"; }
# Every VM goes through the daemon first (a `--rm` VM that failed to come up is kept by banger,
# and an interrupted run leaves its VMs); lib.sh's cleanup then ends whatever is left in the
# namespace and removes the scratch HOME with the daemon's state and snapshots.
bench_cleanup() {
  set +e
  local vms v
  vms=$(bt 30 vm list --json 2>/dev/null |
    python3 -c 'import json, sys; [print(v["name"]) for v in json.load(sys.stdin)]' 2>/dev/null)
  for v in $vms; do bt 120 vm delete --force "$v" >/dev/null 2>&1; done
  cleanup
}
trap bench_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.3f", b-a}'; }
median() { sort -n | awk '{a[NR]=$1} END{if (NR%2) print a[(NR+1)/2]; else printf "%.3f\n", (a[NR/2]+a[NR/2+1])/2}'; }
# Stamp each stderr line with the seconds since start (as bench/vm-run.sh does).
stamp() { local t0=$1; while IFS= read -r line; do
  printf '%s %s\n' "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.2f", b-a}')" "$line"; done; }
# The milestones of a stamped run, one "SECONDS<TAB>WHAT" a line, in the order printed: each
# `==> phase` line (as crates/banger-cli/src/render.rs prints them without --verbose), the spec,
# the VM being up and its deletion.
milestones() {
  awk '{ t = $1; l = substr($0, length($1) + 2) }
    l ~ /^==> / { print t "\t" substr(l, 5); next }
    l ~ /^spec: / { print t "\tspec resolved"; next }
    l ~ / is up at / { print t "\tVM up, command starts"; next }
    l ~ /^deleted VM / { print t "\tdeleted (end)" }' "$1"
}
# When milestone $2 of run $1 began (empty if it never did).
at() { milestones "$1" | awk -F'\t' -v w="$2" '$2 == w { print $1; exit }'; }
# Seconds from milestone $2 of run $1 to the next one (empty if it never began or came last).
took() { milestones "$1" | awk -F'\t' -v w="$2" 'f { printf "%.2f", $1 - s; exit } $2 == w { s = $1; f = 1 }'; }
# The `VM NAME is up at IP (...)` line of run $1.
upline() { sed -n 's/^[0-9.]* \(VM .* is up at .*\)$/\1/p' "$1" | head -1; }
# Phase table of run $1 whose wall time was $2.
phase_table() {
  echo "| phase | started at (s) | took (s) |"
  echo "|---|---|---|"
  milestones "$1" | awk -F'\t' -v end="$2" '{ t[NR] = $1; w[NR] = $2 }
    END { for (i = 1; i <= NR; i++) printf "| %s | %.2f | %.2f |\n", w[i], t[i], (i < NR ? t[i+1] : end) - t[i] }'
  echo "| total wall time | $(printf '%.2f' "$2") | |"
}

# One `vm run --image bench --rm [FLAGS] -- true`, its stderr stamped into $1; sets $wall.
wall=
run_true() {
  local file=$1 t0; shift
  t0=$(now)
  if ! b vm run --image bench --rm "$@" -- true 2>&1 >/dev/null | stamp "$t0" > "$file"; then
    echo "bench/snapshot.sh: \`banger vm run --image bench --rm $* -- true\` failed; its stderr:" >&2
    cat "$file" >&2
    exit 1
  fi
  wall=$(secs "$t0" "$(now)")
}
# Run $1 must say it was a $2 ("cold boot" or "warm start"), or the benchmark stops here.
expect() {
  if ! grep -Eq " is up at [^ ]+ \\($2" "$1"; then
    echo "bench/snapshot.sh: expected a $2 in $3, but banger said:" >&2
    cat "$1" >&2
    exit 1
  fi
}
# Things that break the contract without spoiling the times: written to the results, and the
# script exits non-zero after writing them.
problems=()
problem() { echo "bench/snapshot.sh: $*" >&2; problems+=("$*"); }

# 1. The first run boots cold and keeps the warm snapshot.
run_true "$home/prime.txt"
prime_wall=$wall
expect "$home/prime.txt" "cold boot" "the first run"
keep_took=$(took "$home/prime.txt" "keep warm snapshot")
grep -q '^[0-9.]* ==> keep warm snapshot$' "$home/prime.txt" ||
  problem "the first run printed no \`==> keep warm snapshot\` phase"
spec_line=$(sed -n 's/^[0-9.]* spec: \(.*\), image .*/\1/p' "$home/prime.txt" | head -1)

# 2. Alternating rounds: cold (`--cold`), then warm.
: > "$home/cold"; : > "$home/warm"; : > "$home/cold-up"; : > "$home/warm-up"
for r in $(seq 1 "$rounds"); do
  run_true "$home/cold-$r.txt" --cold
  expect "$home/cold-$r.txt" "cold boot" "cold round $r"
  echo "$wall" >> "$home/cold"
  at "$home/cold-$r.txt" "VM up, command starts" >> "$home/cold-up"
  ! grep -q '==> keep warm snapshot' "$home/cold-$r.txt" ||
    problem "cold round $r (--cold) kept a warm snapshot"
  ! grep -q '==> restore' "$home/cold-$r.txt" || problem "cold round $r (--cold) printed \`==> restore\`"

  run_true "$home/warm-$r.txt"
  expect "$home/warm-$r.txt" "warm start" "warm round $r"
  echo "$wall" >> "$home/warm"
  at "$home/warm-$r.txt" "VM up, command starts" >> "$home/warm-up"
  ! grep -q '==> keep warm snapshot' "$home/warm-$r.txt" ||
    problem "warm round $r kept a warm snapshot again"
done
mc=$(median < "$home/cold") mw=$(median < "$home/warm")
mcu=$(median < "$home/cold-up") mwu=$(median < "$home/warm-up")
# The round whose time is the median (the lower middle one for an even count), for the phases.
median_round() { awk '{ print $1, NR }' "$1" | sort -n | awk '{ r[NR] = $2 } END { print r[int((NR + 1) / 2)] }'; }
rc=$(median_round "$home/cold") rw=$(median_round "$home/warm")
cold_rep=$home/cold-$rc.txt warm_rep=$home/warm-$rw.txt
cold_rep_wall=$(sed -n "${rc}p" "$home/cold") warm_rep_wall=$(sed -n "${rw}p" "$home/warm")
named_snap=$(sed -n 's/.*(warm start from snapshot \([^,)]*\).*/\1/p' "$warm_rep" | head -1)

# 3. Space: the warm snapshot as `snapshot list --json` reports it, and its files.
b snapshot list --json > "$home/snapshots.json"
python3 - "$home/snapshots.json" > "$home/warm-snaps.tsv" <<'EOF'
import json, sys
for s in json.load(open(sys.argv[1])):
    if s.get("warm") is True and s.get("image") == "bench":
        print(s["name"], s["bytes"], s.get("dir", ""), sep="\t")
EOF
n_warm=$(wc -l < "$home/warm-snaps.tsv")
[ "$n_warm" = 1 ] || problem "snapshot list --json shows $n_warm warm snapshots of image bench, not 1"
IFS=$'\t' read -r snap_name snap_bytes snap_dir < "$home/warm-snaps.tsv" || true
[ -z "$named_snap" ] || [ "$named_snap" = "$snap_name" ] ||
  problem "the warm runs name snapshot $named_snap, the listing $snap_name"
# The memory and device state (QEMU: vm.state holds memory and devices; Firecracker: vm.state +
# vm.mem), which a restore reads; the rest is the disk copies.
state_bytes=
if [ -n "${snap_dir:-}" ] && [ -d "$snap_dir" ]; then
  state_bytes=0
  for f in vm.state vm.mem; do
    if [ -f "$snap_dir/$f" ]; then state_bytes=$((state_bytes + $(stat -c %s "$snap_dir/$f"))); fi
  done
  # shellcheck disable=SC2016
  find "$snap_dir" -maxdepth 1 -type f -printf '%f\t%s\t%b\n' | sort |
    awk -F'\t' '{ printf "| `%s` | %.1f | %.1f |\n", $1, $2 / 1048576, $3 * 512 / 1048576 }' > "$home/snap-files.md"
fi

# 4. Fork: a running parent (made from the warm snapshot), then 4 children from it.
t0=$(now)
if ! b vm create --image bench --name parent 2>&1 >/dev/null | stamp "$t0" > "$home/parent.txt"; then
  echo "bench/snapshot.sh: \`banger vm create --image bench --name parent\` failed:" >&2
  cat "$home/parent.txt" >&2; exit 1
fi
parent_wall=$(secs "$t0" "$(now)")
if grep -q '==> restore' "$home/parent.txt"; then parent_kind="restored from the warm snapshot"
else parent_kind="booted cold"; problem "vm create --image bench booted cold although a warm snapshot exists"; fi
t0=$(now)
if ! b vm fork parent -n 4 2>&1 >"$home/fork-out.txt" | stamp "$t0" > "$home/fork.txt"; then
  echo "bench/snapshot.sh: \`banger vm fork parent -n 4\` failed:" >&2
  cat "$home/fork.txt" >&2; exit 1
fi
fork_wall=$(secs "$t0" "$(now)")
fork_snap=$(took "$home/fork.txt" "snapshot")
children=$(sort "$home/fork-out.txt" | tr '\n' ' ' | sed 's/ $//')
[ "$children" = "parent-1 parent-2 parent-3 parent-4" ] ||
  problem "vm fork parent -n 4 made '$children', not parent-1..parent-4"
while read -r v; do
  b vm delete --force "$v" >/dev/null 2>&1 < /dev/null || problem "cannot delete VM $v"
done < <(cat "$home/fork-out.txt"; echo parent)

# The warm snapshot goes too (the scratch HOME would take it anyway).
[ -z "${snap_name:-}" ] || b snapshot delete "$snap_name" >/dev/null 2>&1 ||
  problem "snapshot delete $snap_name failed"

# 5. Numbers for the estimate: what runs on the host before the VMM starts (TCG barely touches
# it) and what follows "is up" (the command and the delete) are measured; the guest's part is not.
prep_c=$(at "$cold_rep" "boot") prep_w=$(at "$warm_rep" "restore")
[ -n "$prep_c" ] || problem "cold round $rc printed no \`==> boot\` phase"
[ -n "$prep_w" ] || problem "warm round $rw printed no \`==> restore\` phase"
up_c=$(at "$cold_rep" "VM up, command starts") up_w=$(at "$warm_rep" "VM up, command starts")
tail_c=$(awk -v a="$up_c" -v b="$cold_rep_wall" 'BEGIN{printf "%.2f", b-a}')
tail_w=$(awk -v a="$up_w" -v b="$warm_rep_wall" 'BEGIN{printf "%.2f", b-a}')
if [ -n "$state_bytes" ] && [ "$state_bytes" -gt 0 ]; then
  state_mb=$(awk -v b="$state_bytes" 'BEGIN{printf "%.0f", b/1e6}'); state_src="measured: \`vm.state\`/\`vm.mem\` of the warm snapshot"
else
  state_mb=170; state_src="assumed: the snapshot's directory could not be read"
fi
# Reading the state at 4 GB/s (page cache) .. 1 GB/s (disk); restore + new identity on KVM is
# taken as 0.1 .. 0.3 s, stretched if the state read alone needs more.
read_lo=$(awk -v m="$state_mb" 'BEGIN{printf "%.2f", m/4000}')
read_hi=$(awk -v m="$state_mb" 'BEGIN{printf "%.2f", m/1000}')
g_w_lo=0.10 g_w_hi=$(awk -v r="$read_hi" 'BEGIN{x = r + 0.1; printf "%.2f", (x > 0.3 ? x : 0.3)}')
g_c_lo=1.0 g_c_hi=2.0
est() { awk -v p="$1" -v g="$2" -v t="${3:-0}" 'BEGIN{printf "%.2f", p + g + t}'; }
up_c_lo=$(est "$prep_c" "$g_c_lo") up_c_hi=$(est "$prep_c" "$g_c_hi")
up_w_lo=$(est "$prep_w" "$g_w_lo") up_w_hi=$(est "$prep_w" "$g_w_hi")
all_c_lo=$(est "$prep_c" "$g_c_lo" "$tail_c") all_c_hi=$(est "$prep_c" "$g_c_hi" "$tail_c")
all_w_lo=$(est "$prep_w" "$g_w_lo" "$tail_w") all_w_hi=$(est "$prep_w" "$g_w_hi" "$tail_w")
ratio_range() { awk -v wl="$1" -v wh="$2" -v cl="$3" -v ch="$4" 'BEGIN{printf "%.2f–%.2f", wl/ch, wh/cl}'; }
guest_c_tcg=$(awk -v u="$up_c" -v p="$prep_c" 'BEGIN{printf "%.2f", u-p}')
save_lo=$(awk -v c="$all_c_lo" -v w="$all_w_hi" 'BEGIN{printf "%.2f", c-w}')
save_hi=$(awk -v c="$all_c_hi" -v w="$all_w_lo" 'BEGIN{printf "%.2f", c-w}')

ratio=$(awk -v w="$mw" -v c="$mc" 'BEGIN{printf "%.2f", w/c}')
verdict=$(awk -v r="$ratio" 'BEGIN{print (r <= 0.15 ? "met" : "not met")}')
{
  echo "# Warm snapshots: cold against warm \`vm run\`, fork, space"
  echo
  echo "Command: \`bench/snapshot.sh ROOTFS KERNEL INITRD $out $rounds\` ($(date -u +%Y-%m-%dT%H:%MZ),"
  echo "$(nproc) cores, QEMU TCG, no hardware KVM on this host). Image: $(basename "$(dirname "$rootfs")")"
  echo "(registered as \`bench\`); shape: ${spec_line:-?}."
  echo "Cold: \`banger vm run --image bench --rm --cold -- true\`; warm: the same without \`--cold\`,"
  echo "restored from the image's warm snapshot. $rounds alternating rounds (cold, then warm), wall"
  echo "times in seconds; every cold run said \"cold boot\" and every warm one \"warm start\"."
  echo
  echo "## Medians"
  echo
  echo "| | cold (s) | warm (s) | warm/cold |"
  echo "|---|---|---|---|"
  awk -v c="$mc" -v w="$mw" 'BEGIN{printf "| whole `vm run --rm -- true` | %.2f | %.2f | %.2f |\n", c, w, w/c}'
  awk -v c="$mcu" -v w="$mwu" 'BEGIN{printf "| until \"is up\" | %.2f | %.2f | %.2f |\n", c, w, w/c}'
  echo
  echo "Target: warm at most 0.15x cold under TCG; here $ratio ($verdict)."
  echo
  echo "## First run: cold boot + keeping the snapshot"
  echo
  echo "| | seconds |"
  echo "|---|---|"
  echo "| wall time of the first \`vm run --image bench --rm -- true\` | $(printf '%.2f' "$prime_wall") |"
  echo "| its \`keep warm snapshot\` phase | ${keep_took:-?} |"
  awk -v p="$prime_wall" -v c="$mc" 'BEGIN{printf "| first run − cold median | %.2f |\n", p-c}'
  echo
  echo "## Each round"
  echo
  echo "| round | cold: up (s) | cold: total (s) | warm: up (s) | warm: total (s) | warm/cold |"
  echo "|---|---|---|---|---|---|"
  paste "$home/cold-up" "$home/cold" "$home/warm-up" "$home/warm" |
    awk '{printf "| %d | %.2f | %.2f | %.2f | %.2f | %.2f |\n", NR, $1, $2, $3, $4, $4/$2}'
  echo
  echo "## Phases of a cold run (round $rc, the median one): seconds since start"
  echo
  phase_table "$cold_rep" "$cold_rep_wall"
  echo
  echo "\`$(upline "$cold_rep")\`"
  echo
  echo "## Phases of a warm run (round $rw, the median one): seconds since start"
  echo
  phase_table "$warm_rep" "$warm_rep_wall"
  echo
  echo "\`$(upline "$warm_rep")\`"
  echo
  echo "## Fork"
  echo
  echo "| | seconds |"
  echo "|---|---|"
  echo "| \`vm create --image bench --name parent\` ($parent_kind) | $(printf '%.2f' "$parent_wall") |"
  echo "| \`vm fork parent -n 4\` | $(printf '%.2f' "$fork_wall") |"
  echo "| of which its \`snapshot\` phase (the parent's state, for the fork only) | ${fork_snap:-?} |"
  awk -v f="$fork_wall" -v s="${fork_snap:-0}" 'BEGIN{printf "| the 4 children after it, each (average) | %.2f |\n", (f-s)/4}'
  echo
  echo "Children: $children."
  echo
  echo "## Space"
  echo
  if [ -n "${snap_name:-}" ]; then
    awk -v n="$snap_name" -v b="$snap_bytes" 'BEGIN{printf "Warm snapshot `%s`: %d bytes (%.1f MiB) as `snapshot list --json` reports it.\n", n, b, b/1048576}'
  else
    echo "No warm snapshot of image \`bench\` in \`snapshot list --json\`."
  fi
  if [ -s "$home/snap-files.md" ]; then
    echo "Its files (apparent size; allocated blocks, which for reflinked disk copies are shared with"
    echo "their source and for the memory state skip what QEMU did not write):"
    echo
    echo "| file | MiB | allocated MiB |"
    echo "|---|---|---|"
    cat "$home/snap-files.md"
  fi
  echo
  echo "## Estimate for real KVM (not measured here)"
  echo
  echo "**An estimate, not a measurement**: this host has no hardware KVM. Rows marked *measured* come"
  echo "from the median runs above; rows marked *assumed* are not measured anywhere in this run."
  echo
  echo "| | cold (s) | warm (s) | warm/cold |"
  echo "|---|---|---|---|"
  echo "| host-side phases before the VMM starts (*measured*: start of \`boot\` / \`restore\`) | $prep_c | $prep_w | |"
  echo "| guest: boot to sshd / restore + new identity (*assumed* for KVM) | $g_c_lo–$g_c_hi | $g_w_lo–$g_w_hi | |"
  echo "| until \"is up\" (estimate) | $up_c_lo–$up_c_hi | $up_w_lo–$up_w_hi | $(ratio_range "$up_w_lo" "$up_w_hi" "$up_c_lo" "$up_c_hi") |"
  echo "| command and delete (*measured* under TCG: an upper bound) | $tail_c | $tail_w | |"
  echo "| whole \`vm run --rm -- true\` (estimate) | $all_c_lo–$all_c_hi | $all_w_lo–$all_w_hi | $(ratio_range "$all_w_lo" "$all_w_hi" "$all_c_lo" "$all_c_hi") |"
  echo
  echo "Reasoning. On KVM a cold systemd boot of this image (kernel, initrd, systemd up to sshd and"
  echo "the agent) takes about 1–2 s of guest time; under TCG the same boot took $guest_c_tcg s of the"
  echo "$up_c s until \"is up\" in cold round $rc. A restore does no booting: it is dominated by reading"
  echo "the memory and device state, $state_mb MB here ($state_src) for a 512 MiB guest, which QEMU reads whole from its"
  echo "migration stream ($read_lo s at 4 GB/s from the page cache, $read_hi s at 1 GB/s from disk),"
  echo "while Firecracker maps its memory file and faults pages in as the guest touches them; then"
  echo "the new-identity round trip through the agent (tens of milliseconds on KVM). Hence warm"
  echo "≈ $g_w_lo–$g_w_hi s of guest-side time. The host-side phases (disk clones, work disk, network)"
  echo "are the same code on KVM, but here they ran on 2 busy cores; the command-and-delete tail is"
  echo "taken as measured under TCG, which overstates it on KVM. With TCG out of the way the host-side"
  echo "phases and that tail weigh far more in both, which is why the estimated KVM ratio"
  echo "($(ratio_range "$all_w_lo" "$all_w_hi" "$all_c_lo" "$all_c_hi")) is not the TCG ratio ($ratio): what a warm start saves on KVM is the guest's"
  echo "boot, about $save_lo–$save_hi s a run by this estimate."
  if [ "${#problems[@]}" -gt 0 ]; then
    echo
    echo "## Problems seen in this run"
    echo
    for p in "${problems[@]}"; do echo "- $p"; done
  fi
} | tee "$out"
[ "${#problems[@]}" = 0 ] || { echo "bench/snapshot.sh: ${#problems[@]} problem(s), listed in $out" >&2; exit 1; }
