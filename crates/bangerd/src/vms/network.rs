//! The host network's lifetime around VMs: a VM's tap is released when it stops, and the
//! bridge, NAT and DNS server go with the last running (or starting) VM.

use banger_net::{Egress, HostAccess, PortGuard};

use crate::store::{self, VmRow};

use super::Vms;

impl Vms {
    /// The VM's egress policy: its own flags combined with the config's `[network] egress`.
    pub(super) fn egress(&self, row: &VmRow) -> Egress {
        Egress::for_vm(
            &self.config.network.egress,
            &row.allow_hosts,
            row.no_network,
        )
    }

    /// What the VM's tap may send from and reach, from its record (`None` if the record's
    /// address or MAC no longer parses).
    pub(super) fn port_guard(&self, row: &VmRow) -> Option<PortGuard> {
        let host = if row.host_access {
            HostAccess::Open
        } else {
            HostAccess::DnsOnly
        };
        Some(
            PortGuard::new(row.mac.parse().ok()?, row.ip.parse().ok()?)
                .with_host(host)
                .with_outbound(self.egress(row).outbound()),
        )
    }

    /// Deletes the VM's tap, and the whole host network when no other VM runs.
    pub(super) async fn release_network(&self, row: &VmRow) {
        let _g = self.net_lock.lock().await;
        let net = self.net.clone();
        let id = row.id.clone();
        let name = row.name.clone();
        let others_running = self
            .store
            .call(move |c| {
                Ok(store::list_vms(c)?
                    .iter()
                    .any(|v| v.name != name && v.handle.is_some()))
            })
            .await
            .unwrap_or(true)
            || self.starting.any_key(|n| n != row.name);
        if !others_running {
            // The server is bound to the bridge address, which goes with the bridge.
            self.dns.stop().await;
        }
        // A record that no longer parses has nothing to take back: the set goes with the table.
        let guard = self.port_guard(row);
        let r = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let _ = match guard {
                Some(guard) => net.detach_vm(&id, guard)?,
                None => net.host().delete_tap(&banger_net::TapName::for_vm(&id))?,
            };
            if !others_running {
                let _ = net.teardown()?;
            }
            Ok(())
        })
        .await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(
                vm = %row.name,
                "cannot release network: {}",
                crate::hints::report(e.as_ref())
            ),
            Err(e) => tracing::warn!(vm = %row.name, "network task failed: {e}"),
        }
    }
}
