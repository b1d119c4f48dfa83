//! The last step of an OCI pull: a resolved image whose layers are in the blob cache becomes an
//! ext4 root file system, on a blocking thread (the flattener reads and writes files and runs
//! debugfs) with its progress forwarded to the caller.

use std::path::Path;

use crate::blocking::run_blocking;
use crate::oci::cache::BlobCache;
use crate::oci::flatten::{flatten_to_ext4, FlattenError, FlattenStats, LayerInput, Limits};
use crate::oci::manifest::ResolvedImage;
use crate::progress::Progress;

/// Flattens `resolved`'s cached layers into a new ext4 at `out`, using `staging` (a private
/// directory the flattener creates and removes) for the layers' file contents.
pub async fn build_rootfs(
    resolved: &ResolvedImage,
    cache: &BlobCache,
    out: &Path,
    staging: &Path,
    progress: &dyn Progress,
) -> Result<FlattenStats, FlattenError> {
    let layers: Vec<LayerInput> = resolved
        .layers
        .iter()
        .map(|l| LayerInput {
            path: cache.blob_path(&l.digest),
            compression: l.compression,
            digest: l.digest,
            diff_id: l.diff_id,
        })
        .collect();
    let (out, staging2) = (out.to_owned(), staging.to_owned());
    run_blocking(progress, move |p| {
        flatten_to_ext4(&layers, &out, &Limits::default(), &staging2, p)
    })
    .await
    .map_err(|source| FlattenError::Staging {
        path: staging.to_owned(),
        source,
    })?
}
