//! The file-system work of the agent as `/init`: mount points made only where the image has
//! nothing (never through a symlink), mounts, the switch from the initramfs to the image's
//! root, and clearing the initramfs afterwards (its memory is not freed otherwise).
//!
//! The switch is what `switch_root` does: move `/dev`, `/proc` and `/sys` into the new root,
//! delete the initramfs files (staying on its own file system), then make the new root `/`
//! with `MS_MOVE` and `chroot`. The initramfs is `rootfs`, which cannot be unmounted, so
//! `pivot_root` is not an option.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};

use super::plan::MountSpec;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{path} is a symlink; refusing to mount through it")]
    Symlink { path: PathBuf },
    #[error("{path} exists and is not a directory")]
    NotDir { path: PathBuf },
    #[error("cannot create {path}")]
    Mkdir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot mount {fstype} at {target}")]
    Mount {
        fstype: String,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot move the mount {from} to {to}")]
    Move {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot switch the root to {root}: {step}")]
    Switch {
        root: PathBuf,
        step: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("cannot create the link {link}")]
    Link {
        link: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What [`ensure_dir`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirOutcome {
    Existed,
    Created,
}

/// Makes sure `path` is a directory, creating it with `mode` when missing. A symlink is never
/// followed (in an image it could point anywhere) and anything else in the way is an error.
pub fn ensure_dir(path: &Path, mode: u32) -> Result<DirOutcome, MountError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Ok(DirOutcome::Existed),
        Ok(m) if m.is_symlink() => Err(MountError::Symlink {
            path: path.to_owned(),
        }),
        Ok(_) => Err(MountError::NotDir {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mkdir = |source| MountError::Mkdir {
                path: path.to_owned(),
                source,
            };
            std::fs::create_dir(path).map_err(mkdir)?;
            // The umask applies to mkdir; the mode must be exact (1777 for /tmp).
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(mkdir)?;
            Ok(DirOutcome::Created)
        }
        Err(source) => Err(MountError::Mkdir {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Mounts `spec` with its target taken below `root` (`/` or the new root).
pub fn mount_spec(spec: &MountSpec, root: &Path) -> Result<DirOutcome, MountError> {
    let target = root.join(spec.target.trim_start_matches('/'));
    let made = ensure_dir(&target, spec.dir_mode)?;
    mount(
        Some(spec.source),
        &target,
        Some(spec.fstype),
        spec.flags,
        spec.data,
    )
    .map_err(|source| MountError::Mount {
        fstype: spec.fstype.to_string(),
        target: target.clone(),
        source,
    })?;
    Ok(made)
}

/// Mounts the root file system `device` at `target`.
pub fn mount_root(
    device: &Path,
    target: &Path,
    fstype: &str,
    read_only: bool,
    flags: Option<&str>,
) -> Result<(), MountError> {
    let ms = if read_only {
        MsFlags::MS_RDONLY
    } else {
        MsFlags::empty()
    };
    mount(Some(device), target, Some(fstype), ms, flags).map_err(|source| MountError::Mount {
        fstype: fstype.to_string(),
        target: target.to_owned(),
        source,
    })
}

/// Moves the mount at `from` to `to` (which must be a real directory).
pub fn move_mount(from: &Path, to: &Path, dir_mode: u32) -> Result<(), MountError> {
    ensure_dir(to, dir_mode)?;
    mount(Some(from), to, None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(|source| {
        MountError::Move {
            from: from.to_owned(),
            to: to.to_owned(),
            source,
        }
    })
}

/// Makes `new_root` the root of this process (and of everything it starts).
pub fn switch_root(new_root: &Path) -> Result<(), MountError> {
    let fail = |step, source| MountError::Switch {
        root: new_root.to_owned(),
        step,
        source,
    };
    nix::unistd::chdir(new_root).map_err(|e| fail("chdir into it", e))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| fail("move it onto /", e))?;
    nix::unistd::chroot(".").map_err(|e| fail("chroot", e))?;
    nix::unistd::chdir("/").map_err(|e| fail("chdir /", e))
}

/// What [`clear_initramfs`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Cleared {
    pub removed: usize,
    pub failed: usize,
}

/// Deletes everything under `root` that lives on `root`'s own file system, except `keep`
/// (the new root's mount point). Mount points below are not entered, so nothing of the new
/// root, nor of anything else mounted, is touched. Best effort: failures are counted.
pub fn clear_initramfs(root: &Path, keep: &Path) -> Cleared {
    let mut cleared = Cleared::default();
    let Ok(meta) = std::fs::symlink_metadata(root) else {
        cleared.failed += 1;
        return cleared;
    };
    clear_dir(root, meta.dev(), keep, &mut cleared);
    cleared
}

fn clear_dir(dir: &Path, dev: u64, keep: &Path, cleared: &mut Cleared) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        cleared.failed += 1;
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if path == keep {
            continue;
        }
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            cleared.failed += 1;
            continue;
        };
        if meta.dev() != dev {
            continue; // a mount point: another file system
        }
        let result = if meta.is_dir() {
            clear_dir(&path, dev, keep, cleared);
            std::fs::remove_dir(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match result {
            Ok(()) => cleared.removed += 1,
            Err(_) => cleared.failed += 1,
        }
    }
}

/// Creates each `(link, target)` symlink whose `link` does not exist (not even dangling).
/// Returns the links made.
pub fn ensure_links(links: &[(&str, &str)]) -> Result<Vec<String>, MountError> {
    let mut made = Vec::new();
    for (link, target) in links {
        if std::fs::symlink_metadata(link).is_ok() {
            continue;
        }
        std::os::unix::fs::symlink(target, link).map_err(|source| MountError::Link {
            link: PathBuf::from(link),
            source,
        })?;
        made.push((*link).to_string());
    }
    Ok(made)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_created_with_exact_modes_but_never_through_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("tmp");
        assert_eq!(ensure_dir(&tmp, 0o1777).unwrap(), DirOutcome::Created);
        assert_eq!(std::fs::metadata(&tmp).unwrap().mode() & 0o7777, 0o1777);
        assert_eq!(ensure_dir(&tmp, 0o755).unwrap(), DirOutcome::Existed);
        assert_eq!(std::fs::metadata(&tmp).unwrap().mode() & 0o7777, 0o1777);

        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let link = dir.path().join("run");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        assert!(matches!(
            ensure_dir(&link, 0o755),
            Err(MountError::Symlink { .. })
        ));
        let dangling = dir.path().join("proc");
        std::os::unix::fs::symlink("/nonexistent", &dangling).unwrap();
        assert!(matches!(
            ensure_dir(&dangling, 0o555),
            Err(MountError::Symlink { .. })
        ));
        let file = dir.path().join("sys");
        std::fs::write(&file, "").unwrap();
        assert!(matches!(
            ensure_dir(&file, 0o555),
            Err(MountError::NotDir { .. })
        ));
        let err = ensure_dir(&dir.path().join("a/b"), 0o755).unwrap_err();
        assert!(err.to_string().contains("cannot create"), "{err}");
    }

    #[test]
    fn clearing_removes_everything_but_the_kept_directory() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("initramfs");
        let keep = root.join("newroot");
        std::fs::create_dir_all(root.join("lib/modules/r/kernel")).unwrap();
        std::fs::write(root.join("lib/modules/r/kernel/virtio.ko"), "x").unwrap();
        std::fs::write(root.join("init"), "agent").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("link")).unwrap();
        std::fs::create_dir_all(keep.join("etc")).unwrap();
        std::fs::write(keep.join("etc/hosts"), "image").unwrap();
        let cleared = clear_initramfs(&root, &keep);
        assert_eq!(
            cleared,
            Cleared {
                removed: 7,
                failed: 0
            }
        );
        let left: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["newroot"]);
        assert_eq!(
            std::fs::read_to_string(keep.join("etc/hosts")).unwrap(),
            "image"
        );
        // The symlink was removed, not followed.
        assert!(Path::new("/etc/passwd").exists());
    }

    #[test]
    fn links_are_made_only_where_nothing_is() {
        let dir = tempfile::tempdir().unwrap();
        let fd = dir.path().join("fd");
        let ptmx = dir.path().join("ptmx");
        std::fs::write(&ptmx, "a device node in real life").unwrap();
        let (fd_s, ptmx_s) = (fd.to_str().unwrap(), ptmx.to_str().unwrap());
        let made = ensure_links(&[(fd_s, "/proc/self/fd"), (ptmx_s, "pts/ptmx")]).unwrap();
        assert_eq!(made, [fd_s]);
        assert_eq!(std::fs::read_link(&fd).unwrap(), Path::new("/proc/self/fd"));
        assert!(!std::fs::symlink_metadata(&ptmx).unwrap().is_symlink());
        assert!(ensure_links(&[(fd_s, "/other")]).unwrap().is_empty());
    }
}
