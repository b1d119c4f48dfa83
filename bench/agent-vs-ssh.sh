#!/usr/bin/env bash
# The guest agent against OpenSSH as the way `vm run` reaches a guest that has both: a trivial
# command (`true`) and the workspace copy of a 10k-file tree (one tar stream), on the same VM,
# alternating rounds, medians. Decides which path `vm run` uses for Debian images.
#
# Usage (as root, from the repository root, after `cargo build --workspace --bins` and `make agent`):
#   bench/agent-vs-ssh.sh ROOTFS KERNEL INITRD [ROUNDS] [RESULTS_FILE]
# The image must run sshd and have tar (the slim test image does).
set -euo pipefail
cd "$(dirname "$0")/.."
rootfs=$1 kernel=$2 initrd=$3 rounds=${4:-5} out=${5:-bench/results/agent-vs-ssh.md}
source bench/lib.sh

b vm create --image bench --name av >/dev/null 2>&1
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.3f", b-a}'; }
median() { sort -n | awk '{a[NR]=$1} END{if (NR%2) print a[(NR+1)/2]; else printf "%.3f\n", (a[NR/2]+a[NR/2+1])/2}'; }

tree=$home/tree10k
mkdir -p "$tree"
for d in $(seq 0 99); do mkdir -p "$tree/d$d"; for f in $(seq 0 99); do echo "file $d/$f" > "$tree/d$d/f$f.txt"; done; done

: > "$home/agent-true" ; : > "$home/ssh-true"; : > "$home/agent-copy"; : > "$home/ssh-copy"
for r in $(seq 1 "$rounds"); do
  t=$(now); b vm exec av -- true; secs "$t" "$(now)" >> "$home/agent-true"
  t=$(now); b vm ssh av -- true; secs "$t" "$(now)" >> "$home/ssh-true"
  t=$(now); tar -C "$tree" -cf - . | b vm exec av -- sh -c "rm -rf /root/a && mkdir /root/a && tar -x -C /root/a -f -"
  secs "$t" "$(now)" >> "$home/agent-copy"
  t=$(now); tar -C "$tree" -cf - . | b vm ssh av -- "rm -rf /root/s && mkdir /root/s && tar -x -C /root/s -f -"
  secs "$t" "$(now)" >> "$home/ssh-copy"
done
n_agent=$(b vm exec av -- sh -c 'find /root/a -type f | wc -l')
n_ssh=$(b vm ssh av -- 'find /root/s -type f | wc -l')
[ "$n_agent" = 10000 ] && [ "$n_ssh" = 10000 ] || { echo "copies incomplete: $n_agent / $n_ssh" >&2; exit 1; }
b vm delete --force av >/dev/null 2>&1

at=$(median < "$home/agent-true"); st=$(median < "$home/ssh-true")
ac=$(median < "$home/agent-copy"); sc=$(median < "$home/ssh-copy")
{
  echo "# Guest agent vs OpenSSH"
  echo
  echo "Command: \`bench/agent-vs-ssh.sh ROOTFS KERNEL INITRD $rounds\` ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores,"
  echo "QEMU TCG, no hardware KVM on this host). Image: $(basename "$(dirname "$rootfs")"); 1 vCPU, 512 MiB."
  echo "Both paths end to end through the CLI (\`banger vm exec\` vs \`banger vm ssh\`), same VM,"
  echo "alternating, $rounds rounds, medians in seconds."
  echo
  echo "| what | agent (vm exec) | ssh (vm ssh) | agent/ssh |"
  echo "|---|---|---|---|"
  awk -v a="$at" -v s="$st" 'BEGIN{printf "| `true` | %.2f | %.2f | %.2f |\n", a, s, a/s}'
  awk -v a="$ac" -v s="$sc" 'BEGIN{printf "| copy of 10,000 files (tar stream) | %.2f | %.2f | %.2f |\n", a, s, a/s}'
} | tee "$out"
