//! Finding the host programs image work shells out to (debootstrap, mkfs.ext4, e2fsck, ...).
//!
//! A missing tool is reported with the Debian package that provides it, so the fix is one command.
//! Besides `$PATH`, the sbin directories are searched because a user's `$PATH` often lacks them while
//! the tools living there (mkfs.ext4, debootstrap, chroot) are still runnable, directly or via sudo.

use banger_hint::Hint;
use std::borrow::Cow;
use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

const FALLBACK_DIRS: [&str; 4] = ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin"];

/// A host program image work needs is not installed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("required host tool `{bin}` was not found in $PATH or the sbin directories")]
pub struct MissingTool {
    pub bin: String,
    pub package: String,
}

impl Hint for MissingTool {
    fn hint(&self) -> Option<Cow<'_, str>> {
        Some(format!("apt-get install {}", self.package).into())
    }
}

/// Returns the absolute path of `bin`, or an error naming `debian_package`.
pub fn require_tool(bin: &str, debian_package: &str) -> Result<PathBuf, MissingTool> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    find_in(
        bin,
        std::env::split_paths(&path).chain(FALLBACK_DIRS.iter().map(PathBuf::from)),
    )
    .ok_or_else(|| MissingTool {
        bin: bin.to_owned(),
        package: debian_package.to_owned(),
    })
}

fn find_in(bin: &str, dirs: impl Iterator<Item = PathBuf>) -> Option<PathBuf> {
    if bin.contains('/') {
        let p = Path::new(bin);
        return is_executable(p).then(|| p.to_path_buf());
    }
    dirs.filter(|d| d.is_absolute())
        .map(|d| d.join(OsStr::new(bin)))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_tool_every_debian_host_has() {
        let p = require_tool("sh", "dash").unwrap();
        assert!(p.is_absolute() && p.ends_with("sh"), "{p:?}");
    }

    #[test]
    fn finds_sbin_tools_even_when_path_lacks_sbin() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("mytool");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let found = find_in(
            "mytool",
            [PathBuf::from("/nonexistent"), dir.path().into()].into_iter(),
        );
        assert_eq!(found, Some(exe.clone()));
        // Not executable means not found.
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(
            find_in("mytool", [dir.path().to_path_buf()].into_iter()),
            None
        );
    }

    #[test]
    fn missing_tool_error_names_the_debian_package() {
        let err = require_tool("banger-no-such-tool", "banger-tools").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("`banger-no-such-tool`"), "{msg}");
        assert_eq!(err.hint().as_deref(), Some("apt-get install banger-tools"));
    }
}
