//! The guest agent from the host's side: the binary banger puts into guests, and the
//! connection to a running VM's agent (kept while the VM runs, made again after a restart).

use std::path::PathBuf;
use std::time::Duration;

use banger_agent::host::{wait_ready_with, AgentClient, AgentError, Ready};
use banger_api::vm::VmState;
use banger_api::{ApiError, ErrorCode};
use banger_vmm::VmHandle;

use super::{api, Vms};

/// Where the guest agent binary comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentBinary {
    /// The installed one, looked up at every use (so installing a new agent needs no daemon
    /// restart): `BANGER_AGENT_BIN`, else `banger-agent` next to bangerd, else on PATH.
    Installed,
    /// This file.
    At(PathBuf),
}

impl AgentBinary {
    pub(super) fn find(&self) -> Result<PathBuf, ApiError> {
        match self {
            AgentBinary::Installed => installed_agent(),
            AgentBinary::At(p) if p.is_file() => Ok(p.clone()),
            AgentBinary::At(p) => Err(api(
                ErrorCode::MissingTool,
                format!("the guest agent binary {} does not exist", p.display()),
            )),
        }
    }
}

/// The guest agent binary: `BANGER_AGENT_BIN`, else `banger-agent` next to bangerd, else PATH.
fn installed_agent() -> Result<PathBuf, ApiError> {
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
    let on_path = || banger_config::programs::find_program("banger-agent", None, &[]);
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
        let (client, _) = self
            .wait_for_agent(name, &handle, self.timeouts.reconnect)
            .await
            .map_err(|e| {
                crate::hints::failed(
                    ErrorCode::VmmFailed,
                    format!("cannot reach the agent of VM {name}"),
                    &e,
                )
            })?;
        self.agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), client.clone());
        Ok(client)
    }

    /// Connects to the VM's agent through its VMM's channel, and says `hello` until the agent
    /// answers or `timeout` passes (the guest may still be booting).
    pub(super) async fn wait_for_agent(
        &self,
        name: &str,
        handle: &VmHandle,
        timeout: Duration,
    ) -> Result<(AgentClient, Ready), AgentError> {
        let vmm = self.vmms.for_handle(handle);
        wait_ready_with(name, timeout, || async {
            let stream = vmm.connect_agent(handle).await?;
            Ok::<_, banger_vmm::VmmError>(AgentClient::new(name, stream))
        })
        .await
    }
}
