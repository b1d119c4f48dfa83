//! Where `vm ssh` connects: the address, key and pinned host key of a running VM with sshd.

use banger_api::vm::{SshTarget, VmState};
use banger_api::{ApiError, ErrorCode};

use super::{api, Vms};

impl Vms {
    pub async fn ssh_target(&self, name: &str) -> Result<SshTarget, ApiError> {
        let row = self.row(name).await?;
        if row.state != VmState::Running {
            return Err(api(
                ErrorCode::InvalidState,
                format!("VM {name} is {}, not running", row.state),
            )
            .with_hint(format!("start it with `banger vm start {name}`")));
        }
        if row.boot != banger_api::Boot::Systemd {
            return Err(api(
                ErrorCode::BadRequest,
                format!("VM {name} runs no sshd (its image boots with the agent as PID 1)"),
            )
            .with_hint(format!(
                "use `banger vm ssh {name}` or `banger vm exec {name} -- CMD`, which go through the agent"
            )));
        }
        let key = self
            .config
            .ssh_key_path
            .clone()
            .unwrap_or_else(|| self.paths.ssh_dir().join("id_ed25519"));
        Ok(SshTarget {
            name: row.name.clone(),
            ip: row.ip.clone(),
            user: "root".into(),
            identity_file: key.display().to_string(),
            known_hosts: self.paths.known_hosts().display().to_string(),
            host_key_alias: format!("{}.vm", row.name),
        })
    }
}
