# A private network namespace and a scratch directory for one benchmark run (sourced, not run):
# sets $ns and $work, defines `inns CMD...` to run inside the namespace, and removes both (with
# every process in the namespace) on exit.
ns=banger-bench-$$
work=$(mktemp -d /var/tmp/banger-bench-XXXXXX)
cleanup() {
  for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
  sleep 0.5
  ip netns del "$ns" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
ip netns add "$ns"
inns() { ip netns exec "$ns" "$@"; }
inns ip link set lo up
