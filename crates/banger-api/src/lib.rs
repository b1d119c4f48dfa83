//! The wire contract between `banger` (the CLI) and `bangerd` (the daemon).
//!
//! The daemon serves HTTP/1.1 with JSON bodies on a Unix socket. Every request carries the
//! [`API_VERSION_HEADER`]; the daemon refuses a request whose version differs from its own with
//! [`ErrorCode::ApiVersionMismatch`], so an old daemon is never driven by a new CLI (or the
//! reverse). Long operations (builds, pulls, exports) answer with a stream of newline-delimited
//! JSON [`Event`]s ending in exactly one [`Event::Done`] or [`Event::Failed`]. This crate holds
//! types only: no I/O, so both sides can depend on it and nothing else needs to.

use serde::{Deserialize, Serialize};

pub mod snapshot;
pub mod vm;

/// Bumped on any incompatible change to a request, response or event.
pub const API_VERSION: u32 = 3;

/// Header carrying the caller's [`API_VERSION`].
pub const API_VERSION_HEADER: &str = "x-banger-api-version";

/// Content type of streamed responses (one JSON [`Event`] per line).
pub const EVENT_STREAM_CONTENT_TYPE: &str = "application/x-ndjson";

/// Stable error codes: the CLI maps them to exit statuses and hints, tests match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    ApiVersionMismatch,
    BadRequest,
    NotFound,
    AlreadyExists,
    InUse,
    MissingTool,
    DigestMismatch,
    Download,
    DiskFull,
    BuildFailed,
    NoFreeAddress,
    VmmFailed,
    BootTimeout,
    InvalidState,
    Internal,
}

/// An error as the daemon reports it: a stable code, one message that already includes its
/// causes, and the hints telling the user what to do next (each one sentence, no `hint:`
/// prefix; the CLI prints one `hint:` line per hint).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// Daemons before the list sent at most one, as `hint`; it is read into the list.
    #[serde(
        default,
        alias = "hint",
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub hints: Vec<String>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            hints: Vec::new(),
        }
    }

    /// Adds a hint after those already there (unless it is one of them).
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        let hint = hint.into();
        if !self.hints.contains(&hint) {
            self.hints.push(hint);
        }
        self
    }
}

/// `hints` as a list, or as the single string (or null) the old `hint` field held.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => Vec::new(),
        Some(OneOrMany::One(hint)) => vec![hint],
        Some(OneOrMany::Many(hints)) => hints,
    })
}

/// One line of a streamed response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A named step of a long operation has begun.
    Phase { name: String },
    /// Byte progress within the current phase; with `item`, the progress of one of several
    /// transfers running at once (an image layer, named by its digest).
    Progress {
        done: u64,
        total: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        item: Option<String>,
    },
    /// A line of output from a tool the daemon runs (debootstrap, mkfs, ...).
    Log { line: String },
    /// Something the user should know that does not stop the operation.
    Notice { message: String },
    /// The operation succeeded; `result` is the operation's response body.
    Done { result: serde_json::Value },
    /// The operation failed; nothing half-made is left behind.
    Failed { error: ApiError },
}

/// `GET /v1/version`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub api_version: u32,
    pub daemon_version: String,
    pub pid: u32,
    pub socket: String,
    pub state_dir: String,
    pub log_file: String,
    /// The `.vm` DNS server; absent from daemons that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsStatus>,
}

/// What `daemon status` shows of the `.vm` DNS server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsStatus {
    /// Whether it answers now (only while the bridge exists, i.e. while a VM runs).
    pub serving: bool,
    /// Where clients ask: the bridge address, port 53.
    pub address: String,
    /// How many `<vm>.vm` names it knows.
    pub names: usize,
    /// Whether systemd-resolved routes the host's `.vm` lookups to it.
    pub routed_by_resolved: bool,
}

/// Where an image or kernel came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Built locally from a recipe (the recipe's name).
    Built,
    /// Pulled as a bundle (the manifest URL).
    Pulled,
    /// Registered from files the user supplied.
    Registered,
    /// Pulled from an OCI registry (the image reference).
    Oci,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Source::Built => "built",
            Source::Pulled => "pulled",
            Source::Registered => "registered",
            Source::Oci => "oci",
        })
    }
}

/// How an image boots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Boot {
    /// Its own init (systemd) with banger's agent as a unit, and sshd: banger's Debian images.
    #[default]
    Systemd,
    /// banger's kernel and initramfs, with the agent as PID 1 and no sshd: OCI images.
    Agent,
}

impl Boot {
    pub fn as_str(self) -> &'static str {
        match self {
            Boot::Systemd => "systemd",
            Boot::Agent => "agent",
        }
    }
}

impl std::fmt::Display for Boot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an OCI image came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OciOrigin {
    /// The reference as pulled, normalised (`docker.io/library/alpine:3.20`).
    pub reference: String,
    /// Digest of the linux/amd64 image manifest (`sha256:...`).
    pub digest: String,
}

/// An image in the store (`GET /v1/images`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub name: String,
    pub source: Source,
    /// Recipe name, manifest URL or original path, depending on `source`.
    pub origin: String,
    pub rootfs: String,
    /// sha256 of the root file system image. OCI images have none: they are identified by
    /// their manifest digest (`oci.digest`), and every layer was checked against its digests
    /// when it was unpacked, so hashing the (mostly sparse) result again would add nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs_sha256: Option<String>,
    /// Apparent size of the root filesystem image in bytes.
    pub size_bytes: u64,
    /// Kernel registered alongside the image.
    pub kernel: String,
    /// RFC 3339.
    pub created_at: String,
    #[serde(default)]
    pub boot: Boot,
    /// Set for images pulled from an OCI registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci: Option<OciOrigin>,
    /// Bytes on disk of the snapshots taken of VMs of this image (warm ones included).
    #[serde(default)]
    pub snapshot_bytes: u64,
}

/// A kernel in the store (`GET /v1/kernels`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelInfo {
    pub name: String,
    pub source: Source,
    pub kernel: String,
    pub kernel_sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_sha256: Option<String>,
    pub created_at: String,
}

/// `POST /v1/images/build` (streamed)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildImageRequest {
    /// Recipe to build (`debian-bookworm`, `debian-bookworm-slim`).
    pub recipe: String,
    /// Store name; defaults to the recipe name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Replace an existing image of the same name.
    #[serde(default)]
    pub force: bool,
}

/// `POST /v1/images/pull` (streamed)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullImageRequest {
    /// A catalog name, a URL (http, https, file) of a bundle manifest, or an OCI image reference
    /// (`alpine:3.20`, `ghcr.io/org/tool@sha256:...`, `docker://NAME` to skip the catalog).
    pub reference: String,
    /// Store name; defaults to the catalog or manifest name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// `POST /v1/kernels/pull` (streamed): only the kernel and initrd of a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullKernelRequest {
    /// A catalog name, or a URL (http, https, file) of a bundle manifest.
    pub reference: String,
    /// Store name; defaults to the catalog name (required for URLs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// `POST /v1/images/export` (streamed)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportImageRequest {
    pub name: String,
    /// Absolute directory the bundle is written to (created if missing, must be empty).
    pub out_dir: String,
}

/// `POST /v1/images/register`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterImageRequest {
    pub name: String,
    /// Absolute paths; the files are copied into the store.
    pub rootfs: String,
    pub kernel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
}

/// `POST /v1/kernels/register`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterKernelRequest {
    pub name: String,
    pub kernel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
}

/// Result of an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportResult {
    pub manifest: String,
    pub files: Vec<String>,
}

/// `POST /v1/images/prune`: what dropping unneeded cached OCI blobs freed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pruned {
    pub freed_bytes: u64,
}

/// Names a resource in a `DELETE` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    pub name: String,
}

/// Validates a user-chosen name for an image, kernel or VM: a DNS label (lowercase letters,
/// digits and `-`, 1 to 63 characters, not starting or ending with `-`). Images and kernels use
/// the same rule so every name is safe as a file name and a host name.
pub fn validate_name(kind: &str, name: &str) -> Result<(), ApiError> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if name.is_empty()
        || name.len() > 63
        || !ok_chars
        || name.starts_with('-')
        || name.ends_with('-')
    {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("invalid {kind} name {name:?}"),
        )
        .with_hint("use 1-63 lowercase letters, digits or '-', not starting or ending with '-'"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_lines_are_tagged_json() {
        let e = Event::Phase {
            name: "debootstrap".into(),
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"event":"phase","name":"debootstrap"}"#
        );
        let back: Event =
            serde_json::from_str(r#"{"event":"progress","done":5,"total":null}"#).unwrap();
        assert_eq!(
            back,
            Event::Progress {
                done: 5,
                total: None,
                item: None
            }
        );
        let layer = Event::Progress {
            done: 1,
            total: Some(2),
            item: Some("sha256:ab".into()),
        };
        assert_eq!(
            serde_json::to_string(&layer).unwrap(),
            r#"{"event":"progress","done":1,"total":2,"item":"sha256:ab"}"#
        );
    }

    #[test]
    fn names_follow_dns_label_rules() {
        for good in ["a", "web", "debian-bookworm", "x1-2", &"a".repeat(63)] {
            assert!(validate_name("vm", good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"a".repeat(64)] {
            assert!(validate_name("vm", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn errors_round_trip_with_codes() {
        let e = ApiError::new(ErrorCode::NotFound, "no image x").with_hint("see image list");
        let json = serde_json::to_string(&e).unwrap();
        assert!(json.contains(r#""code":"not_found""#));
        assert!(json.contains(r#""hints":["see image list"]"#), "{json}");
        assert_eq!(serde_json::from_str::<ApiError>(&json).unwrap(), e);
        let bare = ApiError::new(ErrorCode::Internal, "x");
        let json = serde_json::to_string(&bare).unwrap();
        assert!(!json.contains("hint"), "{json}");
        assert_eq!(serde_json::from_str::<ApiError>(&json).unwrap(), bare);
    }

    #[test]
    fn hints_keep_their_order_and_each_is_kept_once() {
        let e = ApiError::new(ErrorCode::VmmFailed, "x")
            .with_hint("first")
            .with_hint("second")
            .with_hint("first");
        assert_eq!(e.hints, ["first", "second"]);
    }

    #[test]
    fn the_single_hint_of_older_daemons_is_read_into_the_list() {
        let old = r#"{"code":"api_version_mismatch","message":"m","hint":"restart it"}"#;
        let e: ApiError = serde_json::from_str(old).unwrap();
        assert_eq!(e.hints, ["restart it"]);
        let old = r#"{"code":"internal","message":"m","hint":null}"#;
        assert!(serde_json::from_str::<ApiError>(old)
            .unwrap()
            .hints
            .is_empty());
    }
}
