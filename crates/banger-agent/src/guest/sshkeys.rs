//! Setup step: an SSH host key for sshd when the image ships none.
//!
//! Images are built once and cloned for every VM, so a careful image builder leaves host keys
//! out; without any, sshd refuses to start. The agent runs before sshd, so it creates the one
//! key sshd needs (ed25519: instant to generate even under emulation, unlike RSA). An image
//! or daemon that provides its own keys is left alone.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum SshKeyError {
    #[error("cannot look for SSH host keys in {dir}")]
    Read {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot run ssh-keygen to create {key}")]
    Spawn {
        key: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("ssh-keygen failed to create {key} ({status}): {stderr}")]
    Failed {
        key: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// What [`ensure_host_key`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyOutcome {
    /// The image has no `/etc/ssh`: no sshd to serve.
    NoSsh,
    AlreadyPresent,
    Created(PathBuf),
}

/// Creates `etc/ssh/ssh_host_ed25519_key` when `etc/ssh` holds no host key at all.
pub fn ensure_host_key(etc: &Path) -> Result<HostKeyOutcome, SshKeyError> {
    let dir = etc.join("ssh");
    if !dir.is_dir() {
        return Ok(HostKeyOutcome::NoSsh);
    }
    let read_err = |source| SshKeyError::Read {
        dir: dir.clone(),
        source,
    };
    for entry in fs_err::read_dir(&dir).map_err(read_err)? {
        let name = entry.map_err(read_err)?.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("ssh_host_") && name.ends_with("_key") {
            return Ok(HostKeyOutcome::AlreadyPresent);
        }
    }
    let key = dir.join("ssh_host_ed25519_key");
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "banger-guest", "-f"])
        .arg(&key)
        .output()
        .map_err(|source| SshKeyError::Spawn {
            key: key.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(SshKeyError::Failed {
            key,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(HostKeyOutcome::Created(key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_key_is_created_once_when_none_exists() {
        let etc = tempfile::tempdir().unwrap();
        std::fs::create_dir(etc.path().join("ssh")).unwrap();
        std::fs::write(etc.path().join("ssh/sshd_config"), "").unwrap();
        let key = etc.path().join("ssh/ssh_host_ed25519_key");
        assert_eq!(
            ensure_host_key(etc.path()).unwrap(),
            HostKeyOutcome::Created(key.clone())
        );
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o077,
            0,
            "private host key readable by others: {mode:o}"
        );
        let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
        assert!(public.starts_with("ssh-ed25519 "), "{public}");
        assert_eq!(
            ensure_host_key(etc.path()).unwrap(),
            HostKeyOutcome::AlreadyPresent
        );
    }

    #[test]
    fn existing_keys_of_any_type_are_kept_and_no_ssh_dir_means_nothing_to_do() {
        let etc = tempfile::tempdir().unwrap();
        assert_eq!(ensure_host_key(etc.path()).unwrap(), HostKeyOutcome::NoSsh);
        std::fs::create_dir(etc.path().join("ssh")).unwrap();
        std::fs::write(etc.path().join("ssh/ssh_host_rsa_key"), "x").unwrap();
        assert_eq!(
            ensure_host_key(etc.path()).unwrap(),
            HostKeyOutcome::AlreadyPresent
        );
    }
}
