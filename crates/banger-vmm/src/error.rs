//! The crate's public error type. Each variant says what failed and on which VM, binary or path;
//! the underlying cause sits in `source()` and is never repeated in the message, so a caller
//! prints the chain once ([`VmmError::report`] does exactly that). What the user can do about it
//! comes from its [`Hint`] (listed in [`crate::HINTS`]).

use std::borrow::Cow;
use std::path::PathBuf;
use std::time::Duration;

use banger_hint::{Hint, Report};

use crate::firecracker::ApiError;
use crate::process::ProcessError;
use crate::qemu::QmpError;
use crate::snapshot::ManifestError;
use crate::BackendKind;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{binary} not found ({searched}); {install}")]
    BinaryNotFound {
        backend: BackendKind,
        binary: String,
        searched: String,
        /// Where to get it, e.g. the Debian package.
        install: String,
    },

    #[error("/dev/kvm is unusable for Firecracker: {reason}")]
    KvmUnusable { reason: String },

    #[error("VM {vm}: {what} {path} does not exist")]
    MissingInput {
        vm: String,
        what: &'static str,
        path: PathBuf,
    },

    #[error("VM {vm}: invalid configuration: {reason}")]
    InvalidConfig { vm: String, reason: String },

    #[error("VM {vm}: {action}")]
    Io {
        vm: String,
        action: String,
        #[source]
        source: std::io::Error,
    },

    #[error("VM {vm}: cannot start {binary}")]
    Spawn {
        vm: String,
        binary: PathBuf,
        #[source]
        source: ProcessError,
    },

    #[error("VM {vm}: {backend} exited during start-up ({status}){logs}")]
    ExitedDuringStart {
        vm: String,
        backend: BackendKind,
        status: String,
        /// The last lines of the VMM's own log and of the serial console, already formatted.
        logs: String,
    },

    #[error("VM {vm}: {backend} did not answer on {socket} within {waited:?}{logs}")]
    NotReady {
        vm: String,
        backend: BackendKind,
        socket: PathBuf,
        waited: Duration,
        logs: String,
    },

    #[error("VM {vm}: Firecracker API request failed while {step}")]
    Api {
        vm: String,
        step: &'static str,
        #[source]
        source: ApiError,
    },

    #[error("VM {vm}: QMP request failed while {step}")]
    Qmp {
        vm: String,
        step: &'static str,
        #[source]
        source: QmpError,
    },

    #[error("VM {vm}: cannot stop VMM process {pid}")]
    Stop {
        vm: String,
        pid: i32,
        #[source]
        source: ProcessError,
    },

    #[error("VM {vm}: VMM process {pid} still exists {waited:?} after SIGKILL")]
    StillRunning {
        vm: String,
        pid: i32,
        waited: Duration,
    },

    #[error("cannot connect to the guest agent at {endpoint}")]
    AgentConnect {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },

    #[error("guest agent at {endpoint}: the vsock bridge refused CONNECT (reply {reply:?})")]
    AgentHandshake { endpoint: String, reply: String },

    #[error("VM {vm}: snapshot {manifest} does not fit this VM: {reason}")]
    SnapshotMismatch {
        vm: String,
        manifest: PathBuf,
        reason: String,
    },

    #[error("VM {vm}: snapshot manifest {path} is unusable")]
    SnapshotManifest {
        vm: String,
        path: PathBuf,
        #[source]
        source: ManifestError,
    },

    /// The VMM said why (QEMU's migration `error-desc`, say); the guest was resumed.
    #[error("VM {vm}: saving its state to {path} failed: {reason}")]
    SaveState {
        vm: String,
        path: PathBuf,
        reason: String,
    },

    #[error("VM {vm}: loading its state from {path} failed: {reason}{logs}")]
    LoadState {
        vm: String,
        path: PathBuf,
        reason: String,
        /// The last lines of the VMM's own log, already formatted.
        logs: String,
    },

    #[error("VM {vm}: the caller's work while the VM was paused for a snapshot failed")]
    WhilePaused {
        vm: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The worst outcome of a snapshot: the guest stays paused.
    #[error("VM {vm}: cannot resume the guest after a snapshot; it is left paused")]
    NotResumed {
        vm: String,
        #[source]
        source: Box<VmmError>,
    },
}

impl Hint for VmmError {
    fn hint(&self) -> Option<Cow<'_, str>> {
        match self {
            VmmError::BinaryNotFound { backend, .. } => Some(backend.install_hint().into()),
            VmmError::KvmUnusable { .. } => {
                Some("use vmm = \"qemu\" or \"auto\": QEMU falls back to TCG".into())
            }
            VmmError::MissingInput { what, .. } if *what == "run directory" => {
                Some("the caller must create the VM's run directory before start".into())
            }
            VmmError::ExitedDuringStart { .. } | VmmError::NotReady { .. } => Some(
                "the VMM's own log and the serial console above say why; see also `banger vm logs`"
                    .into(),
            ),
            VmmError::StillRunning { .. } => Some(
                "the process is likely stuck in the kernel (state D); check `cat /proc/PID/stack`"
                    .into(),
            ),
            VmmError::AgentConnect { .. } | VmmError::AgentHandshake { .. } => {
                Some("the guest agent may not be up yet; retry after the VM reports ready".into())
            }
            VmmError::SnapshotMismatch { .. } => Some(
                "restore it into a VM of the snapshot's shape, or boot this VM without the snapshot"
                    .into(),
            ),
            VmmError::SnapshotManifest { .. } => {
                Some("the snapshot is incomplete or damaged: take it again".into())
            }
            VmmError::SaveState { .. } => Some(
                "check free space and permissions where the snapshot is written; the VM runs on"
                    .into(),
            ),
            VmmError::LoadState { .. } => Some(
                "the snapshot may be damaged or from another VMM version: take it again or boot cold"
                    .into(),
            ),
            VmmError::NotResumed { .. } => {
                Some("stop the VM and start it again to get it running".into())
            }
            _ => None,
        }
    }
}

impl VmmError {
    /// The message, its chain of causes (`: `-separated) and a `hint:` line per hint.
    pub fn report(&self) -> String {
        Report::new(self, &[crate::HINTS]).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_lists_the_causes_then_the_hint() {
        let err = VmmError::AgentConnect {
            endpoint: "virtio-serial socket /run/a.sock".into(),
            source: std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"),
        };
        assert_eq!(
            err.report(),
            "cannot connect to the guest agent at virtio-serial socket /run/a.sock: refused\n\
             hint: the guest agent may not be up yet; retry after the VM reports ready"
        );
        assert!(!err.to_string().contains("hint"), "{err}");
    }
}
