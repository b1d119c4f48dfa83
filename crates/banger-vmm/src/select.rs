//! Choosing the backend: the user's `vmm` setting against what each backend says about the host
//! ([`BackendKind::availability`]). `auto` takes the first backend, in [`BackendKind::ALL`]'s
//! order, that the host runs without a caveat (Firecracker needs its binary and hardware KVM;
//! QEMU only its binary, and runs under TCG without hardware KVM); a backend named in the config
//! is taken whenever it can run at all. The reason for the choice is one line for the daemon
//! log, `vm create` and `doctor`.
//!
//! [`select`] is the one rule, for the daemon and `banger doctor` alike; [`Backends`] is what
//! the daemon keeps of its outcome: the backend new VMs start on, and one backend of every kind
//! to stop, watch and reach VMs that an earlier configuration started.

use std::path::PathBuf;
use std::sync::Arc;

use banger_config::{Config, VmmChoice};

use crate::host::{HostFacts, SystemHost};
use crate::kvm::KvmMode;
use crate::{BackendKind, VmHandle, Vmm, VmmError};

/// The user's say in the choice: config keys `vmm` and `firecracker_bin`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmmSettings {
    pub preference: VmmChoice,
    /// Firecracker's program: a path, or a name looked up on `PATH` (default `firecracker`).
    pub firecracker_bin: Option<PathBuf>,
}

impl VmmSettings {
    pub fn from_config(config: &Config) -> VmmSettings {
        VmmSettings {
            preference: config.vmm,
            firecracker_bin: config.firecracker_bin.clone(),
        }
    }
}

/// What a host offers one backend, as the backend module judges it.
#[derive(Debug)]
pub struct Availability {
    pub kind: BackendKind,
    /// Whether the host's virtualization lets the backend boot ordinary guests.
    pub support: Support,
    /// The backend's program, or why it was not found.
    pub binary: Result<PathBuf, VmmError>,
    /// How reasons name the backend: `firecracker (/usr/bin/firecracker)`, `qemu (TCG)`.
    pub label: String,
    /// The host's KVM, as the backend was judged against it.
    pub kvm: KvmMode,
}

/// The host's side of [`Availability`].
#[derive(Debug)]
pub enum Support {
    /// Boots ordinary guest kernels here.
    Full,
    /// Runs, but with a limit `auto` does not accept (Firecracker on `kvm_pvm`); taken only when
    /// named in the config.
    Limited {
        why: String,
        consequence: &'static str,
    },
    /// Cannot run here; `why` is the short form of `error` for the reasons of others.
    Unusable { why: String, error: VmmError },
}

impl Availability {
    /// Why `auto` passes this backend over; `None` when it runs here without a caveat.
    pub fn shortfall(&self) -> Option<String> {
        match (&self.support, &self.binary) {
            (Support::Unusable { why, .. } | Support::Limited { why, .. }, _) => Some(why.clone()),
            (
                Support::Full,
                Err(VmmError::BinaryNotFound {
                    binary, searched, ..
                }),
            ) => Some(format!("{binary} not found ({searched})")),
            (Support::Full, Err(e)) => Some(e.to_string()),
            (Support::Full, Ok(_)) => None,
        }
    }
}

/// The chosen backend and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub kind: BackendKind,
    pub binary: PathBuf,
    pub kvm: KvmMode,
    /// One line, e.g. `qemu (TCG): /dev/kvm is kvm_pvm, a nested software mode that ...`.
    pub reason: String,
}

/// Picks the backend for the host `host` describes.
pub fn select(host: &dyn HostFacts, settings: &VmmSettings) -> Result<Choice, VmmError> {
    match settings.preference {
        VmmChoice::Auto => auto(host, settings),
        VmmChoice::Firecracker => named(BackendKind::Firecracker.availability(host, settings)),
        VmmChoice::Qemu => named(BackendKind::Qemu.availability(host, settings)),
    }
}

/// The backend the config names: its program first, then whether the host can run it.
fn named(a: Availability) -> Result<Choice, VmmError> {
    let binary = a.binary?;
    let reason = match a.support {
        Support::Unusable { error, .. } => return Err(error),
        Support::Limited { why, consequence } => {
            format!("{}: configured, but {why}; {consequence}", a.label)
        }
        Support::Full => format!("{}: configured; {}", a.label, a.kvm.describe()),
    };
    Ok(Choice {
        kind: a.kind,
        binary,
        kvm: a.kvm,
        reason,
    })
}

/// The backend `auto` falls back to when none before it runs here without a caveat.
const FALLBACK: BackendKind = BackendKind::ALL[BackendKind::ALL.len() - 1];

fn auto(host: &dyn HostFacts, settings: &VmmSettings) -> Result<Choice, VmmError> {
    let mut passed_over: Vec<String> = Vec::new();
    for kind in &BackendKind::ALL[..BackendKind::ALL.len() - 1] {
        let a = kind.availability(host, settings);
        match (a.shortfall(), a.binary) {
            (None, Ok(binary)) => {
                let reason = format!("{}: found, and {}", a.label, a.kvm.describe());
                return Ok(Choice {
                    kind: a.kind,
                    binary,
                    kvm: a.kvm,
                    reason,
                });
            }
            (shortfall, _) => passed_over.extend(shortfall),
        }
    }
    let a = FALLBACK.availability(host, settings);
    let why = passed_over.join("; ");
    match (a.binary, a.support) {
        (
            Err(VmmError::BinaryNotFound {
                backend,
                binary,
                searched,
                install,
            }),
            _,
        ) => Err(VmmError::BinaryNotFound {
            backend,
            binary,
            searched: format!("{searched}; auto fell back to {FALLBACK} because {why}"),
            install,
        }),
        (Err(e), _) | (Ok(_), Support::Unusable { error: e, .. }) => Err(e),
        // The last resort is taken even with a caveat, which the reason then names.
        (Ok(binary), support) => {
            let limit = match support {
                Support::Limited { why, consequence } => format!(", but {why}; {consequence}"),
                _ => String::new(),
            };
            Ok(Choice {
                kind: a.kind,
                binary,
                reason: format!("{}: {why}{limit}", a.label),
                kvm: a.kvm,
            })
        }
    }
}

/// What the daemon keeps of the choice: the backend new VMs start on (or why there is none),
/// and a backend of every kind for VMs whose handle names another kind (the config changed
/// while they ran). Cheap to clone.
#[derive(Clone)]
pub struct Backends {
    new_vms: Result<Arc<dyn Vmm>, Arc<VmmError>>,
    reason: String,
    by_kind: Vec<Arc<dyn Vmm>>,
    /// Answers for handles of a kind none of `by_kind` has.
    fallback: Arc<dyn Vmm>,
}

impl Backends {
    /// Chooses for this machine ([`select`]) and logs the choice.
    pub fn for_this_host(settings: &VmmSettings) -> Backends {
        let choice = select(&SystemHost::this(), settings);
        match &choice {
            Ok(c) => tracing::info!("VMM: {}", c.reason),
            Err(e) => tracing::warn!("no usable VMM: {e}"),
        }
        Backends::from_choice(choice)
    }

    /// The backends for a choice. The other kinds run their usual program name: they only
    /// stop, watch and reach VMs, which needs no program.
    pub fn from_choice(choice: Result<Choice, VmmError>) -> Backends {
        let (new_vms, reason) = match choice {
            Ok(c) => (Ok(c.kind.backend(c.binary, c.kvm)), c.reason),
            Err(e) => {
                let reason = e.to_string();
                (Err(Arc::new(e)), reason)
            }
        };
        let idle = |kind: BackendKind| kind.backend(PathBuf::from(kind.program()), KvmMode::Absent);
        let mut by_kind: Vec<Arc<dyn Vmm>> = new_vms.iter().cloned().collect();
        for kind in BackendKind::ALL {
            if !by_kind.iter().any(|b| b.kind() == kind) {
                by_kind.push(idle(kind));
            }
        }
        let fallback = new_vms.as_ref().map_or_else(|_| idle(FALLBACK), Arc::clone);
        Backends {
            new_vms,
            reason,
            by_kind,
            fallback,
        }
    }

    /// One backend for everything, whatever kind a handle names (tests with a fake VMM).
    pub fn only(vmm: Arc<dyn Vmm>, reason: impl Into<String>) -> Backends {
        Backends {
            new_vms: Ok(vmm.clone()),
            reason: reason.into(),
            by_kind: Vec::new(),
            fallback: vmm,
        }
    }

    /// The backend new VMs start on, or why no VMM can run here.
    pub fn for_new_vms(&self) -> Result<&Arc<dyn Vmm>, &VmmError> {
        self.new_vms.as_ref().map_err(|e| &**e)
    }

    /// Why new VMs run on what they run on (or why nothing can run them): one line.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// A VMM some backend started for `vm` in `run_dir` that nobody recorded (see
    /// [`Vmm::leftover`]), with the backend to stop it.
    pub fn leftover(
        &self,
        vm: &str,
        run_dir: &std::path::Path,
    ) -> Option<(&Arc<dyn Vmm>, VmHandle)> {
        self.by_kind
            .iter()
            .chain(std::iter::once(&self.fallback))
            .find_map(|b| Some((b, b.leftover(vm, run_dir)?)))
    }

    /// The backend that started `handle`'s VMM.
    pub fn for_handle(&self, handle: &VmHandle) -> &Arc<dyn Vmm> {
        self.by_kind
            .iter()
            .find(|b| b.kind() == handle.backend)
            .unwrap_or(&self.fallback)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::PROGRAM as QEMU_BIN;
    use std::ffi::{OsStr, OsString};
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    /// A host with a fixed KVM mode and programs on the given PATH.
    struct FakeHost {
        kvm: KvmMode,
        path: Option<OsString>,
    }

    impl HostFacts for FakeHost {
        fn open_dev_kvm(&self) -> std::io::Result<()> {
            unreachable!("kvm() answers directly")
        }
        fn module_loaded(&self, _: &str) -> bool {
            unreachable!("kvm() answers directly")
        }
        fn cpuinfo(&self) -> String {
            unreachable!("kvm() answers directly")
        }
        fn find_on_path(&self, name: &OsStr) -> Option<PathBuf> {
            crate::host::find_in_path(name, self.path.as_deref())
        }
        fn is_executable(&self, path: &Path) -> bool {
            SystemHost::this().is_executable(path)
        }
        fn kvm(&self) -> KvmMode {
            self.kvm.clone()
        }
    }

    fn decide(
        preference: VmmChoice,
        firecracker_bin: Option<&Path>,
        kvm: &KvmMode,
        path: Option<&OsString>,
    ) -> Result<Choice, VmmError> {
        let host = FakeHost {
            kvm: kvm.clone(),
            path: path.cloned(),
        };
        let settings = VmmSettings {
            preference,
            firecracker_bin: firecracker_bin.map(Path::to_path_buf),
        };
        select(&host, &settings)
    }

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
            VmmChoice::Auto,
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
            VmmChoice::Auto,
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
            VmmChoice::Auto,
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
            VmmChoice::Auto,
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
            VmmChoice::Firecracker,
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
            VmmChoice::Firecracker,
            Some(&bin),
            &KvmMode::HardwareIntel,
            None,
        )
        .unwrap();
        assert_eq!(c.binary, bin);
        let err = decide(VmmChoice::Firecracker, Some(&bin), &KvmMode::Absent, None).unwrap_err();
        assert!(matches!(err, VmmError::KvmUnusable { .. }), "{err}");
        let err = decide(
            VmmChoice::Firecracker,
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
            VmmChoice::Auto,
            Some(Path::new("firecracker-v1.16.1")),
            &KvmMode::HardwareIntel,
            Some(&path_of(&dir)),
        )
        .unwrap();
        assert_eq!(c.binary, dir.path().join("firecracker-v1.16.1"));
    }

    #[test]
    fn select_on_this_host_finds_qemu() {
        // This machine has qemu-system-x86 installed and no firecracker; whatever KVM it has,
        // auto must produce a working choice with a reason.
        let b = Backends::for_this_host(&VmmSettings::default());
        println!("auto on this host: {}", b.reason());
        let vmm = b.for_new_vms().unwrap();
        assert!(
            b.reason().starts_with(vmm.kind().as_str()),
            "{}",
            b.reason()
        );
    }
}
