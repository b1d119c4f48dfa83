//! `kernel pull generic`: banger's generic kernel, the one OCI images boot with. It is Debian's
//! cloud kernel, taken from its package on the Debian mirror banger already uses for builds
//! (verified the way apt does: the signed release file, then the package index, then the
//! package), with a small initramfs of the virtio, vsock, console and power-button modules the
//! agent loads as PID 1. No Debian image needs to be built first.
//!
//! The first OCI pull fetches it; concurrent first pulls wait for one fetch. `kernel pull
//! generic` fetches the current package again and, when it differs, replaces the kernel in
//! place: each version lives in its own directory (`kernels/generic@SHA12/`) and one row update
//! switches to it, so images and VMs (which name the kernel, not its files) boot the new one
//! from their next start, and a crash leaves one version or the other.

use std::path::Path;

use banger_api::{ApiError, ErrorCode, KernelInfo, Source};
use banger_image::kernel::KernelError;
use banger_image::Progress;

use super::{chain_error, store_dir, Images, GENERIC_KERNEL};
use crate::server::disk_error;
use crate::server::{internal, Emitter};
use crate::{fsutil, now_rfc3339, store};

/// The Debian release the generic kernel comes from (the suite banger's images use).
const SUITE: &str = "bookworm";

impl Images {
    /// The generic kernel: the stored one unless `refresh`, else the Debian package's current
    /// version (stored, or replacing the stored one when it differs).
    pub(super) async fn fetch_generic_kernel(
        &self,
        progress: &Emitter,
        refresh: bool,
    ) -> Result<KernelInfo, ApiError> {
        let _one_fetch = self.generic_kernel.lock().await;
        let current = self
            .store
            .call(|c| store::get_kernel(c, GENERIC_KERNEL))
            .await
            .map_err(internal)?;
        if let (Some(k), false) = (&current, refresh) {
            return Ok(k.clone());
        }
        if current.is_none() {
            progress.notice(&format!(
                "OCI images boot with banger's generic kernel; fetching it once (`banger kernel pull {GENERIC_KERNEL}` updates it)"
            ));
        }
        let mirror = self.debian_mirror()?;
        let staging = self.staging()?;
        let downloads = self.paths.cache_dir.join("downloads");
        let k = banger_image::kernel::fetch_cloud_kernel(
            &mirror,
            SUITE,
            staging.path(),
            &downloads,
            progress,
        )
        .await
        .map_err(kernel_err)?;
        progress.phase("store kernel");
        let info = self
            .install_generic(&k.vmlinuz, &k.modules_initrd, staging.path())
            .await?;
        if let Some(old) = &current {
            if old.kernel_sha256 == info.kernel_sha256 && old.initrd_sha256 == info.initrd_sha256 {
                progress.notice(&format!(
                    "the generic kernel is up to date (Debian {} {})",
                    k.package, k.version
                ));
                return Ok(old.clone());
            }
        }
        let row = info.clone();
        let replace = current.is_some();
        let recorded = self
            .store
            .call(move |c| {
                if replace {
                    store::update_kernel_files(c, &row)
                } else {
                    store::insert_kernel(c, &row)
                }
            })
            .await;
        if let Err(e) = recorded {
            if let Some(dir) = store_dir(&self.kernels_dir(), &info.kernel) {
                let _ = tokio::fs::remove_dir_all(dir).await;
            }
            return Err(internal(e));
        }
        if let Some(old) = current {
            match store_dir(&self.kernels_dir(), &old.kernel) {
                Some(dir)
                    if Some(&dir) != store_dir(&self.kernels_dir(), &info.kernel).as_ref() =>
                {
                    let _ = tokio::fs::remove_dir_all(dir).await;
                }
                _ => {}
            }
        }
        progress.notice(&format!(
            "generic kernel: Debian {} {} with {} modules",
            k.package,
            k.version,
            k.modules.len()
        ));
        Ok(info)
    }

    /// Moves a fetched kernel into `kernels/generic@SHA12/` (unless that version is already
    /// there) and describes it; the caller records it.
    async fn install_generic(
        &self,
        vmlinuz: &Path,
        initrd: &Path,
        staging: &Path,
    ) -> Result<KernelInfo, ApiError> {
        let (vmlinuz, initrd, staging) =
            (vmlinuz.to_owned(), initrd.to_owned(), staging.to_owned());
        let kernels = self.kernels_dir();
        tokio::task::spawn_blocking(move || -> anyhow::Result<KernelInfo> {
            let kernel_sha256 = fsutil::sha256_file(&vmlinuz)?;
            let initrd_sha256 = fsutil::sha256_file(&initrd)?;
            let dir = kernels.join(format!("{GENERIC_KERNEL}@{}", &kernel_sha256[..12]));
            if !dir.join("initrd.img").exists()
                || fsutil::sha256_file(&dir.join("initrd.img")).ok().as_ref()
                    != Some(&initrd_sha256)
            {
                let stage = staging.join("commit-kernel");
                std::fs::create_dir(&stage)?;
                std::fs::rename(&vmlinuz, stage.join("vmlinuz"))?;
                std::fs::rename(&initrd, stage.join("initrd.img"))?;
                fsutil::fsync_dir(&stage)?;
                if dir.exists() {
                    std::fs::remove_dir_all(&dir)?;
                }
                fsutil::durable_rename(&stage, &dir)?;
            }
            Ok(KernelInfo {
                name: GENERIC_KERNEL.to_owned(),
                source: Source::Pulled,
                kernel: dir.join("vmlinuz").display().to_string(),
                kernel_sha256,
                initrd: Some(dir.join("initrd.img").display().to_string()),
                initrd_sha256: Some(initrd_sha256),
                created_at: now_rfc3339(),
            })
        })
        .await
        .map_err(|e| internal(e.into()))?
        .map_err(|e| disk_error(e, "cannot move the generic kernel into the store"))
    }
}

fn kernel_err(e: KernelError) -> ApiError {
    let code = match &e {
        KernelError::Tool(_) | KernelError::NoKeyring { .. } => ErrorCode::MissingTool,
        KernelError::Download { source, .. }
            if matches!(
                **source,
                banger_image::download::DownloadError::DiskFull { .. }
            ) =>
        {
            ErrorCode::DiskFull
        }
        KernelError::Signature { .. } => ErrorCode::DigestMismatch,
        _ => ErrorCode::Download,
    };
    chain_error(code, &e)
}
