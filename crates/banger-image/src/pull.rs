//! Pulling a bundle: manifest, verified downloads into a content-addressed cache, verified unpack.
//!
//! [`pull_bundle`] (or [`pull_kernel`], which skips the root filesystem) fetches `manifest.json` (http, https or file), optionally checks it against a
//! pinned digest from the catalog, downloads each file into `cache_dir` under its SHA-256 (resuming
//! partial downloads, so an interrupted pull continues where it stopped), and unpacks each into
//! `staging_dir` with its raw digest verified and sparseness kept. Nothing is written anywhere else.
//! Registering the result is the daemon's job. Concurrent pulls into the same cache must be
//! serialised by the caller (they would share `.part` files).

use crate::bundle::{unpack_file, BundleError, FileEntry, Manifest, Role, MANIFEST_MAX_BYTES};
use crate::digest::Sha256Digest;
use crate::download::{fetch, fetch_small, parse_location, DownloadError};
use crate::progress::Progress;
use banger_hint::Hint;
use reqwest::Url;
use std::borrow::Cow;
use std::path::{Path, PathBuf};

/// A pulled and verified bundle; the paths are inside the staging directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledBundle {
    pub manifest: Manifest,
    pub rootfs: PathBuf,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("could not fetch bundle manifest {url}")]
    FetchManifest {
        url: String,
        #[source]
        source: DownloadError,
    },
    #[error("bundle manifest {url} has sha256 {actual}, but the catalog pins {expected}")]
    ManifestDigest {
        url: String,
        expected: Sha256Digest,
        actual: Sha256Digest,
    },
    #[error("bundle manifest {url} cannot be used")]
    BadManifest {
        url: String,
        #[source]
        source: BundleError,
    },
    #[error("could not download the {} of bundle {name}", role.as_str())]
    Download {
        name: String,
        role: Role,
        #[source]
        source: DownloadError,
    },
    #[error("could not unpack the {} of bundle {name}", role.as_str())]
    Unpack {
        name: String,
        role: Role,
        #[source]
        source: BundleError,
    },
    #[error("could not create directory {}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Hint for PullError {
    fn hint(&self) -> Option<Cow<'_, str>> {
        match self {
            PullError::ManifestDigest { .. } => Some(
                "the bundle was replaced or tampered with; ask its publisher or update the catalog"
                    .into(),
            ),
            // The download and bundle errors are sources, and the report asks them itself.
            _ => None,
        }
    }
}

impl PullError {
    /// True when a disk filled up somewhere during the pull.
    pub fn is_disk_full(&self) -> bool {
        match self {
            PullError::Download {
                source: DownloadError::DiskFull { .. },
                ..
            }
            | PullError::Unpack {
                source: BundleError::DiskFull { .. },
                ..
            } => true,
            PullError::Dir { source, .. } => source.raw_os_error() == Some(libc::ENOSPC),
            _ => false,
        }
    }
}

/// Where a bundle file is cached: named by the SHA-256 of its compressed bytes.
pub fn cache_path(cache_dir: &Path, entry: &FileEntry) -> PathBuf {
    cache_dir.join(format!("{}.zst", entry.sha256))
}

/// A bundle's kernel (and initrd) pulled without its root filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledKernel {
    pub manifest: Manifest,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
}

/// Fetches, verifies and unpacks the bundle described by `manifest_url` (a URL or absolute path).
/// When `manifest_sha256` is given, the manifest must have exactly that digest.
pub async fn pull_bundle(
    manifest_url: &str,
    manifest_sha256: Option<&Sha256Digest>,
    staging_dir: &Path,
    cache_dir: &Path,
    progress: &dyn Progress,
) -> Result<PulledBundle, PullError> {
    let source = Source::new(manifest_url, manifest_sha256, cache_dir, progress);
    let (manifest, initrd) = source.pull_into(staging_dir, |_| true).await?;
    Ok(PulledBundle {
        rootfs: staging_dir.join(Role::Rootfs.raw_file_name()),
        kernel: staging_dir.join(Role::Kernel.raw_file_name()),
        initrd,
        manifest,
    })
}

/// Like [`pull_bundle`], but only the kernel and initrd: the root filesystem is neither
/// downloaded nor unpacked.
pub async fn pull_kernel(
    manifest_url: &str,
    manifest_sha256: Option<&Sha256Digest>,
    staging_dir: &Path,
    cache_dir: &Path,
    progress: &dyn Progress,
) -> Result<PulledKernel, PullError> {
    let source = Source::new(manifest_url, manifest_sha256, cache_dir, progress);
    let (manifest, initrd) = source
        .pull_into(staging_dir, |role| role != Role::Rootfs)
        .await?;
    Ok(PulledKernel {
        kernel: staging_dir.join(Role::Kernel.raw_file_name()),
        initrd,
        manifest,
    })
}

/// Where a pull reads from, and how it reports.
struct Source<'a> {
    manifest_url: &'a str,
    manifest_sha256: Option<&'a Sha256Digest>,
    cache_dir: &'a Path,
    progress: &'a dyn Progress,
}

impl<'a> Source<'a> {
    fn new(
        manifest_url: &'a str,
        manifest_sha256: Option<&'a Sha256Digest>,
        cache_dir: &'a Path,
        progress: &'a dyn Progress,
    ) -> Self {
        Source {
            manifest_url,
            manifest_sha256,
            cache_dir,
            progress,
        }
    }

    /// Pulls the files whose role `want` accepts into `staging_dir`; returns the manifest and the
    /// initrd's path if one was pulled.
    async fn pull_into(
        &self,
        staging_dir: &Path,
        want: impl Fn(Role) -> bool,
    ) -> Result<(Manifest, Option<PathBuf>), PullError> {
        let (url, manifest) = prepare(
            self.manifest_url,
            self.manifest_sha256,
            staging_dir,
            self.cache_dir,
            self.progress,
        )
        .await?;
        let mut initrd = None;
        for entry in manifest.files.iter().filter(|e| want(e.role)) {
            let dest = staging_dir.join(entry.role.raw_file_name());
            pull_file(
                &url,
                &manifest.name,
                entry,
                self.cache_dir,
                &dest,
                self.progress,
            )
            .await?;
            if entry.role == Role::Initrd {
                initrd = Some(dest);
            }
        }
        Ok((manifest, initrd))
    }
}

/// Fetches and checks the manifest, and makes the cache and staging directories.
async fn prepare(
    manifest_url: &str,
    manifest_sha256: Option<&Sha256Digest>,
    staging_dir: &Path,
    cache_dir: &Path,
    progress: &dyn Progress,
) -> Result<(Url, Manifest), PullError> {
    let fetch_err = |source| PullError::FetchManifest {
        url: manifest_url.to_owned(),
        source,
    };
    let url = parse_location(manifest_url).map_err(fetch_err)?;
    progress.phase("fetch manifest");
    let bytes = fetch_small(&url, MANIFEST_MAX_BYTES)
        .await
        .map_err(fetch_err)?;
    if let Some(expected) = manifest_sha256 {
        let actual = Sha256Digest::of_bytes(&bytes);
        if actual != *expected {
            return Err(PullError::ManifestDigest {
                url: url.to_string(),
                expected: *expected,
                actual,
            });
        }
    }
    let manifest = Manifest::parse(&bytes).map_err(|source| PullError::BadManifest {
        url: url.to_string(),
        source,
    })?;
    for dir in [cache_dir, staging_dir] {
        fs_err::tokio::create_dir_all(dir)
            .await
            .map_err(|source| PullError::Dir {
                path: dir.to_owned(),
                source,
            })?;
    }
    Ok((url, manifest))
}

async fn pull_file(
    manifest_url: &Url,
    name: &str,
    entry: &FileEntry,
    cache_dir: &Path,
    dest: &Path,
    progress: &dyn Progress,
) -> Result<(), PullError> {
    let download_err = |source| PullError::Download {
        name: name.to_owned(),
        role: entry.role,
        source,
    };
    let file_url = manifest_url
        .join(&entry.path)
        .map_err(|_| download_err(DownloadError::BadUrl(entry.path.clone())))?;
    let cached = cache_path(cache_dir, entry);
    // A complete cache file got there only through a verified rename; its size is a cheap recheck
    // and the raw digest check below catches any later damage.
    let have = fs_err::tokio::metadata(&cached).await.map(|m| m.len()).ok();
    if have == Some(entry.size) {
        progress.log(&format!("{} is cached", entry.path));
    } else {
        progress.phase(&format!("download {}", entry.path));
        fetch(
            file_url.as_str(),
            &cached,
            entry.size,
            &entry.sha256,
            progress,
        )
        .await
        .map_err(download_err)?;
    }
    progress.phase(&format!("unpack {}", entry.path));
    if let Err(source) = unpack_file(&cached, entry, dest, progress).await {
        if matches!(
            source,
            BundleError::Corrupt { .. } | BundleError::RawMismatch { .. }
        ) {
            // Never keep bytes that failed verification: the next pull downloads afresh.
            let _ = fs_err::tokio::remove_file(&cached).await;
        }
        return Err(PullError::Unpack {
            name: name.to_owned(),
            role: entry.role,
            source,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::{export, BundleSources, MANIFEST_NAME};
    use crate::progress::RecordingProgress;
    use crate::testutil::{Fault, TestServer};
    use std::os::unix::fs::MetadataExt;

    struct Fixture {
        _dir: tempfile::TempDir,
        root: PathBuf,
        bundle: PathBuf,
        manifest: Manifest,
    }

    impl Fixture {
        fn staging(&self) -> PathBuf {
            self.root.join("staging")
        }
        fn cache(&self) -> PathBuf {
            self.root.join("cache")
        }
        fn file(&self, role: Role) -> &FileEntry {
            self.manifest.file(role).unwrap()
        }
        /// Serves the bundle directory's files under /b/.
        fn serve(&self, server: &TestServer) {
            for name in std::fs::read_dir(&self.bundle).unwrap() {
                let name = name.unwrap().file_name().into_string().unwrap();
                server.serve(
                    &format!("/b/{name}"),
                    std::fs::read(self.bundle.join(&name)).unwrap(),
                );
            }
        }
        /// Everything under the fixture root, relative, except the bundle sources.
        fn written_paths(&self) -> Vec<String> {
            fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
                for e in std::fs::read_dir(dir).unwrap() {
                    let p = e.unwrap().path();
                    if p.is_dir() {
                        walk(&p, base, out);
                    } else {
                        out.push(p.strip_prefix(base).unwrap().display().to_string());
                    }
                }
            }
            let mut out = Vec::new();
            walk(&self.root, &self.root, &mut out);
            out.retain(|p| !p.starts_with("src/") && !p.starts_with("bundle/"));
            out.sort();
            out
        }
    }

    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        let src = root.join("src");
        std::fs::create_dir(&src).unwrap();
        crate::testutil::fake_rootfs(&src.join("rootfs.ext4"), 32 << 20);
        std::fs::write(src.join("vmlinuz"), b"MZ fake kernel".repeat(1000)).unwrap();
        std::fs::write(src.join("initrd.img"), b"070701 fake cpio".repeat(500)).unwrap();
        let bundle = root.join("bundle");
        let sources = BundleSources {
            rootfs: src.join("rootfs.ext4"),
            kernel: src.join("vmlinuz"),
            initrd: Some(src.join("initrd.img")),
        };
        let manifest = export(
            &sources,
            "test-image",
            "1.0",
            &bundle,
            &RecordingProgress::new(),
        )
        .await
        .unwrap();
        Fixture {
            _dir: dir,
            root,
            bundle,
            manifest,
        }
    }

    fn assert_same_as_sources(f: &Fixture, pulled: &PulledBundle) {
        let src = f.root.join("src");
        for (got, want) in [
            (&pulled.rootfs, src.join("rootfs.ext4")),
            (&pulled.kernel, src.join("vmlinuz")),
            (pulled.initrd.as_ref().unwrap(), src.join("initrd.img")),
        ] {
            assert!(got.starts_with(f.staging()), "{got:?}");
            assert_eq!(
                Sha256Digest::of_bytes(&std::fs::read(got).unwrap()),
                Sha256Digest::of_bytes(&std::fs::read(&want).unwrap()),
                "{got:?}"
            );
        }
        assert_eq!(pulled.manifest, f.manifest);
        assert!(
            std::fs::metadata(&pulled.rootfs).unwrap().blocks() * 512 < 4 << 20,
            "rootfs must stay sparse"
        );
    }

    #[tokio::test]
    async fn export_then_pull_over_http_gives_identical_files_and_writes_only_staging_and_cache() {
        let f = fixture().await;
        let server = TestServer::start().await;
        f.serve(&server);
        let rec = RecordingProgress::new();
        let pinned = Sha256Digest::of_bytes(&std::fs::read(f.bundle.join(MANIFEST_NAME)).unwrap());
        let pulled = pull_bundle(
            &server.url("/b/manifest.json"),
            Some(&pinned),
            &f.staging(),
            &f.cache(),
            &rec,
        )
        .await
        .unwrap();
        assert_same_as_sources(&f, &pulled);
        let mut want: Vec<String> = f
            .manifest
            .files
            .iter()
            .map(|e| format!("cache/{}.zst", e.sha256))
            .chain(
                [
                    "staging/initrd.img",
                    "staging/rootfs.ext4",
                    "staging/vmlinuz",
                ]
                .map(String::from),
            )
            .collect();
        want.sort();
        assert_eq!(f.written_paths(), want);
        assert!(
            rec.phases()
                .contains(&"download rootfs.ext4.zst".to_string()),
            "{:?}",
            rec.phases()
        );

        // A second pull reuses the cache: only the manifest is fetched again.
        let before = server.request_count();
        std::fs::remove_dir_all(f.staging()).unwrap();
        let again = pull_bundle(
            &server.url("/b/manifest.json"),
            None,
            &f.staging(),
            &f.cache(),
            &rec,
        )
        .await
        .unwrap();
        assert_same_as_sources(&f, &again);
        assert_eq!(server.request_count(), before + 1);
    }

    #[tokio::test]
    async fn pulling_a_kernel_never_downloads_or_writes_the_rootfs() {
        let f = fixture().await;
        let server = TestServer::start().await;
        f.serve(&server);
        let pulled = pull_kernel(
            &server.url("/b/manifest.json"),
            None,
            &f.staging(),
            &f.cache(),
            &RecordingProgress::new(),
        )
        .await
        .unwrap();
        let src = f.root.join("src");
        assert_eq!(
            std::fs::read(&pulled.kernel).unwrap(),
            std::fs::read(src.join("vmlinuz")).unwrap()
        );
        assert_eq!(
            std::fs::read(pulled.initrd.as_ref().unwrap()).unwrap(),
            std::fs::read(src.join("initrd.img")).unwrap()
        );
        let rootfs = &f.file(Role::Rootfs).path;
        assert_eq!(
            server.ranges(&format!("/b/{rootfs}")),
            Vec::<Option<String>>::new()
        );
        assert!(!f.written_paths().iter().any(|p| p.contains("rootfs")));
    }

    #[tokio::test]
    async fn pull_from_a_file_url_and_from_a_plain_path() {
        let f = fixture().await;
        let manifest = f.bundle.join(MANIFEST_NAME);
        let url = Url::from_file_path(&manifest).unwrap();
        let pulled = pull_bundle(
            url.as_str(),
            None,
            &f.staging(),
            &f.cache(),
            &RecordingProgress::new(),
        )
        .await
        .unwrap();
        assert_same_as_sources(&f, &pulled);
        std::fs::remove_dir_all(f.root.join("cache")).unwrap();
        std::fs::remove_dir_all(f.staging()).unwrap();
        let pulled = pull_bundle(
            manifest.to_str().unwrap(),
            None,
            &f.staging(),
            &f.cache(),
            &RecordingProgress::new(),
        )
        .await
        .unwrap();
        assert_same_as_sources(&f, &pulled);
    }

    #[tokio::test]
    async fn flipped_byte_fails_with_digest_mismatch_naming_file_and_both_digests() {
        let f = fixture().await;
        let server = TestServer::start().await;
        f.serve(&server);
        server.fault("/b/vmlinuz.zst", Fault::FlipByte { at: 10 });
        let err = pull_bundle(
            &server.url("/b/manifest.json"),
            None,
            &f.staging(),
            &f.cache(),
            &RecordingProgress::new(),
        )
        .await
        .unwrap_err();
        let chain = error_chain(&err);
        let entry = f.file(Role::Kernel);
        assert!(
            matches!(
                &err,
                PullError::Download {
                    source: DownloadError::DigestMismatch { .. },
                    role: Role::Kernel,
                    ..
                }
            ),
            "{chain}"
        );
        assert!(chain.contains("vmlinuz.zst"), "{chain}");
        assert!(
            chain.contains(&format!("expected sha256 {}", entry.sha256)),
            "{chain}"
        );
        assert!(chain.contains("got "), "{chain}");
        assert!(!cache_path(&f.cache(), entry).exists());
        assert!(!crate::download::part_path(&cache_path(&f.cache(), entry)).exists());
    }

    #[tokio::test]
    async fn truncated_download_fails_as_truncated_then_resumes() {
        let f = fixture().await;
        let server = TestServer::start().await;
        f.serve(&server);
        let entry = f.file(Role::Rootfs).clone();
        let cut = (entry.size / 2) as usize;
        server.fault("/b/rootfs.ext4.zst", Fault::Truncate { at: cut });
        let err = pull_bundle(
            &server.url("/b/manifest.json"),
            None,
            &f.staging(),
            &f.cache(),
            &RecordingProgress::new(),
        )
        .await
        .unwrap_err();
        match &err {
            PullError::Download {
                source: DownloadError::Truncated { got, expected, .. },
                ..
            } => {
                assert_eq!((*got, *expected), (cut as u64, entry.size));
            }
            other => panic!("expected Truncated, got {}", error_chain(other)),
        }
        assert!(error_chain(&err).contains("rootfs.ext4.zst"));
        let pulled = pull_bundle(
            &server.url("/b/manifest.json"),
            None,
            &f.staging(),
            &f.cache(),
            &RecordingProgress::new(),
        )
        .await
        .unwrap();
        assert_same_as_sources(&f, &pulled);
        assert_eq!(
            server.ranges("/b/rootfs.ext4.zst"),
            [None, Some(format!("bytes={cut}-"))]
        );
    }

    #[tokio::test]
    async fn server_error_is_http_status_with_url() {
        let f = fixture().await;
        let server = TestServer::start().await;
        f.serve(&server);
        server.fault("/b/initrd.img.zst", Fault::Status(500));
        let err = pull_bundle(
            &server.url("/b/manifest.json"),
            None,
            &f.staging(),
            &f.cache(),
            &RecordingProgress::new(),
        )
        .await
        .unwrap_err();
        let chain = error_chain(&err);
        assert!(
            chain.contains(&format!(
                "GET {} returned HTTP 500 Internal Server Error",
                server.url("/b/initrd.img.zst")
            )),
            "{chain}"
        );
        let err = pull_bundle(
            &server.url("/b/manifest.json"),
            None,
            &f.staging(),
            &f.cache(),
            &RecordingProgress::new(),
        )
        .await;
        assert!(err.is_ok(), "a later pull succeeds");
        server.fault("/b/manifest.json", Fault::Status(503));
        let err = pull_bundle(
            &server.url("/b/manifest.json"),
            None,
            &f.staging(),
            &f.cache(),
            &RecordingProgress::new(),
        )
        .await
        .unwrap_err();
        assert!(matches!(
            err,
            PullError::FetchManifest {
                source: DownloadError::HttpStatus { .. },
                ..
            }
        ));
    }

    #[tokio::test]
    async fn pinned_manifest_digest_must_match() {
        let f = fixture().await;
        let server = TestServer::start().await;
        f.serve(&server);
        let wrong = Sha256Digest::of_bytes(b"other manifest");
        let err = pull_bundle(
            &server.url("/b/manifest.json"),
            Some(&wrong),
            &f.staging(),
            &f.cache(),
            &RecordingProgress::new(),
        )
        .await
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&wrong.to_string()) && msg.contains("catalog pins"),
            "{msg}"
        );
        assert!(
            !f.staging().exists() && !f.cache().exists(),
            "nothing written for a rejected manifest"
        );
    }

    #[tokio::test]
    async fn corrupt_cache_entry_is_deleted_after_failed_unpack() {
        let f = fixture().await;
        let entry = f.file(Role::Kernel).clone();
        std::fs::create_dir_all(f.cache()).unwrap();
        // Same size as the real file, different bytes: passes the size check, fails unpacking.
        std::fs::write(
            cache_path(&f.cache(), &entry),
            vec![0u8; entry.size as usize],
        )
        .unwrap();
        let url = Url::from_file_path(f.bundle.join(MANIFEST_NAME)).unwrap();
        let err = pull_bundle(
            url.as_str(),
            None,
            &f.staging(),
            &f.cache(),
            &RecordingProgress::new(),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                err,
                PullError::Unpack {
                    role: Role::Kernel,
                    ..
                }
            ),
            "{}",
            error_chain(&err)
        );
        assert!(!cache_path(&f.cache(), &entry).exists());
        let pulled = pull_bundle(
            url.as_str(),
            None,
            &f.staging(),
            &f.cache(),
            &RecordingProgress::new(),
        )
        .await
        .unwrap();
        assert_same_as_sources(&f, &pulled);
    }

    fn error_chain(e: &dyn std::error::Error) -> String {
        let mut s = e.to_string();
        let mut cur = e.source();
        while let Some(c) = cur {
            s.push_str(": ");
            s.push_str(&c.to_string());
            cur = c.source();
        }
        s
    }
}
