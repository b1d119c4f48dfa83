#!/usr/bin/env bash
# DNS: banger's `.vm` server against dnsmasq serving the same records on the same machine, in one run.
#
#   bench/dns.sh [SECONDS] [NAMES] [ROUNDS]   (as root; defaults: 10 s per measurement, 100 VM
#                                              names, 3 rounds)
#
# Both servers run in one private network namespace on two addresses of its loopback link, with the same
# names (`vm-1.vm` .. `vm-N.vm`, plus NXDOMAIN for unknown `.vm` names: dnsmasq `--local=/vm/`).
# The load generator is dnsperf, the same binary, query file and settings for both:
#   1. throughput: as many queries as 4 clients with 200 outstanding get answered, for SECONDS;
#   2. latency: a fixed 2000 queries/s for SECONDS, every answer's latency recorded (`dnsperf -v`),
#      from which p50 and p99 are computed.
# Query mix: 90% names that exist, 10% names that do not. The two servers alternate, ROUNDS times,
# and each figure is the median over the rounds (this machine's timing is noisy). Writes
# bench/results/dns.md.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
count=${2:-100}
rounds=${3:-3}
command -v dnsperf >/dev/null || { echo "dnsperf is missing: apt-get install dnsperf" >&2; exit 1; }
command -v dnsmasq >/dev/null || { echo "dnsmasq is missing: apt-get install dnsmasq-base" >&2; exit 1; }
cargo build --release -q -p banger-dns --example dns-serve
serve_bin=$PWD/target/release/examples/dns-serve

source bench/netns.sh
inns ip addr add 10.53.0.1/24 dev lo
inns ip addr add 10.53.0.2/24 dev lo

banger_addr=10.53.0.1 dnsmasq_addr=10.53.0.2
: > "$work/names" ; : > "$work/dnsmasq.conf" ; : > "$work/queries"
for i in $(seq 1 "$count"); do
  ip="172.16.$((i / 250)).$((i % 250 + 2))"
  echo "vm-$i $ip" >> "$work/names"
  echo "host-record=vm-$i.vm,$ip" >> "$work/dnsmasq.conf"
done
for i in $(seq 1 1000); do
  if (( i % 10 == 0 )); then echo "nope-$i.vm A"; else echo "vm-$(( (i * 7) % count + 1 )).vm A"; fi
done > "$work/queries"

inns "$serve_bin" "$banger_addr:53" 10.53.0.0/24 "$work/names" 2>"$work/banger.log" &
inns dnsmasq --keep-in-foreground --conf-file="$work/dnsmasq.conf" --no-resolv --no-hosts \
  --bind-interfaces --listen-address="$dnsmasq_addr" --port=53 --local=/vm/ --pid-file= \
  --user=root 2>"$work/dnsmasq.log" &
for addr in $banger_addr $dnsmasq_addr; do
  for _ in $(seq 50); do
    inns dig +time=1 +tries=1 +short "@$addr" vm-1.vm | grep -q . && break
    sleep 0.1
  done
  inns dig +time=1 +tries=1 +short "@$addr" vm-1.vm | grep -q . || { echo "server on $addr does not answer" >&2; cat "$work"/*.log >&2; exit 1; }
done

# throughput ADDR -> queries per second
throughput() {
  inns dnsperf -s "$1" -d "$work/queries" -l "$secs" -c 4 -q 200 -t 2 2>&1 \
    | awk '/Queries per second:/ {printf "%.0f\n", $4}'
}
# latency ADDR -> "p50_ms p99_ms answered"
latency() {
  inns dnsperf -s "$1" -d "$work/queries" -l "$secs" -Q 2000 -c 1 -t 2 -v 2>/dev/null \
    | awk '$1 == ">" { print $NF }' | sort -g \
    | awk '{ v[NR] = $1 } END { if (NR == 0) { print "- - 0"; exit }
             p50 = v[int(NR * 0.50) > 0 ? int(NR * 0.50) : 1]; p99 = v[int(NR * 0.99) > 0 ? int(NR * 0.99) : 1];
             printf "%.3f %.3f %d\n", p50 * 1000, p99 * 1000, NR }'
}

median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
rows=""
for r in $(seq 1 "$rounds"); do
  for who in banger dnsmasq; do
    addr=$banger_addr; [ "$who" = dnsmasq ] && addr=$dnsmasq_addr
    echo "round $r/$rounds: $who..." >&2
    q=$(throughput "$addr")
    read -r p50 p99 n < <(latency "$addr")
    rows+="$who $r $q $p50 $p99 $n"$'\n'
  done
done
col() { printf '%s' "$rows" | awk -v w="$1" -v c="$2" '$1 == w { print $c }' | median; }
qps_b=$(col banger 3) p50_b=$(col banger 4) p99_b=$(col banger 5) n_b=$(col banger 6)
qps_d=$(col dnsmasq 3) p50_d=$(col dnsmasq 4) p99_d=$(col dnsmasq 5) n_d=$(col dnsmasq 6)

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0) print "-"; else printf "%.2f", a / b }'; }
out=bench/results/dns.md
{
  echo "# DNS: banger's \`.vm\` server vs dnsmasq"
  echo
  echo "Command: \`bench/dns.sh $secs $count $rounds\` ($(date -u +%Y-%m-%d), $(nproc) cores, $(dnsperf -h 2>&1 | awk '/^Version/ {print "dnsperf " $2}'), $(dnsmasq --version | head -1 | awk '{print $1, $2, $3}'))."
  echo
  echo "Same namespace, same $count names, same query file (90% existing names, 10% NXDOMAIN), same"
  echo "client. Both servers and dnsperf share the machine's cores. Throughput: 4 clients, 200"
  echo "outstanding, ${secs} s. Latency: a fixed 2000 queries/s for ${secs} s, every answer timed."
  echo "The servers alternate for $rounds rounds; the table gives medians over the rounds."
  echo
  echo "| server | queries/s | p50 latency (ms) | p99 latency (ms) | answers timed per round |"
  echo "|---|---|---|---|---|"
  echo "| banger (hickory-server) | $qps_b | $p50_b | $p99_b | $n_b |"
  echo "| dnsmasq (baseline) | $qps_d | $p50_d | $p99_d | $n_d |"
  echo "| ratio banger / dnsmasq | $(ratio "$qps_b" "$qps_d") | $(ratio "$p50_b" "$p50_d") | $(ratio "$p99_b" "$p99_d") | |"
  echo
  echo "Every round:"
  echo
  echo "| server | round | queries/s | p50 (ms) | p99 (ms) |"
  echo "|---|---|---|---|---|"
  printf '%s' "$rows" | awk '{ printf "| %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5 }'
} > "$out"
cat "$out"
