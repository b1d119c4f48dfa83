//! Start-up repair: re-adopting live VMMs, marking dead ones stopped, rolling back half-made
//! VMs, stopping VMMs that were started but never recorded, removing taps no VM owns, and
//! tearing the network down when nothing runs.

use std::sync::Arc;
use std::time::Duration;

use banger_api::vm::VmState;
use banger_vmm::VmHandle;

use crate::store::{self, VmRow};

use super::Vms;

impl Vms {
    /// Start-up repair: re-adopt live VMMs, mark dead ones stopped, roll back half-made VMs,
    /// remove taps no VM owns, and tear the network down when nothing runs.
    pub async fn reconcile(self: &Arc<Self>) -> anyhow::Result<()> {
        let rows = self.store.call(|c| store::list_vms(c)).await?;
        let mut live_taps = Vec::new();
        let mut live_guards = Vec::new();
        for row in &rows {
            let handle = row
                .handle
                .as_deref()
                .and_then(|h| serde_json::from_str::<VmHandle>(h).ok());
            if handle.is_none() {
                self.stop_unrecorded_vmm(row).await;
            }
            match (row.state, handle) {
                (VmState::Creating, None) => {
                    tracing::info!(vm = %row.name, "rolling back a VM whose creation was interrupted");
                    self.remove_everything(row).await;
                }
                (_, Some(h)) if self.vmms.for_handle(&h).is_alive(&h) => {
                    tracing::info!(vm = %row.name, pid = h.pid, "re-adopting running VM");
                    live_taps.push(row.tap.clone());
                    if let Some(guard) = self.port_guard(row) {
                        live_guards.push((row.id.clone(), guard));
                    }
                    if row.state != VmState::Running {
                        self.set_state(&row.name, VmState::Running, None, Some(&h), None)
                            .await
                            .map_err(|e| anyhow::anyhow!(e.message))?;
                    }
                    self.supervise(row.name.clone(), h);
                }
                (_, Some(_)) => {
                    tracing::info!(vm = %row.name, "VMM is gone; marking the VM stopped");
                    self.set_state(&row.name, VmState::Stopped, None, None, None)
                        .await
                        .map_err(|e| anyhow::anyhow!(e.message))?;
                }
                (VmState::Running | VmState::Stopping, None) => {
                    self.set_state(&row.name, VmState::Stopped, None, None, None)
                        .await
                        .map_err(|e| anyhow::anyhow!(e.message))?;
                }
                _ => {}
            }
        }
        if rows.is_empty() {
            // banger has never had a VM here: it owns nothing on the host network to repair,
            // and stays out of it entirely (images-only use needs no privileges).
            return Ok(());
        }
        let net = self.net.clone();
        let any_live = !live_taps.is_empty();
        let net_result = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let report = net.reconcile(&live_taps)?;
            for t in &report.removed {
                tracing::info!("removed orphaned tap {t}");
            }
            if live_taps.is_empty() {
                let _ = net.teardown()?;
            } else {
                // Re-adopted VMs keep their bridge; this also brings a table written by an
                // older banger (say, without the DNS redirect) up to date. Their guards go
                // (back) in: a new daemon knows none, and new tables start with empty sets.
                let _ = net.ensure_host()?;
                for (id, guard) in &live_guards {
                    let _ = net.guard_vm(id, *guard)?;
                }
            }
            Ok(())
        })
        .await?;
        if let Err(e) = net_result {
            // A host where banger may not change the network still serves images and status.
            tracing::warn!(
                "cannot reconcile the host network: {}",
                crate::hints::report(e.as_ref())
            );
        } else if any_live {
            // Re-adopted VMs keep their bridge; serve their names again.
            if let Err(e) = self.dns.ensure_running().await {
                tracing::warn!(
                    "cannot serve `.vm` names for the running VMs: {}",
                    crate::hints::report(e.as_ref())
                );
            }
        }
        self.refresh_names().await;
        self.sweep_snapshots().await;
        Ok(())
    }

    /// Stops the VMM a start launched for `row` when the daemon died before recording it: the
    /// row knows nothing of it, so it would run on, unreachable, for good.
    async fn stop_unrecorded_vmm(&self, row: &VmRow) {
        let run_dir = self.run_dir(&row.id);
        let Some((vmm, handle)) = self.vmms.leftover(&row.name, &run_dir) else {
            return;
        };
        tracing::warn!(vm = %row.name, pid = handle.pid, "stopping a VMM that was started but never recorded");
        if let Err(e) = vmm.stop(&handle, Duration::ZERO).await {
            tracing::warn!(vm = %row.name, "cannot stop it: {}", e.report());
        }
    }
}
