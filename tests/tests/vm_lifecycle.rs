//! The VM lifecycle end to end on the QEMU backend (TCG here): each test in its own network
//! namespace with its own daemon and HOME, booting the slim Debian image for real, and checking
//! afterwards that banger left nothing behind (taps, nft table, VMM processes, leases, files).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::process::Command;
use std::time::{Duration, Instant};

use banger_e2e::*;

fn vm_env() -> Env {
    vm_env_with_resolv_conf(None)
}

/// `vm_env`, with the daemon's /etc/resolv.conf replaced by `resolv_conf` (it must be in place
/// before the daemon starts, which registering the image does).
fn vm_env_with_resolv_conf(resolv_conf: Option<&str>) -> Env {
    let env = Env::with_netns();
    if let Some(text) = resolv_conf {
        env.netns.as_ref().unwrap().set_resolv_conf(text);
    }
    assert!(
        agent_bin().is_some(),
        "the static guest agent is missing: run `make agent` (make test does)"
    );
    env.write_config("vmm = \"qemu\"\n");
    register_slim(&env, "slim");
    env
}

fn create(env: &Env, name: &str) -> serde_json::Value {
    env.ok(small_vm(name, "slim", &[]));
    env.ok(["vm", "show", name, "--json"]).json()
}

/// `banger vm exec VM -- sh -c SCRIPT`, which must succeed.
fn exec_sh(env: &Env, vm: &str, script: &str) -> Out {
    env.ok(["vm", "exec", vm, "--", "sh", "-c", script])
}

/// Runs a command inside the env's network namespace.
fn in_ns(env: &Env, args: &[&str]) -> String {
    let ns = env.netns.as_ref().unwrap();
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn taps(env: &Env) -> Vec<String> {
    in_ns(env, &["ip", "-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .filter(|n| n.starts_with("bg-"))
        .collect()
}

fn vmm_pids(env: &Env) -> Vec<i32> {
    env.netns
        .as_ref()
        .unwrap()
        .pids()
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .map(|c| c.trim().starts_with("qemu"))
                .unwrap_or(false)
        })
        .collect()
}

fn assert_nothing_left(env: &Env) {
    assert_eq!(taps(env), Vec::<String>::new(), "taps left behind");
    let tables = in_ns(env, &["nft", "list", "tables"]);
    assert!(
        !tables.contains("banger"),
        "nft table left behind: {tables}"
    );
    assert_eq!(
        vmm_pids(env),
        Vec::<i32>::new(),
        "VMM processes left behind"
    );
    let vms = env.ok(["vm", "list", "--json"]).json();
    assert_eq!(vms.as_array().unwrap().len(), 0, "VMs (leases) left: {vms}");
    let dir = env.state_dir().join("vms");
    assert_eq!(
        tree_listing(&dir),
        Vec::<String>::new(),
        "VM files left in {}",
        dir.display()
    );
    let run = env.state_dir().join("run/vms");
    assert_eq!(
        tree_listing(&run),
        Vec::<String>::new(),
        "run files left in {}",
        run.display()
    );
}

#[test]
fn a_start_fails_while_another_program_holds_the_dns_port() {
    if !e2e_enabled() {
        return;
    }
    let env = vm_env();
    // Another user's program holds the port banger's port-53 redirect points at (on every
    // address, so also on the bridge address once the bridge exists). It is in the test's
    // namespace, so the namespace's removal kills it whatever happens.
    let ns = env.netns.as_ref().unwrap();
    let mut squatter = ns
        .wrap(std::path::Path::new("python3"))
        .args([
            "-c",
            "import socket,time; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); \
             s.bind(('0.0.0.0',10053)); print('bound',flush=True); time.sleep(600)",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(squatter.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "bound");

    let out = env.banger(small_vm("squat", "slim", &[]));
    assert!(!out.success(), "{out}");
    assert!(
        out.stderr.contains("cannot serve DNS for VM squat"),
        "{out}"
    );
    assert!(out.stderr.contains("port 10053"), "{out}");
    // No VM ran and no redirect points at the other program.
    assert_nothing_left(&env);
    let _ = squatter.kill();
    let _ = squatter.wait();
}

#[test]
fn create_ssh_exec_restart_keeps_root_and_delete_removes_everything() {
    if !e2e_enabled() {
        return;
    }
    let env = vm_env();
    let vm = create(&env, "web");
    assert_eq!(vm["state"], "running", "{vm}");
    assert_eq!(vm["vmm"], "qemu", "{vm}");

    let out = env.ok(["vm", "ssh", "web", "--", "uname", "-a"]);
    assert!(out.stdout.contains("Linux web "), "{out}");
    assert!(
        out.stdout.contains("cloud-amd64"),
        "guest kernel expected: {out}"
    );

    let out = env.banger([
        "vm",
        "exec",
        "web",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 7",
    ]);
    assert_eq!(out.status, Some(7), "{out}");
    assert_eq!(out.stdout, "out\n");
    assert_eq!(out.stderr, "err\n");

    // stdin from a pipe reaches the command, all of it (1 MiB, checked by digest).
    let input: Vec<u8> = (0..1024 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut child = env
        .cmd(["vm", "exec", "web", "--", "sha256sum"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&input).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let want = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&input))
    };
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next(),
        Some(want.as_str())
    );

    // With -n the command gets an empty stdin even from a pipe.
    let mut child = env
        .cmd(["vm", "exec", "-n", "web", "--", "wc", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"not for the command\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0", "{out:?}");

    // Ctrl-C reaches the command as SIGINT; its status (128 + 2) comes back.
    let mut child = env
        .cmd(["vm", "exec", "web", "--", "sleep", "120"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::SIGINT,
    )
    .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "Ctrl-C was not passed on"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(130));

    exec_sh(&env, "web", "echo kept > /root/marker && sync");
    env.ok(["vm", "stop", "web"]);
    let stopped = env.ok(["vm", "show", "web", "--json"]).json();
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert_eq!(
        taps(&env),
        Vec::<String>::new(),
        "a stopped VM keeps no tap"
    );
    env.ok(["vm", "start", "web"]);
    let out = env.ok(["vm", "exec", "web", "--", "cat", "/root/marker"]);
    assert_eq!(out.stdout, "kept\n", "{out}");
    let out = env.ok(["vm", "logs", "web"]);
    assert!(
        out.stdout.contains("Linux version"),
        "console log lacks the kernel banner"
    );
    // `vm logs -f` keeps streaming: a line the guest writes to its console after the command
    // started shows up.
    let mut follow = env
        .cmd(["vm", "logs", "-f", "web"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_secs(1));
    exec_sh(&env, "web", "echo banger-follow-marker > /dev/console");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = false;
    while !seen && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            seen = line.contains("banger-follow-marker");
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(
        seen,
        "`vm logs -f` did not show a line written after it started"
    );

    // Plain OpenSSH through the managed ssh_config: `ssh web.vm`, no options. OpenSSH reads
    // ~/.ssh/config from the passwd home (/root here), not $HOME, so the test runs ssh in a private
    // mount namespace where the env's HOME is mounted over /root; the real /root is untouched.
    env.ok(["ssh-config", "--install"]);
    let plain_ssh = |cmd: &str| {
        let ns = env.netns.as_ref().unwrap();
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                "unshare",
                "--mount",
                "--propagation",
                "private",
            ])
            .args([
                "sh",
                "-c",
                "mount --bind \"$1\" /root && exec ssh web.vm \"$2\"",
                "sh",
            ])
            .arg(env.home())
            .arg(cmd)
            .env("HOME", "/root")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let out = plain_ssh("hostname");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "web",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A guest whose host key changed is refused: the key is pinned, never trusted on first use.
    exec_sh(
        &env,
        "web",
        "rm -f /etc/ssh/ssh_host_ed25519_key* && ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key && systemctl restart ssh",
    );
    let out = plain_ssh("hostname");
    assert_ne!(
        out.status.code(),
        Some(0),
        "a swapped host key must be refused"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("IDENTIFICATION HAS CHANGED"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = env.banger(["vm", "ssh", "web", "--", "hostname"]);
    assert_eq!(out.status, Some(255), "vm ssh refuses it too: {out}");

    let out = env.banger(["vm", "delete", "web"]);
    assert_ne!(
        out.status,
        Some(0),
        "deleting a running VM needs --force: {out}"
    );
    assert!(out.stderr.contains("--force"), "{out}");
    env.ok(["vm", "delete", "--force", "web"]);
    assert_nothing_left(&env);

    // Bad input: unknown image, invalid name, name in use.
    let out = env.banger([
        "vm", "create", "--image", "nope", "--memory", "512", "--disk", "256M",
    ]);
    assert_eq!(out.status, Some(70), "{out}");
    assert!(out.stderr.contains("slim"), "should list images: {out}");
    let out = env.banger(["vm", "create", "--name", "Bad_Name", "--image", "slim"]);
    assert_eq!(out.status, Some(2), "{out}");
    let create_web = small_vm("web", "slim", &["--no-start"]);
    env.ok(create_web.clone());
    let out = env.banger(create_web);
    assert_eq!(out.status, Some(1), "a name in use is refused: {out}");
    assert!(out.stderr.contains("already exists"), "{out}");
    env.ok(["vm", "delete", "web"]);

    // A VMM that cannot run: a clear error and no half-made VM.
    env.write_config("vmm = \"firecracker\"\nfirecracker_bin = \"/nonexistent/firecracker\"\n");
    env.ok(["daemon", "restart"]);
    let out = env.banger([
        "vm", "create", "--name", "fc", "--image", "slim", "--memory", "512", "--disk", "256M",
    ]);
    assert_eq!(out.status, Some(72), "{out}");
    assert!(out.stderr.contains("firecracker"), "{out}");
    assert_nothing_left(&env);
}

/// `dig` inside the env's namespace, one try with a short timeout.
fn dig(env: &Env, args: &[&str]) -> String {
    let mut argv = vec!["dig", "+time=2", "+tries=1"];
    argv.extend_from_slice(args);
    in_ns(env, &argv)
}

fn dig_status(out: &str) -> &str {
    out.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("<no answer>")
}

/// A dnsmasq inside the namespace on 127.0.0.1:53, standing in for the host's resolver (tests may
/// not query a real one). It knows one name, `upstream.test`.
struct FakeUpstream(std::process::Child);

impl FakeUpstream {
    fn start(env: &Env) -> Self {
        let ns = env.netns.as_ref().unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "dnsmasq", "--keep-in-foreground"])
            .args([
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
            ])
            .args(["--listen-address=127.0.0.1", "--port=53", "--pid-file="])
            .arg("--address=/upstream.test/192.0.2.7")
            .spawn()
            .expect("dnsmasq runs (package dnsmasq-base)");
        let up = FakeUpstream(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !dig(env, &["@127.0.0.1", "+short", "upstream.test"]).contains("192.0.2.7") {
            assert!(Instant::now() < deadline, "dnsmasq did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        up
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends raw bytes to the bridge's DNS port from inside the namespace (bash's /dev/udp and
/// /dev/tcp), for packets no resolver client would build.
fn send_raw(env: &Env, gateway: &str, proto: &str, bytes: &[u8]) {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), bytes).unwrap();
    in_ns(
        env,
        &[
            "bash",
            "-c",
            &format!("cat {} > /dev/{proto}/{gateway}/53", f.path().display()),
        ],
    );
}

#[test]
fn two_vms_reach_each_other_by_name_and_crashes_are_noticed_and_recovered() {
    if !e2e_enabled() {
        return;
    }
    let env = vm_env_with_resolv_conf(Some("nameserver 127.0.0.1\n"));
    let _upstream = FakeUpstream::start(&env);
    let a = create(&env, "alpha");
    // beta has alpha's image and shape, so it starts from the warm snapshot alpha's create
    // kept: restored, not booted, yet a machine of its own, whose host key is its own and is
    // the one pinned for it (ssh checks it).
    let made = env.ok(small_vm("beta", "slim", &[]));
    assert!(
        made.stderr.contains("warm start from snapshot warm-"),
        "{made}"
    );
    let b = env.ok(["vm", "show", "beta", "--json"]).json();
    let facts = |vm: &str| {
        env.ok([
            "vm",
            "ssh",
            vm,
            "--",
            "cut -d' ' -f1,2 /etc/ssh/ssh_host_ed25519_key.pub; cat /etc/machine-id; hostname; findmnt -no SOURCE /root",
        ])
        .stdout
    };
    let (fa, fb) = (facts("alpha"), facts("beta"));
    let (fa, fb): (Vec<&str>, Vec<&str>) = (fa.lines().collect(), fb.lines().collect());
    assert_eq!(fb.len(), 4, "{fb:?}");
    assert_ne!(fa[0], fb[0], "alpha and beta share a host key");
    assert_ne!(fa[1], fb[1], "alpha and beta share a machine-id");
    assert_eq!((fa[2], fb[2]), ("alpha", "beta"));
    assert_eq!(
        fb[3], "/dev/vdb",
        "beta's work disk is not mounted at /root"
    );
    let pinned = std::fs::read_to_string(
        std::path::Path::new(b["dir"].as_str().unwrap()).join("ssh_host_ed25519_key.pub"),
    )
    .unwrap();
    assert!(pinned.starts_with(fb[0]), "{pinned} vs {}", fb[0]);
    // A snapshot taken by hand of a guest with sshd: the VM made from it answers ssh by its
    // own name with its own pinned key, and is neither alpha nor beta.
    env.ok(["vm", "snapshot", "alpha", "--name", "alpha-now"]);
    env.ok(["vm", "create", "--from", "alpha-now", "--name", "gamma"]);
    let fg = facts("gamma");
    let fg: Vec<&str> = fg.lines().collect();
    assert_eq!(fg.len(), 4, "{fg:?}");
    assert_eq!(fg[2], "gamma");
    for (other, f) in [("alpha", &fa), ("beta", &fb)] {
        assert_ne!(fg[0], f[0], "gamma shares {other}'s host key");
        assert_ne!(fg[1], f[1], "gamma shares {other}'s machine-id");
    }
    env.ok(["vm", "delete", "--force", "gamma"]);
    env.ok(["snapshot", "delete", "alpha-now"]);
    assert_ne!(a["ip"], b["ip"]);
    let a_ip = a["ip"].as_str().unwrap();
    let b_ip = b["ip"].as_str().unwrap();
    // bash, not sh: /dev/tcp is a bash feature.
    env.ok([
        "vm",
        "exec",
        "alpha",
        "--",
        "bash",
        "-c",
        &format!("echo > /dev/tcp/{b_ip}/22"),
    ]);

    let status = env.ok(["daemon", "status", "--json"]).json();
    assert_eq!(status["daemon"]["dns"]["serving"], true, "{status}");
    assert_eq!(status["daemon"]["dns"]["names"], 2, "{status}");
    assert_eq!(
        status["daemon"]["dns"]["address"], "172.16.0.1:53",
        "{status}"
    );

    // `.vm` DNS on the bridge address, from the host side, over UDP and TCP.
    let gw = "172.16.0.1";
    let at_gw = format!("@{gw}");
    let out = dig(&env, &[&at_gw, "alpha.vm"]);
    assert_eq!(dig_status(&out), "NOERROR", "{out}");
    assert!(out.contains(&format!("IN\tA\t{a_ip}")), "{out}");
    let out = dig(&env, &[&at_gw, "+tcp", "+short", "beta.vm"]);
    assert_eq!(out.trim(), b_ip);
    assert_eq!(dig_status(&dig(&env, &[&at_gw, "nope.vm"])), "NXDOMAIN");
    // Nothing of banger answers on any other address, nor on its internal port there.
    for other in [
        vec!["@127.0.0.1", "-p", "10053"],
        vec!["@127.0.0.1", "-p", "53"],
    ] {
        let mut args = other.clone();
        args.push("alpha.vm");
        let out = dig(&env, &args);
        assert!(!out.contains(a_ip), "answered on {other:?}: {out}");
    }
    // From a guest: names of other VMs, and other names forwarded to the host's resolver.
    let out = env.ok(["vm", "exec", "alpha", "--", "getent", "hosts", "beta.vm"]);
    assert!(out.stdout.starts_with(b_ip), "{out}");
    let out = env.ok([
        "vm",
        "exec",
        "alpha",
        "--",
        "getent",
        "hosts",
        "upstream.test",
    ]);
    assert!(out.stdout.starts_with("192.0.2.7"), "{out}");
    // Garbage, a name of 1000 labels and a 10x burst leave the server answering.
    send_raw(&env, gw, "udp", b"\x00");
    send_raw(&env, gw, "udp", &[0u8; 12]);
    let mut long = vec![0xab, 0xcd, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
    for _ in 0..1000 {
        long.extend_from_slice(&[1, b'a']);
    }
    long.extend_from_slice(&[2, b'v', b'm', 0, 0, 1, 0, 1]);
    send_raw(&env, gw, "udp", &long);
    let mut framed = (long.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&long);
    send_raw(&env, gw, "tcp", &framed);
    let burst = in_ns(
        &env,
        &[
            "bash",
            "-c",
            &format!(
                "for i in $(seq 10); do dig +time=2 +tries=1 +short @{gw} beta.vm & done; wait"
            ),
        ],
    );
    assert_eq!(
        burst.lines().filter(|l| l.trim() == b_ip).count(),
        10,
        "burst: {burst}"
    );

    // kill -9 of a VM's QEMU: noticed within seconds, tap released.
    let pid = a["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = env.ok(["vm", "show", "alpha", "--json"]).json();
        if now["state"] == "stopped" && !taps(&env).contains(&a["tap"].as_str().unwrap().to_owned())
        {
            break;
        }
        assert!(Instant::now() < deadline, "VMM death not noticed: {now}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // kill -9 of the daemon: the next call starts a new one that re-adopts beta.
    let daemon = env.daemon_pid().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon),
        nix::sys::signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let list = env.ok(["vm", "list", "--json"]).json();
    assert_ne!(env.daemon_pid(), Some(daemon));
    let beta = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "beta")
        .unwrap();
    assert_eq!(beta["state"], "running", "{list}");
    let out = env.ok(["vm", "ssh", "beta", "--", "hostname"]);
    assert_eq!(out.stdout.trim(), "beta");
    // The new daemon serves names again for the VM it re-adopted.
    let out = dig(&env, &[&at_gw, "+short", "beta.vm"]);
    assert_eq!(out.trim(), b_ip);

    // A deleted VM's name is gone at once while the bridge stays for beta.
    env.ok(["vm", "delete", "--force", "alpha"]);
    let out = dig(&env, &[&at_gw, "alpha.vm"]);
    assert_eq!(dig_status(&out), "NXDOMAIN", "{out}");
    env.ok(["vm", "delete", "--force", "beta"]);
    assert_nothing_left(&env);
    let status = env.ok(["daemon", "status", "--json"]).json();
    assert_eq!(status["daemon"]["dns"]["serving"], false, "{status}");
    // With the bridge gone, nothing listens on its address any more.
    let out = dig(&env, &[&at_gw, "beta.vm"]);
    assert_eq!(dig_status(&out), "<no answer>", "{out}");
}
