//! The crate's public error type. Each variant says what failed and on which VM, binary or path;
//! the underlying cause sits in `source()` and is never repeated in the message, so a caller
//! prints the chain once ([`VmmError::report`] does exactly that). What the user can do about it
//! comes from [`VmmError::hint`].

use std::path::PathBuf;
use std::time::Duration;

use crate::firecracker::ApiError;
use crate::process::ProcessError;
use crate::qemu::QmpError;
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
}

impl VmmError {
    /// What the user can do about this error, when there is something to say.
    pub fn hint(&self) -> Option<String> {
        match self {
            VmmError::BinaryNotFound { backend, .. } => Some(backend.install_hint().to_string()),
            VmmError::KvmUnusable { .. } => {
                Some("use vmm = \"qemu\" or \"auto\": QEMU falls back to TCG".to_string())
            }
            VmmError::MissingInput { what, .. } if *what == "run directory" => {
                Some("the caller must create the VM's run directory before start".to_string())
            }
            VmmError::ExitedDuringStart { .. } | VmmError::NotReady { .. } => Some(
                "the VMM's own log and the serial console above say why; see also `banger vm logs`"
                    .to_string(),
            ),
            VmmError::StillRunning { .. } => Some(
                "the process is likely stuck in the kernel (state D); check `cat /proc/PID/stack`"
                    .to_string(),
            ),
            VmmError::AgentConnect { .. } | VmmError::AgentHandshake { .. } => {
                Some("the guest agent may not be up yet; retry after the VM reports ready".into())
            }
            _ => None,
        }
    }

    /// The message, its chain of causes (`: `-separated) and a final `hint:` line if any.
    pub fn report(&self) -> String {
        let mut out = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            out.push_str(": ");
            out.push_str(&c.to_string());
            cause = c.source();
        }
        if let Some(hint) = self.hint() {
            out.push_str("\nhint: ");
            out.push_str(&hint);
        }
        out
    }
}
