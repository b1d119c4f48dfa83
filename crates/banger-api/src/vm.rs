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
    /// The guest may reach every service on the host (`--host-access`), not only its DNS.
    #[serde(default)]
    pub host_access: bool,
    /// Names the guest may reach beyond the host (`--allow-host`): its egress becomes an
    /// allow-list of these (and the config's list, if it has one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_hosts: Vec<String>,
    /// Nothing beyond the host, and no other guest (`--no-network`).
    #[serde(default)]
    pub no_network: bool,
    /// Make the VM from this snapshot (`--from`): its image, shape, memory and disks, running
    /// at once, with an identity of its own. `image` and `spec` are then the snapshot's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Boot the image (`--cold`), even where a warm snapshot of it could be restored; no warm
    /// snapshot is made either.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cold: bool,
}

/// Where a VM may send traffic beyond the host, as `vm show` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressInfo {
    /// `open`, `deny` (nothing beyond the host), `allow` (only `hosts`) or `none`
    /// (`--no-network`: not even other guests).
    pub mode: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
}

impl Default for EgressInfo {
    fn default() -> Self {
        EgressInfo {
            mode: "open".into(),
            hosts: Vec::new(),
        }
    }
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
    /// The guest runs sshd. When false, `vm ssh` and interactive sessions go through the agent
    /// (a terminal over `exec` with `tty`). Daemons that predate the field only ran such guests.
    #[serde(default = "yes")]
    pub ssh: bool,
    /// The guest may reach every service on the host, by its own `--host-access` or the
    /// config's `host_access`; otherwise only the host's DNS.
    #[serde(default)]
    pub host_access: bool,
    /// Its egress policy: its own flags combined with the config's `[network] egress`, as the
    /// daemon applies them at the VM's next start.
    #[serde(default)]
    pub egress: EgressInfo,
    /// In the answer to a create that started the VM: the snapshot it was restored from (a
    /// warm start, or `--from`). Absent after a cold boot, and in every other answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_from: Option<String>,
}

/// `POST /v1/vms/{name}/fork` (streamed; answers the new VMs)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkVmRequest {
    /// How many VMs to make.
    pub count: u32,
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
/// (raw body, forwarded as it arrives; its end closes stdin); otherwise it is closed at once.
/// `POST /v1/vms/{name}/exec/{session}/signal` with [`ExecSignal`] signals the command's process
/// group.
///
/// With `tty` the command runs on a terminal of `rows` x `cols` (80x24 where missing): its
/// stdout and stderr arrive merged as `stdout` events, stdin is what the user types (Ctrl-C and
/// Ctrl-D are bytes 0x03 and 0x04; the terminal acts on them), signals go to the terminal's
/// foreground process group, and `POST /v1/vms/{name}/exec/{session}/resize` with
/// [`ExecResize`] changes the window size. An empty `argv` runs the user's login shell.
/// `user` (OCI syntax: `name`, `uid`, `name:group`, `uid:gid`) overrides the image's user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stdin: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tty: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cols: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// `POST /v1/vms/{name}/exec/{session}/signal`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSignal {
    /// A signal number, e.g. 2 for SIGINT.
    pub signal: i32,
}

/// `POST /v1/vms/{name}/exec/{session}/resize`: the caller's terminal changed size (only for
/// sessions started with `tty`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResize {
    pub rows: u16,
    pub cols: u16,
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_plain_exec_request_keeps_its_old_shape() {
        let req = ExecRequest {
            argv: vec!["true".into()],
            cwd: None,
            env: vec![],
            stdin: false,
            tty: false,
            rows: None,
            cols: None,
            user: None,
        };
        assert_eq!(
            serde_json::to_value(&req).unwrap(),
            json!({"argv": ["true"], "env": []})
        );
        let old: ExecRequest = serde_json::from_value(json!({"argv": ["true"]})).unwrap();
        assert_eq!(old, req);
    }

    #[test]
    fn a_terminal_exec_request_round_trips() {
        let req = ExecRequest {
            argv: vec![],
            cwd: Some("/srv".into()),
            env: vec![("TERM".into(), "screen".into())],
            stdin: true,
            tty: true,
            rows: Some(40),
            cols: Some(132),
            user: Some("app:staff".into()),
        };
        let wire = serde_json::to_value(&req).unwrap();
        assert_eq!(
            wire,
            json!({"argv": [], "cwd": "/srv", "env": [["TERM", "screen"]], "stdin": true,
                   "tty": true, "rows": 40, "cols": 132, "user": "app:staff"})
        );
        assert_eq!(serde_json::from_value::<ExecRequest>(wire).unwrap(), req);
    }

    #[test]
    fn resize_is_rows_and_cols_and_refuses_what_a_terminal_cannot_be() {
        let r: ExecResize = serde_json::from_value(json!({"rows": 50, "cols": 200})).unwrap();
        assert_eq!(
            r,
            ExecResize {
                rows: 50,
                cols: 200
            }
        );
        assert_eq!(
            serde_json::to_value(r).unwrap(),
            json!({"rows": 50, "cols": 200})
        );
        assert!(serde_json::from_value::<ExecResize>(json!({"rows": 70000, "cols": 1})).is_err());
        assert!(serde_json::from_value::<ExecResize>(json!({"rows": -1, "cols": 1})).is_err());
        assert!(serde_json::from_value::<ExecResize>(json!({"rows": 1})).is_err());
    }

    fn info_json() -> serde_json::Value {
        json!({
            "name": "dev", "state": "running", "image": "alpine", "kernel": "k",
            "spec": {"vcpu": 1, "memory_mib": 512, "disk_bytes": 1024},
            "ip": "10.0.0.2", "mac": "02:00:00:00:00:02", "tap": "tap0",
            "created_at": "2024-01-01T00:00:00Z", "console_log": "/c", "dir": "/d"
        })
    }

    #[test]
    fn vm_info_from_an_older_daemon_means_the_guest_runs_sshd() {
        let info: VmInfo = serde_json::from_value(info_json()).unwrap();
        assert!(info.ssh);
        let mut without = info_json();
        without["ssh"] = json!(false);
        let info: VmInfo = serde_json::from_value(without).unwrap();
        assert!(!info.ssh);
        assert_eq!(serde_json::to_value(&info).unwrap()["ssh"], json!(false));
    }
}
