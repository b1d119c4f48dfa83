//! File-system helpers the store relies on: copy-on-write clones with a sparse fallback, hashing
//! and durable renames.
//!
//! Root filesystem images are large and mostly holes, so a naive copy would write gigabytes of
//! zeros. [`clone_file`] asks the file system for a reflink (`FICLONE`: instant and shared on
//! btrfs and XFS), and otherwise copies only the data extents found with `SEEK_DATA`/`SEEK_HOLE`,
//! keeping the copy sparse. All functions are blocking; async callers use `spawn_blocking`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::Context;

/// How a copy was made (reported in progress so users know why creation was fast or slow).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneKind {
    Reflink,
    SparseCopy,
}

nix::ioctl_write_int!(ficlone, 0x94, 9);

/// Copies `src` to a new file `dst`: a reflink where supported, else a sparse copy. `dst` is
/// fsynced; on error it is removed.
pub fn clone_file(src: &Path, dst: &Path) -> anyhow::Result<CloneKind> {
    let from = File::open(src).with_context(|| format!("cannot open {}", src.display()))?;
    let to = File::options()
        .write(true)
        .create_new(true)
        .open(dst)
        .with_context(|| format!("cannot create {}", dst.display()))?;
    let result = clone_inner(from, to, src, dst);
    if result.is_err() {
        // Only a file we created ourselves is removed.
        let _ = std::fs::remove_file(dst);
    }
    result
}

fn clone_inner(mut from: File, mut to: File, src: &Path, dst: &Path) -> anyhow::Result<CloneKind> {
    // SAFETY: both descriptors are open for the duration of the call; FICLONE only reads them.
    let reflinked =
        unsafe { ficlone(to.as_raw_fd(), u64::try_from(from.as_raw_fd()).unwrap_or(0)) };
    if reflinked.is_ok() {
        to.sync_all()
            .with_context(|| format!("cannot sync {}", dst.display()))?;
        return Ok(CloneKind::Reflink);
    }
    let len = from.metadata()?.len();
    let mut pos: i64 = 0;
    let end = i64::try_from(len).context("file too large")?;
    let mut buf = vec![0u8; 1 << 20];
    while pos < end {
        let data = match nix::unistd::lseek(&from, pos, nix::unistd::Whence::SeekData) {
            Ok(d) => d,
            Err(nix::errno::Errno::ENXIO) => break, // only a hole is left
            Err(e) => return Err(e).with_context(|| format!("cannot scan {}", src.display())),
        };
        let hole = nix::unistd::lseek(&from, data, nix::unistd::Whence::SeekHole)
            .with_context(|| format!("cannot scan {}", src.display()))?;
        from.seek(SeekFrom::Start(u64::try_from(data)?))?;
        to.seek(SeekFrom::Start(u64::try_from(data)?))?;
        let mut left = u64::try_from(hole - data)?;
        while left > 0 {
            let want = usize::try_from(left.min(buf.len() as u64))?;
            let n = from
                .read(&mut buf[..want])
                .with_context(|| format!("cannot read {}", src.display()))?;
            if n == 0 {
                break;
            }
            to.write_all(&buf[..n])
                .with_context(|| format!("cannot write {}", dst.display()))?;
            left -= n as u64;
        }
        pos = hole;
    }
    to.set_len(len)
        .with_context(|| format!("cannot size {}", dst.display()))?;
    to.sync_all()
        .with_context(|| format!("cannot sync {}", dst.display()))?;
    Ok(CloneKind::SparseCopy)
}

/// sha256 of a file's contents, hex.
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    banger_image::digest::Sha256Digest::of_file(path)
        .map(|d| d.to_string())
        .with_context(|| format!("cannot hash {}", path.display()))
}

/// Makes a rename or create inside `dir` durable.
pub fn fsync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync directory {}", dir.display()))
}

/// Renames `from` to `to` (same file system) and syncs the target's parent directory.
pub fn durable_rename(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::rename(from, to)
        .with_context(|| format!("cannot move {} to {}", from.display(), to.display()))?;
    if let Some(parent) = to.parent() {
        fsync_dir(parent)?;
    }
    Ok(())
}

/// Allocated bytes of a file (what it really costs on disk).
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        {
            let mut f = File::create(&src).unwrap();
            f.write_all(b"head").unwrap();
            f.seek(SeekFrom::Start(64 << 20)).unwrap();
            f.write_all(b"tail").unwrap();
            f.set_len(128 << 20).unwrap();
        }
        let dst = dir.path().join("dst");
        clone_file(&src, &dst).unwrap();
        assert_eq!(sha256_file(&src).unwrap(), sha256_file(&dst).unwrap());
        assert_eq!(std::fs::metadata(&dst).unwrap().len(), 128 << 20);
        assert!(allocated_bytes(&dst) < 4 << 20, "copy is not sparse");
        // An existing destination is never overwritten.
        assert!(clone_file(&src, &dst).is_err());
        assert!(dst.exists());
    }
}
