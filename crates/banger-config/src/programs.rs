//! Finding host programs: the one `PATH` search every banger crate uses (VMM binaries, image
//! tools, credential helpers, the guest agent, `doctor`'s checks).
//!
//! Only absolute `PATH` entries are searched. An empty or relative entry means "relative to the
//! current directory", which for a daemon started by root is whatever directory it happened to be
//! started from: a classic way to get someone else's program run.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Debian keeps mkfs.ext4, nft, debugfs and debootstrap in sbin directories that a normal user's
/// `PATH` lacks, yet banger runs them (directly or through sudo).
pub const SBIN_DIRS: [&str; 3] = ["/usr/local/sbin", "/usr/sbin", "/sbin"];

/// The first executable `name` in `path_var` (a `PATH`-style list; `None` reads `PATH`), then in
/// `also`. A name with a `/` in it is a path and is only checked.
pub fn find_program(
    name: impl AsRef<OsStr>,
    path_var: Option<&OsStr>,
    also: &[&str],
) -> Option<PathBuf> {
    let name = name.as_ref();
    if name.as_encoded_bytes().contains(&b'/') {
        let p = Path::new(name);
        return is_executable(p).then(|| p.to_path_buf());
    }
    if name.is_empty() {
        return None;
    }
    let from_env;
    let path_var = match path_var {
        Some(p) => p,
        None => {
            from_env = std::env::var_os("PATH").unwrap_or_default();
            &from_env
        }
    };
    std::env::split_paths(path_var)
        .chain(also.iter().map(PathBuf::from))
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// A regular file (after symlinks) with an execute bit set.
pub fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::fs;

    fn program(dir: &Path, name: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn the_first_executable_match_wins_and_plain_files_do_not_count() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        program(a.path(), "tool", 0o644);
        let wanted = program(b.path(), "tool", 0o755);
        let path = std::env::join_paths([a.path(), b.path()]).unwrap();
        assert_eq!(find_program("tool", Some(&path), &[]), Some(wanted));
        assert_eq!(find_program("absent", Some(&path), &[]), None);
        fs::create_dir(a.path().join("dir")).unwrap();
        assert_eq!(find_program("dir", Some(&path), &[]), None);
    }

    #[test]
    fn relative_and_empty_path_entries_are_never_searched() {
        let cwd = std::env::current_dir().unwrap();
        let dir = tempfile::tempdir_in(&cwd).unwrap();
        program(dir.path(), "tool", 0o755);
        let rel = dir
            .path()
            .strip_prefix(&cwd)
            .unwrap()
            .as_os_str()
            .to_owned();
        assert_eq!(find_program("tool", Some(&rel), &[]), None);
        // An empty entry (`PATH=:/bin`) means the current directory to a shell.
        let mut empty = OsString::from(":");
        empty.push(dir.path().parent().unwrap());
        assert_eq!(
            find_program(dir.path().file_name().unwrap(), Some(&empty), &[]),
            None
        );
    }

    #[test]
    fn extra_directories_come_after_path_and_paths_are_only_checked() {
        let dir = tempfile::tempdir().unwrap();
        let tool = program(dir.path(), "tool", 0o700);
        let extra = dir.path().to_str().unwrap();
        assert_eq!(
            find_program("tool", Some(OsStr::new("")), &[extra]),
            Some(tool.clone())
        );
        assert_eq!(
            find_program(&tool, Some(OsStr::new("")), &[]),
            Some(tool.clone())
        );
        assert_eq!(find_program(dir.path().join("nope"), None, &[]), None);
        assert_eq!(find_program("", None, &[extra]), None);
    }

    #[test]
    fn finds_a_program_every_debian_host_has() {
        let sh = find_program("sh", None, &SBIN_DIRS).unwrap();
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{sh:?}");
    }
}
