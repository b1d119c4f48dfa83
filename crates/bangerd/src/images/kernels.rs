//! Kernels on their own: `kernel register` (files from the host), `kernel pull` (from the
//! catalog or a bundle URL) and `kernel delete` (never while an image boots with it). The
//! generic kernel OCI images boot with is `kernel.rs`.

use std::path::Path;

use banger_api::{
    validate_name, ApiError, Deleted, ErrorCode, KernelInfo, PullKernelRequest,
    RegisterKernelRequest, Source,
};
use banger_image::Progress;

use crate::fsutil;
use crate::now_rfc3339;
use crate::server::{internal, Emitter};
use crate::store;

use super::pull::{pull_err, pull_name, Resolved};
use super::{not_found, store_dir, Images, Reservation, GENERIC_KERNEL};
use crate::server::disk_error;

impl Images {
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
    pub(super) async fn add_kernel(
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
