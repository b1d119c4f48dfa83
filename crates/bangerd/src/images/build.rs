//! `image build`: a recipe run through debootstrap in a staging directory, then committed to
//! the store like any other image.
//!
//! A build is the one streamed operation that stops when its client goes away (a killed or
//! interrupted CLI): nothing of it is in the store yet, and its debootstrap would otherwise run
//! on for minutes as root. The build is cancelled, which kills the running command with every
//! process it started (`banger_image::privileged`), removes the tree, and then the staging
//! directory. Its staging directory is not a `TempDir`, whose drop would walk a tree that may
//! still hold mounts; if the daemon dies instead, the next start's sweep removes it.

use banger_api::{ApiError, BuildImageRequest, ErrorCode, ImageInfo, Source};
use tokio_util::sync::CancellationToken;

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
        let privileged = self
            .privileged()
            .map_err(|e| chain_error(ErrorCode::MissingTool, &e))?;
        let work_dir = self.staging()?.keep();
        let cancel = CancellationToken::new();
        let req = banger_image::build::BuildRequest {
            recipe: recipe.clone(),
            mirror,
            work_dir: work_dir.clone(),
            cancel: cancel.clone(),
        };
        let built = {
            let build = banger_image::build::build(&req, privileged.as_ref(), progress);
            tokio::pin!(build);
            tokio::select! {
                r = &mut build => r,
                () = progress.client_gone() => {
                    tracing::info!(image = name, "the client went away; cancelling the build");
                    cancel.cancel();
                    build.await
                }
            }
        };
        let result = match built {
            Ok(out) => {
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
            Err(e) => Err(build_err(e)),
        };
        // The builder removes its tree itself; this removes the rest, and a tree the builder
        // could not remove (mounts first).
        let removed = banger_image::remove_leftover(
            &work_dir,
            Some(privileged.as_ref()),
            &banger_image::ProcMounts,
            progress,
        )
        .await;
        if let Err(e) = removed {
            tracing::warn!("{} (the next start tries again)", crate::hints::report(&e));
        }
        result
    }
}
