//! A real build of the slim recipe with debootstrap from the host's Debian mirror, checked with
//! e2fsck and debugfs. Needs root (or passwordless sudo), network access to the mirror and a few
//! minutes, so it is ignored by default:
//!
//! ```text
//! cargo test -p banger-image --test real_build -- --ignored --nocapture
//! ```
//! `BANGER_TEST_MIRROR` overrides the mirror taken from `/etc/apt`; `BANGER_TEST_RECIPE` picks
//! another built-in recipe. The scratch directory lives under /var/tmp and is removed even on failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use banger_image::build::{build, cleanup_work_dir, BuildRequest};
use banger_image::ext4::{debugfs_cat, debugfs_readlink, fsck_clean};
use banger_image::{host_debian_mirror, recipe, HostPrivileged, NoProgress, Progress};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Instant;

struct Stderr;

impl Progress for Stderr {
    fn phase(&self, name: &str) {
        eprintln!("==> {name}");
    }
    fn bytes(&self, _done: u64, _total: Option<u64>) {}
    fn log(&self, line: &str) {
        eprintln!("    {line}");
    }
    fn notice(&self, msg: &str) {
        eprintln!("NOTICE: {msg}");
    }
}

/// Removes the scratch directory through the privileged path, since the tree inside is root-owned.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        // Drop may run inside the test's runtime, which cannot block; use a runtime of our own.
        let dir = self.0.clone();
        let removed = std::thread::spawn(move || {
            let host = HostPrivileged::detect().unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(cleanup_work_dir(&dir, &host, &NoProgress))
                .unwrap();
            !dir.exists()
        })
        .join();
        assert!(
            matches!(removed, Ok(true)),
            "scratch dir {} was not removed",
            self.0.display()
        );
    }
}

#[tokio::test]
#[ignore = "real debootstrap: needs root, the Debian mirror and minutes; run by hand"]
async fn real_slim_build_produces_a_clean_hardened_bootable_looking_image() {
    let mirror = std::env::var("BANGER_TEST_MIRROR")
        .ok()
        .or_else(host_debian_mirror)
        .expect("no bookworm mirror in /etc/apt and BANGER_TEST_MIRROR unset");
    let name =
        std::env::var("BANGER_TEST_RECIPE").unwrap_or_else(|_| "debian-bookworm-slim".into());
    let recipe = recipe::builtin(&name).expect("unknown recipe");
    let scratch = Scratch(
        tempfile::Builder::new()
            .prefix("banger-image-build-")
            .tempdir_in("/var/tmp")
            .unwrap()
            .keep(),
    );
    let req = BuildRequest {
        recipe,
        mirror,
        work_dir: scratch.0.clone(),
        cancel: Default::default(),
    };
    let host = HostPrivileged::detect().unwrap();

    let started = Instant::now();
    let out = build(&req, &host, &Stderr).await.unwrap();
    let took = started.elapsed();

    assert!(
        !req.work_dir.join("tree").exists(),
        "build tree must be removed"
    );
    fsck_clean(&out.rootfs).await.unwrap();
    let sshd = debugfs_cat(&out.rootfs, "/etc/ssh/sshd_config.d/10-banger.conf")
        .await
        .unwrap();
    for line in [
        "PermitRootLogin prohibit-password",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
    ] {
        assert!(
            sshd.lines().any(|l| l == line),
            "{line} missing from:\n{sshd}"
        );
    }
    let init = debugfs_readlink(&out.rootfs, "/sbin/init").await.unwrap();
    assert!(
        init.ends_with("lib/systemd/systemd"),
        "/sbin/init -> {init}"
    );
    assert!(
        debugfs_cat(&out.rootfs, "/etc/ssh/ssh_host_ed25519_key")
            .await
            .is_err(),
        "host keys must be removed"
    );
    assert_eq!(
        debugfs_cat(&out.rootfs, "/etc/machine-id").await.unwrap(),
        ""
    );
    assert_eq!(
        debugfs_cat(&out.rootfs, "/etc/fstab")
            .await
            .unwrap()
            .lines()
            .last(),
        Some("/dev/vda / ext4 defaults 0 1")
    );
    let shadow = debugfs_cat(&out.rootfs, "/etc/shadow").await.unwrap();
    assert!(
        shadow.starts_with("root:*:"),
        "root password must be unusable: {}",
        shadow.lines().next().unwrap_or("")
    );
    let getty = debugfs_readlink(&out.rootfs, "/etc/systemd/system/getty@tty1.service")
        .await
        .unwrap();
    assert_eq!(getty, "/dev/null");
    assert!(
        debugfs_cat(&out.rootfs, "/usr/bin/dbus-daemon")
            .await
            .is_ok(),
        "dbus is installed"
    );

    let kernel = std::fs::metadata(&out.kernel).unwrap();
    let initrd = std::fs::metadata(out.initrd.as_ref().expect("initrd")).unwrap();
    assert!(kernel.len() > 1 << 20 && initrd.len() > 1 << 20);
    assert_eq!(kernel.mode() & 0o777, 0o644);
    let rootfs = std::fs::metadata(&out.rootfs).unwrap();
    assert_eq!(rootfs.len(), out.rootfs_size);
    eprintln!(
        "built {} in {:.1}s: kernel {} ({} bytes), initrd {} bytes, rootfs {} bytes apparent / {} bytes on disk",
        name,
        took.as_secs_f64(),
        out.kernel_version,
        kernel.len(),
        initrd.len(),
        rootfs.len(),
        rootfs.blocks() * 512
    );
}
