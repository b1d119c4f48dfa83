//! What every backend shares about VM snapshots: where a snapshot's files go
//! ([`SnapshotPaths`]), what a snapshot reports ([`SnapshotInfo`]), the caller's work done while
//! the guest is paused ([`WhilePaused`]), and the manifest that records the shape of the VM a
//! state was saved from, so a restore into another shape is refused before a VMM is started.
//!
//! The order of a snapshot is fixed by [`crate::Vmm::snapshot`], not by its caller: pause, save
//! the VMM's state, run the caller's [`WhilePaused`] future (copying the disks), write the
//! manifest, resume. A future does nothing until it is polled, so the caller cannot run its copy
//! before the pause or after the resume by mistake, and the guest is resumed whatever failed.
//! The manifest is written last, through a temporary file and a rename: a snapshot directory
//! without one is incomplete and never restored.
//!
//! It leaves to the backends how state is saved and loaded, and to the caller the directory
//! itself and the disks in it.

use std::error::Error as StdError;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::{BackendKind, BoxFuture, VmmError};

/// The caller's work while the guest is paused (copying its disks, typically). Polled once,
/// after the VMM's state is saved and before the guest is resumed.
pub type WhilePaused<'a> = BoxFuture<'a, Result<(), Box<dyn StdError + Send + Sync>>>;

/// The manifest's format; a manifest of another format is refused.
const FORMAT: u32 = 1;

/// The files of one snapshot in a directory the caller owns (it must exist). A backend writes
/// [`SnapshotPaths::state`], for Firecracker also [`SnapshotPaths::memory`], and the manifest;
/// the caller puts whatever else it keeps (disk copies) next to them under other names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotPaths {
    dir: PathBuf,
}

impl SnapshotPaths {
    pub fn new(dir: impl Into<PathBuf>) -> SnapshotPaths {
        SnapshotPaths { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The VMM's device state (QEMU: devices and memory in one migration stream).
    pub fn state(&self) -> PathBuf {
        self.dir.join("vm.state")
    }

    /// Guest memory, for a backend that keeps it apart from the state (Firecracker).
    pub fn memory(&self) -> PathBuf {
        self.dir.join("vm.mem")
    }

    /// The shape of the snapshotted VM; its presence marks a complete snapshot.
    pub fn manifest(&self) -> PathBuf {
        self.dir.join("vm-snapshot.json")
    }
}

/// What a snapshot took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Bytes of the files the VMM wrote (state, and memory where it is separate).
    pub state_bytes: u64,
    /// From the pause until the state was saved.
    pub saving: Duration,
    /// From the pause until the guest was resumed (saving plus the caller's work).
    pub paused: Duration,
}

/// The VM a state can be loaded into: a VMM loads a state only into a machine identical to the
/// one it was saved from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shape {
    pub backend: BackendKind,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Whether the VM has its network interface.
    pub network: bool,
    /// The rest of the device layout as the backend describes it (QEMU: accelerator and agent
    /// channel), compared as text.
    pub layout: String,
}

impl Shape {
    /// Fails, saying every difference, when a state of shape `self` cannot be loaded into `vm`.
    pub(crate) fn require_equal(
        &self,
        vm_shape: &Shape,
        vm: &str,
        manifest: &Path,
    ) -> Result<(), VmmError> {
        let mut diffs = Vec::new();
        if self.backend != vm_shape.backend {
            diffs.push(format!(
                "it was taken with {}, this VM runs on {}",
                self.backend, vm_shape.backend
            ));
        }
        if (self.vcpus, self.memory_mib) != (vm_shape.vcpus, vm_shape.memory_mib) {
            diffs.push(format!(
                "it has {} vCPUs and {} MiB of memory, this VM {} vCPUs and {} MiB",
                self.vcpus, self.memory_mib, vm_shape.vcpus, vm_shape.memory_mib
            ));
        }
        let nic = |yes| {
            if yes {
                "a network interface"
            } else {
                "no network interface"
            }
        };
        if self.network != vm_shape.network {
            diffs.push(format!(
                "it has {}, this VM {}",
                nic(self.network),
                nic(vm_shape.network)
            ));
        }
        if self.layout != vm_shape.layout {
            diffs.push(format!(
                "its devices are {:?}, this VM's {:?}",
                self.layout, vm_shape.layout
            ));
        }
        if diffs.is_empty() {
            return Ok(());
        }
        Err(VmmError::SnapshotMismatch {
            vm: vm.to_string(),
            manifest: manifest.to_path_buf(),
            reason: diffs.join("; "),
        })
    }
}

/// `vm-snapshot.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub shape: Shape,
    pub state_bytes: u64,
}

/// Why a manifest could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read it")]
    Read(#[source] std::io::Error),
    #[error("it is not a snapshot manifest")]
    Parse(#[source] serde_json::Error),
    #[error("it has format {0}, this banger reads format {FORMAT}")]
    Format(u32),
}

impl Manifest {
    pub(crate) fn new(shape: Shape, state_bytes: u64) -> Manifest {
        Manifest {
            format: FORMAT,
            shape,
            state_bytes,
        }
    }

    /// Reads the manifest of `paths` for a restore of `vm`.
    pub fn read(paths: &SnapshotPaths, vm: &str) -> Result<Manifest, VmmError> {
        let path = paths.manifest();
        let fail = |source| VmmError::SnapshotManifest {
            vm: vm.to_string(),
            path: path.clone(),
            source,
        };
        let text = fs_err::read(&path).map_err(|e| fail(ManifestError::Read(e)))?;
        let manifest: Manifest =
            serde_json::from_slice(&text).map_err(|e| fail(ManifestError::Parse(e)))?;
        if manifest.format != FORMAT {
            return Err(fail(ManifestError::Format(manifest.format)));
        }
        Ok(manifest)
    }

    /// Writes it durably: a temporary file, fsync, rename, fsync of the directory.
    pub(crate) fn write(&self, paths: &SnapshotPaths, vm: &str) -> Result<(), VmmError> {
        let path = paths.manifest();
        let tmp = paths.dir().join(".vm-snapshot.json.tmp");
        let io = |source| VmmError::Io {
            vm: vm.to_string(),
            action: format!("cannot write snapshot manifest {}", path.display()),
            source,
        };
        let json = serde_json::to_vec_pretty(self).map_err(|e| io(std::io::Error::other(e)))?;
        let mut f = fs_err::File::create(&tmp).map_err(io)?;
        f.write_all(&json).map_err(io)?;
        f.sync_all().map_err(io)?;
        fs_err::rename(&tmp, &path).map_err(io)?;
        fs_err::File::open(paths.dir())
            .and_then(|d| d.sync_all())
            .map_err(io)
    }
}

/// What every backend does once the VMM has saved the state into `files`, while the guest is
/// still paused: makes the files durable, runs the caller's work, writes the manifest. Returns
/// the time since the pause when the state was saved, and the files' total size.
pub(crate) async fn after_save(
    vm: &str,
    dest: &SnapshotPaths,
    files: &[PathBuf],
    shape: Shape,
    paused_at: Instant,
    while_paused: WhilePaused<'_>,
) -> Result<(Duration, u64), VmmError> {
    let mut state_bytes = 0;
    for f in files {
        let io = |source| VmmError::Io {
            vm: vm.to_string(),
            action: format!("cannot flush the saved state {}", f.display()),
            source,
        };
        // fsync through a read-only descriptor flushes the file all the same on Linux.
        let file = fs_err::File::open(f).map_err(io)?;
        file.sync_all().map_err(io)?;
        state_bytes += file.metadata().map_err(io)?.len();
    }
    let saving = paused_at.elapsed();
    while_paused.await.map_err(|source| VmmError::WhilePaused {
        vm: vm.to_string(),
        source,
    })?;
    Manifest::new(shape, state_bytes).write(dest, vm)?;
    Ok((saving, state_bytes))
}

/// The end of every backend's snapshot, once it tried to resume the guest: the report, or the
/// error (a guest left paused is the worse one) with the snapshot's files removed.
pub(crate) fn conclude(
    vm: &str,
    dest: &SnapshotPaths,
    saved: Result<(Duration, u64), VmmError>,
    resumed: Result<(), VmmError>,
    paused_at: Instant,
) -> Result<SnapshotInfo, VmmError> {
    let paused = paused_at.elapsed();
    match (saved, resumed) {
        (Ok((saving, state_bytes)), Ok(())) => {
            tracing::info!(vm, state_bytes, ?saving, ?paused, "snapshot taken");
            Ok(SnapshotInfo {
                state_bytes,
                saving,
                paused,
            })
        }
        (Err(e), Ok(())) => {
            remove_partial(dest, vm);
            Err(e)
        }
        (saved, Err(source)) => {
            remove_partial(dest, vm);
            if let Err(e) = saved {
                tracing::warn!(vm, error = %e.report(), "snapshot failed");
            }
            Err(VmmError::NotResumed {
                vm: vm.to_string(),
                source: Box::new(source),
            })
        }
    }
}

/// Removes what a failed snapshot wrote (a missing file is fine); failures are logged, since
/// the snapshot's own error is the one to report.
pub(crate) fn remove_partial(paths: &SnapshotPaths, vm: &str) {
    for f in [paths.state(), paths.memory(), paths.manifest()] {
        if let Err(e) = crate::process::remove_stale(&f) {
            tracing::warn!(vm, error = %e, "cannot remove a failed snapshot's file");
        }
    }
}

/// Fails, naming the file, when the snapshot's own files are already there: a snapshot never
/// overwrites another.
pub(crate) fn require_fresh(paths: &SnapshotPaths, vm: &str) -> Result<(), VmmError> {
    for f in [paths.state(), paths.memory(), paths.manifest()] {
        if f.exists() {
            return Err(VmmError::Io {
                vm: vm.to_string(),
                action: format!("cannot write a snapshot to {}", f.display()),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "a snapshot is already there",
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> Shape {
        Shape {
            backend: BackendKind::Qemu,
            vcpus: 1,
            memory_mib: 64,
            network: true,
            layout: "accel=tcg agent=virtio-serial".into(),
        }
    }

    #[test]
    fn a_manifest_round_trips_and_a_damaged_or_foreign_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let paths = SnapshotPaths::new(dir.path());
        let m = Manifest::new(shape(), 4096);
        m.write(&paths, "a").unwrap();
        assert_eq!(Manifest::read(&paths, "a").unwrap(), m);
        assert!(!dir.path().join(".vm-snapshot.json.tmp").exists());

        std::fs::write(paths.manifest(), r#"{"format": 2}"#).unwrap();
        let err = Manifest::read(&paths, "a").unwrap_err();
        assert!(
            err.report().contains("not a snapshot manifest"),
            "{}",
            err.report()
        );
        let mut v = serde_json::to_value(&m).unwrap();
        v["format"] = 7.into();
        std::fs::write(paths.manifest(), v.to_string()).unwrap();
        let report = Manifest::read(&paths, "a").unwrap_err().report();
        assert!(
            report.contains("it has format 7, this banger reads format 1"),
            "{report}"
        );
        assert!(report.contains("hint: "), "{report}");
    }

    #[test]
    fn another_shape_is_refused_with_every_difference() {
        let mut other = shape();
        other.vcpus = 2;
        other.memory_mib = 128;
        other.network = false;
        let err = shape()
            .require_equal(&other, "b", Path::new("/s/vm-snapshot.json"))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "VM b: snapshot /s/vm-snapshot.json does not fit this VM: it has 1 vCPUs and 64 MiB \
             of memory, this VM 2 vCPUs and 128 MiB; it has a network interface, this VM no \
             network interface"
        );
        assert!(shape()
            .require_equal(&shape(), "b", Path::new("/m"))
            .is_ok());
    }
}
