//! Setup step 6: the VM's work disk (`/dev/vdb`, ext4) mounted at `/root`, and the ownership
//! and modes sshd insists on for `/root`, `/root/.ssh` and `authorized_keys`.
//!
//! The work disk is what persists a VM's home across restarts; the daemon formats and fills
//! it. The agent only mounts it (unless something already did, e.g. an fstab entry or an
//! earlier run of the agent) and repairs permissions, because sshd refuses keys in a
//! group- or world-writable home.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::mount::{mount, MsFlags};

use crate::guest::fsutil::wait_until;

#[derive(Debug, thiserror::Error)]
pub enum WorkDiskError {
    #[error("work disk {device} did not appear within {waited:?}")]
    NoDevice { device: PathBuf, waited: Duration },
    #[error("cannot tell whether {path} is already a mount point")]
    MountInfo {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot mount {device} (ext4) at {target}")]
    Mount {
        device: PathBuf,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot fix the ownership and mode of {path}")]
    Permissions {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What [`mount_work_disk`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountOutcome {
    Mounted,
    /// Something is mounted there already; it was left alone.
    AlreadyMounted,
}

/// Waits up to `wait` for `device`, then mounts it at `target` unless `target` is already a
/// mount point.
pub fn mount_work_disk(
    device: &Path,
    target: &Path,
    wait: Duration,
) -> Result<MountOutcome, WorkDiskError> {
    if !wait_until(wait, || device.exists()) {
        return Err(WorkDiskError::NoDevice {
            device: device.to_path_buf(),
            waited: wait,
        });
    }
    let mount_info = |source| WorkDiskError::MountInfo {
        path: target.to_path_buf(),
        source,
    };
    let mountinfo = fs_err::read_to_string("/proc/self/mountinfo").map_err(mount_info)?;
    let canonical = fs_err::canonicalize(target).map_err(mount_info)?;
    if is_mount_point(&mountinfo, &canonical) {
        return Ok(MountOutcome::AlreadyMounted);
    }
    mount(
        Some(device),
        target,
        Some("ext4"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| WorkDiskError::Mount {
        device: device.to_path_buf(),
        target: target.to_path_buf(),
        source,
    })?;
    Ok(MountOutcome::Mounted)
}

/// Whether `path` (canonical) is a mount point according to the text of
/// `/proc/self/mountinfo`, whose fifth field is the mount point with spaces, tabs, newlines
/// and backslashes octal-escaped.
pub fn is_mount_point(mountinfo: &str, path: &Path) -> bool {
    let want = path.as_os_str().as_encoded_bytes();
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|field| unescape_mountinfo(field) == want)
}

fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let text = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// Makes `home` (0700), `home/.ssh` (0700) and `home/.ssh/authorized_keys` (0600) owned by
/// root. Missing `.ssh` or `authorized_keys` are fine (not every VM has keys); symlinks are
/// left alone rather than followed to files elsewhere.
pub fn fix_home_permissions(home: &Path) -> Result<(), WorkDiskError> {
    let ssh = home.join(".ssh");
    let keys = ssh.join("authorized_keys");
    for (path, mode, required) in [
        (home.to_path_buf(), 0o700, true),
        (ssh, 0o700, false),
        (keys, 0o600, false),
    ] {
        let fail = |source| WorkDiskError::Permissions {
            path: path.clone(),
            source,
        };
        let meta = match fs_err::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !required => continue,
            Err(e) => return Err(fail(e)),
        };
        if meta.is_symlink() {
            continue;
        }
        std::os::unix::fs::lchown(&path, Some(0), Some(0)).map_err(fail)?;
        fs_err::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(fail)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::process::Command;

    #[test]
    fn mount_points_are_found_with_escaped_names() {
        let info = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
                    30 22 0:25 / /root rw - ext4 /dev/vdb rw\n\
                    31 22 0:26 / /mnt/with\\040space rw - tmpfs tmpfs rw\n";
        assert!(is_mount_point(info, Path::new("/root")));
        assert!(is_mount_point(info, Path::new("/")));
        assert!(is_mount_point(info, Path::new("/mnt/with space")));
        assert!(!is_mount_point(info, Path::new("/mnt")));
        assert!(!is_mount_point(info, Path::new("/roo")));
    }

    #[test]
    fn a_missing_device_is_reported_after_the_wait() {
        let err = mount_work_disk(
            Path::new("/dev/banger-no-such-disk"),
            Path::new("/tmp"),
            Duration::from_millis(100),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "work disk /dev/banger-no-such-disk did not appear within 100ms"
        );
    }

    #[test]
    fn home_permissions_are_made_strict_and_owned_by_root() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("root");
        let ssh = home.join(".ssh");
        let keys = ssh.join("authorized_keys");
        std::fs::create_dir_all(&ssh).unwrap();
        std::fs::write(&keys, "ssh-ed25519 AAAA test\n").unwrap();
        for (p, mode) in [(&home, 0o777), (&ssh, 0o755), (&keys, 0o666)] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
            std::os::unix::fs::chown(p, Some(1000), Some(1000)).unwrap();
        }
        fix_home_permissions(&home).unwrap();
        for (p, mode) in [(&home, 0o700), (&ssh, 0o700), (&keys, 0o600)] {
            let meta = std::fs::metadata(p).unwrap();
            assert_eq!(meta.mode() & 0o7777, mode, "{}", p.display());
            assert_eq!((meta.uid(), meta.gid()), (0, 0), "{}", p.display());
        }
    }

    #[test]
    fn a_home_without_ssh_keys_is_fine_but_a_missing_home_is_not() {
        let dir = tempfile::tempdir().unwrap();
        fix_home_permissions(dir.path()).unwrap();
        let missing = dir.path().join("nope");
        let err = fix_home_permissions(&missing).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    /// A loop device over an ext4 image file, detached on drop.
    struct LoopDevice(String);

    impl LoopDevice {
        fn attach(image: &Path) -> Self {
            let out = Command::new("losetup")
                .args(["--find", "--show"])
                .arg(image)
                .output()
                .expect("losetup (util-linux) is needed for this test");
            assert!(
                out.status.success(),
                "losetup failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            LoopDevice(String::from_utf8(out.stdout).unwrap().trim().to_string())
        }
    }

    impl Drop for LoopDevice {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }

    /// Unmounts on drop, so a failing assertion does not leave a mount behind.
    struct Unmount(PathBuf);

    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }

    #[test]
    fn mounts_an_ext4_work_disk_once() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("work.ext4");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        let status = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&image)
            .status()
            .expect("mkfs.ext4 (e2fsprogs) is needed for this test");
        assert!(status.success());
        let device = LoopDevice::attach(&image);
        let target = dir.path().join("root");
        std::fs::create_dir(&target).unwrap();

        let outcome = mount_work_disk(Path::new(&device.0), &target, Duration::from_secs(1));
        let _unmount = Unmount(target.clone());
        assert_eq!(outcome.unwrap(), MountOutcome::Mounted);
        assert!(target.join("lost+found").is_dir(), "not the ext4 disk");
        assert_eq!(
            mount_work_disk(Path::new(&device.0), &target, Duration::from_secs(1)).unwrap(),
            MountOutcome::AlreadyMounted
        );
        fix_home_permissions(&target).unwrap();
        assert_eq!(std::fs::metadata(&target).unwrap().mode() & 0o7777, 0o700);
    }
}
