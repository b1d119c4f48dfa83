//! Setup step 6: the VM's work disk (`/dev/vdb`, ext4) mounted at `/root`, and the ownership
//! and modes sshd insists on for `/root`, `/root/.ssh` and `authorized_keys`; and, at the
//! host's request (`work_disk`), unmounting it before a warm snapshot and mounting the VM's
//! own disk after one.
//!
//! The work disk is what persists a VM's home across restarts; the daemon formats and fills
//! it. The agent only mounts it (unless something already did, e.g. an fstab entry or an
//! earlier run of the agent) and repairs permissions, because sshd refuses keys in a
//! group- or world-writable home.
//!
//! A warm snapshot is copied into many VMs, each with a disk of its own behind the same
//! `/dev/vdb`, so its memory must hold nothing of the disk it was taken with: no mount, no
//! superblock, no cached blocks. [`release_work_disk`] unmounts (never lazily: a detached mount
//! lives on while anything uses it), checks that no other mount of the device lives on, and
//! drops the device's buffer cache; [`attach_work_disk`] drops it again (this kernel last saw
//! another file there) and mounts.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

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
    #[error("something still uses {target} (a process's working directory or an open file)")]
    Busy { target: PathBuf },
    #[error("cannot unmount {target}")]
    Unmount {
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    /// The device is claimed with nothing mounted at the target: another mount of it lives on
    /// (in this or another mount namespace, e.g. a systemd service's with `ProtectHome=`),
    /// and with it the file system's state, which a snapshot would keep and a new mount of
    /// the device would take over.
    #[error(
        "{device} is still mounted elsewhere (e.g. in a systemd service's own mount \
         namespace) or held open exclusively"
    )]
    StillInUse { device: PathBuf },
    #[error("cannot drop the buffer cache of {device}")]
    Flush {
        device: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Releasing failed after the unmount, and putting the disk back failed too.
    #[error("{target} is left unmounted: mounting it again failed ({remount})")]
    LeftUnmounted {
        target: PathBuf,
        remount: String,
        #[source]
        source: Box<WorkDiskError>,
    },
}

/// What [`mount_work_disk`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountOutcome {
    Mounted,
    /// Something is mounted there already; it was left alone.
    AlreadyMounted,
}

/// What [`release_work_disk`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseOutcome {
    Unmounted,
    /// Nothing was mounted there; nothing was done.
    NotMounted,
}

/// Waits up to `wait` for `device`, then mounts it at `target` unless `target` is already a
/// mount point.
pub fn mount_work_disk(
    device: &Path,
    target: &Path,
    wait: Duration,
) -> Result<MountOutcome, WorkDiskError> {
    wait_for_device(device, wait)?;
    if is_mounted(target)? {
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

/// Unmounts the work disk `device` from `target` and drops every trace of it from this
/// kernel, so a snapshot taken now holds nothing of it (see the module's header). Nothing
/// mounted at `target` is nothing to do. A failure leaves the disk mounted as it was (or says
/// that it could not: [`WorkDiskError::LeftUnmounted`]); the commonest is something using
/// `target` ([`WorkDiskError::Busy`]).
pub fn release_work_disk(device: &Path, target: &Path) -> Result<ReleaseOutcome, WorkDiskError> {
    if !is_mounted(target)? {
        // Not at `target`, but it may be mounted elsewhere (an fstab entry, a service's own
        // mount namespace): then its file system would live on in the snapshot. The same
        // check as after an unmount, and its buffers go too.
        if device.exists() {
            flush_buffers(device)?;
        }
        return Ok(ReleaseOutcome::NotMounted);
    }
    // Written out first, so the unmount has little left to write.
    nix::unistd::sync();
    umount2(target, MntFlags::empty()).map_err(|source| unmount_error(target, source))?;
    if let Err(failure) = flush_buffers(device) {
        // No warm snapshot can be taken like this; the disk goes back, so the VM stays as
        // usable as it was.
        return Err(match mount_work_disk(device, target, Duration::ZERO) {
            Ok(_) => failure,
            Err(remount) => WorkDiskError::LeftUnmounted {
                target: target.to_path_buf(),
                remount: remount.to_string(),
                source: Box::new(failure),
            },
        });
    }
    Ok(ReleaseOutcome::Unmounted)
}

/// Mounts the VM's own work disk at `target` after [`release_work_disk`] (in the VM that was
/// snapshotted, or in one restored from the snapshot) and repairs the home's permissions. The
/// device's buffer cache is dropped first: the file behind `device` may not be the one this
/// kernel last read. A disk already mounted at `target` is left as it is.
pub fn attach_work_disk(
    device: &Path,
    target: &Path,
    wait: Duration,
) -> Result<MountOutcome, WorkDiskError> {
    if !is_mounted(target)? {
        wait_for_device(device, wait)?;
        flush_buffers(device)?;
    }
    let outcome = mount_work_disk(device, target, wait)?;
    fix_home_permissions(target)?;
    Ok(outcome)
}

fn wait_for_device(device: &Path, wait: Duration) -> Result<(), WorkDiskError> {
    if wait_until(wait, || device.exists()) {
        Ok(())
    } else {
        Err(WorkDiskError::NoDevice {
            device: device.to_path_buf(),
            waited: wait,
        })
    }
}

/// Whether something is mounted at `target`.
fn is_mounted(target: &Path) -> Result<bool, WorkDiskError> {
    let mount_info = |source| WorkDiskError::MountInfo {
        path: target.to_path_buf(),
        source,
    };
    let mountinfo = fs_err::read_to_string("/proc/self/mountinfo").map_err(mount_info)?;
    let canonical = fs_err::canonicalize(target).map_err(mount_info)?;
    Ok(is_mount_point(&mountinfo, &canonical))
}

fn unmount_error(target: &Path, source: nix::Error) -> WorkDiskError {
    let target = target.to_path_buf();
    match source {
        Errno::EBUSY => WorkDiskError::Busy { target },
        source => WorkDiskError::Unmount { target, source },
    }
}

/// Drops the cached blocks of `device`, which must be free: it is opened exclusively, which
/// fails while any mount of it lives on, in any mount namespace (a mount there would keep
/// the old file system's state, and a new mount of the device would take it over).
fn flush_buffers(device: &Path) -> Result<(), WorkDiskError> {
    // BLKFLSBUF = _IO(0x12, 97).
    const BLKFLSBUF: libc::Ioctl = 0x1261;
    let flush_error = |source| WorkDiskError::Flush {
        device: device.to_path_buf(),
        source,
    };
    let disk = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(device)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => WorkDiskError::StillInUse {
                device: device.to_path_buf(),
            },
            _ => flush_error(e),
        })?;
    // SAFETY: BLKFLSBUF takes no argument; `disk` is an open block device for the whole call.
    // It writes back dirty blocks and drops the clean ones (needs CAP_SYS_ADMIN).
    if unsafe { libc::ioctl(disk.as_raw_fd(), BLKFLSBUF) } != 0 {
        return Err(flush_error(io::Error::last_os_error()));
    }
    Ok(())
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
    fn nothing_mounted_is_nothing_to_release() {
        let dir = tempfile::tempdir().unwrap();
        // And no device: nothing of it can be in a snapshot.
        assert_eq!(
            release_work_disk(Path::new("/dev/banger-no-such-disk"), dir.path()).unwrap(),
            ReleaseOutcome::NotMounted
        );
    }

    #[test]
    fn a_busy_home_is_named_as_such() {
        let root = Path::new("/root");
        assert_eq!(
            unmount_error(root, Errno::EBUSY).to_string(),
            "something still uses /root (a process's working directory or an open file)"
        );
        let other = unmount_error(root, Errno::EPERM);
        assert!(matches!(other, WorkDiskError::Unmount { .. }), "{other:?}");
        assert_eq!(other.to_string(), "cannot unmount /root");
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

    /// A fresh 16 MiB ext4 image in `dir`.
    fn ext4_image(dir: &Path) -> PathBuf {
        let image = dir.join("work.ext4");
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
        image
    }

    #[test]
    fn mounts_an_ext4_work_disk_once() {
        let dir = tempfile::tempdir().unwrap();
        let device = LoopDevice::attach(&ext4_image(dir.path()));
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

    #[test]
    fn releases_the_work_disk_only_when_nothing_holds_it_and_mounts_it_again() {
        let dir = tempfile::tempdir().unwrap();
        let loop_device = LoopDevice::attach(&ext4_image(dir.path()));
        let device = Path::new(&loop_device.0);
        let target = dir.path().join("root");
        std::fs::create_dir(&target).unwrap();
        let wait = Duration::from_secs(1);
        let _unmount = Unmount(target.clone());
        assert_eq!(
            attach_work_disk(device, &target, wait).unwrap(),
            MountOutcome::Mounted
        );
        std::fs::write(target.join("kept"), "on the disk").unwrap();

        // An open file keeps the disk, and the disk stays mounted.
        let open = std::fs::File::open(target.join("kept")).unwrap();
        let err = release_work_disk(device, &target).unwrap_err();
        assert!(matches!(err, WorkDiskError::Busy { .. }), "{err:?}");
        assert!(is_mounted(&target).unwrap());
        drop(open);

        assert_eq!(
            release_work_disk(device, &target).unwrap(),
            ReleaseOutcome::Unmounted
        );
        assert!(!is_mounted(&target).unwrap());
        assert!(!target.join("kept").exists());
        assert_eq!(
            release_work_disk(device, &target).unwrap(),
            ReleaseOutcome::NotMounted
        );

        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            attach_work_disk(device, &target, wait).unwrap(),
            MountOutcome::Mounted
        );
        assert_eq!(
            std::fs::read_to_string(target.join("kept")).unwrap(),
            "on the disk"
        );
        assert_eq!(std::fs::metadata(&target).unwrap().mode() & 0o7777, 0o700);
        assert_eq!(
            attach_work_disk(device, &target, wait).unwrap(),
            MountOutcome::AlreadyMounted
        );

        // Another mount of the disk (as a service's mount namespace would keep) outlives the
        // unmount: the release is refused and the disk put back where it was.
        let other = dir.path().join("other");
        std::fs::create_dir(&other).unwrap();
        mount(
            Some(&target),
            &other,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        let _unmount_other = Unmount(other.clone());
        let err = release_work_disk(device, &target).unwrap_err();
        assert!(matches!(err, WorkDiskError::StillInUse { .. }), "{err:?}");
        assert!(is_mounted(&target).unwrap());
        assert!(target.join("kept").exists());
        // Nor is a mount attached to what lives on.
        nix::mount::umount2(&target, MntFlags::empty()).unwrap();
        let err = attach_work_disk(device, &target, wait).unwrap_err();
        assert!(matches!(err, WorkDiskError::StillInUse { .. }), "{err:?}");
        assert!(!is_mounted(&target).unwrap());
    }
}
