//! The content-addressed blob cache for OCI images (the daemon puts it at `~/.cache/banger/oci`),
//! and [`fetch_layers`], which fills it with an image's layers.
//!
//! Layout under the root:
//! - `blobs/sha256/<hex>`: complete blobs only, each checked against its descriptor's size and
//!   sha256 while it was written, then fsynced and renamed in (and the directory fsynced).
//! - `partial/<hex>`: a download in progress or interrupted. The next fetch hashes what is there
//!   and resumes with `Range`; a `206` from the offset is appended, a `200` restarts. A transfer
//!   that goes past the declared size stops at once; a digest mismatch or a full disk (ENOSPC)
//!   deletes the partial.
//! - `locks/<hex>`: per-blob `flock`, held while a blob is fetched, so two pulls of one blob
//!   (from two images, or two daemons' worth of requests) never write the same partial.
//!
//! Before [`fetch_layers`] downloads anything, the bytes still missing (declared sizes minus
//! cached blobs and partials) must fit in the free space of the cache's file system (`statvfs`,
//! the space an unprivileged user may fill), so a pull that cannot fit fails at once and says
//! how much it needs instead of filling the disk; the manifest already capped the declared sizes.
//!
//! Names are always formatted from a parsed [`Sha256Digest`], never taken from a document.
//! [`BlobCache::prune`] deletes what a set of kept digests does not name; the caller must put
//! the blobs of pulls in flight into that set (or not prune during pulls). The resume and verify
//! core is `download::fetch_resumable`, shared with bundle downloads.

use crate::digest::Sha256Digest;
use crate::download::{fetch_resumable, RangeSource, Source};
use crate::oci::client::{OciError, RegistryClient, RegistryOptions};
use crate::oci::manifest::ResolvedImage;
use crate::progress::Progress;
use futures_util::{StreamExt, TryStreamExt};
use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// How many layers download at once.
pub const PARALLEL_LAYERS: usize = 3;

/// A blob cache rooted at a directory (created on first use).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobCache {
    root: PathBuf,
}

impl BlobCache {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        BlobCache { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }

    fn partial_dir(&self) -> PathBuf {
        self.root.join("partial")
    }

    fn locks_dir(&self) -> PathBuf {
        self.root.join("locks")
    }

    /// Where a complete, verified blob lives (whether or not it is there yet).
    pub fn blob_path(&self, digest: &Sha256Digest) -> PathBuf {
        self.blobs_dir().join(digest.to_string())
    }

    /// Where an incomplete download of a blob is kept.
    pub fn partial_path(&self, digest: &Sha256Digest) -> PathBuf {
        self.partial_dir().join(digest.to_string())
    }

    fn lock_path(&self, digest: &Sha256Digest) -> PathBuf {
        self.locks_dir().join(digest.to_string())
    }

    /// True when the blob is in the cache with `size` bytes.
    pub async fn contains(&self, digest: &Sha256Digest, size: u64) -> bool {
        tokio::fs::metadata(self.blob_path(digest))
            .await
            .is_ok_and(|m| m.is_file() && m.len() == size)
    }

    async fn ensure_dirs(&self) -> Result<(), OciError> {
        for dir in [self.blobs_dir(), self.partial_dir(), self.locks_dir()] {
            tokio::fs::create_dir_all(&dir)
                .await
                .map_err(|source| cache_err("cannot create", &dir, source))?;
        }
        Ok(())
    }

    /// Makes `digest` (of `size` bytes) present in the cache, downloading it from `client`'s
    /// repository if needed; returns its path. Byte progress goes to `progress.bytes`.
    pub(crate) async fn fetch_blob(
        &self,
        client: &RegistryClient,
        digest: &Sha256Digest,
        size: u64,
        progress: &dyn Progress,
    ) -> Result<PathBuf, OciError> {
        self.ensure_dirs().await?;
        let _lock = BlobLock::acquire(self.lock_path(digest)).await?;
        let dest = self.blob_path(digest);
        match tokio::fs::metadata(&dest).await {
            Ok(m) if m.is_file() && m.len() == size => {
                progress.bytes(size, Some(size));
                return Ok(dest);
            }
            // Present with another size: the cache was damaged (verified blobs never change).
            Ok(_) => tokio::fs::remove_file(&dest)
                .await
                .map_err(|source| cache_err("cannot remove damaged blob", &dest, source))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(cache_err("cannot inspect", &dest, source)),
        }
        let part = self.partial_path(digest);
        if size == 0 {
            // The core resumes from a part; an empty blob has nothing to download into one.
            tokio::fs::write(&part, b"")
                .await
                .map_err(|source| cache_err("cannot create", &part, source))?;
        }
        let source = RegistryBlob { client, digest };
        fetch_resumable(&source, &part, &dest, size, digest, progress).await?;
        sync_dir(&self.blobs_dir()).await?;
        Ok(dest)
    }

    /// How many bytes fetching `blobs` (digest, declared size) would still write: each size
    /// minus what the cache holds of it (a complete blob counts whole, a partial by its
    /// length unless it is longer than the blob, which restarts the download).
    pub(crate) async fn bytes_to_download(
        &self,
        blobs: &[(Sha256Digest, u64)],
    ) -> Result<u64, OciError> {
        let mut needed = 0u64;
        for (digest, size) in blobs {
            if self.contains(digest, *size).await {
                continue;
            }
            let part = self.partial_path(digest);
            let have = match tokio::fs::metadata(&part).await {
                Ok(m) if m.is_file() && m.len() <= *size => m.len(),
                Ok(_) => 0,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
                Err(source) => return Err(cache_err("cannot inspect", &part, source)),
            };
            needed = needed.saturating_add(size - have);
        }
        Ok(needed)
    }

    /// Reads a small blob file whole (the config), refusing one larger than `max`.
    pub(crate) async fn read_small(&self, path: &Path, max: u64) -> Result<Vec<u8>, OciError> {
        crate::capped::read_file_at_most(path, max)
            .await
            .map_err(|source| cache_err("cannot read", path, source))?
            .ok_or_else(|| {
                cache_err(
                    "blob is too large",
                    path,
                    std::io::Error::other(format!("more than {max} bytes")),
                )
            })
    }

    /// Deletes every blob and partial whose digest is not in `keep`, and every lock file not in
    /// use; returns the bytes freed. Blobs being fetched right now (locked) are skipped. Files
    /// whose names are not digests are left alone.
    pub async fn prune(&self, keep: &HashSet<Sha256Digest>) -> Result<u64, OciError> {
        let cache = self.clone();
        let keep = keep.clone();
        let joined = tokio::task::spawn_blocking(move || cache.prune_blocking(&keep)).await;
        match joined {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(cache_err(
                "prune was cancelled in",
                &self.root,
                std::io::Error::other("runtime shutting down"),
            )),
        }
    }

    fn prune_blocking(&self, keep: &HashSet<Sha256Digest>) -> Result<u64, OciError> {
        let mut freed = 0;
        for (dir, is_blob) in [(self.blobs_dir(), true), (self.partial_dir(), false)] {
            for digest in digests_in(&dir)? {
                if keep.contains(&digest) {
                    continue;
                }
                let Some(lock) = BlobLock::try_acquire(&self.lock_path(&digest))
                    .map_err(|s| cache_err("cannot lock", &self.lock_path(&digest), s))?
                else {
                    continue; // a pull is writing it
                };
                let path = if is_blob {
                    self.blob_path(&digest)
                } else {
                    self.partial_path(&digest)
                };
                freed += remove_counted(&path)?;
                if is_blob {
                    freed += remove_counted(&self.partial_path(&digest))?;
                }
                lock.remove()?;
            }
        }
        for digest in digests_in(&self.locks_dir())? {
            let path = self.lock_path(&digest);
            if let Some(lock) =
                BlobLock::try_acquire(&path).map_err(|s| cache_err("cannot lock", &path, s))?
            {
                lock.remove()?;
            }
        }
        Ok(freed)
    }
}

/// Bytes an unprivileged user may still write on the file system holding `path`.
fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("the path holds a NUL byte"))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c_path` is a NUL-terminated string that outlives the call, and `st` points to
    // writable memory of the type statvfs fills in.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it initialised all of `st`.
    let st = unsafe { st.assume_init() };
    // f_bavail, not f_bfree: the blocks reserved for root are not ours to fill.
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

fn cache_err(what: &'static str, path: &Path, source: std::io::Error) -> OciError {
    OciError::Cache {
        what,
        path: path.to_owned(),
        source,
    }
}

/// The digests named by the files of `dir` (missing dir: none); other names are skipped.
fn digests_in(dir: &Path) -> Result<Vec<Sha256Digest>, OciError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(cache_err("cannot list", dir, source)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| cache_err("cannot list", dir, source))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        match name.parse::<Sha256Digest>() {
            // Only names this cache writes: lowercase hex exactly as Display prints it.
            Ok(d) if d.to_string() == name => out.push(d),
            _ => {
                tracing::debug!(path = %entry.path().display(), "prune leaves a foreign file alone")
            }
        }
    }
    Ok(out)
}

/// Removes `path` if it exists; returns its size.
fn remove_counted(path: &Path) -> Result<u64, OciError> {
    let len = match std::fs::symlink_metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(source) => return Err(cache_err("cannot inspect", path, source)),
    };
    match std::fs::remove_file(path) {
        Ok(()) => Ok(len),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(source) => Err(cache_err("cannot remove", path, source)),
    }
}

async fn sync_dir(dir: &Path) -> Result<(), OciError> {
    let d = tokio::fs::File::open(dir)
        .await
        .map_err(|source| cache_err("cannot open", dir, source))?;
    d.sync_all()
        .await
        .map_err(|source| cache_err("cannot sync", dir, source))
}

/// An exclusive `flock` on `locks/<hex>`, released on drop.
///
/// Prune unlinks lock files while holding them, so after locking, the holder checks that the
/// path still names the locked inode; if not, it locks the new file instead. That way two
/// holders can never lock different inodes for the same digest.
struct BlobLock {
    file: std::fs::File,
    path: PathBuf,
}

impl BlobLock {
    async fn acquire(path: PathBuf) -> Result<BlobLock, OciError> {
        let p = path.clone();
        let joined = tokio::task::spawn_blocking(move || BlobLock::lock(&p, libc::LOCK_EX)).await;
        match joined {
            Ok(Ok(Some(lock))) => Ok(lock),
            Ok(Ok(None)) => Err(cache_err(
                "cannot lock",
                &path,
                std::io::Error::other("lock unavailable"),
            )),
            Ok(Err(source)) => Err(cache_err("cannot lock", &path, source)),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(cache_err(
                "cannot lock",
                &path,
                std::io::Error::other("runtime shutting down"),
            )),
        }
    }

    /// The lock if nobody holds it, else `None`. A lock whose holder just released it can still
    /// look held for a moment: a child process forked by another thread shares the descriptor
    /// until its exec closes it. So a few short retries (50 ms in all) tell that apart from a
    /// pull that holds the blob for real.
    fn try_acquire(path: &Path) -> std::io::Result<Option<BlobLock>> {
        for _ in 0..5 {
            if let Some(lock) = BlobLock::lock(path, libc::LOCK_EX | libc::LOCK_NB)? {
                return Ok(Some(lock));
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Ok(None)
    }

    fn lock(path: &Path, op: libc::c_int) -> std::io::Result<Option<BlobLock>> {
        loop {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(path)?;
            loop {
                // SAFETY: flock on a descriptor `file` owns and keeps open for this call.
                let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
                if rc == 0 {
                    break;
                }
                let err = std::io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EWOULDBLOCK) => return Ok(None),
                    _ => return Err(err),
                }
            }
            let held = file.metadata()?;
            match std::fs::metadata(path) {
                Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => {
                    return Ok(Some(BlobLock {
                        file,
                        path: path.to_owned(),
                    }))
                }
                // Pruned between open and flock: lock the file that is there now.
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Deletes the lock file while still holding it, then releases it.
    fn remove(self) -> Result<(), OciError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(cache_err("cannot remove", &self.path, source)),
        }?;
        drop(self.file);
        Ok(())
    }
}

/// A registry blob as a source for the resumable download core.
struct RegistryBlob<'a> {
    client: &'a RegistryClient,
    digest: &'a Sha256Digest,
}

impl RangeSource for RegistryBlob<'_> {
    type Error = OciError;
    fn location(&self) -> String {
        self.client.blob_url(self.digest).to_string()
    }
    async fn open_at(&self, offset: u64) -> Result<(Source, u64), OciError> {
        self.client.open_blob(self.digest, offset).await
    }
}

/// Reports one layer's bytes as an `item` and the sum over all layers as `bytes`.
struct LayerProgress<'a> {
    inner: &'a dyn Progress,
    id: String,
    slot: usize,
    done: &'a [AtomicU64],
    total: u64,
}

impl Progress for LayerProgress<'_> {
    fn phase(&self, name: &str) {
        self.inner.log(name);
    }
    fn bytes(&self, done: u64, total: Option<u64>) {
        self.inner.item(&self.id, done, total);
        self.done[self.slot].store(done, Ordering::Relaxed);
        let sum = self.done.iter().map(|d| d.load(Ordering::Relaxed)).sum();
        self.inner.bytes(sum, Some(self.total));
    }
    fn log(&self, line: &str) {
        self.inner.log(line);
    }
    fn notice(&self, msg: &str) {
        self.inner.notice(msg);
    }
}

/// Downloads every layer of `image` into `cache` (verified against size and sha256), at most
/// [`PARALLEL_LAYERS`] at once. Progress: one `item` stream per layer (id = `sha256:<hex>`) and
/// their sum as `bytes`. Layers already cached are reported complete without traffic. Before any
/// download, what is still missing (declared sizes minus cached blobs and partials) must fit in
/// the cache's free space, else [`OciError::NoSpace`]. On the first failure the other downloads
/// stop; their partials stay for the next attempt (a full disk deletes the one it hit).
pub async fn fetch_layers(
    image: &ResolvedImage,
    options: &RegistryOptions,
    cache: &BlobCache,
    progress: &dyn Progress,
) -> Result<(), OciError> {
    progress.phase(&format!("download layers of {}", image.reference));
    let mut unique: Vec<(Sha256Digest, u64)> = Vec::new();
    for l in &image.layers {
        if !unique.iter().any(|(d, _)| *d == l.digest) {
            unique.push((l.digest, l.size));
        }
    }
    let total = unique.iter().map(|(_, s)| s).sum();
    let done: Vec<AtomicU64> = unique.iter().map(|_| AtomicU64::new(0)).collect();
    // Only contact the registry when something is missing.
    let mut missing = Vec::new();
    for (slot, (digest, size)) in unique.iter().enumerate() {
        if cache.contains(digest, *size).await {
            done[slot].store(*size, Ordering::Relaxed);
            progress.item(&digest.oci(), *size, Some(*size));
        } else {
            missing.push(slot);
        }
    }
    if missing.is_empty() {
        progress.bytes(total, Some(total));
        return Ok(());
    }
    // Refuse up front what cannot fit, rather than fill the disk and fail mid-way.
    cache.ensure_dirs().await?;
    let wanted: Vec<(Sha256Digest, u64)> = missing.iter().map(|slot| unique[*slot]).collect();
    let needed = cache.bytes_to_download(&wanted).await?;
    let free = free_bytes(cache.root()).map_err(|source| {
        cache_err(
            "cannot tell how much space is free in",
            cache.root(),
            source,
        )
    })?;
    if needed > free {
        return Err(OciError::NoSpace {
            reference: image.reference.to_string(),
            path: cache.root().to_owned(),
            needed,
            free,
        });
    }
    let client = RegistryClient::new(&image.reference, options)?;
    let (client, done, unique) = (&client, &done, &unique);
    futures_util::stream::iter(missing)
        .map(|slot| async move {
            let (digest, size) = &unique[slot];
            let layer_progress = LayerProgress {
                inner: progress,
                id: digest.oci(),
                slot,
                done,
                total,
            };
            cache
                .fetch_blob(client, digest, *size, &layer_progress)
                .await
                .map(|_| ())
        })
        .buffer_unordered(PARALLEL_LAYERS)
        .try_collect::<()>()
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::NoProgress;
    use banger_hint::Hint;

    fn d(n: u8) -> Sha256Digest {
        Sha256Digest::of_bytes(&[n])
    }

    #[test]
    fn paths_are_named_by_parsed_digests() {
        let c = BlobCache::new("/c");
        let x = d(1);
        assert_eq!(
            c.blob_path(&x),
            PathBuf::from(format!("/c/blobs/sha256/{x}"))
        );
        assert_eq!(c.partial_path(&x), PathBuf::from(format!("/c/partial/{x}")));
        assert_eq!(c.lock_path(&x), PathBuf::from(format!("/c/locks/{x}")));
    }

    #[tokio::test]
    async fn prune_keeps_named_blobs_and_skips_locked_and_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlobCache::new(dir.path());
        c.ensure_dirs().await.unwrap();
        let (keep, old, busy, part_only, kept_part) = (d(1), d(2), d(3), d(4), d(5));
        for (x, n) in [(keep, 10), (old, 20), (busy, 30)] {
            std::fs::write(c.blob_path(&x), vec![0u8; n]).unwrap();
        }
        std::fs::write(c.partial_path(&part_only), vec![0u8; 7]).unwrap();
        std::fs::write(c.partial_path(&kept_part), vec![0u8; 3]).unwrap();
        std::fs::write(c.lock_path(&old), b"").unwrap();
        std::fs::write(c.blobs_dir().join("not-a-digest"), b"x").unwrap();
        std::fs::write(c.blobs_dir().join(d(9).to_string().to_uppercase()), b"x").unwrap();
        let held = BlobLock::acquire(c.lock_path(&busy)).await.unwrap();
        let keep_set: HashSet<Sha256Digest> = [keep, kept_part].into();
        let freed = c.prune(&keep_set).await.unwrap();
        assert_eq!(freed, 20 + 7);
        assert!(c.blob_path(&keep).exists());
        assert!(!c.blob_path(&old).exists());
        assert!(c.blob_path(&busy).exists(), "a locked blob is in use");
        assert!(!c.partial_path(&part_only).exists());
        assert!(c.partial_path(&kept_part).exists());
        assert!(c.blobs_dir().join("not-a-digest").exists());
        assert!(!c.lock_path(&old).exists(), "unused locks go");
        assert!(c.lock_path(&busy).exists(), "a held lock stays");
        drop(held);
        assert_eq!(c.prune(&keep_set).await.unwrap(), 30);
        assert!(std::fs::read_dir(c.locks_dir()).unwrap().next().is_none());
    }

    fn image_with_layers(sizes: &[u64]) -> ResolvedImage {
        use crate::oci::manifest::{Compression, LayerDescriptor};
        ResolvedImage {
            // Nothing listens on port 1: a pull that got as far as the registry fails to connect.
            reference: crate::oci::reference::Reference::parse("127.0.0.1:1/big/image:1").unwrap(),
            manifest_digest: d(100),
            config: Default::default(),
            config_digest: d(101),
            layers: sizes
                .iter()
                .enumerate()
                .map(|(i, size)| LayerDescriptor {
                    digest: d(i as u8),
                    size: *size,
                    compression: Compression::Gzip,
                    diff_id: d(200),
                })
                .collect(),
        }
    }

    #[tokio::test]
    async fn a_pull_that_cannot_fit_fails_before_downloading_and_says_how_much_is_needed() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlobCache::new(dir.path().join("oci"));
        let free = free_bytes(dir.path()).unwrap();
        let image = image_with_layers(&[free / 2 + (1 << 30), free / 2 + (1 << 30), 10]);
        let err = fetch_layers(&image, &RegistryOptions::default(), &c, &NoProgress)
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, OciError::NoSpace { .. }), "{msg}");
        assert!(err.is_disk_full(), "{msg}");
        assert!(
            msg.contains("127.0.0.1:1/big/image:1")
                && msg.contains(&c.root().display().to_string()),
            "{msg}"
        );
        assert!(err.hint().unwrap().contains("banger image prune"), "{msg}");
        let OciError::NoSpace { needed, .. } = err else {
            unreachable!()
        };
        assert_eq!(needed, 2 * (free / 2 + (1 << 30)) + 10);
    }

    #[tokio::test]
    async fn partials_and_cached_blobs_count_as_already_there() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlobCache::new(dir.path());
        c.ensure_dirs().await.unwrap();
        let image = image_with_layers(&[1000, 5 << 30, 300, 70]);
        let unique: Vec<(Sha256Digest, u64)> =
            image.layers.iter().map(|l| (l.digest, l.size)).collect();
        std::fs::write(c.partial_path(&d(0)), vec![0u8; 400]).unwrap();
        // A sparse 4 GiB partial: counted by its length, costs no disk here.
        std::fs::File::create(c.partial_path(&d(1)))
            .unwrap()
            .set_len(4 << 30)
            .unwrap();
        // Longer than the blob: the download restarts, so it counts for nothing.
        std::fs::write(c.partial_path(&d(2)), vec![0u8; 301]).unwrap();
        assert_eq!(
            c.bytes_to_download(&unique).await.unwrap(),
            600 + (1 << 30) + 300 + 70
        );
    }

    #[tokio::test]
    async fn a_lock_pruned_while_waited_for_is_taken_again_on_the_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlobCache::new(dir.path());
        c.ensure_dirs().await.unwrap();
        let path = c.lock_path(&d(1));
        let first = BlobLock::acquire(path.clone()).await.unwrap();
        let waiter = tokio::spawn(BlobLock::acquire(path.clone()));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        // Prune-style removal while the waiter blocks on the old inode.
        first.remove().unwrap();
        let second = waiter.await.unwrap().unwrap();
        let ino = std::fs::metadata(&path).unwrap().ino();
        assert_eq!(second.file.metadata().unwrap().ino(), ino);
        // And it really excludes others.
        assert!(BlobLock::try_acquire(&path).unwrap().is_none());
    }
}
