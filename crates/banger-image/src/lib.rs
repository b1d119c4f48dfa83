//! Pure image work for banger, usable without the daemon.
//!
//! Owns: golden-image recipes and the local build from Debian packages (`recipe`, `build`,
//! `mirror`), ext4 creation and inspection (`ext4`), the bundle format (`bundle`), verified
//! resumable downloads (`download`), pulling bundles (`pull`), the image catalog (`catalog`), and
//! container images from OCI registries with their content-addressed blob cache (`oci`), and
//! banger's generic guest kernel from Debian's package (`kernel`) with its initramfs (`initramfs`).
//! Host commands that need root go through `privileged`; progress is reported through `progress`
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
#[cfg(test)]
mod testutil;

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
pub use privileged::{HostPrivileged, PrivCommand, PrivError, Privileged, RecordingPrivileged};
pub use progress::{NoProgress, Progress, RecordingProgress};
pub use pull::{pull_bundle, PullError, PulledBundle};
pub use recipe::Recipe;
