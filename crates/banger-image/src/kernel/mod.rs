//! banger's generic guest kernel: Debian's cloud kernel, taken from its Debian package, plus
//! a *modules initrd* holding the few modules a banger guest needs.
//!
//! OCI images bring no kernel, so banger supplies one. The pipeline, with apt's trust chain:
//!
//! 1. `dists/SUITE/InRelease` from the mirror (at most 1 MiB), checked with `gpgv` against
//!    Debian's archive keyring; only the signed text is used ([`release`]).
//! 2. `main/binary-amd64/Packages.gz`, verified against the SHA-256 and size the signed text
//!    gives, streamed to find `linux-image-cloud-amd64` and the exact kernel package it
//!    depends on ([`packages`]).
//! 3. That `.deb`, verified against its index entry, cached by digest under `downloads` (with
//!    the index; the ones an earlier fetch left there are removed once superseded).
//! 4. `dpkg-deb --fsys-tarfile` streamed through a tar reader ([`deb`]): `boot/vmlinuz-RELEASE`,
//!    and the modules in the closure of [`modules::ROOTS`] over their `.modinfo` dependencies
//!    ([`modules`]), written into a cpio archive ([`crate::initramfs`]) together with
//!    `banger/modules`, the load order (dependencies first) that the agent, as `/init`, follows.
//!
//! Leaves to others: where the kernel is stored and recorded (the daemon), which mirror to use
//! (config, else [`crate::mirror::host_debian_mirror`]), and the per-VM archive appended to the
//! initrd at VM start ([`crate::initramfs::agent_archive`]).

pub mod deb;
pub mod modules;
pub mod packages;
pub mod release;

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use banger_hint::Hint;

use crate::blocking::run_blocking;
use crate::digest::Sha256Digest;
use crate::download::{self, DownloadError};
use crate::hosttools::{require_tool, MissingTool};
use crate::initramfs::{CpioWriter, MODULE_LIST_PATH};
use crate::progress::Progress;

/// The meta-package that always depends on the current cloud kernel.
pub const META_PACKAGE: &str = "linux-image-cloud-amd64";
/// The package index searched, relative to `dists/SUITE/`.
pub const PACKAGES_INDEX: &str = "main/binary-amd64/Packages.gz";
/// Debian's archive keyring (package `debian-archive-keyring`).
pub const DEBIAN_ARCHIVE_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// Largest package index accepted (bookworm's `Packages.gz` is ~12 MB).
const MAX_PACKAGES_GZ: u64 = 128 << 20;
/// Largest kernel package accepted (bookworm's cloud kernel is ~26 MB).
const MAX_DEB: u64 = 512 << 20;

/// The kernel and its modules initrd, in the `work` directory given to
/// [`fetch_cloud_kernel`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebianKernel {
    /// `6.1.0-50-cloud-amd64`.
    pub release: String,
    /// `linux-image-6.1.0-50-cloud-amd64`.
    pub package: String,
    /// The Debian version of `package`, e.g. `6.1.176-1`.
    pub version: String,
    /// `WORK/vmlinuz` (a bzImage).
    pub vmlinuz: PathBuf,
    /// `WORK/initrd.img`: the modules cpio, to which the per-VM archive is appended.
    pub modules_initrd: PathBuf,
    /// The modules in `modules_initrd`, in load order.
    pub modules: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Tool(#[from] MissingTool),
    #[error("{keyring} is missing, so Debian's signatures cannot be checked")]
    NoKeyring { keyring: PathBuf },
    #[error("`{mirror}` is not a Debian mirror URL")]
    BadMirror { mirror: String },
    #[error("`{suite}` is not a Debian suite name")]
    BadSuite { suite: String },
    #[error("cannot download {what}")]
    Download {
        what: String,
        #[source]
        source: Box<DownloadError>,
    },
    #[error("the signature of {url} does not verify: {why}")]
    Signature { url: String, why: String },
    #[error("{url} is not a usable release file: {why}")]
    Release { url: String, why: String },
    #[error("the package index {url} is not usable")]
    Packages {
        url: String,
        #[source]
        source: packages::PackagesError,
    },
    #[error("cannot use the kernel package {deb}")]
    Deb {
        deb: PathBuf,
        #[source]
        source: deb::DebError,
    },
    #[error("the kernel package {package} does not provide banger's modules")]
    Modules {
        package: String,
        #[source]
        source: modules::ModuleError,
    },
    #[error("cannot {what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Hint for KernelError {
    fn hint(&self) -> Option<Cow<'_, str>> {
        match self {
            // Transparent: the missing tool is not in the chain, so its hint is asked here.
            KernelError::Tool(e) => e.hint(),
            KernelError::NoKeyring { .. } => Some("apt-get install debian-archive-keyring".into()),
            KernelError::BadMirror { .. } => {
                Some("set `debian_mirror` in the config to a URL such as http://HOST/debian".into())
            }
            KernelError::Signature { .. } => Some(
                "the mirror may be mid-update or not serve Debian; try again later or set \
                 `debian_mirror` in the config"
                    .into(),
            ),
            KernelError::BadSuite { .. }
            | KernelError::Download { .. }
            | KernelError::Release { .. }
            | KernelError::Packages { .. }
            | KernelError::Deb { .. }
            | KernelError::Modules { .. }
            | KernelError::Io { .. } => None,
        }
    }
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> KernelError + 'a {
    move |source| KernelError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

fn valid_suite(suite: &str) -> bool {
    !suite.is_empty()
        && suite.len() <= 64
        && suite
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Fetches Debian's cloud kernel from `mirror` (e.g. `http://HOST/debian`) for `suite`
/// (`bookworm`) and builds its modules initrd in `work`. The kernel package is kept in
/// `downloads` under its digest and reused from there.
pub async fn fetch_cloud_kernel(
    mirror: &str,
    suite: &str,
    work: &Path,
    downloads: &Path,
    progress: &dyn Progress,
) -> Result<DebianKernel, KernelError> {
    fetch_with_keyring(
        mirror,
        suite,
        work,
        downloads,
        Path::new(DEBIAN_ARCHIVE_KEYRING),
        progress,
    )
    .await
}

/// [`fetch_cloud_kernel`] with another keyring (for a mirror of a Debian derivative, or tests).
pub async fn fetch_with_keyring(
    mirror: &str,
    suite: &str,
    work: &Path,
    downloads: &Path,
    keyring: &Path,
    progress: &dyn Progress,
) -> Result<DebianKernel, KernelError> {
    let gpgv = require_tool("gpgv", "gpgv")?;
    let dpkg_deb = require_tool("dpkg-deb", "dpkg")?;
    if !keyring.is_file() {
        return Err(KernelError::NoKeyring {
            keyring: keyring.to_owned(),
        });
    }
    let mirror = mirror.trim_end_matches('/');
    if download::parse_location(mirror).is_err() || mirror.contains(['?', '#']) {
        return Err(KernelError::BadMirror {
            mirror: mirror.to_owned(),
        });
    }
    if !valid_suite(suite) {
        return Err(KernelError::BadSuite {
            suite: suite.to_owned(),
        });
    }
    for dir in [work, downloads] {
        fs_err::tokio::create_dir_all(dir)
            .await
            .map_err(io_err("create", dir))?;
    }

    // 1. The signed release file.
    progress.phase(&format!("verify the {suite} release file"));
    let dists = format!("{mirror}/dists/{suite}");
    let release_url = format!("{dists}/InRelease");
    let release = fetch_release(&release_url, suite, &gpgv, keyring, work).await?;
    let index = release
        .index(PACKAGES_INDEX)
        .cloned()
        .ok_or_else(|| KernelError::Release {
            url: release_url.clone(),
            why: format!("it lists no SHA256 digest for {PACKAGES_INDEX}"),
        })?;
    if index.size > MAX_PACKAGES_GZ {
        return Err(KernelError::Release {
            url: release_url,
            why: format!(
                "{PACKAGES_INDEX} is said to be {} bytes, too large",
                index.size
            ),
        });
    }

    // 2. The package index, fetched by digest where the mirror offers it.
    progress.phase(&format!("download the {suite} package index"));
    let index_url = if release.acquire_by_hash {
        let dir = PACKAGES_INDEX.rsplit_once('/').map_or("", |(d, _)| d);
        format!("{dists}/{dir}/by-hash/SHA256/{}", index.sha256)
    } else {
        format!("{dists}/{PACKAGES_INDEX}")
    };
    let index_path = downloads.join(format!("Packages-{}.gz", index.sha256));
    cached_fetch(
        &index_url,
        &index_path,
        index.size,
        &index.sha256,
        "the package index",
        progress,
    )
    .await?;
    let found = {
        let (path, url) = (index_path.clone(), index_url.clone());
        run_blocking(progress, move |_| -> Result<_, KernelError> {
            let file = fs_err::File::open(&path).map_err(io_err("open", &path))?;
            let stanzas = packages::scan_gz(file, META_PACKAGE, &packages::Limits::default())
                .map_err(|source| KernelError::Packages {
                    url: url.clone(),
                    source,
                })?;
            packages::resolve(&stanzas, META_PACKAGE)
                .map_err(|source| KernelError::Packages { url, source })
        })
        .await
        .map_err(io_err("read", &index_path))??
    };
    if found.size > MAX_DEB {
        return Err(KernelError::Packages {
            url: index_url,
            source: packages::PackagesError::Kernel(format!(
                "{} is said to be {} bytes, too large",
                found.package, found.size
            )),
        });
    }
    progress.log(&format!(
        "{META_PACKAGE} in {suite} is {} {}",
        found.package, found.version
    ));

    // 3. The kernel package.
    progress.phase(&format!("download {} {}", found.package, found.version));
    let deb_path = downloads.join(format!("{}-{}.deb", found.package, found.sha256));
    cached_fetch(
        &format!("{mirror}/{}", found.filename),
        &deb_path,
        found.size,
        &found.sha256,
        &found.package,
        progress,
    )
    .await?;

    // 4. Kernel and modules.
    progress.phase("extract the kernel and its modules");
    let vmlinuz = work.join("vmlinuz");
    let initrd = work.join("initrd.img");
    let (release_name, package) = (found.release.clone(), found.package.clone());
    let (deb_for_task, vmlinuz_for_task, initrd_for_task) =
        (deb_path.clone(), vmlinuz.clone(), initrd.clone());
    let order = run_blocking(progress, move |p| {
        build_initrd(
            &dpkg_deb,
            &deb_for_task,
            &release_name,
            &package,
            &vmlinuz_for_task,
            &initrd_for_task,
            p,
        )
    })
    .await
    .map_err(io_err("extract", &deb_path))??;

    let keep = [index_path.as_path(), deb_path.as_path()];
    for old in superseded_downloads(downloads, &keep) {
        match fs_err::tokio::remove_file(&old).await {
            Ok(()) => progress.log(&format!("removed the superseded {}", old.display())),
            Err(e) => progress.log(&format!("cannot remove the superseded download: {e}")),
        }
    }

    Ok(DebianKernel {
        release: found.release,
        package: found.package,
        version: found.version,
        vmlinuz,
        modules_initrd: initrd,
        modules: order,
    })
}

/// Downloads and checks the release file at `url`; returns what its signed text says.
async fn fetch_release(
    url: &str,
    suite: &str,
    gpgv: &Path,
    keyring: &Path,
    work: &Path,
) -> Result<release::Release, KernelError> {
    let parsed = download::parse_location(url).map_err(|source| KernelError::Download {
        what: format!("the {suite} release file"),
        source: Box::new(source),
    })?;
    let raw = download::fetch_small(&parsed, release::MAX_INRELEASE)
        .await
        .map_err(|source| KernelError::Download {
            what: format!("the {suite} release file"),
            source: Box::new(source),
        })?;
    release::check_clearsigned(&raw).map_err(|why| KernelError::Release {
        url: url.to_owned(),
        why,
    })?;
    let path = work.join("InRelease");
    fs_err::tokio::write(&path, &raw)
        .await
        .map_err(io_err("write", &path))?;
    let (gpgv, keyring, signed_path) = (gpgv.to_owned(), keyring.to_owned(), path.clone());
    let signed =
        tokio::task::spawn_blocking(move || release::verify(&gpgv, &keyring, &signed_path))
            .await
            .map_err(|e| io_err("verify", &path)(std::io::Error::other(e)))?
            .map_err(|why| KernelError::Signature {
                url: url.to_owned(),
                why,
            })?;
    let release = release::parse(&signed, suite).map_err(|why| KernelError::Release {
        url: url.to_owned(),
        why,
    })?;
    release
        .check_valid_until(time::OffsetDateTime::now_utc())
        .map_err(|why| KernelError::Release {
            url: url.to_owned(),
            why,
        })?;
    Ok(release)
}

/// [`download::fetch`] unless `dest` is already there with the right digest (files land there
/// only after a verified download, but a cache can be damaged, so it is checked again).
async fn cached_fetch(
    url: &str,
    dest: &Path,
    size: u64,
    sha256: &Sha256Digest,
    what: &str,
    progress: &dyn Progress,
) -> Result<(), KernelError> {
    if let Ok(meta) = fs_err::tokio::metadata(dest).await {
        if meta.len() == size {
            let path = dest.to_owned();
            let actual = run_blocking(progress, move |_| Sha256Digest::of_file(&path))
                .await
                .and_then(|r| r)
                .map_err(io_err("read", dest))?;
            if actual == *sha256 {
                progress.log(&format!("{what}: using the cached {}", dest.display()));
                return Ok(());
            }
        }
        progress.notice(&format!(
            "{} does not match its digest; downloading it again",
            dest.display()
        ));
        fs_err::tokio::remove_file(dest)
            .await
            .map_err(io_err("remove", dest))?;
    }
    download::fetch(url, dest, size, sha256, progress)
        .await
        .map_err(|source| KernelError::Download {
            what: what.to_owned(),
            source: Box::new(source),
        })
}

/// Package indexes and kernel packages in `downloads` from earlier fetches, other than `keep`:
/// only the newest are ever used again, and each is tens of MB. Only names this module
/// writes are considered (`downloads` may be shared with other caches).
fn superseded_downloads(downloads: &Path, keep: &[&Path]) -> Vec<PathBuf> {
    let ours = |name: &str| {
        let digest_before = |suffix: &str| {
            name.strip_suffix(suffix)
                .and_then(|rest| rest.rsplit_once('-'))
                .is_some_and(|(_, hex)| hex.parse::<Sha256Digest>().is_ok())
        };
        (name.starts_with("Packages-") && digest_before(".gz"))
            || (name.starts_with("linux-image-") && digest_before(".deb"))
    };
    let Ok(entries) = std::fs::read_dir(downloads) else {
        return Vec::new();
    };
    let mut old: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(ours))
        .map(|e| e.path())
        .filter(|p| !keep.contains(&p.as_path()))
        .collect();
    old.sort();
    old
}

/// Both passes over the package: `vmlinuz`, then the modules initrd at `initrd`. Returns the
/// module load order.
fn build_initrd(
    dpkg_deb: &Path,
    deb_path: &Path,
    release: &str,
    package: &str,
    vmlinuz: &Path,
    initrd: &Path,
    progress: &dyn Progress,
) -> Result<Vec<String>, KernelError> {
    let deb_err = |source| KernelError::Deb {
        deb: deb_path.to_owned(),
        source,
    };
    let scan = deb::scan(dpkg_deb, deb_path, release, vmlinuz).map_err(deb_err)?;
    if !scan.vmlinuz {
        return Err(deb_err(deb::DebError::Content(format!(
            "it has no boot/vmlinuz-{release}"
        ))));
    }
    check_bzimage(vmlinuz)?;
    let graph = scan
        .modules
        .iter()
        .map(|(name, m)| (name.clone(), m.depends.clone()))
        .collect();
    let order = modules::load_order(&modules::ROOTS, &graph, &scan.builtin).map_err(|source| {
        if scan.compressed_modules > 0 {
            progress.notice(&format!(
                "{package} ships {} compressed modules, which banger cannot load yet",
                scan.compressed_modules
            ));
        }
        KernelError::Modules {
            package: package.to_owned(),
            source,
        }
    })?;
    let paths: Vec<String> = order
        .iter()
        .filter_map(|name| scan.modules.get(name).map(|m| m.path.clone()))
        .collect();
    progress.log(&format!("modules, in load order: {}", order.join(" ")));

    let file = fs_err::File::create(initrd).map_err(io_err("create", initrd))?;
    let mut cpio = CpioWriter::new(BufWriter::new(file));
    let wanted: BTreeSet<String> = paths.iter().cloned().collect();
    deb::copy_modules(dpkg_deb, deb_path, release, &wanted, &mut cpio).map_err(deb_err)?;
    let mut list = String::new();
    for p in &paths {
        list.push_str(&format!("/lib/modules/{release}/{p}\n"));
    }
    let written = (|| {
        cpio.file_bytes(MODULE_LIST_PATH, 0o644, list.as_bytes())?;
        let mut out = cpio.finish()?;
        out.flush()?;
        out.get_ref().sync_all()
    })();
    written.map_err(io_err("write", initrd))?;
    Ok(order)
}

/// A bzImage has `HdrS` at offset 0x202 (the x86 boot protocol header).
fn check_bzimage(vmlinuz: &Path) -> Result<(), KernelError> {
    let mut head = [0u8; 0x206];
    let read = fs_err::File::open(vmlinuz).and_then(|mut f| f.read_exact(&mut head));
    read.map_err(io_err("read", vmlinuz))?;
    if &head[0x202..0x206] != b"HdrS" {
        return Err(KernelError::Io {
            what: "use",
            path: vmlinuz.to_owned(),
            source: std::io::Error::other("it is not an x86 bzImage (no HdrS header)"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::NoProgress;

    #[test]
    fn only_superseded_indexes_and_kernel_packages_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let h = |c: char| c.to_string().repeat(64);
        let names = [
            format!("Packages-{}.gz", h('a')),
            format!("Packages-{}.gz", h('b')),
            format!("linux-image-6.1.0-49-cloud-amd64-{}.deb", h('c')),
            format!("linux-image-6.1.0-50-cloud-amd64-{}.deb", h('d')),
            format!("linux-image-6.1.0-48-cloud-amd64-{}.deb.part", h('e')),
            "Packages-notadigest.gz".to_string(),
            "rootfs.ext4.zst".to_string(),
        ];
        for n in &names {
            std::fs::write(dir.path().join(n), "").unwrap();
        }
        let (index, deb) = (dir.path().join(&names[1]), dir.path().join(&names[3]));
        let old = superseded_downloads(dir.path(), &[&index, &deb]);
        assert_eq!(
            old,
            [dir.path().join(&names[0]), dir.path().join(&names[2])]
        );
    }

    #[test]
    fn suite_names_are_plain() {
        assert!(valid_suite("bookworm"));
        assert!(valid_suite("bookworm-backports"));
        for bad in ["", "../x", "Bookworm", "a/b", "a b"] {
            assert!(!valid_suite(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn bad_mirrors_and_suites_are_refused_before_any_download() {
        let dir = tempfile::tempdir().unwrap();
        let err = fetch_cloud_kernel(
            "ftp://x/debian",
            "bookworm",
            dir.path(),
            dir.path(),
            &NoProgress,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, KernelError::BadMirror { .. }), "{err}");
        assert!(
            err.hint().unwrap().starts_with("set `debian_mirror`"),
            "{err}"
        );
        let err = fetch_cloud_kernel(
            "http://127.0.0.1:9/debian",
            "../x",
            dir.path(),
            dir.path(),
            &NoProgress,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, KernelError::BadSuite { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_missing_keyring_says_which_package_provides_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = fetch_with_keyring(
            "http://127.0.0.1:9/debian",
            "bookworm",
            dir.path(),
            dir.path(),
            &dir.path().join("no-keyring.gpg"),
            &NoProgress,
        )
        .await
        .unwrap_err();
        assert_eq!(
            err.hint().as_deref(),
            Some("apt-get install debian-archive-keyring"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_unsigned_release_file_is_refused() {
        let server = crate::testutil::TestServer::start().await;
        let h = "6777ea16514725f9427f48c240d92e0a6b8496138e37a1491d8597e66774e309";
        let text = format!(
            "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\nSuite: bookworm\nSHA256:\n {h} 1 {PACKAGES_INDEX}\n\
             -----BEGIN PGP SIGNATURE-----\n\nAAAA\n-----END PGP SIGNATURE-----\n"
        );
        server.serve("/debian/dists/bookworm/InRelease", text.into_bytes());
        let dir = tempfile::tempdir().unwrap();
        let err = fetch_cloud_kernel(
            &server.url("/debian"),
            "bookworm",
            &dir.path().join("work"),
            &dir.path().join("dl"),
            &NoProgress,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, KernelError::Signature { .. }), "{err}");
        assert!(
            err.to_string().contains("/dists/bookworm/InRelease"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_oversized_release_file_is_refused_without_reading_it_all() {
        let server = crate::testutil::TestServer::start().await;
        server.serve(
            "/debian/dists/bookworm/InRelease",
            vec![b'x'; (release::MAX_INRELEASE + 1) as usize],
        );
        let dir = tempfile::tempdir().unwrap();
        let err = fetch_cloud_kernel(
            &server.url("/debian"),
            "bookworm",
            dir.path(),
            dir.path(),
            &NoProgress,
        )
        .await
        .unwrap_err();
        let KernelError::Download { source, .. } = &err else {
            panic!("{err}");
        };
        assert!(
            matches!(**source, DownloadError::TooLarge { .. }),
            "{source}"
        );
    }
}
