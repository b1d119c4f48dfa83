//! Warm starts: the first time an image boots with a given shape (vCPUs, memory, disk size,
//! VMM), banger keeps a snapshot of the fresh VM (a *warm snapshot*), and later creates with
//! the same image and shape restore it instead of booting, then have the guest take on its own
//! identity.
//!
//! A warm snapshot holds memory, devices and the root disk, but no work disk: just before it
//! is taken the guest unmounts `/root` (the agent's `work_disk` request), so each VM restored
//! from it mounts a work disk of its own (its files, its `authorized_keys`), made as for a
//! cold boot. The VM the snapshot was taken of mounts its own again at once. Nor does it hold
//! that VM's SSH host key: the VM boots with a throwaway one and takes on its own after the
//! snapshot, so no VM made from it can read another's key off its disk or memory. It is taken
//! right after the agent answers, before anything of the user's runs in the guest.
//!
//! A create holds a lease (a read lock) on the snapshot it restores until the VMM has loaded
//! it; removing a snapshot waits for those.
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
use banger_api::{ApiError, Boot, ErrorCode, ImageInfo, KernelInfo};
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

/// How warm snapshots' names begin; users' snapshots may not.
pub const WARM_PREFIX: &str = "warm-";

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
            // What bangerd itself puts into a warm snapshot beyond the command line: the unit
            // it injects and how it makes and restores snapshots (its version).
            boot: format!(
                "format {WARM_FORMAT}, bangerd {}, unit {}: {command_line}",
                env!("CARGO_PKG_VERSION"),
                hex::encode(Sha256::digest(banger_agent::SYSTEMD_UNIT.as_bytes()))
            ),
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
            let why = match theirs.as_ref().map(|t| t.changes(&key)) {
                None => "its record is unreadable".to_owned(),
                Some(changes) if !changes.is_empty() => {
                    format!("it is out of date: {} changed", join_words(&changes))
                }
                Some(_) if usable.is_some() => "another one stands in for it".to_owned(),
                Some(_) if !self.snapshot_dir(&row.name).is_dir() => {
                    "its files are missing".to_owned()
                }
                Some(_) => {
                    usable = Some(row);
                    continue;
                }
            };
            progress.notice(&format!(
                "removing warm snapshot {} of image {}: {why}",
                row.name, image.name
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

    /// Keeps a warm snapshot of VM `name`, freshly booted with a throwaway host key: the guest
    /// unmounts its work disk, the snapshot is taken (root disk only), the guest mounts its work
    /// disk again and (with sshd) takes on its own host key. Not keeping a snapshot is only a
    /// notice; a VM that cannot get its work disk or host key back is an error (it has no home,
    /// or no key that ssh accepts). Caller holds the VM lock.
    pub(super) async fn keep_warm(
        self: &Arc<Self>,
        name: &str,
        key: &WarmKey,
        progress: &Emitter,
    ) -> Result<(), ApiError> {
        progress.phase("keep warm snapshot");
        let row = self.row(name).await?;
        let client = self.agent(name).await?;
        let kept = match client.work_disk(false, WORK_DISK_TIMEOUT).await {
            Err(e) => Err(crate::hints::report(&e).to_string()),
            Ok(_) => {
                let snapshot = format!("{WARM_PREFIX}{}", crate::names::short_id());
                self.take_snapshot(name, Some(snapshot), Some(key.to_json()))
                    .await
                    .map_err(|e| e.message)
            }
        };
        // Whatever happened above (an unmount that failed half-way, or that timed out and went
        // on in the guest): mounting a work disk that is mounted does nothing.
        let agent_failed = |what: &str, e: banger_agent::host::AgentError| {
            crate::hints::failed(ErrorCode::Internal, format!("VM {name} {what}"), &e)
                .with_hint(format!("see `banger vm logs {name}`"))
        };
        if let Err(e) = client.work_disk(true, WORK_DISK_TIMEOUT).await {
            if let Ok(info) = &kept {
                // Every VM made from it would fail the same way.
                self.remove_snapshot(&info.name).await;
            }
            return Err(agent_failed(
                "cannot mount its work disk again after its warm snapshot",
                e,
            ));
        }
        if row.boot == Boot::Systemd {
            let identity = self.own_identity(&row)?;
            client
                .reidentify(identity, WORK_DISK_TIMEOUT)
                .await
                .map_err(|e| agent_failed("cannot take on its own SSH host key", e))?;
        }
        match kept {
            Ok(info) => progress.notice(&format!(
                "kept warm snapshot {} for the next VM of image {} with this shape",
                info.name, info.image
            )),
            Err(why) => progress.notice(&format!("no warm snapshot kept: {why}")),
        }
        Ok(())
    }

    /// Gives up warm snapshot `snapshot` for VM `name`, which could not be made from it
    /// (`why`): it is removed, and the VM is to boot, keeping a new one under `key` where it can
    /// (none for a snapshot named with `--from`, or while another create makes one). The caller
    /// holds no lease on the snapshot.
    pub(super) async fn give_up_warm(
        &self,
        snapshot: &SnapshotRow,
        key: Option<WarmKey>,
        name: &str,
        why: &str,
        progress: &Emitter,
    ) -> WarmPlan {
        progress.notice(&format!(
            "warm snapshot {} could not be restored, so it is removed and VM {name} boots cold: {}",
            snapshot.name,
            why.lines().next().unwrap_or_default()
        ));
        self.remove_snapshot(&snapshot.name).await;
        key.and_then(|k| {
            self.warming
                .claim(&slot(&snapshot.image, &snapshot.vmm, snapshot.spec), ())
                .map(|claim| WarmPlan::Keep(k, claim))
        })
        .unwrap_or(WarmPlan::Off)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> WarmKey {
        WarmKey {
            image: "img 2026 sha256:a".into(),
            kernel: "k sha256:b -".into(),
            agent: "c".into(),
            vmm: "qemu Tcg /usr/bin/qemu 1 2.3".into(),
            boot: "format 1: console=ttyS0".into(),
        }
    }

    #[test]
    fn a_key_says_each_part_that_changed_and_round_trips_through_its_record() {
        let k = key();
        assert!(k.changes(&k).is_empty());
        let other = WarmKey {
            agent: "d".into(),
            vmm: "qemu Kvm /usr/bin/qemu 1 2.3".into(),
            ..key()
        };
        assert_eq!(k.changes(&other), ["the guest agent", "the VMM"]);
        assert_eq!(
            join_words(&k.changes(&other)),
            "the guest agent and the VMM"
        );
        assert_eq!(join_words(&["a", "b", "c"]), "a, b and c");
        assert_eq!(join_words(&["a"]), "a");
        let back: WarmKey = serde_json::from_str(&k.to_json()).unwrap();
        assert_eq!(back, k);
    }

    #[test]
    fn the_agent_digest_is_the_files_and_follows_a_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("banger-agent");
        std::fs::write(&path, b"one").unwrap();
        let digests = AgentDigest::default();
        let first = digests.get(&path).unwrap();
        assert_eq!(first, hex::encode(Sha256::digest(b"one")));
        assert_eq!(digests.get(&path).unwrap(), first);
        std::fs::write(&path, b"two!").unwrap();
        assert_eq!(
            digests.get(&path).unwrap(),
            hex::encode(Sha256::digest(b"two!"))
        );
    }
}
