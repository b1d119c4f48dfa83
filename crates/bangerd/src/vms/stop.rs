//! Stopping a VM: the agent's power-off first, then the VMM's own request (ACPI or
//! Ctrl-Alt-Del), then a kill after the grace period; the row is `stopped` and the network
//! released once the VMM is gone.

use std::time::Duration;

use banger_api::vm::{VmInfo, VmState};
use banger_api::{ApiError, ErrorCode};
use banger_vmm::VmHandle;

use super::Vms;

impl Vms {
    pub async fn stop(&self, name: &str, force: bool) -> Result<VmInfo, ApiError> {
        let lock = self.lock_for(name);
        let _guard = lock.lock().await;
        self.stop_locked(name, force).await?;
        self.show(name).await
    }

    pub(super) async fn stop_locked(&self, name: &str, force: bool) -> Result<(), ApiError> {
        let row = self.row(name).await?;
        let Some(handle) = row
            .handle
            .as_deref()
            .and_then(|h| serde_json::from_str::<VmHandle>(h).ok())
        else {
            if row.state != VmState::Stopped {
                self.set_state(name, VmState::Stopped, None, None, None)
                    .await?;
            }
            return Ok(());
        };
        self.set_state(name, VmState::Stopping, None, Some(&handle), None)
            .await?;
        let grace = if force {
            Duration::ZERO
        } else {
            self.timeouts.graceful_stop
        };
        if !force {
            // The agent's poweroff is the most reliable graceful path; the VMM's own request
            // (ACPI or Ctrl-Alt-Del) follows inside the backend's stop.
            let client = self
                .agents
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(name)
                .cloned();
            if let Some(c) = client {
                let _ = tokio::time::timeout(self.timeouts.poweroff, c.poweroff()).await;
            }
        }
        self.forget_agent(name);
        let stopped = self.vmms.for_handle(&handle).stop(&handle, grace).await;
        if let Err(e) = stopped {
            // The whole chain and its hints, for the caller and for `last_error` alike.
            let report = crate::hints::report(&e).context(format!("cannot stop VM {name}"));
            self.set_state(
                name,
                VmState::Failed,
                None,
                Some(&handle),
                Some(&report.to_string()),
            )
            .await?;
            return Err(crate::hints::api_error(ErrorCode::VmmFailed, report));
        }
        self.set_state(name, VmState::Stopped, None, None, None)
            .await?;
        self.release_network(&row).await;
        Ok(())
    }
}
