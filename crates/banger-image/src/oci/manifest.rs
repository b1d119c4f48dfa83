//! Manifests, indexes and image configs from a registry: which documents banger accepts, how an
//! index is narrowed to linux/amd64, and the limits on what an image may declare. Also the
//! resolution walk itself ([`resolve`], [`current_digest`]): reference -> (index ->)* platform
//! manifest -> config blob, every document checked against the digest that named it.
//!
//! Accepted: OCI image manifest and index, Docker v2 manifest and manifest list (schema 2).
//! Docker schema 1, artifacts (non-image configs), foreign / non-distributable layers and unknown
//! layer media types are refused by name. Limits: documents <= 4 MiB (enforced while reading, in
//! `client`), config <= 1 MiB, <= 128 layers, each declared <= 64 GiB and all together
//! <= [`IMAGE_MAX_BYTES`], indexes nested at most [`INDEX_DEPTH_MAX`] deep. The config must say
//! linux/amd64 and list one diff_id per layer.
//!
//! Types come from `oci-spec` (serde shapes only); every digest in them is re-parsed into
//! [`Sha256Digest`] here before anything uses it.

use crate::digest::{BadOciDigest, Sha256Digest};
use crate::oci::cache::BlobCache;
use crate::oci::client::{OciError, RegistryClient, RegistryOptions};
use crate::oci::config::{ConfigError, ImageRuntime};
use crate::oci::reference::{shorten, Reference};
use crate::progress::Progress;
use banger_hint::Hint;
use oci_spec::image::{Arch, Descriptor, ImageConfiguration, ImageIndex, ImageManifest, Os};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// The largest manifest or index banger reads.
pub const MANIFEST_MAX_BYTES: u64 = 4 << 20;
/// The largest image config banger reads.
pub const CONFIG_MAX_BYTES: u64 = 1 << 20;
/// The most layers an image may have.
pub const LAYERS_MAX: usize = 128;
/// The largest compressed size a layer may declare.
pub const LAYER_MAX_BYTES: u64 = 64 << 30;
/// The most compressed bytes an image's layers may declare in all: what a pull may put into the
/// blob cache. Matches the flattener's default `max_image_bytes` (an image whose compressed
/// layers exceed it could not be flattened anyway).
pub const IMAGE_MAX_BYTES: u64 = 64 << 30;
/// How deep indexes may nest (an index that names an index counts 2).
pub const INDEX_DEPTH_MAX: usize = 3;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_SCHEMA1: [&str; 2] = [
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
];
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Annotation buildx puts on attestation manifests inside an index.
const REFERENCE_TYPE: &str = "vnd.docker.reference.type";

/// The `Accept` header for manifest requests: every document kind banger can use.
pub(crate) const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json";

pub use crate::oci::layer::Compression;

/// One layer of a resolved image, bottom first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerDescriptor {
    /// Digest of the compressed blob (its name in the cache).
    pub digest: Sha256Digest,
    /// Compressed size declared by the manifest.
    pub size: u64,
    pub compression: Compression,
    /// Digest of the uncompressed tar, from the config's `rootfs.diff_ids` at the same index.
    pub diff_id: Sha256Digest,
}

/// An image resolved to its linux/amd64 manifest, with its config fetched and checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedImage {
    /// As the user named it, normalised.
    pub reference: Reference,
    /// Digest of the platform manifest's bytes (what `image list` shows; what
    /// [`current_digest`] compares).
    pub manifest_digest: Sha256Digest,
    pub config: ImageRuntime,
    pub config_digest: Sha256Digest,
    /// In order, bottom first.
    pub layers: Vec<LayerDescriptor>,
}

/// A document or config that banger refuses; wrapped with the image's name in [`OciError`].
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("the registry sent a {what} that banger cannot read: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("the manifest has media type `{media_type}`, which is not an image manifest or index")]
    UnsupportedMediaType { media_type: String },
    #[error("the registry only has a Docker schema 1 manifest for it")]
    Schema1,
    #[error("there is no linux/amd64 image in it; it offers {offered}")]
    NoPlatform { offered: String },
    #[error("its indexes are nested more than {max} deep")]
    IndexTooDeep { max: usize },
    #[error(
        "layer {digest} has media type {media_type}: a foreign (non-distributable) layer, which \
         banger does not download"
    )]
    ForeignLayer { digest: String, media_type: String },
    #[error("layer {digest} has unknown media type {media_type}")]
    UnknownLayerType { digest: String, media_type: String },
    #[error("its config has media type {media_type}, so it is not a container image")]
    NotAnImage { media_type: String },
    #[error("it has {count} layers; banger accepts at most {max}")]
    TooManyLayers { count: usize, max: usize },
    #[error("layer {digest} declares {size} bytes; banger accepts at most {max} per layer")]
    LayerTooLarge { digest: String, size: u64, max: u64 },
    #[error(
        "its layers declare {total} bytes in all; banger accepts at most {} GiB per image",
        max >> 30
    )]
    ImageTooLarge { total: u64, max: u64 },
    #[error("its config declares {size} bytes; banger accepts at most {max}")]
    ConfigTooLarge { size: u64, max: u64 },
    #[error("the {what} has a digest banger cannot use")]
    BadDigest {
        what: &'static str,
        #[source]
        source: BadOciDigest,
    },
    #[error("manifest {digest} is {actual} bytes, but the index that names it says {expected}")]
    SizeMismatch {
        digest: Sha256Digest,
        expected: u64,
        actual: u64,
    },
    #[error("its config is for {os}/{arch}, not linux/amd64")]
    WrongPlatform { os: String, arch: String },
    #[error("its config's rootfs type is `{typ}`, not `layers`")]
    RootFsType { typ: String },
    #[error("its config lists {diff_ids} diff_ids for {layers} layers")]
    DiffIdCount { diff_ids: usize, layers: usize },
    #[error("its config cannot be used")]
    Runtime(#[from] ConfigError),
}

impl Hint for ManifestError {
    fn hint(&self) -> Option<Cow<'_, str>> {
        match self {
            ManifestError::UnsupportedMediaType { .. } => {
                Some("banger pulls OCI and Docker v2 container images".into())
            }
            ManifestError::Schema1 => Some(
                "schema 1 is long deprecated; push the image again with a current Docker or \
                 skopeo"
                    .into(),
            ),
            ManifestError::NoPlatform { .. } => {
                Some("banger runs linux/amd64 guests; use a tag built for that platform".into())
            }
            ManifestError::ForeignLayer { .. } => {
                Some("foreign layers belong to Windows base images; pick a Linux image".into())
            }
            ManifestError::NotAnImage { .. } => Some(
                "this reference names another kind of artifact (a chart, a signature, ...)".into(),
            ),
            ManifestError::WrongPlatform { .. } => Some("banger runs linux/amd64 guests".into()),
            _ => None,
        }
    }
}

/// A manifest or an index, told apart by media type.
#[derive(Debug)]
pub(crate) enum Document {
    Index(Box<ImageIndex>),
    Manifest(Box<ImageManifest>),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Index,
    Manifest,
}

fn kind_of(media_type: &str) -> Result<Kind, ManifestError> {
    match media_type {
        OCI_INDEX | DOCKER_LIST => Ok(Kind::Index),
        OCI_MANIFEST | DOCKER_MANIFEST => Ok(Kind::Manifest),
        t if DOCKER_SCHEMA1.contains(&t) => Err(ManifestError::Schema1),
        t => Err(ManifestError::UnsupportedMediaType {
            media_type: shorten(t),
        }),
    }
}

fn malformed(what: &'static str, e: impl std::fmt::Display) -> ManifestError {
    ManifestError::Malformed {
        what,
        detail: shorten(&e.to_string()),
    }
}

/// Parses a manifest or index. The body's `mediaType` decides; the response's `Content-Type` is
/// used when the body has none, and the two must not disagree when both name a known kind.
pub(crate) fn parse_document(
    bytes: &[u8],
    content_type: Option<&str>,
) -> Result<Document, ManifestError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        schema_version: Option<u64>,
        media_type: Option<String>,
        manifests: Option<serde::de::IgnoredAny>,
        layers: Option<serde::de::IgnoredAny>,
    }
    let probe: Probe = serde_json::from_slice(bytes).map_err(|e| malformed("manifest", e))?;
    if probe.schema_version == Some(1) {
        return Err(ManifestError::Schema1);
    }
    if probe.schema_version != Some(2) {
        return Err(ManifestError::Malformed {
            what: "manifest",
            detail: "schemaVersion is not 2".into(),
        });
    }
    let header = content_type
        .map(|c| {
            c.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .filter(|c| kind_of(c).is_ok());
    let kind = match (&probe.media_type, &header) {
        (Some(body), Some(header)) => {
            let (b, h) = (kind_of(body)?, kind_of(header)?);
            if b != h {
                return Err(ManifestError::Malformed {
                    what: "manifest",
                    detail: format!(
                        "the response says `{header}` but the document says `{}`",
                        shorten(body)
                    ),
                });
            }
            b
        }
        (Some(body), None) => kind_of(body)?,
        (None, Some(header)) => kind_of(header)?,
        (None, None) => match (probe.manifests.is_some(), probe.layers.is_some()) {
            (true, false) => Kind::Index,
            (false, true) => Kind::Manifest,
            _ => {
                return Err(ManifestError::Malformed {
                    what: "manifest",
                    detail: "it names no media type and is neither clearly an index nor a manifest"
                        .into(),
                })
            }
        },
    };
    // A document that is both (or neither) is ambiguous; the spec says to refuse it.
    match kind {
        Kind::Index if probe.layers.is_some() => Err(ManifestError::Malformed {
            what: "index",
            detail: "it also has `layers`".into(),
        }),
        Kind::Manifest if probe.manifests.is_some() => Err(ManifestError::Malformed {
            what: "manifest",
            detail: "it also has `manifests`".into(),
        }),
        Kind::Index => Ok(Document::Index(Box::new(
            serde_json::from_slice(bytes).map_err(|e| malformed("index", e))?,
        ))),
        Kind::Manifest => Ok(Document::Manifest(Box::new(
            serde_json::from_slice(bytes).map_err(|e| malformed("manifest", e))?,
        ))),
    }
}

/// A manifest (or nested index) chosen from an index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Chosen {
    pub digest: Sha256Digest,
    pub size: u64,
    pub is_index: bool,
}

fn descriptor_digest(what: &'static str, d: &Descriptor) -> Result<Sha256Digest, ManifestError> {
    Sha256Digest::parse_oci(d.digest().as_ref())
        .map_err(|source| ManifestError::BadDigest { what, source })
}

/// The linux/amd64 entry of an index (the first, preferring one without a variant or `v1`);
/// otherwise an error listing the platforms offered, attestations left out.
pub(crate) fn select_platform(index: &ImageIndex) -> Result<Chosen, ManifestError> {
    let is_attestation = |d: &Descriptor| {
        d.annotations()
            .as_ref()
            .is_some_and(|a| a.contains_key(REFERENCE_TYPE))
    };
    let amd64 = |d: &&Descriptor| {
        d.platform()
            .as_ref()
            .is_some_and(|p| *p.os() == Os::Linux && *p.architecture() == Arch::Amd64)
            && !is_attestation(d)
    };
    let plain_variant = |d: &&Descriptor| {
        d.platform()
            .as_ref()
            .is_some_and(|p| matches!(p.variant().as_deref(), None | Some("") | Some("v1")))
    };
    let manifests = index.manifests();
    let found = manifests
        .iter()
        .filter(amd64)
        .find(plain_variant)
        .or_else(|| manifests.iter().find(amd64));
    let Some(d) = found else {
        let mut offered: Vec<String> = Vec::new();
        for d in manifests.iter().filter(|d| !is_attestation(d)) {
            let p = match d.platform() {
                Some(p) => match p.variant().as_deref() {
                    Some(v) if !v.is_empty() => {
                        format!("{}/{}/{}", p.os(), p.architecture(), v)
                    }
                    _ => format!("{}/{}", p.os(), p.architecture()),
                },
                None => "(no platform)".to_owned(),
            };
            let p = shorten(&p);
            if !offered.contains(&p) {
                offered.push(p);
            }
        }
        let offered = match offered.len() {
            0 => "nothing".to_owned(),
            n if n > 20 => format!("{} and {} more", offered[..20].join(", "), n - 20),
            _ => offered.join(", "),
        };
        return Err(ManifestError::NoPlatform { offered });
    };
    let is_index = kind_of(d.media_type().as_ref())? == Kind::Index;
    Ok(Chosen {
        digest: descriptor_digest("index entry", d)?,
        size: d.size(),
        is_index,
    })
}

/// A blob named by digest and declared size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BlobRef {
    pub digest: Sha256Digest,
    pub size: u64,
}

/// What a platform manifest says, checked: config blob and layers with their compression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CheckedManifest {
    pub config: BlobRef,
    pub layers: Vec<(BlobRef, Compression)>,
}

fn layer_compression(media_type: &str, digest: &str) -> Result<Compression, ManifestError> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Compression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Ok(Compression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd" => Ok(Compression::Zstd),
        t if t.starts_with("application/vnd.oci.image.layer.nondistributable.")
            || t.starts_with("application/vnd.docker.image.rootfs.foreign.") =>
        {
            Err(ManifestError::ForeignLayer {
                digest: shorten(digest),
                media_type: shorten(t),
            })
        }
        t => Err(ManifestError::UnknownLayerType {
            digest: shorten(digest),
            media_type: shorten(t),
        }),
    }
}

/// Checks a platform manifest against the module's rules.
pub(crate) fn check_manifest(m: &ImageManifest) -> Result<CheckedManifest, ManifestError> {
    let config = m.config();
    let config_type = config.media_type().as_ref();
    if config_type != OCI_CONFIG && config_type != DOCKER_CONFIG {
        return Err(ManifestError::NotAnImage {
            media_type: shorten(config_type),
        });
    }
    if config.size() > CONFIG_MAX_BYTES {
        return Err(ManifestError::ConfigTooLarge {
            size: config.size(),
            max: CONFIG_MAX_BYTES,
        });
    }
    let config = BlobRef {
        digest: descriptor_digest("config", config)?,
        size: config.size(),
    };
    if m.layers().len() > LAYERS_MAX {
        return Err(ManifestError::TooManyLayers {
            count: m.layers().len(),
            max: LAYERS_MAX,
        });
    }
    let mut layers = Vec::with_capacity(m.layers().len());
    for l in m.layers() {
        let compression = layer_compression(l.media_type().as_ref(), l.digest().as_ref())?;
        let digest = descriptor_digest("layer", l)?;
        if l.size() > LAYER_MAX_BYTES {
            return Err(ManifestError::LayerTooLarge {
                digest: digest.oci(),
                size: l.size(),
                max: LAYER_MAX_BYTES,
            });
        }
        layers.push((
            BlobRef {
                digest,
                size: l.size(),
            },
            compression,
        ));
    }
    // Every layer is within its own cap, so the sum cannot overflow (128 x 64 GiB).
    let total: u64 = layers.iter().map(|(blob, _)| blob.size).sum();
    if total > IMAGE_MAX_BYTES {
        return Err(ManifestError::ImageTooLarge {
            total,
            max: IMAGE_MAX_BYTES,
        });
    }
    Ok(CheckedManifest { config, layers })
}

/// Checks a config blob: linux/amd64, `rootfs.type` `layers`, one diff_id per layer; returns the
/// runtime subset and the diff_ids.
pub(crate) fn check_config(
    bytes: &[u8],
    layer_count: usize,
) -> Result<(ImageRuntime, Vec<Sha256Digest>), ManifestError> {
    let cfg: ImageConfiguration =
        serde_json::from_slice(bytes).map_err(|e| malformed("config", e))?;
    if *cfg.os() != Os::Linux || *cfg.architecture() != Arch::Amd64 {
        return Err(ManifestError::WrongPlatform {
            os: shorten(&cfg.os().to_string()),
            arch: shorten(&cfg.architecture().to_string()),
        });
    }
    let rootfs = cfg.rootfs();
    if rootfs.typ() != "layers" {
        return Err(ManifestError::RootFsType {
            typ: shorten(rootfs.typ()),
        });
    }
    if rootfs.diff_ids().len() != layer_count {
        return Err(ManifestError::DiffIdCount {
            diff_ids: rootfs.diff_ids().len(),
            layers: layer_count,
        });
    }
    let diff_ids = rootfs
        .diff_ids()
        .iter()
        .map(|d| {
            Sha256Digest::parse_oci(d).map_err(|source| ManifestError::BadDigest {
                what: "diff_id",
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let runtime = ImageRuntime::from_config(cfg.config().as_ref())?;
    Ok((runtime, diff_ids))
}

/// The platform manifest reached from a reference, with its digest.
struct Walked {
    manifest: Option<Box<ImageManifest>>,
    digest: Sha256Digest,
}

/// Follows reference -> (index ->)* manifest. Every document fetched by digest is checked against
/// it (and its declared size); the top one against a pinned digest, else against the
/// registry's `Docker-Content-Digest` when that is a sha256. With `fetch_leaf` false, a platform
/// manifest named by an index is not downloaded: its digest is already known.
async fn walk(
    client: &RegistryClient,
    reference: &Reference,
    fetch_leaf: bool,
    progress: &dyn Progress,
) -> Result<Walked, OciError> {
    let top = reference.manifest_reference();
    progress.log(&format!("fetching manifest {reference}"));
    let fetched = client.get_manifest(&top, MANIFEST_MAX_BYTES).await?;
    let mut digest = Sha256Digest::of_bytes(&fetched.body);
    let expected = reference.digest().copied().or(fetched.header_digest);
    if let Some(expected) = expected {
        if expected != digest {
            return Err(client.manifest_digest_mismatch(&top, expected, digest));
        }
    }
    let mut doc = parse_document(&fetched.body, fetched.content_type.as_deref())
        .map_err(|e| client.manifest_error(e))?;
    let mut depth = 0;
    loop {
        let index = match doc {
            Document::Manifest(m) => {
                return Ok(Walked {
                    manifest: Some(m),
                    digest,
                })
            }
            Document::Index(index) => index,
        };
        depth += 1;
        if depth > INDEX_DEPTH_MAX {
            return Err(client.manifest_error(ManifestError::IndexTooDeep {
                max: INDEX_DEPTH_MAX,
            }));
        }
        let chosen = select_platform(&index).map_err(|e| client.manifest_error(e))?;
        if !chosen.is_index && !fetch_leaf {
            return Ok(Walked {
                manifest: None,
                digest: chosen.digest,
            });
        }
        let wanted = chosen.digest.oci();
        progress.log(&format!("fetching linux/amd64 manifest {wanted}"));
        let fetched = client
            .get_manifest(&wanted, chosen.size.min(MANIFEST_MAX_BYTES))
            .await?;
        digest = Sha256Digest::of_bytes(&fetched.body);
        if digest != chosen.digest {
            return Err(client.manifest_digest_mismatch(&wanted, chosen.digest, digest));
        }
        if fetched.body.len() as u64 != chosen.size {
            return Err(client.manifest_error(ManifestError::SizeMismatch {
                digest,
                expected: chosen.size,
                actual: fetched.body.len() as u64,
            }));
        }
        doc = parse_document(&fetched.body, fetched.content_type.as_deref())
            .map_err(|e| client.manifest_error(e))?;
    }
}

/// Resolves `reference` to its linux/amd64 image: fetches the manifest(s), checks them, fetches
/// the config blob into `cache` (verified) and checks it. Layers are not downloaded; see
/// [`crate::oci::cache::fetch_layers`].
pub async fn resolve(
    reference: &Reference,
    options: &RegistryOptions,
    cache: &BlobCache,
    progress: &dyn Progress,
) -> Result<ResolvedImage, OciError> {
    progress.phase(&format!("resolve {reference}"));
    let client = RegistryClient::new(reference, options)?;
    let walked = walk(&client, reference, true, progress).await?;
    let Some(manifest) = walked.manifest else {
        // walk() with fetch_leaf always returns the manifest.
        return Err(client.manifest_error(ManifestError::Malformed {
            what: "manifest",
            detail: "no platform manifest was fetched".into(),
        }));
    };
    let checked = check_manifest(&manifest).map_err(|e| client.manifest_error(e))?;
    let config_path = cache
        .fetch_blob(
            &client,
            &checked.config.digest,
            checked.config.size,
            progress,
        )
        .await?;
    let bytes = cache.read_small(&config_path, CONFIG_MAX_BYTES).await?;
    let (config, diff_ids) =
        check_config(&bytes, checked.layers.len()).map_err(|e| client.manifest_error(e))?;
    let layers = checked
        .layers
        .iter()
        .zip(diff_ids)
        .map(|((blob, compression), diff_id)| LayerDescriptor {
            digest: blob.digest,
            size: blob.size,
            compression: *compression,
            diff_id,
        })
        .collect();
    Ok(ResolvedImage {
        reference: reference.clone(),
        manifest_digest: walked.digest,
        config,
        config_digest: checked.config.digest,
        layers,
    })
}

/// The digest of the linux/amd64 manifest the registry serves for `reference` now: compare it
/// with [`ResolvedImage::manifest_digest`] to tell whether a local copy is current. Fetches the
/// top document (and nested indexes), never the platform manifest an index names, nor blobs.
pub async fn current_digest(
    reference: &Reference,
    options: &RegistryOptions,
) -> Result<Sha256Digest, OciError> {
    let client = RegistryClient::new(reference, options)?;
    Ok(
        walk(&client, reference, false, &crate::progress::NoProgress)
            .await?
            .digest,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> String {
        Sha256Digest::of_bytes(&[n]).oci()
    }

    fn manifest_json(config_type: &str, layers: &[(&str, String, u64)]) -> String {
        let layers: Vec<String> = layers
            .iter()
            .map(|(t, dg, size)| format!(r#"{{"mediaType":"{t}","digest":"{dg}","size":{size}}}"#))
            .collect();
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"{config_type}","digest":"{}","size":100}},"layers":[{}]}}"#,
            d(0),
            layers.join(",")
        )
    }

    fn index_json(media: &str, entries: &[(&str, &str, Option<&str>, String)]) -> String {
        let entries: Vec<String> = entries
            .iter()
            .map(|(os, arch, variant, dg)| {
                let v = variant.map(|v| format!(r#","variant":"{v}""#)).unwrap_or_default();
                format!(
                    r#"{{"mediaType":"{OCI_MANIFEST}","digest":"{dg}","size":500,"platform":{{"os":"{os}","architecture":"{arch}"{v}}}}}"#
                )
            })
            .collect();
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{media}","manifests":[{}]}}"#,
            entries.join(",")
        )
    }

    fn checked(json: &str) -> Result<CheckedManifest, ManifestError> {
        match parse_document(json.as_bytes(), None).unwrap() {
            Document::Manifest(m) => check_manifest(&m),
            Document::Index(_) => panic!("expected a manifest"),
        }
    }

    #[test]
    fn layer_media_types_map_to_compression() {
        let m = manifest_json(
            OCI_CONFIG,
            &[
                ("application/vnd.oci.image.layer.v1.tar", d(1), 10),
                ("application/vnd.oci.image.layer.v1.tar+gzip", d(2), 20),
                ("application/vnd.oci.image.layer.v1.tar+zstd", d(3), 30),
                (
                    "application/vnd.docker.image.rootfs.diff.tar.gzip",
                    d(4),
                    40,
                ),
            ],
        );
        let c = checked(&m).unwrap();
        let comp: Vec<Compression> = c.layers.iter().map(|l| l.1).collect();
        assert_eq!(
            comp,
            [
                Compression::None,
                Compression::Gzip,
                Compression::Zstd,
                Compression::Gzip
            ]
        );
        assert_eq!(c.layers[2].0.size, 30);
        assert_eq!(c.layers[3].0.digest.oci(), d(4));
        assert_eq!(c.config.digest.oci(), d(0));
    }

    #[test]
    fn foreign_unknown_and_oversized_layers_are_refused_by_name() {
        for (t, want) in [
            (
                "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                "foreign",
            ),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                "foreign",
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+bzip2",
                "unknown media type",
            ),
            ("text/html", "unknown media type"),
        ] {
            let err = checked(&manifest_json(OCI_CONFIG, &[(t, d(7), 1)])).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains(want) && msg.contains(&d(7)) && msg.contains(t),
                "{msg}"
            );
        }
        let err = checked(&manifest_json(
            OCI_CONFIG,
            &[(
                "application/vnd.oci.image.layer.v1.tar",
                d(1),
                LAYER_MAX_BYTES + 1,
            )],
        ))
        .unwrap_err();
        assert!(matches!(err, ManifestError::LayerTooLarge { .. }), "{err}");
        let many: Vec<(&str, String, u64)> = (0..=LAYERS_MAX)
            .map(|i| ("application/vnd.oci.image.layer.v1.tar", d(i as u8), 1))
            .collect();
        let err = checked(&manifest_json(OCI_CONFIG, &many)).unwrap_err();
        assert!(err.to_string().contains("129 layers"), "{err}");
        let err = checked(&manifest_json(
            "application/vnd.cncf.helm.config.v1+json",
            &[],
        ))
        .unwrap_err();
        assert!(err.to_string().contains("not a container image"), "{err}");
        let big_config =
            manifest_json(DOCKER_CONFIG, &[]).replace(r#""size":100"#, r#""size":1048577"#);
        assert!(matches!(
            checked(&big_config),
            Err(ManifestError::ConfigTooLarge { .. })
        ));
    }

    #[test]
    fn layers_declaring_more_than_the_image_cap_in_all_are_refused() {
        let tar = "application/vnd.oci.image.layer.v1.tar";
        // Each under the per-layer cap, together over the image cap.
        let layers: Vec<(&str, String, u64)> = (0..3)
            .map(|i| (tar, d(i), IMAGE_MAX_BYTES / 3 + 1))
            .collect();
        let err = checked(&manifest_json(OCI_CONFIG, &layers)).unwrap_err();
        let total = 3 * (IMAGE_MAX_BYTES / 3 + 1);
        assert!(
            matches!(err, ManifestError::ImageTooLarge { total: t, max } if t == total && max == IMAGE_MAX_BYTES),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&total.to_string()) && msg.contains("64 GiB"),
            "{msg}"
        );
        // Up to the cap exactly is fine.
        let layers: Vec<(&str, String, u64)> = vec![
            (tar, d(1), IMAGE_MAX_BYTES / 2),
            (tar, d(2), IMAGE_MAX_BYTES / 2),
        ];
        checked(&manifest_json(OCI_CONFIG, &layers)).unwrap();
    }

    #[test]
    fn hostile_digests_in_descriptors_are_refused() {
        for bad in ["sha256:../x", "sha512:abcd", "sha256:ABCDEF"] {
            let m = manifest_json(
                OCI_CONFIG,
                &[("application/vnd.oci.image.layer.v1.tar", bad.into(), 1)],
            );
            // oci-spec refuses some shapes while parsing, banger the rest; neither reaches a path.
            match parse_document(m.as_bytes(), None) {
                Err(e) => assert!(matches!(e, ManifestError::Malformed { .. }), "{e}"),
                Ok(Document::Manifest(m)) => {
                    let err = check_manifest(&m).unwrap_err();
                    assert!(
                        matches!(err, ManifestError::BadDigest { .. }),
                        "{bad}: {err}"
                    );
                }
                Ok(Document::Index(_)) => panic!("not an index"),
            }
        }
    }

    #[test]
    fn documents_are_told_apart_by_media_type() {
        let m = manifest_json(OCI_CONFIG, &[]);
        assert!(matches!(
            parse_document(
                m.as_bytes(),
                Some("application/vnd.oci.image.manifest.v1+json; charset=utf-8")
            ),
            Ok(Document::Manifest(_))
        ));
        let i = index_json(DOCKER_LIST, &[("linux", "amd64", None, d(1))]);
        assert!(matches!(
            parse_document(i.as_bytes(), None),
            Ok(Document::Index(_))
        ));
        // Content-Type is used when the body names nothing.
        let bare = r#"{"schemaVersion":2,"manifests":[]}"#;
        assert!(matches!(
            parse_document(bare.as_bytes(), Some(OCI_INDEX)),
            Ok(Document::Index(_))
        ));
        assert!(matches!(
            parse_document(bare.as_bytes(), Some("application/json")),
            Ok(Document::Index(_))
        ));
        // Disagreement, ambiguity, schema 1, unknown types and junk are refused.
        let err = parse_document(m.as_bytes(), Some(OCI_INDEX)).unwrap_err();
        assert!(err.to_string().contains("the response says"), "{err}");
        let both = r#"{"schemaVersion":2,"manifests":[],"layers":[]}"#;
        assert!(parse_document(both.as_bytes(), None).is_err());
        let both = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[],"layers":[]}}"#
        );
        assert!(parse_document(both.as_bytes(), None).is_err());
        let s1 = r#"{"schemaVersion":1,"name":"x","fsLayers":[]}"#;
        assert!(matches!(
            parse_document(s1.as_bytes(), None),
            Err(ManifestError::Schema1)
        ));
        let s1 = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}"}}"#,
            DOCKER_SCHEMA1[1]
        );
        assert!(matches!(
            parse_document(s1.as_bytes(), None),
            Err(ManifestError::Schema1)
        ));
        let art =
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.artifact.manifest.v1+json"}"#;
        assert!(matches!(
            parse_document(art.as_bytes(), None),
            Err(ManifestError::UnsupportedMediaType { .. })
        ));
        for junk in ["", "null", "[]", "{", "\"x\"", r#"{"schemaVersion":"2"}"#] {
            assert!(parse_document(junk.as_bytes(), None).is_err(), "{junk}");
        }
        let deep = "[".repeat(100_000);
        assert!(parse_document(deep.as_bytes(), None).is_err());
    }

    #[test]
    fn index_selects_linux_amd64_preferring_no_variant() {
        let i = index_json(
            OCI_INDEX,
            &[
                ("linux", "arm64", Some("v8"), d(1)),
                ("linux", "amd64", Some("v3"), d(2)),
                ("linux", "amd64", None, d(3)),
            ],
        );
        let Document::Index(i) = parse_document(i.as_bytes(), None).unwrap() else {
            panic!()
        };
        let c = select_platform(&i).unwrap();
        assert_eq!(c.digest.oci(), d(3));
        assert_eq!(c.size, 500);
        assert!(!c.is_index);
        let i = index_json(OCI_INDEX, &[("linux", "amd64", Some("v3"), d(2))]);
        let Document::Index(i) = parse_document(i.as_bytes(), None).unwrap() else {
            panic!()
        };
        assert_eq!(select_platform(&i).unwrap().digest.oci(), d(2));
    }

    #[test]
    fn index_without_amd64_lists_the_platforms_offered() {
        let i = index_json(
            DOCKER_LIST,
            &[
                ("linux", "arm64", Some("v8"), d(1)),
                ("linux", "arm", Some("v7"), d(2)),
                ("windows", "amd64", None, d(3)),
                ("linux", "arm64", Some("v8"), d(4)),
            ],
        );
        let Document::Index(i) = parse_document(i.as_bytes(), None).unwrap() else {
            panic!()
        };
        let err = select_platform(&i).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("it offers linux/arm64/v8, linux/arm/v7, windows/amd64"),
            "{err}"
        );
        assert!(err.hint().unwrap().contains("linux/amd64"), "{err}");
        let attest = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1,"platform":{{"os":"linux","architecture":"amd64"}},"annotations":{{"vnd.docker.reference.type":"attestation-manifest"}}}}]}}"#,
            d(5)
        );
        let Document::Index(i) = parse_document(attest.as_bytes(), None).unwrap() else {
            panic!()
        };
        let err = select_platform(&i).unwrap_err().to_string();
        assert!(err.contains("it offers nothing"), "{err}");
    }

    fn config_json(os: &str, arch: &str, typ: &str, diff_ids: &[String]) -> String {
        let ids: Vec<String> = diff_ids.iter().map(|d| format!("\"{d}\"")).collect();
        format!(
            r#"{{"architecture":"{arch}","os":"{os}","rootfs":{{"type":"{typ}","diff_ids":[{}]}},"config":{{"Env":["A=1"]}}}}"#,
            ids.join(",")
        )
    }

    #[test]
    fn config_must_match_platform_and_layers() {
        let ids = [d(1), d(2)];
        let (rt, diff_ids) =
            check_config(config_json("linux", "amd64", "layers", &ids).as_bytes(), 2).unwrap();
        assert_eq!(rt.env, ["A=1"]);
        assert_eq!(diff_ids.iter().map(|x| x.oci()).collect::<Vec<_>>(), ids);
        let cases = [
            (
                config_json("linux", "arm64", "layers", &ids),
                2,
                "linux/arm64",
            ),
            (
                config_json("windows", "amd64", "layers", &ids),
                2,
                "windows/amd64",
            ),
            (
                config_json("linux", "amd64", "other", &ids),
                2,
                "rootfs type is `other`",
            ),
            (
                config_json("linux", "amd64", "layers", &ids),
                3,
                "2 diff_ids for 3 layers",
            ),
            (
                config_json("linux", "amd64", "layers", &["sha256:../x".into()]),
                1,
                "diff_id",
            ),
            ("{}".into(), 0, "config that banger cannot read"),
        ];
        for (json, n, want) in cases {
            let err = check_config(json.as_bytes(), n).unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
    }
}

#[cfg(test)]
mod send_tests {
    use super::*;

    fn assert_send<T: Send>(_: &T) {}

    /// The daemon runs these on tokio tasks, which need `Send` futures.
    #[test]
    fn public_futures_are_send() {
        let r = Reference::parse("127.0.0.1:1/x").unwrap();
        let opts = RegistryOptions::default();
        let cache = BlobCache::new("/nonexistent");
        let p = crate::progress::NoProgress;
        let f = resolve(&r, &opts, &cache, &p);
        assert_send(&f);
        let f = current_digest(&r, &opts);
        assert_send(&f);
        let img = ResolvedImage {
            reference: r.clone(),
            manifest_digest: Sha256Digest::of_bytes(b""),
            config: ImageRuntime::default(),
            config_digest: Sha256Digest::of_bytes(b""),
            layers: vec![],
        };
        let f = crate::oci::cache::fetch_layers(&img, &opts, &cache, &p);
        assert_send(&f);
        let keep = std::collections::HashSet::new();
        let f = cache.prune(&keep);
        assert_send(&f);
    }
}
