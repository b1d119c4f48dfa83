//! The images service: building, pulling, registering, exporting and deleting images and
//! kernels, and keeping the store's files and rows in step.
//!
//! Files live in `STATE/images/NAME/rootfs.ext4` and `STATE/kernels/NAME/{vmlinuz,initrd.img}`.
//! Every operation works in a private staging directory under `STATE/tmp/`, moves finished
//! files into place with renames, and only then inserts the rows, in one transaction. A crash at
//! any point leaves either nothing (staging is swept at start-up, as are directories no row
//! names) or a complete image. The heavy lifting (debootstrap, bundles, downloads) is
//! `banger-image`'s; this module decides names, locations and what the store believes.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use banger_api::{
    validate_name, ApiError, BuildImageRequest, Deleted, ErrorCode, ExportImageRequest,
    ExportResult, ImageInfo, KernelInfo, Pruned, PullImageRequest, PullKernelRequest,
    RegisterImageRequest, RegisterKernelRequest, Source,
};
use banger_config::{Config, Paths};
use banger_image::Progress;

use crate::fsutil;
use crate::server::{internal, Emitter};

mod kernel;
mod oci;
use crate::now_rfc3339;
use crate::store::{self, Store};
pub use oci::GENERIC_KERNEL;

pub struct Images {
    paths: Paths,
    store: Store,
    config: Config,
    /// Names with an operation in flight, so two builds cannot race for one name.
    busy: Arc<Mutex<HashSet<String>>>,
    pull_lock: tokio::sync::Mutex<()>,
    /// OCI pulls hold this for reading from start to finish; pruning the blob cache holds it
    /// for writing, so it never removes a blob a pull is about to use or has just recorded.
    pull_gate: tokio::sync::RwLock<()>,
    /// Fetching the generic kernel, so concurrent first OCI pulls wait for one fetch.
    generic_kernel: tokio::sync::Mutex<()>,
    /// Shared with the VM service: creating a VM reads an image, replacing or deleting writes.
    image_locks: crate::image_locks::ImageLocks,
}

/// Holds a name busy until dropped.
struct Reservation {
    busy: Arc<Mutex<HashSet<String>>>,
    name: String,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Ok(mut b) = self.busy.lock() {
            b.remove(&self.name);
        }
    }
}

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
            busy: Arc::default(),
            pull_lock: tokio::sync::Mutex::new(()),
            pull_gate: tokio::sync::RwLock::new(()),
            generic_kernel: tokio::sync::Mutex::new(()),
            image_locks,
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

    /// Removes what an interrupted earlier run left: staging directories, and image or kernel
    /// directories no row points into (their operation never committed, or a newer version
    /// replaced them).
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
            remove_children(&tmp, |_| true);
            // A directory is live when a row names a file in it (OCI pulls and the generic
            // kernel use one directory per version, so the name alone does not say).
            let live: HashSet<String> = images.iter().filter_map(|i| dir_name(&i.rootfs)).collect();
            remove_children(&images_dir, |n| !live.contains(n));
            let live: HashSet<String> =
                kernels.iter().filter_map(|k| dir_name(&k.kernel)).collect();
            remove_children(&kernels_dir, |n| !live.contains(n));
            Ok(())
        })
        .await?
    }

    fn reserve(&self, name: &str) -> Result<Reservation, ApiError> {
        let mut busy = self
            .busy
            .lock()
            .map_err(|_| ApiError::new(ErrorCode::Internal, "image lock poisoned"))?;
        if !busy.insert(name.to_owned()) {
            return Err(ApiError::new(
                ErrorCode::InUse,
                format!("another operation on image {name:?} is in progress"),
            )
            .with_hint("wait for it to finish"));
        }
        Ok(Reservation {
            busy: self.busy.clone(),
            name: name.to_owned(),
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
                rootfs_sha256: rootfs_sha,
                size_bytes: size,
                kernel: ker.name.clone(),
                created_at,
                boot: banger_api::Boot::Systemd,
                oci: None,
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

    pub async fn build(
        &self,
        req: BuildImageRequest,
        progress: Emitter,
    ) -> Result<ImageInfo, ApiError> {
        let name = req.name.clone().unwrap_or_else(|| req.recipe.clone());
        let recipe = banger_image::recipe::builtin(&req.recipe).ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotFound,
                format!(
                    "no recipe named {:?} (recipes: {})",
                    req.recipe,
                    banger_image::recipe::builtin_names().join(", ")
                ),
            )
        })?;
        let _r = self.reserve_new(&name).await?;
        self.build_recipe(&name, recipe, &progress).await
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

    async fn build_recipe(
        &self,
        name: &str,
        recipe: banger_image::recipe::Recipe,
        progress: &Emitter,
    ) -> Result<ImageInfo, ApiError> {
        let mirror = self.debian_mirror()?;
        let privileged = banger_image::privileged::HostPrivileged::detect()
            .map_err(|e| chain_error(ErrorCode::MissingTool, &e))?;
        let staging = self.staging()?;
        let req = banger_image::build::BuildRequest {
            recipe: recipe.clone(),
            mirror,
            work_dir: staging.path().to_owned(),
        };
        let built = banger_image::build::build(&req, &privileged, progress).await;
        let out = match built {
            Ok(out) => out,
            Err(e) => {
                // The builder removes its tree itself; this also catches a tree left by a crash.
                let _ =
                    banger_image::build::cleanup_work_dir(staging.path(), &privileged, progress)
                        .await;
                return Err(build_err(e));
            }
        };
        let staged = Staged {
            rootfs: out.rootfs,
            kernel: out.kernel,
            initrd: out.initrd,
        };
        self.commit(
            name,
            staged,
            Source::Built,
            format!("recipe {}", recipe.name),
            progress,
        )
        .await
    }

    pub async fn pull(
        &self,
        req: PullImageRequest,
        progress: Emitter,
    ) -> Result<ImageInfo, ApiError> {
        let reference = req.reference.trim().to_owned();
        let resolved = match self.resolve_pull(&reference).await? {
            PullSource::Oci(r, None) => return self.pull_oci(r, req.name.clone(), &progress).await,
            PullSource::Oci(r, Some(catalog_miss)) => {
                // A name the catalog does not know was tried as an OCI image; if the registry
                // does not know it either, say both.
                return match self.pull_oci(r.clone(), req.name.clone(), &progress).await {
                    // Docker Hub answers 401 for repositories that do not exist.
                    Err(e) if e.code == ErrorCode::NotFound || e.message.contains("401") => {
                        let hint = [catalog_miss.hint.as_deref(), e.hint.as_deref()]
                            .into_iter()
                            .flatten()
                            .collect::<Vec<_>>()
                            .join("; ");
                        Err(ApiError::new(
                            ErrorCode::NotFound,
                            format!(
                                "{}; as an OCI image, {r}: {}",
                                catalog_miss.message, e.message
                            ),
                        )
                        .with_hint(hint))
                    }
                    other => other,
                };
            }
            PullSource::Catalog(resolved) => resolved,
        };
        let (manifest_url, manifest_pin) = match resolved {
            Resolved::Bundle { url, pin } => (url, pin),
            Resolved::Recipe(recipe) => {
                let name = req.name.clone().unwrap_or_else(|| reference.clone());
                let _r = self.reserve_new(&name).await?;
                progress.notice(&format!(
                    "{reference} has no prebuilt bundle; building it locally from Debian packages"
                ));
                return self.build_recipe(&name, *recipe, &progress).await;
            }
        };
        let name = pull_name(&reference, req.name.as_deref(), "image")?;
        let _r = self.reserve_new(&name).await?;
        let staging = self.staging()?;
        let downloads = self.paths.cache_dir.join("downloads");
        // Concurrent pulls would share partial files in the download cache.
        let _pulling = self.pull_lock.lock().await;
        let pulled = banger_image::pull::pull_bundle(
            &manifest_url,
            manifest_pin.as_ref(),
            staging.path(),
            &downloads,
            &progress,
        )
        .await
        .map_err(pull_err)?;
        let staged = Staged {
            rootfs: pulled.rootfs,
            kernel: pulled.kernel,
            initrd: pulled.initrd,
        };
        self.commit(&name, staged, Source::Pulled, manifest_url, &progress)
            .await
    }

    async fn catalog(&self) -> Result<banger_image::catalog::Catalog, ApiError> {
        match &self.config.catalog_url {
            None => Ok(banger_image::catalog::Catalog::builtin()),
            Some(url) => banger_image::catalog::Catalog::load(url)
                .await
                .map_err(catalog_err),
        }
    }

    /// What `image pull` was given: a catalog entry, bundle URL or path first; otherwise an OCI
    /// image reference (`docker://` skips the catalog).
    async fn resolve_pull(&self, reference: &str) -> Result<PullSource, ApiError> {
        if reference.starts_with("docker://") {
            if let Some(r) = oci::oci_reference(reference) {
                return r.map(|r| PullSource::Oci(r, None));
            }
        }
        match self.resolve_bundle(reference).await {
            Ok(r) => Ok(PullSource::Catalog(r)),
            Err(e) if e.code == ErrorCode::NotFound => match oci::oci_reference(reference) {
                Some(r) => r.map(|r| PullSource::Oci(r, Some(e))),
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// What a pull reference names: a bundle (catalog entries may pin its manifest's digest) or,
    /// for catalog entries without a prebuilt bundle, a recipe to build.
    async fn resolve_bundle(&self, reference: &str) -> Result<Resolved, ApiError> {
        if reference.contains("://") || reference.starts_with('/') {
            return Ok(Resolved::Bundle {
                url: reference.to_owned(),
                pin: None,
            });
        }
        let catalog = self.catalog().await?;
        let entry = catalog
            .lookup(reference)
            .map_err(|e| chain_error(ErrorCode::NotFound, &e))?;
        match &entry.source {
            banger_image::catalog::Source::Recipe { recipe } => {
                banger_image::recipe::builtin(recipe)
                    .map(|r| Resolved::Recipe(Box::new(r)))
                    .ok_or_else(|| {
                        ApiError::new(
                            ErrorCode::Internal,
                            format!("catalog entry {reference:?} names unknown recipe {recipe:?}"),
                        )
                    })
            }
            banger_image::catalog::Source::Bundle {
                manifest_url,
                manifest_sha256,
            } => Ok(Resolved::Bundle {
                url: manifest_url.clone(),
                pin: *manifest_sha256,
            }),
        }
    }

    /// `kernel pull`: a bundle's kernel and initrd, without its root filesystem.
    pub async fn pull_kernel(
        &self,
        req: PullKernelRequest,
        progress: Emitter,
    ) -> Result<KernelInfo, ApiError> {
        let reference = req.reference.trim().to_owned();
        if reference == GENERIC_KERNEL && req.name.as_deref().is_none_or(|n| n == GENERIC_KERNEL) {
            return self.fetch_generic_kernel(&progress, true).await;
        }
        let (url, pin) = match self.resolve_bundle(&reference).await? {
            Resolved::Bundle { url, pin } => (url, pin),
            Resolved::Recipe(_) => {
                return Err(ApiError::new(
                    ErrorCode::NotFound,
                    format!("{reference} has no prebuilt bundle to take a kernel from"),
                )
                .with_hint(format!(
                    "`banger image build {reference}` builds the image together with its kernel"
                )))
            }
        };
        let name = pull_name(&reference, req.name.as_deref(), "kernel")?;
        let _r = self.reserve_new_kernel(&name).await?;
        let staging = self.staging()?;
        let downloads = self.paths.cache_dir.join("downloads");
        let pulled = {
            let _pulling = self.pull_lock.lock().await;
            banger_image::pull::pull_kernel(
                &url,
                pin.as_ref(),
                staging.path(),
                &downloads,
                &progress,
            )
            .await
            .map_err(pull_err)?
        };
        progress.phase("store kernel");
        self.add_kernel(
            &name,
            &pulled.kernel,
            pulled.initrd.as_deref(),
            Source::Pulled,
        )
        .await
    }

    pub async fn register(
        &self,
        req: RegisterImageRequest,
        progress: Emitter,
    ) -> Result<ImageInfo, ApiError> {
        let _r = self.reserve_new(&req.name).await?;
        for (what, p) in [
            ("rootfs", Some(&req.rootfs)),
            ("kernel", Some(&req.kernel)),
            ("initrd", req.initrd.as_ref()),
        ] {
            if let Some(p) = p {
                if !Path::new(p).is_file() {
                    return Err(ApiError::new(
                        ErrorCode::BadRequest,
                        format!("{what} file {p} does not exist or is not a regular file"),
                    ));
                }
            }
        }
        let staging = self.staging()?;
        progress.phase("copy files");
        let dir = staging.path().to_owned();
        let req2 = req.clone();
        let staged = tokio::task::spawn_blocking(move || -> anyhow::Result<Staged> {
            let rootfs = dir.join("rootfs.ext4");
            fsutil::clone_file(Path::new(&req2.rootfs), &rootfs)?;
            let kernel = dir.join("vmlinuz");
            fsutil::clone_file(Path::new(&req2.kernel), &kernel)?;
            let initrd = match &req2.initrd {
                Some(i) => {
                    let p = dir.join("initrd.img");
                    fsutil::clone_file(Path::new(i), &p)?;
                    Some(p)
                }
                None => None,
            };
            Ok(Staged {
                rootfs,
                kernel,
                initrd,
            })
        })
        .await
        .map_err(|e| internal(e.into()))?
        .map_err(|e| disk_error(e, "cannot copy the image files into the store"))?;
        self.commit(
            &req.name,
            staged,
            Source::Registered,
            req.rootfs.clone(),
            &progress,
        )
        .await
    }

    pub async fn export(
        &self,
        req: ExportImageRequest,
        progress: Emitter,
    ) -> Result<ExportResult, ApiError> {
        let (img, ker) = self.get(&req.name).await?;
        let _r = self.reserve(&req.name)?;
        let sources = banger_image::bundle::BundleSources {
            rootfs: PathBuf::from(&img.rootfs),
            kernel: PathBuf::from(&ker.kernel),
            initrd: ker.initrd.as_ref().map(PathBuf::from),
        };
        let out_dir = PathBuf::from(&req.out_dir);
        // The version names when the image was made, in a form safe for file names.
        let version: String = img
            .created_at
            .chars()
            .filter(|c| c.is_ascii_digit())
            .take(14)
            .collect();
        let manifest =
            banger_image::bundle::export(&sources, &img.name, &version, &out_dir, &progress)
                .await
                .map_err(bundle_err)?;
        Ok(ExportResult {
            manifest: out_dir
                .join(banger_image::bundle::MANIFEST_NAME)
                .display()
                .to_string(),
            files: manifest.files.iter().map(|f| f.path.clone()).collect(),
        })
    }

    pub async fn delete(&self, name: &str) -> Result<Deleted, ApiError> {
        let (img, ker) = self.get(name).await?;
        let ker_path = ker.kernel.clone();
        // The image's own name, even when it was found by its OCI reference.
        let name = img.name.as_str();
        let _r = self.reserve(name)?;
        let n = name.to_owned();
        let users = self
            .store
            .call(move |c| store::vms_using_image(c, &n))
            .await
            .map_err(internal)?;
        if !users.is_empty() {
            return Err(ApiError::new(
                ErrorCode::InUse,
                format!("image {name:?} is used by VM(s) {}", users.join(", ")),
            )
            .with_hint("delete those VMs first with `banger vm delete`"));
        }
        let n = name.to_owned();
        let kernel = img.kernel.clone();
        let kernel_path = ker_path.clone();
        // Rows go first: a crash after this leaves only unreferenced files, swept at start-up.
        let drop_kernel = self
            .store
            .call(move |c| {
                let tx = c.transaction()?;
                store::delete_image(&tx, &n)?;
                // The kernel an image brought goes with it unless another image uses it.
                let drop_kernel =
                    kernel == n && store::images_using_kernel(&tx, &kernel)?.is_empty();
                if drop_kernel {
                    store::delete_kernel(&tx, &kernel)?;
                }
                tx.commit()?;
                Ok(drop_kernel)
            })
            .await
            .map_err(internal)?;
        {
            // Only now, with no VM being made from it, do the files go.
            let _w = self.image_locks.write(name).await;
            if let Some(dir) = store_dir(&self.images_dir(), &img.rootfs) {
                let _ = tokio::fs::remove_dir_all(dir).await;
            }
        }
        if drop_kernel {
            if let Some(dir) = store_dir(&self.kernels_dir(), &kernel_path) {
                let _ = tokio::fs::remove_dir_all(dir).await;
            }
        }
        if img.oci.is_some() {
            // While pulls run, their blobs are not recorded yet: leave pruning to later.
            if let Some(freed) = self.prune_blobs(false).await {
                tracing::info!(image = name, freed, "pruned the OCI blob cache");
            }
        }
        Ok(Deleted {
            name: name.to_owned(),
        })
    }

    /// `image prune`: drops cached OCI blobs (and interrupted downloads) no image needs; waits
    /// for pulls in progress to finish first.
    pub async fn prune(&self) -> Result<Pruned, ApiError> {
        Ok(Pruned {
            freed_bytes: self.prune_blobs(true).await.unwrap_or(0),
        })
    }

    pub async fn register_kernel(
        &self,
        req: RegisterKernelRequest,
    ) -> Result<KernelInfo, ApiError> {
        let _r = self.reserve_new_kernel(&req.name).await?;
        self.add_kernel(
            &req.name,
            Path::new(&req.kernel),
            req.initrd.as_deref().map(Path::new),
            Source::Registered,
        )
        .await
    }

    /// Reserves `name` for a new kernel after checking that no kernel has it. The reservation is
    /// held through the download and the copy, so two pulls of one name cannot both proceed.
    async fn reserve_new_kernel(&self, name: &str) -> Result<Reservation, ApiError> {
        validate_name("kernel", name)?;
        let r = self.reserve(name)?;
        let n = name.to_owned();
        if self
            .store
            .call(move |c| store::get_kernel(c, &n))
            .await
            .map_err(internal)?
            .is_some()
        {
            return Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!("a kernel named {name:?} already exists"),
            )
            .with_hint(format!(
                "delete it first with `banger kernel delete {name}`"
            )));
        }
        Ok(r)
    }

    /// Copies a kernel (and initrd) into the store and records it. The caller holds the name's
    /// reservation.
    async fn add_kernel(
        &self,
        name: &str,
        kernel: &Path,
        initrd: Option<&Path>,
        source: Source,
    ) -> Result<KernelInfo, ApiError> {
        let staging = self.staging()?;
        let dir = staging.path().join("kernel");
        let final_dir = self.kernels_dir().join(name);
        let (name2, kernel, initrd) = (
            name.to_owned(),
            kernel.to_owned(),
            initrd.map(Path::to_owned),
        );
        let info = tokio::task::spawn_blocking(move || -> anyhow::Result<KernelInfo> {
            std::fs::create_dir(&dir)?;
            fsutil::clone_file(&kernel, &dir.join("vmlinuz"))?;
            if let Some(i) = &initrd {
                fsutil::clone_file(i, &dir.join("initrd.img"))?;
            }
            let info = KernelInfo {
                name: name2,
                source,
                kernel: final_dir.join("vmlinuz").display().to_string(),
                kernel_sha256: fsutil::sha256_file(&dir.join("vmlinuz"))?,
                initrd: initrd
                    .as_ref()
                    .map(|_| final_dir.join("initrd.img").display().to_string()),
                initrd_sha256: initrd
                    .as_ref()
                    .map(|_| fsutil::sha256_file(&dir.join("initrd.img")))
                    .transpose()?,
                created_at: now_rfc3339(),
            };
            fsutil::fsync_dir(&dir)?;
            fsutil::durable_rename(&dir, &final_dir)?;
            Ok(info)
        })
        .await
        .map_err(|e| internal(e.into()))?
        .map_err(|e| disk_error(e, "cannot copy the kernel into the store"))?;
        let i2 = info.clone();
        if let Err(e) = self.store.call(move |c| store::insert_kernel(c, &i2)).await {
            let _ = std::fs::remove_dir_all(self.kernels_dir().join(name));
            return Err(internal(e));
        }
        Ok(info)
    }

    pub async fn delete_kernel(&self, name: &str) -> Result<Deleted, ApiError> {
        let n = name.to_owned();
        let (k, users, all) = self
            .store
            .call(move |c| {
                Ok((
                    store::get_kernel(c, &n)?,
                    store::images_using_kernel(c, &n)?,
                    store::list_kernels(c)?,
                ))
            })
            .await
            .map_err(internal)?;
        if k.is_none() {
            let known: Vec<String> = all.into_iter().map(|k| k.name).collect();
            return Err(not_found(
                "kernel",
                name,
                &known,
                "see `banger kernel list`",
            ));
        }
        if !users.is_empty() {
            return Err(ApiError::new(
                ErrorCode::InUse,
                format!("kernel {name:?} is used by image(s) {}", users.join(", ")),
            )
            .with_hint("delete those images first"));
        }
        let n = name.to_owned();
        self.store
            .call(move |c| store::delete_kernel(c, &n))
            .await
            .map_err(internal)?;
        if let Some(k) = k {
            if let Some(dir) = store_dir(&self.kernels_dir(), &k.kernel) {
                let _ = tokio::fs::remove_dir_all(dir).await;
            }
        }
        Ok(Deleted {
            name: name.to_owned(),
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

/// An I/O failure while filling the store; a full disk gets its own code and hint.
fn disk_error(e: anyhow::Error, what: &str) -> ApiError {
    let full = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::ENOSPC))
    });
    if full {
        ApiError::new(ErrorCode::DiskFull, format!("{what}: {e:#}"))
            .with_hint("the disk holding ~/.local/state/banger is full; free some space and retry")
    } else {
        internal(e.context(what.to_owned()))
    }
}

/// Builds an API error from an error chain: every cause joined by ": " into one message, and
/// `hint:` lines (which `banger-image` errors carry in their text) moved into the hint.
pub fn chain_error(code: ErrorCode, e: &(dyn std::error::Error + 'static)) -> ApiError {
    let mut parts: Vec<String> = Vec::new();
    let mut hints: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        let mut own = Vec::new();
        for line in text.lines() {
            match line.trim_start().strip_prefix("hint: ") {
                Some(h) => hints.push(h.to_owned()),
                None => own.push(line),
            }
        }
        let own = own.join("\n");
        // transparent wrappers repeat their source's text; print it once
        if !own.is_empty() && parts.last() != Some(&own) {
            parts.push(own);
        }
        cur = err.source();
    }
    let mut api = ApiError::new(code, parts.join(": "));
    if !hints.is_empty() {
        api = api.with_hint(hints.join("; "));
    }
    api
}

fn build_err(e: banger_image::build::BuildError) -> ApiError {
    use banger_image::build::BuildError as B;
    let code = match &e {
        B::MissingTool(_) => ErrorCode::MissingTool,
        B::DiskFull { .. } => ErrorCode::DiskFull,
        _ => ErrorCode::BuildFailed,
    };
    chain_error(code, &e)
}

/// What a pull reference resolved to.
enum Resolved {
    Bundle {
        url: String,
        pin: Option<banger_image::digest::Sha256Digest>,
    },
    Recipe(Box<banger_image::recipe::Recipe>),
}

/// What `image pull` was given.
enum PullSource {
    Catalog(Resolved),
    /// An OCI image, and the catalog's not-found error when it was tried there first.
    Oci(banger_image::oci::reference::Reference, Option<ApiError>),
}

/// The store name of a pull: `--name`, else the catalog name; URLs need `--name`.
fn pull_name(reference: &str, name: Option<&str>, what: &str) -> Result<String, ApiError> {
    match name {
        Some(n) => Ok(n.to_owned()),
        None if !reference.contains("://") && !reference.starts_with('/') => {
            Ok(reference.to_owned())
        }
        None => Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("pulling by URL needs a name for the {what}"),
        )
        .with_hint("add --name NAME")),
    }
}

fn pull_err(e: banger_image::pull::PullError) -> ApiError {
    use banger_image::bundle::BundleError;
    use banger_image::download::DownloadError;
    use banger_image::pull::PullError as P;
    let code = match &e {
        _ if e.is_disk_full() => ErrorCode::DiskFull,
        P::ManifestDigest { .. }
        | P::Download {
            source: DownloadError::DigestMismatch { .. },
            ..
        }
        | P::Unpack {
            source: BundleError::Corrupt { .. } | BundleError::RawMismatch { .. },
            ..
        } => ErrorCode::DigestMismatch,
        _ => ErrorCode::Download,
    };
    chain_error(code, &e)
}

fn bundle_err(e: banger_image::bundle::BundleError) -> ApiError {
    use banger_image::bundle::BundleError as B;
    let code = match &e {
        B::DiskFull { .. } => ErrorCode::DiskFull,
        B::BadName(_) => ErrorCode::BadRequest,
        _ => ErrorCode::Internal,
    };
    chain_error(code, &e)
}

fn catalog_err(e: banger_image::catalog::CatalogError) -> ApiError {
    chain_error(ErrorCode::Download, &e)
}
