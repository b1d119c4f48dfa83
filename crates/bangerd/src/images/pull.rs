//! `image pull` of a catalog image or a bundle URL: the reference resolved (catalog name, URL,
//! or an OCI reference handed to `oci.rs`), the bundle downloaded and verified into staging,
//! then committed. A catalog entry that is a recipe is built instead.

use banger_api::{ApiError, ErrorCode, ImageInfo, PullImageRequest, Source};
use banger_image::Progress;

use crate::server::Emitter;

use super::{chain_error, oci, Images, Staged};

/// What a pull reference resolved to.
pub(super) enum Resolved {
    Bundle {
        url: String,
        pin: Option<banger_image::digest::Sha256Digest>,
    },
    Recipe(Box<banger_image::recipe::Recipe>),
}

/// What `image pull` was given.
enum PullSource {
    Catalog(Resolved),
    /// An OCI image, and the catalog's not-found error when it was tried there first.
    Oci(banger_image::oci::reference::Reference, Option<ApiError>),
}

/// The store name of a pull: `--name`, else the catalog name; URLs need `--name`.
pub(super) fn pull_name(
    reference: &str,
    name: Option<&str>,
    what: &str,
) -> Result<String, ApiError> {
    match name {
        Some(n) => Ok(n.to_owned()),
        None if !reference.contains("://") && !reference.starts_with('/') => {
            Ok(reference.to_owned())
        }
        None => Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("pulling by URL needs a name for the {what}"),
        )
        .with_hint("add --name NAME")),
    }
}

pub(super) fn pull_err(e: banger_image::pull::PullError) -> ApiError {
    use banger_image::bundle::BundleError;
    use banger_image::download::DownloadError;
    use banger_image::pull::PullError as P;
    let code = match &e {
        _ if e.is_disk_full() => ErrorCode::DiskFull,
        P::ManifestDigest { .. }
        | P::Download {
            source: DownloadError::DigestMismatch { .. },
            ..
        }
        | P::Unpack {
            source: BundleError::Corrupt { .. } | BundleError::RawMismatch { .. },
            ..
        } => ErrorCode::DigestMismatch,
        _ => ErrorCode::Download,
    };
    chain_error(code, &e)
}

fn catalog_err(e: banger_image::catalog::CatalogError) -> ApiError {
    chain_error(ErrorCode::Download, &e)
}

impl Images {
    pub async fn pull(
        &self,
        req: PullImageRequest,
        progress: Emitter,
    ) -> Result<ImageInfo, ApiError> {
        let reference = req.reference.trim().to_owned();
        let resolved = match self.resolve_pull(&reference).await? {
            PullSource::Oci(r, None) => return self.pull_oci(r, req.name.clone(), &progress).await,
            PullSource::Oci(r, Some(catalog_miss)) => {
                // A name the catalog does not know was tried as an OCI image; if the registry
                // does not know it either, say both.
                return match self.pull_oci(r.clone(), req.name.clone(), &progress).await {
                    // Docker Hub answers 401 for repositories that do not exist.
                    Err(e) if e.code == ErrorCode::NotFound || e.message.contains("401") => {
                        let both = ApiError::new(
                            ErrorCode::NotFound,
                            format!(
                                "{}; as an OCI image, {r}: {}",
                                catalog_miss.message, e.message
                            ),
                        );
                        Err(catalog_miss
                            .hints
                            .into_iter()
                            .chain(e.hints)
                            .fold(both, ApiError::with_hint))
                    }
                    other => other,
                };
            }
            PullSource::Catalog(resolved) => resolved,
        };
        let (manifest_url, manifest_pin) = match resolved {
            Resolved::Bundle { url, pin } => (url, pin),
            Resolved::Recipe(recipe) => {
                let name = req.name.clone().unwrap_or_else(|| reference.clone());
                let _r = self.reserve_new(&name).await?;
                progress.notice(&format!(
                    "{reference} has no prebuilt bundle; building it locally from Debian packages"
                ));
                return self.build_recipe(&name, *recipe, &progress).await;
            }
        };
        let name = pull_name(&reference, req.name.as_deref(), "image")?;
        let _r = self.reserve_new(&name).await?;
        let staging = self.staging()?;
        let downloads = self.paths.cache_dir.join("downloads");
        // Concurrent pulls would share partial files in the download cache.
        let _pulling = self.pull_lock.lock().await;
        let pulled = banger_image::pull::pull_bundle(
            &manifest_url,
            manifest_pin.as_ref(),
            staging.path(),
            &downloads,
            &progress,
        )
        .await
        .map_err(pull_err)?;
        let staged = Staged {
            rootfs: pulled.rootfs,
            kernel: pulled.kernel,
            initrd: pulled.initrd,
        };
        self.commit(&name, staged, Source::Pulled, manifest_url, &progress)
            .await
    }

    pub(super) async fn catalog(&self) -> Result<banger_image::catalog::Catalog, ApiError> {
        match &self.config.catalog_url {
            None => Ok(banger_image::catalog::Catalog::builtin()),
            Some(url) => banger_image::catalog::Catalog::load(url)
                .await
                .map_err(catalog_err),
        }
    }

    /// What `image pull` was given: a catalog entry, bundle URL or path first; otherwise an OCI
    /// image reference (`docker://` skips the catalog).
    async fn resolve_pull(&self, reference: &str) -> Result<PullSource, ApiError> {
        if reference.starts_with("docker://") {
            if let Some(r) = oci::oci_reference(reference) {
                return r.map(|r| PullSource::Oci(r, None));
            }
        }
        match self.resolve_bundle(reference).await {
            Ok(r) => Ok(PullSource::Catalog(r)),
            Err(e) if e.code == ErrorCode::NotFound => match oci::oci_reference(reference) {
                Some(r) => r.map(|r| PullSource::Oci(r, Some(e))),
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// What a pull reference names: a bundle (catalog entries may pin its manifest's digest) or,
    /// for catalog entries without a prebuilt bundle, a recipe to build.
    pub(super) async fn resolve_bundle(&self, reference: &str) -> Result<Resolved, ApiError> {
        if reference.contains("://") || reference.starts_with('/') {
            return Ok(Resolved::Bundle {
                url: reference.to_owned(),
                pin: None,
            });
        }
        let catalog = self.catalog().await?;
        let entry = catalog
            .lookup(reference)
            .map_err(|e| chain_error(ErrorCode::NotFound, &e))?;
        match &entry.source {
            banger_image::catalog::Source::Recipe { recipe } => {
                banger_image::recipe::builtin(recipe)
                    .map(|r| Resolved::Recipe(Box::new(r)))
                    .ok_or_else(|| {
                        ApiError::new(
                            ErrorCode::Internal,
                            format!("catalog entry {reference:?} names unknown recipe {recipe:?}"),
                        )
                    })
            }
            banger_image::catalog::Source::Bundle {
                manifest_url,
                manifest_sha256,
            } => Ok(Resolved::Bundle {
                url: manifest_url.clone(),
                pin: *manifest_sha256,
            }),
        }
    }
}
