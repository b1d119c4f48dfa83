//! Loading the kernel modules of the modules initrd, in the order `/banger/modules` gives
//! (dependencies first), with `finit_module(2)`: no modprobe, no `modules.dep`, no udev.
//!
//! A module that is already there (built in, or loaded before) is fine; any other failure is
//! reported and the rest still load, since a guest missing, say, its entropy device is still
//! worth booting.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};

/// How loading went.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LoadReport {
    pub loaded: usize,
    pub already: usize,
    /// Each module that failed, with why.
    pub failed: Vec<(PathBuf, String)>,
}

/// Loads every module in `paths`, in order.
pub fn load_all(paths: &[PathBuf]) -> LoadReport {
    let mut report = LoadReport::default();
    for path in paths {
        match load(path) {
            Ok(()) => report.loaded += 1,
            Err(Errno::EEXIST) => report.already += 1,
            Err(e) => report.failed.push((path.clone(), e.desc().to_string())),
        }
    }
    report
}

fn load(path: &Path) -> Result<(), Errno> {
    let file = std::fs::File::open(path)
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    let no_params = CString::default();
    finit_module(&file, &no_params, ModuleInitFlags::empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_are_reported_and_the_rest_still_tried() {
        let report = load_all(&[
            PathBuf::from("/nonexistent/a.ko"),
            PathBuf::from("/nonexistent/b.ko"),
        ]);
        assert_eq!(report.loaded + report.already, 0);
        assert_eq!(report.failed.len(), 2);
        assert_eq!(report.failed[0].0, Path::new("/nonexistent/a.ko"));
        assert!(
            report.failed[0].1.contains("No such file"),
            "{:?}",
            report.failed
        );
    }
}
