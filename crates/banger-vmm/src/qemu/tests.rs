//! Tests of the QEMU backend against a real `qemu-system-x86_64` running a tiny test guest.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::PROGRAM as QEMU_BIN;
use super::*;
use crate::host::find_in_path;
use crate::testkit::{eventually, write_test_kernel, ProcessGuard, TEST_KERNEL_GREETING};
use crate::{connect_agent, Nic, SnapshotPaths};

fn qemu_binary() -> PathBuf {
    find_in_path(OsStr::new(QEMU_BIN), std::env::var_os("PATH").as_deref()).unwrap_or_else(|| {
        panic!("{QEMU_BIN} is required by this test: apt-get install qemu-system-x86")
    })
}

struct Fixture {
    _dir: tempfile::TempDir,
    cfg: VmConfig,
}

fn fixture(name: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_test_kernel(&d.join("kernel.elf"));
    for disk in ["root.img", "work.img"] {
        let f = std::fs::File::create(d.join(disk)).unwrap();
        f.set_len(1 << 20).unwrap();
    }
    std::fs::create_dir(d.join("run")).unwrap();
    let cfg = VmConfig {
        name: name.into(),
        vcpus: 1,
        memory_mib: 64,
        kernel: d.join("kernel.elf"),
        initrd: None,
        kernel_args: "console=ttyS0".into(),
        root_disk: d.join("root.img"),
        work_disk: d.join("work.img"),
        net: None,
        vsock_cid: None,
        run_dir: d.join("run"),
        console_log: d.join("console.log"),
    };
    Fixture { _dir: dir, cfg }
}

fn backend() -> QemuBackend {
    QemuBackend::new(qemu_binary(), crate::kvm_mode())
}

#[tokio::test]
async fn qemu_boots_a_guest_and_stop_kills_it_after_the_grace_period() {
    let fx = fixture("qemu-real");
    let cfg = &fx.cfg;
    std::fs::write(&cfg.console_log, "previous boot\n").unwrap();

    let handle = backend().start(cfg).await.unwrap();
    let _guard = ProcessGuard::new(handle.pid, handle.pid_start_time);

    assert_eq!(handle.backend, BackendKind::Qemu);
    assert!(crate::process::is_alive(handle.pid, handle.pid_start_time));
    // QEMU runs under its seccomp filter (mode 2: a filter is installed).
    let status = std::fs::read_to_string(format!("/proc/{}/status", handle.pid)).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.split_whitespace().eq(["Seccomp:", "2"])),
        "QEMU runs without its seccomp sandbox:\n{status}"
    );
    assert_eq!(handle.api_socket, Some(cfg.run_dir.join(QMP_SOCKET)));
    assert_eq!(
        handle.agent,
        AgentEndpoint::VirtioSerial {
            socket: cfg.run_dir.join(AGENT_SOCKET)
        }
    );
    assert_eq!(
        std::fs::read_to_string(cfg.run_dir.join(PID_FILE)).unwrap(),
        format!("{}\n", handle.pid)
    );

    // The guest ran and its serial output was appended to the console log.
    let console = cfg.console_log.clone();
    let booted = eventually(20, || {
        std::fs::read_to_string(&console)
            .unwrap_or_default()
            .contains(TEST_KERNEL_GREETING)
    })
    .await;
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(booted, "guest output missing from console log: {text:?}");
    assert!(
        text.starts_with("previous boot\n"),
        "console log was truncated: {text:?}"
    );
    // `append=on` opens it with O_APPEND, which lets the daemon truncate it under QEMU.
    assert!(crate::testkit::holds_open_for_append(
        handle.pid,
        &cfg.console_log
    ));

    // The agent's virtio-serial port is served on the host socket.
    connect_agent(&handle.agent).await.unwrap();

    // A daemon that died before recording the handle finds the VMM again by its run directory;
    // the other backend does not mistake it for one of its own.
    let left = backend().leftover(&cfg.name, &cfg.run_dir).unwrap();
    assert_eq!(
        (left.pid, left.pid_start_time),
        (handle.pid, handle.pid_start_time)
    );
    let firecracker = crate::firecracker::FirecrackerBackend::new("firecracker".into());
    assert_eq!(firecracker.leftover(&cfg.name, &cfg.run_dir), None);

    // A daemon restart re-adopts the VM from the persisted handle, with a backend of its own.
    let persisted = serde_json::to_string(&handle).unwrap();
    let adopted: VmHandle = serde_json::from_str(&persisted).unwrap();
    assert!(crate::process::is_alive(
        adopted.pid,
        adopted.pid_start_time
    ));

    // The test guest ignores the ACPI power button: stop waits the grace period, then kills.
    let grace = Duration::from_millis(800);
    let t = Instant::now();
    backend().stop(&adopted, grace).await.unwrap();
    assert!(
        t.elapsed() >= grace,
        "did not wait for the guest: {:?}",
        t.elapsed()
    );
    assert!(!crate::process::is_alive(
        adopted.pid,
        adopted.pid_start_time
    ));
    assert!(
        crate::process::proc_stat(handle.pid).is_none(),
        "QEMU was not reaped"
    );
    for f in [PID_FILE, QMP_SOCKET, AGENT_SOCKET] {
        assert!(!cfg.run_dir.join(f).exists(), "{f} left behind");
    }
    // Stopping again is a no-op.
    backend().stop(&adopted, grace).await.unwrap();
}

#[tokio::test]
async fn qemu_can_start_again_in_the_same_run_dir() {
    let fx = fixture("qemu-restart");
    let b = backend();
    for _ in 0..2 {
        let handle = b.start(&fx.cfg).await.unwrap();
        let _guard = ProcessGuard::new(handle.pid, handle.pid_start_time);
        b.stop(&handle, Duration::ZERO).await.unwrap();
        assert!(!crate::process::is_alive(handle.pid, handle.pid_start_time));
    }
}

#[tokio::test]
async fn qemu_exiting_during_start_reports_its_own_error_and_status() {
    let fx = fixture("qemu-bad-kernel");
    std::fs::write(&fx.cfg.kernel, b"this is not a kernel").unwrap();
    let err = backend().start(&fx.cfg).await.unwrap_err();
    let msg = err.report();
    assert!(matches!(err, VmmError::ExitedDuringStart { .. }), "{msg}");
    assert!(
        msg.contains("VM qemu-bad-kernel: qemu exited during start-up (exit status 1)"),
        "{msg}"
    );
    assert!(
        msg.contains("invalid kernel header"),
        "QEMU's stderr missing: {msg}"
    );
    assert!(msg.contains("hint:"), "{msg}");
}

#[tokio::test]
async fn missing_inputs_are_reported_before_spawning() {
    let fx = fixture("qemu-missing");
    let mut cfg = fx.cfg.clone();
    cfg.initrd = Some(cfg.run_dir.join("no-initrd.img"));
    let err = backend().start(&cfg).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "VM qemu-missing: initrd {} does not exist",
            cfg.run_dir.join("no-initrd.img").display()
        )
    );
    assert!(!cfg.run_dir.join(PID_FILE).exists());
}

#[tokio::test]
async fn missing_qemu_binary_is_a_spawn_error_naming_it() {
    let fx = fixture("qemu-no-binary");
    let b = QemuBackend::new(
        PathBuf::from("/nonexistent/qemu-system-x86_64"),
        KvmMode::Absent,
    );
    let err = b.start(&fx.cfg).await.unwrap_err();
    let msg = err.report();
    assert!(
        msg.contains("cannot start /nonexistent/qemu-system-x86_64"),
        "{msg}"
    );
}

/// QEMU attached to a tap inside a fresh network namespace, so the host's interfaces are never
/// touched. Needs root (for `ip netns`).
#[tokio::test]
async fn qemu_attaches_the_tap_inside_a_private_netns() {
    let ns = NetnsGuard::new("banger-vmm-test");
    let fx = fixture("qemu-net");
    let dir = fx.cfg.run_dir.parent().unwrap().to_path_buf();
    ns.ip(&["tuntap", "add", "dev", "bg-test0", "mode", "tap"]);

    // QEMU runs inside the namespace: `ip netns exec` execs it, keeping the pid.
    let wrapper = dir.join("qemu-in-netns");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec ip netns exec {} {} \"$@\"\n",
            ns.name,
            qemu_binary().display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();

    let mut cfg = fx.cfg.clone();
    cfg.net = Some(Nic {
        tap: banger_net::TapName::parse("bg-test0").unwrap(),
        mac: "06:00:ac:10:00:02".parse().unwrap(),
    });
    let b = QemuBackend::new(wrapper, crate::kvm_mode());
    let handle = b.start(&cfg).await.unwrap();
    let _guard = ProcessGuard::new(handle.pid, handle.pid_start_time);

    // QEMU holds the tap open: one of its tun fds is attached to our interface.
    let attached = std::fs::read_dir(format!("/proc/{}/fd", handle.pid))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| std::fs::read_link(e.path()).ok().as_deref() == Some(Path::new("/dev/net/tun")))
        .any(|e| {
            let info = format!(
                "/proc/{}/fdinfo/{}",
                handle.pid,
                e.file_name().to_string_lossy()
            );
            std::fs::read_to_string(info)
                .unwrap_or_default()
                .contains("iff:\tbg-test0")
        });
    assert!(attached, "QEMU has no fd attached to tap bg-test0");
    b.stop(&handle, Duration::ZERO).await.unwrap();
}

/// A named network namespace, deleted on drop.
struct NetnsGuard {
    name: String,
}

impl NetnsGuard {
    fn new(prefix: &str) -> NetnsGuard {
        let name = format!("{prefix}-{}", std::process::id());
        let st = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip (iproute2) is required by this test");
        assert!(
            st.success(),
            "ip netns add {name} failed (this test needs root)"
        );
        NetnsGuard { name }
    }

    fn ip(&self, args: &[&str]) {
        let st = std::process::Command::new("ip")
            .args(["netns", "exec", &self.name, "ip"])
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "ip {args:?} in netns {} failed", self.name);
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A shell script that runs QEMU inside `ns`: `ip netns exec` execs it, keeping the pid.
fn qemu_in_netns(ns: &NetnsGuard, dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let wrapper = dir.join("qemu-in-netns");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec ip netns exec {} {} \"$@\"\n",
            ns.name,
            qemu_binary().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    wrapper
}

/// Whether process `pid` holds a tun descriptor attached to `tap`.
fn holds_tap(pid: i32, tap: &str) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| std::fs::read_link(e.path()).ok().as_deref() == Some(Path::new("/dev/net/tun")))
        .any(|e| {
            let info = format!("/proc/{pid}/fdinfo/{}", e.file_name().to_string_lossy());
            std::fs::read_to_string(info)
                .unwrap_or_default()
                .contains(&format!("iff:\t{tap}"))
        })
}

fn counters(console: &Path) -> Vec<u32> {
    crate::testkit::counter_lines(&std::fs::read_to_string(console).unwrap_or_default())
}

fn last_counter(console: &Path) -> Option<u32> {
    counters(console).last().copied()
}

/// A counting guest with a NIC is snapshotted while it runs, and restored into a second QEMU
/// with its own run directory, disks, console, tap and MAC, inside a private netns: the
/// restored guest counts on from where it was paused, without booting again, and the first one
/// runs on too. Needs root (for `ip netns`).
#[tokio::test]
async fn qemu_snapshot_then_restore_into_another_vm_that_counts_on() {
    use std::sync::{Arc, Mutex};

    let ns = NetnsGuard::new("banger-snap-test");
    ns.ip(&["tuntap", "add", "dev", "bg-snap0", "mode", "tap"]);
    ns.ip(&["tuntap", "add", "dev", "bg-snap1", "mode", "tap"]);
    let fx_a = fixture("qemu-snap-a");
    let fx_b = fixture("qemu-snap-b");
    let dir_a = fx_a.cfg.run_dir.parent().unwrap().to_path_buf();
    crate::testkit::write_counting_test_kernel(&fx_a.cfg.kernel);
    crate::testkit::write_counting_test_kernel(&fx_b.cfg.kernel);
    let b = QemuBackend::new(qemu_in_netns(&ns, &dir_a), crate::kvm_mode());

    let mut cfg_a = fx_a.cfg.clone();
    cfg_a.net = Some(Nic {
        tap: banger_net::TapName::parse("bg-snap0").unwrap(),
        mac: "06:00:ac:10:00:0a".parse().unwrap(),
    });
    let a = b.start(&cfg_a).await.unwrap();
    let _guard_a = ProcessGuard::new(a.pid, a.pid_start_time);
    let console_a = cfg_a.console_log.clone();
    assert!(
        eventually(60, || counters(&console_a).len() >= 3).await,
        "the guest does not count: {:?}",
        std::fs::read_to_string(&console_a)
    );

    // The caller's work runs while the guest is paused: the console stands still meanwhile.
    let snap = dir_a.join("snap");
    std::fs::create_dir(&snap).unwrap();
    let paths = SnapshotPaths::new(&snap);
    let seen = Arc::new(Mutex::new(None));
    let (seen2, console) = (seen.clone(), console_a.clone());
    let while_paused: crate::WhilePaused<'_> = Box::pin(async move {
        let before = std::fs::read_to_string(&console)?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = std::fs::read_to_string(&console)?;
        *seen2.lock().unwrap() = Some((before == after, last_counter(&console)));
        Ok(())
    });
    let info = b.snapshot(&a, &paths, while_paused).await.unwrap();
    eprintln!("snapshot of a 64 MiB guest under TCG: {info:?}");
    let (still, paused_at) = seen.lock().unwrap().take().unwrap();
    let paused_at = paused_at.unwrap();
    assert!(still, "the guest ran on during the caller's work");
    assert_eq!(
        info.state_bytes,
        std::fs::metadata(paths.state()).unwrap().len()
    );
    assert!(info.state_bytes > 0);
    assert!(info.paused >= Duration::from_millis(500) && info.saving <= info.paused);
    let manifest = crate::Manifest::read(&paths, "x").unwrap();
    assert_eq!(
        (
            manifest.shape.vcpus,
            manifest.shape.memory_mib,
            manifest.shape.network
        ),
        (1, 64, true)
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(paths.state())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    // The first VM runs on after its snapshot.
    assert!(
        eventually(30, || last_counter(&console_a) > Some(paused_at + 2)).await,
        "the snapshotted guest was not resumed"
    );

    // Another shape is refused before any QEMU starts.
    let mut cfg_b = fx_b.cfg.clone();
    cfg_b.net = Some(Nic {
        tap: banger_net::TapName::parse("bg-snap1").unwrap(),
        mac: "06:00:ac:10:00:0b".parse().unwrap(),
    });
    let mut wrong = cfg_b.clone();
    wrong.memory_mib = 128;
    let err = b.restore(&wrong, &paths).await.unwrap_err();
    assert!(matches!(err, VmmError::SnapshotMismatch { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("it has 1 vCPUs and 64 MiB of memory, this VM 1 vCPUs and 128 MiB"),
        "{err}"
    );
    assert!(!cfg_b.run_dir.join(PID_FILE).exists(), "QEMU was started");

    let t = Instant::now();
    let restored = b.restore(&cfg_b, &paths).await.unwrap();
    eprintln!("restore took {:?}", t.elapsed());
    let _guard_b = ProcessGuard::new(restored.pid, restored.pid_start_time);
    let console_b = cfg_b.console_log.clone();
    assert!(
        eventually(60, || counters(&console_b).len() >= 2).await,
        "the restored guest does not count: {:?}",
        std::fs::read_to_string(&console_b)
    );
    let text_b = std::fs::read_to_string(&console_b).unwrap();
    assert!(
        !text_b.contains(TEST_KERNEL_GREETING),
        "the restored guest booted again: {text_b:?}"
    );
    // It goes on from the saved count: the next line, or the one after when the pause cut a
    // line in half (the restored guest finishes that half in its own console).
    let first = counters(&console_b)[0];
    assert!(
        first == paused_at + 1 || first == paused_at + 2,
        "restored guest starts at {first:#x}, paused at {paused_at:#x}"
    );
    assert!(holds_tap(restored.pid, "bg-snap1"), "not on the new tap");
    assert!(holds_tap(a.pid, "bg-snap0"));
    // What the guest sees: virtio-net's saved state carries the old MAC, whatever `cfg.net`
    // says; the guest agent sets the new one later.
    let mut qmp = Qmp::connect(&cfg_b.run_dir.join(QMP_SOCKET)).await.unwrap();
    let nics = qmp.execute("query-rx-filter", None).await.unwrap();
    assert_eq!(nics[0]["main-mac"], "06:00:ac:10:00:0a", "{nics}");
    drop(qmp);
    // Both run at once.
    assert!(b.is_alive(&a) && b.is_alive(&restored));

    b.stop(&restored, Duration::ZERO).await.unwrap();
    b.stop(&a, Duration::ZERO).await.unwrap();
}

/// A tmpfs mounted over a directory, unmounted on drop. Needs root.
struct TmpfsGuard {
    path: PathBuf,
}

impl TmpfsGuard {
    fn new(path: &Path, size: &str) -> TmpfsGuard {
        std::fs::create_dir_all(path).unwrap();
        let st = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .status()
            .unwrap();
        assert!(
            st.success(),
            "mount tmpfs on {path:?} failed (this test needs root)"
        );
        TmpfsGuard {
            path: path.to_path_buf(),
        }
    }
}

impl Drop for TmpfsGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// A state that does not fit where it is written: the save fails with QEMU's reason, the
/// partial state file is removed, no manifest is written, and the guest runs on.
#[tokio::test]
async fn a_snapshot_that_cannot_be_written_leaves_nothing_and_the_vm_runs_on() {
    let fx = fixture("qemu-snap-full");
    crate::testkit::write_counting_test_kernel(&fx.cfg.kernel);
    let b = backend();
    let h = b.start(&fx.cfg).await.unwrap();
    let _guard = ProcessGuard::new(h.pid, h.pid_start_time);
    let console = fx.cfg.console_log.clone();
    assert!(eventually(60, || counters(&console).len() >= 2).await);

    let snap = fx.cfg.run_dir.parent().unwrap().join("snap");
    let _tmpfs = TmpfsGuard::new(&snap, "16k");
    let paths = SnapshotPaths::new(&snap);
    let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ran2 = ran.clone();
    let err = b
        .snapshot(
            &h,
            &paths,
            Box::pin(async move {
                ran2.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            }),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, VmmError::SaveState { .. }),
        "{}",
        err.report()
    );
    assert!(err.report().contains("hint: "), "{}", err.report());
    assert!(
        !ran.load(std::sync::atomic::Ordering::SeqCst),
        "work ran after a failed save"
    );
    assert!(!paths.state().exists(), "partial state file left behind");
    assert!(!paths.manifest().exists());
    let at = last_counter(&console).unwrap();
    assert!(
        eventually(30, || last_counter(&console) > Some(at + 1)).await,
        "the guest stays paused after a failed snapshot"
    );
    // Nothing to restore from what is left.
    let err = b.restore(&fx.cfg, &paths).await.unwrap_err();
    assert!(matches!(err, VmmError::SnapshotManifest { .. }), "{err}");
    b.stop(&h, Duration::ZERO).await.unwrap();
}

/// A state QEMU cannot load (a damaged file under a good manifest): the restore fails with
/// QEMU's own reason and hint, and no QEMU is left running.
#[tokio::test]
async fn a_damaged_state_fails_the_restore_with_qemus_reason_and_leaves_no_qemu() {
    let fx = fixture("qemu-snap-damaged");
    let b = backend();
    let snap = fx.cfg.run_dir.parent().unwrap().join("snap");
    std::fs::create_dir(&snap).unwrap();
    let paths = SnapshotPaths::new(&snap);
    let shape = crate::Shape {
        backend: BackendKind::Qemu,
        vcpus: 1,
        memory_mib: 64,
        network: false,
        layout: args::layout(b.accel(), false),
    };
    crate::Manifest::new(shape, 10).write(&paths, "t").unwrap();
    std::fs::write(paths.state(), b"not a QEMU migration stream").unwrap();
    let err = b.restore(&fx.cfg, &paths).await.unwrap_err();
    let report = err.report();
    assert!(matches!(err, VmmError::LoadState { .. }), "{report}");
    assert!(report.contains("QEMU exited (exit status 1)"), "{report}");
    assert!(report.contains("hint: "), "{report}");
    let pid: i32 = std::fs::read_to_string(fx.cfg.run_dir.join(PID_FILE))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        crate::process::proc_stat(pid).is_none(),
        "QEMU {pid} left behind"
    );
}
