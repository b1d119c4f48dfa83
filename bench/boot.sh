#!/usr/bin/env bash
# Boot-to-ssh: `banger vm start` (until sshd answers) against a bare `qemu-system-x86_64` boot of
# the same kernel, initrd, disks, tap and kernel command line (banger's own QEMU command line,
# replayed by hand), in one run, inside a private network namespace.
#
# Usage (as root, from the repository root, after `make build` or `cargo build --workspace --bins`
# and `make agent`):
#   bench/boot.sh ROOTFS KERNEL INITRD [RUNS] [RESULTS_FILE]
# e.g. with the slim test image: bench/boot.sh target/banger-test-cache/slim-*/home/.local/state/banger/{images/debian-bookworm-slim/rootfs.ext4,kernels/debian-bookworm-slim/{vmlinuz,initrd.img}}
set -euo pipefail
cd "$(dirname "$0")/.."
rootfs=$1 kernel=$2 initrd=$3 runs=${4:-3} out=${5:-bench/results/boot.md}
source bench/lib.sh
b vm create --name bench --image bench --vcpu 1 --memory 512 --disk 256M --no-start >/dev/null 2>&1
now() { date +%s.%N; }
wait_ssh() { # wait until TCP 22 answers on $1
  until ip netns exec "$ns" bash -c "exec 3<>/dev/tcp/$1/22" 2>/dev/null; do sleep 0.1; done
}
ip=$(b vm show bench --json | sed -n 's/.*"ip": "\(.*\)".*/\1/p')
tap=$(b vm show bench --json | sed -n 's/.*"tap": "\(.*\)".*/\1/p')
banger_times=() bare_times=() cmdline=""
for i in $(seq "$runs"); do
  t0=$(now); b vm start bench >/dev/null 2>&1; t1=$(now)
  banger_times+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')")
  if [ -z "$cmdline" ]; then
    pid=$(b vm show bench --json | sed -n 's/.*"pid": \([0-9]*\).*/\1/p')
    cmdline=$(tr '\0' '\n' < "/proc/$pid/cmdline")
  fi
  b vm stop bench --force >/dev/null 2>&1
done
# Bare: the same QEMU command line, with the bridge and tap made by hand.
ip netns exec "$ns" ip link add banger0 type bridge
ip netns exec "$ns" ip addr add 172.16.0.1/24 dev banger0
ip netns exec "$ns" ip link set banger0 up
ip netns exec "$ns" ip tuntap add dev "$tap" mode tap
ip netns exec "$ns" ip link set "$tap" master banger0 up
mapfile -t argv <<< "$cmdline"
rundir=$(printf '%s\n' "${argv[@]}" | sed -n 's/.*path=\(.*\)\/qmp.sock.*/\1/p' | head -1)
for i in $(seq "$runs"); do
  mkdir -p "$rundir"
  t0=$(now)
  ip netns exec "$ns" setsid "${argv[@]}" >/dev/null 2>&1 &
  qpid=$!
  wait_ssh "$ip"
  t1=$(now)
  bare_times+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')")
  kill -9 "$qpid" 2>/dev/null || true; wait "$qpid" 2>/dev/null || true
  rm -rf "$rundir"
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
mb=$(median "${banger_times[@]}") mq=$(median "${bare_times[@]}")
{
  echo "# Boot to ssh: banger vs bare QEMU"
  echo
  echo "Command: \`bench/boot.sh ROOTFS KERNEL INITRD $runs\` ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores,"
  echo "QEMU TCG: no hardware KVM on this host). Image: $(basename "$(dirname "$rootfs")"); 1 vCPU, 512 MiB."
  echo "banger: \`banger vm start\` until it returns (agent ready and sshd answering)."
  echo "bare: banger's own QEMU command line replayed by hand, until TCP port 22 answers."
  echo
  echo "| runs | banger median (s) | bare qemu median (s) | ratio banger/bare |"
  echo "|---|---|---|---|"
  awk -v r="$runs" -v a="$mb" -v b="$mq" 'BEGIN{printf "| %d | %.2f | %.2f | %.2f |\n", r, a, b, a/b}'
  echo
  echo "banger runs: ${banger_times[*]}"
  echo
  echo "bare runs: ${bare_times[*]}"
} | tee "$out"
