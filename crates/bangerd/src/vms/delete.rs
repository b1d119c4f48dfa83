//! Deleting a VM, and removing everything a VM has (VMM, tap, files, row), which also rolls
//! back a failed create and a half-created VM found at start-up.

use std::time::Duration;

use banger_api::{ApiError, Deleted, ErrorCode};
use banger_vmm::VmHandle;

use crate::store::{self, VmRow};

use super::{api, Vms};

impl Vms {
    /// Removes a VM's files, tap and row (used to roll back a failed create and by delete).
    pub(super) async fn remove_everything(&self, row: &VmRow) {
        if let Some(handle) = row
            .handle
            .as_deref()
            .and_then(|h| serde_json::from_str::<VmHandle>(h).ok())
        {
            let vmm = self.vmms.for_handle(&handle);
            if let Err(e) = vmm.stop(&handle, Duration::ZERO).await {
                tracing::warn!(vm = %row.name, "cannot kill VMM: {}", e.report());
            }
        }
        self.release_network(row).await;
        let _ = tokio::fs::remove_dir_all(self.vm_dir(&row.name)).await;
        let _ = tokio::fs::remove_dir_all(self.run_dir(&row.id)).await;
        let n = row.name.clone();
        if let Err(e) = self.store.call(move |c| store::delete_vm(c, &n)).await {
            tracing::error!(vm = %row.name, "cannot delete VM row: {e:#}");
        }
        self.forget_agent(&row.name);
        self.refresh_names().await;
    }

    pub async fn delete(&self, name: &str, force: bool) -> Result<Deleted, ApiError> {
        let lock = self.lock_for(name);
        let _guard = lock.lock().await;
        let row = self.row(name).await?;
        if row.handle.is_some() && !force {
            return Err(api(ErrorCode::InvalidState, format!("VM {name} is {}", row.state)).with_hint(format!(
                "stop it first (`banger vm stop {name}`) or delete it anyway with `banger vm delete --force {name}`"
            )));
        }
        self.remove_everything(&row).await;
        Ok(Deleted {
            name: name.to_owned(),
        })
    }
}
