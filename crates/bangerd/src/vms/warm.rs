//! Warm starts: the first time an image boots with a given shape (vCPUs, memory, disk size,
//! VMM), banger keeps a snapshot of the fresh VM (a *warm snapshot*), and later creates with
//! the same image and shape restore it instead of booting, then have the guest take on its own
//! identity.
//!
//! A warm snapshot holds memory, devices and the root disk, but no work disk: just before it
//! is taken the guest unmounts `/root` (the agent's `work_disk` request), so each VM restored
//! from it mounts a work disk of its own (its files, its `authorized_keys`), made as for a
//! cold boot. The VM the snapshot was taken of mounts its own again at once.
//!
//! A warm snapshot is only as good as what it was made from. [`WarmKey`] records that: the
//! image (name, date, content digest), the kernel (digests), the guest agent (digest), the
//! VMM (program and accelerator) and banger's boot settings (the kernel command line banger
//! boots the image with, and [`WARM_FORMAT`]). When any of them changes, the snapshot is out
//! of date: the next create deletes it, boots cold and keeps a new one. A snapshot that fails
//! to restore (a damaged file, say) is deleted, and that create boots cold too.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use banger_api::vm::VmSpec;
use banger_api::{ApiError, ErrorCode, ImageInfo, KernelInfo};
use banger_image::Progress;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::registry::Claim;
use crate::server::Emitter;
use crate::store::{self, SnapshotRow};

use super::Vms;

/// How banger makes warm snapshots. Bump it when that changes in a way older snapshots do not
/// follow (what the guest does before the snapshot, say): every warm snapshot is then remade.
pub const WARM_FORMAT: u32 = 1;

/// How long the agent has to unmount or mount the work disk.
const WORK_DISK_TIMEOUT: Duration = Duration::from_secs(30);

/// What a warm snapshot was made from. Stored as JSON in its row; compared part by part so an
/// out-of-date snapshot can say what changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarmKey {
    pub image: String,
    pub kernel: String,
    pub agent: String,
    pub vmm: String,
    pub boot: String,
}

impl WarmKey {
    /// The key of a VM of `image` booted on `kernel` with this agent (its digest), VMM
    /// ([`banger_vmm::Vmm::fingerprint`]) and kernel command line (without per-VM settings).
    pub fn new(
        image: &ImageInfo,
        kernel: &KernelInfo,
        agent_sha256: &str,
        vmm: &str,
        command_line: &str,
    ) -> WarmKey {
        let content = image
            .oci
            .as_ref()
            .map(|o| o.digest.clone())
            .or_else(|| image.rootfs_sha256.clone())
            .unwrap_or_default();
        WarmKey {
            image: format!("{} {} {content}", image.name, image.created_at),
            kernel: format!(
                "{} {} {}",
                kernel.name,
                kernel.kernel_sha256,
                kernel.initrd_sha256.as_deref().unwrap_or("-")
            ),
            agent: agent_sha256.to_owned(),
            vmm: vmm.to_owned(),
            boot: format!("format {WARM_FORMAT}: {command_line}"),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// What differs from `other`, in words ("the guest agent", ...); empty when nothing does.
    pub fn changes(&self, other: &WarmKey) -> Vec<&'static str> {
        [
            (self.image != other.image, "the image"),
            (self.kernel != other.kernel, "its kernel"),
            (self.agent != other.agent, "the guest agent"),
            (self.vmm != other.vmm, "the VMM"),
            (self.boot != other.boot, "banger's boot settings"),
        ]
        .into_iter()
        .filter_map(|(differs, what)| differs.then_some(what))
        .collect()
    }
}

/// Which warm snapshots can stand in for each other: one image, VMM and shape.
fn slot(image: &str, vmm: &str, spec: VmSpec) -> String {
    format!(
        "{image}/{vmm}/{}/{}/{}",
        spec.vcpu, spec.memory_mib, spec.disk_bytes
    )
}

/// What a create does about warm starts.
pub(super) enum WarmPlan {
    /// Boot, and keep no snapshot (`--cold`, `--from`, not started, or another create is
    /// making this slot's snapshot right now).
    Off,
    /// Restore this warm snapshot; should that fail, boot and keep a new one under `key`
    /// (none for a warm snapshot named with `--from`: that create only boots).
    Restore(SnapshotRow, Option<WarmKey>),
    /// Boot, then keep a warm snapshot under this key. The claim keeps other creates of the
    /// same slot from making one too.
    Keep(WarmKey, Claim<()>),
}

/// The digest of the agent binary, remembered for as long as the file looks the same (path,
/// size, modification time), so a create does not hash it again.
#[derive(Default)]
pub(super) struct AgentDigest(Mutex<Option<(String, String)>>);

impl AgentDigest {
    fn get(&self, path: &Path) -> anyhow::Result<String> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path)?;
        let stamp = format!(
            "{} {} {}.{}",
            path.display(),
            meta.len(),
            meta.mtime(),
            meta.mtime_nsec()
        );
        let mut cached = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((s, digest)) = cached.as_ref() {
            if *s == stamp {
                return Ok(digest.clone());
            }
        }
        let mut hasher = Sha256::new();
        std::io::copy(&mut std::fs::File::open(path)?, &mut hasher)?;
        let digest = hex::encode(hasher.finalize());
        *cached = Some((stamp, digest.clone()));
        Ok(digest)
    }
}

impl Vms {
    /// Decides how a create of `image` with `spec` starts: from a warm snapshot that is up to
    /// date, or cold (keeping one, unless another create is making it). Out-of-date snapshots
    /// of the slot are deleted on the way, with a notice saying what changed.
    pub(super) async fn warm_plan(
        &self,
        image: &ImageInfo,
        kernel: &KernelInfo,
        spec: VmSpec,
        agent_bin: &Path,
        progress: &Emitter,
    ) -> WarmPlan {
        let Ok(backend) = self.vmms.for_new_vms() else {
            return WarmPlan::Off;
        };
        let agent = {
            let (digests, path) = (self.agent_digest.clone(), agent_bin.to_owned());
            tokio::task::spawn_blocking(move || digests.get(&path)).await
        };
        let agent = match agent {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                tracing::warn!("cannot hash the agent binary: {e:#}");
                return WarmPlan::Off;
            }
            Err(_) => return WarmPlan::Off,
        };
        let vmm = backend.kind().as_str();
        let key = WarmKey::new(
            image,
            kernel,
            &agent,
            &backend.fingerprint(),
            &super::start::boot_template(image.boot),
        );
        let rows = match self.store.call(|c| store::list_snapshots(c)).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!("cannot list snapshots: {e:#}");
                return WarmPlan::Off;
            }
        };
        let mut usable = None;
        for row in rows {
            let Some(json) = row.warm_key.as_deref() else {
                continue;
            };
            if row.image != image.name || row.vmm != vmm || row.spec != spec {
                continue;
            }
            let theirs: Option<WarmKey> = serde_json::from_str(json).ok();
            let changes = theirs
                .as_ref()
                .map(|t| t.changes(&key))
                .unwrap_or_else(|| vec!["its record"]);
            if changes.is_empty() && usable.is_none() && self.snapshot_dir(&row.name).is_dir() {
                usable = Some(row);
                continue;
            }
            progress.notice(&format!(
                "warm snapshot {} of image {} is out of date ({} changed); removing it",
                row.name,
                image.name,
                join_words(&changes)
            ));
            self.remove_snapshot(&row.name).await;
        }
        if let Some(row) = usable {
            return WarmPlan::Restore(row, Some(key));
        }
        match self.warming.claim(&slot(&image.name, vmm, spec), ()) {
            Some(claim) => WarmPlan::Keep(key, claim),
            None => WarmPlan::Off,
        }
    }

    /// Keeps a warm snapshot of VM `name`, freshly booted: the guest unmounts its work disk,
    /// the snapshot is taken, and the guest mounts its work disk again. Not keeping one is
    /// only a notice (the VM is fine); a guest that cannot mount its work disk again is an
    /// error (the VM has no home). Caller holds the VM lock.
    pub(super) async fn keep_warm(
        self: &Arc<Self>,
        name: &str,
        key: &WarmKey,
        progress: &Emitter,
    ) -> Result<Option<String>, ApiError> {
        progress.phase("keep warm snapshot");
        let client = self.agent(name).await?;
        if let Err(e) = client.work_disk(false, WORK_DISK_TIMEOUT).await {
            progress.notice(&format!(
                "no warm snapshot kept: {}",
                crate::hints::report(&e)
            ));
            return Ok(None);
        }
        let snapshot = format!("warm-{}", crate::names::short_id());
        let taken = self
            .take_snapshot(name, Some(snapshot), Some(key.to_json()))
            .await;
        client
            .work_disk(true, WORK_DISK_TIMEOUT)
            .await
            .map_err(|e| {
                crate::hints::failed(
                    ErrorCode::VmmFailed,
                    format!("VM {name} cannot mount its work disk again after its warm snapshot"),
                    &e,
                )
            })?;
        match taken {
            Ok(info) => {
                progress.notice(&format!(
                    "kept warm snapshot {} for the next VM of image {} with this shape",
                    info.name, info.image
                ));
                Ok(Some(info.name))
            }
            Err(e) => {
                progress.notice(&format!("no warm snapshot kept: {}", e.message));
                Ok(None)
            }
        }
    }

    /// The slot of warm snapshot `row`, claimed for a create that replaces it; `None` while
    /// another create makes that slot's snapshot.
    pub(super) fn claim_slot_of(&self, row: &SnapshotRow) -> Option<Claim<()>> {
        self.warming
            .claim(&slot(&row.image, &row.vmm, row.spec), ())
    }

    /// Removes a snapshot's row and files, logging (not failing) when that cannot be done.
    pub(super) async fn remove_snapshot(&self, name: &str) {
        if let Err(e) = self.delete_snapshot(name).await {
            tracing::warn!(snapshot = name, "cannot remove snapshot: {}", e.message);
        }
    }
}

/// `a`, `a and b`, `a, b and c`.
fn join_words(words: &[&str]) -> String {
    match words {
        [] => String::new(),
        [one] => (*one).to_owned(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}
