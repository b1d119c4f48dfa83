//! Keeping everything that maps VM names to VMs in step with the store: the DNS zone,
//! known_hosts and banger's ssh_config.
//!
//! Refreshes come from many tasks at once (five `vm create`s finishing together): each holds
//! the service's `names_lock` from reading the store to writing the files, so the last one to
//! write has the newest view. A VM still being created is in the zone (its name and address
//! are taken) but not yet in known_hosts or ssh_config: its host key may be half-written.

use banger_api::vm::VmState;

use crate::sshkeys;
use crate::store;

use super::Vms;

impl Vms {
    /// Brings everything that maps VM names to VMs up to date with the store: the DNS zone,
    /// known_hosts (every VM's pinned host key) and ~/.config/banger/ssh_config.
    pub async fn refresh_names(&self) {
        let _one = self.names_lock.lock().await;
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
        let made: Vec<_> = rows
            .into_iter()
            .filter(|r| r.state != VmState::Creating)
            .collect();
        let hosts: Vec<(String, String, std::path::PathBuf)> = made
            .iter()
            .map(|r| {
                let key = self
                    .vm_dir(&r.name)
                    .join(format!("{}.pub", super::HOST_KEY));
                (r.name.clone(), r.ip.clone(), key)
            })
            .collect();
        let known_hosts = self.paths.known_hosts();
        // ~/.config/banger/ssh_config: one `Host NAME.vm` per VM, for `ssh NAME.vm` once the
        // user includes it (`banger ssh-config --install`).
        let identity = self
            .config
            .ssh_key_path
            .clone()
            .unwrap_or_else(|| self.paths.ssh_dir().join("id_ed25519"));
        let entries: Vec<banger_config::sshconfig::HostEntry> = made
            .iter()
            // Only guests that run sshd get a Host entry; the others are reached through the agent.
            .filter(|r| r.boot == banger_api::Boot::Systemd)
            .filter_map(|r| {
                Some(banger_config::sshconfig::HostEntry {
                    name: r.name.clone(),
                    ip: r.ip.parse().ok()?,
                    identity_file: identity.clone(),
                    known_hosts: known_hosts.clone(),
                })
            })
            .collect();
        let ssh_config = self.paths.ssh_config();
        let written = tokio::task::spawn_blocking(move || {
            let pinned: Vec<sshkeys::Pinned> = hosts
                .into_iter()
                .filter_map(|(name, ip, key)| {
                    Some(sshkeys::Pinned {
                        names: vec![format!("{name}.vm"), ip],
                        public_key: std::fs::read_to_string(key).ok()?,
                    })
                })
                .collect();
            if let Err(e) = sshkeys::write_known_hosts(&known_hosts, &pinned) {
                tracing::warn!("cannot write known_hosts: {e:#}");
            }
            let text = banger_config::sshconfig::render_ssh_config(&entries);
            if let Err(e) =
                banger_config::sshconfig::write_atomically(&ssh_config, text.as_bytes(), 0o600)
            {
                tracing::warn!("cannot write {}: {e}", ssh_config.display());
            }
        })
        .await;
        if let Err(e) = written {
            tracing::warn!("cannot refresh known_hosts and ssh_config: {e}");
        }
    }
}
