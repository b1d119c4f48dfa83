//! What kind of KVM a host offers, judged from `/dev/kvm`, `/sys/module` and `/proc/cpuinfo`
//! (read through [`HostFacts`]).
//!
//! `/dev/kvm` existing is not enough: inside some cloud VMs it is served by `kvm_pvm`, a
//! software nested mode that only boots PVM-enabled guest kernels. Firecracker needs hardware
//! KVM for ordinary kernels; QEMU can fall back to TCG.

use std::io;

use crate::host::{HostFacts, SystemHost};

/// The host's KVM, as far as VMM selection cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmMode {
    /// Intel VT-x through `kvm_intel`.
    HardwareIntel,
    /// AMD-V through `kvm_amd`.
    HardwareAmd,
    /// `/dev/kvm` is served by `kvm_pvm` (see `/sys/module/kvm_pvm`): nested, software-based,
    /// cannot boot ordinary kernels.
    NestedSoftware,
    /// `/dev/kvm` exists but cannot be used; the reason says why.
    Unusable(String),
    /// No `/dev/kvm`.
    Absent,
}

impl KvmMode {
    /// Hardware virtualisation that boots ordinary guest kernels.
    pub fn is_hardware(&self) -> bool {
        matches!(self, KvmMode::HardwareIntel | KvmMode::HardwareAmd)
    }

    /// One line for `doctor` output and selection reasons.
    pub fn describe(&self) -> String {
        match self {
            KvmMode::HardwareIntel => "hardware KVM (Intel VT-x, kvm_intel)".to_string(),
            KvmMode::HardwareAmd => "hardware KVM (AMD-V, kvm_amd)".to_string(),
            KvmMode::NestedSoftware => {
                "/dev/kvm is kvm_pvm, a nested software mode that cannot boot ordinary kernels"
                    .to_string()
            }
            KvmMode::Unusable(reason) => reason.clone(),
            KvmMode::Absent => "/dev/kvm does not exist (no KVM on this host)".to_string(),
        }
    }
}

/// Probes this host.
pub fn kvm_mode() -> KvmMode {
    kvm_mode_of(&SystemHost::this())
}

/// Judges the KVM of the host `host` describes: the one rule the daemon and `doctor` share.
pub fn kvm_mode_of<H: HostFacts + ?Sized>(host: &H) -> KvmMode {
    // VMMs open it read-write; so must we, to know they can.
    if let Err(e) = host.open_dev_kvm() {
        return match e.kind() {
            io::ErrorKind::NotFound => KvmMode::Absent,
            io::ErrorKind::PermissionDenied => KvmMode::Unusable(format!(
                "cannot open /dev/kvm read-write: {e} (add your user to the group that owns \
                 /dev/kvm, usually kvm)"
            )),
            _ => KvmMode::Unusable(format!("cannot open /dev/kvm read-write: {e}")),
        };
    }
    // kvm_pvm first: if it is loaded, it is what serves /dev/kvm, and treating a PVM host as
    // hardware would send ordinary kernels to a VMM that cannot boot them.
    if host.module_loaded("kvm_pvm") {
        return KvmMode::NestedSoftware;
    }
    if host.module_loaded("kvm_intel") {
        return KvmMode::HardwareIntel;
    }
    if host.module_loaded("kvm_amd") {
        return KvmMode::HardwareAmd;
    }
    // A vendor module built into the kernel may have no /sys/module entry; the CPU flags tell.
    let cpuinfo = host.cpuinfo();
    let has_flag = |flag: &str| {
        cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == flag))
    };
    if has_flag("vmx") {
        KvmMode::HardwareIntel
    } else if has_flag("svm") {
        KvmMode::HardwareAmd
    } else {
        KvmMode::Unusable(
            "/dev/kvm exists but no KVM vendor module (kvm_intel, kvm_amd) is loaded and the \
             CPU shows no vmx or svm flag"
                .to_string(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn probe(root: &std::path::Path) -> KvmMode {
        kvm_mode_of(&SystemHost::at(root, None))
    }

    fn fake_root(dev_kvm: bool, modules: &[&str], cpu_flags: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("dev")).unwrap();
        fs::create_dir_all(root.path().join("proc")).unwrap();
        if dev_kvm {
            fs::write(root.path().join("dev/kvm"), "").unwrap();
        }
        for m in modules {
            fs::create_dir_all(root.path().join("sys/module").join(m)).unwrap();
        }
        fs::write(
            root.path().join("proc/cpuinfo"),
            format!("processor\t: 0\nflags\t\t: fpu sse2 {cpu_flags}\n"),
        )
        .unwrap();
        root
    }

    #[test]
    fn no_dev_kvm_is_absent() {
        let root = fake_root(false, &["kvm", "kvm_intel"], "vmx");
        assert_eq!(probe(root.path()), KvmMode::Absent);
    }

    #[test]
    fn kvm_pvm_is_nested_software_even_with_cpu_flags() {
        let root = fake_root(true, &["kvm", "kvm_pvm"], "vmx");
        let mode = probe(root.path());
        assert_eq!(mode, KvmMode::NestedSoftware);
        assert!(!mode.is_hardware());
        assert!(mode.describe().contains("kvm_pvm"));
    }

    #[test]
    fn vendor_modules_are_hardware() {
        let root = fake_root(true, &["kvm", "kvm_intel"], "");
        assert_eq!(probe(root.path()), KvmMode::HardwareIntel);
        let root = fake_root(true, &["kvm", "kvm_amd"], "");
        assert_eq!(probe(root.path()), KvmMode::HardwareAmd);
        assert!(KvmMode::HardwareAmd.is_hardware());
    }

    #[test]
    fn built_in_vendor_module_is_found_through_cpu_flags() {
        let root = fake_root(true, &[], "svm");
        assert_eq!(probe(root.path()), KvmMode::HardwareAmd);
        // A flag that merely contains "vmx" is not vmx.
        let root = fake_root(true, &[], "vmxfoo");
        assert!(matches!(probe(root.path()), KvmMode::Unusable(_)));
    }

    #[test]
    fn this_host_is_probed_without_panicking() {
        // The real host: whatever it is, describe() must say something.
        assert!(!kvm_mode().describe().is_empty());
    }
}
