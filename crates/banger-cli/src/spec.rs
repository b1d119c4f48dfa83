//! Resolving a VM's resources: flags, then config `[vm_defaults]`, then values derived from the
//! host, then built-in minimums. Each value remembers where it came from, for the `spec:` line
//! and `doctor`.

use banger_api::vm::VmSpec;
use banger_config::{ByteSize, VmDefaults};

/// Where a resolved value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Flag,
    Config,
    Host,
    BuiltIn,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Flag => "flag",
            Origin::Config => "config",
            Origin::Host => "host",
            Origin::BuiltIn => "built-in",
        }
    }
}

/// The host facts the defaults derive from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    pub cpus: Option<u32>,
    pub memory_bytes: Option<u64>,
}

impl Host {
    pub fn detect() -> Self {
        let cpus = std::thread::available_parallelism()
            .ok()
            .and_then(|n| u32::try_from(n.get()).ok());
        let memory_bytes = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
                .map(|kb| kb * 1024)
        });
        Self { cpus, memory_bytes }
    }
}

pub const MIN_VCPU: u32 = 1;
pub const MIN_MEMORY_MIB: u32 = 1024;
pub const DEFAULT_DISK: u64 = 8 << 30;

/// Flags given on the command line.
#[derive(Debug, Clone, Copy, Default)]
pub struct Flags {
    pub vcpu: Option<u32>,
    pub memory_mib: Option<u32>,
    pub disk: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    pub spec: VmSpec,
    pub vcpu_from: Origin,
    pub memory_from: Origin,
    pub disk_from: Origin,
}

impl Resolved {
    pub fn describe(&self) -> String {
        format!(
            "{} vCPU ({}), {} MiB memory ({}), {} disk ({})",
            self.spec.vcpu,
            self.vcpu_from.as_str(),
            self.spec.memory_mib,
            self.memory_from.as_str(),
            ByteSize(self.spec.disk_bytes),
            self.disk_from.as_str()
        )
    }
}

pub fn resolve(flags: Flags, config: &VmDefaults, host: Host) -> Resolved {
    let host_vcpu = host.cpus.map(|c| (c / 4).clamp(1, 4));
    let host_mem = host
        .memory_bytes
        .map(|b| u32::try_from((b / 8) >> 20).unwrap_or(u32::MAX).min(8192))
        .filter(|m| *m >= MIN_MEMORY_MIB);
    let pick = |flag: Option<u64>, cfg: Option<u64>, host: Option<u64>, min: u64| match (
        flag, cfg, host,
    ) {
        (Some(v), _, _) => (v, Origin::Flag),
        (None, Some(v), _) => (v, Origin::Config),
        (None, None, Some(v)) => (v, Origin::Host),
        _ => (min, Origin::BuiltIn),
    };
    let (vcpu, vcpu_from) = pick(
        flags.vcpu.map(u64::from),
        config.vcpu.map(u64::from),
        host_vcpu.map(u64::from),
        u64::from(MIN_VCPU),
    );
    let (mem, memory_from) = pick(
        flags.memory_mib.map(u64::from),
        config.memory_mib.map(u64::from),
        host_mem.map(u64::from),
        u64::from(MIN_MEMORY_MIB),
    );
    let (disk, disk_from) = pick(
        flags.disk,
        config.disk_size.map(|s| s.0),
        Some(DEFAULT_DISK).filter(|_| host.memory_bytes.is_some()),
        DEFAULT_DISK,
    );
    Resolved {
        spec: VmSpec {
            vcpu: u32::try_from(vcpu).unwrap_or(MIN_VCPU),
            memory_mib: u32::try_from(mem).unwrap_or(MIN_MEMORY_MIB),
            disk_bytes: disk,
        },
        vcpu_from,
        memory_from,
        disk_from,
    }
}

/// `--memory`: a plain number is MiB, otherwise a size like `2G`.
pub fn parse_memory(s: &str) -> Result<u32, String> {
    if let Ok(mib) = s.parse::<u32>() {
        if mib == 0 {
            return Err("memory must be greater than zero".into());
        }
        return Ok(mib);
    }
    let size: ByteSize = s.parse()?;
    u32::try_from(size.mib()).map_err(|_| format!("memory {s} is too large"))
}

pub fn parse_disk(s: &str) -> Result<u64, String> {
    s.parse::<ByteSize>().map(|b| b.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: Host = Host {
        cpus: Some(16),
        memory_bytes: Some(32 << 30),
    };

    #[test]
    fn flags_beat_config_beat_host_beat_builtin() {
        let cfg = VmDefaults {
            vcpu: Some(3),
            memory_mib: None,
            disk_size: Some(ByteSize(16 << 30)),
        };
        let r = resolve(
            Flags {
                vcpu: Some(2),
                ..Flags::default()
            },
            &cfg,
            HOST,
        );
        assert_eq!((r.spec.vcpu, r.vcpu_from), (2, Origin::Flag));
        assert_eq!((r.spec.memory_mib, r.memory_from), (4096, Origin::Host));
        assert_eq!((r.spec.disk_bytes, r.disk_from), (16 << 30, Origin::Config));

        let r = resolve(
            Flags::default(),
            &VmDefaults::default(),
            Host {
                cpus: None,
                memory_bytes: None,
            },
        );
        assert_eq!((r.spec.vcpu, r.vcpu_from), (1, Origin::BuiltIn));
        assert_eq!(
            (r.spec.memory_mib, r.memory_from),
            (MIN_MEMORY_MIB, Origin::BuiltIn)
        );
        assert_eq!(r.disk_from, Origin::BuiltIn);
    }

    #[test]
    fn host_values_are_capped() {
        let big = Host {
            cpus: Some(64),
            memory_bytes: Some(256 << 30),
        };
        let r = resolve(Flags::default(), &VmDefaults::default(), big);
        assert_eq!(r.spec.vcpu, 4);
        assert_eq!(r.spec.memory_mib, 8192);
        let small = Host {
            cpus: Some(2),
            memory_bytes: Some(4 << 30),
        };
        let r = resolve(Flags::default(), &VmDefaults::default(), small);
        assert_eq!(r.spec.vcpu, 1);
        assert_eq!(
            (r.spec.memory_mib, r.memory_from),
            (MIN_MEMORY_MIB, Origin::BuiltIn)
        );
        assert!(r.describe().contains("1 vCPU (host)"), "{}", r.describe());
    }

    #[test]
    fn memory_flag_accepts_mib_or_sizes() {
        assert_eq!(parse_memory("2048").unwrap(), 2048);
        assert_eq!(parse_memory("2G").unwrap(), 2048);
        assert!(parse_memory("0").is_err());
        assert!(parse_memory("lots").is_err());
    }
}
