//! `kernel pull generic`: banger's generic kernel, the one OCI images boot with. It is Debian's
//! cloud kernel, taken from its package on the Debian mirror banger already uses for builds
//! (verified the way apt does: the signed release file, then the package index, then the
//! package), with a small initramfs of the virtio, vsock, console and power-button modules the
//! agent loads as PID 1. No Debian image needs to be built first.

use banger_api::{ApiError, ErrorCode, KernelInfo, Source};
use banger_image::kernel::KernelError;
use banger_image::Progress;

use super::{chain_error, Images, GENERIC_KERNEL};
use crate::server::Emitter;

/// The Debian release the generic kernel comes from (the suite banger's images use).
const SUITE: &str = "bookworm";

impl Images {
    /// Fetches the generic kernel and records it as `generic`.
    pub(super) async fn pull_generic_kernel(
        &self,
        progress: &Emitter,
    ) -> Result<KernelInfo, ApiError> {
        let _r = self.reserve_new_kernel(GENERIC_KERNEL).await?;
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
        progress.notice(&format!(
            "generic kernel: Debian {} {} with {} modules",
            k.package,
            k.version,
            k.modules.len()
        ));
        progress.phase("store kernel");
        self.add_kernel(
            GENERIC_KERNEL,
            &k.vmlinuz,
            Some(&k.modules_initrd),
            Source::Pulled,
        )
        .await
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
