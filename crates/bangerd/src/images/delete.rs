//! `image delete` and `image prune`: an image's row and files (and its warm snapshots)
//! removed (never while a VM uses it or a VM is being made from it), and the OCI blob cache pruned of what no image needs.

use banger_api::{ApiError, Deleted, ErrorCode, Pruned};

use crate::server::internal;
use crate::store;

use super::{store_dir, Images};

impl Images {
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
        let (drop_kernel, warm) = self
            .store
            .call(move |c| {
                let tx = c.transaction()?;
                store::delete_image(&tx, &n)?;
                // Its warm snapshots are of no use without it (snapshots a user took stay:
                // `vm create --from` says their image is gone).
                let warm = store::delete_warm_snapshots_of(&tx, &n)?;
                // The kernel an image brought goes with it unless another image uses it.
                let drop_kernel =
                    kernel == n && store::images_using_kernel(&tx, &kernel)?.is_empty();
                if drop_kernel {
                    store::delete_kernel(&tx, &kernel)?;
                }
                tx.commit()?;
                Ok((drop_kernel, warm))
            })
            .await
            .map_err(internal)?;
        {
            // Only now, with no VM being made from it, do the files go.
            let _w = self.image_locks.write(name).await;
            for snapshot in warm {
                let dir = crate::vms::snapshot_dir(&self.paths, &snapshot);
                if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
                    tracing::warn!("cannot remove warm snapshot {}: {e}", dir.display());
                }
            }
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
}
