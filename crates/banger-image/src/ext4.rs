//! ext4 root filesystems: sizing, creation from a directory tree, and inspection.
//!
//! `mkfs.ext4 -d` is the reference tool for turning a tree into a filesystem, so it is shelled out
//! to, behind the small [`Mkfs`] trait: sizing and file handling are tested with a fake, the real
//! call with real trees. The tree is usually root-owned, so the real [`PrivilegedMkfs`] goes through
//! [`Privileged`]. The image file itself is created by the caller's user and stays sparse.
//! [`fsck_clean`], [`debugfs_cat`] and [`debugfs_readlink`] check built images without mounting them.

use crate::hosttools::{require_tool, MissingTool};
use crate::privileged::{PrivCommand, PrivError, Privileged};
use crate::progress::Progress;
use banger_hint::Hint;
use futures_util::future::BoxFuture;
use std::borrow::Cow;
use std::path::{Path, PathBuf};

/// A size in mebibytes (recipes and config speak MiB; files speak bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MiB(pub u64);

impl MiB {
    pub const fn bytes(self) -> u64 {
        self.0.saturating_mul(1 << 20)
    }
}

/// Filesystem sizes are rounded up to this, which keeps them block- and extent-aligned.
const ROUND: u64 = 64 << 20;
/// Room for the journal (up to 64 MiB at these sizes) plus a margin.
const FIXED_OVERHEAD: u64 = 96 << 20;
/// ext4 labels are at most 16 bytes.
const MAX_LABEL: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    #[error(transparent)]
    MissingTool(#[from] MissingTool),
    #[error("filesystem label `{0}` is longer than 16 bytes")]
    BadLabel(String),
    #[error("filesystem size {0} bytes is not a positive multiple of 4096")]
    BadSize(u64),
    #[error("could not create image file")]
    Io(#[source] std::io::Error),
    #[error("mkfs.ext4 of {tree} into {out} failed")]
    Mkfs {
        tree: PathBuf,
        out: PathBuf,
        #[source]
        source: PrivError,
    },
    #[error("{what} {image} failed: {status}\n{output}")]
    Check {
        what: &'static str,
        image: PathBuf,
        status: String,
        output: String,
    },
    #[error("could not run {program}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Hint for Ext4Error {
    fn hint(&self) -> Option<Cow<'_, str>> {
        match self {
            // Transparent: the missing tool is not in the chain, so its hint is asked here.
            Ext4Error::MissingTool(e) => e.hint(),
            _ => None,
        }
    }
}

impl Ext4Error {
    /// True when mkfs ran out of blocks or inodes: the size estimate was too small.
    pub fn is_too_small(&self) -> bool {
        match self {
            Ext4Error::Mkfs { source, .. } => source.tail().iter().any(|l| {
                l.contains("Could not allocate block")
                    || l.contains("Could not allocate inode")
                    || l.contains("No free space in the filesystem")
            }),
            _ => false,
        }
    }

    /// True when the host disk is full.
    pub fn is_disk_full(&self) -> bool {
        match self {
            Ext4Error::Io(e) => e.raw_os_error() == Some(libc::ENOSPC),
            Ext4Error::Mkfs { source, .. } => source.is_disk_full(),
            _ => false,
        }
    }
}

/// Fills an existing image file with an ext4 filesystem holding `tree`.
pub trait Mkfs: Send + Sync {
    fn mkfs<'a>(
        &'a self,
        tree: &'a Path,
        out: &'a Path,
        label: &'a str,
        progress: &'a dyn Progress,
    ) -> BoxFuture<'a, Result<(), Ext4Error>>;
}

/// Runs `mkfs.ext4 -d` as root, since the tree holds root-only files.
pub struct PrivilegedMkfs<'p> {
    privileged: &'p dyn Privileged,
    bin: PathBuf,
}

impl<'p> PrivilegedMkfs<'p> {
    pub fn new(privileged: &'p dyn Privileged) -> Result<Self, MissingTool> {
        Ok(Self {
            privileged,
            bin: require_tool("mkfs.ext4", "e2fsprogs")?,
        })
    }

    fn command(&self, tree: &Path, out: &Path, label: &str) -> PrivCommand {
        PrivCommand::new("mkfs.ext4", &self.bin)
            .args(["-F", "-q", "-t", "ext4", "-b", "4096"])
            // Everything in a banger guest runs as root, so reserved blocks would protect nobody.
            .args(["-m", "0", "-E", "root_owner=0:0", "-L", label, "-d"])
            .arg(tree)
            .arg(out)
    }
}

impl Mkfs for PrivilegedMkfs<'_> {
    fn mkfs<'a>(
        &'a self,
        tree: &'a Path,
        out: &'a Path,
        label: &'a str,
        progress: &'a dyn Progress,
    ) -> BoxFuture<'a, Result<(), Ext4Error>> {
        Box::pin(async move {
            let cmd = self.command(tree, out, label);
            self.privileged
                .run(&cmd, progress)
                .await
                .map(drop)
                .map_err(|source| Ext4Error::Mkfs {
                    tree: tree.to_owned(),
                    out: out.to_owned(),
                    source,
                })
        })
    }
}

/// Filesystem size for a tree using `content_bytes` of disk (as `du` counts it) that should keep
/// `headroom` free: content plus 1/8 for metadata and slack, journal room, rounded up to 64 MiB.
pub fn size_for_tree(content_bytes: u64, headroom: MiB) -> u64 {
    let raw = content_bytes
        .saturating_add(content_bytes / 8)
        .saturating_add(FIXED_OVERHEAD)
        .saturating_add(headroom.bytes());
    raw.checked_next_multiple_of(ROUND)
        .unwrap_or(u64::MAX / ROUND * ROUND)
}

/// Creates `out` as a sparse file of `size_bytes` and builds an ext4 filesystem labelled `label`
/// from `tree` in it. On failure `out` is removed.
pub async fn make_ext4(
    mkfs: &dyn Mkfs,
    tree: &Path,
    out: &Path,
    size_bytes: u64,
    label: &str,
    progress: &dyn Progress,
) -> Result<(), Ext4Error> {
    if label.len() > MAX_LABEL {
        return Err(Ext4Error::BadLabel(label.to_owned()));
    }
    if size_bytes == 0 || size_bytes & 4095 != 0 {
        return Err(Ext4Error::BadSize(size_bytes));
    }
    let file = fs_err::tokio::File::create(out)
        .await
        .map_err(Ext4Error::Io)?;
    // set_len only records the size: the file stays sparse until mkfs writes into it.
    file.set_len(size_bytes).await.map_err(Ext4Error::Io)?;
    drop(file);
    let result = mkfs.mkfs(tree, out, label, progress).await;
    if result.is_err() {
        // Best effort: the mkfs error is what the caller needs to see.
        let _ = fs_err::tokio::remove_file(out).await;
    }
    result
}

async fn run_tool(
    program: &Path,
    args: &[&std::ffi::OsStr],
) -> Result<(std::process::ExitStatus, String, String), Ext4Error> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| Ext4Error::Spawn {
            program: program.to_owned(),
            source,
        })?;
    Ok((
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Runs `e2fsck -fn` (forced, read-only) and fails unless the filesystem is clean.
pub async fn fsck_clean(image: &Path) -> Result<(), Ext4Error> {
    let e2fsck = require_tool("e2fsck", "e2fsprogs")?;
    let (status, stdout, stderr) = run_tool(&e2fsck, &["-fn".as_ref(), image.as_os_str()]).await?;
    if status.success() {
        Ok(())
    } else {
        Err(Ext4Error::Check {
            what: "e2fsck -fn",
            image: image.to_owned(),
            status: status.to_string(),
            output: format!("{stdout}{stderr}"),
        })
    }
}

async fn debugfs(image: &Path, request: &str) -> Result<String, Ext4Error> {
    let bin = require_tool("debugfs", "e2fsprogs")?;
    let (status, stdout, stderr) =
        run_tool(&bin, &["-R".as_ref(), request.as_ref(), image.as_os_str()]).await?;
    // debugfs exits 0 even when the path is missing; its complaint goes to stderr.
    let complaint = stderr
        .lines()
        .find(|l| !l.starts_with("debugfs ") && !l.trim().is_empty());
    match (status.success(), complaint) {
        (true, None) => Ok(stdout),
        _ => Err(Ext4Error::Check {
            what: "debugfs",
            image: image.to_owned(),
            status: format!("{status} for `{request}`"),
            output: stderr,
        }),
    }
}

/// The content of the regular file `path` inside the ext4 image, without mounting it.
pub async fn debugfs_cat(image: &Path, path: &str) -> Result<String, Ext4Error> {
    // `cat` of a missing file prints nothing and no error, so look it up first.
    debugfs(image, &format!("stat \"{path}\"")).await?;
    debugfs(image, &format!("cat \"{path}\"")).await
}

/// The target of the symlink `path` inside the ext4 image.
pub async fn debugfs_readlink(image: &Path, path: &str) -> Result<String, Ext4Error> {
    let stat = debugfs(image, &format!("stat \"{path}\"")).await?;
    stat.lines()
        .find_map(|l| l.trim().strip_prefix("Fast link dest: "))
        .map(|t| t.trim_matches('"').to_owned())
        .ok_or_else(|| Ext4Error::Check {
            what: "debugfs readlink",
            image: image.to_owned(),
            status: format!("`{path}` is not a (fast) symlink"),
            output: stat,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::privileged::{HostPrivileged, RecordingPrivileged};
    use crate::progress::RecordingProgress;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn size_covers_content_overhead_and_headroom_rounded_to_64_mib() {
        assert_eq!(size_for_tree(0, MiB(0)), 128 << 20);
        let content = 440u64 << 20;
        let size = size_for_tree(content, MiB(512));
        assert_eq!(size % ROUND, 0);
        assert!(size >= content + content / 8 + (512 << 20) + FIXED_OVERHEAD);
        assert!(size < content + content / 8 + (512 << 20) + FIXED_OVERHEAD + ROUND);
        assert_eq!(size_for_tree(u64::MAX, MiB(u64::MAX)) % ROUND, 0);
    }

    #[tokio::test]
    async fn make_ext4_creates_a_sparse_file_of_the_size_then_calls_mkfs() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("root.ext4");
        let fake = RecordingPrivileged::default();
        let mkfs = PrivilegedMkfs::new(&fake).unwrap();
        make_ext4(
            &mkfs,
            Path::new("/tree"),
            &out,
            64 << 20,
            "banger-root",
            &RecordingProgress::new(),
        )
        .await
        .unwrap();
        let meta = std::fs::metadata(&out).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        assert_eq!(meta.blocks(), 0, "file must stay sparse until mkfs writes");
        let calls = fake.calls();
        assert_eq!(calls.len(), 1);
        let args = calls[0].arg_strings();
        assert_eq!(
            args[args.len() - 2..],
            ["/tree".to_string(), out.display().to_string()]
        );
        assert!(
            args.windows(2).any(|w| w == ["-L", "banger-root"]),
            "{args:?}"
        );
    }

    #[tokio::test]
    async fn failed_mkfs_removes_the_file_and_reports_too_small() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("root.ext4");
        let fake = RecordingPrivileged::new(|c| {
            Err(PrivError::failed(
                &c.op,
                1,
                &["__populate_fs: Could not allocate block in ext2 filesystem while writing file \"x\""],
            ))
        });
        let mkfs = PrivilegedMkfs::new(&fake).unwrap();
        let err = make_ext4(
            &mkfs,
            Path::new("/t"),
            &out,
            4096 * 16,
            "x",
            &RecordingProgress::new(),
        )
        .await
        .unwrap_err();
        assert!(err.is_too_small(), "{err}");
        assert!(!out.exists());
    }

    #[tokio::test]
    async fn bad_label_and_size_are_rejected_before_any_work() {
        let fake = RecordingPrivileged::default();
        let mkfs = PrivilegedMkfs::new(&fake).unwrap();
        let p = RecordingProgress::new();
        let out = Path::new("/nonexistent/x");
        assert!(matches!(
            make_ext4(&mkfs, out, out, 4096, "a-label-that-is-too-long", &p).await,
            Err(Ext4Error::BadLabel(_))
        ));
        assert!(matches!(
            make_ext4(&mkfs, out, out, 1000, "l", &p).await,
            Err(Ext4Error::BadSize(1000))
        ));
        assert!(fake.calls().is_empty());
    }

    #[tokio::test]
    async fn real_mkfs_of_a_tree_is_clean_and_readable_with_debugfs() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("etc/ssh")).unwrap();
        std::fs::write(tree.join("etc/ssh/conf"), "PasswordAuthentication no\n").unwrap();
        std::os::unix::fs::symlink("/lib/systemd/systemd", tree.join("init")).unwrap();
        let host = HostPrivileged::detect().unwrap();
        let mkfs = PrivilegedMkfs::new(&host).unwrap();
        let out = dir.path().join("root.ext4");
        let size = size_for_tree(0, MiB(0));
        make_ext4(
            &mkfs,
            &tree,
            &out,
            size,
            "banger-root",
            &RecordingProgress::new(),
        )
        .await
        .unwrap();
        fsck_clean(&out).await.unwrap();
        assert_eq!(
            debugfs_cat(&out, "/etc/ssh/conf").await.unwrap(),
            "PasswordAuthentication no\n"
        );
        assert_eq!(
            debugfs_readlink(&out, "/init").await.unwrap(),
            "/lib/systemd/systemd"
        );
        let missing = debugfs_cat(&out, "/etc/missing").await.unwrap_err();
        assert!(missing.to_string().contains("not found"), "{missing}");
        // Mostly holes: the filesystem is far smaller on disk than its size.
        assert!(std::fs::metadata(&out).unwrap().blocks() * 512 < size / 4);
    }

    #[tokio::test]
    async fn fsck_reports_a_corrupt_image() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("garbage.ext4");
        std::fs::write(&img, vec![0xa5u8; 1 << 20]).unwrap();
        let err = fsck_clean(&img).await.unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("e2fsck -fn") && msg.contains("garbage.ext4"),
            "{msg}"
        );
    }
}
