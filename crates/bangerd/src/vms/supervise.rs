//! Supervision: watching a running VM's VMM, marking the VM stopped and freeing its tap when
//! the VMM dies without being asked, and keeping its console log capped meanwhile
//! ([`crate::console_log`]).

use std::sync::Arc;
use std::time::Duration;

use banger_api::vm::VmState;
use banger_vmm::VmHandle;

use crate::console_log::{self, AbortOnDrop, ConsoleLog};

use super::Vms;

impl Vms {
    /// Watches a running VM's VMM; when it dies unasked, marks the VM stopped and frees its tap.
    /// Until then its console log is kept under its cap, as the same clock ticks.
    pub(super) fn supervise(self: &Arc<Self>, name: String, handle: VmHandle) {
        let this = self.clone();
        tokio::spawn(async move {
            let console = ConsoleLog::new(this.console_log(&name));
            let every = this.timeouts.supervise_every;
            // Ends with this run's supervision, whichever way it ends.
            let _capped =
                AbortOnDrop(tokio::spawn(console_log::keep_capped(console, every)).abort_handle());
            loop {
                tokio::time::sleep(this.timeouts.supervise_every).await;
                let h = handle.clone();
                let vmm = this.vmms.for_handle(&h).clone();
                let alive = tokio::task::spawn_blocking(move || vmm.is_alive(&h))
                    .await
                    .unwrap_or(true);
                if alive {
                    continue;
                }
                let lock = this.lock_for(&name);
                let _g = lock.lock().await;
                let Ok(row) = this.row(&name).await else {
                    return;
                };
                // Only act if the row still describes this run (stop/delete handle their own).
                let same_run = row
                    .handle
                    .as_deref()
                    .and_then(|h| serde_json::from_str::<VmHandle>(h).ok())
                    .is_some_and(|h| {
                        h.pid == handle.pid && h.pid_start_time == handle.pid_start_time
                    });
                if !same_run {
                    return;
                }
                tracing::warn!(vm = %name, pid = handle.pid, "VMM exited; marking the VM stopped");
                let _ = this
                    .vmms
                    .for_handle(&handle)
                    .stop(&handle, Duration::ZERO)
                    .await;
                this.forget_agent(&name);
                let _ = this
                    .set_state(
                        &name,
                        VmState::Stopped,
                        None,
                        None,
                        Some("the VMM process exited"),
                    )
                    .await;
                this.release_network(&row).await;
                return;
            }
        });
    }
}
