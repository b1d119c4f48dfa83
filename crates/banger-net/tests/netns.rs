//! Real host-network tests: bridge, NAT table, taps, reconcile and teardown, run for real as root, each
//! inside its own throwaway network namespace so the host's interfaces and firewall are never touched.
//!
//! How the isolation works (see `harness`): each test, when started normally by `cargo test`, is the
//! *parent*. It creates a named namespace with `ip netns add banger-net-test-<pid>-<test>`, then re-runs
//! this same test binary with `ip netns exec <ns> <this binary> <test> --exact` and an environment variable
//! naming the namespace. In that *child* the same test function sees the variable, checks that its network
//! namespace really differs from the parent's, and runs the body. The parent always deletes the namespace
//! (a Drop guard, so also when the child fails, times out or the parent panics), then asserts it is gone.
//! Everything the body created (bridge, taps, nft table, the forwarding sysctl) lives in that namespace
//! and disappears with it.
//!
//! Why not `unshare(CLONE_NEWNET)` in the test process: the libtest process is multi-threaded and
//! `unshare` only moves the calling thread, so other tests' threads would stay on the host; a separate
//! process per test is simpler to reason about. A named namespace (over an anonymous one) makes "the
//! namespace is gone afterwards" checkable, and lets a later run sweep namespaces left by a killed run.
//!
//! A child that matched no test would exit 0, so the parent also requires a marker line that the body
//! prints when it finishes. Tests fail (never skip) when not root or when `ip`, `nft` or `sudo` is missing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::process::Command;

use banger_net::{
    BridgeConfig, Elevation, GuestLinks, HostAccess, HostNet, Mac, NetError, Network, Outbound,
    PortGuard, PrivilegedRunner, SystemHostNet, TapName,
};
use nix::unistd::Uid;
use serde_json::Value;

mod harness {
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    const CHILD_ENV: &str = "BANGER_NET_TEST_NETNS";
    const HOST_NETNS_ENV: &str = "BANGER_NET_TEST_PARENT_NETNS";
    const DONE_MARKER: &str = "banger-net-test-body-finished:";
    const NETNS_PREFIX: &str = "banger-net-test-";
    const NETNS_DIR: &str = "/run/netns";
    const CHILD_TIMEOUT: Duration = Duration::from_secs(120);

    fn own_netns() -> String {
        std::fs::read_link("/proc/self/ns/net")
            .map(|p| p.display().to_string())
            .unwrap_or_else(|e| panic!("cannot read /proc/self/ns/net: {e}"))
    }

    /// Deletes the namespace when dropped, whatever happened in between.
    struct NetnsGuard {
        name: String,
    }

    impl NetnsGuard {
        fn create(name: String) -> Self {
            let out = Command::new("ip")
                .args(["netns", "add", &name])
                .output()
                .unwrap_or_else(|e| panic!("cannot run `ip netns add`: {e} (install iproute2)"));
            assert!(
                out.status.success(),
                "`ip netns add {name}` failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            NetnsGuard { name }
        }
    }

    impl Drop for NetnsGuard {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }

    /// Removes namespaces left by earlier runs whose process no longer exists (e.g. killed by a timeout).
    fn sweep_stale() {
        let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(NETNS_PREFIX) else {
                continue;
            };
            let Some(pid) = rest.split('-').next() else {
                continue;
            };
            if !Path::new("/proc").join(pid).exists() {
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
            }
        }
    }

    fn require_root_and_tools() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "these tests create network namespaces and must run as root (they never touch the host's \
             own network); run `cargo test -p banger-net` as root"
        );
        for tool in ["ip", "nft"] {
            let found = Command::new(tool)
                .arg("-V")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok();
            assert!(
                found,
                "`{tool}` is not installed; install iproute2 and nftables"
            );
        }
    }

    pub fn netns_gone(name: &str) -> bool {
        let listed = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        !PathBuf::from(NETNS_DIR).join(name).exists()
            && !listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name))
    }

    /// Runs `body` in a fresh network namespace (see the module header for how).
    pub fn in_fresh_netns(test: &str, body: impl FnOnce()) {
        if let Ok(ns) = std::env::var(CHILD_ENV) {
            let parent = std::env::var(HOST_NETNS_ENV).unwrap_or_default();
            let mine = own_netns();
            assert!(
                !parent.is_empty() && mine != parent,
                "refusing to run {test}: not inside the test namespace {ns} ({mine} vs {parent})"
            );
            body();
            // Leading newline: libtest has already printed "test NAME ... " on this line.
            println!("\n{DONE_MARKER}{test}");
            return;
        }

        require_root_and_tools();
        sweep_stale();
        let name = format!("{NETNS_PREFIX}{}-{test}", std::process::id());
        let guard = NetnsGuard::create(name.clone());

        let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
        let stdout = tempfile::NamedTempFile::new().unwrap();
        let stderr = tempfile::NamedTempFile::new().unwrap();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &name])
            .arg(&exe)
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &name)
            .env(HOST_NETNS_ENV, own_netns())
            .stdin(Stdio::null())
            .stdout(stdout.reopen().unwrap())
            .stderr(stderr.reopen().unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the test child: {e}"));
        let deadline = Instant::now() + CHILD_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };

        drop(guard);
        assert!(
            netns_gone(&name),
            "network namespace {name} still exists after the test"
        );

        let out = std::fs::read_to_string(stdout.path()).unwrap_or_default();
        let err = std::fs::read_to_string(stderr.path()).unwrap_or_default();
        println!("--- child stdout ---\n{out}\n--- child stderr ---\n{err}");
        let status = status.unwrap_or_else(|| {
            panic!("{test} timed out after {CHILD_TIMEOUT:?} in namespace {name}")
        });
        assert!(status.success(), "{test} failed inside namespace {name}");
        assert!(
            out.lines().any(|l| l == format!("{DONE_MARKER}{test}")),
            "{test}: the child did not run the test body (test name mismatch?)"
        );
    }
}

/// A test whose body runs inside its own fresh network namespace.
macro_rules! netns_test {
    ($(#[$meta:meta])* fn $name:ident() $body:block) => {
        $(#[$meta])*
        #[test]
        fn $name() {
            harness::in_fresh_netns(stringify!($name), || $body);
        }
    };
}

// ---- observations made independently of the code under test ----

fn sh(argv: &[&str]) -> String {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn links() -> Vec<Value> {
    serde_json::from_str(&sh(&["ip", "-j", "-d", "addr", "show"])).unwrap()
}

fn link(name: &str) -> Option<Value> {
    links().into_iter().find(|l| l["ifname"] == name)
}

fn kind(link: &Value) -> &str {
    link["linkinfo"]["info_kind"].as_str().unwrap_or("")
}

fn is_up(link: &Value) -> bool {
    link["flags"]
        .as_array()
        .is_some_and(|f| f.iter().any(|x| x == "UP"))
}

fn bridges() -> Vec<String> {
    links()
        .iter()
        .filter(|l| kind(l) == "bridge")
        .map(|l| l["ifname"].as_str().unwrap().to_owned())
        .collect()
}

fn nft_tables() -> Vec<String> {
    let doc: Value = serde_json::from_str(&sh(&["nft", "-j", "list", "tables"])).unwrap();
    doc["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i.get("table"))
        .map(|t| {
            format!(
                "{} {}",
                t["family"].as_str().unwrap(),
                t["name"].as_str().unwrap()
            )
        })
        .collect()
}

/// Both of banger's tables, the guard table without its set's elements (as banger compares them).
fn nft_banger_listing() -> String {
    sh(&["nft", "-t", "list", "table", "inet", "banger"])
        + &sh(&["nft", "-t", "list", "table", "bridge", "banger"])
}

fn guard(ip: &str) -> PortGuard {
    let ip: std::net::Ipv4Addr = ip.parse().unwrap();
    PortGuard::new(Mac::for_ip(ip), ip)
}

/// The guard set's elements of the tables named `table`.
fn guard_elements_of(table: &str) -> Vec<String> {
    let doc: Value = serde_json::from_str(&sh(&[
        "nft", "-j", "list", "set", "bridge", table, "guests",
    ]))
    .unwrap();
    let mut out: Vec<String> = doc["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i.get("set"))
        .flat_map(|s| s["elem"].as_array().cloned().unwrap_or_default())
        .map(|e| {
            let parts: Vec<String> = e["concat"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_str().unwrap().to_owned())
                .collect();
            parts.join(" ")
        })
        .collect();
    out.sort();
    out
}

fn ip_forward() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
        .unwrap()
        .trim()
        .to_owned()
}

fn sysfs(dev: &str, attr: &str) -> String {
    std::fs::read_to_string(format!("/sys/class/net/{dev}/{attr}"))
        .unwrap_or_else(|e| panic!("/sys/class/net/{dev}/{attr}: {e}"))
        .trim()
        .to_owned()
}

fn system_network(elevation: Elevation, config: BridgeConfig) -> Network<SystemHostNet> {
    Network::new(
        SystemHostNet::new(PrivilegedRunner::with_elevation(elevation), &config),
        config,
    )
}

/// Asserts `tap` is a persistent, PI-less tap owned by `uid`, enslaved to `bridge` and up.
fn assert_tap_ready(tap: &TapName, bridge: &str, uid: u32) {
    let l = link(tap.as_str()).unwrap_or_else(|| panic!("tap {tap} does not exist"));
    assert_eq!(kind(&l), "tun", "{tap}: {l}");
    assert_eq!(l["linkinfo"]["info_data"]["type"], "tap", "{tap}");
    assert_eq!(l["linkinfo"]["info_data"]["pi"], false, "{tap}");
    assert_eq!(l["linkinfo"]["info_data"]["persist"], true, "{tap}");
    assert_eq!(l["master"], bridge, "{tap} is attached to the bridge");
    assert!(is_up(&l), "{tap} is up");
    assert_eq!(sysfs(tap.as_str(), "owner"), uid.to_string(), "{tap} owner");
}

netns_test! {
    fn bridge_and_nat_setup_is_idempotent() {
        assert_eq!(ip_forward(), "0", "a fresh namespace starts with forwarding off");
        let net = system_network(Elevation::Direct, BridgeConfig::default());

        let first = net.ensure_host().unwrap();
        assert_eq!(
            first.as_slice(),
            [
                "created bridge banger0",
                "assigned 172.16.0.1/24 to banger0",
                "brought banger0 up",
                "enabled IPv4 forwarding",
                "created nft tables inet banger, bridge banger",
            ],
            "{first}"
        );
        let listing = nft_banger_listing();
        assert!(listing.contains("ip saddr 172.16.0.0/24 oifname != \"banger0\" masquerade"), "{listing}");
        assert!(BridgeConfig::default().ruleset().matches_listing(&listing), "{listing}");

        let second = net.ensure_host().unwrap();
        assert!(second.is_empty(), "second run changed: {second}");
        assert_eq!(nft_banger_listing(), listing, "table unchanged");
        assert_eq!(nft_tables(), ["inet banger", "bridge banger"], "exactly banger's two tables");
        assert_eq!(bridges(), ["banger0"], "exactly one bridge");
        let br = link("banger0").unwrap();
        assert!(is_up(&br));
        let v4: Vec<_> = br["addr_info"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["family"] == "inet")
            .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
            .collect();
        assert_eq!(v4, ["172.16.0.1/24"]);
        assert_eq!(ip_forward(), "1");

        // Someone edits banger's table by hand: the next ensure puts it back, atomically and whole.
        sh(&["nft", "flush", "chain", "inet", "banger", "forward"]);
        assert_ne!(nft_banger_listing(), listing);
        let repaired = net.ensure_host().unwrap();
        assert_eq!(
            repaired.as_slice(),
            ["replaced nft tables inet banger, bridge banger (they differed from banger's)"]
        );
        assert_eq!(nft_banger_listing(), listing);
        assert_eq!(nft_tables(), ["inet banger", "bridge banger"]);

        let down = net.teardown().unwrap();
        assert_eq!(down.as_slice(), ["deleted nft tables inet banger, bridge banger", "deleted bridge banger0"]);
        assert!(nft_tables().is_empty());
        assert!(bridges().is_empty());
    }
}

/// A stand-in for a guest, for what the host's filter sees of it: a network namespace of its own
/// (held by a `sleep`, so it disappears with that process) behind a veth pair whose host end is a
/// port of the bridge, as a VM's tap is. Packets from it reach the host exactly as a VM's do.
/// Dropping it kills the process; the namespace and both veth ends go with it.
struct FakeGuest {
    holder: std::process::Child,
}

impl FakeGuest {
    fn attach(bridge: &str, name: &str, cidr: &str, gateway: &str) -> FakeGuest {
        let holder = Command::new("unshare")
            .args(["-n", "sleep", "300"])
            .spawn()
            .expect("cannot run unshare (util-linux)");
        let guest = FakeGuest { holder };
        let pid = guest.holder.id().to_string();
        // `unshare` moves itself into the new namespace before it runs sleep: wait for that.
        let own = std::fs::read_link("/proc/self/ns/net").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::fs::read_link(format!("/proc/{pid}/ns/net"))
            .ok()
            .as_ref()
            == Some(&own)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "unshare -n did not take effect"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // A port named like a banger tap keeps that name on the host side.
        let host_end = if name.starts_with("bg-") {
            name.to_owned()
        } else {
            format!("{name}-h")
        };
        let guest_end = format!("{name}-g");
        sh(&[
            "ip", "link", "add", &host_end, "type", "veth", "peer", "name", &guest_end,
        ]);
        sh(&["ip", "link", "set", &guest_end, "netns", &pid]);
        sh(&["ip", "link", "set", &host_end, "master", bridge, "up"]);
        for cmd in [
            "ip link set lo up".to_owned(),
            format!("ip addr add {cidr} dev {guest_end}"),
            format!("ip link set {guest_end} up"),
            format!("ip route add default via {gateway}"),
        ] {
            assert!(guest.run(&cmd), "in the fake guest: {cmd} failed");
        }
        guest
    }

    /// A guest behind a port named like a banger tap (`bg-...`), so banger's guard polices it,
    /// with the MAC banger gives the address `ip`.
    fn attach_as_tap(bridge: &str, port: &str, ip: &str) -> FakeGuest {
        let guest = FakeGuest::attach(bridge, port, &format!("{ip}/24"), "172.16.0.1");
        let mac = Mac::for_ip(ip.parse().unwrap());
        assert!(guest.run(&format!("ip link set {port}-g address {mac}")));
        guest
    }

    /// `bash -c script` inside the guest's namespace.
    fn bash(&self, script: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.args([
            "-t",
            &self.holder.id().to_string(),
            "-n",
            "bash",
            "-c",
            script,
        ]);
        c
    }

    /// Runs `script` with bash inside the guest's namespace; whether it succeeded.
    fn run(&self, script: &str) -> bool {
        self.bash(script)
            .status()
            .expect("cannot run nsenter")
            .success()
    }

    /// What `script` prints on stdout, run with bash inside the guest's namespace.
    fn output(&self, script: &str) -> String {
        let out = self.bash(script).output().expect("cannot run nsenter");
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Whether a TCP connection to `addr:port` opens within two seconds.
    fn connects(&self, addr: &str, port: u16) -> bool {
        self.run(&format!(
            "timeout 2 bash -c 'exec 3<>/dev/tcp/{addr}/{port}'"
        ))
    }
}

impl Drop for FakeGuest {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

netns_test! {
    fn guests_reach_only_dns_on_the_host_and_never_link_local_addresses() {
        let net = system_network(Elevation::Direct, BridgeConfig::default());
        let _ = net.ensure_host().unwrap();
        // Host services: one on the bridge address, the `.vm` DNS server's port, and a
        // "metadata service" on a link-local address of the host (the test's namespace).
        sh(&["ip", "link", "set", "lo", "up"]);
        sh(&["ip", "addr", "add", "169.254.169.254/32", "dev", "lo"]);
        let _service = std::net::TcpListener::bind("172.16.0.1:8080").unwrap();
        let _dns = std::net::TcpListener::bind("172.16.0.1:10053").unwrap();
        let _metadata = std::net::TcpListener::bind("169.254.169.254:80").unwrap();
        let guest = FakeGuest::attach("banger0", "fg0", "172.16.0.2/24", "172.16.0.1");

        assert!(guest.connects("172.16.0.1", 53), "DNS on the bridge address stays open");
        assert!(!guest.connects("172.16.0.1", 8080), "a host service on the bridge address");
        assert!(!guest.connects("169.254.169.254", 80), "a link-local (metadata) address");
        assert!(!guest.connects("127.0.0.1", 8080), "sanity: the guest's own loopback");
        // The host still reaches the guest, and the guest's answers come back: nothing listens
        // on the guest's port 9, so the answer is a reset, seen as "refused" rather than a timeout.
        let err = std::net::TcpStream::connect_timeout(
            &"172.16.0.2:9".parse().unwrap(),
            std::time::Duration::from_secs(3),
        )
        .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");

        // `host_access = true`: the host opens, link-local addresses do not.
        let open = BridgeConfig { host_access: HostAccess::Open, ..BridgeConfig::default() };
        let net = system_network(Elevation::Direct, open.clone());
        let changes = net.ensure_host().unwrap();
        assert_eq!(changes.as_slice(), ["replaced nft tables inet banger, bridge banger (they differed from banger's)"]);
        assert!(open.ruleset().matches_listing(&nft_banger_listing()));
        assert!(guest.connects("172.16.0.1", 8080), "host_access opens the host");
        assert!(guest.connects("172.16.0.1", 53));
        assert!(!guest.connects("169.254.169.254", 80), "metadata stays closed with host_access");

        drop(guest);
        let _ = net.teardown().unwrap();
    }
}

/// Python run in a guest: one UDP datagram from address `argv[1]` to the bridge's DNS port. A
/// datagram needs no answer, so whether the host receives it shows what the filter let through
/// (a TCP handshake from a spoofed address fails anyway: the answer goes to the real owner).
const SEND_FROM: &str = "import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); \
    s.bind((sys.argv[1],0)); s.sendto(b'hello',('172.16.0.1',53))";

/// The source address of the next datagram `sock` receives within two seconds, if any.
fn received_from(sock: &std::net::UdpSocket) -> Option<std::net::IpAddr> {
    sock.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .unwrap();
    let mut buf = [0u8; 64];
    sock.recv_from(&mut buf).ok().map(|(_, from)| from.ip())
}

/// Python run in a guest: sends three gratuitous ARP replies on `dev` saying `ip` is at `mac`.
const GRATUITOUS_ARP: &str = "import socket,struct,sys; dev,ip,mac=sys.argv[1:4]; \
    m=bytes.fromhex(mac.replace(':','')); b=b'\\xff'*6; a=socket.inet_aton(ip); \
    s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW); s.bind((dev,0)); \
    f=b+m+struct.pack('!H',0x0806)+struct.pack('!HHBBH6s4s6s4s',1,0x0800,6,4,2,m,a,b,a); \
    [s.send(f) for _ in range(3)]";

netns_test! {
    fn a_guest_sends_only_from_its_own_mac_and_address() {
        let net = system_network(Elevation::Direct, BridgeConfig::default());
        let _ = net.ensure_host().unwrap();
        let _dns = std::net::TcpListener::bind("172.16.0.1:10053").unwrap();
        let a = FakeGuest::attach_as_tap("banger0", "bg-fga", "172.16.0.2");
        let b = FakeGuest::attach_as_tap("banger0", "bg-fgb", "172.16.0.3");
        let stray = FakeGuest::attach_as_tap("banger0", "bg-fgc", "172.16.0.4");
        for (port, g) in [("bg-fga", &a), ("bg-fgb", &b)] {
            let _ = g;
            let tap = TapName::parse(port).unwrap();
            let ip = if port == "bg-fga" { "172.16.0.2" } else { "172.16.0.3" };
            let _ = net.host().guard_port(&tap, guard(ip)).unwrap();
        }

        assert!(a.connects("172.16.0.1", 53) && b.connects("172.16.0.1", 53));
        assert!(!stray.connects("172.16.0.1", 53), "a banger port nobody guarded sends nothing");
        let udp = std::net::UdpSocket::bind("172.16.0.1:10053").unwrap();
        assert!(a.run(&format!("python3 -c \"{SEND_FROM}\" 172.16.0.2")));
        assert_eq!(received_from(&udp), Some("172.16.0.2".parse().unwrap()), "sanity: its own address");

        // A takes B's address as well and sends from it: dropped.
        assert!(a.run("ip addr add 172.16.0.3/32 dev bg-fga-g"));
        assert!(a.run(&format!("python3 -c \"{SEND_FROM}\" 172.16.0.3")));
        assert_eq!(received_from(&udp), None, "a spoofed source address got through");
        assert!(a.run("ip addr del 172.16.0.3/32 dev bg-fga-g"));

        // A takes B's MAC: nothing it sends gets through.
        let (mac_a, mac_b) = (guard("172.16.0.2").mac, guard("172.16.0.3").mac);
        assert!(a.run(&format!("ip link set bg-fga-g address {mac_b}")));
        assert!(!a.connects("172.16.0.1", 53), "a spoofed MAC got through");
        assert!(a.run(&format!("ip link set bg-fga-g address {mac_a}")));
        assert!(a.connects("172.16.0.1", 53));

        // A tells the host that B's address is at A's MAC: the host keeps B's.
        let neigh = || sh(&["ip", "neigh", "show", "172.16.0.3", "dev", "banger0"]);
        assert!(neigh().contains(&mac_b.to_string()), "the host knows B: {}", neigh());
        std::thread::sleep(std::time::Duration::from_millis(1200)); // past the kernel's ARP locktime
        assert!(a.run(&format!("python3 -c \"{GRATUITOUS_ARP}\" bg-fga-g 172.16.0.3 {mac_a}")));
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(neigh().contains(&mac_b.to_string()), "ARP poisoned: {}", neigh());
        assert!(b.connects("172.16.0.1", 53), "B still reaches the host");

        drop((a, b, stray));
        let _ = net.teardown().unwrap();
    }
}

netns_test! {
    fn a_bridge_banger_did_not_create_is_neither_used_nor_deleted() {
        sh(&["ip", "link", "add", "name", "banger0", "type", "bridge"]);
        sh(&["ip", "addr", "add", "192.168.77.1/24", "dev", "banger0"]);
        let net = system_network(Elevation::Direct, BridgeConfig::default());
        let err = net.ensure_host().unwrap_err();
        assert!(matches!(err, NetError::NotOurs { .. }), "{err}");
        assert!(banger_hint::Hint::hint(&err).unwrap().contains("bridge_name"));
        assert!(nft_tables().is_empty(), "nothing else was set up");
        let _ = net.teardown().unwrap();
        let br = link("banger0").expect("the host's bridge is still there");
        assert_eq!(br["addr_info"][0]["local"], "192.168.77.1", "and unchanged");

        // One an older banger made (no mark, but banger's taps on it) is banger's.
        sh(&["ip", "tuntap", "add", "dev", "bg-old", "mode", "tap"]);
        sh(&["ip", "link", "set", "bg-old", "master", "banger0"]);
        let changes = net.ensure_host().unwrap();
        assert!(changes.as_slice().iter().any(|c| c.contains("marked banger0")), "{changes}");
        assert_eq!(link("banger0").unwrap()["ifalias"], banger_net::BRIDGE_MARK);
        let _ = net.teardown().unwrap();
        assert!(link("banger0").is_none());
        sh(&["ip", "link", "del", "bg-old"]);

        // banger's own bridge carries its mark, and goes at teardown.
        let _ = net.ensure_host().unwrap();
        assert_eq!(link("banger0").unwrap()["ifalias"], banger_net::BRIDGE_MARK);
        let _ = net.teardown().unwrap();
        assert!(link("banger0").is_none());
    }
}

netns_test! {
    fn two_daemons_on_one_host_never_touch_each_others_network() {
        let owner = |state: &str| banger_net::BridgeOwner::new(1000, std::path::Path::new(state));
        let cfg_a = BridgeConfig { owner: owner("/home/a/.local/state/banger"), ..BridgeConfig::default() };
        let cfg_b = BridgeConfig {
            owner: owner("/home/b/.local/state/banger"),
            ..BridgeConfig::parse("banger1", "172.16.1.1/24").unwrap()
        };
        let a = system_network(Elevation::Direct, cfg_a.clone());
        let b = system_network(Elevation::Direct, cfg_b.clone());
        let tap_a = a.attach_vm("vma", Uid::from_raw(0), guard("172.16.0.2")).unwrap().tap;
        let ip_b: std::net::Ipv4Addr = "172.16.1.2".parse().unwrap();
        let tap_b = b.attach_vm("vmb", Uid::from_raw(0), PortGuard::new(Mac::for_ip(ip_b), ip_b)).unwrap().tap;
        let mut tables = nft_tables();
        tables.sort();
        assert_eq!(tables, ["bridge banger", "bridge banger-banger1", "inet banger", "inet banger-banger1"]);
        assert_eq!(link("banger0").unwrap()["ifalias"], cfg_a.owner.alias());
        assert_eq!(link("banger1").unwrap()["ifalias"], cfg_b.owner.alias());
        // B's guest, a real one on B's bridge, reaches B's DNS throughout.
        let _dns_b = std::net::TcpListener::bind("172.16.1.1:10053").unwrap();
        let guest = FakeGuest::attach("banger1", "bg-fgb", "172.16.1.3/24", "172.16.1.1");
        // In B's interface group, as B's own taps are (A's table leaves those to B's).
        sh(&["ip", "link", "set", "bg-fgb", "group", &cfg_b.owner.group().to_string()]);
        let ip_g: std::net::Ipv4Addr = "172.16.1.3".parse().unwrap();
        assert!(guest.run(&format!("ip link set bg-fgb-g address {}", Mac::for_ip(ip_g))));
        let _ = b.host().guard_port(&TapName::parse("bg-fgb").unwrap(), PortGuard::new(Mac::for_ip(ip_g), ip_g)).unwrap();
        assert!(guest.connects("172.16.1.1", 53));

        // A's start-up reconcile knows only its own VM: B's taps are not its to delete.
        let report = a.reconcile(&[tap_a.to_string()]).unwrap();
        assert!(report.removed.is_empty(), "{:?}", report.removed);
        assert!(link(tap_b.as_str()).is_some() && link("bg-fgb").is_some());
        // A stops its last VM and tears its network down; B's stays whole.
        let _ = a.detach_vm("vma", guard("172.16.0.2")).unwrap();
        let _ = a.teardown().unwrap();
        assert!(link("banger0").is_none());
        assert_eq!(nft_tables().len(), 2, "{:?}", nft_tables());
        assert!(link("banger1").is_some() && link(tap_b.as_str()).is_some());
        assert!(guest.connects("172.16.1.1", 53), "A's teardown broke B's guest");
        assert!(b.ensure_host().unwrap().is_empty(), "B's network changed under it");

        // A third daemon configured onto B's bridge is refused, and B's bridge left alone.
        let cfg_c = BridgeConfig { owner: owner("/srv/c/banger"), ..cfg_b.clone() };
        let c = system_network(Elevation::Direct, cfg_c);
        let err = c.ensure_host().unwrap_err();
        assert!(matches!(err, NetError::OtherDaemon { .. }), "{err}");
        assert!(err.to_string().contains("uid 1000, state "), "{err}");
        assert!(banger_hint::Hint::hint(&err).unwrap().contains("bridge_name"));
        // (A failed start releases the network: that must not take B's tables with it.)
        assert!(c.teardown().unwrap().is_empty());
        assert_eq!(link("banger1").unwrap()["ifalias"], cfg_b.owner.alias());
        assert_eq!(nft_tables().len(), 2, "{:?}", nft_tables());
        assert!(guest.connects("172.16.1.1", 53));

        drop(guest);
        let _ = b.detach_vm("vmb", PortGuard::new(Mac::for_ip(ip_b), ip_b)).unwrap();
        let _ = b.teardown().unwrap();
        assert!(nft_tables().is_empty());
        assert!(link("banger1").is_none());
    }
}

netns_test! {
    fn a_subnet_that_overlaps_a_host_route_is_refused_with_the_route() {
        // A veth pair stands in for the host's LAN interface (this kernel may lack `dummy`).
        sh(&["ip", "link", "add", "lan0", "type", "veth", "peer", "name", "lan0p"]);
        sh(&["ip", "link", "set", "lan0p", "up"]);
        sh(&["ip", "link", "set", "lan0", "up"]);
        sh(&["ip", "addr", "add", "172.16.9.1/16", "dev", "lan0"]);
        let net = system_network(Elevation::Direct, BridgeConfig::default());
        let err = net.ensure_host().unwrap_err();
        assert!(matches!(err, NetError::SubnetOverlap { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("172.16.0.1/24") && msg.contains("172.16.0.0/16 dev lan0"), "{msg}");
        assert!(link("banger0").is_none(), "no bridge was made");
        // A subnet clear of it is fine.
        let clear = BridgeConfig::parse("banger0", "10.213.0.1/24").unwrap();
        let net = system_network(Elevation::Direct, clear);
        let _ = net.ensure_host().unwrap();
        let _ = net.teardown().unwrap();
    }
}

netns_test! {
    fn isolated_guests_do_not_reach_each_other_but_still_reach_dns() {
        let isolated = BridgeConfig { guest_links: GuestLinks::Isolated, ..BridgeConfig::default() };
        let net = system_network(Elevation::Direct, isolated);
        let _ = net.ensure_host().unwrap();
        let _dns = std::net::TcpListener::bind("172.16.0.1:10053").unwrap();
        let a = FakeGuest::attach_as_tap("banger0", "bg-fga", "172.16.0.2");
        let b = FakeGuest::attach_as_tap("banger0", "bg-fgb", "172.16.0.3");
        for (port, ip) in [("bg-fga", "172.16.0.2"), ("bg-fgb", "172.16.0.3")] {
            let _ = net.host().guard_port(&TapName::parse(port).unwrap(), guard(ip)).unwrap();
        }
        // B listens (bash cannot, so a python one-liner in B's namespace does).
        let listener = std::process::Command::new("nsenter")
            .args(["-t", &b.holder.id().to_string(), "-n", "python3", "-c",
                   "import socket,time; s=socket.socket(); s.bind(('0.0.0.0',7000)); s.listen(); time.sleep(60)"])
            .spawn()
            .unwrap();
        let _listener = KillOnDrop(listener);
        std::thread::sleep(std::time::Duration::from_millis(500));
        assert!(a.connects("172.16.0.1", 53) && b.connects("172.16.0.1", 53), "DNS stays open");
        assert!(!a.connects("172.16.0.3", 7000), "A reached B although guests are isolated");
        // Nor through the host: A routes B's address via the gateway (one way is enough to
        // count, so UDP, with B counting what arrives).
        assert!(a.run("ip route add 172.16.0.3/32 via 172.16.0.1"));
        let counter = std::process::Command::new("nsenter")
            .args(["-t", &b.holder.id().to_string(), "-n", "python3", "-c",
                   "import socket; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); \
                    s.bind(('0.0.0.0',7001)); s.settimeout(3); n=0\n\
                    try:\n  while True: s.recv(16); n+=1\nexcept OSError: pass\nprint(n)"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(500));
        assert!(a.run("python3 -c \"import socket; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); \
                       [s.sendto(b'x',('172.16.0.3',7001)) for _ in range(5)]\""));
        let routed = counter.wait_with_output().unwrap();
        assert_eq!(String::from_utf8_lossy(&routed.stdout).trim(), "0", "A reached B through the host's routing");
        assert!(a.run("ip route del 172.16.0.3/32 && ip route flush cache"));

        // Without `isolate`, the same two reach each other.
        let open = system_network(Elevation::Direct, BridgeConfig::default());
        let _ = open.ensure_host().unwrap();
        for (port, ip) in [("bg-fga", "172.16.0.2"), ("bg-fgb", "172.16.0.3")] {
            let _ = open.host().guard_port(&TapName::parse(port).unwrap(), guard(ip)).unwrap();
        }
        // A's failed attempt above left B's address unresolved in A's ARP cache; start clean.
        assert!(a.run("ip neigh flush all"));
        assert!(a.connects("172.16.0.3", 7000), "open guests reach each other");
        drop((a, b));
        let _ = open.teardown().unwrap();
    }
}

/// Starts a TCP listener on `port` in `guest`'s namespace (python: bash cannot listen).
fn listen_in(guest: &FakeGuest, port: u16) -> KillOnDrop {
    let child = std::process::Command::new("nsenter")
        .args(["-t", &guest.holder.id().to_string(), "-n", "python3", "-c",
               &format!("import socket,time; s=socket.socket(); s.bind(('0.0.0.0',{port})); s.listen(64); time.sleep(120)")])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    KillOnDrop(child)
}

netns_test! {
    fn filtered_guests_reach_only_allowed_destinations_and_sealed_ones_nothing() {
        let net = system_network(Elevation::Direct, BridgeConfig::default());
        let _ = net.ensure_host().unwrap();
        let _dns = std::net::TcpListener::bind("172.16.0.1:10053").unwrap();
        // "The internet": a server beyond the host, on another link (a plain bridge of the
        // test's own, not banger's), reached through banger's NAT.
        sh(&["ip", "link", "add", "wan0", "type", "bridge"]);
        sh(&["ip", "addr", "add", "198.51.100.1/24", "dev", "wan0"]);
        sh(&["ip", "link", "set", "wan0", "up"]);
        let server = FakeGuest::attach("wan0", "srv", "198.51.100.2/24", "198.51.100.1");
        assert!(server.run("ip addr add 198.51.100.3/24 dev srv-g"));
        let _web = listen_in(&server, 8080);
        let a = FakeGuest::attach_as_tap("banger0", "bg-fga", "172.16.0.2");
        let b = FakeGuest::attach_as_tap("banger0", "bg-fgb", "172.16.0.3");
        let (tap_a, tap_b) = (TapName::parse("bg-fga").unwrap(), TapName::parse("bg-fgb").unwrap());
        let filtered = guard("172.16.0.2").with_outbound(Outbound::Filtered);
        let _ = net.host().guard_port(&tap_a, filtered).unwrap();
        let _ = net.host().guard_port(&tap_b, guard("172.16.0.3")).unwrap();
        let _b_listens = listen_in(&b, 7000);

        assert!(b.connects("198.51.100.2", 8080), "an open guest reaches the outside");
        assert!(!a.connects("198.51.100.2", 8080), "a filtered guest reached an address no answer gave it");
        assert!(a.connects("172.16.0.1", 53), "DNS stays open to a filtered guest");
        assert!(a.connects("172.16.0.3", 7000), "guests still reach each other (not egress)");
        // What a DNS answer allowed, and only that, and only for that guest.
        net.allow_outbound("172.16.0.2".parse().unwrap(), &["198.51.100.2".parse().unwrap()],
                           std::time::Duration::from_secs(60)).unwrap();
        assert!(a.connects("198.51.100.2", 8080), "an allowed destination stays closed");
        assert!(!a.connects("198.51.100.3", 8080), "the other address of the same server");
        let listing = sh(&["nft", "list", "set", "inet", "banger", "egress_allowed"]);
        assert!(listing.contains("172.16.0.2 . 198.51.100.2 timeout 1m"), "{listing}");
        // An established connection outlives its pair; a new one does not.
        let held = a.bash("exec 3<>/dev/tcp/198.51.100.2/8080; sleep 2; echo ok >&3 && echo held")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(500));
        let _ = net.forget_outbound("172.16.0.2".parse().unwrap()).unwrap();
        let held = held.wait_with_output().unwrap();
        assert_eq!(String::from_utf8_lossy(&held.stdout).trim(), "held");
        assert!(!a.connects("198.51.100.2", 8080), "a forgotten destination stays open");
        assert!(!sh(&["nft", "list", "set", "inet", "banger", "egress_allowed"]).contains("172.16.0.2 ."));

        // A new policy replaces the old: A open again, B sealed.
        let _ = net.host().guard_port(&tap_a, guard("172.16.0.2")).unwrap();
        let sealed = guard("172.16.0.3").with_outbound(Outbound::Sealed);
        let _ = net.host().guard_port(&tap_b, sealed).unwrap();
        assert!(a.connects("198.51.100.2", 8080), "A kept its earlier filter");
        assert!(!b.connects("198.51.100.2", 8080), "a sealed guest reached the outside");
        assert!(!a.connects("172.16.0.3", 7000), "a guest reached a sealed one");
        assert!(b.connects("172.16.0.1", 53), "a sealed guest keeps the host's DNS");
        let _a_listens = listen_in(&a, 7001);
        assert!(!b.connects("172.16.0.2", 7001), "a sealed guest reached another guest");
        // Unguarded, nothing of the policy is left behind.
        let _ = net.host().unguard_port(&tap_b, sealed).unwrap();
        for set in [("inet", "sealed"), ("bridge", "sealed"), ("inet", "egress_filtered")] {
            let l = sh(&["nft", "list", "set", set.0, "banger", set.1]);
            assert!(!l.contains("elements"), "{set:?} kept elements: {l}");
        }
        drop((a, b, server));
        let _ = net.teardown().unwrap();
    }
}

/// Kills and reaps a helper process when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Python run in a guest: opens `argv[1]` TCP connections to the bridge's DNS port, holds them,
/// and prints how many opened.
const HOLD_CONNECTIONS: &str = "import socket,sys; n=int(sys.argv[1]); held=[]; \
    exec('for _ in range(n):\\n try:\\n  s=socket.create_connection((\\'172.16.0.1\\',53),timeout=0.5); held.append(s)\\n except OSError: pass'); \
    print(len(held))";

/// Python run in a guest: sends `argv[1]` UDP datagrams to the bridge's DNS port, one every
/// half millisecond (paced, so the host's receiver keeps up and only the filter can drop any).
const FLOOD_UDP: &str =
    "import socket,sys,time; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); \
    [(s.sendto(b'q',('172.16.0.1',53)), time.sleep(0.0005)) for _ in range(int(sys.argv[1]))]";

/// Counts the datagrams `sock` receives from each address until none has come for a second.
fn count_datagrams(
    sock: std::net::UdpSocket,
) -> std::thread::JoinHandle<std::collections::BTreeMap<String, usize>> {
    std::thread::spawn(move || {
        sock.set_read_timeout(Some(std::time::Duration::from_secs(1)))
            .unwrap();
        let mut counts = std::collections::BTreeMap::new();
        let mut buf = [0u8; 16];
        let mut started = false;
        loop {
            match sock.recv_from(&mut buf) {
                Ok((_, from)) => {
                    started = true;
                    *counts.entry(from.ip().to_string()).or_insert(0) += 1;
                }
                Err(_) if started => return counts,
                Err(_) => {}
            }
        }
    })
}

netns_test! {
    fn one_guest_can_neither_hold_the_dns_servers_connections_nor_flood_it() {
        let net = system_network(Elevation::Direct, BridgeConfig::default());
        let _ = net.ensure_host().unwrap();
        // The DNS server's sockets: a TCP listener with room for every connection the guest
        // tries (so only the filter can refuse), and a UDP socket that counts what arrives.
        let tcp = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        tcp.bind(&"172.16.0.1:10053".parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
        tcp.listen(1024).unwrap();
        let udp = std::net::UdpSocket::bind("172.16.0.1:10053").unwrap();
        let a = FakeGuest::attach("banger0", "fga", "172.16.0.2/24", "172.16.0.1");
        let b = FakeGuest::attach("banger0", "fgb", "172.16.0.3/24", "172.16.0.1");

        let held = a.output(&format!("python3 -c \"{HOLD_CONNECTIONS}\" 40"));
        assert_eq!(held.trim(), banger_net::nat::DNS_TCP_PER_GUEST.to_string(), "connections one guest held");
        assert!(b.connects("172.16.0.1", 53), "another guest still gets a connection");

        // A sends 4,000 queries in about two seconds, B 50 at the same time: A gets the burst
        // and the rate through, B everything.
        let counter = count_datagrams(udp);
        let flood_b = std::thread::spawn({
            let pid = b.holder.id().to_string();
            move || {
                Command::new("nsenter")
                    .args(["-t", &pid, "-n", "python3", "-c", FLOOD_UDP, "50"])
                    .status()
                    .unwrap()
                    .success()
            }
        });
        let started = std::time::Instant::now();
        assert!(a.run(&format!("python3 -c \"{FLOOD_UDP}\" 4000")));
        let secs = started.elapsed().as_secs_f64();
        assert!(flood_b.join().unwrap());
        let counts = counter.join().unwrap();
        let from_a = counts.get("172.16.0.2").copied().unwrap_or(0);
        let most = banger_net::nat::DNS_UDP_BURST as f64 + banger_net::nat::DNS_UDP_RATE as f64 * (secs + 1.0);
        assert!(from_a > 0 && (from_a as f64) <= most, "{from_a} of 4000 got through in {secs:.1} s (at most {most})");
        assert_eq!(counts.get("172.16.0.3").copied(), Some(50), "the other guest was slowed: {counts:?}");
        drop((a, b, tcp));
        let _ = net.teardown().unwrap();
    }
}

netns_test! {
    fn only_a_guest_given_host_access_reaches_the_hosts_services() {
        let net = system_network(Elevation::Direct, BridgeConfig::default());
        let _ = net.ensure_host().unwrap();
        let _service = std::net::TcpListener::bind("172.16.0.1:8080").unwrap();
        let a = FakeGuest::attach_as_tap("banger0", "bg-fga", "172.16.0.2");
        let b = FakeGuest::attach_as_tap("banger0", "bg-fgb", "172.16.0.3");
        let (tap_a, tap_b) = (TapName::parse("bg-fga").unwrap(), TapName::parse("bg-fgb").unwrap());
        let open = guard("172.16.0.2").with_host(HostAccess::Open);
        let _ = net.host().guard_port(&tap_a, open).unwrap();
        let _ = net.host().guard_port(&tap_b, guard("172.16.0.3")).unwrap();

        assert!(a.connects("172.16.0.1", 8080), "the guest with host access");
        assert!(!b.connects("172.16.0.1", 8080), "the guest without it");
        // (B cannot borrow A's access by sending from A's address: the guard drops that, see
        // `a_guest_sends_only_from_its_own_mac_and_address`.)
        // Taken back with the guard.
        let _ = net.host().unguard_port(&tap_a, open).unwrap();
        let _ = net.host().guard_port(&tap_a, guard("172.16.0.2")).unwrap();
        assert!(!a.connects("172.16.0.1", 8080), "access outlived its VM's guard");
        drop((a, b));
        let _ = net.teardown().unwrap();
    }
}

netns_test! {
    fn taps_attach_detach_reconcile_and_teardown() {
        let config = BridgeConfig::parse("bgtest0", "10.200.0.1/24").unwrap();
        let net = system_network(Elevation::Direct, config);
        let owner = Uid::from_raw(1000);

        let (g1, g2) = (guard("10.200.0.2"), guard("10.200.0.3"));
        let vm1 = net.attach_vm("vm1", owner, g1).unwrap();
        let vm2 = net.attach_vm("01jq8x7k2m3n4p5q6r7s8t9v0w", owner, g2).unwrap();
        let mut both = vec![format!("{} {} {}", vm1.tap, g1.mac, g1.ip), format!("{} {} {}", vm2.tap, g2.mac, g2.ip)];
        both.sort();
        assert_eq!(guard_elements_of("banger-bgtest0"), both);
        assert_eq!(vm1.tap.as_str(), "bg-vm1");
        assert_eq!(vm2.tap.as_str().len(), 15);
        assert_tap_ready(&vm1.tap, "bgtest0", 1000);
        assert_tap_ready(&vm2.tap, "bgtest0", 1000);
        let mut expected = vec![vm1.tap.clone(), vm2.tap.clone()];
        expected.sort();
        assert_eq!(net.host().list_taps().unwrap(), expected);

        let again = net.attach_vm("vm1", owner, g1).unwrap();
        assert!(again.changes.is_empty(), "re-attach changed: {}", again.changes);

        let removed = net.detach_vm("01jq8x7k2m3n4p5q6r7s8t9v0w", g2).unwrap();
        assert_eq!(removed.as_slice().len(), 2, "{removed}");
        assert!(link(vm2.tap.as_str()).is_none(), "deleted tap is gone");
        assert_eq!(guard_elements_of("banger-bgtest0"), [format!("{} {} {}", vm1.tap, g1.mac, g1.ip)]);
        assert!(net.detach_vm("01jq8x7k2m3n4p5q6r7s8t9v0w", g2).unwrap().is_empty());
        assert_tap_ready(&vm1.tap, "bgtest0", 1000);

        // Leftovers: a banger tap nobody owns, plus look-alikes reconcile must not touch.
        sh(&["ip", "tuntap", "add", "dev", "bg-orphan", "mode", "tap", "user", "1000"]);
        sh(&["ip", "tuntap", "add", "dev", "tap-other", "mode", "tap"]);
        sh(&["ip", "link", "add", "bg-veth", "type", "veth", "peer", "name", "peer-veth"]);
        let report = net.reconcile(&[vm1.tap.to_string(), "bg-gone".to_owned()]).unwrap();
        assert_eq!(report.removed, [TapName::parse("bg-orphan").unwrap()]);
        assert_eq!(report.kept, std::slice::from_ref(&vm1.tap));
        assert_eq!(report.missing, ["bg-gone"]);
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        assert!(link("bg-orphan").is_none());
        assert!(link("tap-other").is_some(), "non-banger tap untouched");
        assert!(link("bg-veth").is_some(), "non-tap with banger's prefix untouched");
        assert_tap_ready(&vm1.tap, "bgtest0", 1000);

        // A non-tap under a tap's name is refused, not deleted.
        let err = net.host().delete_tap(&TapName::parse("bg-veth").unwrap()).unwrap_err();
        assert!(matches!(err, NetError::NotATap { .. }), "{err}");

        let down = net.teardown().unwrap();
        assert_eq!(down.as_slice(), ["deleted nft tables inet banger-bgtest0, bridge banger-bgtest0", "deleted bridge bgtest0"]);
        assert!(nft_tables().is_empty(), "no nft table left");
        assert!(link("bgtest0").is_none(), "no bridge left");
        assert!(bridges().is_empty());
        assert!(net.teardown().unwrap().is_empty(), "teardown is idempotent");
    }
}

netns_test! {
    fn existing_non_bridge_with_the_bridge_name_is_refused() {
        sh(&["ip", "link", "add", "banger0", "type", "veth", "peer", "name", "peer-veth"]);
        let net = system_network(Elevation::Direct, BridgeConfig::default());
        let err = net.ensure_host().unwrap_err();
        assert!(matches!(err, NetError::NotABridge { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("veth device"), "{msg}");
        let hint = banger_hint::Hint::hint(&err).unwrap();
        assert!(hint.contains("ip link del banger0"), "{hint}");
        assert!(nft_tables().is_empty(), "nothing else was set up");
        assert_eq!(kind(&link("banger0").unwrap()), "veth", "and the device was left alone");
    }
}

netns_test! {
    fn sudo_path_sets_up_the_same_network() {
        let found = Command::new("sudo").arg("-V").output().is_ok();
        assert!(found, "`sudo` is not installed; install it (apt-get install sudo)");
        let net = system_network(Elevation::Sudo, BridgeConfig::default());

        let changes = net.ensure_host().unwrap();
        assert_eq!(changes.as_slice().len(), 5, "{changes}");
        assert_eq!(ip_forward(), "1", "forwarding written through `sudo -n tee`");
        assert!(net.ensure_host().unwrap().is_empty());
        let vm = net.attach_vm("viasudo", Uid::from_raw(4242), guard("172.16.0.9")).unwrap();
        assert_tap_ready(&vm.tap, "banger0", 4242);
        assert_eq!(
            net.reconcile(&[]).unwrap().removed,
            std::slice::from_ref(&vm.tap),
        );
        let down = net.teardown().unwrap();
        assert_eq!(down.as_slice().len(), 2, "{down}");
        let left: BTreeSet<String> = links()
            .iter()
            .map(|l| l["ifname"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(left, BTreeSet::from(["lo".to_owned()]));
    }
}
