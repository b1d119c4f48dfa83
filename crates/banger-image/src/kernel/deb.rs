//! Reading the kernel package: `dpkg-deb --fsys-tarfile` streamed into a tar reader, never
//! unpacked onto the disk. Only chosen files leave the stream, under names chosen here.
//!
//! Two passes over the package: the first reads `boot/vmlinuz-RELEASE`, `modules.builtin` and
//! the `.modinfo` of every module (the graph is only known once all were seen); the second
//! copies the modules of the load order straight into the modules initrd. Decompressing the
//! package twice (~2 s each) costs less than holding 90 MB of modules or unpacking them.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::thread::JoinHandle;

use crate::initramfs::CpioWriter;
use crate::kernel::modules::{self, ModInfo};

/// Largest module read into memory for its `.modinfo` (the biggest Debian module is ~10 MB).
const MAX_MODULE: u64 = 64 << 20;
/// Largest `vmlinuz` accepted (Debian's is ~8 MB).
const MAX_VMLINUZ: u64 = 256 << 20;
/// Largest `modules.builtin` accepted.
const MAX_BUILTIN: u64 = 4 << 20;
/// Most stderr kept from dpkg-deb for an error message.
const MAX_STDERR: u64 = 16 << 10;

#[derive(Debug, thiserror::Error)]
pub enum DebError {
    #[error("cannot run {program}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("dpkg-deb --fsys-tarfile failed ({status}): {stderr}")]
    Dpkg { status: String, stderr: String },
    #[error("cannot read its file tree")]
    Tar(#[source] io::Error),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Content(String),
}

/// A module found in the package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Path below `lib/modules/RELEASE/`, e.g. `kernel/drivers/block/virtio_blk.ko`.
    pub path: String,
    pub depends: Vec<String>,
}

/// What the first pass learnt.
#[derive(Debug, Default)]
pub struct Scan {
    pub modules: BTreeMap<String, Module>,
    pub builtin: BTreeSet<String>,
    pub vmlinuz: bool,
    /// Compressed modules (`.ko.xz` ...) seen; named in the error when a module is missing.
    pub compressed_modules: usize,
}

/// `dpkg-deb --fsys-tarfile DEB`, killed and reaped if dropped before it finished.
struct FsysTar {
    child: Child,
    stderr: Option<JoinHandle<String>>,
}

impl FsysTar {
    fn start(dpkg_deb: &Path, deb: &Path) -> Result<(Self, ChildStdout), DebError> {
        let mut child = Command::new(dpkg_deb)
            .arg("--fsys-tarfile")
            .arg(deb)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| DebError::Spawn {
                program: dpkg_deb.to_owned(),
                source,
            })?;
        let stderr = child.stderr.take().map(|e| {
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = e.take(MAX_STDERR).read_to_string(&mut text);
                text
            })
        });
        let Some(stdout) = child.stdout.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(DebError::Tar(io::Error::other("dpkg-deb has no stdout")));
        };
        Ok((FsysTar { child, stderr }, stdout))
    }

    /// Waits for dpkg-deb after its output was read to the end.
    fn finish(mut self) -> Result<(), DebError> {
        let status = self.child.wait().map_err(DebError::Tar)?;
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        if status.success() {
            return Ok(());
        }
        Err(DebError::Dpkg {
            status: status.to_string(),
            stderr: stderr.trim().to_owned(),
        })
    }
}

impl Drop for FsysTar {
    fn drop(&mut self) {
        if self.stderr.is_some() {
            // Not finished: an error stopped the read. dpkg-deb must not linger.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Where an entry lives, relative to the package root.
enum Place {
    Vmlinuz,
    Builtin,
    /// A module, with its path below `lib/modules/RELEASE/`.
    Module(String),
    Compressed,
    Other,
}

fn plain_component(c: &str) -> bool {
    !c.is_empty()
        && c != "."
        && c != ".."
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-,".contains(&b))
}

fn place(path: &str, release: &str) -> Place {
    let path = path.strip_prefix("./").unwrap_or(path);
    if path == format!("boot/vmlinuz-{release}") {
        return Place::Vmlinuz;
    }
    let rel = ["lib/modules/", "usr/lib/modules/"].iter().find_map(|p| {
        path.strip_prefix(p)?
            .strip_prefix(release)?
            .strip_prefix('/')
    });
    let Some(rel) = rel else {
        return Place::Other;
    };
    if rel == "modules.builtin" {
        return Place::Builtin;
    }
    if !rel.starts_with("kernel/") || !rel.split('/').all(plain_component) {
        return Place::Other;
    }
    if rel.ends_with(".ko") {
        return Place::Module(rel.to_owned());
    }
    if [".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .any(|s| rel.ends_with(s))
    {
        return Place::Compressed;
    }
    Place::Other
}

fn read_capped(r: &mut dyn Read, size: u64, max: u64, what: &str) -> Result<Vec<u8>, DebError> {
    if size > max {
        return Err(DebError::Content(format!(
            "{what} is {size} bytes, more than the {max} accepted"
        )));
    }
    crate::capped::read_at_most(r, max)
        .map_err(DebError::Tar)?
        .ok_or_else(|| DebError::Content(format!("{what} is longer than the {max} bytes accepted")))
}

/// Runs `each` on every regular file of the package, then checks that dpkg-deb succeeded.
fn for_each_file(
    dpkg_deb: &Path,
    deb: &Path,
    mut each: impl FnMut(&str, u64, &mut dyn Read) -> Result<(), DebError>,
) -> Result<(), DebError> {
    let (proc, stdout) = FsysTar::start(dpkg_deb, deb)?;
    let mut archive = tar::Archive::new(stdout);
    for entry in archive.entries().map_err(DebError::Tar)? {
        let mut entry = entry.map_err(DebError::Tar)?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = entry.path().map_err(DebError::Tar)?;
        let Some(path) = path.to_str().map(str::to_owned) else {
            continue;
        };
        let size = entry.size();
        each(&path, size, &mut entry)?;
    }
    // dpkg-deb may still write padding after the end-of-archive blocks; read it so it does
    // not fail on a closed pipe.
    io::copy(&mut archive.into_inner(), &mut io::sink()).map_err(DebError::Tar)?;
    proc.finish()
}

/// First pass: writes `boot/vmlinuz-RELEASE` to `vmlinuz_out` and reads every module's
/// `.modinfo` and `modules.builtin`.
pub fn scan(
    dpkg_deb: &Path,
    deb: &Path,
    release: &str,
    vmlinuz_out: &Path,
) -> Result<Scan, DebError> {
    let mut scan = Scan::default();
    for_each_file(dpkg_deb, deb, |path, size, content| {
        match place(path, release) {
            Place::Vmlinuz => {
                if size > MAX_VMLINUZ {
                    return Err(DebError::Content(format!(
                        "{path} is {size} bytes, too large"
                    )));
                }
                let write = |source| DebError::Write {
                    path: vmlinuz_out.to_owned(),
                    source,
                };
                let mut out = fs_err::File::create(vmlinuz_out).map_err(write)?;
                let copied = io::copy(&mut content.take(size), &mut out).map_err(write)?;
                out.flush().map_err(write)?;
                if copied != size {
                    return Err(DebError::Content(format!("{path} is truncated")));
                }
                scan.vmlinuz = true;
            }
            Place::Builtin => {
                let data = read_capped(content, size, MAX_BUILTIN, path)?;
                scan.builtin = modules::parse_builtin(&String::from_utf8_lossy(&data));
            }
            Place::Module(rel) => {
                let data = read_capped(content, size, MAX_MODULE, path)?;
                let info: ModInfo = modules::parse_modinfo(&data)
                    .map_err(|e| DebError::Content(format!("module {path}: {e}")))?;
                check_vermagic(&info, release, path)?;
                let fallback = modules::name_from_path(&rel).unwrap_or_default();
                let name = info.name.unwrap_or(fallback);
                let module = Module {
                    path: rel,
                    depends: info.depends,
                };
                if let Some(other) = scan.modules.insert(name.clone(), module) {
                    return Err(DebError::Content(format!(
                        "two files claim to be module {name}: {} and {path}",
                        other.path
                    )));
                }
            }
            Place::Compressed => scan.compressed_modules += 1,
            Place::Other => {}
        }
        Ok(())
    })?;
    Ok(scan)
}

/// A module built for another kernel would be refused at load time anyway; refusing it here
/// says which file is wrong.
fn check_vermagic(info: &ModInfo, release: &str, path: &str) -> Result<(), DebError> {
    match &info.vermagic {
        Some(v) if v.split_whitespace().next() == Some(release) => Ok(()),
        Some(v) => Err(DebError::Content(format!(
            "module {path} was built for kernel {v:?}, not {release}"
        ))),
        None => Err(DebError::Content(format!("module {path} has no vermagic"))),
    }
}

/// Second pass: copies the modules at `paths` (below `lib/modules/RELEASE/`) into `cpio`
/// as `lib/modules/RELEASE/PATH`. Fails if one of them is not found.
pub fn copy_modules<W: Write>(
    dpkg_deb: &Path,
    deb: &Path,
    release: &str,
    paths: &BTreeSet<String>,
    cpio: &mut CpioWriter<W>,
) -> Result<(), DebError> {
    let mut copied = BTreeSet::new();
    for_each_file(dpkg_deb, deb, |path, size, content| {
        if let Place::Module(rel) = place(path, release) {
            if paths.contains(&rel) && !copied.contains(&rel) {
                cpio.file(
                    &format!("lib/modules/{release}/{rel}"),
                    0o644,
                    size,
                    content,
                )
                .map_err(|source| DebError::Write {
                    path: PathBuf::from(format!("(modules initrd) lib/modules/{release}/{rel}")),
                    source,
                })?;
                copied.insert(rel);
            }
        }
        Ok(())
    })?;
    if let Some(missing) = paths.difference(&copied).next() {
        return Err(DebError::Content(format!(
            "{missing} vanished between two reads of the package"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: &str = "6.1.0-50-cloud-amd64";

    #[test]
    fn only_the_kernel_its_modules_and_builtin_list_are_picked() {
        let m = |p: &str| match place(p, R) {
            Place::Module(rel) => Some(rel),
            _ => None,
        };
        assert!(matches!(
            place("./boot/vmlinuz-6.1.0-50-cloud-amd64", R),
            Place::Vmlinuz
        ));
        assert!(matches!(
            place("./boot/vmlinuz-6.1.0-49-cloud-amd64", R),
            Place::Other
        ));
        assert!(matches!(
            place("./boot/System.map-6.1.0-50-cloud-amd64", R),
            Place::Other
        ));
        assert!(matches!(
            place("./lib/modules/6.1.0-50-cloud-amd64/modules.builtin", R),
            Place::Builtin
        ));
        assert_eq!(
            m("./lib/modules/6.1.0-50-cloud-amd64/kernel/drivers/block/virtio_blk.ko").as_deref(),
            Some("kernel/drivers/block/virtio_blk.ko")
        );
        assert_eq!(
            m("./usr/lib/modules/6.1.0-50-cloud-amd64/kernel/net/vsock.ko").as_deref(),
            Some("kernel/net/vsock.ko")
        );
        assert!(matches!(
            place(
                "./lib/modules/6.1.0-50-cloud-amd64/kernel/net/vsock.ko.xz",
                R
            ),
            Place::Compressed
        ));
        for other in [
            "./lib/modules/6.1.0-50-cloud-amd64/kernel/../../../../etc/x.ko",
            "./lib/modules/6.1.0-50-cloud-amd64/extra/x.ko",
            "./lib/modules/6.1.0-50-cloud-amd64x/kernel/x.ko",
            "./lib/modules/6.1.0-50-cloud-amd64/kernel/a b.ko",
            "./lib/modules/6.1.0-50-cloud-amd64/kernel//x.ko",
            "./usr/share/doc/x.ko",
        ] {
            assert!(m(other).is_none(), "{other} was picked");
        }
    }

    #[test]
    fn modules_for_another_kernel_are_refused() {
        let info = |v: Option<&str>| ModInfo {
            name: None,
            depends: vec![],
            vermagic: v.map(str::to_owned),
        };
        check_vermagic(
            &info(Some("6.1.0-50-cloud-amd64 SMP mod_unload")),
            R,
            "m.ko",
        )
        .unwrap();
        let err = check_vermagic(&info(Some("6.1.0-49-cloud-amd64 SMP")), R, "m.ko").unwrap_err();
        assert!(err.to_string().contains("built for kernel"), "{err}");
        assert!(check_vermagic(&info(None), R, "m.ko").is_err());
    }

    #[test]
    fn a_file_that_is_not_a_package_fails_with_dpkg_debs_reason() {
        let dpkg_deb = crate::hosttools::require_tool("dpkg-deb", "dpkg").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let deb = dir.path().join("bad.deb");
        std::fs::write(&deb, b"this is not an ar archive").unwrap();
        let err = scan(&dpkg_deb, &deb, R, &dir.path().join("vmlinuz")).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, DebError::Dpkg { .. } | DebError::Tar(_)),
            "{text}"
        );
    }
}
