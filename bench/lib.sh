# Shared set-up for the VM benchmarks (sourced, not run): a private network namespace, a
# throwaway HOME with its own daemon, `b` to run banger inside the namespace, and the image
# under test registered as `bench`. Expects $rootfs $kernel $initrd; removes everything on exit.
bin=${BANGER_BIN_DIR:-target/debug}
agent=${BANGER_AGENT_BIN:-target/agent/x86_64-unknown-linux-gnu/debug/banger-agent}
source bench/netns.sh
home=$work
export HOME=$home BANGER_DAEMON_BIN=$PWD/$bin/bangerd BANGER_AGENT_BIN=$PWD/$agent
b() { ip netns exec "$ns" "$PWD/$bin/banger" "$@"; }
mkdir -p "$home/.config/banger"
printf 'vmm = "qemu"\n[vm_defaults]\nvcpu = 1\nmemory_mib = 512\ndisk_size = "1G"\n' > "$home/.config/banger/config.toml"
b image register bench --rootfs "$rootfs" --kernel "$kernel" --initrd "$initrd" >/dev/null 2>&1
