//! `image export`: an image and its kernel written out as a bundle (manifest plus zstd files).

use std::path::PathBuf;

use banger_api::{ApiError, ErrorCode, ExportImageRequest, ExportResult};

use crate::server::Emitter;

use super::{chain_error, Images};

fn bundle_err(e: banger_image::bundle::BundleError) -> ApiError {
    use banger_image::bundle::BundleError as B;
    let code = match &e {
        B::DiskFull { .. } => ErrorCode::DiskFull,
        B::BadName(_) | B::NotEmpty { .. } => ErrorCode::BadRequest,
        _ => ErrorCode::Internal,
    };
    chain_error(code, &e)
}

impl Images {
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
}
