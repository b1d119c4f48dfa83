//! Verified, resumable downloads over http://, https:// and file:// URLs.
//!
//! [`fetch`] streams a file of known size and SHA-256 into `DEST.part`, resuming an existing part
//! with a `Range` request (a `206` answer is appended, a `200` restarts from zero), and renames it to
//! `DEST` only after size and digest match. A digest mismatch deletes the part, since resuming bad
//! bytes can never succeed; a truncated transfer keeps it so the next attempt resumes.
//! [`fetch_small`] reads small documents (manifests, catalogs) into memory with a size cap.
//! Retrying is the caller's decision; nothing here retries by itself. The resume-and-verify core,
//! [`fetch_resumable`], is shared with the OCI blob cache, which opens registry blobs through its
//! own [`RangeSource`] (authentication, redirects) and keeps its parts elsewhere.

use crate::capped::{read_body_at_most, read_file_at_most, BodyError};
use crate::digest::Sha256Digest;
use crate::progress::{ByteThrottle, Progress};
use banger_hint::Hint;
use futures_util::StreamExt;
use reqwest::header::{HeaderValue, CONTENT_RANGE, RANGE};
use reqwest::{StatusCode, Url};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

const PROGRESS_STEP: u64 = 1 << 20;
const FILE_CHUNK: usize = 256 << 10;

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("`{0}` is neither a URL nor an absolute path")]
    BadUrl(String),
    #[error("cannot fetch {url}: banger fetches http://, https:// and file:// URLs")]
    UnsupportedScheme { url: String },
    #[error("GET {url} returned HTTP {status}")]
    HttpStatus { url: String, status: StatusCode },
    #[error("GET {url} failed")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("reading {url} failed")]
    LocalSource {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("truncated download: {url} into {file} stopped at {got} of {expected} bytes")]
    Truncated {
        url: String,
        file: PathBuf,
        got: u64,
        expected: u64,
        #[source]
        source: Option<reqwest::Error>,
    },
    #[error("{url} is longer than the expected {expected} bytes (got at least {got}); {file} was deleted")]
    Oversized {
        url: String,
        file: PathBuf,
        got: u64,
        expected: u64,
    },
    #[error(
        "digest mismatch: download of {url} into {file} is corrupt: expected sha256 {expected}, got {actual}; \
         the partial file was deleted"
    )]
    DigestMismatch {
        url: String,
        file: PathBuf,
        expected: Sha256Digest,
        actual: Sha256Digest,
    },
    #[error("{url} is larger than {max} bytes, which is too large for what it should be")]
    TooLarge { url: String, max: u64 },
    #[error("no space left on the disk holding {path}")]
    DiskFull { path: PathBuf },
    #[error(transparent)]
    Io(std::io::Error),
}

impl Hint for DownloadError {
    fn hint(&self) -> Option<Cow<'_, str>> {
        match self {
            DownloadError::Truncated { .. } => {
                Some("run the command again to resume from where it stopped".into())
            }
            DownloadError::DigestMismatch { .. } => {
                Some("run the command again; if it keeps failing the source is bad".into())
            }
            DownloadError::DiskFull { .. } => {
                Some("free some space there and run the command again".into())
            }
            _ => None,
        }
    }
}

impl DownloadError {
    fn io(path: &Path, e: std::io::Error) -> Self {
        if is_disk_full(&e) {
            DownloadError::DiskFull {
                path: path.to_owned(),
            }
        } else {
            DownloadError::Io(e)
        }
    }
}

/// Whether an I/O error means the file system is full. By kind as well as by errno: fs-err
/// wraps errors (keeping the kind, losing the raw errno).
pub(crate) fn is_disk_full(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(libc::ENOSPC)
}

/// Parses a URL, or turns an absolute path into a `file://` URL; only http, https and file pass.
pub fn parse_location(s: &str) -> Result<Url, DownloadError> {
    let url = if s.starts_with('/') {
        Url::from_file_path(s).map_err(|()| DownloadError::BadUrl(s.to_owned()))?
    } else {
        Url::parse(s).map_err(|_| DownloadError::BadUrl(s.to_owned()))?
    };
    match url.scheme() {
        "http" | "https" | "file" => Ok(url),
        _ => Err(DownloadError::UnsupportedScheme { url: s.to_owned() }),
    }
}

fn client(url: &Url) -> Result<reqwest::Client, DownloadError> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        // A stalled transfer fails (and can be resumed) instead of hanging forever.
        .read_timeout(Duration::from_secs(60))
        .user_agent(concat!("banger/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|source| DownloadError::Http {
            url: url.to_string(),
            source,
        })
}

fn file_path(url: &Url) -> Result<PathBuf, DownloadError> {
    url.to_file_path()
        .map_err(|()| DownloadError::BadUrl(url.to_string()))
}

/// Reads a small document fully into memory, failing if it exceeds `max_bytes`.
pub async fn fetch_small(url: &Url, max_bytes: u64) -> Result<Vec<u8>, DownloadError> {
    let too_large = || DownloadError::TooLarge {
        url: url.to_string(),
        max: max_bytes,
    };
    if url.scheme() == "file" {
        let path = file_path(url)?;
        let local = |source| DownloadError::LocalSource {
            url: url.to_string(),
            source,
        };
        return read_file_at_most(&path, max_bytes)
            .await
            .map_err(local)?
            .ok_or_else(too_large);
    }
    let http = |source| DownloadError::Http {
        url: url.to_string(),
        source,
    };
    let resp = client(url)?.get(url.clone()).send().await.map_err(http)?;
    if !resp.status().is_success() {
        return Err(DownloadError::HttpStatus {
            url: url.to_string(),
            status: resp.status(),
        });
    }
    read_body_at_most(resp, max_bytes)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge => too_large(),
            BodyError::Http(source) => http(source),
        })
}

/// Where [`fetch`] keeps an incomplete download of `dest`.
pub fn part_path(dest: &Path) -> PathBuf {
    let mut s = OsString::from(dest.as_os_str());
    s.push(".part");
    PathBuf::from(s)
}

/// An open byte stream at some offset of the file being downloaded.
pub(crate) enum Source {
    Http(futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>),
    File(tokio::fs::File),
}

enum Chunk {
    Data(bytes::Bytes),
    End,
    /// The transfer broke off; what arrived so far is kept for resuming.
    Broken(Option<reqwest::Error>),
}

impl Source {
    async fn next(&mut self, url: &str) -> Result<Chunk, DownloadError> {
        match self {
            Source::Http(stream) => Ok(match stream.next().await {
                None => Chunk::End,
                Some(Ok(b)) => Chunk::Data(b),
                Some(Err(e)) => Chunk::Broken(Some(e)),
            }),
            Source::File(f) => {
                let mut buf = vec![0u8; FILE_CHUNK];
                let n = f
                    .read(&mut buf)
                    .await
                    .map_err(|source| DownloadError::LocalSource {
                        url: url.to_owned(),
                        source,
                    })?;
                buf.truncate(n);
                Ok(if n == 0 {
                    Chunk::End
                } else {
                    Chunk::Data(buf.into())
                })
            }
        }
    }
}

/// Opens `url` at byte `offset`; returns the source and the offset it really starts at (0 when
/// the server ignored or could not honour the range).
async fn open_at(url: &Url, offset: u64) -> Result<(Source, u64), DownloadError> {
    if url.scheme() == "file" {
        let path = file_path(url)?;
        let local = |source| DownloadError::LocalSource {
            url: url.to_string(),
            source,
        };
        let mut f = tokio::fs::File::open(&path).await.map_err(local)?;
        let len = f.metadata().await.map_err(local)?.len();
        let start = if offset <= len { offset } else { 0 };
        f.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(local)?;
        return Ok((Source::File(f), start));
    }
    let http = |source| DownloadError::Http {
        url: url.to_string(),
        source,
    };
    let mut req = client(url)?.get(url.clone());
    if let Some(range) = range_from(offset) {
        req = req.header(RANGE, range);
    }
    let resp = req.send().await.map_err(http)?;
    let start = match range_answer(&resp, offset) {
        RangeAnswer::StartsAt(start) => start,
        RangeAnswer::Restart => return Box::pin(open_at(url, 0)).await,
        RangeAnswer::Refused => {
            return Err(DownloadError::HttpStatus {
                url: url.to_string(),
                status: resp.status(),
            })
        }
    };
    Ok((Source::Http(resp.bytes_stream().boxed()), start))
}

/// The `Range` header that asks for a file from byte `offset` on; none from 0.
pub(crate) fn range_from(offset: u64) -> Option<HeaderValue> {
    if offset == 0 {
        return None;
    }
    HeaderValue::from_str(&format!("bytes={offset}-")).ok()
}

/// What an answer to a GET sent with [`range_from`]`(offset)` means for a resumed download.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RangeAnswer {
    /// The body starts at this byte: 0 for a `200` (the server ignored the range), `offset`
    /// for a `206` with exactly the range asked for.
    StartsAt(u64),
    /// Ask again from 0: a `206` for another range cannot be appended safely, and a `416`
    /// means the part is longer than the file is now (it changed). Only when `offset > 0`, so
    /// a restart never restarts again.
    Restart,
    /// Any other status: the caller's error.
    Refused,
}

pub(crate) fn range_answer(resp: &reqwest::Response, offset: u64) -> RangeAnswer {
    match resp.status() {
        StatusCode::OK => RangeAnswer::StartsAt(0),
        StatusCode::PARTIAL_CONTENT if offset > 0 => {
            let start = resp
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(content_range_start);
            if start == Some(offset) {
                RangeAnswer::StartsAt(offset)
            } else {
                RangeAnswer::Restart
            }
        }
        StatusCode::RANGE_NOT_SATISFIABLE if offset > 0 => RangeAnswer::Restart,
        _ => RangeAnswer::Refused,
    }
}

/// `bytes START-END/TOTAL` -> START.
fn content_range_start(v: &str) -> Option<u64> {
    let range = v.trim().strip_prefix("bytes ")?;
    range.split(['-', '/']).next()?.trim().parse().ok()
}

async fn hash_prefix(part: &Path) -> Result<(Sha256, u64), DownloadError> {
    let part = part.to_owned();
    let joined = tokio::task::spawn_blocking(move || crate::digest::hash_file(&part)).await;
    match joined {
        Ok(r) => r.map_err(DownloadError::Io),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(DownloadError::Io(std::io::Error::other(
            "hashing task cancelled",
        ))),
    }
}

/// Downloads `url` to `dest`, resuming `dest.part` if present, and verifies it.
///
/// `dest` appears only with exactly `expected_size` bytes whose SHA-256 is `expected_sha256`.
pub async fn fetch(
    url: &str,
    dest: &Path,
    expected_size: u64,
    expected_sha256: &Sha256Digest,
    progress: &dyn Progress,
) -> Result<(), DownloadError> {
    let url = parse_location(url)?;
    fetch_resumable(
        &UrlSource(url),
        &part_path(dest),
        dest,
        expected_size,
        expected_sha256,
        progress,
    )
    .await
}

/// Where [`fetch_resumable`] reads from.
pub(crate) trait RangeSource {
    /// The caller's error type; the core's own failures (I/O, size, digest) convert into it.
    type Error: From<DownloadError>;
    /// Names the source in messages (a URL without credentials).
    fn location(&self) -> String;
    /// Opens the source at byte `offset`; returns the stream and the offset it really starts at
    /// (0 when the source ignored or could not honour the offset).
    async fn open_at(&self, offset: u64) -> Result<(Source, u64), Self::Error>;
}

/// A plain http, https or file URL.
struct UrlSource(Url);

impl RangeSource for UrlSource {
    type Error = DownloadError;
    fn location(&self) -> String {
        self.0.to_string()
    }
    async fn open_at(&self, offset: u64) -> Result<(Source, u64), DownloadError> {
        open_at(&self.0, offset).await
    }
}

/// The core of [`fetch`]: streams `source` into `part` (resuming what is there: a source that
/// starts at the part's length is appended, one that starts at 0 restarts it), stops as soon as
/// more than `expected_size` bytes arrive (deleting the part), and renames `part` to `dest` only
/// when size and SHA-256 match. A digest mismatch deletes the part; a broken transfer keeps it;
/// a full disk deletes it (keeping it would hold the space that ran out, for a resume that
/// needs more of it).
pub(crate) async fn fetch_resumable<S: RangeSource>(
    source: &S,
    part: &Path,
    dest: &Path,
    expected_size: u64,
    expected_sha256: &Sha256Digest,
    progress: &dyn Progress,
) -> Result<(), S::Error> {
    let target = Target {
        part,
        dest,
        expected_size,
        expected_sha256,
    };
    match fill_part(source, &target, progress).await {
        Ok(()) => Ok(()),
        Err(Failed::Source(e)) => Err(e),
        Err(Failed::Local(e)) => {
            if matches!(e, DownloadError::DiskFull { .. }) {
                if let Err(rm) = fs_err::tokio::remove_file(part).await {
                    if rm.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(error = %rm, "cannot remove a partial download after ENOSPC");
                    }
                }
            }
            Err(e.into())
        }
    }
}

/// Where a [`fill_part`] failure came from: the source (the caller's error) or the download
/// itself (I/O, size, digest).
enum Failed<E> {
    Source(E),
    Local(DownloadError),
}

impl<E> From<DownloadError> for Failed<E> {
    fn from(e: DownloadError) -> Self {
        Failed::Local(e)
    }
}

/// What [`fill_part`] downloads into: the part, the final name and what must arrive.
struct Target<'a> {
    part: &'a Path,
    dest: &'a Path,
    expected_size: u64,
    expected_sha256: &'a Sha256Digest,
}

/// [`fetch_resumable`] up to its clean-up.
async fn fill_part<S: RangeSource>(
    source: &S,
    target: &Target<'_>,
    progress: &dyn Progress,
) -> Result<(), Failed<S::Error>> {
    let Target {
        part,
        dest,
        expected_size,
        expected_sha256,
    } = *target;
    let url = source.location();
    let part = part.to_owned();
    let io = |e| DownloadError::io(&part, e);

    let mut have = match fs_err::tokio::metadata(&part).await {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(io(e).into()),
    };
    if have > expected_size {
        have = 0;
    }
    let (mut hasher, mut got) = if have > 0 {
        hash_prefix(&part).await?
    } else {
        (Sha256::new(), 0)
    };

    let mut throttle = ByteThrottle::new(PROGRESS_STEP);
    if got < expected_size {
        let (mut stream, start) = source.open_at(got).await.map_err(Failed::Source)?;
        if start == 0 {
            hasher = Sha256::new();
            got = 0;
        }
        if start > 0 {
            progress.log(&format!("resuming {url} at byte {start}"));
        }
        let file = fs_err::tokio::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(start == 0)
            .open(&part)
            .await
            .map_err(io)?;
        let mut file = tokio::io::BufWriter::with_capacity(1 << 20, file);
        file.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(io)?;
        throttle.report(progress, got, Some(expected_size));
        let broken = loop {
            match stream.next(&url).await? {
                Chunk::End => break None,
                Chunk::Broken(e) => break Some(e),
                Chunk::Data(data) => {
                    let len = data.len() as u64;
                    if got + len > expected_size {
                        drop(file);
                        let _ = fs_err::tokio::remove_file(&part).await;
                        return Err(DownloadError::Oversized {
                            url,
                            file: part,
                            got: got + len,
                            expected: expected_size,
                        }
                        .into());
                    }
                    file.write_all(&data).await.map_err(io)?;
                    hasher.update(&data);
                    got += len;
                    throttle.report(progress, got, Some(expected_size));
                }
            }
        };
        file.flush().await.map_err(io)?;
        file.get_ref().sync_all().await.map_err(io)?;
        if let Some(source) = broken {
            return Err(DownloadError::Truncated {
                url,
                file: part,
                got,
                expected: expected_size,
                source,
            }
            .into());
        }
    }
    if got < expected_size {
        return Err(DownloadError::Truncated {
            url,
            file: part,
            got,
            expected: expected_size,
            source: None,
        }
        .into());
    }
    let actual = Sha256Digest::from_hasher(hasher);
    if actual != *expected_sha256 {
        fs_err::tokio::remove_file(&part).await.map_err(io)?;
        return Err(DownloadError::DigestMismatch {
            url,
            file: dest.to_owned(),
            expected: *expected_sha256,
            actual,
        }
        .into());
    }
    fs_err::tokio::rename(&part, dest).await.map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::{Event, RecordingProgress};
    use crate::testutil::{Fault, TestServer};

    /// A server with `body` at `/f.bin`, a directory and where in it to download that.
    async fn served(body: &[u8]) -> (TestServer, tempfile::TempDir, PathBuf) {
        let server = TestServer::start().await;
        server.serve("/f.bin", body.to_vec());
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("f.bin");
        (server, dir, dest)
    }

    /// [`fetch`] of `server`'s `/f.bin` into `dest`, expected to be `body`.
    async fn fetch_f(server: &TestServer, dest: &Path, body: &[u8]) -> Result<(), DownloadError> {
        fetch(
            &server.url("/f.bin"),
            dest,
            body.len() as u64,
            &Sha256Digest::of_bytes(body),
            &RecordingProgress::new(),
        )
        .await
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn locations_parse_urls_and_absolute_paths_only() {
        assert_eq!(
            parse_location("/srv/b/manifest.json").unwrap().as_str(),
            "file:///srv/b/manifest.json"
        );
        assert_eq!(
            parse_location("https://h.example/m.json").unwrap().scheme(),
            "https"
        );
        assert!(matches!(
            parse_location("relative/m.json"),
            Err(DownloadError::BadUrl(_))
        ));
        let err = parse_location("ftp://h.example/m.json").unwrap_err();
        assert!(
            err.to_string().contains("http://, https:// and file://"),
            "{err}"
        );
    }

    #[test]
    fn content_range_start_is_parsed() {
        assert_eq!(content_range_start("bytes 100-199/200"), Some(100));
        assert_eq!(content_range_start("bytes */200"), None);
        assert_eq!(content_range_start("items 1-2/3"), None);
    }

    #[tokio::test]
    async fn fetches_over_http_with_byte_progress() {
        let body = data(3 << 20);
        let (server, _dir, dest) = served(&body).await;
        let rec = RecordingProgress::new();
        fetch(
            &server.url("/f.bin"),
            &dest,
            body.len() as u64,
            &Sha256Digest::of_bytes(&body),
            &rec,
        )
        .await
        .unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), body);
        assert!(!part_path(&dest).exists());
        let last = rec
            .events()
            .into_iter()
            .rev()
            .find(|e| matches!(e, Event::Bytes { .. }));
        assert_eq!(
            last,
            Some(Event::Bytes {
                done: body.len() as u64,
                total: Some(body.len() as u64)
            })
        );
    }

    #[tokio::test]
    async fn truncated_transfer_keeps_the_part_and_the_next_fetch_resumes_with_a_range() {
        let body = data(1 << 20);
        let (server, _dir, dest) = served(&body).await;
        server.fault("/f.bin", Fault::Truncate { at: 300_000 });
        let err = fetch_f(&server, &dest, &body).await.unwrap_err();
        match &err {
            DownloadError::Truncated {
                got,
                expected,
                file,
                ..
            } => {
                assert_eq!((*got, *expected), (300_000, body.len() as u64));
                assert_eq!(file, &part_path(&dest));
            }
            other => panic!("expected Truncated, got {other}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("300000 of 1048576 bytes") && msg.contains("f.bin"),
            "{msg}"
        );
        assert_eq!(std::fs::metadata(part_path(&dest)).unwrap().len(), 300_000);

        fetch_f(&server, &dest, &body).await.unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), body);
        assert_eq!(
            server.ranges("/f.bin"),
            [None, Some("bytes=300000-".to_string())]
        );
    }

    #[tokio::test]
    async fn server_ignoring_the_range_restarts_the_part_from_zero() {
        let body = data(200_000);
        let (server, _dir, dest) = served(&body).await;
        server.fault("/f.bin", Fault::IgnoreRange);
        // A stale part with wrong bytes: appending to it would corrupt the result.
        std::fs::write(part_path(&dest), vec![0xffu8; 50_000]).unwrap();
        fetch_f(&server, &dest, &body).await.unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), body);
        assert_eq!(server.ranges("/f.bin"), [Some("bytes=50000-".to_string())]);
    }

    #[tokio::test]
    async fn flipped_byte_is_a_digest_mismatch_naming_file_and_both_digests() {
        let body = data(100_000);
        let (server, _dir, dest) = served(&body).await;
        server.fault("/f.bin", Fault::FlipByte { at: 4242 });
        let expected = Sha256Digest::of_bytes(&body);
        let err = fetch_f(&server, &dest, &body).await.unwrap_err();
        let mut bad = body.clone();
        bad[4242] ^= 0xff;
        let actual = Sha256Digest::of_bytes(&bad);
        let msg = err.to_string();
        assert!(matches!(err, DownloadError::DigestMismatch { .. }), "{msg}");
        assert!(msg.contains(&dest.display().to_string()), "{msg}");
        assert!(
            msg.contains(&expected.to_string()) && msg.contains(&actual.to_string()),
            "{msg}"
        );
        assert!(
            !dest.exists() && !part_path(&dest).exists(),
            "bad bytes must not stay around"
        );
    }

    #[tokio::test]
    async fn a_full_disk_fails_the_download_and_removes_the_partial() {
        let body = data(3 << 20);
        let (server, _dir, dest) = served(&body).await;
        // Every write to /dev/full fails with ENOSPC, as on a file system that filled up.
        std::os::unix::fs::symlink("/dev/full", part_path(&dest)).unwrap();
        let err = fetch_f(&server, &dest, &body).await.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DownloadError::DiskFull { .. }), "{msg}");
        assert!(
            msg.contains(&part_path(&dest).display().to_string()),
            "{msg}"
        );
        assert!(err.hint().unwrap().contains("free some space"), "{msg}");
        assert!(
            std::fs::symlink_metadata(part_path(&dest)).is_err(),
            "the partial download stays behind"
        );
        assert!(!dest.exists());
    }

    #[tokio::test]
    async fn http_error_status_is_reported_with_url_and_reason() {
        let server = TestServer::start().await;
        server.serve("/f.bin", data(10));
        server.fault("/f.bin", Fault::Status(500));
        let dir = tempfile::tempdir().unwrap();
        let url = server.url("/f.bin");
        let err = fetch(
            &url,
            &dir.path().join("f"),
            10,
            &Sha256Digest::of_bytes(b""),
            &RecordingProgress::new(),
        )
        .await
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("GET {url} returned HTTP 500 Internal Server Error")
        );
        let err = fetch(
            &server.url("/missing"),
            &dir.path().join("g"),
            10,
            &Sha256Digest::of_bytes(b""),
            &RecordingProgress::new(),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().ends_with("HTTP 404 Not Found"), "{err}");
    }

    #[tokio::test]
    async fn longer_body_than_expected_is_rejected_and_deleted() {
        let body = data(5000);
        let (server, _dir, dest) = served(&body).await;
        let err = fetch(
            &server.url("/f.bin"),
            &dest,
            4000,
            &Sha256Digest::of_bytes(&body[..4000]),
            &RecordingProgress::new(),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                err,
                DownloadError::Oversized {
                    got: 5000,
                    expected: 4000,
                    ..
                }
            ),
            "{err}"
        );
        assert!(!part_path(&dest).exists());
    }

    #[tokio::test]
    async fn file_urls_fetch_and_resume() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.bin");
        let body = data(700_000);
        std::fs::write(&src, &body).unwrap();
        let dest = dir.path().join("dest.bin");
        std::fs::write(part_path(&dest), &body[..123_456]).unwrap();
        let url = Url::from_file_path(&src).unwrap().to_string();
        fetch(
            &url,
            &dest,
            body.len() as u64,
            &Sha256Digest::of_bytes(&body),
            &RecordingProgress::new(),
        )
        .await
        .unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), body);
        // A short source is a truncated download.
        let short = dir.path().join("short.bin");
        std::fs::write(&short, &body[..100]).unwrap();
        let err = fetch(
            short.to_str().unwrap(),
            &dir.path().join("x"),
            200,
            &Sha256Digest::of_bytes(b""),
            &RecordingProgress::new(),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                err,
                DownloadError::Truncated {
                    got: 100,
                    expected: 200,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn fetch_small_caps_the_size() {
        let server = TestServer::start().await;
        server.serve("/m.json", data(2000));
        let url = parse_location(&server.url("/m.json")).unwrap();
        assert_eq!(fetch_small(&url, 2000).await.unwrap().len(), 2000);
        assert!(matches!(
            fetch_small(&url, 1999).await,
            Err(DownloadError::TooLarge { .. })
        ));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.json");
        std::fs::write(&f, b"{}").unwrap();
        assert_eq!(
            fetch_small(&Url::from_file_path(&f).unwrap(), 10)
                .await
                .unwrap(),
            b"{}"
        );
        let missing = Url::from_file_path(dir.path().join("nope")).unwrap();
        let err = fetch_small(&missing, 10).await.unwrap_err();
        assert!(
            format!("{err}: {}", std::error::Error::source(&err).unwrap()).contains("nope"),
            "{err}"
        );
    }
}
