//! What backend selection reads about a host: whether `/dev/kvm` opens, which KVM modules are
//! loaded, the CPU's flags, and which programs are installed.
//!
//! [`HostFacts`] is the seam: [`SystemHost`] reads a machine (this one, or a fake tree under
//! another root in tests), and `banger doctor` answers from its own probe, so the daemon and
//! `doctor` reach their verdicts through the same rules ([`crate::kvm_mode_of`],
//! [`crate::select`]) whatever they read the facts from.

use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};

use banger_config::programs;

use crate::kvm::{self, KvmMode};

/// The facts about a host that decide which backends can run on it.
pub trait HostFacts {
    /// Opens `/dev/kvm` read-write, as a VMM would, and closes it again.
    fn open_dev_kvm(&self) -> io::Result<()>;
    /// Whether the kernel module `name` is loaded (`/sys/module/<name>` exists).
    fn module_loaded(&self, name: &str) -> bool;
    /// The text of `/proc/cpuinfo`; empty when it cannot be read.
    fn cpuinfo(&self) -> String;
    /// The first executable file called `name` in a directory of `PATH`.
    fn find_on_path(&self, name: &OsStr) -> Option<PathBuf>;
    /// Whether `path` is an executable file.
    fn is_executable(&self, path: &Path) -> bool;

    /// The host's KVM, judged from the facts above. Tests of selection may answer directly.
    fn kvm(&self) -> KvmMode {
        kvm::kvm_mode_of(self)
    }
}

/// A real host: its files under `root` (`/` for this machine) and programs on `path`.
#[derive(Debug, Clone)]
pub struct SystemHost {
    root: PathBuf,
    path: Option<OsString>,
}

impl SystemHost {
    /// This machine, with the process's `PATH`.
    pub fn this() -> SystemHost {
        SystemHost {
            root: PathBuf::from("/"),
            path: std::env::var_os("PATH"),
        }
    }

    /// A host whose `/dev`, `/sys` and `/proc` are under `root`, with `path` as its `PATH`.
    pub fn at(root: &Path, path: Option<OsString>) -> SystemHost {
        SystemHost {
            root: root.to_path_buf(),
            path,
        }
    }
}

impl HostFacts for SystemHost {
    fn open_dev_kvm(&self) -> io::Result<()> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.root.join("dev/kvm"))
            .map(drop)
    }

    fn module_loaded(&self, name: &str) -> bool {
        self.root.join("sys/module").join(name).exists()
    }

    fn cpuinfo(&self) -> String {
        std::fs::read_to_string(self.root.join("proc/cpuinfo")).unwrap_or_default()
    }

    fn find_on_path(&self, name: &OsStr) -> Option<PathBuf> {
        find_in_path(name, self.path.as_deref())
    }

    fn is_executable(&self, path: &Path) -> bool {
        programs::is_executable(path)
    }
}

/// The first executable `name` in the `PATH`-style list (none: nothing is found).
pub(crate) fn find_in_path(name: &OsStr, path_var: Option<&OsStr>) -> Option<PathBuf> {
    programs::find_program(name, Some(path_var.unwrap_or_default()), &[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn non_executable_files_are_not_programs() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("qemu-system-x86_64"), "").unwrap();
        let host = SystemHost::at(dir.path(), Some(dir.path().as_os_str().to_owned()));
        assert_eq!(host.find_on_path(OsStr::new("qemu-system-x86_64")), None);
        fs::set_permissions(
            dir.path().join("qemu-system-x86_64"),
            fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        assert_eq!(
            host.find_on_path(OsStr::new("qemu-system-x86_64")),
            Some(dir.path().join("qemu-system-x86_64"))
        );
    }
}
