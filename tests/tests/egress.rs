//! Egress policy from a real guest, in a private network namespace: a second namespace plays
//! "the internet" (a web server on two addresses and an upstream DNS server, dnsmasq, that the
//! daemon forwards to through the namespace's own resolv.conf). With an allow-list the allowed
//! name resolves and its server answers; another name is refused, its address is unreachable
//! even typed by hand, and so are other DNS servers and DNS-over-TLS. `--no-network` reaches
//! nothing. A changed list takes effect when the VM restarts (after the daemon, which reads the
//! config, restarts too), and nothing of the old list stays open.
//!
//! Also here, as it needs the same running bridge: a flood of TCP connections to the bridge's
//! DNS port leaves the daemon holding few of them, and its API answering.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use banger_e2e::oci::*;
use banger_e2e::*;

/// The other end of the test's uplink: 10.99.0.1 ("allowed.test"), 10.99.0.2 ("denied.test")
/// and 10.99.0.53 (the DNS server) in a namespace of its own, removed on drop with its servers.
struct Internet {
    ns: Netns,
    servers: Vec<Child>,
    _root: tempfile::TempDir,
}

impl Internet {
    /// Links `host` (the namespace the daemon runs in) to a new "internet" namespace.
    fn start(host: &Netns) -> Internet {
        let ns = Netns::new();
        let in_host = |args: &[&str]| run(host.wrap(Path::new(args[0])).args(&args[1..]));
        let in_net = |args: &[&str]| run(ns.wrap(Path::new(args[0])).args(&args[1..]));
        in_host(&[
            "ip", "link", "add", "wan0", "type", "veth", "peer", "name", "wan1", "netns", &ns.name,
        ]);
        in_host(&["ip", "addr", "add", "10.99.0.254/24", "dev", "wan0"]);
        in_host(&["ip", "link", "set", "wan0", "up"]);
        for a in ["10.99.0.1/24", "10.99.0.2/24", "10.99.0.53/24"] {
            in_net(&["ip", "addr", "add", a, "dev", "wan1"]);
        }
        in_net(&["ip", "link", "set", "wan1", "up"]);
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("index.html"), "hello from the internet\n").unwrap();
        let mut servers = vec![
            ns.wrap(Path::new("python3"))
                .args(["-m", "http.server", "8080", "--bind", "0.0.0.0", "--directory"])
                .arg(root.path())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
            // A DNS-over-TLS port: only whether a connection opens matters.
            ns.wrap(Path::new("python3"))
                .args(["-c", "import socket,time; s=socket.socket(); s.bind(('0.0.0.0',853)); s.listen(16); time.sleep(900)"])
                .spawn()
                .unwrap(),
        ];
        servers.push(
            ns.wrap(Path::new("dnsmasq"))
                .args([
                    "--keep-in-foreground",
                    "--conf-file=/dev/null",
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                    "--listen-address=10.99.0.53",
                    "--local-ttl=60",
                    "--address=/allowed.test/10.99.0.1",
                    "--address=/denied.test/10.99.0.2",
                    "--pid-file=",
                ])
                .spawn()
                .expect("dnsmasq (package dnsmasq-base)"),
        );
        let internet = Internet {
            ns,
            servers,
            _root: root,
        };
        // Both answer before the test goes on.
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let dig = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &host.name,
                    "dig",
                    "+short",
                    "+time=1",
                    "+tries=1",
                    "@10.99.0.53",
                    "allowed.test",
                ])
                .output()
                .unwrap();
            let web = Command::new("ip")
                .args(["netns", "exec", &host.name, "python3", "-c",
                       "import urllib.request; urllib.request.urlopen('http://10.99.0.2:8080/', timeout=1)"])
                .status()
                .unwrap();
            if String::from_utf8_lossy(&dig.stdout).trim() == "10.99.0.1" && web.success() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the internet namespace did not come up"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        internet
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = &self.ns; // removed after its servers
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn exec_sh(env: &Env, vm: &str, script: &str) -> Out {
    env.banger(["vm", "exec", vm, "--", "sh", "-c", script])
}

/// Whether the guest fetches the test page from the web server at `addr`. (With nc:
/// busybox-static's wget crashes, glibc's resolver being out of reach of a static binary.)
fn fetches(env: &Env, vm: &str, addr: &str) -> bool {
    let out = exec_sh(
        env,
        vm,
        &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {addr} 8080"),
    );
    out.stdout.contains("hello from the internet")
}

/// The address the guest's resolver gives `name`, if any.
fn resolves(env: &Env, vm: &str, name: &str) -> Option<String> {
    resolves_via(env, vm, name, "")
}

/// The address `server` (the guest's resolver when empty) gives `name`, if any. A lookup that
/// got no address (TCG guests on a loaded machine are slow, and an allowed answer waits for
/// the host's firewall) is tried again; a refusal or an address is final.
fn resolves_via(env: &Env, vm: &str, name: &str, server: &str) -> Option<String> {
    let mut last = None;
    for _ in 0..3 {
        let out = exec_sh(env, vm, &format!("nslookup {name} {server}"));
        // busybox nslookup prints the server first, then "Name: ... Address: ..." per answer.
        let found = out
            .stdout
            .split(&format!("Name:\t{name}"))
            .nth(1)
            .and_then(|rest| rest.split("Address: ").nth(1))
            .map(|a| a.split_whitespace().next().unwrap_or("").to_owned());
        // A refusal is final; anything else without the address (a timeout, SERVFAIL, or only
        // the AAAA half answered, as NXDOMAIN, while the A half was late) is tried again.
        let text = format!("{}{}", out.stdout, out.stderr);
        if found.is_some() || text.contains("REFUSED") {
            return found;
        }
        eprintln!("nslookup {name} {server}: no answer, trying again:\n{out}");
        last = Some(out);
    }
    eprintln!("nslookup {name} {server} never got an answer: {last:?}");
    None
}

fn config(egress: &str) -> String {
    format!(
        "vmm = \"qemu\"\n[vm_defaults]\nvcpu = 1\nmemory_mib = 256\ndisk_size = \"128M\"\n\
         [network]\negress = {egress}\n"
    )
}

#[test]
fn an_allow_list_lets_a_real_guest_reach_its_names_and_nothing_else() {
    if !e2e_enabled() {
        return;
    }
    let env = Env::with_netns();
    let host_ns = env.netns.as_ref().unwrap();
    let _internet = Internet::start(host_ns);
    // The daemon (started by the first command below) forwards names to "the internet".
    host_ns.set_resolv_conf("nameserver 10.99.0.53\n");
    let _registry = pull_busybox(&env, &config("[\"allowed.test\"]"));
    env.ok(["vm", "create", "--image", "busybox", "--name", "bb"]);

    let show = env.ok(["vm", "show", "bb"]).stdout;
    assert!(show.contains("egress:      only allowed.test"), "{show}");
    let json = env.ok(["vm", "show", "bb", "--json"]).json();
    assert_eq!(json["egress"]["mode"], "allow", "{json}");

    let allowed = resolves(&env, "bb", "allowed.test");
    if allowed.as_deref() != Some("10.99.0.1") {
        let log = std::fs::read_to_string(env.state_dir().join("bangerd.log")).unwrap_or_default();
        panic!("allowed.test did not resolve ({allowed:?}); daemon log:\n{log}");
    }
    // The lookup above is what opened the way. The same lookup straight from the server
    // works from the host, so a refusal below is banger's doing.
    let direct = host_ns
        .wrap(Path::new("dig"))
        .args(["+short", "@10.99.0.53", "denied.test"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&direct.stdout).trim(), "10.99.0.2");
    assert!(
        fetches(&env, "bb", "10.99.0.1"),
        "the allowed name's server"
    );
    assert_eq!(
        resolves(&env, "bb", "denied.test"),
        None,
        "a name outside the list resolved"
    );
    let refused = exec_sh(&env, "bb", "nslookup denied.test");
    assert!(
        refused.stdout.contains("REFUSED") || refused.stderr.contains("REFUSED"),
        "{refused}"
    );
    assert!(
        !fetches(&env, "bb", "10.99.0.2"),
        "an address typed by hand"
    );
    let direct = exec_sh(&env, "bb", "nslookup denied.test 10.99.0.53");
    assert!(
        !direct.stdout.contains("10.99.0.2"),
        "another DNS server answered the guest: {direct}"
    );
    assert!(
        !exec_sh(&env, "bb", "nc -w 3 10.99.0.53 853 </dev/null").success(),
        "DNS-over-TLS reached its server"
    );
    // `.vm` names still resolve.
    assert_eq!(
        resolves(&env, "bb", "bb.vm").as_deref(),
        Some(json["ip"].as_str().unwrap())
    );
    // The daemon log names the refused name, once however often it was asked.
    let log = std::fs::read_to_string(env.state_dir().join("bangerd.log")).unwrap();
    assert_eq!(
        log.matches("refused \"denied.test\"").count(),
        1,
        "refusals in the daemon log:\n{}",
        log.lines()
            .filter(|l| l.contains("refused"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // --no-network: not even the allowed name.
    let out = env.banger([
        "vm",
        "run",
        "--rm",
        "--image",
        "busybox",
        "--no-network",
        "--",
        "sh",
        "-c",
        "nslookup allowed.test || echo no-name; nc -w 3 10.99.0.1 8080 </dev/null || echo no-web",
    ]);
    assert!(out.success(), "{out}");
    assert!(
        out.stdout.contains("no-name") && out.stdout.contains("no-web"),
        "{out}"
    );

    // Another list: after the daemon reads it and the VM restarts, the new name works, and
    // the old one's address, allowed a minute ago, is closed at once.
    env.write_config(&config("[\"denied.test\"]"));
    env.ok(["daemon", "restart"]);
    env.ok(["vm", "restart", "bb"]);
    assert!(env
        .ok(["vm", "show", "bb"])
        .stdout
        .contains("egress:      only denied.test"));
    assert_eq!(
        resolves(&env, "bb", "denied.test").as_deref(),
        Some("10.99.0.2")
    );
    assert!(fetches(&env, "bb", "10.99.0.2"), "the newly allowed name");
    assert_eq!(resolves(&env, "bb", "allowed.test"), None);
    assert!(
        !fetches(&env, "bb", "10.99.0.1"),
        "the old list's address stayed open"
    );

    env.ok(["vm", "delete", "bb", "--force"]);
    env.stop_daemon();
}

/// Python for the flood: opens `argv[1]` TCP connections to banger's DNS on the bridge address
/// without waiting, prints how many are established after five seconds, then holds them.
const HOLD_CONNECTIONS: &str = "import resource,socket,sys,time
n=int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_NOFILE,(n+64,n+64)); socks=[]
for i in range(n):
    s=socket.socket(); s.setblocking(False)
    try: s.connect(('172.16.0.1',53))
    except BlockingIOError: pass
    except OSError: continue
    socks.append(s)
time.sleep(5); ok=0
for s in socks:
    try: s.getpeername(); ok+=1
    except OSError: pass
print(ok, flush=True); time.sleep(300)";

/// Sockets the process `pid` holds.
fn sockets_of(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.to_string_lossy().starts_with("socket:"))
        .count()
}

#[test]
fn three_thousand_connections_to_the_dns_port_leave_the_daemon_answering() {
    if !e2e_enabled() {
        return;
    }
    let env = Env::with_netns();
    let host_ns = env.netns.as_ref().unwrap();
    let _registry = pull_busybox(&env, &config("\"open\""));
    env.ok(["vm", "create", "--image", "busybox", "--name", "bb"]);
    let daemon = env.daemon_pid().expect("the daemon runs");
    let before = sockets_of(daemon);

    // The flooder sits on the bridge like a guest (a plain veth port: an address in the guest
    // subnet is all banger's per-guest limit keys on). A busybox guest cannot hold 3,000
    // sockets in its memory; the host's python can, from the same place on the network.
    let flooder = Netns::new();
    run(host_ns.wrap(Path::new("ip")).args([
        "link",
        "add",
        "fl0",
        "type",
        "veth",
        "peer",
        "name",
        "fl1",
        "netns",
        &flooder.name,
    ]));
    run(host_ns
        .wrap(Path::new("ip"))
        .args(["link", "set", "fl0", "master", "banger0", "up"]));
    run(flooder
        .wrap(Path::new("ip"))
        .args(["addr", "add", "172.16.0.250/24", "dev", "fl1"]));
    run(flooder
        .wrap(Path::new("ip"))
        .args(["link", "set", "fl1", "up"]));
    let mut flood = flooder
        .wrap(Path::new("python3"))
        .args(["-c", HOLD_CONNECTIONS, "3000"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(flood.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let held: usize = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("flooder said {line:?}"));
    // Some got through (the flood reached the server), the per-address limit's worth at most.
    assert!(
        held > 0 && held <= banger_net::nat::DNS_TCP_PER_GUEST as usize,
        "one address held {held} connections to the DNS server"
    );
    eprintln!("the flooder holds {held} connections");
    // While the flood holds: the daemon holds few sockets more than before, and its API, its
    // agent channel and its DNS still answer.
    let during = sockets_of(daemon);
    eprintln!("the daemon holds {during} sockets (before the flood: {before})");
    assert!(
        during <= before + banger_net::nat::DNS_TCP_PER_GUEST as usize + 8,
        "the daemon went from {before} to {during} sockets"
    );
    let list = env.ok(["vm", "list", "--json"]).json();
    assert_eq!(list[0]["name"], "bb", "{list}");
    let out = exec_sh(&env, "bb", "nslookup bb.vm");
    assert!(
        out.success() && out.stdout.contains("Name:\tbb.vm"),
        "{out}"
    );
    let _ = flood.kill();
    let _ = flood.wait();
    drop(flooder);
    env.ok(["vm", "delete", "bb", "--force"]);
    env.stop_daemon();
}
