//! Keeping everything that maps VM names to VMs in step with the store: the DNS zone,
//! known_hosts and banger's ssh_config.

use crate::sshkeys;
use crate::store;

use super::Vms;

impl Vms {
    /// Brings everything that maps VM names to VMs up to date with the store: the DNS zone,
    /// known_hosts (every VM's pinned host key) and ~/.config/banger/ssh_config.
    pub async fn refresh_names(&self) {
        let rows = match self.store.call(|c| store::list_vms(c)).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("cannot list VMs to refresh names: {e:#}");
                return;
            }
        };
        self.dns.set_names(
            rows.iter()
                .filter_map(|r| Some((r.name.clone(), r.ip.parse().ok()?)))
                .collect(),
        );
        self.dns.set_egress(
            rows.iter()
                .filter_map(|r| Some((r.name.clone(), r.ip.parse().ok()?, self.egress(r))))
                .collect(),
        );
        let entries: Vec<sshkeys::Pinned> = rows
            .iter()
            .filter_map(|r| {
                let key =
                    std::fs::read_to_string(self.vm_dir(&r.name).join("ssh_host_ed25519_key.pub"))
                        .ok()?;
                Some(sshkeys::Pinned {
                    names: vec![format!("{}.vm", r.name), r.ip.clone()],
                    public_key: key,
                })
            })
            .collect();
        if let Err(e) = sshkeys::write_known_hosts(&self.paths.known_hosts(), &entries) {
            tracing::warn!("cannot write known_hosts: {e:#}");
        }
        // ~/.config/banger/ssh_config: one `Host NAME.vm` per VM, for `ssh NAME.vm` once the
        // user includes it (`banger ssh-config --install`).
        let identity = self
            .config
            .ssh_key_path
            .clone()
            .unwrap_or_else(|| self.paths.ssh_dir().join("id_ed25519"));
        let hosts: Vec<banger_config::sshconfig::HostEntry> = rows
            .iter()
            // Only guests that run sshd get a Host entry; the others are reached through the agent.
            .filter(|r| r.boot == banger_api::Boot::Systemd)
            .filter_map(|r| {
                Some(banger_config::sshconfig::HostEntry {
                    name: r.name.clone(),
                    ip: r.ip.parse().ok()?,
                    identity_file: identity.clone(),
                    known_hosts: self.paths.known_hosts(),
                })
            })
            .collect();
        let text = banger_config::sshconfig::render_ssh_config(&hosts);
        if let Err(e) = banger_config::sshconfig::write_atomically(
            &self.paths.ssh_config(),
            text.as_bytes(),
            0o600,
        ) {
            tracing::warn!("cannot write {}: {e}", self.paths.ssh_config().display());
        }
    }
}
