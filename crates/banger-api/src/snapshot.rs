//! Snapshots of running VMs: `vm snapshot`, `snapshot list`, `snapshot delete`.

use serde::{Deserialize, Serialize};

use crate::vm::VmSpec;

/// `POST /v1/vms/{name}/snapshot`
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateSnapshotRequest {
    /// The snapshot's name (a DNS label); `VM-N` (the lowest free N) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A snapshot as `snapshot list` and `vm snapshot` report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub name: String,
    /// The VM it was taken of (which may since have been deleted).
    pub vm: String,
    pub image: String,
    pub kernel: String,
    /// `qemu` or `firecracker`: a snapshot restores only on the VMM it was taken with.
    pub vmm: String,
    pub spec: VmSpec,
    pub created_at: String,
    /// Bytes on disk: memory and device state plus the disk copies (reflinked copies share
    /// blocks with their source, so the file system may hold less).
    pub bytes: u64,
    pub dir: String,
    /// A warm snapshot: kept by banger of a freshly booted VM of `image` with this shape, and
    /// restored by `vm create` and `vm run` instead of booting (deleting it is safe: the next
    /// cold boot makes another).
    #[serde(default)]
    pub warm: bool,
}
