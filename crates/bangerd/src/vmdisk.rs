//! A VM's disks and what banger puts on them at create time.
//!
//! The root disk is a copy-on-write clone of the image (see `fsutil::clone_file`); banger then
//! writes into it, with `debugfs -w` (no mount, no root needed), the things that belong to this
//! banger and this VM rather than to the image: the guest agent binary and its systemd unit, and
//! the VM's own SSH host key. That is why an image never needs rebuilding when banger changes.
//! The work disk, mounted at `/root` by the agent, is a fresh sparse ext4 made with
//! `mkfs.ext4 -d` from a staging tree holding `authorized_keys` and the `file_sync` entries.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use banger_api::vm::SyncEntry;

use banger_agent::GUEST_BINARY_PATH as GUEST_AGENT_PATH;
const GUEST_UNIT_PATH: &str = "/etc/systemd/system/banger-agent.service";
const GUEST_UNIT_LINK: &str = "/etc/systemd/system/multi-user.target.wants/banger-agent.service";

/// Inputs for writing banger's files into a cloned root disk.
pub struct Injection<'a> {
    pub agent_binary: &'a Path,
    pub unit_text: &'a str,
    pub host_key: &'a Path,
    pub host_key_pub: &'a Path,
}

/// Runs a `debugfs -w` script against `image`; fails if debugfs reports any error.
fn debugfs_script(image: &Path, script: &str, scratch: &Path) -> anyhow::Result<()> {
    let script_path = scratch.join("debugfs.script");
    std::fs::write(&script_path, script)
        .with_context(|| format!("cannot write {}", script_path.display()))?;
    let out = std::process::Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&script_path)
        .arg(image)
        .output()
        .context("cannot run debugfs (apt-get install e2fsprogs)")?;
    let _ = std::fs::remove_file(&script_path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // debugfs keeps going after a failed command and still exits 0, so read what it said. The
    // first line is its version banner; "rm"/"mkdir" of missing/existing paths are expected.
    let problems: Vec<&str> = stderr
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .filter(|l| {
            !l.contains("File not found by ext2_lookup")
                && !l.contains("Ext2 directory already exists")
        })
        .collect();
    if !out.status.success() || !problems.is_empty() {
        bail!(
            "debugfs could not write banger's files into {}: {}",
            image.display(),
            problems.join("; ")
        );
    }
    Ok(())
}

fn quote(p: &Path) -> anyhow::Result<String> {
    let s = p.to_str().context("path is not UTF-8")?;
    if s.contains('"') || s.contains('\n') {
        bail!("path {s:?} cannot be passed to debugfs");
    }
    Ok(format!("\"{s}\""))
}

/// Writes the agent, its unit and the host key into `root_disk`.
pub fn inject(root_disk: &Path, inj: &Injection<'_>, scratch: &Path) -> anyhow::Result<()> {
    let unit = scratch.join("banger-agent.service");
    std::fs::write(&unit, inj.unit_text)
        .with_context(|| format!("cannot write {}", unit.display()))?;
    let mut s = String::new();
    for dir in [
        "/usr/local/bin",
        "/etc/systemd/system/multi-user.target.wants",
    ] {
        s.push_str(&format!("mkdir {dir}\n"));
    }
    let files = [
        (inj.agent_binary, GUEST_AGENT_PATH, "0100755"),
        (unit.as_path(), GUEST_UNIT_PATH, "0100644"),
        (inj.host_key, "/etc/ssh/ssh_host_ed25519_key", "0100600"),
        (
            inj.host_key_pub,
            "/etc/ssh/ssh_host_ed25519_key.pub",
            "0100644",
        ),
    ];
    for (src, dst, mode) in files {
        s.push_str(&format!("rm {dst}\n"));
        s.push_str(&format!("write {} {dst}\n", quote(src)?));
        s.push_str(&format!(
            "sif {dst} mode {mode}\nsif {dst} uid 0\nsif {dst} gid 0\n"
        ));
    }
    s.push_str(&format!(
        "rm {GUEST_UNIT_LINK}\nsymlink {GUEST_UNIT_LINK} {GUEST_UNIT_PATH}\n"
    ));
    let r = debugfs_script(root_disk, &s, scratch);
    let _ = std::fs::remove_file(&unit);
    r
}

/// Makes the work disk: a sparse ext4 of `size` bytes holding `/root/.ssh/authorized_keys` and
/// the file_sync entries. `staging` must be an empty scratch directory.
pub fn make_work_disk(
    out: &Path,
    size: u64,
    authorized_key: &str,
    sync: &[SyncEntry],
    staging: &Path,
) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let ssh = staging.join(".ssh");
    std::fs::create_dir_all(&ssh).with_context(|| format!("cannot create {}", ssh.display()))?;
    std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o700))?;
    let keys = ssh.join("authorized_keys");
    let mut f =
        std::fs::File::create(&keys).with_context(|| format!("cannot write {}", keys.display()))?;
    f.write_all(authorized_key.trim().as_bytes())?;
    f.write_all(b"\n")?;
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600))?;
    for entry in sync {
        copy_sync_entry(entry, staging)?;
    }
    let file =
        std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    file.set_len(size)
        .with_context(|| format!("cannot size {} to {size} bytes", out.display()))?;
    drop(file);
    let status = std::process::Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-L",
            "banger-work",
            "-E",
            "root_owner=0:0",
            "-d",
        ])
        .arg(staging)
        .arg(out)
        .output()
        .context("cannot run mkfs.ext4 (apt-get install e2fsprogs)")?;
    if !status.status.success() {
        bail!(
            "mkfs.ext4 of the work disk {} failed: {}",
            out.display(),
            String::from_utf8_lossy(&status.stderr).trim()
        );
    }
    Ok(())
}

/// Copies one file_sync entry (a file or a whole directory) into the staging tree at its guest
/// path relative to `/root`. Paths were validated by the CLI; they are checked again here
/// because the daemon trusts nothing that crosses the socket. Only regular files, directories
/// and symlinks are copied: a FIFO would hang the copy and a device (`/dev/zero`) would never
/// end, so both are refused with the entry named. Symlinks are copied as symlinks, and nothing is
/// ever written through one: a symlink an earlier entry put in the staging tree must not carry a
/// later entry's files out of it.
fn copy_sync_entry(entry: &SyncEntry, staging: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let rel = guest_relative(&entry.guest)?;
    let src = PathBuf::from(&entry.host);
    let what = || format!("file_sync entry {} -> {}", src.display(), entry.guest);
    // The entry itself may be a symlink (`~/.gitconfig` often is): what it names is copied.
    let meta = std::fs::metadata(&src)
        .with_context(|| format!("{}: the host path cannot be read", what()))?;
    let dst = staged_path(staging, &rel).with_context(what)?;
    if let Some(parent) = dst.parent() {
        create_dirs_within(staging, parent).with_context(what)?;
    }
    if meta.is_dir() {
        copy_dir(&src, &dst).with_context(what)?;
        if let Some(mode) = entry.mode {
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(mode))?;
        }
    } else if meta.is_file() {
        std::fs::copy(&src, &dst).with_context(|| format!("{}: cannot copy", what()))?;
        let mode = entry.mode.unwrap_or(0o600);
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(mode))?;
    } else {
        bail!(
            "{}: {} is {}; file_sync copies regular files, directories and symlinks only",
            what(),
            src.display(),
            kind_of(&meta.file_type())
        );
    }
    Ok(())
}

/// `staging/rel`, refused if any part of it already exists as a symlink.
fn staged_path(staging: &Path, rel: &Path) -> anyhow::Result<PathBuf> {
    let mut at = staging.to_path_buf();
    for part in rel.components() {
        at.push(part);
        refuse_symlink(&at)?;
    }
    Ok(at)
}

/// `create_dir_all` that never follows a symlink: each level is checked before it is used.
fn create_dirs_within(staging: &Path, dir: &Path) -> anyhow::Result<()> {
    let rel = dir.strip_prefix(staging).unwrap_or(dir);
    let mut at = staging.to_path_buf();
    for part in rel.components() {
        at.push(part);
        refuse_symlink(&at)?;
        match std::fs::create_dir(&at) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && at.is_dir() => {}
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", at.display())),
        }
    }
    Ok(())
}

fn refuse_symlink(p: &Path) -> anyhow::Result<()> {
    if std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()) {
        bail!(
            "its guest path goes through a symlink an earlier entry put there ({}); \
             nothing is written through a symlink",
            p.display()
        );
    }
    Ok(())
}

fn kind_of(ft: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else {
        "not a regular file"
    }
}

fn copy_dir(src: &Path, dst: &Path) -> anyhow::Result<()> {
    refuse_symlink(dst)?;
    match std::fs::create_dir(dst) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dst.is_dir() => {}
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", dst.display())),
    }
    for e in std::fs::read_dir(src).with_context(|| format!("cannot read {}", src.display()))? {
        let e = e?;
        let (from, to) = (e.path(), dst.join(e.file_name()));
        refuse_symlink(&to)?;
        let ft = e.file_type()?;
        if ft.is_dir() {
            copy_dir(&from, &to)?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&from)?, &to)?;
        } else if ft.is_file() {
            std::fs::copy(&from, &to).with_context(|| format!("cannot copy {}", from.display()))?;
        } else {
            bail!(
                "{} is {}; file_sync copies regular files, directories and symlinks only",
                from.display(),
                kind_of(&ft)
            );
        }
    }
    Ok(())
}

/// `/root/x/y` -> `x/y`; anything outside `/root` or with `..` is refused.
pub fn guest_relative(guest: &str) -> anyhow::Result<PathBuf> {
    let rest = guest
        .strip_prefix("/root/")
        .with_context(|| format!("file_sync guest path {guest:?} is not under /root/"))?;
    let rel = PathBuf::from(rest);
    if rest.is_empty()
        || rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        bail!("file_sync guest path {guest:?} must name a path inside /root without '..'");
    }
    Ok(rel)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(host: &Path, guest: &str) -> SyncEntry {
        SyncEntry {
            host: host.display().to_string(),
            guest: guest.to_owned(),
            mode: None,
        }
    }

    #[test]
    fn fifos_sockets_and_devices_are_refused_with_the_entry_named() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let tree = d.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        std::fs::write(tree.join("ok"), "ok").unwrap();
        nix::unistd::mkfifo(
            &tree.join("pipe"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let _sock = std::os::unix::net::UnixListener::bind(d.path().join("sock")).unwrap();
        for (host, kind) in [
            (fifo.clone(), "a FIFO"),
            (tree.clone(), "a FIFO"),
            (d.path().join("sock"), "a socket"),
            (PathBuf::from("/dev/zero"), "a character device"),
        ] {
            let staging = tempfile::tempdir().unwrap();
            let err = copy_sync_entry(&entry(&host, "/root/x"), staging.path()).unwrap_err();
            let msg = format!("{err:#}");
            assert!(msg.contains(kind), "{msg}");
            assert!(msg.contains(&host.display().to_string()), "{msg}");
            assert!(msg.contains("/root/x"), "{msg}");
        }
    }

    #[test]
    fn a_symlink_from_one_entry_never_carries_another_out_of_the_staging_tree() {
        let d = tempfile::tempdir().unwrap();
        let outside = d.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        // Entry 1: a directory holding a symlink to a directory outside.
        let tree = d.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("link")).unwrap();
        let file = d.path().join("payload");
        std::fs::write(&file, "x").unwrap();
        let other = d.path().join("other");
        std::fs::create_dir_all(other.join("link")).unwrap();
        std::fs::write(other.join("link/evil"), "x").unwrap();

        let staging = tempfile::tempdir().unwrap();
        copy_sync_entry(&entry(&tree, "/root/cfg"), staging.path()).unwrap();
        assert!(staging
            .path()
            .join("cfg/link")
            .symlink_metadata()
            .unwrap()
            .is_symlink());
        for (host, guest) in [
            (&file, "/root/cfg/link/evil"),      // a file written through it
            (&file, "/root/cfg/link/deep/evil"), // directories made through it
            (&file, "/root/cfg/link"),           // a file written over it
            (&other, "/root/cfg"),               // a directory merged through it
        ] {
            let err = copy_sync_entry(&entry(host, guest), staging.path()).unwrap_err();
            assert!(format!("{err:#}").contains("symlink"), "{guest}: {err:#}");
        }
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "nothing left the staging tree"
        );
    }

    #[test]
    fn guest_paths_stay_inside_root() {
        assert_eq!(
            guest_relative("/root/.gitconfig").unwrap(),
            PathBuf::from(".gitconfig")
        );
        assert_eq!(guest_relative("/root/a/b").unwrap(), PathBuf::from("a/b"));
        for bad in [
            "/etc/passwd",
            "/root/",
            "/root/../etc/passwd",
            "/root/a/../../x",
            "root/x",
        ] {
            assert!(guest_relative(bad).is_err(), "{bad}");
        }
    }
}
