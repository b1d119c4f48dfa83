//! `image pull` of an OCI image: resolve the reference, download the layers into the shared
//! blob cache, flatten them into an ext4 root filesystem, and record the image with banger's
//! generic kernel (fetched on first use) and the image config's runtime settings.
//!
//! Store names default to the repository's last component and the tag (`alpine-3-20`,
//! `busybox` for `:latest`), so `--image alpine:3.20` and `--image alpine-3-20` both find it.
//! Pulling a reference again is a no-op when the registry still serves the same manifest
//! digest; when it serves a new one, the image is replaced (VMs made from the old one keep their
//! own disks). Blobs stay in `~/.cache/banger/oci/` while an image needs them; `image delete` and
//! `image prune` drop the rest, never while a pull is in progress (its blobs are not recorded
//! until it commits).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use banger_api::{ApiError, Boot, ErrorCode, ImageInfo, OciOrigin, Source};
use banger_image::digest::Sha256Digest;
use banger_image::oci::cache::BlobCache;
use banger_image::oci::client::{OciError, RegistryOptions};
use banger_image::oci::manifest::ResolvedImage;
use banger_image::oci::reference::Reference;
use banger_image::Progress;

use super::{chain_error, Images};
use crate::fsutil;
use crate::server::{disk_error, internal, is_disk_full, Emitter};
use crate::store;

/// The kernel OCI images boot with (Debian's cloud kernel and banger's modules initramfs).
pub const GENERIC_KERNEL: &str = "generic";

/// What a pull reference names, in the order banger tries: a catalog entry (or bundle URL or
/// path) first, then an OCI image. `docker://` forces the latter.
pub fn oci_reference(reference: &str) -> Option<Result<Reference, ApiError>> {
    if let Some(rest) = reference.strip_prefix("docker://") {
        return Some(Reference::parse(rest).map_err(|e| chain_error(ErrorCode::BadRequest, &e)));
    }
    if reference.contains("://") || reference.starts_with('/') || reference.starts_with('.') {
        return None;
    }
    Reference::parse(reference).ok().map(Ok)
}

/// The store name an image from `reference` gets without `--name`: the repository's last
/// component, then the tag (omitted for `latest`) or the first 12 digits of the digest, made a
/// valid name (lowercase letters, digits, `-`).
pub fn default_name(reference: &Reference) -> String {
    let repo = reference.repository().rsplit('/').next().unwrap_or("image");
    let raw = match (reference.digest(), reference.tag()) {
        (Some(d), _) => format!("{repo}-{}", &d.to_string()[..12]),
        (None, Some(t)) if t != "latest" => format!("{repo}-{t}"),
        _ => repo.to_owned(),
    };
    let mut name = String::with_capacity(raw.len());
    for c in raw.chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if !(c == '-' && (name.is_empty() || name.ends_with('-'))) {
            name.push(c);
        }
    }
    name.truncate(63);
    let name = name.trim_end_matches('-').to_owned();
    if name.is_empty() {
        "image".to_owned()
    } else {
        name
    }
}

/// An OCI failure as an API error: a stable code, the whole chain, the hints.
pub fn oci_err(e: &OciError) -> ApiError {
    let code = if e.is_disk_full() {
        ErrorCode::DiskFull
    } else if e.is_not_found() {
        ErrorCode::NotFound
    } else if matches!(e, OciError::ManifestDigest { .. }) {
        ErrorCode::DigestMismatch
    } else {
        ErrorCode::Download
    };
    chain_error(code, e)
}

impl Images {
    fn blob_cache(&self) -> BlobCache {
        BlobCache::new(self.paths.cache_dir.join("oci"))
    }

    pub(super) fn registry_options(&self) -> RegistryOptions {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        RegistryOptions {
            insecure: self.config.insecure_registries.clone(),
            docker_config: banger_image::oci::auth::docker_config_path(
                std::env::var_os("DOCKER_CONFIG").as_deref(),
                home.as_deref(),
            ),
            credential_path: std::env::var_os("PATH"),
            user_agent: format!("banger/{}", env!("CARGO_PKG_VERSION")),
        }
    }

    /// `image pull` of an OCI reference.
    pub(super) async fn pull_oci(
        &self,
        reference: Reference,
        name: Option<String>,
        progress: &Emitter,
    ) -> Result<ImageInfo, ApiError> {
        let canonical = reference.to_string();
        let name = name.unwrap_or_else(|| default_name(&reference));
        banger_api::validate_name("image", &name)?;
        let options = self.registry_options();
        let n = name.clone();
        let existing = self
            .store
            .call(move |c| store::get_image(c, &n))
            .await
            .map_err(internal)?;
        // Same name, same reference: is the copy current? Anything else under that name is a
        // clash, reported like every other existing name.
        let (_reservation, replacing) = match existing {
            Some(img) if img.oci.as_ref().is_some_and(|o| o.reference == canonical) => {
                let r = self.reserve(&name)?;
                progress.phase(&format!("check {canonical}"));
                let current = banger_image::oci::manifest::current_digest(&reference, &options)
                    .await
                    .map_err(|e| oci_err(&e))?;
                if img.oci.as_ref().is_some_and(|o| o.digest == current.oci()) {
                    progress.notice(&format!(
                        "image {name} is up to date ({canonical}@{})",
                        current.oci()
                    ));
                    return Ok(img);
                }
                progress.notice(&format!(
                    "{canonical} changed upstream; replacing image {name}"
                ));
                (r, Some(img))
            }
            _ => (self.reserve_new(&name).await?, None),
        };
        // Until this pull is recorded, no prune may drop the blobs it fetches.
        let _pulling = self.pull_gate.read().await;
        let cache = self.blob_cache();
        let resolved = banger_image::oci::manifest::resolve(&reference, &options, &cache, progress)
            .await
            .map_err(|e| oci_err(&e))?;
        // After the image is known to exist and be usable, before the big downloads.
        self.ensure_generic_kernel(progress).await?;
        banger_image::oci::cache::fetch_layers(&resolved, &options, &cache, progress)
            .await
            .map_err(|e| oci_err(&e))?;

        let staging = self.staging()?;
        let rootfs = staging.path().join("rootfs.ext4");
        flatten(&resolved, &cache, &rootfs, staging.path(), progress).await?;
        self.commit_oci(&name, &rootfs, &resolved, replacing.as_ref(), progress)
            .await
    }

    /// Makes sure the generic kernel exists, fetching it the first time an OCI image needs it.
    async fn ensure_generic_kernel(&self, progress: &Emitter) -> Result<(), ApiError> {
        self.fetch_generic_kernel(progress, false).await.map(drop)
    }

    /// Moves the flattened rootfs into the store and records the image. Each pull gets its own
    /// directory (`images/NAME@DIGEST12/`), so replacing an older pull of the same name is one
    /// transaction that points the row at the new files; the old directory goes after that. A
    /// crash at any point leaves either the old image or the new one, and an unreferenced
    /// directory the next start-up sweeps.
    async fn commit_oci(
        &self,
        name: &str,
        rootfs: &Path,
        resolved: &ResolvedImage,
        replacing: Option<&ImageInfo>,
        progress: &dyn Progress,
    ) -> Result<ImageInfo, ApiError> {
        progress.phase("register");
        let digest = resolved.manifest_digest.oci();
        let image_dir = self.images_dir().join(format!(
            "{name}@{}",
            &resolved.manifest_digest.to_string()[..12]
        ));
        let rootfs = rootfs.to_owned();
        let (info_name, canonical) = (name.to_owned(), resolved.reference.to_string());
        let dir = image_dir.clone();
        let info = tokio::task::spawn_blocking(move || -> anyhow::Result<ImageInfo> {
            let size = std::fs::metadata(&rootfs)?.len();
            let stage = rootfs
                .parent()
                .map(|p| p.join("commit-image"))
                .ok_or_else(|| anyhow::anyhow!("staged rootfs has no parent"))?;
            std::fs::create_dir(&stage)?;
            std::fs::rename(&rootfs, stage.join("rootfs.ext4"))?;
            fsutil::fsync_dir(&stage)?;
            // Left by an interrupted pull of this very digest: no row points into it.
            if dir.exists() {
                std::fs::remove_dir_all(&dir)?;
            }
            fsutil::durable_rename(&stage, &dir)?;
            Ok(ImageInfo {
                name: info_name,
                source: Source::Oci,
                origin: canonical.clone(),
                rootfs: dir.join("rootfs.ext4").display().to_string(),
                rootfs_sha256: None,
                size_bytes: size,
                kernel: GENERIC_KERNEL.to_owned(),
                created_at: crate::now_rfc3339(),
                boot: Boot::Agent,
                oci: Some(OciOrigin {
                    reference: canonical,
                    digest,
                }),
                snapshot_bytes: 0,
            })
        })
        .await
        .map_err(|e| internal(e.into()))?
        .map_err(|e| disk_error(e, "cannot move the image into the store"))?;

        let runtime = serde_json::to_string(&resolved.config).map_err(|e| internal(e.into()))?;
        let blobs: Vec<String> = std::iter::once(resolved.config_digest)
            .chain(resolved.layers.iter().map(|l| l.digest))
            .map(|d| d.oci())
            .collect();
        // No VM is being made from the old files while the row switches and they go.
        let _w = self.image_locks.write(name).await;
        let row = info.clone();
        let replace = replacing.is_some();
        let inserted = self
            .store
            .call(move |c| {
                let tx = c.transaction()?;
                if replace {
                    store::delete_image(&tx, &row.name)?;
                }
                store::insert_image(&tx, &row)?;
                store::set_oci_details(&tx, &row.name, &runtime, &blobs)?;
                tx.commit()?;
                Ok(())
            })
            .await;
        if let Err(e) = inserted {
            let _ = tokio::fs::remove_dir_all(&image_dir).await;
            return Err(internal(e));
        }
        if let Some(old) = replacing {
            match super::store_dir(&self.images_dir(), &old.rootfs) {
                Some(old_dir) if old_dir != image_dir => {
                    let _ = tokio::fs::remove_dir_all(old_dir).await;
                }
                _ => {}
            }
        }
        tracing::info!(image = %info.name, reference = %info.origin, "OCI image registered");
        Ok(info)
    }

    /// Removes cached blobs that no image needs; returns bytes freed, or None when `wait` is
    /// false and pulls are running (their blobs are not recorded yet, so nothing is pruned).
    pub(super) async fn prune_blobs(&self, wait: bool) -> Option<u64> {
        let _exclusive = if wait {
            self.pull_gate.write().await
        } else {
            self.pull_gate.try_write().ok()?
        };
        let in_use = match self.store.call(|c| store::blobs_in_use(c)).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!("cannot list the blobs images need: {e:#}");
                return Some(0);
            }
        };
        let keep: HashSet<Sha256Digest> = in_use
            .iter()
            .filter_map(|d| Sha256Digest::parse_oci(d).ok())
            .collect();
        match self.blob_cache().prune(&keep).await {
            Ok(freed) => Some(freed),
            Err(e) => {
                tracing::warn!(
                    "cannot prune the OCI blob cache: {}",
                    crate::hints::report(&e)
                );
                Some(0)
            }
        }
    }
}

/// Flattens the resolved image's cached layers into an ext4 at `out`.
async fn flatten(
    resolved: &ResolvedImage,
    cache: &BlobCache,
    out: &Path,
    staging: &Path,
    progress: &Emitter,
) -> Result<(), ApiError> {
    let stats = banger_image::oci::pull::build_rootfs(
        resolved,
        cache,
        out,
        &staging.join("flatten"),
        progress,
    )
    .await
    .map_err(|e| {
        let code = if is_disk_full(&e) {
            ErrorCode::DiskFull
        } else {
            ErrorCode::BuildFailed
        };
        chain_error(code, &e)
    })?;
    progress.log(&format!(
        "{} entries ({} files, {} bytes) in a {}-byte ext4",
        stats.entries, stats.files, stats.bytes, stats.ext4_bytes
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Reference {
        Reference::parse(s).unwrap()
    }

    #[test]
    fn default_names_come_from_repository_and_tag() {
        assert_eq!(default_name(&r("alpine")), "alpine");
        assert_eq!(default_name(&r("alpine:3.20")), "alpine-3-20");
        assert_eq!(
            default_name(&r("127.0.0.1:5000/test/busybox:1")),
            "busybox-1"
        );
        assert_eq!(
            default_name(&r("ghcr.io/org/my_tool:V1.2__rc")),
            "my-tool-v1-2-rc"
        );
        let pinned = r(&format!("ghcr.io/org/tool@sha256:{}", "ab".repeat(32)));
        assert_eq!(default_name(&pinned), "tool-abababababab");
        let long = r(&format!("x/{}:{}", "a".repeat(60), "b".repeat(60)));
        let n = default_name(&long);
        assert!(n.len() <= 63 && !n.ends_with('-'), "{n}");
        assert!(banger_api::validate_name("image", &n).is_ok());
    }

    #[test]
    fn references_are_oci_unless_they_look_like_urls_or_paths() {
        assert!(oci_reference("https://x/manifest.json").is_none());
        assert!(oci_reference("/srv/bundle/manifest.json").is_none());
        assert!(oci_reference("./bundle/manifest.json").is_none());
        assert!(matches!(oci_reference("alpine:3.20"), Some(Ok(_))));
        assert!(matches!(oci_reference("docker://alpine"), Some(Ok(_))));
        assert!(matches!(oci_reference("docker://Bad Name"), Some(Err(_))));
        assert!(oci_reference("Not A Reference").is_none());
    }
}
