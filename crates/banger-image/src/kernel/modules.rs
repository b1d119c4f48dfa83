//! Which kernel modules a banger guest loads, and in which order.
//!
//! The Debian package ships no `modules.dep` (depmod runs at install time), so the dependency
//! graph is read from each module itself: the `depends=` entry of its `.modinfo` ELF section
//! (a list of module names, NUL-separated `key=value` strings, written by modpost). Modules
//! named in `modules.builtin` are part of the kernel image and need no loading. The load
//! order is the closure of [`ROOTS`], dependencies first, deterministic for a given package.
//!
//! Module names treat `-` and `_` as the same character, as the kernel and modprobe do
//! (`virtio-rng.ko` is the module `virtio_rng`); names here are kept in the `_` form.

use std::collections::{BTreeMap, BTreeSet};

use object::read::elf::ElfFile64;
use object::{Endianness, Object, ObjectSection};

/// The modules a banger guest needs: the virtio transports (MMIO for microvm and Firecracker,
/// PCI for other machines), block, network, console (the agent's virtio-serial port), the
/// entropy device, vsock (Firecracker's agent channel), and the ACPI power button with the
/// event interface init reads it through (QEMU's graceful stop presses it).
pub const ROOTS: [&str; 9] = [
    "virtio_mmio",
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
    "vmw_vsock_virtio_transport",
    "button",
    "evdev",
];

/// What a module says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModInfo {
    /// `name=`, normalised (absent in very old modules; the caller then uses the file name).
    pub name: Option<String>,
    /// `depends=`, normalised, in the order given.
    pub depends: Vec<String>,
    /// `vermagic=`: starts with the kernel release the module was built for.
    pub vermagic: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModuleError {
    #[error("not a 64-bit ELF object: {0}")]
    NotElf(String),
    #[error("it has no .modinfo section")]
    NoModinfo,
    #[error("its .modinfo section cannot be read: {0}")]
    BadModinfo(String),
    #[error("module {name} is needed{}, but the package has no {name}.ko and the kernel does not build it in", via.as_ref().map(|v| format!(" by {v}")).unwrap_or_default())]
    Missing { name: String, via: Option<String> },
    #[error("modules depend on each other in a cycle: {}", .0.join(" -> "))]
    Cycle(Vec<String>),
}

/// `virtio-rng` -> `virtio_rng`.
pub fn normalise(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name for a path such as `kernel/drivers/char/hw_random/virtio-rng.ko`.
pub fn name_from_path(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let stem = file.strip_suffix(".ko")?;
    (!stem.is_empty()).then(|| normalise(stem))
}

/// Reads the `.modinfo` section of a module (`.ko`).
pub fn parse_modinfo(ko: &[u8]) -> Result<ModInfo, ModuleError> {
    let elf = ElfFile64::<Endianness>::parse(ko).map_err(|e| ModuleError::NotElf(e.to_string()))?;
    let section = elf
        .section_by_name(".modinfo")
        .ok_or(ModuleError::NoModinfo)?;
    let data = section
        .data()
        .map_err(|e| ModuleError::BadModinfo(e.to_string()))?;
    Ok(modinfo_from_section(data))
}

/// Parses the NUL-separated `key=value` strings of a `.modinfo` section. Unknown keys and
/// entries that are not UTF-8 are skipped; a key given twice keeps its first value.
pub fn modinfo_from_section(data: &[u8]) -> ModInfo {
    let mut info = ModInfo {
        name: None,
        depends: Vec::new(),
        vermagic: None,
    };
    let mut seen_depends = false;
    for entry in data.split(|b| *b == 0) {
        let Ok(entry) = std::str::from_utf8(entry) else {
            continue;
        };
        let Some((key, value)) = entry.split_once('=') else {
            continue;
        };
        match key {
            "name" if info.name.is_none() && !value.is_empty() => {
                info.name = Some(normalise(value));
            }
            "depends" if !seen_depends => {
                seen_depends = true;
                info.depends = value
                    .split(',')
                    .map(str::trim)
                    .filter(|d| !d.is_empty())
                    .map(normalise)
                    .collect();
            }
            "vermagic" if info.vermagic.is_none() => info.vermagic = Some(value.to_owned()),
            _ => {}
        }
    }
    info
}

/// Names of the modules listed in `modules.builtin` (one path per line).
pub fn parse_builtin(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| name_from_path(l.trim()))
        .collect()
}

/// The modules to load for `roots`, dependencies first. `depends` maps each module the
/// package ships to its dependencies; `builtin` names modules built into the kernel, which
/// are left out. Each module's dependencies are visited in name order, so the result does not
/// depend on the order modpost happened to write them in.
pub fn load_order(
    roots: &[&str],
    depends: &BTreeMap<String, Vec<String>>,
    builtin: &BTreeSet<String>,
) -> Result<Vec<String>, ModuleError> {
    struct Walk<'a> {
        depends: &'a BTreeMap<String, Vec<String>>,
        builtin: &'a BTreeSet<String>,
        done: BTreeSet<String>,
        order: Vec<String>,
        path: Vec<String>,
    }
    impl Walk<'_> {
        fn visit(&mut self, name: &str) -> Result<(), ModuleError> {
            if self.done.contains(name) || self.builtin.contains(name) {
                return Ok(());
            }
            if let Some(at) = self.path.iter().position(|p| p == name) {
                let mut cycle = self.path[at..].to_vec();
                cycle.push(name.to_owned());
                return Err(ModuleError::Cycle(cycle));
            }
            let Some(deps) = self.depends.get(name) else {
                return Err(ModuleError::Missing {
                    name: name.to_owned(),
                    via: self.path.last().cloned(),
                });
            };
            let mut deps = deps.clone();
            deps.sort();
            deps.dedup();
            self.path.push(name.to_owned());
            for d in &deps {
                self.visit(d)?;
            }
            self.path.pop();
            self.done.insert(name.to_owned());
            self.order.push(name.to_owned());
            Ok(())
        }
    }
    let mut walk = Walk {
        depends,
        builtin,
        done: BTreeSet::new(),
        order: Vec::new(),
        path: Vec::new(),
    };
    for root in roots {
        walk.visit(&normalise(root))?;
    }
    Ok(walk.order)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        edges
            .iter()
            .map(|(m, d)| (m.to_string(), d.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    /// The graph of Debian 12's cloud kernel for banger's roots, as read from its modules.
    fn debian_cloud() -> BTreeMap<String, Vec<String>> {
        graph(&[
            ("virtio", &[]),
            ("virtio_ring", &[]),
            ("virtio_mmio", &["virtio", "virtio_ring"]),
            (
                "virtio_pci",
                &[
                    "virtio_ring",
                    "virtio_pci_modern_dev",
                    "virtio_pci_legacy_dev",
                    "virtio",
                ],
            ),
            ("virtio_pci_modern_dev", &[]),
            ("virtio_pci_legacy_dev", &[]),
            ("virtio_blk", &["virtio", "virtio_ring"]),
            ("virtio_net", &["virtio_ring", "virtio", "net_failover"]),
            ("net_failover", &["failover"]),
            ("failover", &[]),
            ("virtio_console", &["virtio", "virtio_ring"]),
            ("virtio_rng", &["virtio", "virtio_ring"]),
            (
                "vmw_vsock_virtio_transport",
                &[
                    "virtio",
                    "vmw_vsock_virtio_transport_common",
                    "virtio_ring",
                    "vsock",
                ],
            ),
            ("vmw_vsock_virtio_transport_common", &["vsock"]),
            ("vsock", &[]),
            ("button", &[]),
            ("evdev", &[]),
            ("ext4", &["jbd2"]),
        ])
    }

    #[test]
    fn closure_of_the_roots_lists_dependencies_first() {
        let order = load_order(&ROOTS, &debian_cloud(), &BTreeSet::new()).unwrap();
        assert_eq!(
            order,
            [
                "virtio",
                "virtio_ring",
                "virtio_mmio",
                "virtio_pci_legacy_dev",
                "virtio_pci_modern_dev",
                "virtio_pci",
                "virtio_blk",
                "failover",
                "net_failover",
                "virtio_net",
                "virtio_console",
                "virtio_rng",
                "vsock",
                "vmw_vsock_virtio_transport_common",
                "vmw_vsock_virtio_transport",
                "button",
                "evdev",
            ]
        );
    }

    #[test]
    fn builtin_modules_are_skipped_even_as_roots_and_dependency_order_is_irrelevant() {
        let builtin =
            parse_builtin("kernel/drivers/virtio/virtio.ko\nkernel/drivers/block/virtio_blk.ko\n");
        let mut g = debian_cloud();
        g.get_mut("virtio_pci").unwrap().reverse();
        let order = load_order(&["virtio_blk", "virtio_pci"], &g, &builtin).unwrap();
        assert_eq!(
            order,
            [
                "virtio_pci_legacy_dev",
                "virtio_pci_modern_dev",
                "virtio_ring",
                "virtio_pci"
            ]
        );
    }

    #[test]
    fn a_missing_module_names_who_needs_it() {
        let mut g = debian_cloud();
        g.remove("failover");
        let err = load_order(&["virtio_net"], &g, &BTreeSet::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "module failover is needed by net_failover, but the package has no failover.ko \
             and the kernel does not build it in"
        );
        let err = load_order(&["virtio-rng"], &BTreeMap::new(), &BTreeSet::new()).unwrap_err();
        assert_eq!(
            err,
            ModuleError::Missing {
                name: "virtio_rng".into(),
                via: None
            }
        );
    }

    #[test]
    fn a_dependency_cycle_is_an_error_not_a_hang() {
        let g = graph(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"])]);
        let err = load_order(&["a"], &g, &BTreeSet::new()).unwrap_err();
        assert_eq!(
            err,
            ModuleError::Cycle(vec!["a".into(), "b".into(), "c".into(), "a".into()])
        );
    }

    #[test]
    fn modinfo_strings_are_parsed_and_odd_entries_ignored() {
        let section = b"license=GPL\0depends=virtio,virtio-ring,\0retpoline=Y\0\xff\xfe\0\0\0\
                        name=virtio-rng\0vermagic=6.1.0-50-cloud-amd64 SMP mod_unload modversions \0\
                        depends=other\0noequals\0";
        assert_eq!(
            modinfo_from_section(section),
            ModInfo {
                name: Some("virtio_rng".into()),
                depends: vec!["virtio".into(), "virtio_ring".into()],
                vermagic: Some("6.1.0-50-cloud-amd64 SMP mod_unload modversions ".into()),
            }
        );
        assert_eq!(
            modinfo_from_section(b"depends=\0"),
            ModInfo {
                name: None,
                depends: vec![],
                vermagic: None
            }
        );
    }

    #[test]
    fn names_come_from_file_names_with_dashes_normalised() {
        assert_eq!(
            name_from_path("kernel/drivers/char/hw_random/virtio-rng.ko").as_deref(),
            Some("virtio_rng")
        );
        assert_eq!(
            name_from_path("kernel/fs/ext4/ext4.ko").as_deref(),
            Some("ext4")
        );
        assert_eq!(name_from_path("kernel/x.ko.xz"), None);
        assert_eq!(name_from_path(".ko"), None);
    }

    #[test]
    fn garbage_is_not_a_module() {
        assert!(matches!(
            parse_modinfo(b"not an elf"),
            Err(ModuleError::NotElf(_))
        ));
        assert!(matches!(
            parse_modinfo(&[0x7f, b'E', b'L', b'F', 2, 1, 1]),
            Err(ModuleError::NotElf(_))
        ));
    }

    /// An ELF without `.modinfo` (the test binary itself) must be told apart from a module.
    #[test]
    fn an_elf_without_modinfo_is_reported() {
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(parse_modinfo(&exe), Err(ModuleError::NoModinfo));
    }

    /// A relocatable object laid out like a `.ko`: the C compiler puts the strings the kernel's
    /// `MODULE_INFO()` macro would into `.modinfo`. (The integration test reads the real
    /// modules of the Debian package.)
    #[test]
    fn modinfo_is_read_from_a_compiled_object() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("m.c");
        std::fs::write(
            &src,
            "static const char a[] __attribute__((used, section(\".modinfo\"))) = \"depends=virtio,virtio_ring\";\n\
             static const char b[] __attribute__((used, section(\".modinfo\"))) = \"name=virtio_blk\";\n\
             static const char c[] __attribute__((used, section(\".modinfo\"))) = \"vermagic=6.1.0-50-cloud-amd64 SMP\";\n\
             int init_module(void) { return 0; }\n",
        )
        .unwrap();
        let obj = dir.path().join("virtio_blk.ko");
        let status = std::process::Command::new("cc")
            .args(["-c", "-O0", "-o"])
            .arg(&obj)
            .arg(&src)
            .status()
            .expect("a C compiler (cc) is needed for this test: apt-get install gcc");
        assert!(status.success());
        let info = parse_modinfo(&std::fs::read(&obj).unwrap()).unwrap();
        assert_eq!(info.name.as_deref(), Some("virtio_blk"));
        assert_eq!(info.depends, ["virtio", "virtio_ring"]);
        assert_eq!(info.vermagic.as_deref(), Some("6.1.0-50-cloud-amd64 SMP"));
    }
}
