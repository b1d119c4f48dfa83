//! The guest agent from the host's side: the binary banger puts into guests, and the
//! connection to a running VM's agent (kept while the VM runs, made again after a restart).

use std::path::PathBuf;
use std::time::Duration;

use banger_agent::host::{AgentClient, Endpoint};
use banger_api::vm::VmState;
use banger_api::{ApiError, ErrorCode};
use banger_vmm::{AgentEndpoint, VmHandle};

use super::{api, Vms};

pub(super) fn agent_endpoint(e: &AgentEndpoint) -> Result<Endpoint, ApiError> {
    match e {
        AgentEndpoint::VirtioSerial { socket } => Ok(Endpoint::VirtioSerial {
            socket: socket.clone(),
        }),
        AgentEndpoint::FirecrackerVsock { uds, port } => Ok(Endpoint::FirecrackerVsock {
            uds: uds.clone(),
            port: *port,
        }),
        AgentEndpoint::Vsock { .. } => Err(api(
            ErrorCode::Internal,
            "host vsock agent channels are not supported by this banger",
        )),
    }
}

/// The guest agent binary: `BANGER_AGENT_BIN`, else `banger-agent` next to bangerd, else PATH.
pub(super) fn agent_binary() -> Result<PathBuf, ApiError> {
    if let Some(p) = std::env::var_os("BANGER_AGENT_BIN") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        return Err(api(
            ErrorCode::MissingTool,
            format!("BANGER_AGENT_BIN={} does not exist", p.display()),
        ));
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("banger-agent")))
        .filter(|p| p.is_file());
    let on_path = || {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join("banger-agent"))
                .find(|p| p.is_file())
        })
    };
    beside.or_else(on_path).ok_or_else(|| {
        api(ErrorCode::MissingTool, "the guest agent binary banger-agent is not installed")
            .with_hint("install banger with `make install` (it builds the static agent), or set BANGER_AGENT_BIN")
    })
}

impl Vms {
    pub(super) fn forget_agent(&self, name: &str) {
        self.agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }

    /// The agent connection of a running VM, reconnecting if the daemon restarted.
    pub(super) async fn agent(&self, name: &str) -> Result<AgentClient, ApiError> {
        if let Some(c) = self
            .agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
        {
            return Ok(c);
        }
        let row = self.row(name).await?;
        let handle = row
            .handle
            .as_deref()
            .and_then(|h| serde_json::from_str::<VmHandle>(h).ok())
            .filter(|_| row.state == VmState::Running)
            .ok_or_else(|| {
                api(
                    ErrorCode::InvalidState,
                    format!("VM {name} is {}, not running", row.state),
                )
                .with_hint(format!("start it with `banger vm start {name}`"))
            })?;
        let endpoint = agent_endpoint(&handle.agent)?;
        let (client, _) = banger_agent::host::wait_ready(name, &endpoint, Duration::from_secs(20))
            .await
            .map_err(|e| {
                api(
                    ErrorCode::VmmFailed,
                    format!("cannot reach the agent of VM {name}: {e}"),
                )
            })?;
        self.agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), client.clone());
        Ok(client)
    }
}
