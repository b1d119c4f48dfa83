//! Image bundles: the on-disk and on-the-wire format for distributing a built image.
//!
//! A bundle is a directory holding `manifest.json` and one zstd-compressed file per role (root
//! filesystem, kernel, optional initrd). The manifest records, per file, the size and SHA-256 of
//! both the compressed bytes (checked after download) and the raw bytes (checked after
//! decompression), so every byte is verified before use. This module owns the manifest type,
//! writing bundles crash-safely ([`export`]: temporary names, fsync, rename, manifest last) and
//! unpacking one file with verification while keeping the output sparse ([`unpack_file`]).
//! Fetching bundles over the network is `pull`'s job.

use crate::blocking::run_blocking;
use crate::digest::Sha256Digest;
use crate::progress::{ByteThrottle, Progress};
use banger_hint::Hint;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use time::OffsetDateTime;

/// The manifest format this code writes and reads.
pub const FORMAT: u32 = 1;
pub const MANIFEST_NAME: &str = "manifest.json";
/// Manifests are small; anything bigger is not a manifest.
pub const MANIFEST_MAX_BYTES: u64 = 1 << 20;
const ARCH: &str = "x86_64";
const ZSTD_LEVEL: i32 = 6;
const BLOCK: usize = 4096;
const CHUNK: usize = 1 << 20;
const PROGRESS_STEP: u64 = 8 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Rootfs,
    Kernel,
    Initrd,
}

impl Role {
    /// Name of the compressed file in a bundle.
    pub fn bundle_file_name(self) -> &'static str {
        match self {
            Role::Rootfs => "rootfs.ext4.zst",
            Role::Kernel => "vmlinuz.zst",
            Role::Initrd => "initrd.img.zst",
        }
    }

    /// Name of the unpacked file.
    pub fn raw_file_name(self) -> &'static str {
        match self {
            Role::Rootfs => "rootfs.ext4",
            Role::Kernel => "vmlinuz",
            Role::Initrd => "initrd.img",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Rootfs => "rootfs",
            Role::Kernel => "kernel",
            Role::Initrd => "initrd",
        }
    }
}

/// One file of a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub role: Role,
    /// Relative to the manifest's location; a plain relative path, never absolute or with `..`.
    pub path: String,
    /// Compressed size in bytes.
    pub size: u64,
    /// SHA-256 of the compressed bytes.
    pub sha256: Sha256Digest,
    pub raw_size: u64,
    pub raw_sha256: Sha256Digest,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub name: String,
    pub version: String,
    pub arch: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    pub files: Vec<FileEntry>,
}

/// The files [`export`] packs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleSources {
    pub rootfs: PathBuf,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle manifest is not valid JSON of the expected shape")]
    ManifestJson(#[source] serde_json::Error),
    #[error("bundle manifest format {found} is not supported; this banger reads format {FORMAT}")]
    UnsupportedFormat { found: u32 },
    #[error("bundle manifest is invalid: {0}")]
    ManifestInvalid(String),
    #[error("bundle name `{0}` must be lowercase letters, digits, '-', '_' or '.'")]
    BadName(String),
    #[error("no space left on the disk holding {path}")]
    DiskFull { path: PathBuf },
    #[error("{path} is not empty; a bundle is exported into a new or empty directory")]
    NotEmpty { path: PathBuf },
    #[error(transparent)]
    Io(std::io::Error),
    #[error("{file} is not valid zstd data")]
    Corrupt {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{file}: decompressed content does not match the manifest: expected {expected_size} bytes \
         with sha256 {expected}, got {actual_size} bytes with sha256 {actual}"
    )]
    RawMismatch {
        file: PathBuf,
        expected: Sha256Digest,
        actual: Sha256Digest,
        expected_size: u64,
        actual_size: u64,
    },
}

impl Hint for BundleError {
    fn hint(&self) -> Option<Cow<'_, str>> {
        match self {
            BundleError::UnsupportedFormat { .. } => Some("upgrade banger".into()),
            BundleError::DiskFull { .. } => {
                Some("free some space there and run the command again".into())
            }
            BundleError::NotEmpty { .. } => {
                Some("name a directory that does not exist yet, or empty this one".into())
            }
            _ => None,
        }
    }
}

impl BundleError {
    /// Wraps an I/O error, turning ENOSPC into [`BundleError::DiskFull`] for `path`.
    pub(crate) fn io(path: &Path, e: std::io::Error) -> Self {
        if e.raw_os_error() == Some(libc::ENOSPC) {
            BundleError::DiskFull {
                path: path.to_owned(),
            }
        } else {
            BundleError::Io(e)
        }
    }
}

impl Manifest {
    /// Parses and validates a manifest.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, BundleError> {
        // Check the format first so a newer manifest gets "upgrade banger", not a shape error.
        #[derive(Deserialize)]
        struct FormatOnly {
            format: u32,
        }
        let f: FormatOnly = serde_json::from_slice(bytes).map_err(BundleError::ManifestJson)?;
        if f.format != FORMAT {
            return Err(BundleError::UnsupportedFormat { found: f.format });
        }
        let m: Manifest = serde_json::from_slice(bytes).map_err(BundleError::ManifestJson)?;
        m.validate()?;
        Ok(m)
    }

    pub fn validate(&self) -> Result<(), BundleError> {
        let bad = |s: String| Err(BundleError::ManifestInvalid(s));
        if self.format != FORMAT {
            return Err(BundleError::UnsupportedFormat { found: self.format });
        }
        if !is_bundle_name(&self.name) || !is_bundle_name(&self.version) {
            return bad(format!(
                "name `{}` and version `{}` must be lowercase letters, digits, '-', '_' or '.'",
                self.name, self.version
            ));
        }
        if self.arch != ARCH {
            return bad(format!(
                "arch is `{}`, but banger runs {ARCH} guests only",
                self.arch
            ));
        }
        for role in [Role::Rootfs, Role::Kernel, Role::Initrd] {
            let n = self.files.iter().filter(|f| f.role == role).count();
            let required = role != Role::Initrd;
            if n > 1 || (required && n == 0) {
                return bad(format!(
                    "needs {} {} file, has {n}",
                    if required {
                        "exactly one"
                    } else {
                        "at most one"
                    },
                    role.as_str()
                ));
            }
        }
        for f in &self.files {
            if !is_relative_file_path(&f.path) {
                return bad(format!(
                    "file path `{}` must be relative, without `..`, a scheme, `?`, `#` or `%`",
                    f.path
                ));
            }
            if f.size == 0 || f.raw_size == 0 {
                return bad(format!("file `{}` has a zero size", f.path));
            }
        }
        Ok(())
    }

    pub fn file(&self, role: Role) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.role == role)
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain data with string keys cannot fail.
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }
}

fn is_bundle_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
}

fn is_relative_file_path(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && !p.contains(['\\', '?', '#', '\0', ':', '%'])
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Compresses `sources` into a bundle in `out_dir` (created if needed) and writes its manifest.
///
/// Crash safety: an old `manifest.json` is removed first and the new one is written last, each file
/// goes through a temporary name, fsync and rename, so a directory with a manifest is always a
/// complete bundle.
pub async fn export(
    sources: &BundleSources,
    name: &str,
    version: &str,
    out_dir: &Path,
    progress: &dyn Progress,
) -> Result<Manifest, BundleError> {
    if !is_bundle_name(name) {
        return Err(BundleError::BadName(name.to_owned()));
    }
    if !is_bundle_name(version) {
        return Err(BundleError::BadName(version.to_owned()));
    }
    let mut inputs = vec![
        (Role::Rootfs, sources.rootfs.clone()),
        (Role::Kernel, sources.kernel.clone()),
    ];
    if let Some(i) = &sources.initrd {
        inputs.push((Role::Initrd, i.clone()));
    }
    let (name, version, out_dir) = (name.to_owned(), version.to_owned(), out_dir.to_owned());
    run_blocking(progress, move |p| {
        export_blocking(&inputs, name, version, &out_dir, p)
    })
    .await
    .map_err(BundleError::Io)?
}

fn export_blocking(
    inputs: &[(Role, PathBuf)],
    name: String,
    version: String,
    out_dir: &Path,
    progress: &dyn Progress,
) -> Result<Manifest, BundleError> {
    let io = |e| BundleError::io(out_dir, e);
    let created = !out_dir.exists();
    fs_err::create_dir_all(out_dir).map_err(io)?;
    // Never mix a bundle into other files, or overwrite one: whatever is there stays as it was.
    if fs_err::read_dir(out_dir).map_err(io)?.next().is_some() {
        return Err(BundleError::NotEmpty {
            path: out_dir.to_owned(),
        });
    }
    let result = write_bundle(inputs, name, version, out_dir, progress);
    if result.is_err() {
        // The directory was empty (or new): what is in it now is this export's, half-written.
        // Take it back, so that running the command again is all it takes.
        if created {
            let _ = fs_err::remove_dir_all(out_dir);
        } else if let Ok(entries) = fs_err::read_dir(out_dir) {
            for e in entries.flatten() {
                let _ = fs_err::remove_file(e.path());
            }
        }
    }
    result
}

fn write_bundle(
    inputs: &[(Role, PathBuf)],
    name: String,
    version: String,
    out_dir: &Path,
    progress: &dyn Progress,
) -> Result<Manifest, BundleError> {
    let mut files = Vec::new();
    for (role, src) in inputs {
        progress.phase(&format!("compress {}", role.as_str()));
        files.push(compress_one(*role, src, out_dir, progress)?);
    }
    let manifest = Manifest {
        format: FORMAT,
        name,
        version,
        arch: ARCH.to_owned(),
        created_at: OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .unwrap_or_else(|_| OffsetDateTime::now_utc()),
        files,
    };
    manifest.validate()?;
    write_atomically(out_dir, MANIFEST_NAME, &manifest.to_json())?;
    Ok(manifest)
}

/// Counts and hashes what passes through to the inner writer.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn new_temp(dir: &Path, final_name: &str) -> Result<tempfile::NamedTempFile, BundleError> {
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{final_name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| BundleError::io(dir, e))?;
    // Bundles are meant to be served and shared; tempfile creates 0600.
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(|e| BundleError::io(dir, e))?;
    Ok(tmp)
}

fn persist(tmp: tempfile::NamedTempFile, dir: &Path, final_name: &str) -> Result<(), BundleError> {
    let dest = dir.join(final_name);
    tmp.as_file()
        .sync_all()
        .map_err(|e| BundleError::io(&dest, e))?;
    tmp.persist(&dest)
        .map_err(|e| BundleError::io(&dest, e.error))?;
    sync_dir(dir).map_err(|e| BundleError::io(dir, e))
}

fn write_atomically(dir: &Path, name: &str, data: &[u8]) -> Result<(), BundleError> {
    let mut tmp = new_temp(dir, name)?;
    tmp.write_all(data).map_err(|e| BundleError::io(dir, e))?;
    persist(tmp, dir, name)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs_err::File::open(dir)?.sync_all()
}

fn compress_one(
    role: Role,
    src: &Path,
    out_dir: &Path,
    progress: &dyn Progress,
) -> Result<FileEntry, BundleError> {
    let final_name = role.bundle_file_name();
    let mut input = fs_err::File::open(src).map_err(BundleError::Io)?;
    let total = input.metadata().map_err(BundleError::Io)?.len();
    let tmp = new_temp(out_dir, final_name)?;
    let out_io = |e| BundleError::io(out_dir, e);
    let writer = HashingWriter {
        inner: std::io::BufWriter::new(tmp.as_file().try_clone().map_err(out_io)?),
        hasher: Sha256::new(),
        count: 0,
    };
    let mut enc = zstd::stream::Encoder::new(writer, ZSTD_LEVEL).map_err(out_io)?;
    // Lets `unpack_file` size its output before decompressing.
    enc.include_contentsize(true).map_err(out_io)?;
    enc.set_pledged_src_size(Some(total)).map_err(out_io)?;
    let mut raw_hasher = Sha256::new();
    let mut raw_size = 0u64;
    let mut buf = vec![0u8; CHUNK];
    let mut throttle = ByteThrottle::new(PROGRESS_STEP);
    loop {
        let n = input.read(&mut buf).map_err(BundleError::Io)?;
        if n == 0 {
            break;
        }
        raw_hasher.update(&buf[..n]);
        enc.write_all(&buf[..n]).map_err(out_io)?;
        raw_size += n as u64;
        throttle.report(progress, raw_size, Some(total));
    }
    let mut writer = enc.finish().map_err(out_io)?;
    writer.flush().map_err(out_io)?;
    let entry = FileEntry {
        role,
        path: final_name.to_owned(),
        size: writer.count,
        sha256: Sha256Digest::from_hasher(writer.hasher),
        raw_size,
        raw_sha256: Sha256Digest::from_hasher(raw_hasher),
    };
    drop(writer.inner);
    persist(tmp, out_dir, final_name)?;
    Ok(entry)
}

/// Decompresses `compressed` (the bundle file of `entry`) into `out`, verifying the raw size and
/// SHA-256. Runs of zero blocks become holes, so an ext4 image stays sparse. `out` appears only
/// when complete and verified (temporary name in the same directory, fsync, rename).
pub async fn unpack_file(
    compressed: &Path,
    entry: &FileEntry,
    out: &Path,
    progress: &dyn Progress,
) -> Result<(), BundleError> {
    let (compressed, entry, out) = (compressed.to_owned(), entry.clone(), out.to_owned());
    run_blocking(progress, move |p| {
        unpack_blocking(&compressed, &entry, &out, p)
    })
    .await
    .map_err(BundleError::Io)?
}

fn unpack_blocking(
    compressed: &Path,
    entry: &FileEntry,
    out: &Path,
    progress: &dyn Progress,
) -> Result<(), BundleError> {
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let final_name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| entry.role.raw_file_name().to_owned());
    let input = fs_err::File::open(compressed).map_err(BundleError::Io)?;
    let corrupt = |source| BundleError::Corrupt {
        file: compressed.to_owned(),
        source,
    };
    let mut dec = zstd::stream::Decoder::new(input).map_err(corrupt)?;
    let tmp = new_temp(dir, &final_name)?;
    let file = tmp.as_file();
    let out_io = |e| BundleError::io(dir, e);
    let mut hasher = Sha256::new();
    let mut offset = 0u64;
    let mut buf = vec![0u8; CHUNK];
    let mut throttle = ByteThrottle::new(PROGRESS_STEP);
    let mut oversized = false;
    loop {
        let n = read_full(&mut dec, &mut buf).map_err(corrupt)?;
        if n == 0 {
            break;
        }
        if offset.saturating_add(n as u64) > entry.raw_size {
            // Stop early instead of filling the disk with an oversized stream.
            oversized = true;
            offset = offset.saturating_add(n as u64);
            break;
        }
        let data = &buf[..n];
        hasher.update(data);
        write_sparse(file, offset, data).map_err(out_io)?;
        offset += n as u64;
        throttle.report(progress, offset, Some(entry.raw_size));
    }
    let actual = Sha256Digest::from_hasher(hasher);
    if oversized || offset != entry.raw_size || actual != entry.raw_sha256 {
        return Err(BundleError::RawMismatch {
            file: compressed.to_owned(),
            expected: entry.raw_sha256,
            actual,
            expected_size: entry.raw_size,
            actual_size: offset,
        });
    }
    // Extends the file over trailing holes (write_sparse skips zero blocks).
    file.set_len(offset).map_err(out_io)?;
    persist(tmp, dir, &final_name)
}

/// Reads until `buf` is full or the stream ends.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Writes the non-zero 4 KiB blocks of `data` at `offset`, coalescing neighbours into one write.
fn write_sparse(file: &std::fs::File, offset: u64, data: &[u8]) -> std::io::Result<()> {
    let mut run_start: Option<usize> = None;
    let mut pos = 0;
    for block in data.chunks(BLOCK) {
        let zero = block.iter().all(|&b| b == 0);
        match (zero, run_start) {
            (false, None) => run_start = Some(pos),
            (true, Some(s)) => {
                file.write_all_at(&data[s..pos], offset + s as u64)?;
                run_start = None;
            }
            _ => {}
        }
        pos += block.len();
    }
    if let Some(s) = run_start {
        file.write_all_at(&data[s..], offset + s as u64)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::RecordingProgress;
    use std::os::unix::fs::MetadataExt;

    fn sample_manifest() -> Manifest {
        let d = Sha256Digest::of_bytes(b"x");
        Manifest {
            format: 1,
            name: "debian-bookworm".into(),
            version: "2025.05.1".into(),
            arch: "x86_64".into(),
            created_at: time::macros::datetime!(2025-05-20 12:00:00 UTC),
            files: vec![
                FileEntry {
                    role: Role::Rootfs,
                    path: "rootfs.ext4.zst".into(),
                    size: 10,
                    sha256: d,
                    raw_size: 20,
                    raw_sha256: d,
                },
                FileEntry {
                    role: Role::Kernel,
                    path: "vmlinuz.zst".into(),
                    size: 10,
                    sha256: d,
                    raw_size: 20,
                    raw_sha256: d,
                },
            ],
        }
    }

    #[test]
    fn manifest_json_uses_rfc3339_and_lowercase_roles_and_round_trips() {
        let m = sample_manifest();
        let json = String::from_utf8(m.to_json()).unwrap();
        assert!(
            json.contains("\"created_at\": \"2025-05-20T12:00:00Z\""),
            "{json}"
        );
        assert!(json.contains("\"role\": \"rootfs\""), "{json}");
        assert!(json.contains("\"format\": 1"), "{json}");
        assert_eq!(Manifest::parse(json.as_bytes()).unwrap(), m);
    }

    #[test]
    fn manifest_validation_rejects_what_could_hurt() {
        let check = |f: &dyn Fn(&mut Manifest), want: &str| {
            let mut m = sample_manifest();
            f(&mut m);
            let err = Manifest::parse(&m.to_json()).unwrap_err();
            let err = banger_hint::Report::new(&err, &[crate::HINTS]).to_string();
            assert!(err.contains(want), "want {want:?} in {err}");
        };
        check(&|m| m.format = 2, "hint: upgrade banger");
        check(&|m| m.arch = "aarch64".into(), "x86_64 guests only");
        check(
            &|m| m.files.pop().map(drop).unwrap_or(()),
            "exactly one kernel",
        );
        check(&|m| m.files.push(m.files[0].clone()), "exactly one rootfs");
        for p in [
            "/etc/passwd",
            "../x",
            "a/../../x",
            "http://h/x",
            "file:///x",
            "x?y",
            "",
        ] {
            check(&|m| m.files[0].path = p.into(), "must be relative");
        }
        check(&|m| m.name = "Bad Name".into(), "lowercase");
        check(&|m| m.files[1].raw_size = 0, "zero size");
        let err = Manifest::parse(b"{\"format\":1}").unwrap_err();
        assert!(matches!(err, BundleError::ManifestJson(_)), "{err}");
        let err = Manifest::parse(b"{\"format\":7,\"whatever\":true}").unwrap_err();
        assert!(
            matches!(err, BundleError::UnsupportedFormat { found: 7 }),
            "{err}"
        );
    }

    #[test]
    fn sparse_writer_skips_zero_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = std::fs::File::create(&path).unwrap();
        let mut data = vec![0u8; 64 * BLOCK];
        data[5 * BLOCK] = 1;
        data[6 * BLOCK + 10] = 2;
        data[63 * BLOCK + 4095] = 3;
        write_sparse(&f, 0, &data).unwrap();
        f.set_len(data.len() as u64).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
        assert!(f.metadata().unwrap().blocks() * 512 <= 3 * BLOCK as u64 * 2);
    }

    #[tokio::test]
    async fn export_then_unpack_round_trips_and_keeps_the_rootfs_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs.ext4");
        crate::testutil::fake_rootfs(&rootfs, 64 << 20);
        let kernel = dir.path().join("vmlinuz-6.1.0-test");
        std::fs::write(&kernel, b"MZ kernel bytes").unwrap();
        let bundle = dir.path().join("bundle");
        let rec = RecordingProgress::new();
        let sources = BundleSources {
            rootfs: rootfs.clone(),
            kernel: kernel.clone(),
            initrd: None,
        };
        let m = export(&sources, "test-image", "1", &bundle, &rec)
            .await
            .unwrap();

        assert_eq!(rec.phases(), ["compress rootfs", "compress kernel"]);
        let on_disk = Manifest::parse(&std::fs::read(bundle.join(MANIFEST_NAME)).unwrap()).unwrap();
        assert_eq!(on_disk, m);
        let entry = m.file(Role::Rootfs).unwrap();
        assert_eq!(entry.raw_size, 64 << 20);
        assert_eq!(
            entry.raw_sha256,
            Sha256Digest::of_bytes(&std::fs::read(&rootfs).unwrap())
        );
        let zst = std::fs::read(bundle.join(&entry.path)).unwrap();
        assert_eq!(entry.size, zst.len() as u64);
        assert_eq!(entry.sha256, Sha256Digest::of_bytes(&zst));
        assert!(entry.size < 1 << 20, "zeros compress away: {}", entry.size);
        assert!(m.file(Role::Initrd).is_none());
        let leftovers: Vec<_> = std::fs::read_dir(&bundle)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        let out = dir.path().join("unpacked.ext4");
        unpack_file(&bundle.join(&entry.path), entry, &out, &rec)
            .await
            .unwrap();
        assert_eq!(
            std::fs::read(&out).unwrap(),
            std::fs::read(&rootfs).unwrap()
        );
        let meta = std::fs::metadata(&out).unwrap();
        assert!(
            meta.blocks() * 512 < 1 << 20,
            "unpacked rootfs must stay sparse: {} blocks",
            meta.blocks()
        );
    }

    #[tokio::test]
    async fn unpack_rejects_content_that_differs_from_the_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("k");
        std::fs::write(&kernel, b"kernel").unwrap();
        let rootfs = dir.path().join("r");
        std::fs::write(&rootfs, b"rootfs").unwrap();
        let bundle = dir.path().join("b");
        let sources = BundleSources {
            rootfs,
            kernel,
            initrd: Some(dir.path().join("k")),
        };
        let m = export(&sources, "t", "1", &bundle, &RecordingProgress::new())
            .await
            .unwrap();
        let mut entry = m.file(Role::Kernel).unwrap().clone();
        entry.raw_sha256 = Sha256Digest::of_bytes(b"something else");
        let out = dir.path().join("vmlinuz");
        let err = unpack_file(
            &bundle.join(&entry.path),
            &entry,
            &out,
            &RecordingProgress::new(),
        )
        .await
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("vmlinuz.zst") && msg.contains(&entry.raw_sha256.to_string()),
            "{msg}"
        );
        assert!(!out.exists(), "unverified output must not appear");
        // Garbage is reported as corrupt, naming the file.
        let junk = dir.path().join("junk.zst");
        std::fs::write(&junk, b"not zstd at all").unwrap();
        let err = unpack_file(&junk, &entry, &out, &RecordingProgress::new())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("junk.zst"), "{err}");
    }

    #[tokio::test]
    async fn export_into_a_non_empty_directory_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"one").unwrap();
        let bundle = dir.path().join("b");
        let sources = BundleSources {
            rootfs: f.clone(),
            kernel: f.clone(),
            initrd: None,
        };
        let m1 = export(&sources, "t", "1", &bundle, &RecordingProgress::new())
            .await
            .unwrap();
        std::fs::write(&f, b"two").unwrap();
        let err = export(&sources, "t", "2", &bundle, &RecordingProgress::new())
            .await
            .unwrap_err();
        assert!(matches!(err, BundleError::NotEmpty { .. }), "{err}");
        assert!(err.hint().is_some());
        let on_disk = Manifest::parse(&std::fs::read(bundle.join(MANIFEST_NAME)).unwrap()).unwrap();
        assert_eq!(on_disk, m1, "the first bundle is untouched");
        let other = dir.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("notes.txt"), b"mine").unwrap();
        let err = export(&sources, "t", "2", &other, &RecordingProgress::new())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not empty"), "{err}");
        assert_eq!(std::fs::read_dir(&other).unwrap().count(), 1);
        // A failed export takes back what it wrote, so the same command can simply run again.
        let broken = BundleSources {
            rootfs: f.clone(),
            kernel: dir.path().join("absent"),
            initrd: None,
        };
        let fresh = dir.path().join("fresh");
        assert!(export(&broken, "t", "1", &fresh, &RecordingProgress::new())
            .await
            .is_err());
        assert!(!fresh.exists(), "a directory the export made is removed");
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        assert!(export(&broken, "t", "1", &empty, &RecordingProgress::new())
            .await
            .is_err());
        assert_eq!(
            std::fs::read_dir(&empty).unwrap().count(),
            0,
            "an empty one is emptied"
        );
        assert!(export(
            &sources,
            "Bad",
            "1",
            &dir.path().join("new"),
            &RecordingProgress::new()
        )
        .await
        .is_err());
    }
}
