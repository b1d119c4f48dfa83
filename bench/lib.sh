# Shared set-up for the VM benchmarks (sourced, not run): a private network namespace, a
# throwaway HOME with its own daemon, `b` to run banger inside the namespace, and the image
# under test registered as `bench`. Expects $rootfs $kernel $initrd; removes everything on exit.
bin=${BANGER_BIN_DIR:-target/debug}
agent=${BANGER_AGENT_BIN:-target/agent/x86_64-unknown-linux-gnu/debug/banger-agent}
ns=banger-bench-$$
home=$(mktemp -d /var/tmp/banger-bench-XXXXXX)
cleanup() {
  for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
  sleep 0.5
  ip netns del "$ns" 2>/dev/null || true
  rm -rf "$home"
}
trap cleanup EXIT
ip netns add "$ns"
ip netns exec "$ns" ip link set lo up
export HOME=$home BANGER_DAEMON_BIN=$PWD/$bin/bangerd BANGER_AGENT_BIN=$PWD/$agent
b() { ip netns exec "$ns" "$PWD/$bin/banger" "$@"; }
mkdir -p "$home/.config/banger"
printf 'vmm = "qemu"\n[vm_defaults]\nvcpu = 1\nmemory_mib = 512\ndisk_size = "1G"\n' > "$home/.config/banger/config.toml"
b image register bench --rootfs "$rootfs" --kernel "$kernel" --initrd "$initrd" >/dev/null 2>&1
