//! Layer blobs -> verified, bounded, uncompressed tar streams.
//!
//! Owns: decompression (gzip, zstd with a bounded window, or none), the two digests of a layer (the
//! sha256 of the blob as stored, and the `diff_id`, the sha256 of the uncompressed tar) and the byte
//! budgets that stop decompression bombs. Leaves to `oci::tar` what the bytes mean.
//!
//! A [`LayerStream`] is read by the tar parser; [`LayerStream::finish`] then reads whatever the
//! parser left (padding after the end-of-archive blocks, the rest of the compressed file) so that
//! both digests cover every byte, and compares them. The caller must not use anything parsed from
//! the stream unless `finish` succeeds.
//!
//! Memory stays bounded: gzip needs a 32 KiB window, zstd frames asking for a window above
//! 2^[`ZSTD_WINDOW_LOG_MAX`] bytes are refused, and every read is counted against the per-layer and
//! per-image budgets before the bytes are handed on, so a bomb stops at the limit.

use crate::digest::Sha256Digest;
use banger_hint::Hint;
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Largest zstd window accepted: 128 MiB, which is what `zstd --long` uses; bigger windows are
/// refused instead of allocated.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 27;
/// Read size for the blob file.
const READ_BUF: usize = 256 << 10;

/// How a layer blob is compressed (from its media type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Gzip,
    Zstd,
    None,
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::None => "uncompressed",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("cannot open layer blob {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {compression} data of layer blob {path}: {source}")]
    Decompress {
        path: PathBuf,
        compression: Compression,
        #[source]
        source: io::Error,
    },
    #[error("layer uncompresses to more than {limit} bytes (limit per layer); refusing it as a possible decompression bomb")]
    LayerTooLarge { limit: u64 },
    #[error("the image's layers uncompress to more than {limit} bytes in total (limit per image); refusing them as a possible decompression bomb")]
    ImageTooLarge { limit: u64 },
    #[error("layer blob {path} has digest sha256:{actual}, expected sha256:{expected}")]
    BlobDigest {
        path: PathBuf,
        expected: Sha256Digest,
        actual: Sha256Digest,
    },
    #[error("uncompressed layer has diff_id sha256:{actual}, but the image config says sha256:{expected}")]
    DiffId {
        expected: Sha256Digest,
        actual: Sha256Digest,
    },
    #[error("cancelled because another layer failed")]
    Cancelled,
}

impl Hint for LayerError {
    fn hint(&self) -> Option<Cow<'_, str>> {
        match self {
            LayerError::Open { .. } => Some(
                "the image's layers are missing from the cache or damaged; run `banger image \
                 pull` again (`banger image prune` clears blobs no image needs)"
                    .into(),
            ),
            LayerError::Decompress { .. } => Some(
                "the cached blob is damaged; remove the image's blobs and pull it again".into(),
            ),
            LayerError::BlobDigest { .. } => Some(
                "the cached blob is damaged or was replaced; remove the image's blobs and pull \
                 it again"
                    .into(),
            ),
            LayerError::DiffId { .. } => Some(
                "the image is inconsistent (its config does not describe this layer); ask its \
                 publisher"
                    .into(),
            ),
            LayerError::LayerTooLarge { .. }
            | LayerError::ImageTooLarge { .. }
            | LayerError::Cancelled => None,
        }
    }
}

/// Uncompressed-byte budget of one image, shared by the threads that read its layers.
#[derive(Debug)]
pub struct Budget {
    per_layer: u64,
    per_image: u64,
    used: AtomicU64,
    cancelled: AtomicBool,
}

impl Budget {
    pub fn new(per_layer: u64, per_image: u64) -> Self {
        Self {
            per_layer,
            per_image,
            used: AtomicU64::new(0),
            cancelled: AtomicBool::new(false),
        }
    }

    /// Makes every stream using this budget fail at its next read (another layer failed).
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    /// Uncompressed bytes read so far by all layers.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

/// Hashes and counts every byte read from the blob file.
struct Hashing<'a> {
    file: File,
    hasher: Sha256,
    count: u64,
    progress: &'a AtomicU64,
}

impl Read for Hashing<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        self.progress.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

type Blob<'a> = BufReader<Hashing<'a>>;

enum Decoder<'a> {
    // Boxed: zlib-rs's inflate state makes this variant far larger than the others.
    Gzip(Box<flate2::bufread::MultiGzDecoder<Blob<'a>>>),
    Zstd(zstd::stream::read::Decoder<'static, Blob<'a>>),
    Plain(Blob<'a>),
}

impl<'a> Decoder<'a> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoder::Gzip(d) => d.read(buf),
            Decoder::Zstd(d) => d.read(buf),
            Decoder::Plain(d) => d.read(buf),
        }
    }

    fn into_blob(self) -> Blob<'a> {
        match self {
            Decoder::Gzip(d) => (*d).into_inner(),
            Decoder::Zstd(d) => d.finish(),
            Decoder::Plain(d) => d,
        }
    }
}

/// What went wrong inside [`LayerStream::read`]; the tar parser only sees an `io::Error`, so the
/// stream keeps the real cause for [`LayerStream::failure`].
enum Failure {
    Decompress(io::Error),
    LayerTooLarge,
    ImageTooLarge,
    Cancelled,
}

/// The uncompressed tar stream of one layer, hashed and counted as it is read.
pub struct LayerStream<'a> {
    path: PathBuf,
    compression: Compression,
    decoder: Decoder<'a>,
    hasher: Sha256,
    count: u64,
    budget: &'a Budget,
    failure: Option<Failure>,
}

/// Sizes of a verified layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerSizes {
    pub compressed: u64,
    pub uncompressed: u64,
}

impl<'a> LayerStream<'a> {
    /// Opens the blob at `path`. `progress` is increased by every compressed byte read.
    pub fn open(
        path: &Path,
        compression: Compression,
        budget: &'a Budget,
        progress: &'a AtomicU64,
    ) -> Result<Self, LayerError> {
        let open_err = |source| LayerError::Open {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(open_err)?;
        let blob = BufReader::with_capacity(
            READ_BUF,
            Hashing {
                file,
                hasher: Sha256::new(),
                count: 0,
                progress,
            },
        );
        let decoder = match compression {
            Compression::Gzip => {
                Decoder::Gzip(Box::new(flate2::bufread::MultiGzDecoder::new(blob)))
            }
            Compression::Zstd => {
                let mut d = zstd::stream::read::Decoder::with_buffer(blob).map_err(open_err)?;
                d.window_log_max(ZSTD_WINDOW_LOG_MAX).map_err(open_err)?;
                Decoder::Zstd(d)
            }
            Compression::None => Decoder::Plain(blob),
        };
        Ok(Self {
            path: path.to_owned(),
            compression,
            decoder,
            hasher: Sha256::new(),
            count: 0,
            budget,
            failure: None,
        })
    }

    /// The real cause when a read failed, if the stream (not the caller) failed.
    pub fn failure(&mut self) -> Option<LayerError> {
        Some(match self.failure.take()? {
            Failure::Decompress(source) => LayerError::Decompress {
                path: self.path.clone(),
                compression: self.compression,
                source,
            },
            Failure::LayerTooLarge => LayerError::LayerTooLarge {
                limit: self.budget.per_layer,
            },
            Failure::ImageTooLarge => LayerError::ImageTooLarge {
                limit: self.budget.per_image,
            },
            Failure::Cancelled => LayerError::Cancelled,
        })
    }

    fn fail(&mut self, failure: Failure) -> io::Error {
        let msg = match &failure {
            Failure::Decompress(e) => e.to_string(),
            Failure::LayerTooLarge => "layer too large".into(),
            Failure::ImageTooLarge => "image too large".into(),
            Failure::Cancelled => "cancelled".into(),
        };
        self.failure = Some(failure);
        io::Error::other(msg)
    }

    /// Reads the rest of the stream and of the blob, then checks both digests.
    pub fn finish(
        mut self,
        digest: &Sha256Digest,
        diff_id: &Sha256Digest,
    ) -> Result<LayerSizes, LayerError> {
        // Bytes after the tar's end-of-archive blocks still belong to the diff_id.
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match self.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    return Err(self.failure().unwrap_or(LayerError::Decompress {
                        path: self.path.clone(),
                        compression: self.compression,
                        source: e,
                    }))
                }
            }
        }
        let uncompressed = self.count;
        let actual_diff_id = Sha256Digest::from_hasher(std::mem::take(&mut self.hasher));
        // A decoder may stop before the end of its input (it saw the end of its data); the blob
        // digest must still cover every byte of the file.
        let path = self.path.clone();
        let compression = self.compression;
        let mut blob = self.decoder.into_blob();
        io::copy(&mut blob, &mut io::sink()).map_err(|source| LayerError::Decompress {
            path: path.clone(),
            compression,
            source,
        })?;
        let hashing = blob.into_inner();
        let compressed = hashing.count;
        let actual = Sha256Digest::from_hasher(hashing.hasher);
        if actual != *digest {
            return Err(LayerError::BlobDigest {
                path,
                expected: *digest,
                actual,
            });
        }
        if actual_diff_id != *diff_id {
            return Err(LayerError::DiffId {
                expected: *diff_id,
                actual: actual_diff_id,
            });
        }
        Ok(LayerSizes {
            compressed,
            uncompressed,
        })
    }
}

impl Read for LayerStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.failure.is_some() {
            return Err(io::Error::other("layer stream already failed"));
        }
        if self.budget.cancelled.load(Ordering::Relaxed) {
            return Err(self.fail(Failure::Cancelled));
        }
        // Never decode more than the budgets still allow (plus one byte, to see the overflow), so
        // a bomb costs at most the limit in CPU and nothing in memory.
        let layer_room = self.budget.per_layer.saturating_sub(self.count);
        let image_room = self
            .budget
            .per_image
            .saturating_sub(self.budget.used.load(Ordering::Relaxed));
        let room = layer_room.min(image_room).saturating_add(1);
        let want = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = match self.decoder.read(&mut buf[..want]) {
            Ok(n) => n,
            Err(e) => return Err(self.fail(Failure::Decompress(e))),
        };
        let n64 = n as u64;
        self.count += n64;
        let used = self.budget.used.fetch_add(n64, Ordering::Relaxed) + n64;
        if self.count > self.budget.per_layer {
            return Err(self.fail(Failure::LayerTooLarge));
        }
        if used > self.budget.per_image {
            return Err(self.fail(Failure::ImageTooLarge));
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    struct Blob {
        _dir: tempfile::TempDir,
        path: PathBuf,
        digest: Sha256Digest,
    }

    fn blob(bytes: &[u8]) -> Blob {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, bytes).unwrap();
        Blob {
            _dir: dir,
            path,
            digest: Sha256Digest::of_bytes(bytes),
        }
    }

    fn read_all(
        b: &Blob,
        c: Compression,
        budget: &Budget,
        diff_id: &Sha256Digest,
    ) -> Result<(Vec<u8>, LayerSizes), LayerError> {
        let progress = AtomicU64::new(0);
        let mut s = LayerStream::open(&b.path, c, budget, &progress)?;
        let mut out = Vec::new();
        if s.read_to_end(&mut out).is_err() {
            return Err(s.failure().unwrap());
        }
        let sizes = s.finish(&b.digest, diff_id)?;
        assert_eq!(progress.load(Ordering::Relaxed), sizes.compressed);
        Ok((out, sizes))
    }

    #[test]
    fn each_compression_yields_the_data_and_checks_both_digests() {
        let data = b"hello layer".repeat(1000);
        let diff_id = Sha256Digest::of_bytes(&data);
        let zstd = zstd::encode_all(&data[..], 3).unwrap();
        for (c, bytes) in [
            (Compression::Gzip, gzip(&data)),
            (Compression::Zstd, zstd),
            (Compression::None, data.clone()),
        ] {
            let b = blob(&bytes);
            let budget = Budget::new(1 << 20, 1 << 20);
            let (out, sizes) = read_all(&b, c, &budget, &diff_id).unwrap();
            assert_eq!(out, data, "{c}");
            assert_eq!(sizes.uncompressed, data.len() as u64);
            assert_eq!(sizes.compressed, bytes.len() as u64);
        }
    }

    #[test]
    fn concatenated_gzip_members_are_all_read() {
        let mut bytes = gzip(b"first ");
        bytes.extend(gzip(b"second"));
        let b = blob(&bytes);
        let (out, _) = read_all(
            &b,
            Compression::Gzip,
            &Budget::new(100, 100),
            &Sha256Digest::of_bytes(b"first second"),
        )
        .unwrap();
        assert_eq!(out, b"first second");
    }

    #[test]
    fn a_wrong_blob_digest_or_diff_id_names_both_values() {
        let data = b"abc".to_vec();
        let mut b = blob(&gzip(&data));
        let good = b.digest;
        b.digest = Sha256Digest::of_bytes(b"other");
        let err = read_all(
            &b,
            Compression::Gzip,
            &Budget::new(100, 100),
            &Sha256Digest::of_bytes(&data),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, LayerError::BlobDigest { .. }), "{msg}");
        assert!(msg.contains(&good.to_string()), "{msg}");
        assert!(err.hint().unwrap().contains("pull it again"), "{msg}");
        b.digest = good;
        let err = read_all(
            &b,
            Compression::Gzip,
            &Budget::new(100, 100),
            &Sha256Digest::of_bytes(b"abd"),
        )
        .unwrap_err();
        assert!(matches!(err, LayerError::DiffId { .. }), "{err}");
    }

    #[test]
    fn trailing_bytes_after_the_stream_count_in_the_digests() {
        // An uncompressed layer: bytes after what a reader consumed still change diff_id.
        let b = blob(b"abcdef");
        let progress = AtomicU64::new(0);
        let budget = Budget::new(100, 100);
        let mut s = LayerStream::open(&b.path, Compression::None, &budget, &progress).unwrap();
        let mut first = [0u8; 2];
        s.read_exact(&mut first).unwrap();
        let sizes = s
            .finish(&b.digest, &Sha256Digest::of_bytes(b"abcdef"))
            .unwrap();
        assert_eq!(sizes.uncompressed, 6);
        // Garbage after a gzip stream is refused, not ignored.
        let mut bytes = gzip(b"abc");
        bytes.extend_from_slice(b"junk after the member");
        let b = blob(&bytes);
        let err = read_all(
            &b,
            Compression::Gzip,
            &budget,
            &Sha256Digest::of_bytes(b"abc"),
        )
        .unwrap_err();
        assert!(matches!(err, LayerError::Decompress { .. }), "{err}");
    }

    #[test]
    fn a_bomb_stops_at_the_layer_limit_and_at_the_image_limit() {
        let zeros = vec![0u8; 8 << 20];
        let b = blob(&gzip(&zeros));
        let any = Sha256Digest::of_bytes(b"");
        let err =
            read_all(&b, Compression::Gzip, &Budget::new(1 << 20, 1 << 30), &any).unwrap_err();
        assert!(
            matches!(err, LayerError::LayerTooLarge { limit } if limit == 1 << 20),
            "{err}"
        );
        assert!(err.to_string().contains("decompression bomb"), "{err}");
        let budget = Budget::new(1 << 30, 12 << 20);
        let (_, _) = read_all(
            &b,
            Compression::Gzip,
            &budget,
            &Sha256Digest::of_bytes(&zeros),
        )
        .unwrap();
        let err = read_all(&b, Compression::Gzip, &budget, &any).unwrap_err();
        assert!(matches!(err, LayerError::ImageTooLarge { .. }), "{err}");
        assert!(budget.used() <= (12 << 20) + 1 + (64 << 10));
    }

    #[test]
    fn zstd_frames_wanting_a_huge_window_are_refused() {
        // Window log 30 (1 GiB) through the long-distance mode, above the 2^27 limit.
        let data = vec![7u8; 1 << 20];
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
        enc.long_distance_matching(true).unwrap();
        enc.window_log(30).unwrap();
        enc.write_all(&data).unwrap();
        let b = blob(&enc.finish().unwrap());
        let err = read_all(
            &b,
            Compression::Zstd,
            &Budget::new(1 << 30, 1 << 30),
            &Sha256Digest::of_bytes(&data),
        )
        .unwrap_err();
        assert!(matches!(err, LayerError::Decompress { .. }), "{err}");
    }

    #[test]
    fn cancelling_the_budget_stops_readers() {
        let b = blob(b"data");
        let budget = Budget::new(100, 100);
        budget.cancel();
        let err = read_all(
            &b,
            Compression::None,
            &budget,
            &Sha256Digest::of_bytes(b"data"),
        )
        .unwrap_err();
        assert!(matches!(err, LayerError::Cancelled));
    }
}
