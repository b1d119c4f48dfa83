//! Pure image work for banger, usable without the daemon.
//!
//! Owns: golden-image recipes and the local build from Debian packages (`recipe`, `build`,
//! `mirror`), ext4 creation and inspection (`ext4`), the bundle format (`bundle`), verified
//! resumable downloads (`download`), pulling bundles (`pull`), the image catalog (`catalog`), and
//! container images from OCI registries with their content-addressed blob cache (`oci`), and
//! banger's generic guest kernel from Debian's package (`kernel`) with its initramfs (`initramfs`).
//! Host commands that need root go through `privileged` (each under a guard that kills it with
//! everything it started when its caller cancels or dies), and root-owned work directories are
//! removed, mounts first, by `workdir`; progress is reported through `progress`
//! and never drawn. Leaves to the daemon: the SQLite store, image registration, choosing
//! directories, locking, and turning progress into API events.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod blocking;
pub mod build;
pub mod bundle;
mod capped;
pub mod catalog;
pub mod digest;
pub mod download;
pub mod ext4;
pub mod hosttools;
pub mod initramfs;
pub mod kernel;
pub mod mirror;
pub mod oci;
pub mod privileged;
pub mod progress;
pub mod pull;
pub mod recipe;
/// Helpers for tests with real processes and mounts, shared with the daemon's tests.
#[cfg(any(test, feature = "testkit"))]
pub mod testproc;
#[cfg(test)]
mod testutil;
pub mod workdir;

pub use build::{build, BuildError, BuildOutput, BuildRequest};
pub use bundle::{export, BundleError, BundleSources, FileEntry, Manifest, Role};
pub use catalog::{
    Catalog, CatalogError, Entry as CatalogEntry, Source as CatalogSource, UnknownImage,
};
pub use digest::Sha256Digest;
pub use download::{fetch, DownloadError};
pub use ext4::MiB;
pub use hosttools::{require_tool, MissingTool};
pub use mirror::host_debian_mirror;
pub use privileged::{
    Cancellable, HostPrivileged, PrivCommand, PrivError, Privileged, RecordingPrivileged,
};
pub use progress::{NoProgress, Progress, RecordingProgress};
pub use pull::{pull_bundle, PullError, PulledBundle};
pub use recipe::Recipe;
pub use workdir::{remove_leftover, ProcMounts, Removal, WorkDirError};

use banger_hint::probe;

/// The crate's error types that carry hints, for a [`banger_hint::Report`] of an error chain.
/// Every type here that implements [`banger_hint::Hint`] must be listed: Rust cannot enumerate a
/// trait's implementations, so nothing fails if one is forgotten except its hint going missing
/// (`tests::every_hinted_type_is_probed` keeps this list and its samples in step).
pub const HINTS: &[banger_hint::Probe] = &[
    probe::<DownloadError>,
    probe::<MissingTool>,
    probe::<PrivError>,
    probe::<BuildError>,
    probe::<ext4::Ext4Error>,
    probe::<BundleError>,
    probe::<UnknownImage>,
    probe::<PullError>,
    probe::<kernel::KernelError>,
    probe::<oci::reference::BadReference>,
    probe::<oci::auth::AuthError>,
    probe::<oci::client::OciError>,
    probe::<oci::manifest::ManifestError>,
    probe::<oci::layer::LayerError>,
    probe::<oci::ext4::Ext4BuildError>,
    probe::<oci::flatten::FlattenError>,
    probe::<WorkDirError>,
];

#[cfg(test)]
mod tests {
    use super::*;
    use banger_hint::Report;
    use std::error::Error;
    use std::path::PathBuf;

    fn tool() -> MissingTool {
        MissingTool {
            bin: "debugfs".into(),
            package: "e2fsprogs".into(),
        }
    }

    /// One hinted value of each type, in the order of [`HINTS`].
    fn samples() -> Vec<Box<dyn Error>> {
        let d = Sha256Digest::of_bytes;
        vec![
            Box::new(DownloadError::DiskFull { path: "/x".into() }),
            Box::new(tool()),
            Box::new(PrivError::Failed {
                op: "debootstrap".into(),
                status: "exit status: 1".into(),
                tail: vec!["sudo: a password is required".into()],
                via_sudo: true,
            }),
            Box::new(BuildError::NoKernel { boot: "/t".into() }),
            Box::new(ext4::Ext4Error::MissingTool(tool())),
            Box::new(BundleError::UnsupportedFormat { found: 9 }),
            Box::new(UnknownImage {
                name: "x".into(),
                known: vec![],
            }),
            Box::new(PullError::ManifestDigest {
                url: "u".into(),
                expected: d(b"a"),
                actual: d(b"b"),
            }),
            Box::new(kernel::KernelError::NoKeyring {
                keyring: "/k".into(),
            }),
            Box::new(oci::reference::Reference::parse("A:").unwrap_err()),
            Box::new(oci::auth::AuthError::BadAuth {
                path: "/c".into(),
                key: "k".into(),
            }),
            Box::new(oci::client::OciError::NotFound {
                reference: "r".into(),
                url: "u".into(),
                detail: String::new(),
            }),
            Box::new(oci::manifest::ManifestError::Schema1),
            Box::new(oci::layer::LayerError::DiffId {
                expected: d(b"a"),
                actual: d(b"b"),
            }),
            Box::new(oci::ext4::Ext4BuildError::MissingTool(tool())),
            Box::new(oci::flatten::FlattenError::Ext4 {
                out: PathBuf::from("/r"),
                source: Box::new(oci::ext4::Ext4BuildError::LineTooLong {
                    path: "/a".into(),
                    len: 9000,
                }),
            }),
            Box::new(WorkDirError::NeedsRoot {
                dir: "/s/tmp/op-1".into(),
                source: None,
            }),
        ]
    }

    #[test]
    fn every_hinted_type_is_probed() {
        let samples = samples();
        assert_eq!(samples.len(), HINTS.len(), "one sample per probe");
        for (i, (probe, sample)) in HINTS.iter().zip(&samples).enumerate() {
            let hint = probe(sample.as_ref());
            assert!(hint.is_some(), "probe {i} finds no hint on `{sample}`");
            assert!(!sample.to_string().contains("hint:"), "{sample}");
        }
    }

    #[test]
    fn hints_behind_transparent_and_boxed_wrappers_are_found() {
        // Transparent: OciError::Download is not a link of its own.
        let e = oci::client::OciError::Download(DownloadError::DiskFull { path: "/c".into() });
        let r = Report::new(&e, &[HINTS]);
        assert_eq!(r.message(), "no space left on the disk holding /c");
        assert_eq!(r.hints, ["free some space there and run the command again"]);
        // Boxed source.
        let e = kernel::KernelError::Download {
            what: "the package index".into(),
            source: Box::new(DownloadError::DiskFull { path: "/c".into() }),
        };
        let r = Report::new(&e, &[HINTS]);
        assert_eq!(
            r.message(),
            "cannot download the package index: no space left on the disk holding /c"
        );
        assert_eq!(r.hints, ["free some space there and run the command again"]);
        // A wrapper that leaves the hint to its (boxed) source.
        let e = oci::flatten::FlattenError::Ext4 {
            out: "/r".into(),
            source: Box::new(oci::ext4::Ext4BuildError::MissingTool(tool())),
        };
        let r = Report::new(&e, &[HINTS]);
        assert_eq!(r.hints, ["apt-get install e2fsprogs"]);
    }
}
