//! Removing what an image build leaves on disk: its root-owned tree, and whole work directories
//! that an interrupted build (a killed daemon, a cancelled client) left behind.
//!
//! debootstrap mounts `/proc` and `/sys` (and in containers binds device files) inside the tree
//! and unmounts them from an exit trap; a debootstrap killed with SIGKILL leaves them mounted.
//! Walking such a tree with a recursive delete would descend into the host's file systems, so
//! every removal here first reads the mount table ([`MountTable`], `/proc/self/mountinfo` on the
//! host), lazily unmounts everything at or below the directory through [`Privileged`] (deepest
//! first: a lazy unmount also detaches what is mounted below, and the deepest ones are sure to
//! still be there), checks that nothing is left, and only then removes the directory with
//! `rm -rf --one-file-system` as root, which stops at any file system boundary it still meets.
//!
//! [`remove_leftover`] is the daemon's start-up sweep of one staging directory: a directory
//! without mounts is first removed as the daemon's user (a pull's staging needs no root and a
//! user without sudo must still get it cleaned), and only a directory holding mounts or files
//! the user cannot delete goes through root.

use crate::hosttools::{require_tool, MissingTool};
use crate::privileged::{PrivCommand, PrivError, Privileged};
use crate::progress::Progress;
use banger_hint::Hint;
use std::borrow::Cow;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// Where the mount table comes from: the host's, or a test's.
pub trait MountTable: Send + Sync {
    /// The text of `/proc/self/mountinfo` (or something in its format).
    fn mountinfo(&self) -> std::io::Result<String>;
}

/// This process's mount table, `/proc/self/mountinfo`. sudo runs its commands in the same
/// mount namespace, so what it lists is what the privileged `umount` sees.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcMounts;

impl MountTable for ProcMounts {
    fn mountinfo(&self) -> std::io::Result<String> {
        std::fs::read_to_string("/proc/self/mountinfo")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkDirError {
    #[error(transparent)]
    MissingTool(#[from] MissingTool),
    #[error("cannot read the mount table to clean up {}", dir.display())]
    MountTable {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot find {}", dir.display())]
    Resolve {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} still has file systems mounted inside, so it was left in place: {}",
        dir.display(),
        list(still_mounted)
    )]
    StillMounted {
        dir: PathBuf,
        still_mounted: Vec<PathBuf>,
        /// The first `umount` that failed, if one did.
        #[source]
        source: Option<Box<PrivError>>,
    },
    #[error("cannot remove {}", dir.display())]
    Remove {
        dir: PathBuf,
        #[source]
        source: PrivError,
    },
    #[error("{} needs root to be removed and no privileged runner is available", dir.display())]
    NeedsRoot {
        dir: PathBuf,
        /// Why removing it as the daemon's user failed, if that was tried.
        #[source]
        source: Option<std::io::Error>,
    },
}

impl Hint for WorkDirError {
    fn hint(&self) -> Option<Cow<'_, str>> {
        match self {
            // Transparent: the missing tool is not in the chain, so its hint is asked here.
            WorkDirError::MissingTool(e) => e.hint(),
            WorkDirError::StillMounted { dir, .. } | WorkDirError::NeedsRoot { dir, .. } => Some(
                format!(
                    "as root, unmount what is inside (`umount -R -l` on each mount point \
                     listed by `findmnt -R {0}`) and then run `rm -rf --one-file-system {0}`",
                    dir.display()
                )
                .into(),
            ),
            WorkDirError::MountTable { .. }
            | WorkDirError::Resolve { .. }
            | WorkDirError::Remove { .. } => None,
        }
    }
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The mount points at or below `dir` in `mountinfo`, deepest first. `dir` must be canonical
/// (mountinfo lists canonical paths). A point mounted over several times appears once per mount.
pub fn mounts_under(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape)
        .filter(|p| p.starts_with(dir))
        .collect();
    // Deepest first; among equals, a stable order so tests and logs are predictable.
    found.sort_by(|a, b| {
        let depth = |p: &PathBuf| p.components().count();
        depth(b).cmp(&depth(a)).then_with(|| b.cmp(a))
    });
    found
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\012` for a newline, `\134` for `\`).
fn unescape(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                let v = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                out.push(u8::try_from(v).unwrap_or(b'?'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

/// Reads the table in place: procfs serves it from memory, so it does not block the runtime.
fn read_mounts(mounts: &dyn MountTable, dir: &Path) -> Result<Vec<PathBuf>, WorkDirError> {
    let text = mounts
        .mountinfo()
        .map_err(|source| WorkDirError::MountTable {
            dir: dir.to_owned(),
            source,
        })?;
    Ok(mounts_under(&text, dir))
}

/// `dir` with its parent made canonical (mountinfo lists canonical paths), and whether it is a
/// directory; `None` when it does not exist. The last component is never resolved: a leftover
/// that is a symlink is removed itself, never what it points to.
async fn resolve(dir: &Path) -> Result<Option<(PathBuf, bool)>, WorkDirError> {
    let resolve_err = |source| WorkDirError::Resolve {
        dir: dir.to_owned(),
        source,
    };
    let is_dir = match tokio::fs::symlink_metadata(dir).await {
        Ok(m) => m.is_dir(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(resolve_err(source)),
    };
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return Err(resolve_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a directory inside another one",
        )));
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let parent = tokio::fs::canonicalize(parent).await.map_err(resolve_err)?;
    Ok(Some((parent.join(name), is_dir)))
}

/// Unmounts everything at or below `dir` (canonical), then removes it as root. `what` names it
/// in the operations reported ("build tree" gives "remove build tree"). Returns the mount points
/// it unmounted; a missing `dir` is already removed.
pub async fn remove_as_root(
    dir: &Path,
    what: &str,
    privileged: &dyn Privileged,
    mounts: &dyn MountTable,
    progress: &dyn Progress,
) -> Result<Vec<PathBuf>, WorkDirError> {
    let Some((dir, _)) = resolve(dir).await? else {
        return Ok(Vec::new());
    };
    let mounted = read_mounts(mounts, &dir)?;
    if !mounted.is_empty() {
        let umount = require_tool("umount", "mount")?;
        let mut first_failure = None;
        for point in &mounted {
            // -l: a process still using it cannot keep it (and the tree) in place; -c: the path
            // comes from the mount table and is not resolved again in user space; -i: no
            // file-system-specific helper runs.
            let cmd = PrivCommand::new(format!("unmount {}", point.display()), &umount)
                .args(["-l", "-c", "-i", "--"])
                .arg(point);
            if let Err(e) = privileged.run(&cmd, progress).await {
                // Lazily unmounting a parent may have taken this one along already; the table
                // read afterwards decides.
                first_failure.get_or_insert(Box::new(e));
            }
        }
        let still_mounted = read_mounts(mounts, &dir)?;
        if !still_mounted.is_empty() {
            return Err(WorkDirError::StillMounted {
                dir,
                still_mounted,
                source: first_failure,
            });
        }
    }
    let rm = require_tool("rm", "coreutils")?;
    // --one-file-system: should anything have been mounted since the check, rm stops there
    // instead of descending into it.
    let cmd = PrivCommand::new(format!("remove {what}"), rm)
        .args(["-rf", "--one-file-system", "--"])
        .arg(&dir);
    privileged
        .run(&cmd, progress)
        .await
        .map_err(|source| WorkDirError::Remove {
            dir: dir.clone(),
            source,
        })?;
    Ok(mounted)
}

/// How [`remove_leftover`] removed a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// Nothing was mounted inside and the daemon's user could delete all of it.
    AsUser,
    /// Root unmounted these mount points (deepest first) and removed the rest.
    AsRoot { unmounted: Vec<PathBuf> },
}

/// Removes a directory an interrupted operation left in the staging area: as the daemon's user
/// when nothing is mounted inside and that is allowed, otherwise as root after unmounting what
/// is inside. `privileged` is `None` when no privileged runner could be made (no sudo); such a
/// directory is then left in place with an error saying how to remove it by hand.
pub async fn remove_leftover(
    dir: &Path,
    privileged: Option<&dyn Privileged>,
    mounts: &dyn MountTable,
    progress: &dyn Progress,
) -> Result<Removal, WorkDirError> {
    let Some((canon, is_dir)) = resolve(dir).await? else {
        return Ok(Removal::AsUser);
    };
    let mut user_failure = None;
    if read_mounts(mounts, &canon)?.is_empty() {
        let d = canon.clone();
        // remove_dir_all does not follow symlinks; with no mount inside it stays on this file
        // system (nothing else runs at start-up to mount something meanwhile).
        let removed = tokio::task::spawn_blocking(move || {
            if is_dir {
                std::fs::remove_dir_all(&d)
            } else {
                std::fs::remove_file(&d)
            }
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match removed {
            Ok(()) => return Ok(Removal::AsUser),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Removal::AsUser),
            Err(e) => user_failure = Some(e),
        }
    }
    let Some(privileged) = privileged else {
        return Err(WorkDirError::NeedsRoot {
            dir: canon,
            source: user_failure,
        });
    };
    let unmounted =
        remove_as_root(&canon, "leftover directory", privileged, mounts, progress).await?;
    Ok(Removal::AsRoot { unmounted })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::privileged::{HostPrivileged, PrivOutput, RecordingPrivileged};
    use crate::progress::RecordingProgress;
    use crate::testproc::{mount, mounted_under, MountGuard};
    use std::sync::{Arc, Mutex};

    /// A mount table the fake `umount` edits: each unmount removes the last line naming it.
    #[derive(Clone, Default)]
    struct FakeMounts(Arc<Mutex<Vec<String>>>);

    impl FakeMounts {
        fn mount(&self, point: &Path) {
            let escaped = point.display().to_string().replace(' ', "\\040");
            let n = self.0.lock().unwrap().len() + 100;
            self.0.lock().unwrap().push(format!(
                "{n} 1 0:{n} / {escaped} rw,relatime - tmpfs tmpfs rw"
            ));
        }

        fn unmount(&self, point: &str) -> bool {
            let mut lines = self.0.lock().unwrap();
            let escaped = point.replace(' ', "\\040");
            match lines
                .iter()
                .rposition(|l| l.split(' ').nth(4) == Some(escaped.as_str()))
            {
                Some(i) => {
                    lines.remove(i);
                    true
                }
                None => false,
            }
        }
    }

    impl MountTable for FakeMounts {
        fn mountinfo(&self) -> std::io::Result<String> {
            let mut s = "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n".to_owned();
            for l in self.0.lock().unwrap().iter() {
                s.push_str(l);
                s.push('\n');
            }
            Ok(s)
        }
    }

    /// A fake root whose `umount` edits `mounts` (failing for points in `stuck`) and whose `rm`
    /// really removes the directory.
    fn fake_root(mounts: &FakeMounts, stuck: &[&str]) -> RecordingPrivileged {
        let mounts = mounts.clone();
        let stuck: Vec<String> = stuck.iter().map(|s| (*s).to_owned()).collect();
        RecordingPrivileged::new(move |c| {
            let args = c.arg_strings();
            let target = args.last().cloned().unwrap_or_default();
            if c.op.starts_with("unmount ") {
                if stuck.contains(&target) || !mounts.unmount(&target) {
                    return Err(PrivError::failed(&c.op, 32, &["umount: target is busy."]));
                }
            } else if c.op.starts_with("remove ") {
                std::fs::remove_dir_all(&target).unwrap();
            }
            Ok(PrivOutput::default())
        })
    }

    fn canonical_tempdir() -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().canonicalize().unwrap();
        (t, p)
    }

    #[test]
    fn mounts_below_a_directory_are_found_deepest_first_and_unescaped() {
        let info = "\
22 1 8:1 / / rw - ext4 /dev/sda1 rw
30 22 0:5 / /w/op-1/tree/proc rw - proc proc rw
31 22 0:6 / /w/op-1/tree/sys rw - sysfs sysfs rw
32 31 0:7 / /w/op-1/tree/sys/fs/cgroup rw - cgroup2 cgroup2 rw
33 22 0:8 / /w/op-1/tree/dev/my\\040disk rw - devtmpfs udev rw
34 22 0:9 / /w/op-10/tree/proc rw - proc proc rw
35 22 0:9 / /w/op-1 rw - tmpfs tmpfs rw
36 30 0:9 / /w/op-1/tree/proc rw - tmpfs tmpfs rw
";
        let found = mounts_under(info, Path::new("/w/op-1"));
        let found: Vec<_> = found.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(
            found,
            [
                "/w/op-1/tree/sys/fs/cgroup",
                "/w/op-1/tree/dev/my disk",
                "/w/op-1/tree/sys",
                "/w/op-1/tree/proc",
                "/w/op-1/tree/proc",
                "/w/op-1",
            ],
            "op-10 is another directory; a point mounted twice is unmounted twice"
        );
        assert!(mounts_under(info, Path::new("/elsewhere")).is_empty());
        assert_eq!(unescape("a\\134b\\012c\\04"), PathBuf::from("a\\b\nc\\04"));
    }

    #[tokio::test]
    async fn a_leftover_without_mounts_is_removed_as_the_user_without_root() {
        let (_t, root) = canonical_tempdir();
        let dir = root.join("op-x");
        std::fs::create_dir_all(dir.join("out")).unwrap();
        std::fs::write(dir.join("out/rootfs.ext4"), "x").unwrap();
        let fake = fake_root(&FakeMounts::default(), &[]);
        let r = remove_leftover(
            &dir,
            Some(&fake),
            &FakeMounts::default(),
            &RecordingProgress::new(),
        )
        .await
        .unwrap();
        assert_eq!(r, Removal::AsUser);
        assert!(!dir.exists());
        assert!(fake.ops().is_empty(), "{:?}", fake.ops());
        // A file, and a symlink (removed itself, not what it points to).
        let (_keep, elsewhere) = canonical_tempdir();
        std::fs::write(elsewhere.join("precious"), "x").unwrap();
        std::fs::write(root.join("op-file"), "x").unwrap();
        std::os::unix::fs::symlink(&elsewhere, root.join("op-link")).unwrap();
        for name in ["op-file", "op-link"] {
            let r = remove_leftover(
                &root.join(name),
                Some(&fake),
                &FakeMounts::default(),
                &RecordingProgress::new(),
            )
            .await
            .unwrap();
            assert_eq!(r, Removal::AsUser);
            assert!(root.join(name).symlink_metadata().is_err(), "{name}");
        }
        assert!(elsewhere.join("precious").exists());
        assert!(fake.ops().is_empty(), "{:?}", fake.ops());
        // Gone already: nothing to do.
        let r = remove_leftover(
            &dir,
            None,
            &FakeMounts::default(),
            &RecordingProgress::new(),
        )
        .await
        .unwrap();
        assert_eq!(r, Removal::AsUser);
    }

    #[tokio::test]
    async fn a_leftover_with_mounts_is_unmounted_deepest_first_then_removed_as_root() {
        let (_t, root) = canonical_tempdir();
        let dir = root.join("op-x");
        let mounts = FakeMounts::default();
        for p in ["tree/proc", "tree/sys", "tree/sys/kernel/security"] {
            std::fs::create_dir_all(dir.join(p)).unwrap();
            mounts.mount(&dir.join(p));
        }
        let other = root.join("op-y/tree/proc");
        mounts.mount(&other);
        let fake = fake_root(&mounts, &[]);
        let r = remove_leftover(&dir, Some(&fake), &mounts, &RecordingProgress::new())
            .await
            .unwrap();
        let want: Vec<PathBuf> = ["tree/sys/kernel/security", "tree/sys", "tree/proc"]
            .iter()
            .map(|p| dir.join(p))
            .collect();
        assert_eq!(
            r,
            Removal::AsRoot {
                unmounted: want.clone()
            }
        );
        let mut ops: Vec<String> = want
            .iter()
            .map(|p| format!("unmount {}", p.display()))
            .collect();
        ops.push("remove leftover directory".into());
        assert_eq!(fake.ops(), ops);
        let rm = fake.calls().pop().unwrap().arg_strings();
        assert_eq!(
            rm,
            ["-rf", "--one-file-system", "--", &dir.display().to_string()]
        );
        let umount = fake.calls()[0].arg_strings();
        assert_eq!(&umount[..4], ["-l", "-c", "-i", "--"]);
        assert!(!dir.exists());
        assert_eq!(
            mounts_under(&mounts.mountinfo().unwrap(), &root),
            [other],
            "another directory's mounts are not touched"
        );
    }

    #[tokio::test]
    async fn a_mount_that_stays_keeps_the_directory_in_place_with_a_hint() {
        let (_t, root) = canonical_tempdir();
        let dir = root.join("op-x");
        let mounts = FakeMounts::default();
        for p in ["tree/proc", "tree/dev"] {
            std::fs::create_dir_all(dir.join(p)).unwrap();
            mounts.mount(&dir.join(p));
        }
        let stuck = dir.join("tree/dev").display().to_string();
        let fake = fake_root(&mounts, &[&stuck]);
        let err = remove_leftover(&dir, Some(&fake), &mounts, &RecordingProgress::new())
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(&err, WorkDirError::StillMounted { still_mounted, source: Some(_), .. }
                if still_mounted == &[dir.join("tree/dev")]),
            "{msg}"
        );
        assert!(msg.ends_with(&format!("left in place: {stuck}")), "{msg}");
        assert!(err.hint().unwrap().contains("rm -rf --one-file-system"));
        assert!(
            dir.exists(),
            "never removed while something is mounted inside"
        );
        assert!(
            !fake.ops().iter().any(|o| o.starts_with("remove")),
            "{:?}",
            fake.ops()
        );
    }

    #[tokio::test]
    async fn without_a_privileged_runner_a_mounted_leftover_is_left_with_a_hint() {
        let (_t, root) = canonical_tempdir();
        let dir = root.join("op-x");
        std::fs::create_dir_all(dir.join("tree/proc")).unwrap();
        let mounts = FakeMounts::default();
        mounts.mount(&dir.join("tree/proc"));
        let err = remove_leftover(&dir, None, &mounts, &RecordingProgress::new())
            .await
            .unwrap_err();
        assert!(
            matches!(err, WorkDirError::NeedsRoot { source: None, .. }),
            "{err}"
        );
        assert!(err.hint().unwrap().contains(&dir.display().to_string()));
        assert!(
            dir.join("tree/proc").exists(),
            "the user never walks into a mount"
        );
    }

    #[tokio::test]
    async fn a_real_leftover_with_a_tmpfs_and_a_bind_mount_inside_is_unmounted_and_removed() {
        let host = HostPrivileged::detect().unwrap();
        assert!(!host.uses_sudo(), "these tests run as root");
        let (_t, root) = canonical_tempdir();
        let guard = MountGuard(root.clone());
        let dir = root.join("op-build");
        // What the bind mount shows must survive: it stands for the host's /dev.
        let host_dir = root.join("host-dev");
        std::fs::create_dir_all(&host_dir).unwrap();
        std::fs::write(host_dir.join("null"), "precious").unwrap();
        for p in ["tree/proc", "tree/dev", "tree/etc"] {
            std::fs::create_dir_all(dir.join(p)).unwrap();
        }
        std::fs::write(dir.join("tree/etc/shadow"), "root-owned").unwrap();
        mount(
            &["-t", "tmpfs", "banger-test", "--"],
            &dir.join("tree/proc"),
        );
        std::fs::write(dir.join("tree/proc/cpuinfo"), "x").unwrap();
        mount(
            &["--bind", "--", &host_dir.display().to_string()],
            &dir.join("tree/dev"),
        );
        assert_eq!(mounted_under(&dir).len(), 2);

        let r = remove_leftover(&dir, Some(&host), &ProcMounts, &RecordingProgress::new())
            .await
            .unwrap();
        assert_eq!(
            r,
            Removal::AsRoot {
                unmounted: vec![dir.join("tree/proc"), dir.join("tree/dev")]
            }
        );
        assert!(!dir.exists());
        assert!(mounted_under(&root).is_empty());
        assert_eq!(
            std::fs::read_to_string(host_dir.join("null")).unwrap(),
            "precious"
        );
        drop(guard);
    }
}
