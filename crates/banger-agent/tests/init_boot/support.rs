//! What the boot test needs around the guest: the prerequisites check, the static agent, a
//! busybox root disk, the initramfs, and QEMU started the way banger starts it, owned by a
//! guard that kills it and removes every file on drop.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::symlink;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Checks that the boot test can run here. Returns false only when a developer opted out
/// with `BANGER_E2E_SKIP=1`; anything missing fails the test with what to install.
pub fn boot_test_enabled() -> bool {
    if std::env::var_os("BANGER_E2E_SKIP").is_some_and(|v| v == "1") {
        eprintln!("SKIPPED: BANGER_E2E_SKIP=1 is set (developer opt-out; CI never sets it)");
        return false;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "the init boot test must run as root (it builds ext4 images from a root-owned tree); \
         run `sudo make test`, or set BANGER_E2E_SKIP=1 to skip it on a developer machine"
    );
    for (tool, package) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("mkfs.ext4", "e2fsprogs"),
        ("e2fsck", "e2fsprogs"),
        ("gpgv", "gpgv"),
        ("dpkg-deb", "dpkg"),
    ] {
        assert!(
            banger_image::require_tool(tool, package).is_ok(),
            "the init boot test needs `{tool}`: apt-get install {package}"
        );
    }
    assert!(
        is_static_elf(Path::new(BUSYBOX)),
        "the init boot test needs a statically linked {BUSYBOX}: apt-get install busybox-static"
    );
    true
}

pub const BUSYBOX: &str = "/bin/busybox";

/// Whether `path` is an ELF executable without a program interpreter (statically linked).
fn is_static_elf(path: &Path) -> bool {
    let Ok(elf) = fs::read(path) else {
        return false;
    };
    let u16_at = |o: usize| {
        elf.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
    };
    if !elf.starts_with(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    const PT_INTERP: u32 = 3;
    (0..phnum).all(|i| {
        let at = phoff + i * phentsize;
        elf.get(at..at + 4)
            .is_some_and(|t| u32::from_le_bytes(t.try_into().unwrap()) != PT_INTERP)
    })
}

/// The workspace's `target` directory (test binaries live in `target/debug/deps`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors().nth(3).unwrap().to_owned()
}

/// Builds the statically linked agent the way `make agent` does and returns its path. Cargo
/// only rebuilds what changed, so the guest always runs the code under test.
pub fn static_agent() -> PathBuf {
    let target = target_dir();
    let workspace = target.parent().unwrap();
    let status = Command::new(env!("CARGO"))
        .current_dir(workspace)
        .args([
            "build",
            "-p",
            "banger-agent",
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        .arg("--target-dir")
        .arg(target.join("agent"))
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .expect("cannot run cargo to build the static agent");
    let agent = target.join("agent/x86_64-unknown-linux-gnu/debug/banger-agent");
    assert!(
        status.success() && agent.is_file(),
        "building the static agent failed; try `make agent` (RUSTFLAGS=\"-C target-feature=+crt-static\" \
         cargo build -p banger-agent --target x86_64-unknown-linux-gnu --target-dir target/agent)"
    );
    assert!(
        is_static_elf(&agent),
        "{} is not statically linked",
        agent.display()
    );
    agent
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sparse(path: &Path, mib: u64) {
    fs::File::create(path).unwrap().set_len(mib << 20).unwrap();
}

/// A root disk with busybox and little else, deliberately odd where images are: no
/// `/etc/hosts`, a dangling `/etc/resolv.conf` symlink, and no `/root`, `/tmp`, `/run`,
/// `/dev`, `/proc` or `/sys` (init makes the mount points).
pub fn busybox_root_disk(dir: &Path) -> PathBuf {
    let tree = dir.join("rootfs");
    fs::create_dir_all(tree.join("bin")).unwrap();
    fs::create_dir_all(tree.join("etc")).unwrap();
    fs::copy(BUSYBOX, tree.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "ps", "sleep", "cat", "ls", "id", "echo", "stat", "mount",
    ] {
        symlink("busybox", tree.join("bin").join(applet)).unwrap();
    }
    fs::write(tree.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    fs::write(tree.join("etc/group"), "root:x:0:\ntty:x:5:\n").unwrap();
    symlink(
        "../run/systemd/resolve/stub-resolv.conf",
        tree.join("etc/resolv.conf"),
    )
    .unwrap();
    let disk = dir.join("root.ext4");
    sparse(&disk, 64);
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "root", "-d"])
        .arg(&tree)
        .arg(&disk));
    fs::remove_dir_all(&tree).unwrap();
    disk
}

/// An empty ext4 work disk, as the daemon makes one.
pub fn work_disk(dir: &Path) -> PathBuf {
    let disk = dir.join("work.ext4");
    sparse(&disk, 32);
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "work"])
        .arg(&disk));
    disk
}

/// The kernel's modules initrd with the per-VM archive appended, as the daemon does at start.
pub fn initrd(dir: &Path, modules_initrd: &Path, agent: &Path, image_json: &[u8]) -> PathBuf {
    let path = dir.join("initrd.img");
    let mut out = fs::File::create(&path).unwrap();
    out.write_all(&fs::read(modules_initrd).unwrap()).unwrap();
    banger_image::initramfs::agent_archive(agent, image_json, &mut out).unwrap();
    out.sync_all().unwrap();
    path
}

/// `e2fsck -fn`: succeeds only on a clean file system.
pub fn fsck_clean(disk: &Path) {
    run(Command::new("e2fsck").arg("-fn").arg(disk));
}

/// The host's TSC rate in kHz, as banger-vmm measures it for TCG guests.
fn host_tsc_khz() -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: rdtsc has no preconditions on x86_64.
        let (t0, c0) = (Instant::now(), unsafe { std::arch::x86_64::_rdtsc() });
        std::thread::sleep(Duration::from_millis(50));
        // SAFETY: as above.
        let (c1, t1) = (unsafe { std::arch::x86_64::_rdtsc() }, Instant::now());
        let micros = u64::try_from(t1.duration_since(t0).as_micros()).ok()?;
        let khz = c1.checked_sub(c0)?.checked_mul(1000)? / micros.max(1);
        (100_000..10_000_000).contains(&khz).then_some(khz)
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// A QEMU microvm under TCG, killed on drop.
pub struct Qemu {
    child: Child,
    pub agent_socket: PathBuf,
    qmp_socket: PathBuf,
    pub console: PathBuf,
    pub started: Instant,
}

impl Qemu {
    /// Starts the guest with the same kind of command line banger-vmm builds (`qemu/args.rs`):
    /// microvm with ACPI, virtio-mmio disks with serials, the agent's virtio-serial port on a
    /// Unix socket, the console to a file, and no network.
    pub fn start(
        dir: &Path,
        kernel: &Path,
        initrd: &Path,
        root: &Path,
        work: &Path,
        args: &str,
    ) -> Qemu {
        let agent_socket = dir.join("agent.sock");
        let qmp_socket = dir.join("qmp.sock");
        let console = dir.join("console.log");
        // A second boot appends to the same log and must not see the first one's lines.
        let _ = fs::remove_file(&console);
        let mut append =
            format!("console=ttyS0 reboot=k panic=1 root=/dev/vda rw rootfstype=ext4 {args}");
        if let Some(khz) = host_tsc_khz() {
            append.push_str(&format!(" tsc_early_khz={khz}"));
        }
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-name",
            "init-boot",
            "-M",
            "microvm,accel=tcg,acpi=on,pit=on,pic=on",
        ])
        .args(["-cpu", "max", "-m", "512M", "-smp", "1"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &append])
        .arg("-chardev")
        .arg(format!("file,id=console,path={}", console.display()))
        .args(["-serial", "chardev:console"]);
        for (id, disk) in [("root", root), ("work", work)] {
            cmd.arg("-drive")
                .arg(format!(
                    "if=none,id={id},file={},format=raw,cache=writeback,discard=unmap",
                    disk.display()
                ))
                .arg("-device")
                .arg(format!("virtio-blk-device,drive={id},serial=banger-{id}"));
        }
        cmd.args(["-device", "virtio-serial-device", "-chardev"])
            .arg(format!(
                "socket,id=agent,path={},server=on,wait=off",
                agent_socket.display()
            ))
            .args(["-device", "virtserialport,chardev=agent,name=banger.agent"])
            .args(["-nic", "none", "-chardev"])
            .arg(format!(
                "socket,id=qmp,path={},server=on,wait=off",
                qmp_socket.display()
            ))
            .args(["-mon", "chardev=qmp,mode=control"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = cmd.spawn().expect("cannot start qemu-system-x86_64");
        Qemu {
            child,
            agent_socket,
            qmp_socket,
            console,
            started: Instant::now(),
        }
    }

    /// Presses the ACPI power button through QMP (`system_powerdown`), as banger's graceful
    /// stop does when the agent does not answer.
    pub fn press_power_button(&self) {
        let stream = UnixStream::connect(&self.qmp_socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut writer = stream;
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.contains("QMP"), "not a QMP greeting: {line}");
        for command in ["qmp_capabilities", "system_powerdown"] {
            writeln!(writer, r#"{{"execute":"{command}"}}"#).unwrap();
            loop {
                line.clear();
                reader.read_line(&mut line).unwrap();
                if line.contains("\"return\"") {
                    break;
                }
                assert!(
                    !line.contains("\"error\"") && !line.is_empty(),
                    "{command}: {line}"
                );
            }
        }
    }

    pub fn console_text(&self) -> String {
        fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Waits up to `timeout` for QEMU to exit by itself; returns how long that took.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.child.try_wait().unwrap().is_some() {
                return Some(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
