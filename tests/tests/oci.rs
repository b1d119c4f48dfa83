//! OCI images end to end, in a private network namespace: a real registry on the namespace's
//! loopback, a busybox image with no systemd and no sshd pulled from it, booted on QEMU (TCG)
//! with banger's generic kernel and the agent as PID 1. Commands, the image's Env and
//! WorkingDir, orphan reaping, a terminal session through the agent (driven by tmux), a
//! workspace copy without sshd, a clean file system after `vm stop`, credentials from a Docker
//! config, and nothing left behind.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use banger_e2e::oci::*;
use banger_e2e::*;

fn oci_env() -> Env {
    let env = Env::with_netns();
    assert!(
        agent_bin().is_some(),
        "the static guest agent is missing: run `make agent` (make test does)"
    );
    require_oci_tools();
    env.write_config(
        "vmm = \"qemu\"\n[vm_defaults]\nvcpu = 1\nmemory_mib = 256\ndisk_size = \"128M\"\n",
    );
    register_generic_kernel(&env);
    env
}

fn exec_sh(env: &Env, vm: &str, script: &str) -> Out {
    env.banger(["vm", "exec", vm, "--", "sh", "-c", script])
}

fn e2fsck_clean(image: &Path) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "e2fsck -fn {} is not clean:\n{}{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A tmux server of its own inside the env's network namespace, killed on drop.
struct Tmux {
    socket: PathBuf,
    netns: String,
}

impl Tmux {
    /// Starts `banger ARGS` in a new 100x30 session. A wrapper script runs it and then prints
    /// `banger-exit-STATUS` and, when the terminal's settings are what they were before,
    /// `terminal-restored`.
    fn start(env: &Env, args: &[&str]) -> Self {
        let socket = env.home().join("tmux.sock");
        // tmux starts the command with the server's environment: the script carries banger's.
        let script = env.home().join("session.sh");
        let cmd = env.cmd(args);
        let mut text = String::from("#!/bin/sh\nbefore=$(stty -g)\nenv");
        for (k, v) in cmd.get_envs() {
            if let Some(v) = v {
                text.push_str(&format!(
                    " {}='{}'",
                    k.to_string_lossy(),
                    v.to_string_lossy()
                ));
            }
        }
        text.push_str(&format!(" '{}'", bin("banger").display()));
        for a in args {
            text.push_str(&format!(" '{a}'"));
        }
        text.push_str(
            "\nrc=$?\n[ \"$(stty -g)\" = \"$before\" ] && echo terminal-restored\necho banger-exit-$rc\nsleep 600\n",
        );
        std::fs::write(&script, text).unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let netns = env.netns.as_ref().unwrap().name.clone();
        let t = Tmux { socket, netns };
        let out = t
            .tmux(&["new-session", "-d", "-x", "100", "-y", "30"])
            .arg(&script)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tmux: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        t
    }

    fn tmux(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns, "tmux", "-S"])
            .arg(&self.socket)
            .args(args);
        c
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.tmux(args).output().unwrap();
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.ok(&["capture-pane", "-p", "-J", "-S", "-200"])
    }

    /// Types `text` and Enter.
    fn line(&self, text: &str) {
        self.ok(&["send-keys", "-l", text]);
        self.ok(&["send-keys", "Enter"]);
    }

    fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.screen();
            if s.contains(needle) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{needle:?} never appeared on the terminal:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.tmux(&["kill-server"]).output();
    }
}

#[test]
fn busybox_image_boots_with_the_agent_as_init_and_does_sessions_and_workspaces_without_sshd() {
    if !e2e_enabled() {
        return;
    }
    let env = oci_env();
    let registry = Registry::start(env.netns.as_ref(), None);
    let image = busybox_image(&[("srv/hello.txt", "hello from the image\n")]);
    registry.push(&image.layout, &image.tag, "test/busybox:1", None);
    let reference = format!("{}/test/busybox:1", registry.host());

    // Like `docker run`, `vm run` pulls an image reference it does not have yet.
    let out = env.banger([
        "vm",
        "run",
        "--rm",
        "--image",
        &reference,
        "--",
        "cat",
        "/etc/motd",
    ]);
    assert!(out.success(), "vm run of a registry image failed:\n{out}");
    assert_eq!(out.stdout, "layer 2\n", "{out}");
    let images = env.ok(["image", "list", "--json"]).json();
    let img = images
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["source"] == "oci")
        .unwrap_or_else(|| panic!("no OCI image in the store: {images}"));
    assert_eq!(img["oci"]["reference"], reference.as_str());
    assert!(
        img["oci"]["digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:"),
        "{img}"
    );
    assert_eq!(img["boot"], "agent");
    assert_eq!(img["kernel"], "generic");
    let name = img["name"].as_str().unwrap().to_owned();
    let listing = env.ok(["image", "list"]).stdout;
    assert!(
        listing.contains("oci") && listing.contains(&reference) && listing.contains("sha256:"),
        "image list does not show the source, reference and digest:\n{listing}"
    );

    // Pulling an unchanged reference again finds the image current.
    let again = env.ok(["image", "pull", &reference]);
    assert!(again.stderr.contains("up to date"), "{again}");
    assert_eq!(env.ok(["image", "list", "--json"]).json(), images);

    env.ok(["vm", "create", "--name", "bb", "--image", &name]);
    let show = env.ok(["vm", "show", "bb", "--json"]).json();
    assert_eq!(show["ssh"], false, "an image without sshd: {show}");

    // The image's Env and WorkingDir, its layers applied in order, banger's per-VM settings.
    let out = exec_sh(
        &env,
        "bb",
        "echo $FOO; pwd; cat /etc/motd hello.txt; test -e /var/lib/gone && echo present || echo gone; hostname; grep -c bb /etc/hosts",
    );
    assert!(out.success(), "{out}");
    assert_eq!(
        out.stdout, "bar\n/srv\nlayer 2\nhello from the image\ngone\nbb\n1\n",
        "{out}"
    );
    assert_eq!(exec_sh(&env, "bb", "exit 7").status, Some(7));
    let pid1 = exec_sh(&env, "bb", "cat /proc/1/cmdline | tr '\\0' ' '");
    assert!(
        pid1.stdout.starts_with("/init"),
        "PID 1 is not the agent: {pid1}"
    );
    let mounts = exec_sh(&env, "bb", "cat /proc/mounts").stdout;
    for m in [
        " / ext4 ",
        " /proc proc ",
        " /sys sysfs ",
        " /dev devtmpfs ",
        " /dev/pts devpts ",
        " /root ext4 ",
        " /sys/fs/cgroup cgroup2 ",
    ] {
        assert!(mounts.contains(m), "{m:?} is not mounted:\n{mounts}");
    }

    // Orphans are reaped by PID 1.
    assert!(exec_sh(&env, "bb", "(sleep 1 &) ; exit 0").success());
    std::thread::sleep(Duration::from_secs(3));
    let ps = exec_sh(&env, "bb", "ps -o stat,comm").stdout;
    assert!(
        !ps.lines().any(|l| l.trim_start().starts_with('Z')),
        "a zombie was left:\n{ps}"
    );

    // The guest reaches the host's DNS and nothing else of the host, and never a metadata
    // address: a real guest's packets, through its real tap, against banger's real tables.
    let ns = env.netns.as_ref().unwrap();
    let host = |args: &[&str]| {
        let ok = ns
            .wrap(Path::new(args[0]))
            .args(&args[1..])
            .status()
            .unwrap()
            .success();
        assert!(ok, "{args:?} failed in the test's namespace");
    };
    host(&["ip", "addr", "add", "169.254.169.254/32", "dev", "lo"]);
    let mut service = ns
        .wrap(Path::new("python3"))
        .args(["-c", "import socket,time; s=socket.socket(); s.bind(('0.0.0.0',8080)); s.listen(); time.sleep(600)"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let reaches = |addr: &str, port: u16| {
        exec_sh(&env, "bb", &format!("nc -w 3 {addr} {port} </dev/null")).success()
    };
    assert!(
        reaches("172.16.0.1", 53),
        "DNS over TCP on the bridge address stays open"
    );
    assert!(
        !reaches("172.16.0.1", 8080),
        "the guest reached a host service"
    );
    assert!(
        !reaches("169.254.169.254", 8080),
        "the guest reached a metadata address"
    );
    let _ = service.kill();
    let _ = service.wait();

    // A guest writes 1.5 GB to a reader that does not read for 30 s: the output waits in the
    // guest (its command blocks on the full pipe: it has written only what the buffers along
    // the way hold) and the daemon's memory stays bounded. Under TCG the agent moves a few
    // MB/s, so without backpressure the command would have written about 80 MB by then, all
    // of it queued in the daemon. Then the reader reads a while (the flow resumes) and goes
    // away: the command in the guest ends with it instead of waiting for a reader forever.
    let daemon = env.daemon_pid().expect("the daemon runs");
    let total: u64 = 1_500_000_000;
    let mut flood = env
        .cmd([
            "vm",
            "exec",
            "bb",
            "--",
            "head",
            "-c",
            &total.to_string(),
            "/dev/zero",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(30));
    let wchar = |env: &Env| -> u64 {
        let io = exec_sh(env, "bb", "cat /proc/$(pidof head)/io");
        io.stdout
            .lines()
            .find_map(|l| l.strip_prefix("wchar:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no wchar for head in the guest: {io}"))
    };
    let written = wchar(&env);
    assert!(
        written < 32_000_000,
        "the guest wrote {written} bytes while nobody read them"
    );
    let mut first = vec![0u8; 20_000_000];
    std::io::Read::read_exact(flood.stdout.as_mut().unwrap(), &mut first).unwrap();
    assert!(first.iter().all(|b| *b == 0));
    assert!(wchar(&env) > written, "the command did not go on once read");
    let _ = flood.kill();
    let _ = flood.wait();
    let deadline = Instant::now() + Duration::from_secs(20);
    while exec_sh(&env, "bb", "pidof head").success() {
        assert!(
            Instant::now() < deadline,
            "the guest's command outlived its reader"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let status = std::fs::read_to_string(format!("/proc/{daemon}/status")).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(
        peak_kib < 256 * 1024,
        "the daemon's peak RSS was {} MiB",
        peak_kib / 1024
    );

    // A terminal through the agent: size, resize, Ctrl-C, the exit status.
    let tmux = Tmux::start(&env, &["vm", "ssh", "bb"]);
    tmux.line("stty size; echo marker-$((6*7))");
    let screen = tmux.wait_for("marker-42");
    assert!(
        screen.contains("30 100"),
        "the guest does not see the terminal size:\n{screen}"
    );
    tmux.ok(&["resize-window", "-x", "120", "-y", "40"]);
    std::thread::sleep(Duration::from_millis(500));
    tmux.line("stty size; echo resized-$((1+1))");
    let screen = tmux.wait_for("resized-2");
    assert!(
        screen.contains("40 120"),
        "the resize did not reach the guest:\n{screen}"
    );
    tmux.line("sleep 100");
    std::thread::sleep(Duration::from_secs(1));
    tmux.ok(&["send-keys", "C-c"]);
    tmux.line("echo after-$?");
    tmux.wait_for("after-130");
    tmux.line("exit 3");
    let screen = tmux.wait_for("banger-exit-");
    assert!(
        screen.contains("banger-exit-3"),
        "the session's status is not banger's:\n{screen}"
    );
    assert!(
        screen.contains("terminal-restored"),
        "the terminal was left changed:\n{screen}"
    );
    drop(tmux);

    // A workspace without sshd: the repo goes through the agent.
    let repo_dir = tempfile::tempdir().unwrap();
    let repo = repo_dir.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    std::fs::write(repo.join("data.txt"), "from the host\n").unwrap();
    let out = env.banger([
        "vm".as_ref(),
        "run".as_ref(),
        "--rm".as_ref(),
        "--no-git".as_ref(),
        "--image".as_ref(),
        name.as_ref(),
        repo.as_os_str(),
        "--".as_ref(),
        "sh".as_ref(),
        "-c".as_ref(),
        "pwd; cat data.txt; exit 5".as_ref(),
    ]);
    assert_eq!(out.status, Some(5), "{out}");
    assert_eq!(out.stdout, "/root/repo\nfrom the host\n", "{out}");

    // `vm stop` syncs, unmounts and powers off: both disks are clean afterwards.
    env.ok(["vm", "stop", "bb"]);
    let dir = PathBuf::from(show["dir"].as_str().unwrap());
    e2fsck_clean(&dir.join("root.ext4"));
    e2fsck_clean(&dir.join("work.ext4"));

    // A new push under the same tag: pulling again replaces the image in one step (its old
    // files go), while the VM made from the old one keeps its own disk.
    let newer = busybox_image(&[
        ("srv/hello.txt", "hello from the image\n"),
        ("etc/motd", "layer 3\n"),
    ]);
    registry.push(&newer.layout, &newer.tag, "test/busybox:1", None);
    let replaced = env.ok(["image", "pull", &reference]);
    assert!(replaced.stderr.contains("replacing image"), "{replaced}");
    let after = env.ok(["image", "list", "--json"]).json();
    let img2 = after
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name.as_str())
        .unwrap();
    assert_ne!(img2["oci"]["digest"], img["oci"]["digest"], "{after}");
    let dirs = tree_listing(&env.state_dir().join("images"));
    let top: Vec<&String> = dirs
        .iter()
        .filter(|d| d.ends_with('/') && !d.trim_end_matches('/').contains('/'))
        .collect();
    assert_eq!(
        top.len(),
        1,
        "the old image's files were not removed: {dirs:?}"
    );
    let out = env.ok([
        "vm",
        "run",
        "--rm",
        "--image",
        &name,
        "--",
        "cat",
        "/etc/motd",
    ]);
    assert_eq!(out.stdout, "layer 3\n", "{out}");
    env.ok(["vm", "start", "bb"]);
    assert_eq!(exec_sh(&env, "bb", "cat /etc/motd").stdout, "layer 2\n");
    env.ok(["vm", "stop", "bb"]);

    // Deleting the image drops the cached blobs no image needs any more.
    env.ok(["vm", "delete", "bb"]);
    env.ok(["image", "delete", &name]);
    let blobs = env.home().join(".cache/banger/oci/blobs/sha256");
    assert_eq!(
        tree_listing(&blobs),
        Vec::<String>::new(),
        "blobs left in the cache"
    );
    assert_eq!(
        env.ok(["vm", "list", "--json"])
            .json()
            .as_array()
            .unwrap()
            .len(),
        0
    );
}

#[test]
fn private_registry_needs_the_credentials_from_the_docker_config() {
    if !e2e_enabled() {
        return;
    }
    require_oci_tools();
    let env = Env::with_netns();
    env.write_config("vmm = \"qemu\"\n");
    register_generic_kernel(&env);
    let registry = Registry::start(env.netns.as_ref(), Some(("tester", "s3cret pass")));
    let image = busybox_image(&[]);
    registry.push(
        &image.layout,
        &image.tag,
        "team/base:1",
        Some(("tester", "s3cret pass")),
    );
    let reference = format!("{}/team/base:1", registry.host());

    let out = env.banger(["image", "pull", &reference, "--name", "base"]);
    assert!(
        !out.success(),
        "an anonymous pull from a private registry succeeded:\n{out}"
    );
    assert!(
        out.stderr.contains("401") || out.stderr.contains("unauthorized"),
        "{out}"
    );
    assert!(
        out.stderr.contains("docker login"),
        "no hint about credentials:\n{out}"
    );
    assert!(!out.stderr.contains("s3cret"), "{out}");

    let docker = env.home().join(".docker");
    std::fs::create_dir_all(&docker).unwrap();
    use base64_auth::encode;
    std::fs::write(
        docker.join("config.json"),
        format!(
            "{{\"auths\":{{\"{}\":{{\"auth\":\"{}\"}}}}}}",
            registry.host(),
            encode("tester:s3cret pass")
        ),
    )
    .unwrap();
    let out = env.ok(["image", "pull", &reference, "--name", "base"]);
    assert!(
        !out.stderr.contains("s3cret"),
        "the password was printed:\n{out}"
    );
    let log = std::fs::read_to_string(env.state_dir().join("bangerd.log")).unwrap_or_default();
    assert!(
        !log.contains("s3cret"),
        "the password reached the daemon log"
    );
    let images = env.ok(["image", "list", "--json"]).json();
    assert_eq!(images[0]["name"], "base");
    assert_eq!(images[0]["oci"]["reference"], reference.as_str());
}

/// Base64 for the test's docker config, without another dependency.
mod base64_auth {
    pub fn encode(s: &str) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let b = s.as_bytes();
        let mut out = String::new();
        for chunk in b.chunks(3) {
            let n = (u32::from(chunk[0]) << 16)
                | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
                | u32::from(*chunk.get(2).unwrap_or(&0));
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

#[test]
fn the_generic_kernel_is_fetched_once_and_found_current_when_pulled_again() {
    if !e2e_enabled() {
        return;
    }
    // The shared kernel's own HOME, outside any namespace: `kernel pull generic` asks the
    // Debian mirror, as the first fetch did.
    let k = generic_kernel();
    let home = k.kernel.ancestors().nth(6).unwrap().to_owned();
    let env = Env::persistent(&home);
    let out = env.ok(["kernel", "pull", "generic"]);
    assert!(out.stderr.contains("up to date"), "{out}");
    assert!(k.kernel.is_file() && k.initrd.is_file());
    let kernels = env.ok(["kernel", "list", "--json"]).json();
    assert_eq!(kernels[0]["name"], "generic", "{kernels}");
    assert_eq!(
        kernels[0]["kernel"],
        k.kernel.to_str().unwrap(),
        "{kernels}"
    );
}
