//! The agent as `/init`: PID 1 of guests whose image has no init system (OCI images).
//!
//! The kernel starts it from banger's initramfs (the kernel's modules initrd plus the per-VM
//! archive with `/init` and `/banger/image.json`). In order:
//!
//! 1. **initramfs**: mount `/proc`, `/sys`, `/dev`; load the modules listed in
//!    `/banger/modules`; wait for `root=` and mount it on `/newroot`; read
//!    `/banger/image.json`; move `/dev`, `/proc`, `/sys` into the new root; delete the
//!    initramfs files; switch to the new root ([`mounts`]).
//! 2. **the image's root**: devpts, `/dev/shm`, `/run`, cgroup2, the `/dev` links udev would
//!    make, `/tmp` (kept on disk, see [`plan`]); Ctrl-Alt-Del turned into `SIGINT`; the ACPI
//!    power button opened ([`button`]).
//! 3. **PID 1's loop** ([`supervisor`]): fork the agent ([`agent`]: setup and serve, as in a
//!    Debian guest), reap every orphan, restart the agent when it dies, power off on request
//!    (`SIGUSR2` from the agent, `SIGTERM`, Ctrl-Alt-Del, the power button).
//!
//! A failure that leaves no usable root (no device, a mount that fails) powers the VM off with
//! the reason on the console, so the host sees the VM end instead of waiting for an agent that
//! never comes. Started as PID 1 on a disk root (`init=` pointing at the agent), stage 1 is
//! skipped. Everything else the agent does is unchanged: in a guest with systemd it is a
//! service and none of this runs.

pub mod agent;
pub mod button;
pub mod modules;
pub mod mounts;
pub mod plan;
pub mod supervisor;

use std::path::Path;

use nix::sys::statfs::{FsType, TMPFS_MAGIC};

use crate::cmdline::{self, PROC_CMDLINE};
use crate::guest::fsutil::wait_until;
use crate::guest::serve::{log, report};
use crate::image::{self, ImageRuntime, IMAGE_JSON_PATH};
use crate::protocol::AGENT_VERSION;
use mounts::MountError;

/// How long to wait for the root device to appear.
const ROOT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// `statfs` magic of ramfs, which the kernel's initramfs is (nix names only tmpfs's).
const RAMFS_MAGIC: FsType = FsType(0x8584_58f6);

/// Whether this process is the init process, which is when the agent runs as `/init`.
pub fn is_pid1() -> bool {
    std::process::id() == 1
}

/// PID 1's main. Never returns (PID 1 exiting panics the kernel).
pub fn run() -> ! {
    log(format_args!(
        "init: starting as PID 1, version {AGENT_VERSION}"
    ));
    let runtime = if in_initramfs() {
        match initramfs_stage() {
            Ok(r) => r,
            Err(e) => fatal(&e),
        }
    } else {
        log(format_args!("init: the root is already a disk; no switch"));
        for spec in plan::early_mounts() {
            let mounted = std::fs::read_to_string("/proc/self/mountinfo")
                .map(|i| crate::guest::workdisk::is_mount_point(&i, Path::new(spec.target)))
                .unwrap_or(false);
            if !mounted {
                step(
                    spec.target,
                    mounts::mount_spec(&spec, Path::new("/")).map(|_| ()),
                );
            }
        }
        read_runtime()
    };
    root_stage();
    let sfd = match supervisor::block_signals() {
        Ok(sfd) => sfd,
        Err(e) => fatal(&InitError::Signals(e)),
    };
    let mut buttons =
        button::open_power_buttons(Path::new(button::SYSFS_INPUT), Path::new("/dev/input"));
    if buttons.is_empty() {
        log(format_args!("init: no ACPI power button; the VMM can stop this guest only through the agent or Ctrl-Alt-Del"));
    }
    supervisor::supervise(&sfd, &mut buttons, &|| agent::spawn(runtime.as_ref()))
}

/// Why the initramfs stage could not hand over to the image.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("the kernel command line names no usable root= device")]
    NoRoot,
    #[error("the root device {device} did not appear within {waited:?}")]
    RootMissing {
        device: std::path::PathBuf,
        waited: std::time::Duration,
    },
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error("cannot handle signals")]
    Signals(#[source] nix::Error),
}

fn fatal(e: &InitError) -> ! {
    log(format_args!("init: FATAL: {}; powering off", report(e)));
    supervisor::halt()
}

fn step(name: &str, result: Result<(), MountError>) {
    if let Err(e) = result {
        log(format_args!("init: {name}: FAILED: {}", report(&e)));
    }
}

fn in_initramfs() -> bool {
    nix::sys::statfs::statfs("/")
        .map(|s| [RAMFS_MAGIC, TMPFS_MAGIC].contains(&s.filesystem_type()))
        .unwrap_or(false)
}

fn read_runtime() -> Option<ImageRuntime> {
    match image::read(Path::new(IMAGE_JSON_PATH)) {
        Ok(r) => r,
        Err(e) => {
            log(format_args!(
                "init: ignoring the image config: {}",
                report(&e)
            ));
            None
        }
    }
}

/// Stage 1: from the kernel's initramfs to the image's root.
fn initramfs_stage() -> Result<Option<ImageRuntime>, InitError> {
    for spec in plan::early_mounts() {
        mounts::mount_spec(&spec, Path::new("/"))?;
    }
    let line = std::fs::read_to_string(PROC_CMDLINE).unwrap_or_default();

    match std::fs::read_to_string(plan::MODULE_LIST) {
        Ok(text) => {
            let (paths, warnings) = plan::parse_module_list(&text);
            for w in warnings {
                log(format_args!("init: modules: {w}"));
            }
            let r = modules::load_all(&paths);
            log(format_args!(
                "init: modules: {} loaded, {} already present, {} failed",
                r.loaded,
                r.already,
                r.failed.len()
            ));
            for (path, why) in &r.failed {
                log(format_args!("init: modules: {}: {why}", path.display()));
            }
        }
        Err(e) => log(format_args!(
            "init: modules: none loaded ({}: {e})",
            plan::MODULE_LIST
        )),
    }

    let (root, warnings) = cmdline::parse_root(&line);
    for w in warnings {
        log(format_args!("init: command line: {w}"));
    }
    let device = root.device.ok_or(InitError::NoRoot)?;
    if !wait_until(ROOT_WAIT, || device.exists()) {
        return Err(InitError::RootMissing {
            device,
            waited: ROOT_WAIT,
        });
    }
    let new_root = Path::new(plan::NEW_ROOT);
    mounts::ensure_dir(new_root, 0o755)?;
    mounts::mount_root(
        &device,
        new_root,
        &root.fstype,
        root.read_only,
        root.flags.as_deref(),
    )?;
    log(format_args!(
        "init: {} ({}, {}) mounted",
        device.display(),
        root.fstype,
        if root.read_only { "ro" } else { "rw" }
    ));
    let runtime = read_runtime();

    for (from, spec) in plan::MOVED_AT_SWITCH.iter().zip(moved_modes()) {
        let to = new_root.join(from.trim_start_matches('/'));
        // A mount left behind stays in the initramfs, out of sight; the guest still boots.
        step(from, mounts::move_mount(Path::new(from), &to, spec));
    }
    let cleared = mounts::clear_initramfs(Path::new("/"), new_root);
    if cleared.failed > 0 {
        log(format_args!(
            "init: initramfs: {} files removed, {} could not be",
            cleared.removed, cleared.failed
        ));
    }
    mounts::switch_root(new_root)?;
    Ok(runtime)
}

/// The mode each of [`plan::MOVED_AT_SWITCH`] gets when the image lacks it.
fn moved_modes() -> impl Iterator<Item = u32> {
    plan::MOVED_AT_SWITCH.iter().map(|target| {
        plan::early_mounts()
            .into_iter()
            .find(|m| m.target == *target)
            .map_or(0o755, |m| m.dir_mode)
    })
}

/// Stage 2: what a container runtime or systemd sets up in the image's root.
fn root_stage() {
    for spec in plan::after_switch_mounts() {
        step(
            spec.target,
            mounts::mount_spec(&spec, Path::new("/")).map(|_| ()),
        );
    }
    match mounts::ensure_links(&plan::DEV_LINKS) {
        Ok(made) if !made.is_empty() => log(format_args!("init: linked {}", made.join(", "))),
        Ok(_) => {}
        Err(e) => log(format_args!("init: /dev links: FAILED: {}", report(&e))),
    }
    let (tmp, mode) = plan::TMP_DIR;
    step(tmp, mounts::ensure_dir(Path::new(tmp), mode).map(|_| ()));
    if let Err(e) = nix::sys::reboot::set_cad_enabled(false) {
        log(format_args!("init: cannot route Ctrl-Alt-Del to init: {e}"));
    }
}
