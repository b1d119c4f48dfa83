//! The flattening driver: verified layer blobs, in order -> one ext4 root file system.
//!
//! Owns the pipeline and its resources: the private staging directory; reading the layers in
//! order, each on two threads (one decompresses and hashes in `oci::layer`, the other parses in
//! `oci::tar`, streams regular-file bytes into staging and merges each entry into the tree,
//! `oci::tree`, as it comes, deleting staged bytes the merge hides); and writing the image
//! (`oci::ext4`). Blocking: the daemon calls it on a blocking thread.
//!
//! # Memory
//! Memory holds metadata only, never file content: the merged tree, one entry at a time, and
//! fixed buffers (a few 256 KiB chunks between a layer's threads, a zstd window of at most
//! 128 MiB). Entries are merged as they stream rather than collected per layer, and every
//! entry's path, link target and extended attributes, plus a fixed cost per entry, count
//! against [`Limits::max_metadata`] (192 MiB by default; a 100,000-file image uses about 20 MB
//! of it), so what a layer can make the daemon hold is bounded whatever its headers say.
//!
//! # Staging
//! Regular-file content goes to `STAGING/<n>`: a flat directory this function creates (0700) or
//! takes over empty, holding numbered files created with `O_CREAT|O_EXCL|O_NOFOLLOW`, mode 0600,
//! by the caller's user. No name, path, mode, owner or type from a layer is ever used on the host,
//! nothing is created outside that directory, and nothing is followed out of it. The directory is
//! removed at the end, on success and on failure.
//!
//! # Verification
//! Blobs in the cache were verified when they were downloaded, and both digests are checked
//! again here while the layer streams. Its entries go into the in-memory tree as they are
//! parsed; if a digest then fails, the tree is thrown away with the error: nothing of a layer
//! reaches the output before both its digests verified, and any failure removes the
//! half-written output.

use super::ext4::{self, Ext4BuildError};
use super::layer::{Budget, Compression, LayerError, LayerStream};
use super::tar::{Content, ImageCounts, Stager, TarError, TarErrorKind, TarReader};
use super::tree::{Tree, TreeError};
use crate::digest::Sha256Digest;
use crate::ext4::MiB;
use crate::progress::Progress;
use banger_hint::Hint;
use std::borrow::Cow;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const COPY_BUF: usize = 256 << 10;
/// Uncompressed bytes per chunk handed between a layer's two threads, and chunks in flight.
const CHUNK: usize = 256 << 10;
const CHUNKS_IN_FLIGHT: usize = 4;
/// How often the bytes read are reported.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// One layer blob to apply, bottom layer first.
#[derive(Debug, Clone)]
pub struct LayerInput {
    /// The blob file (verified when it was cached; verified again here).
    pub path: PathBuf,
    pub compression: Compression,
    /// sha256 of the blob as stored.
    pub digest: Sha256Digest,
    /// sha256 of the uncompressed tar (the image config's `rootfs.diff_ids`).
    pub diff_id: Sha256Digest,
}

/// Bounds on what a layer may make us do, and the free space the image keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Tar entries over all layers (also bounds the tree: twice this many nodes).
    pub max_entries: u64,
    /// Uncompressed bytes of one layer.
    pub max_layer_bytes: u64,
    /// Uncompressed bytes of all layers together.
    pub max_image_bytes: u64,
    /// Bytes of a normalised path (Linux's PATH_MAX).
    pub max_path: usize,
    /// Bytes of one path component (NAME_MAX).
    pub max_name: usize,
    /// Bytes of a symlink target (what ext4 stores).
    pub max_link: usize,
    /// Extended attributes per entry (all of them must also fit ext4's one 4 KiB block).
    pub max_xattrs: usize,
    /// Bytes of one extended attribute value (ext4 stores at most 4096).
    pub max_xattr_value: usize,
    /// Bytes of paths, link targets and extended attributes over all entries of all layers,
    /// plus `oci::tar::ENTRY_MEMORY` per entry: bounds the memory the merge holds (see the
    /// module header).
    pub max_metadata: u64,
    /// Bytes of one PAX or GNU long-name extension header.
    pub max_extension: u64,
    /// Entries of one directory: ext4 keeps at most 65000 subdirectories, and writing a
    /// directory costs time quadratic in its size.
    pub max_dir_entries: usize,
    /// Free space the ext4 keeps for what is installed later (the file is sparse).
    pub ext4_headroom: MiB,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_entries: 1_000_000,
            max_layer_bytes: 32 << 30,
            max_image_bytes: 64 << 30,
            max_path: 4096,
            max_name: 255,
            max_link: 4095,
            max_xattrs: 64,
            max_xattr_value: 4096,
            max_metadata: 192 << 20,
            max_extension: 1 << 20,
            max_dir_entries: 65_000,
            ext4_headroom: MiB(1024),
        }
    }
}

/// What [`flatten_to_ext4`] made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlattenStats {
    /// Tar entries read over all layers.
    pub entries: u64,
    /// Regular files in the image (each inode once).
    pub files: u64,
    /// Bytes of regular-file content in the image.
    pub bytes: u64,
    /// Size of the ext4 file (sparse).
    pub ext4_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum FlattenError {
    #[error("cannot use {path} as the staging directory")]
    Staging {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("layer {index}/{count} (sha256:{digest})")]
    Layer {
        index: usize,
        count: usize,
        digest: Sha256Digest,
        #[source]
        source: Box<LayerError>,
    },
    #[error("layer {index}/{count} (sha256:{digest}) was refused")]
    Tar {
        index: usize,
        count: usize,
        digest: Sha256Digest,
        source: Box<TarError>,
    },
    #[error("layer {index}/{count} (sha256:{digest}) was refused")]
    Tree {
        index: usize,
        count: usize,
        digest: Sha256Digest,
        source: Box<TreeError>,
    },
    #[error("cannot build the root file system {out}")]
    Ext4 {
        out: PathBuf,
        #[source]
        source: Box<Ext4BuildError>,
    },
    #[error(
        "internal error while reading layer {index}/{count} (a bug in banger; please report it)"
    )]
    Panic { index: usize, count: usize },
}

impl Hint for FlattenError {
    fn hint(&self) -> Option<Cow<'_, str>> {
        match self {
            FlattenError::Tar { source, .. } => Some(tar_hint(source).into()),
            FlattenError::Tree { .. } => Some(
                "the image's layers do something banger does not accept; rebuild the image with \
                 a standard tool (docker, buildah, umoci)"
                    .into(),
            ),
            FlattenError::Ext4 { source, .. } => ext4_hint(source).map(Cow::from),
            // A layer's own error is its source, which the report asks itself.
            FlattenError::Staging { .. }
            | FlattenError::Layer { .. }
            | FlattenError::Panic { .. } => None,
        }
    }
}

fn tar_hint(e: &TarError) -> &'static str {
    match e.kind {
        TarErrorKind::MetadataTooLarge { .. } => "real images stay far below this (a 100,000-file image needs about 20 MB of it); the image is broken or built to exhaust memory: ask its publisher",
        TarErrorKind::Read(_) | TarErrorKind::Stage(_) => "check the free space of the disk holding banger's state directory, then pull again",
        _ => "the image contains an archive entry banger does not accept; rebuild the image with a standard tool (docker, buildah, umoci)",
    }
}

/// The hint of an ext4 failure (none when the cause carries its own).
fn ext4_hint(e: &Ext4BuildError) -> Option<&'static str> {
    match e {
        Ext4BuildError::MissingTool(_) => None,
        Ext4BuildError::LineTooLong { .. } | Ext4BuildError::XattrTooLarge { .. } => Some(
            "the image has an entry ext4 (or debugfs) cannot hold; rebuild the image without it",
        ),
        _ => Some(
            "check the free space of the disk holding banger's state directory and that \
             e2fsprogs works (`debugfs -V`); if both are fine, please report this as a banger bug",
        ),
    }
}

/// The private staging directory (see the module header).
pub struct Staging {
    dir: PathBuf,
    next: AtomicU64,
}

impl Staging {
    /// Creates `dir` (0700), or takes it over if it is an empty directory (not a symlink).
    pub fn open(dir: &Path) -> io::Result<Self> {
        let dir = std::path::absolute(dir)?;
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let meta = std::fs::symlink_metadata(&dir)?;
                if !meta.is_dir() {
                    return Err(io::Error::other("it exists and is not a directory"));
                }
                if std::fs::read_dir(&dir)?.next().is_some() {
                    return Err(io::Error::other("it is not empty"));
                }
            }
            Err(e) => return Err(e),
        }
        Ok(Self {
            dir,
            next: AtomicU64::new(1),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of staged id `id`.
    pub fn path(&self, id: u64) -> PathBuf {
        self.dir.join(id.to_string())
    }

    /// A new numbered file, opened for writing.
    pub fn create(&self) -> io::Result<(u64, File)> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let f = File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(self.path(id))?;
        Ok((id, f))
    }

    fn remove(&self, id: u64) {
        // Best effort: the whole directory goes at the end anyway.
        let _ = std::fs::remove_file(self.path(id));
    }

    fn remove_all(&self) -> io::Result<()> {
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Streams regular-file bytes into numbered staging files.
struct StagingStager<'a> {
    staging: &'a Staging,
    buf: Vec<u8>,
}

impl Stager for StagingStager<'_> {
    fn stage(&mut self, data: &mut dyn Read, size: u64) -> io::Result<Content> {
        let (id, mut f) = self.staging.create()?;
        loop {
            let n = match data.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            f.write_all(&self.buf[..n])?;
        }
        Ok(Content::Staged { id, size })
    }
}

/// Why a layer could not be applied.
enum Failure {
    Layer(LayerError),
    Tar(TarError),
    Tree(TreeError),
    Panic,
}

impl Failure {
    /// The image's error for layer `index` of `count`.
    fn into_error(self, index: usize, count: usize, digest: Sha256Digest) -> FlattenError {
        match self {
            Failure::Layer(source) => FlattenError::Layer {
                index,
                count,
                digest,
                source: Box::new(source),
            },
            Failure::Tar(source) => FlattenError::Tar {
                index,
                count,
                digest,
                source: Box::new(source),
            },
            Failure::Tree(source) => FlattenError::Tree {
                index,
                count,
                digest,
                source: Box::new(source),
            },
            Failure::Panic => FlattenError::Panic { index, count },
        }
    }
}

/// Chunks of the uncompressed stream handed from the decompressing thread to the parser; an
/// empty chunk is the end.
struct ChunkReader {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    pos: usize,
    done: bool,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    self.done = chunk.is_empty();
                    self.chunk = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(io::Error::other("the decompressing thread stopped")),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// What one layer's reading shares with the rest of the image.
struct Shared<'a> {
    limits: &'a Limits,
    staging: &'a Staging,
    budget: &'a Budget,
    counts: &'a ImageCounts,
    /// Compressed bytes read over all layers, and the total (for progress).
    read_bytes: &'a AtomicU64,
    total: u64,
    progress: &'a dyn Progress,
}

/// Decompresses and hashes the layer on one thread while the tar is parsed, staged and merged
/// into `tree` on this one (they cost about the same, and two cores are what banger expects).
/// Returns the layer's notices once both its digests verified.
fn apply_layer(
    layer: &LayerInput,
    index: u32,
    tree: &mut Tree,
    shared: &Shared<'_>,
) -> Result<Vec<String>, Failure> {
    let mut stream = LayerStream::open(
        &layer.path,
        layer.compression,
        shared.budget,
        shared.read_bytes,
    )
    .map_err(Failure::Layer)?;
    // Bounded: at most CHUNKS_IN_FLIGHT chunks wait between the threads.
    let (tx, rx) = mpsc::sync_channel::<io::Result<Vec<u8>>>(CHUNKS_IN_FLIGHT);
    // Set once the parser has seen the end of the archive: the rest is still read and hashed.
    let drain = AtomicBool::new(false);
    std::thread::scope(|s| {
        let producer = s.spawn(|| {
            let mut sending = true;
            let mut reported = Instant::now();
            loop {
                let mut chunk = vec![0u8; CHUNK];
                let n = match stream.read(&mut chunk) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let failure = stream.failure();
                        if sending {
                            let _ = tx.send(Err(io::Error::other(e.to_string())));
                        }
                        return Err(Some(failure.unwrap_or(LayerError::Cancelled)));
                    }
                };
                chunk.truncate(n);
                if sending && tx.send(Ok(chunk)).is_err() {
                    if !drain.load(Ordering::Acquire) {
                        // The parser refused the layer; its error is the one to report.
                        return Err(None);
                    }
                    sending = false;
                }
                if reported.elapsed() >= PROGRESS_EVERY {
                    reported = Instant::now();
                    let done = shared.read_bytes.load(Ordering::Relaxed);
                    shared.progress.bytes(done, Some(shared.total));
                }
                if n == 0 {
                    break;
                }
            }
            stream.finish(&layer.digest, &layer.diff_id).map_err(Some)
        });

        let mut stager = StagingStager {
            staging: shared.staging,
            buf: vec![0u8; COPY_BUF],
        };
        let chunks = ChunkReader {
            rx,
            chunk: Vec::new(),
            pos: 0,
            done: false,
        };
        let mut reader = TarReader::new(chunks, shared.limits, shared.counts);
        let failed = loop {
            match reader.next_entry(&mut stager) {
                Ok(Some(e)) => {
                    if let Err(e) = tree.apply(index, e) {
                        break Some(Failure::Tree(e));
                    }
                    for id in tree.take_freed() {
                        shared.staging.remove(id);
                    }
                }
                Ok(None) => break None,
                Err(e) => break Some(Failure::Tar(e)),
            }
        };
        let notices = reader.take_notices();
        if failed.is_none() {
            drain.store(true, Ordering::Release);
        }
        drop(reader);
        // A panic on the decompressing thread is a bug like one on this thread.
        let Ok(produced) = producer.join() else {
            return Err(Failure::Panic);
        };
        match (produced, failed) {
            // A broken, oversized or mismatching stream explains more than the tar error.
            (Err(Some(e)), _) => Err(Failure::Layer(e)),
            (Err(None), Some(f)) | (Ok(_), Some(f)) => Err(f),
            // The stream stops early only when the parser does, with its error.
            (Err(None), None) => Err(Failure::Panic),
            (Ok(_), None) => Ok(notices),
        }
    })
}

/// Flattens `layers` (bottom first) into a new ext4 image at `out` (which must not exist),
/// using `staging` as scratch space (see the module header).
pub fn flatten_to_ext4(
    layers: &[LayerInput],
    out: &Path,
    limits: &Limits,
    staging: &Path,
    progress: &dyn Progress,
) -> Result<FlattenStats, FlattenError> {
    let stage = Staging::open(staging).map_err(|source| FlattenError::Staging {
        path: staging.to_owned(),
        source,
    })?;
    let result = run(layers, out, limits, &stage, progress);
    if let Err(e) = stage.remove_all() {
        progress.notice(&format!(
            "could not remove the staging directory {}: {e}",
            stage.dir().display()
        ));
    }
    result
}

fn run(
    layers: &[LayerInput],
    out: &Path,
    limits: &Limits,
    staging: &Staging,
    progress: &dyn Progress,
) -> Result<FlattenStats, FlattenError> {
    let count = layers.len();
    let budget = Budget::new(limits.max_layer_bytes, limits.max_image_bytes);
    let counts = ImageCounts::default();
    let read_bytes = AtomicU64::new(0);
    let total: u64 = layers
        .iter()
        .filter_map(|l| std::fs::metadata(&l.path).ok())
        .map(|m| m.len())
        .sum();
    let shared = Shared {
        limits,
        staging,
        budget: &budget,
        counts: &counts,
        read_bytes: &read_bytes,
        total,
        progress,
    };
    let mut tree = Tree::new(limits);
    for (i, layer) in layers.iter().enumerate() {
        progress.phase(&format!("layer {}/{count}", i + 1));
        let index = u32::try_from(i).unwrap_or(u32::MAX);
        // A bug hit by a hostile layer must fail this image, not the daemon; the tree it may
        // have left half-changed is dropped with the error.
        let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            apply_layer(layer, index, &mut tree, &shared)
        }))
        .unwrap_or(Err(Failure::Panic));
        let (index, digest) = (i + 1, layer.digest);
        match applied {
            Ok(notices) => {
                for n in notices {
                    progress.notice(&format!("layer {index}/{count}: {n}"));
                }
            }
            Err(failure) => return Err(failure.into_error(index, count, digest)),
        }
    }
    progress.bytes(read_bytes.load(Ordering::Relaxed), Some(total));

    progress.phase("write ext4");
    let stats = tree.stats();
    let (output, notices) =
        ext4::build(&tree, staging, out, limits, progress).map_err(|source| {
            FlattenError::Ext4 {
                out: out.to_owned(),
                source: Box::new(source),
            }
        })?;
    for n in notices {
        progress.notice(&n);
    }
    Ok(FlattenStats {
        entries: counts.entries.load(Ordering::Relaxed),
        files: stats.files,
        bytes: stats.content_bytes,
        ext4_bytes: output.bytes,
    })
}
