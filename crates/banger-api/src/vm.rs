//! VM requests and responses: the lifecycle commands (`vm create`, `start`, `stop`, ...) and
//! command execution through the guest agent.

use serde::{Deserialize, Serialize};

/// Lifecycle states. `creating` covers disk preparation and the first boot; a VM whose VMM
/// exits without being asked to becomes `failed` (or `stopped` if the guest powered off).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Creating,
    Running,
    Stopping,
    Stopped,
    Failed,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Creating => "creating",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "creating" => VmState::Creating,
            "running" => VmState::Running,
            "stopping" => VmState::Stopping,
            "stopped" => VmState::Stopped,
            "failed" => VmState::Failed,
            _ => return None,
        })
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The resources of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub vcpu: u32,
    pub memory_mib: u32,
    /// Size of the work disk mounted at `/root`, in bytes.
    pub disk_bytes: u64,
}

/// A file or directory copied onto the work disk at create time (already validated and
/// resolved by the CLI: `host` absolute, `guest` absolute under `/root`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncEntry {
    pub host: String,
    pub guest: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

/// `POST /v1/vms` (streamed)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateVmRequest {
    /// DNS label; generated (adjective-noun) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub image: String,
    pub spec: VmSpec,
    /// Boot it after creating it.
    #[serde(default = "yes")]
    pub start: bool,
    #[serde(default)]
    pub file_sync: Vec<SyncEntry>,
}

fn yes() -> bool {
    true
}

/// A VM as `vm list` and `vm show` report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub name: String,
    pub state: VmState,
    pub image: String,
    pub kernel: String,
    pub spec: VmSpec,
    pub ip: String,
    pub mac: String,
    pub tap: String,
    /// VMM backend of the current or last run (`qemu`, `firecracker`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    pub created_at: String,
    pub console_log: String,
    pub dir: String,
    /// Why the VM is `failed`, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// `POST /v1/vms/{name}/stop`
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopVmRequest {
    /// Kill the VMM at once instead of asking the guest to power off.
    #[serde(default)]
    pub force: bool,
}

/// `DELETE /v1/vms/{name}?force=true`
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteVmQuery {
    #[serde(default)]
    pub force: bool,
}

/// `POST /v1/vms/{name}/exec` (streamed): runs a command through the guest agent.
///
/// The stream starts with [`ExecEvent::Started`], naming a session. With `stdin` set, the command's
/// stdin stays open until the caller streams it with `POST /v1/vms/{name}/exec/{session}/stdin`
/// (raw body; its end closes stdin); otherwise it is closed at once. `POST
/// /v1/vms/{name}/exec/{session}/signal` with [`ExecSignal`] signals the command's process group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stdin: bool,
}

/// `POST /v1/vms/{name}/exec/{session}/signal`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSignal {
    /// A signal number, e.g. 2 for SIGINT.
    pub signal: i32,
}

/// Events of an exec stream (carried as `Event::Log` lines would lose bytes, so exec has its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ExecEvent {
    /// The command runs; `session` names it for the stdin and signal calls.
    Started {
        session: String,
    },
    /// Base64 bytes of the command's stdout.
    Stdout {
        data: String,
    },
    Stderr {
        data: String,
    },
    /// The command ended; `code` is its exit status, or 128+signal when killed.
    Exit {
        code: i32,
    },
    /// The command could not be run or the agent was lost.
    Failed {
        error: crate::ApiError,
    },
}

/// `GET /v1/vms/{name}/ssh`: what the CLI needs to open an OpenSSH session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshTarget {
    pub name: String,
    pub ip: String,
    pub user: String,
    pub identity_file: String,
    pub known_hosts: String,
    pub host_key_alias: String,
}
