//! SSH identity: the user's key that guests authorise, each VM's own host key, and the pinned
//! `known_hosts` that lets `ssh` verify a guest without trusting it on first use.
//!
//! Keys are made with OpenSSH's `ssh-keygen` (the reference implementation, and already needed
//! for sessions). `known_hosts` is rewritten whole from the store on every change (temp file +
//! rename), so it never holds an entry for a deleted VM or a reused address.

use std::path::{Path, PathBuf};

use anyhow::Context;
use banger_api::{ApiError, ErrorCode};

/// The user's key pair: `ssh_key_path` from config, else `~/.config/banger/ssh/id_ed25519`,
/// created on first use.
pub async fn ensure_user_key(
    configured: Option<&Path>,
    default: &Path,
) -> Result<PathBuf, ApiError> {
    if let Some(p) = configured {
        let public = pub_path(p);
        if !p.is_file() || !public.is_file() {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                format!(
                    "ssh_key_path {} (and {}) must both exist",
                    p.display(),
                    public.display()
                ),
            )
            .with_hint("fix ssh_key_path in ~/.config/banger/config.toml, or remove it to let banger make a key"));
        }
        return Ok(p.to_owned());
    }
    if !default.is_file() || !pub_path(default).is_file() {
        if let Some(dir) = default.parent() {
            std::fs::create_dir_all(dir)
                .and_then(|_| {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                })
                .map_err(|e| {
                    ApiError::new(
                        ErrorCode::Internal,
                        format!("cannot create {}: {e}", dir.display()),
                    )
                })?;
        }
        let _ = std::fs::remove_file(default);
        let _ = std::fs::remove_file(pub_path(default));
        keygen(default, "banger").await?;
    }
    Ok(default.to_owned())
}

pub fn pub_path(key: &Path) -> PathBuf {
    let mut s = key.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

/// Generates an ed25519 key pair at `path` (and `path.pub`).
pub async fn keygen(path: &Path, comment: &str) -> Result<(), ApiError> {
    let out = tokio::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| {
            ApiError::new(
                ErrorCode::MissingTool,
                format!("cannot run ssh-keygen: {e}"),
            )
            .with_hint("apt-get install openssh-client")
        })?;
    if !out.status.success() {
        return Err(ApiError::new(
            ErrorCode::Internal,
            format!(
                "ssh-keygen for {} failed: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(())
}

/// One pinned guest: its names and public host key (`ssh-ed25519 AAAA...`).
pub struct Pinned {
    pub names: Vec<String>,
    pub public_key: String,
}

/// Rewrites `known_hosts` atomically with exactly the given entries.
pub fn write_known_hosts(path: &Path, entries: &[Pinned]) -> anyhow::Result<()> {
    let mut text =
        String::from("# Managed by banger: pinned host keys of your VMs. Edits are overwritten.\n");
    for e in entries {
        let key: String = e
            .public_key
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        text.push_str(&format!("{} {key}\n", e.names.join(",")));
    }
    let dir = path
        .parent()
        .context("known_hosts has no parent directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = dir.join(".known_hosts.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    crate::fsutil::durable_rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_hosts_lists_every_name_and_only_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("known_hosts");
        write_known_hosts(
            &p,
            &[Pinned {
                names: vec!["web.vm".into(), "172.16.0.2".into()],
                public_key: "ssh-ed25519 AAAAC3Nz banger-web\n".into(),
            }],
        )
        .unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(
            text.ends_with("web.vm,172.16.0.2 ssh-ed25519 AAAAC3Nz\n"),
            "{text}"
        );
        write_known_hosts(&p, &[]).unwrap();
        assert!(!std::fs::read_to_string(&p).unwrap().contains("web.vm"));
    }
}
