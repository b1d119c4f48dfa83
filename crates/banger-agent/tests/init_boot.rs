//! A real boot of the agent as `/init`: Debian's cloud kernel (through banger-image, as the
//! daemon gets it), its modules initrd plus the per-VM archive, a busybox root disk with no
//! init system, QEMU under TCG started like banger starts it, and the host client driving the
//! guest over the virtio-serial port.
//!
//! Needs root, QEMU, e2fsprogs, busybox-static, gpgv and the Debian mirror the host's apt
//! sources name (the kernel package is cached under `target/banger-test-cache/`). Missing
//! prerequisites fail the test; only `BANGER_E2E_SKIP=1` skips it. Two boots only: TCG is slow.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "init_boot/support.rs"]
mod support;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use banger_agent::host::{wait_ready, AgentClient, CollectedOutput, Endpoint, ExecRequest};
use banger_agent::protocol::ExitStatus;
use support::*;

const VM: &str = "init-boot";

/// The guest's console log, for failure messages.
static CONSOLE: OnceLock<PathBuf> = OnceLock::new();

fn console() -> String {
    CONSOLE
        .get()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default()
}

async fn exec(client: &AgentClient, req: ExecRequest) -> CollectedOutput {
    let what = format!("{:?}", req.argv);
    let run = async {
        client
            .exec(req)
            .await
            .unwrap_or_else(|e| panic!("exec {what}: {e}"))
            .collect()
            .await
            .unwrap_or_else(|e| panic!("exec {what}: {e}"))
    };
    match tokio::time::timeout(Duration::from_secs(60), run).await {
        Ok(out) => out,
        Err(_) => panic!("exec {what}: no exit after 60 s\nconsole:\n{}", console()),
    }
}

async fn sh(client: &AgentClient, script: &str) -> (String, ExitStatus) {
    let out = exec(client, ExecRequest::new(["sh", "-c", script])).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "{script}: stderr {stderr}");
    (String::from_utf8(out.stdout).unwrap(), out.status)
}

#[tokio::test]
async fn the_agent_as_init_boots_an_image_without_init_serves_reaps_and_powers_off() {
    if !boot_test_enabled() {
        return;
    }
    let agent = tokio::task::spawn_blocking(static_agent).await.unwrap();
    let mirror = banger_image::host_debian_mirror()
        .expect("the host's apt sources name no bookworm mirror; the kernel comes from it");
    let dir = tempfile::tempdir().unwrap();
    let kernel = banger_image::kernel::fetch_cloud_kernel(
        &mirror,
        "bookworm",
        &dir.path().join("kernel"),
        &target_dir().join("banger-test-cache/debian-kernel"),
        &banger_image::NoProgress,
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "the Debian kernel: {e}: {:?}",
            std::error::Error::source(&e)
        )
    });

    let root = busybox_root_disk(dir.path());
    let work = work_disk(dir.path());
    let image_json = br#"{"env":["FOO=bar from the image","PATH=/bin"],"working_dir":"/srv/app",
                          "user":null,"entrypoint":null,"cmd":["sh"],"unknown":1}"#;
    let initrd = initrd(dir.path(), &kernel.modules_initrd, &agent, image_json);
    let mut vm = Qemu::start(
        dir.path(),
        &kernel.vmlinuz,
        &initrd,
        &root,
        &work,
        "banger.hostname=init-boot banger.dns=10.0.2.3",
    );

    CONSOLE.set(vm.console.clone()).unwrap();
    let endpoint = Endpoint::VirtioSerial {
        socket: vm.agent_socket.clone(),
    };
    let (client, ready) = match wait_ready(VM, &endpoint, Duration::from_secs(180)).await {
        Ok(r) => r,
        Err(e) => panic!(
            "the agent never answered: {e}\nconsole:\n{}",
            vm.console_text()
        ),
    };
    let boot = vm.started.elapsed();
    assert_eq!(ready.hostname, "init-boot");

    // Exit statuses come back as they are.
    assert_eq!(sh(&client, "exit 3").await.1, ExitStatus::Code(3));
    let (out, status) = sh(&client, "id -u; cat /proc/1/comm").await;
    assert_eq!((out.as_str(), status), ("0\ninit\n", ExitStatus::Code(0)));

    // The image's env and working directory apply (the directory was created for it), with
    // HOME defaulted; the request's own env still wins.
    let (out, _) = sh(&client, "echo \"$FOO|$PATH|$HOME\"; pwd").await;
    assert_eq!(out, "bar from the image|/bin|/root\n/srv/app\n");
    let out = exec(
        &client,
        ExecRequest::new(["sh", "-c", "echo $FOO"])
            .env("FOO", "request")
            .cwd("/"),
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "request\n");

    // What init set up: mounts, links, /tmp, the work disk at /root, resolv.conf and hosts.
    let (mounts, _) = sh(&client, "cat /proc/mounts").await;
    for (target, fstype) in [
        ("/", "ext4"),
        ("/root", "ext4"),
        ("/dev", "devtmpfs"),
        ("/proc", "proc"),
        ("/sys", "sysfs"),
        ("/dev/pts", "devpts"),
        ("/dev/shm", "tmpfs"),
        ("/run", "tmpfs"),
        ("/sys/fs/cgroup", "cgroup2"),
    ] {
        assert!(
            mounts.lines().any(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                f.get(1) == Some(&target) && f.get(2) == Some(&fstype)
            }),
            "{target} ({fstype}) is not mounted:\n{mounts}"
        );
    }
    assert!(
        !mounts.lines().any(|l| l.split(' ').nth(1) == Some("/tmp")),
        "{mounts}"
    );
    let (out, _) = sh(
        &client,
        "stat -c '%a %F' /tmp /root; stat -c %N /dev/fd /dev/stdin; cat /etc/resolv.conf /etc/hosts",
    )
    .await;
    assert!(out.starts_with("1777 directory\n700 directory\n"), "{out}");
    assert!(out.contains("'/dev/fd' -> '/proc/self/fd'\n"), "{out}");
    assert!(out.contains("'/dev/stdin' -> '/proc/self/fd/0'\n"), "{out}");
    assert!(out.contains("nameserver 10.0.2.3\n"), "{out}");
    assert!(
        out.contains("127.0.0.1\tlocalhost\n127.0.1.1\tinit-boot\n"),
        "{out}"
    );

    // The devpts instance serves /dev/ptmx (what terminal sessions will open).
    let (out, _) = sh(&client, "exec 3<>/dev/ptmx; ls /dev/pts").await;
    assert_eq!(out, "0\nptmx\n");

    // An orphaned grandchild is re-parented to PID 1 and reaped: no zombie is left.
    assert_eq!(
        sh(&client, "(sleep 1 &) ; exit 0").await.1,
        ExitStatus::Code(0)
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (ps, _) = sh(&client, "ps -o pid,stat,comm").await;
    let zombies: Vec<&str> = ps
        .lines()
        .skip(1)
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|s| s.starts_with('Z'))
        })
        .collect();
    assert!(zombies.is_empty(), "zombies left behind:\n{ps}");
    assert!(!ps.contains("sleep"), "{ps}");

    // An agent that dies is started again by PID 1, set-up steps and all.
    let (first_agent, _) = sh(&client, "echo $PPID").await;
    let doomed = client
        .exec(ExecRequest::new(["sh", "-c", "kill -9 $PPID"]))
        .await
        .unwrap();
    // The host cannot see an agent die on a serial port; the console says when it did. (A new
    // connection before that would be served by the dying agent.)
    let killed = "init: the agent was killed by SIGKILL; restarting it in 500ms";
    let deadline = Instant::now() + Duration::from_secs(60);
    while !console().contains(killed) {
        assert!(
            Instant::now() < deadline,
            "the agent was not killed\nconsole:\n{}",
            console()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // QEMU serves one connection at a time: this one (the handle holds it too) must go first.
    drop((doomed, client));
    let (client, _) = match wait_ready(VM, &endpoint, Duration::from_secs(60)).await {
        Ok(r) => r,
        Err(e) => panic!(
            "the agent did not come back: {e}\nconsole:\n{}",
            vm.console_text()
        ),
    };
    let (second_agent, _) = sh(&client, "echo $PPID; stat -c %a /root").await;
    assert_ne!(first_agent, second_agent);
    assert!(second_agent.ends_with("\n700\n"), "{second_agent}");

    // The work disk around a warm snapshot: not unmounted while something uses /root, then
    // unmounted (nothing left mounted there) and mounted again with its files and modes.
    let (sleeper, _) = sh(
        &client,
        "echo kept > /root/kept; cd /root && { sleep 120 </dev/null >/dev/null 2>&1 & echo $!; }",
    )
    .await;
    let err = client
        .work_disk(false, Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("something still uses /root"),
        "{err}"
    );
    sh(&client, &format!("kill {}", sleeper.trim())).await;
    // The sleeper lets go of /root as it exits, which may be a moment after the kill.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.work_disk(false, Duration::from_secs(30)).await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline && e.to_string().contains("still uses") => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("unmounting the work disk: {e}\nconsole:\n{}", console()),
        }
    }
    let (mounts, _) = sh(&client, "cat /proc/mounts").await;
    assert!(
        !mounts.lines().any(|l| l.split(' ').nth(1) == Some("/root")),
        "{mounts}"
    );
    assert_eq!(sh(&client, "ls -A /root").await.0, "");
    client
        .work_disk(true, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("mounting the work disk: {e}\nconsole:\n{}", console()));
    let (out, _) = sh(&client, "cat /root/kept; stat -c %a /root").await;
    assert_eq!(out, "kept\n700\n");

    // Power-off: QEMU exits by itself and both disks are clean.
    let asked = Instant::now();
    client.poweroff().await.unwrap();
    let Some(off) = vm.wait_exit(Duration::from_secs(30)) else {
        panic!(
            "QEMU still runs 30 s after poweroff\nconsole:\n{}",
            vm.console_text()
        );
    };
    let console = vm.console_text();
    for line in console.lines().filter(|l| l.contains("banger-agent")) {
        eprintln!("console: {line}");
    }
    eprintln!(
        "init boot: agent ready {boot:.1?} after QEMU started; QEMU gone {:.1?} after poweroff ({off:.1?} of waiting)",
        asked.elapsed()
    );
    assert!(console.contains("init: / remounted read-only"), "{console}");
    assert!(!console.contains("FATAL"), "{console}");
    fsck_clean(&root);
    fsck_clean(&work);

    // A second boot of the same disks (a VM restart): what the first boot created is reused,
    // and QEMU's own graceful stop, the ACPI power button, powers the guest off.
    drop(vm);
    vm = Qemu::start(
        dir.path(),
        &kernel.vmlinuz,
        &initrd,
        &root,
        &work,
        "banger.hostname=init-boot",
    );
    let (client, _) = match wait_ready(VM, &endpoint, Duration::from_secs(180)).await {
        Ok(r) => r,
        Err(e) => panic!(
            "the agent never answered after a restart: {e}\nconsole:\n{}",
            vm.console_text()
        ),
    };
    let (out, _) = sh(&client, "stat -c %a /root; cat /etc/resolv.conf").await;
    assert!(out.starts_with("700\n# Written by banger-agent"), "{out}");
    drop(client);
    let pressed = Instant::now();
    vm.press_power_button();
    let Some(_) = vm.wait_exit(Duration::from_secs(15)) else {
        panic!(
            "QEMU still runs 15 s after the power button\nconsole:\n{}",
            vm.console_text()
        );
    };
    let console = vm.console_text();
    eprintln!(
        "init boot: QEMU gone {:.1?} after the ACPI power button",
        pressed.elapsed()
    );
    assert!(
        console.contains("init: powering off (ACPI power button)"),
        "{console}"
    );
    assert!(console.contains("init: / remounted read-only"), "{console}");
    fsck_clean(&root);
    fsck_clean(&work);
}
