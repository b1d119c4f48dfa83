//! banger's generic kernel from the real Debian package: downloaded from the Debian mirror the
//! host's apt sources name (as image builds do), checked through apt's trust chain, and turned
//! into a bzImage plus a modules initrd. The packages are cached under
//! `target/banger-test-cache/debian-kernel/`, so only the first run downloads ~40 MB.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use banger_image::kernel::{self, modules, release, KernelError};
use banger_image::{host_debian_mirror, RecordingProgress};

/// `target/banger-test-cache/debian-kernel` of this workspace.
fn cache_dir() -> PathBuf {
    // Test binaries live in target/debug/deps.
    let exe = std::env::current_exe().unwrap();
    let target = exe.ancestors().nth(3).unwrap().to_owned();
    target.join("banger-test-cache/debian-kernel")
}

fn mirror() -> String {
    host_debian_mirror().expect(
        "the host's apt sources name no bookworm mirror; image builds (and this test) need one",
    )
}

fn cpio(args: &[&str], archive: &Path, dir: &Path) -> String {
    let out = Command::new("cpio")
        .args(args)
        .current_dir(dir)
        .stdin(std::fs::File::open(archive).unwrap())
        .output()
        .expect("the cpio tool is needed for this test: apt-get install cpio");
    assert!(
        out.status.success(),
        "cpio {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn the_debian_cloud_kernel_becomes_a_bzimage_and_a_modules_initrd() {
    let work = tempfile::tempdir().unwrap();
    let progress = RecordingProgress::new();
    let k = kernel::fetch_cloud_kernel(&mirror(), "bookworm", work.path(), &cache_dir(), &progress)
        .await
        .unwrap_or_else(|e| panic!("{}", chain(&e)));

    // The release names the module directory and the kernel file.
    let parts: Vec<&str> = k.release.split('-').collect();
    assert!(
        parts.len() == 4 && parts[0].starts_with("6.") && parts[2..] == ["cloud", "amd64"],
        "{}",
        k.release
    );
    assert_eq!(k.package, format!("linux-image-{}", k.release));
    assert!(!k.version.is_empty());

    let vmlinuz = std::fs::read(&k.vmlinuz).unwrap();
    assert_eq!(&vmlinuz[0x202..0x206], b"HdrS", "not a bzImage");

    // The archive holds the modules of the load order, under /lib/modules/RELEASE, plus the list.
    let extracted = tempfile::tempdir().unwrap();
    cpio(&["-idm", "--quiet"], &k.modules_initrd, extracted.path());
    let listing = cpio(&["-it", "--quiet"], &k.modules_initrd, extracted.path());
    let list = std::fs::read_to_string(extracted.path().join("banger/modules")).unwrap();
    let paths: Vec<&str> = list.lines().collect();
    assert_eq!(paths.len(), k.modules.len(), "{list}");
    let files: Vec<&str> = listing.lines().filter(|l| l.ends_with(".ko")).collect();
    assert_eq!(files.len(), paths.len(), "{listing}");

    // Each module is a real one for this kernel, and everything it depends on comes earlier.
    let mut position = BTreeMap::new();
    for (i, p) in paths.iter().enumerate() {
        let prefix = format!("/lib/modules/{}/kernel/", k.release);
        assert!(p.starts_with(&prefix), "{p}");
        assert!(
            files.contains(&&p[1..]),
            "{p} listed but not in the archive"
        );
        let ko = std::fs::read(extracted.path().join(&p[1..])).unwrap();
        let info = modules::parse_modinfo(&ko).unwrap();
        let name = info.name.clone().unwrap();
        assert_eq!(name, k.modules[i], "list and load order disagree");
        assert!(
            info.vermagic.as_deref().unwrap().starts_with(&k.release),
            "{p}: {:?}",
            info.vermagic
        );
        for dep in &info.depends {
            assert!(
                position.contains_key(dep),
                "{name} is loaded before its dependency {dep}: {:?}",
                k.modules
            );
        }
        position.insert(name, i);
    }
    for root in modules::ROOTS {
        assert!(
            position.contains_key(root),
            "{root} missing: {:?}",
            k.modules
        );
    }
    // Built into this kernel, so never in the initrd.
    for builtin in ["ext4", "jbd2", "mbcache", "crc32c_generic", "crc16"] {
        assert!(
            !position.contains_key(builtin),
            "{builtin}: {:?}",
            k.modules
        );
    }
    let before = |a: &str, b: &str| position[a] < position[b];
    assert!(before("failover", "net_failover") && before("net_failover", "virtio_net"));
    assert!(before("vsock", "vmw_vsock_virtio_transport_common"));

    // A second run takes the packages from the cache.
    let again = RecordingProgress::new();
    let work2 = tempfile::tempdir().unwrap();
    let k2 = kernel::fetch_cloud_kernel(&mirror(), "bookworm", work2.path(), &cache_dir(), &again)
        .await
        .unwrap();
    assert_eq!(
        (k2.release, k2.modules),
        (k.release.clone(), k.modules.clone())
    );
    let cached = again
        .logs()
        .iter()
        .filter(|l| l.contains("using the cached"))
        .count();
    assert_eq!(cached, 2, "{:?}", again.logs());
    assert_eq!(
        std::fs::read(&k2.modules_initrd).unwrap(),
        std::fs::read(&k.modules_initrd).unwrap(),
        "the modules initrd is not reproducible"
    );
}

/// The real release file with one changed byte in its signed text: gpgv refuses it, through
/// the library call and through the whole pipeline (a `file://` mirror holding the tampered
/// copy).
#[tokio::test]
async fn a_tampered_release_file_is_refused() {
    let url = format!("{}/dists/bookworm/InRelease", mirror());
    let raw = reqwest::get(&url).await.unwrap().bytes().await.unwrap();
    let text = String::from_utf8(raw.to_vec()).unwrap();
    assert!(text.contains("\nCodename: bookworm\n"), "{text}");
    let tampered = text.replacen("\nCodename: bookworm\n", "\nCodename: bookwore\n", 1);

    let mirror_dir = tempfile::tempdir().unwrap();
    let dists = mirror_dir.path().join("dists/bookworm");
    std::fs::create_dir_all(&dists).unwrap();
    let gpgv = banger_image::require_tool("gpgv", "gpgv").unwrap();
    let keyring = Path::new(kernel::DEBIAN_ARCHIVE_KEYRING);

    std::fs::write(dists.join("InRelease"), &text).unwrap();
    let signed = release::verify(&gpgv, keyring, &dists.join("InRelease")).unwrap();
    assert!(String::from_utf8(signed)
        .unwrap()
        .contains("Codename: bookworm"));

    std::fs::write(dists.join("InRelease"), &tampered).unwrap();
    let why = release::verify(&gpgv, keyring, &dists.join("InRelease")).unwrap_err();
    assert!(why.contains("BAD signature"), "{why}");

    let work = tempfile::tempdir().unwrap();
    let err = kernel::fetch_cloud_kernel(
        mirror_dir.path().to_str().unwrap(),
        "bookworm",
        work.path(),
        work.path(),
        &RecordingProgress::new(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, KernelError::Signature { .. }),
        "{}",
        chain(&err)
    );
    assert!(err.to_string().contains("BAD signature"), "{err}");
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(&format!(": {c}"));
        src = c.source();
    }
    s
}
