//! Snapshots of running VMs: `vm snapshot` (pause, save memory and devices, copy the disks
//! while the guest is paused, resume), `snapshot list` and `snapshot delete`.
//!
//! A snapshot lives in `STATE/snapshots/NAME/`: the VMM's files (`banger_vmm::SnapshotPaths`:
//! state, memory for Firecracker, the manifest of the VM's shape) and copies of the VM's
//! `root.ext4` and `work.ext4`, reflinked where the file system can, taken while the guest is
//! paused so they agree with its memory. It is made in `.NAME.partial` next to it and renamed
//! into place whole, and its row is written after that: a row always names a complete
//! snapshot, and a crash leaves at most a partial directory, removed at the next start.

use std::path::{Path, PathBuf};

use banger_api::snapshot::SnapshotInfo;
use banger_api::vm::VmState;
use banger_api::{validate_name, ApiError, Deleted, ErrorCode};
use banger_vmm::{SnapshotPaths, VmHandle};

use crate::fsutil;
use crate::server::internal;
use crate::store::{self, SnapshotRow};

use super::{api, Vms};

/// The disks of a VM, as a VM directory and a snapshot directory both name them: the root
/// disk first (the only one a warm snapshot holds).
pub(super) static DISKS: [&str; 2] = ["root.ext4", "work.ext4"];

/// Where snapshot `name` lives: `STATE/snapshots/NAME/`.
pub fn snapshot_dir(paths: &banger_config::Paths, name: &str) -> PathBuf {
    paths.state_dir.join("snapshots").join(name)
}

impl Vms {
    fn snapshots_dir(&self) -> PathBuf {
        self.paths.state_dir.join("snapshots")
    }

    pub(super) fn snapshot_dir(&self, name: &str) -> PathBuf {
        snapshot_dir(&self.paths, name)
    }

    /// Takes a snapshot of running VM `vm`, named `name` (else `VM-N`, the lowest free N).
    pub async fn snapshot(&self, vm: &str, name: Option<String>) -> Result<SnapshotInfo, ApiError> {
        if let Some(n) = &name {
            validate_name("snapshot", n)?;
            if n.starts_with(super::warm::WARM_PREFIX) {
                return Err(api(
                    ErrorCode::BadRequest,
                    format!(
                        "snapshot names starting with {:?} are banger's own (warm snapshots)",
                        super::warm::WARM_PREFIX
                    ),
                )
                .with_hint("pick another --name"));
            }
        }
        let lock = self.lock_for(vm);
        let _guard = lock.lock().await;
        self.take_snapshot(vm, name, None).await
    }

    /// [`Vms::snapshot`], for a caller that holds the VM lock; `warm_key` makes it a warm
    /// snapshot (see [`super::warm`]).
    pub(super) async fn take_snapshot(
        &self,
        vm: &str,
        name: Option<String>,
        warm_key: Option<String>,
    ) -> Result<SnapshotInfo, ApiError> {
        let row = self.row(vm).await?;
        let handle = match (&row.state, row.handle.as_deref()) {
            (VmState::Running, Some(h)) => serde_json::from_str::<VmHandle>(h)
                .map_err(|e| internal(anyhow::anyhow!("VM {vm}: unreadable VMM handle: {e}")))?,
            _ => {
                return Err(api(
                    ErrorCode::InvalidState,
                    format!(
                        "VM {vm} is {}: only a running VM can be snapshotted",
                        row.state
                    ),
                )
                .with_hint(format!("start it first: `banger vm start {vm}`")))
            }
        };
        let existing = self
            .store
            .call(|c| store::list_snapshots(c))
            .await
            .map_err(internal)?;
        let name = match name {
            Some(n) if existing.iter().any(|s| s.name == n) => {
                return Err(api(
                    ErrorCode::AlreadyExists,
                    format!("a snapshot named {n:?} already exists"),
                )
                .with_hint("pick another --name, or delete it with `banger snapshot delete`"))
            }
            Some(n) => n,
            // At most as many tries as there are snapshots, plus one.
            None => (1..=existing.len() + 1)
                .map(|i| format!("{vm}-{i}"))
                .find(|n| !existing.iter().any(|s| &s.name == n))
                .unwrap_or_else(|| format!("{vm}-{}", existing.len() + 1)),
        };
        let dir = self.snapshot_dir(&name);
        if dir.exists() {
            return Err(api(
                ErrorCode::AlreadyExists,
                format!(
                    "{} exists although no snapshot {name:?} is recorded",
                    dir.display()
                ),
            )
            .with_hint("remove that directory, or pick another --name"));
        }
        let partial = self.snapshots_dir().join(format!(".{name}.partial"));
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial)
            .map_err(|e| internal(anyhow::anyhow!("cannot create {}: {e}", partial.display())))?;
        let cleanup = RemoveOnDrop(Some(partial.clone()));

        let paths = SnapshotPaths::new(&partial);
        let vm_dir = self.vm_dir(vm);
        let copy_into = partial.clone();
        // A warm snapshot's guest has its work disk unmounted: each VM made from it brings its
        // own, so there is none to keep.
        let disks: &'static [&'static str] = match warm_key {
            Some(_) => &DISKS[..1],
            None => &DISKS,
        };
        let while_paused: banger_vmm::WhilePaused<'_> = Box::pin(async move {
            tokio::task::spawn_blocking(move || copy_disks(&vm_dir, &copy_into, disks))
                .await
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?
                .map_err(|e| e.into())
        });
        let vmm = self.vmms.for_handle(&handle);
        let taken = vmm
            .snapshot(&handle, &paths, while_paused)
            .await
            .map_err(|e| {
                crate::hints::failed(ErrorCode::VmmFailed, format!("cannot snapshot VM {vm}"), &e)
            })?;
        std::fs::rename(&partial, &dir).map_err(|e| {
            internal(anyhow::anyhow!(
                "cannot move the snapshot into {}: {e}",
                dir.display()
            ))
        })?;
        drop(cleanup.disarm());
        let snapshot = SnapshotRow {
            name: name.clone(),
            vm: vm.to_owned(),
            image: row.image.clone(),
            kernel: row.kernel.clone(),
            boot: row.boot,
            vmm: handle.backend.as_str().to_owned(),
            spec: row.spec,
            bytes: dir_bytes(&dir),
            created_at: crate::now_rfc3339(),
            warm_key,
        };
        let insert = snapshot.clone();
        if let Err(e) = self
            .store
            .call(move |c| store::insert_snapshot(c, &insert))
            .await
        {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(internal(e));
        }
        tracing::info!(
            vm,
            snapshot = %name,
            state_bytes = taken.state_bytes,
            paused_ms = taken.paused.as_millis() as u64,
            "snapshot taken"
        );
        Ok(self.snapshot_info(&snapshot))
    }

    pub async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, ApiError> {
        let rows = self
            .store
            .call(|c| store::list_snapshots(c))
            .await
            .map_err(internal)?;
        Ok(rows.iter().map(|r| self.snapshot_info(r)).collect())
    }

    /// The snapshot's row, or a NotFound that lists the ones there are.
    pub(super) async fn snapshot_row(&self, name: &str) -> Result<SnapshotRow, ApiError> {
        let n = name.to_owned();
        let (row, all) = self
            .store
            .call(move |c| Ok((store::get_snapshot(c, &n)?, store::list_snapshots(c)?)))
            .await
            .map_err(internal)?;
        row.ok_or_else(|| {
            let names: Vec<String> = all.into_iter().map(|s| s.name).collect();
            api(ErrorCode::NotFound, format!("no snapshot named {name:?}")).with_hint(
                if names.is_empty() {
                    "there are no snapshots; take one with `banger vm snapshot VM`".to_owned()
                } else {
                    format!("snapshots: {}", names.join(", "))
                },
            )
        })
    }

    pub async fn delete_snapshot(&self, name: &str) -> Result<Deleted, ApiError> {
        // Not while a VM is being made from it.
        let _lease = self.snapshot_leases.write(name).await;
        let row = self.snapshot_row(name).await?;
        let n = row.name.clone();
        self.store
            .call(move |c| store::delete_snapshot(c, &n))
            .await
            .map_err(internal)?;
        let dir = self.snapshot_dir(&row.name);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("cannot remove {}: {e}", dir.display());
            }
        }
        Ok(Deleted { name: row.name })
    }

    /// Removes what a snapshot interrupted by a crash left (`.NAME.partial`), snapshot
    /// directories no row names, and warm snapshots of images that are gone. Called at
    /// start-up.
    pub(super) async fn sweep_snapshots(&self) {
        let Ok((rows, images)) = self
            .store
            .call(|c| Ok((store::list_snapshots(c)?, store::list_images(c)?)))
            .await
        else {
            return;
        };
        for row in &rows {
            if row.warm_key.is_some() && !images.iter().any(|i| i.name == row.image) {
                tracing::info!(snapshot = %row.name, image = %row.image, "removing a warm snapshot of an image that is gone");
                self.remove_snapshot(&row.name).await;
            }
        }
        let Ok(entries) = std::fs::read_dir(self.snapshots_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if rows.iter().any(|r| r.name == name) {
                continue;
            }
            tracing::info!(path = %entry.path().display(), "removing a snapshot left unfinished");
            if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                tracing::warn!("cannot remove {}: {e}", entry.path().display());
            }
        }
    }

    fn snapshot_info(&self, row: &SnapshotRow) -> SnapshotInfo {
        SnapshotInfo {
            name: row.name.clone(),
            vm: row.vm.clone(),
            image: row.image.clone(),
            kernel: row.kernel.clone(),
            vmm: row.vmm.clone(),
            spec: row.spec,
            created_at: row.created_at.clone(),
            bytes: row.bytes,
            dir: self.snapshot_dir(&row.name).display().to_string(),
            warm: row.warm_key.is_some(),
        }
    }
}

/// Copies the VM's `disks` into the snapshot (reflinks where the file system can).
fn copy_disks(vm_dir: &Path, into: &Path, disks: &[&str]) -> anyhow::Result<()> {
    for disk in disks {
        fsutil::clone_file(&vm_dir.join(disk), &into.join(disk))?;
    }
    Ok(())
}

/// Bytes the files in `dir` take on disk, as `du` counts them: holes in sparse disk copies
/// take none, blocks a reflinked copy shares with its source count for each.
fn dir_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

/// Removes a directory when dropped, unless disarmed: an unfinished snapshot never stays.
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn disarm(mut self) -> Self {
        self.0 = None;
        self
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
