//! The repo snapshot `vm run ./repo` copies into the guest.
//!
//! The file set is git's own answer (`git ls-files -z --cached --others --exclude-standard`):
//! tracked files plus untracked files that no `.gitignore` (nested or not), `info/exclude` or
//! `core.excludesFile` ignores, as they are in the working tree; plus the whole `.git` directory so
//! git works in the guest. It is written as one tar stream (symlinks as symlinks, modes kept) that
//! the caller pipes into the guest, so there are no per-file round trips. `--no-git` copies a
//! directory as it is, respecting nothing.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::exit::{CliError, Exit};

/// Which files go into the snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub root: PathBuf,
    /// Paths relative to `root`, in a stable order; directories are walked when added.
    pub entries: Vec<PathBuf>,
    pub git: bool,
}

/// Lists what git would call tracked or untracked-not-ignored, plus `.git`.
pub fn git_snapshot(root: &Path) -> Result<Snapshot, CliError> {
    let top = std::process::Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["rev-parse", "--show-toplevel"])
        .output()
        .map_err(|e| {
            CliError::new(Exit::Failure, format!("cannot run git: {e}"))
                .hint("install git, or pass --no-git to copy the directory as it is")
        })?;
    if !top.status.success() {
        return Err(CliError::new(
            Exit::Usage,
            format!("{} is not a git repository", root.display()),
        )
        .hint("pass --no-git to copy the directory as it is (nothing is ignored then)"));
    }
    // A subdirectory of a repository is not a workspace: git would list only its files and the
    // guest would get them without `.git`. Say so now, before any VM exists.
    let top = PathBuf::from(String::from_utf8_lossy(&top.stdout).trim_end_matches('\n'));
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if !same(root, &top) {
        return Err(CliError::new(
            Exit::Usage,
            format!(
                "{} is inside the git repository {}, not its top level",
                root.display(),
                top.display()
            ),
        )
        .hint(format!(
            "pass the repository itself (`banger vm run {}`), or --no-git to copy only this directory",
            top.display()
        )));
    }
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(root)
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .output()
        .map_err(|e| CliError::new(Exit::Failure, format!("cannot run git ls-files: {e}")))?;
    if !out.status.success() {
        return Err(CliError::new(
            Exit::Failure,
            format!(
                "git ls-files in {} failed: {}",
                root.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    let mut entries: Vec<PathBuf> = out
        .stdout
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| PathBuf::from(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(p)))
        // A tracked file deleted in the working tree is not copied ("as they are").
        .filter(|p| root.join(p).symlink_metadata().is_ok())
        .collect();
    entries.sort();
    entries.dedup();
    entries.push(PathBuf::from(".git"));
    Ok(Snapshot {
        root: root.to_owned(),
        entries,
        git: true,
    })
}

/// Everything under `root`, nothing ignored.
pub fn plain_snapshot(root: &Path) -> Result<Snapshot, CliError> {
    if !root.is_dir() {
        return Err(CliError::new(
            Exit::Usage,
            format!("{} is not a directory", root.display()),
        ));
    }
    Ok(Snapshot {
        root: root.to_owned(),
        entries: vec![PathBuf::from(".")],
        git: false,
    })
}

/// Writes the snapshot as a tar stream. Symlinks are stored as links (never followed), modes
/// and mtimes are kept, and nothing outside `root` is read.
pub fn write_tar<W: Write>(snap: &Snapshot, out: W) -> Result<W, CliError> {
    let io = |e: std::io::Error| {
        CliError::new(
            Exit::Failure,
            format!("cannot pack {}: {e}", snap.root.display()),
        )
    };
    let mut tar = tar::Builder::new(out);
    tar.follow_symlinks(false);
    tar.mode(tar::HeaderMode::Complete);
    for rel in &snap.entries {
        let full = snap.root.join(rel);
        let meta = std::fs::symlink_metadata(&full).map_err(io)?;
        if meta.is_dir() {
            tar.append_dir_all(rel, &full).map_err(io)?;
        } else {
            tar.append_path_with_name(&full, rel).map_err(io)?;
        }
    }
    tar.into_inner().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn git(dir: &Path, args: &[&str]) {
        let ok = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .status()
            .unwrap()
            .success();
        assert!(ok, "git {args:?}");
    }

    #[test]
    fn snapshot_follows_gits_rules_and_keeps_links_and_modes() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        git(r, &["init", "-q"]);
        std::fs::write(r.join("tracked.txt"), "t").unwrap();
        std::fs::write(r.join(".gitignore"), "*.log\n").unwrap();
        std::fs::create_dir(r.join("sub")).unwrap();
        std::fs::write(r.join("sub/.gitignore"), "secret\n").unwrap();
        std::fs::write(r.join("sub/secret"), "s").unwrap();
        std::fs::write(r.join("sub/kept"), "k").unwrap();
        std::fs::write(r.join("debug.log"), "l").unwrap();
        std::fs::write(r.join("run.sh"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(r.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("tracked.txt", r.join("link")).unwrap();
        std::fs::write(r.join(".git/info/exclude"), "excluded\n").unwrap();
        std::fs::write(r.join("excluded"), "x").unwrap();
        git(r, &["add", "tracked.txt"]);

        let snap = git_snapshot(r).unwrap();
        let names: Vec<String> = snap
            .entries
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        assert_eq!(
            names,
            [
                ".gitignore",
                "link",
                "run.sh",
                "sub/.gitignore",
                "sub/kept",
                "tracked.txt",
                ".git"
            ]
        );

        let bytes = write_tar(&snap, Vec::new()).unwrap();
        let mut ar = tar::Archive::new(&bytes[..]);
        let mut seen_link = false;
        let mut seen_exec = false;
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            let path = e.path().unwrap().display().to_string();
            if path == "link" {
                assert_eq!(e.header().entry_type(), tar::EntryType::Symlink);
                assert_eq!(
                    e.link_name().unwrap().unwrap().display().to_string(),
                    "tracked.txt"
                );
                seen_link = true;
            }
            if path == "run.sh" {
                assert_eq!(e.header().mode().unwrap() & 0o777, 0o755);
                seen_exec = true;
            }
        }
        assert!(seen_link && seen_exec);
    }

    #[test]
    fn a_subdirectory_of_a_repository_is_refused_and_the_top_named() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        git(r, &["init", "-q"]);
        std::fs::create_dir(r.join("sub")).unwrap();
        std::fs::write(r.join("sub/f"), "f").unwrap();
        let e = git_snapshot(&r.join("sub")).unwrap_err();
        assert_eq!(e.exit, Exit::Usage);
        assert!(e.message.contains("not its top level"), "{}", e.message);
        let top = r.canonicalize().unwrap().display().to_string();
        assert!(e.hints[0].contains(&top), "{e}");
        // The top itself, reached through a symlink, is the repository.
        let link = d
            .path()
            .parent()
            .unwrap()
            .join(format!("link-{}", std::process::id()));
        std::os::unix::fs::symlink(r, &link).unwrap();
        let snap = git_snapshot(&link);
        std::fs::remove_file(&link).unwrap();
        assert!(snap.is_ok(), "{:?}", snap.err().map(|e| e.message));
    }

    #[test]
    fn non_repo_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let e = git_snapshot(d.path()).unwrap_err();
        assert!(e.message.contains("not a git repository"), "{}", e.message);
        assert!(e.hints[0].contains("--no-git"), "{e}");
    }
}
