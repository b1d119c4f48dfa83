//! What the agent as `/init` sets up, as data: the file systems it mounts before and after
//! switching to the image's root, the device links udev would otherwise make, and the module
//! load list. Pure, so the plan is tested without a VM; [`super::mounts`] carries it out.
//!
//! `/tmp` gets no tmpfs: like Docker (which leaves the image's `/tmp` on the container's
//! writable layer) and like banger's Debian images, `/tmp` stays on the VM's root disk. Dev
//! sandboxes run builds and test suites that put large files there, and a tmpfs would take
//! them out of the VM's memory (1 GiB by default), turning a disk-sized job into an
//! out-of-memory kill. The agent only makes sure `/tmp` exists, with mode 1777.

use std::path::{Component, Path, PathBuf};

use nix::mount::MsFlags;

/// One file system to mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    pub source: &'static str,
    pub target: &'static str,
    pub fstype: &'static str,
    pub flags: MsFlags,
    pub data: Option<&'static str>,
    /// Mode of the mount point when it has to be created.
    pub dir_mode: u32,
}

fn nosuid_nodev() -> MsFlags {
    MsFlags::MS_NOSUID | MsFlags::MS_NODEV
}

/// In the initramfs, before anything else: what module loading and finding the root device
/// need. They move into the image's root at the switch ([`MOVED_AT_SWITCH`]).
pub fn early_mounts() -> Vec<MountSpec> {
    vec![
        MountSpec {
            source: "proc",
            target: "/proc",
            fstype: "proc",
            flags: nosuid_nodev() | MsFlags::MS_NOEXEC,
            data: None,
            dir_mode: 0o555,
        },
        MountSpec {
            source: "sysfs",
            target: "/sys",
            fstype: "sysfs",
            flags: nosuid_nodev() | MsFlags::MS_NOEXEC,
            data: None,
            dir_mode: 0o555,
        },
        MountSpec {
            source: "devtmpfs",
            target: "/dev",
            fstype: "devtmpfs",
            flags: MsFlags::MS_NOSUID,
            data: Some("mode=0755"),
            dir_mode: 0o755,
        },
    ]
}

/// Mount points moved from the initramfs into the new root, in this order.
pub const MOVED_AT_SWITCH: [&str; 3] = ["/dev", "/proc", "/sys"];

/// Where the root file system is mounted in the initramfs before the switch.
pub const NEW_ROOT: &str = "/newroot";

/// In the image's root, after the switch.
pub fn after_switch_mounts() -> Vec<MountSpec> {
    vec![
        MountSpec {
            source: "devpts",
            target: "/dev/pts",
            fstype: "devpts",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            // gid 5 is `tty` in Debian, Alpine and most images; mode 620 lets the group write.
            data: Some("newinstance,ptmxmode=0666,mode=620,gid=5"),
            dir_mode: 0o755,
        },
        MountSpec {
            source: "shm",
            target: "/dev/shm",
            fstype: "tmpfs",
            flags: nosuid_nodev(),
            data: Some("mode=1777"),
            dir_mode: 0o1777,
        },
        MountSpec {
            source: "tmpfs",
            target: "/run",
            fstype: "tmpfs",
            flags: nosuid_nodev(),
            data: Some("mode=0755,size=20%"),
            dir_mode: 0o755,
        },
        MountSpec {
            source: "cgroup2",
            target: "/sys/fs/cgroup",
            fstype: "cgroup2",
            flags: nosuid_nodev() | MsFlags::MS_NOEXEC,
            data: None,
            dir_mode: 0o555,
        },
    ]
}

/// Links in `/dev` that udev or systemd make in a Debian guest (each only when missing).
pub const DEV_LINKS: [(&str, &str); 5] = [
    ("/dev/fd", "/proc/self/fd"),
    ("/dev/stdin", "/proc/self/fd/0"),
    ("/dev/stdout", "/proc/self/fd/1"),
    ("/dev/stderr", "/proc/self/fd/2"),
    ("/dev/ptmx", "pts/ptmx"),
];

/// `/tmp`: kept on the root disk (see the module header), created when missing.
pub const TMP_DIR: (&str, u32) = ("/tmp", 0o1777);

/// Where the modules initrd lists the modules to load, one absolute path per line,
/// dependencies first.
pub const MODULE_LIST: &str = "/banger/modules";

/// The module paths in `text`, in order. Lines that are not plain absolute paths under
/// `/lib/modules/` ending in `.ko` are skipped with a warning each; blank lines and `#`
/// comments are ignored.
pub fn parse_module_list(text: &str) -> (Vec<PathBuf>, Vec<String>) {
    let mut paths = Vec::new();
    let mut warnings = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let path = Path::new(line);
        let plain = path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        if plain && line.starts_with("/lib/modules/") && line.ends_with(".ko") {
            paths.push(path.to_path_buf());
        } else {
            warnings.push(format!(
                "skipping {line:?}: not a module under /lib/modules"
            ));
        }
    }
    (paths, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_module_list_keeps_order_and_skips_anything_odd() {
        let text = "/lib/modules/6.1.0-50-cloud-amd64/kernel/drivers/virtio/virtio.ko\n\
                    \n# comment\n\
                    /lib/modules/6.1.0-50-cloud-amd64/kernel/drivers/virtio/virtio_ring.ko\n\
                    /lib/modules/../../etc/shadow.ko\n\
                    lib/modules/x/relative.ko\n\
                    /usr/lib/other.ko\n\
                    /lib/modules/x/not-a-module.txt\n";
        let (paths, warnings) = parse_module_list(text);
        assert_eq!(
            paths,
            [
                PathBuf::from("/lib/modules/6.1.0-50-cloud-amd64/kernel/drivers/virtio/virtio.ko"),
                PathBuf::from(
                    "/lib/modules/6.1.0-50-cloud-amd64/kernel/drivers/virtio/virtio_ring.ko"
                ),
            ]
        );
        assert_eq!(warnings.len(), 4, "{warnings:?}");
    }

    #[test]
    fn early_mounts_are_what_the_switch_moves() {
        let targets: Vec<&str> = early_mounts().iter().map(|m| m.target).collect();
        let mut moved = MOVED_AT_SWITCH.to_vec();
        moved.sort();
        let mut sorted = targets.clone();
        sorted.sort();
        assert_eq!(sorted, moved);
    }

    #[test]
    fn after_the_switch_pts_shm_run_and_cgroup2_are_mounted_but_not_tmp() {
        let plan = after_switch_mounts();
        let find = |t: &str| plan.iter().find(|m| m.target == t);
        let pts = find("/dev/pts").unwrap();
        assert_eq!(pts.fstype, "devpts");
        assert!(pts.data.unwrap().split(',').any(|o| o == "newinstance"));
        assert!(pts.data.unwrap().split(',').any(|o| o == "ptmxmode=0666"));
        assert_eq!(find("/dev/shm").unwrap().data, Some("mode=1777"));
        assert!(find("/run").unwrap().data.unwrap().starts_with("mode=0755"));
        assert_eq!(find("/sys/fs/cgroup").unwrap().fstype, "cgroup2");
        assert!(find("/tmp").is_none(), "/tmp stays on the root disk");
        for m in &plan {
            assert!(m.flags.contains(MsFlags::MS_NOSUID), "{m:?}");
        }
        // Parents come before their children.
        let at = |t: &str| plan.iter().position(|m| m.target == t).unwrap();
        assert!(at("/dev/pts") < at("/dev/shm"));
    }

    #[test]
    fn dev_links_point_into_proc_and_pts() {
        for (link, target) in DEV_LINKS {
            assert!(link.starts_with("/dev/"));
            assert!(
                target.starts_with("/proc/self/fd") || target == "pts/ptmx",
                "{target}"
            );
        }
    }
}
