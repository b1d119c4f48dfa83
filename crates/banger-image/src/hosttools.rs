//! Finding the host programs image work shells out to (debootstrap, mkfs.ext4, e2fsck, ...).
//!
//! A missing tool is reported with the Debian package that provides it, so the fix is one command.
//! Besides `$PATH`, the sbin directories are searched because a user's `$PATH` often lacks them while
//! the tools living there (mkfs.ext4, debootstrap, chroot) are still runnable, directly or via sudo.

use banger_hint::Hint;
use std::borrow::Cow;
use std::path::PathBuf;

use banger_config::programs;

// `/usr/bin` too: sudo and a daemon started by systemd may have a minimal `PATH`.
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
    programs::find_program(bin, None, &FALLBACK_DIRS).ok_or_else(|| MissingTool {
        bin: bin.to_owned(),
        package: debian_package.to_owned(),
    })
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
    fn missing_tool_error_names_the_debian_package() {
        let err = require_tool("banger-no-such-tool", "banger-tools").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("`banger-no-such-tool`"), "{msg}");
        assert_eq!(err.hint().as_deref(), Some("apt-get install banger-tools"));
    }
}
