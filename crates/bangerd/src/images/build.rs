//! `image build`: a recipe run through debootstrap in a staging directory, then committed to
//! the store like any other image.

use banger_api::{ApiError, BuildImageRequest, ErrorCode, ImageInfo, Source};

use crate::server::Emitter;

use super::{chain_error, Images, Staged};

fn build_err(e: banger_image::build::BuildError) -> ApiError {
    use banger_image::build::BuildError as B;
    let code = match &e {
        B::MissingTool(_) => ErrorCode::MissingTool,
        B::DiskFull { .. } => ErrorCode::DiskFull,
        _ => ErrorCode::BuildFailed,
    };
    chain_error(code, &e)
}

impl Images {
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

    pub(super) async fn build_recipe(
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
            cancel: tokio_util::sync::CancellationToken::new(),
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
}
