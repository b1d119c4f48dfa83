//! The images service: building, pulling, registering, exporting and deleting images and
//! kernels, and keeping the store's files and rows in step.
//!
//! Files live in `STATE/images/NAME/rootfs.ext4` and `STATE/kernels/NAME/{vmlinuz,initrd.img}`.
//! Every operation works in a private staging directory under `STATE/tmp/`, moves finished
//! files into place with renames, and only then inserts the rows, in one transaction. A crash at
//! any point leaves either nothing (staging is swept at start-up, as are directories no row
//! names) or a complete image. An interrupted build's staging directory may hold a root-owned
//! tree with file systems a killed debootstrap left mounted in it; the sweep unmounts those and
//! removes it as root (`banger_image::workdir`), and never walks into a mount. The heavy lifting (debootstrap, bundles, downloads) is
//! `banger-image`'s; this module decides names, locations and what the store believes.
//!
//! One file per operation: [`build`], [`pull`] (catalog images and bundles; OCI images are
//! [`oci`]), [`register`], [`export`], [`delete`] (and prune), [`kernels`] (register, pull and
//! delete of kernels; the generic kernel is [`kernel`]). This file keeps the service, the sweep
//! at start-up, name reservations, staging and the commit every operation ends with.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use banger_api::{validate_name, ApiError, ErrorCode, ImageInfo, KernelInfo, Source};
use banger_config::{Config, Paths};
use banger_image::{MissingTool, Privileged, Progress};

use crate::fsutil;
use crate::registry::{Claim, Registry};
use crate::server::{disk_error, internal};

mod build;
mod delete;
mod export;
mod kernel;
mod kernels;
mod oci;
mod pull;
mod register;
#[cfg(test)]
mod tests;
use crate::now_rfc3339;
use crate::store::{self, Store};
pub use oci::GENERIC_KERNEL;

pub struct Images {
    paths: Paths,
    store: Store,
    config: Config,
    /// Names with an operation in flight, so two builds cannot race for one name.
    busy: Registry<()>,
    pull_lock: tokio::sync::Mutex<()>,
    /// OCI pulls hold this for reading from start to finish; pruning the blob cache holds it
    /// for writing, so it never removes a blob a pull is about to use or has just recorded.
    pull_gate: tokio::sync::RwLock<()>,
    /// Fetching the generic kernel, so concurrent first OCI pulls wait for one fetch.
    generic_kernel: tokio::sync::Mutex<()>,
    /// Shared with the VM service: creating a VM reads an image, replacing or deleting writes.
    image_locks: crate::image_locks::ImageLocks,
    /// Runs what needs root (builds, removing their trees); `None` finds sudo when needed.
    privileged: Option<Arc<dyn Privileged>>,
}

/// Holds a name busy until dropped.
type Reservation = Claim<()>;

/// Files ready to become an image (they sit in a staging directory).
pub struct Staged {
    pub rootfs: PathBuf,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
}

fn not_found(kind: &str, name: &str, known: &[String], hint_cmd: &str) -> ApiError {
    let known = if known.is_empty() {
        "none".to_owned()
    } else {
        known.join(", ")
    };
    ApiError::new(
        ErrorCode::NotFound,
        format!("no {kind} named {name:?} (the store has: {known})"),
    )
    .with_hint(hint_cmd.to_owned())
}

impl Images {
    pub fn new(
        paths: Paths,
        store: Store,
        config: Config,
        image_locks: crate::image_locks::ImageLocks,
    ) -> Self {
        Self {
            paths,
            store,
            config,
            busy: Registry::default(),
            pull_lock: tokio::sync::Mutex::new(()),
            pull_gate: tokio::sync::RwLock::new(()),
            generic_kernel: tokio::sync::Mutex::new(()),
            image_locks,
            privileged: None,
        }
    }

    /// Runs privileged commands through `privileged` instead of this host's root or sudo
    /// (tests use a runner whose debootstrap is a stand-in).
    pub fn with_privileged(mut self, privileged: Arc<dyn Privileged>) -> Self {
        self.privileged = Some(privileged);
        self
    }

    /// The runner for commands that need root: direct as root, `sudo -n` otherwise.
    fn privileged(&self) -> Result<Arc<dyn Privileged>, MissingTool> {
        match &self.privileged {
            Some(p) => Ok(p.clone()),
            None => Ok(Arc::new(banger_image::HostPrivileged::detect()?)),
        }
    }

    fn images_dir(&self) -> PathBuf {
        self.paths.state_dir.join("images")
    }
    fn kernels_dir(&self) -> PathBuf {
        self.paths.state_dir.join("kernels")
    }
    fn tmp_dir(&self) -> PathBuf {
        self.paths.state_dir.join("tmp")
    }

    /// Removes what an interrupted earlier run left: staging directories (see
    /// [`Images::sweep_staging`]), and image or kernel directories no row points into (their
    /// operation never committed, or a newer version replaced them).
    pub async fn sweep(&self) -> anyhow::Result<()> {
        let (images, kernels) = self
            .store
            .call(|c| Ok((store::list_images(c)?, store::list_kernels(c)?)))
            .await?;
        let (tmp, images_dir, kernels_dir) =
            (self.tmp_dir(), self.images_dir(), self.kernels_dir());
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            for dir in [&tmp, &images_dir, &kernels_dir] {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            // A directory is live when a row names a file in it (OCI pulls and the generic
            // kernel use one directory per version, so the name alone does not say).
            let live: HashSet<String> = images.iter().filter_map(|i| dir_name(&i.rootfs)).collect();
            remove_children(&images_dir, |n| !live.contains(n));
            let live: HashSet<String> =
                kernels.iter().filter_map(|k| dir_name(&k.kernel)).collect();
            remove_children(&kernels_dir, |n| !live.contains(n));
            Ok(())
        })
        .await??;
        self.sweep_staging().await;
        Ok(())
    }

    /// Removes every staging directory an earlier run left. An interrupted build's holds a
    /// root-owned tree, maybe with /proc or /sys still mounted in it (its debootstrap was killed
    /// with the daemon): those are unmounted and removed as root. Anything that cannot be
    /// removed is logged with what to do, and the daemon starts anyway.
    pub async fn sweep_staging(&self) {
        let tmp = self.tmp_dir();
        let leftovers: Vec<PathBuf> = match std::fs::read_dir(&tmp) {
            Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
            Err(e) => {
                tracing::warn!("cannot list {}: {e}", tmp.display());
                return;
            }
        };
        if leftovers.is_empty() {
            return;
        }
        // Only needed for a build's leftovers; without sudo the rest is still removed.
        let privileged = self.privileged();
        let privileged = match &privileged {
            Ok(p) => Some(p.as_ref()),
            Err(e) => {
                tracing::debug!("no privileged runner for the sweep: {e}");
                None
            }
        };
        for dir in leftovers {
            let removed = banger_image::remove_leftover(
                &dir,
                privileged,
                &banger_image::ProcMounts,
                &banger_image::NoProgress,
            )
            .await;
            match removed {
                Ok(banger_image::Removal::AsUser) => {
                    tracing::info!("removed leftover {}", dir.display());
                }
                Ok(banger_image::Removal::AsRoot { unmounted }) => tracing::info!(
                    unmounted = ?unmounted,
                    "removed leftover {} as root",
                    dir.display()
                ),
                Err(e) => tracing::warn!("{}", crate::hints::report(&e)),
            }
        }
    }

    fn reserve(&self, name: &str) -> Result<Reservation, ApiError> {
        self.busy.claim(name, ()).ok_or_else(|| {
            ApiError::new(
                ErrorCode::InUse,
                format!("another operation on image {name:?} is in progress"),
            )
            .with_hint("wait for it to finish")
        })
    }

    /// Reserves `name` for a new image after checking that neither an image nor a kernel has it.
    async fn reserve_new(&self, name: &str) -> Result<Reservation, ApiError> {
        validate_name("image", name)?;
        let r = self.reserve(name)?;
        let n = name.to_owned();
        let (img, ker) = self
            .store
            .call(move |c| Ok((store::get_image(c, &n)?, store::get_kernel(c, &n)?)))
            .await
            .map_err(internal)?;
        if img.is_some() || ker.is_some() {
            let what = if img.is_some() {
                "an image"
            } else {
                "a kernel"
            };
            return Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!("{what} named {name:?} already exists"),
            )
            .with_hint(format!(
                "pick another name with --name, or delete it first with `banger image delete {name}`"
            )));
        }
        Ok(r)
    }

    /// A fresh staging directory, removed when dropped.
    fn staging(&self) -> Result<tempfile::TempDir, ApiError> {
        std::fs::create_dir_all(self.tmp_dir())
            .and_then(|_| {
                tempfile::Builder::new()
                    .prefix("op-")
                    .tempdir_in(self.tmp_dir())
            })
            .map_err(|e| {
                ApiError::new(
                    ErrorCode::Internal,
                    format!(
                        "cannot create a staging directory in {}: {e}",
                        self.tmp_dir().display()
                    ),
                )
            })
    }

    /// Moves staged files into the store and records them: the only way images come to exist.
    async fn commit(
        &self,
        name: &str,
        staged: Staged,
        source: Source,
        origin: String,
        progress: &dyn Progress,
    ) -> Result<ImageInfo, ApiError> {
        progress.phase("register");
        let image_dir = self.images_dir().join(name);
        let kernel_dir = self.kernels_dir().join(name);
        let name_owned = name.to_owned();
        let (img, ker) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let rootfs_sha = fsutil::sha256_file(&staged.rootfs)?;
            let kernel_sha = fsutil::sha256_file(&staged.kernel)?;
            let initrd_sha = staged
                .initrd
                .as_deref()
                .map(fsutil::sha256_file)
                .transpose()?;
            let size = std::fs::metadata(&staged.rootfs)?.len();
            // Assemble both directories next to the staged files, then rename them in.
            let stage_root = staged
                .rootfs
                .parent()
                .context("staged rootfs has no parent")?
                .to_owned();
            let img_stage = stage_root.join("commit-image");
            let ker_stage = stage_root.join("commit-kernel");
            std::fs::create_dir(&img_stage)?;
            std::fs::create_dir(&ker_stage)?;
            std::fs::rename(&staged.rootfs, img_stage.join("rootfs.ext4"))?;
            std::fs::rename(&staged.kernel, ker_stage.join("vmlinuz"))?;
            if let Some(i) = &staged.initrd {
                std::fs::rename(i, ker_stage.join("initrd.img"))?;
            }
            fsutil::fsync_dir(&img_stage)?;
            fsutil::fsync_dir(&ker_stage)?;
            fsutil::durable_rename(&img_stage, &image_dir)?;
            if let Err(e) = fsutil::durable_rename(&ker_stage, &kernel_dir) {
                let _ = std::fs::remove_dir_all(&image_dir);
                return Err(e);
            }
            let created_at = now_rfc3339();
            let ker = KernelInfo {
                name: name_owned.clone(),
                source: source.clone(),
                kernel: kernel_dir.join("vmlinuz").display().to_string(),
                kernel_sha256: kernel_sha,
                initrd: staged
                    .initrd
                    .as_ref()
                    .map(|_| kernel_dir.join("initrd.img").display().to_string()),
                initrd_sha256: initrd_sha,
                created_at: created_at.clone(),
            };
            let img = ImageInfo {
                name: name_owned,
                source,
                origin,
                rootfs: image_dir.join("rootfs.ext4").display().to_string(),
                rootfs_sha256: Some(rootfs_sha),
                size_bytes: size,
                kernel: ker.name.clone(),
                created_at,
                boot: banger_api::Boot::Systemd,
                oci: None,
                snapshot_bytes: 0,
            };
            Ok((img, ker))
        })
        .await
        .map_err(|e| internal(e.into()))?
        .map_err(|e| disk_error(e, "cannot move the image into the store"))?;

        let (i2, k2) = (img.clone(), ker.clone());
        let inserted = self
            .store
            .call(move |c| {
                let tx = c.transaction()?;
                store::insert_kernel(&tx, &k2)?;
                store::insert_image(&tx, &i2)?;
                tx.commit()?;
                Ok(())
            })
            .await;
        if let Err(e) = inserted {
            // Without rows the files are garbage; remove them now rather than at next start.
            let _ = std::fs::remove_dir_all(self.images_dir().join(name));
            let _ = std::fs::remove_dir_all(self.kernels_dir().join(name));
            return Err(internal(e));
        }
        tracing::info!(image = %img.name, source = %img.source, "image registered");
        Ok(img)
    }

    pub async fn list(&self) -> anyhow::Result<Vec<ImageInfo>> {
        self.store.call(|c| store::list_images(c)).await
    }

    pub async fn kernels(&self) -> anyhow::Result<Vec<KernelInfo>> {
        self.store.call(|c| store::list_kernels(c)).await
    }

    /// The image and its kernel, or a not-found error listing what exists.
    pub async fn get(&self, name: &str) -> Result<(ImageInfo, KernelInfo), ApiError> {
        image_with_kernel(&self.store, name).await
    }

    /// The Debian mirror for builds and the generic kernel: config first, then the host's apt
    /// sources.
    fn debian_mirror(&self) -> Result<String, ApiError> {
        self.config
            .debian_mirror
            .clone()
            .or_else(banger_image::mirror::host_debian_mirror)
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::BuildFailed,
                    "cannot find a Debian mirror in the host's apt sources",
                )
                .with_hint(
                    "set `debian_mirror = \"http://.../debian\"` in ~/.config/banger/config.toml",
                )
            })
    }
}

/// The image named `name`, or else the newest image pulled from the OCI reference `name`
/// (`alpine:3.20` finds what `image pull alpine:3.20` stored as `alpine-3-20`).
pub async fn find_image(store: &Store, name: &str) -> Result<Option<ImageInfo>, ApiError> {
    let n = name.to_owned();
    let canonical = banger_image::oci::reference::Reference::parse(name)
        .ok()
        .map(|r| r.to_string());
    store
        .call(move |c| {
            if let Some(img) = store::get_image(c, &n)? {
                return Ok(Some(img));
            }
            Ok(match canonical {
                Some(r) => store::images_from_reference(c, &r)?.into_iter().next(),
                None => None,
            })
        })
        .await
        .map_err(internal)
}

/// An image and its kernel, or a not-found error listing the images that exist.
pub async fn image_with_kernel(
    store: &Store,
    name: &str,
) -> Result<(ImageInfo, KernelInfo), ApiError> {
    let img = find_image(store, name).await?;
    let Some(img) = img else {
        let all = store
            .call(|c| store::list_images(c))
            .await
            .map_err(internal)?;
        let known: Vec<String> = all.into_iter().map(|i| i.name).collect();
        return Err(not_found(
            "image",
            name,
            &known,
            &format!("build it with `banger image build`, pull it with `banger image pull {name}`, or see `banger image list`"),
        ));
    };
    let k = img.kernel.clone();
    let ker = store
        .call(move |c| store::get_kernel(c, &k))
        .await
        .map_err(internal)?
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::Internal,
                format!(
                    "image {name:?} names kernel {:?}, which is missing",
                    img.kernel
                ),
            )
        })?;
    Ok((img, ker))
}

/// The name of the directory holding `file` (`images/NAME@DIGEST/rootfs.ext4` -> `NAME@DIGEST`).
fn dir_name(file: &str) -> Option<String> {
    Path::new(file)
        .parent()?
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

/// The store directory holding `file`, if it is a direct child of `root` (a row's path is
/// never trusted to point elsewhere before something is deleted).
fn store_dir(root: &Path, file: &str) -> Option<PathBuf> {
    let dir = Path::new(file).parent()?;
    (dir.parent() == Some(root)).then(|| dir.to_owned())
}

fn remove_children(dir: &Path, doomed: impl Fn(&str) -> bool) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if doomed(&name) {
            let p = e.path();
            tracing::info!("removing leftover {}", p.display());
            let r = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            if let Err(err) = r {
                tracing::warn!("cannot remove {}: {err}", p.display());
            }
        }
    }
}

/// Builds an API error from an error chain: every cause once, joined by ": " into one message,
/// and the hints the chain's errors carry (see [`crate::hints`]).
pub fn chain_error(code: ErrorCode, e: &(dyn std::error::Error + 'static)) -> ApiError {
    crate::hints::api_error(code, crate::hints::report(e))
}
