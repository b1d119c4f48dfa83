//! Choosing the backend: the user's preference (`vmm` in config) against what the host has.
//! `auto` picks Firecracker only when its binary exists and KVM is hardware KVM; otherwise QEMU,
//! which uses KVM when it is hardware and TCG when it is not. The reason for the choice is
//! returned as one line for `doctor` and the daemon log.

use std::ffi::{OsStr, OsString};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::firecracker::FirecrackerBackend;
use crate::kvm::{kvm_mode, KvmMode};
use crate::qemu::QemuBackend;
use crate::{BackendKind, Vmm, VmmError};

pub(crate) const QEMU_BIN: &str = "qemu-system-x86_64";
pub(crate) const FIRECRACKER_BIN: &str = "firecracker";
const QEMU_INSTALL: &str = "it comes with the Debian package qemu-system-x86";
const FIRECRACKER_INSTALL: &str = "Firecracker is not packaged by Debian: take the \
     firecracker-vX.Y.Z-x86_64 binary from the release tarball on Firecracker's GitHub releases page";

/// The `vmm` config value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmmPreference {
    #[default]
    Auto,
    Firecracker,
    Qemu,
}

impl FromStr for VmmPreference {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(VmmPreference::Auto),
            "firecracker" => Ok(VmmPreference::Firecracker),
            "qemu" => Ok(VmmPreference::Qemu),
            other => Err(format!(
                "unknown vmm {other:?}: expected \"auto\", \"firecracker\" or \"qemu\""
            )),
        }
    }
}

/// The chosen backend and why.
pub struct Selection {
    pub backend: Box<dyn Vmm>,
    /// One line, e.g. `qemu (TCG): /dev/kvm is kvm_pvm, a nested software mode that ...`.
    pub reason: String,
}

impl std::fmt::Debug for Selection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Selection")
            .field("backend", &self.backend.kind())
            .field("reason", &self.reason)
            .finish()
    }
}

/// Picks the backend for this host. `firecracker_bin` is the configured path or name (default:
/// `firecracker` on PATH).
pub fn select(pref: VmmPreference, firecracker_bin: Option<&Path>) -> Result<Selection, VmmError> {
    let kvm = kvm_mode();
    let choice = decide(
        pref,
        firecracker_bin,
        &kvm,
        std::env::var_os("PATH").as_deref(),
    )?;
    let backend: Box<dyn Vmm> = match choice.kind {
        BackendKind::Firecracker => Box::new(FirecrackerBackend::new(choice.binary)),
        BackendKind::Qemu => Box::new(QemuBackend::new(choice.binary, kvm)),
    };
    Ok(Selection {
        backend,
        reason: choice.reason,
    })
}

/// The pure decision behind [`select`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Choice {
    pub kind: BackendKind,
    pub binary: PathBuf,
    pub reason: String,
}

pub(crate) fn decide(
    pref: VmmPreference,
    firecracker_bin: Option<&Path>,
    kvm: &KvmMode,
    path_var: Option<&OsStr>,
) -> Result<Choice, VmmError> {
    let accel = if kvm.is_hardware() { "KVM" } else { "TCG" };
    match pref {
        VmmPreference::Firecracker => {
            let binary = resolve_firecracker(firecracker_bin, path_var)?;
            let reason = match kvm {
                KvmMode::Absent | KvmMode::Unusable(_) => {
                    return Err(VmmError::KvmUnusable {
                        reason: kvm.describe(),
                    })
                }
                KvmMode::NestedSoftware => format!(
                    "firecracker ({}): configured, but {}; only PVM-enabled guest kernels boot",
                    binary.display(),
                    kvm.describe()
                ),
                _ => format!(
                    "firecracker ({}): configured; {}",
                    binary.display(),
                    kvm.describe()
                ),
            };
            Ok(Choice {
                kind: BackendKind::Firecracker,
                binary,
                reason,
            })
        }
        VmmPreference::Qemu => {
            let binary = resolve_qemu(path_var, "configured")?;
            Ok(Choice {
                kind: BackendKind::Qemu,
                reason: format!("qemu ({accel}): configured; {}", kvm.describe()),
                binary,
            })
        }
        VmmPreference::Auto => {
            let firecracker = resolve_firecracker(firecracker_bin, path_var);
            if let (Ok(binary), true) = (&firecracker, kvm.is_hardware()) {
                return Ok(Choice {
                    kind: BackendKind::Firecracker,
                    reason: format!(
                        "firecracker ({}): found, and {}",
                        binary.display(),
                        kvm.describe()
                    ),
                    binary: binary.clone(),
                });
            }
            let why = if !kvm.is_hardware() {
                kvm.describe()
            } else {
                match &firecracker {
                    Err(VmmError::BinaryNotFound {
                        binary, searched, ..
                    }) => format!("{binary} not found ({searched})"),
                    _ => "firecracker unavailable".to_string(),
                }
            };
            let binary = resolve_qemu(path_var, &format!("auto chose QEMU because {why}"))?;
            Ok(Choice {
                kind: BackendKind::Qemu,
                reason: format!("qemu ({accel}): {why}"),
                binary,
            })
        }
    }
}

fn resolve_qemu(path_var: Option<&OsStr>, context: &str) -> Result<PathBuf, VmmError> {
    find_in_path(OsStr::new(QEMU_BIN), path_var).ok_or_else(|| VmmError::BinaryNotFound {
        backend: BackendKind::Qemu,
        binary: QEMU_BIN.to_string(),
        searched: format!("searched PATH; {context}"),
        install: QEMU_INSTALL.to_string(),
    })
}

fn resolve_firecracker(
    configured: Option<&Path>,
    path_var: Option<&OsStr>,
) -> Result<PathBuf, VmmError> {
    match configured {
        // A bare name is looked up on PATH like a shell would; anything with a slash is a path.
        Some(p) if p.components().count() > 1 || p.is_absolute() => {
            if is_executable(p) {
                Ok(p.to_path_buf())
            } else {
                Err(VmmError::BinaryNotFound {
                    backend: BackendKind::Firecracker,
                    binary: p.display().to_string(),
                    searched: "configured firecracker_bin is not an executable file".to_string(),
                    install: FIRECRACKER_INSTALL.to_string(),
                })
            }
        }
        other => {
            let name = other.map_or(OsStr::new(FIRECRACKER_BIN), |p| p.as_os_str());
            find_in_path(name, path_var).ok_or_else(|| VmmError::BinaryNotFound {
                backend: BackendKind::Firecracker,
                binary: name.to_string_lossy().into_owned(),
                searched: "searched PATH".to_string(),
                install: FIRECRACKER_INSTALL.to_string(),
            })
        }
    }
}

/// The first executable `name` in the `PATH`-style list.
pub(crate) fn find_in_path(name: &OsStr, path_var: Option<&OsStr>) -> Option<PathBuf> {
    let path_var: OsString = path_var.map(OsStr::to_os_string).unwrap_or_default();
    std::env::split_paths(&path_var)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// A PATH with fake executables of the given names.
    fn fake_path(names: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for n in names {
            let p = dir.path().join(n);
            fs::write(&p, "#!/bin/sh\n").unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        }
        dir
    }

    fn path_of(dir: &tempfile::TempDir) -> OsString {
        dir.path().as_os_str().to_os_string()
    }

    #[test]
    fn auto_picks_firecracker_with_binary_and_hardware_kvm() {
        let dir = fake_path(&["firecracker", QEMU_BIN]);
        let c = decide(
            VmmPreference::Auto,
            None,
            &KvmMode::HardwareIntel,
            Some(&path_of(&dir)),
        )
        .unwrap();
        assert_eq!(c.kind, BackendKind::Firecracker);
        assert_eq!(c.binary, dir.path().join("firecracker"));
        assert!(c.reason.starts_with("firecracker ("), "{}", c.reason);
    }

    #[test]
    fn auto_picks_qemu_tcg_on_kvm_pvm_and_says_why() {
        let dir = fake_path(&["firecracker", QEMU_BIN]);
        let c = decide(
            VmmPreference::Auto,
            None,
            &KvmMode::NestedSoftware,
            Some(&path_of(&dir)),
        )
        .unwrap();
        assert_eq!(c.kind, BackendKind::Qemu);
        assert_eq!(
            c.reason,
            "qemu (TCG): /dev/kvm is kvm_pvm, a nested software mode that cannot boot ordinary kernels"
        );
    }

    #[test]
    fn auto_picks_qemu_kvm_when_firecracker_is_missing() {
        let dir = fake_path(&[QEMU_BIN]);
        let c = decide(
            VmmPreference::Auto,
            None,
            &KvmMode::HardwareAmd,
            Some(&path_of(&dir)),
        )
        .unwrap();
        assert_eq!(c.kind, BackendKind::Qemu);
        assert_eq!(
            c.reason,
            "qemu (KVM): firecracker not found (searched PATH)"
        );
    }

    #[test]
    fn auto_without_any_vmm_names_qemu_and_its_debian_package() {
        let dir = fake_path(&[]);
        let err = decide(
            VmmPreference::Auto,
            None,
            &KvmMode::Absent,
            Some(&path_of(&dir)),
        )
        .unwrap_err();
        let msg = err.report();
        assert!(msg.contains("qemu-system-x86_64 not found"), "{msg}");
        assert!(msg.contains("qemu-system-x86"), "{msg}");
        assert!(msg.contains("/dev/kvm does not exist"), "{msg}");
    }

    #[test]
    fn explicit_firecracker_missing_says_where_to_get_it() {
        let dir = fake_path(&[QEMU_BIN]);
        let err = decide(
            VmmPreference::Firecracker,
            None,
            &KvmMode::HardwareIntel,
            Some(&path_of(&dir)),
        )
        .unwrap_err();
        let msg = err.report();
        assert!(
            msg.starts_with("firecracker not found (searched PATH)"),
            "{msg}"
        );
        assert!(msg.contains("release"), "{msg}");
        assert!(msg.contains("hint: set firecracker_bin"), "{msg}");
    }

    #[test]
    fn explicit_firecracker_uses_configured_path_and_needs_kvm() {
        let dir = fake_path(&["fc-1.16"]);
        let bin = dir.path().join("fc-1.16");
        let c = decide(
            VmmPreference::Firecracker,
            Some(&bin),
            &KvmMode::HardwareIntel,
            None,
        )
        .unwrap();
        assert_eq!(c.binary, bin);
        let err = decide(
            VmmPreference::Firecracker,
            Some(&bin),
            &KvmMode::Absent,
            None,
        )
        .unwrap_err();
        assert!(matches!(err, VmmError::KvmUnusable { .. }), "{err}");
        let err = decide(
            VmmPreference::Firecracker,
            Some(&dir.path().join("nope")),
            &KvmMode::HardwareIntel,
            None,
        )
        .unwrap_err();
        let msg = err.report();
        assert!(msg.contains("nope"), "{msg}");
        assert!(msg.contains("hint: set firecracker_bin"), "{msg}");
    }

    #[test]
    fn configured_bare_name_is_searched_on_path() {
        let dir = fake_path(&["firecracker-v1.16.1"]);
        let c = decide(
            VmmPreference::Auto,
            Some(Path::new("firecracker-v1.16.1")),
            &KvmMode::HardwareIntel,
            Some(&path_of(&dir)),
        )
        .unwrap();
        assert_eq!(c.binary, dir.path().join("firecracker-v1.16.1"));
    }

    #[test]
    fn non_executable_files_are_not_binaries() {
        let dir = fake_path(&[]);
        fs::write(dir.path().join(QEMU_BIN), "").unwrap();
        assert_eq!(
            find_in_path(OsStr::new(QEMU_BIN), Some(&path_of(&dir))),
            None
        );
    }

    #[test]
    fn preference_parses_config_values() {
        assert_eq!("auto".parse(), Ok(VmmPreference::Auto));
        assert_eq!("qemu".parse(), Ok(VmmPreference::Qemu));
        assert!("kvm"
            .parse::<VmmPreference>()
            .unwrap_err()
            .contains("\"kvm\""));
    }

    #[test]
    fn select_on_this_host_finds_qemu() {
        // This machine has qemu-system-x86 installed and no firecracker; whatever KVM it has,
        // auto must produce a working choice with a reason.
        let s = select(VmmPreference::Auto, None).unwrap();
        println!("auto on this host: {}", s.reason);
        assert!(
            s.reason.starts_with(s.backend.kind().as_str()),
            "{}",
            s.reason
        );
    }
}
