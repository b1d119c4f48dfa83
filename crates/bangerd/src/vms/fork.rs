//! Forking a running VM: `vm fork NAME -n N` makes N new VMs from the VM's current state, as
//! `vm snapshot` and N times `vm create --from` would, through a snapshot that lives only for
//! the fork. The children run on from where the parent was (its files and processes), each
//! with an identity of its own; the parent runs on too.

use std::sync::Arc;

use banger_api::vm::{CreateVmRequest, VmInfo};
use banger_api::{ApiError, ErrorCode};
use banger_image::Progress;

use crate::server::Emitter;
use crate::{names, store};

use super::{api, Vms};

/// Most children one fork makes: each is a whole VM (memory, a tap, a VMM).
pub const MAX_FORKS: u32 = 16;

impl Vms {
    /// Makes `count` VMs from running VM `vm`'s current state, named `VM-N` (the lowest free
    /// N), or generated names where that would be too long.
    pub async fn fork(
        self: &Arc<Self>,
        vm: &str,
        count: u32,
        progress: Emitter,
    ) -> Result<Vec<VmInfo>, ApiError> {
        if count == 0 || count > MAX_FORKS {
            return Err(api(
                ErrorCode::BadRequest,
                format!("cannot fork {count} VMs at once"),
            )
            .with_hint(format!("fork 1 to {MAX_FORKS} at a time")));
        }
        let parent = self.row(vm).await?;
        progress.phase("snapshot");
        let snapshot = format!("fork-{}", names::short_id());
        let taken = self.snapshot(vm, Some(snapshot.clone())).await?;
        let made = self
            .fork_from(&parent.name, &taken.name, count, &progress)
            .await;
        // The snapshot lived for the fork only.
        if let Err(e) = self.delete_snapshot(&snapshot).await {
            tracing::warn!(
                vm,
                snapshot,
                "cannot remove the fork's snapshot: {}",
                e.message
            );
        }
        made
    }

    async fn fork_from(
        self: &Arc<Self>,
        parent: &str,
        snapshot: &str,
        count: u32,
        progress: &Emitter,
    ) -> Result<Vec<VmInfo>, ApiError> {
        let mut made = Vec::new();
        for _ in 0..count {
            let taken: Vec<String> = self
                .store
                .call(|c| store::list_vms(c))
                .await
                .map_err(crate::server::internal)?
                .into_iter()
                .map(|r| r.name)
                .collect();
            let name = (1..)
                .map(|i| format!("{parent}-{i}"))
                .find(|n| !taken.contains(n))
                .filter(|n| n.len() <= 63);
            let req = CreateVmRequest {
                name,
                image: String::new(),
                spec: banger_api::vm::VmSpec {
                    vcpu: 1,
                    memory_mib: 128,
                    disk_bytes: 64 << 20,
                },
                start: true,
                file_sync: Vec::new(),
                host_access: false,
                allow_hosts: Vec::new(),
                no_network: false,
                from: Some(snapshot.to_owned()),
                cold: false,
            };
            match self.create(req, progress.clone()).await {
                Ok(vm) => {
                    progress.notice(&format!("VM {} forked from {parent}", vm.name));
                    made.push(vm);
                }
                Err(e) if made.is_empty() => return Err(e),
                Err(e) => {
                    // The ones made are kept (they run, and are the user's now); say which.
                    let names: Vec<&str> = made.iter().map(|v| v.name.as_str()).collect();
                    let mut e = e;
                    e.message = format!("{} (made before this: {})", e.message, names.join(", "));
                    return Err(e);
                }
            }
        }
        Ok(made)
    }
}
