//! `image register`: an existing rootfs and kernel from the host's disk copied into staging and
//! committed.

use std::path::Path;

use banger_api::{ApiError, ErrorCode, ImageInfo, RegisterImageRequest, Source};
use banger_image::Progress;

use crate::fsutil;
use crate::server::{internal, Emitter};

use super::{Images, Staged};
use crate::server::disk_error;

impl Images {
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
}
