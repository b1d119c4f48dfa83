//! SSH identity: the user's key that guests authorise, each VM's own host key, and the pinned
//! `known_hosts` that lets `ssh` verify a guest without trusting it on first use.
//!
//! Keys are made with OpenSSH's `ssh-keygen` (the reference implementation, and already needed
//! for sessions). `known_hosts` is rewritten whole from the store on every change (temp file +
//! rename), so it never holds an entry for a deleted VM or a reused address.
//!
//! Several VMs are created at once: the user key is made once (callers wait for the first
//! and then use its key), and in a private directory, renamed into place only when whole, so
//! no caller reads half a key. Every temporary file has a name of its own.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use banger_api::{ApiError, ErrorCode};

/// Held while the user key is checked and made: of callers that find it missing at the same
/// time, one makes it and the others then find it.
static USER_KEY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
    let _one = USER_KEY.lock().await;
    if default.is_file() && pub_path(default).is_file() {
        return Ok(default.to_owned());
    }
    let failed = |what: String, e: &dyn std::fmt::Display| {
        ApiError::new(ErrorCode::Internal, format!("{what}: {e}"))
    };
    let dir = default.parent().ok_or_else(|| {
        failed(
            format!("cannot make {}", default.display()),
            &"no directory",
        )
    })?;
    std::fs::create_dir_all(dir)
        .and_then(|_| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        })
        .map_err(|e| failed(format!("cannot create {}", dir.display()), &e))?;
    // Made aside and moved in whole, the public half first: where the private key exists, its
    // public key does too. A crash leaves at most a public key alone, which the next call
    // replaces (ssh-keygen would refuse to overwrite it in place).
    let scratch = tempfile::Builder::new()
        .prefix(".keygen.")
        .tempdir_in(dir)
        .map_err(|e| failed(format!("cannot make a directory in {}", dir.display()), &e))?;
    let made = scratch.path().join("id_ed25519");
    keygen(&made, "banger").await?;
    for (from, to) in [
        (pub_path(&made), pub_path(default)),
        (made.clone(), default.to_owned()),
    ] {
        std::fs::rename(&from, &to)
            .map_err(|e| failed(format!("cannot move the new key to {}", to.display()), &e))?;
    }
    crate::fsutil::fsync_dir(dir).map_err(|e| {
        failed(
            format!("cannot keep {}", default.display()),
            &format!("{e:#}"),
        )
    })?;
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
    // A name of its own: two writers sharing one temporary file could rename the other's
    // half-written text into place. (Removed again if anything below fails.)
    let mut tmp = tempfile::Builder::new()
        .prefix(".known_hosts.")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    tmp.write_all(text.as_bytes())
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("cannot write {}", tmp.path().display()))?;
    tmp.persist(path)
        .with_context(|| format!("cannot move the new known_hosts to {}", path.display()))?;
    crate::fsutil::fsync_dir(dir)
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

    fn files_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn callers_that_find_no_user_key_at_once_all_get_the_one_key_made() {
        let home = tempfile::tempdir().unwrap();
        let key = home.path().join("config/ssh/id_ed25519");
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let key = key.clone();
                tokio::spawn(async move {
                    let path = ensure_user_key(None, &key).await.unwrap();
                    // What the caller puts into its guest, read as soon as it has the key.
                    std::fs::read_to_string(pub_path(&path)).unwrap()
                })
            })
            .collect();
        let mut seen = Vec::new();
        for c in calls {
            seen.push(c.await.unwrap());
        }
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 1, "more than one key was made: {seen:?}");
        let dir = key.parent().unwrap();
        assert_eq!(files_in(dir), ["id_ed25519", "id_ed25519.pub"]);
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(dir), 0o700);
        assert_eq!(mode(&key), 0o600);
        // The public half belongs to the private one.
        let derived = std::process::Command::new("ssh-keygen")
            .arg("-y")
            .arg("-f")
            .arg(&key)
            .output()
            .unwrap();
        assert!(derived.status.success(), "{derived:?}");
        let first_two = |s: &str| s.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        let public = std::fs::read_to_string(pub_path(&key)).unwrap();
        assert_eq!(
            first_two(&String::from_utf8(derived.stdout).unwrap()),
            first_two(&public)
        );

        // Later calls use it as it is.
        ensure_user_key(None, &key).await.unwrap();
        assert_eq!(std::fs::read_to_string(pub_path(&key)).unwrap(), public);
    }

    #[tokio::test]
    async fn a_public_key_left_alone_by_a_crash_is_replaced_by_a_whole_pair() {
        let home = tempfile::tempdir().unwrap();
        let key = home.path().join("id_ed25519");
        std::fs::write(pub_path(&key), "ssh-ed25519 AAAA half\n").unwrap();
        ensure_user_key(None, &key).await.unwrap();
        assert!(key.is_file());
        let public = std::fs::read_to_string(pub_path(&key)).unwrap();
        assert!(!public.contains("half"), "{public}");
    }

    #[test]
    fn concurrent_known_hosts_writers_leave_one_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known_hosts");
        let sets: Vec<Vec<Pinned>> = (0..6)
            .map(|w| {
                (0..=w)
                    .map(|i| Pinned {
                        names: vec![format!("vm{i}.vm"), format!("172.16.0.{}", i + 2)],
                        public_key: format!("ssh-ed25519 KEY{i} banger-vm{i}"),
                    })
                    .collect()
            })
            .collect();
        std::thread::scope(|s| {
            for set in &sets {
                let path = &path;
                s.spawn(move || {
                    for _ in 0..30 {
                        write_known_hosts(path, set).unwrap();
                    }
                });
            }
        });
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().skip(1).collect();
        // One writer's whole list: entries 0..n, each once, nothing torn.
        for (i, line) in lines.iter().enumerate() {
            assert_eq!(
                *line,
                format!("vm{i}.vm,172.16.0.{} ssh-ed25519 KEY{i}", i + 2)
            );
        }
        assert!(!lines.is_empty());
        assert_eq!(files_in(dir.path()), ["known_hosts"]);
    }
}
