//! The per-boot settings the host passes on the kernel command line: [`BootSettings`] is their
//! one owner, rendered by the daemon (its `Display`) and parsed by the agent ([`parse`]).
//!
//! The daemon appends `banger.ip=172.16.0.2/24 banger.gw=172.16.0.1 banger.hostname=NAME
//! banger.dns=172.16.0.1 banger.time=<unix seconds>` (each optional) to the guest's command
//! line; the agent reads `/proc/cmdline` at start and applies them. Parsing is pure: values that
//! do not parse are reported as warnings and left unset, never fatal, so one bad value cannot
//! keep the agent (and with it `vm exec`) from starting. Every value renders as one word
//! without spaces or quotes, so what the daemon writes is exactly what the agent reads back.
//!
//! When the agent is `/init` (images without an init system), it also reads the kernel's own
//! root settings ([`parse_root`]) to mount the root file system itself.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

/// Where the kernel exposes its command line.
pub const PROC_CMDLINE: &str = "/proc/cmdline";

/// An IPv4 address with its prefix length, as in `172.16.0.2/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Cidr {
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Self> {
        (prefix <= 32).then_some(Ipv4Cidr { addr, prefix })
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The netmask for the prefix, e.g. 255.255.255.0 for /24.
    pub fn netmask(&self) -> Ipv4Addr {
        let bits = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        Ipv4Addr::from(bits)
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not ADDRESS/PREFIX"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("prefix {prefix:?} is not a number from 0 to 32"))?;
        Ok(Ipv4Cidr { addr, prefix })
    }
}

/// A host name that is safe to hand to `sethostname` and to write into `/etc/hosts`:
/// 1 to 63 characters of ASCII letters, digits and inner hyphens (one DNS label).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hostname(String);

impl Hostname {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Hostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Hostname {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let valid_chars = s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if s.is_empty() || s.len() > 63 || !valid_chars || s.starts_with('-') || s.ends_with('-') {
            return Err(format!(
                "{s:?} is not a host name (1-63 letters, digits and inner hyphens)"
            ));
        }
        Ok(Hostname(s.to_string()))
    }
}

/// The settings found on a command line. Absent means "leave the guest as it is".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootSettings {
    pub ip: Option<Ipv4Cidr>,
    pub gateway: Option<Ipv4Addr>,
    pub hostname: Option<Hostname>,
    /// Name servers, in order (`banger.dns=` takes a comma-separated list).
    pub dns: Vec<Ipv4Addr>,
    /// The host's clock at VM start, in seconds since the Unix epoch.
    pub time: Option<u64>,
}

impl fmt::Display for BootSettings {
    /// The `banger.*` words for these settings, space-separated, in the order the daemon has
    /// always written them; absent settings are left out.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut words: Vec<String> = Vec::new();
        if let Some(ip) = self.ip {
            words.push(format!("banger.ip={ip}"));
        }
        if let Some(gw) = self.gateway {
            words.push(format!("banger.gw={gw}"));
        }
        if let Some(hostname) = &self.hostname {
            words.push(format!("banger.hostname={hostname}"));
        }
        if !self.dns.is_empty() {
            let servers: Vec<String> = self.dns.iter().map(Ipv4Addr::to_string).collect();
            words.push(format!("banger.dns={}", servers.join(",")));
        }
        if let Some(time) = self.time {
            words.push(format!("banger.time={time}"));
        }
        f.write_str(&words.join(" "))
    }
}

/// The result of parsing: the settings plus one warning per ignored `banger.*` word.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    pub settings: BootSettings,
    pub warnings: Vec<String>,
}

/// Parses a kernel command line. Words that do not start with `banger.` are not ours and are
/// skipped silently; a key given twice takes its last value, as the kernel does.
pub fn parse(cmdline: &str) -> Parsed {
    let mut parsed = Parsed::default();
    for word in cmdline.split_ascii_whitespace() {
        let Some(rest) = word.strip_prefix("banger.") else {
            continue;
        };
        let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
        let value = value.trim_matches('"');
        let s = &mut parsed.settings;
        let result = match key {
            "ip" => value.parse().map(|v| s.ip = Some(v)),
            "gw" => value
                .parse()
                .map(|v| s.gateway = Some(v))
                .map_err(|_| format!("{value:?} is not an IPv4 address")),
            "hostname" => value.parse().map(|v| s.hostname = Some(v)),
            "dns" => parse_dns(value).map(|v| s.dns = v),
            "time" => value
                .parse()
                .map(|v| s.time = Some(v))
                .map_err(|_| format!("{value:?} is not a number of seconds")),
            _ => Err("unknown setting".to_string()),
        };
        if let Err(why) = result {
            parsed.warnings.push(format!("ignoring {word}: {why}"));
        }
    }
    parsed
}

/// How the kernel command line asks for the root file system (`root=`, `rootfstype=`,
/// `rootflags=`, `ro`/`rw`); read by the agent when it runs as `/init` and mounts the root
/// itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootSpec {
    /// `root=`: a device path such as `/dev/vda` (`None` when absent or unusable).
    pub device: Option<PathBuf>,
    /// `rootfstype=`, `ext4` when absent.
    pub fstype: String,
    /// `rootflags=`: file-system specific mount options, passed as they are.
    pub flags: Option<String>,
    /// The kernel's rule: read-only unless `rw` comes after the last `ro`.
    pub read_only: bool,
}

/// The root file system asked for by `cmdline`, plus one warning per ignored word.
pub fn parse_root(cmdline: &str) -> (RootSpec, Vec<String>) {
    let mut spec = RootSpec {
        device: None,
        fstype: "ext4".to_string(),
        flags: None,
        read_only: true,
    };
    let mut warnings = Vec::new();
    for word in cmdline.split_ascii_whitespace() {
        let (key, value) = word.split_once('=').unwrap_or((word, ""));
        let value = value.trim_matches('"');
        match key {
            "ro" if value.is_empty() => spec.read_only = true,
            "rw" if value.is_empty() => spec.read_only = false,
            "root" => match root_device(value) {
                Ok(device) => spec.device = Some(device),
                Err(why) => {
                    spec.device = None;
                    warnings.push(format!("ignoring {word}: {why}"));
                }
            },
            "rootfstype" => {
                // The kernel takes a list; the first entry is the one banger images use.
                match value.split(',').next().filter(|t| valid_fstype(t)) {
                    Some(t) => spec.fstype = t.to_string(),
                    None => warnings.push(format!("ignoring {word}: not a file system type")),
                }
            }
            "rootflags" if !value.is_empty() => spec.flags = Some(value.to_string()),
            _ => {}
        }
    }
    (spec, warnings)
}

/// `root=` values the agent can mount without udev: device paths under `/dev`.
fn root_device(value: &str) -> Result<PathBuf, String> {
    if value.contains('=') {
        return Err(format!(
            "{value} needs udev to resolve; banger's init takes a /dev path such as /dev/vda"
        ));
    }
    let path = Path::new(value);
    let plain = path
        .components()
        .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !value.starts_with("/dev/") || !plain || value.len() > 255 {
        return Err(format!("{value:?} is not a device path under /dev"));
    }
    Ok(path.to_path_buf())
}

fn valid_fstype(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 32
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
}

fn parse_dns(value: &str) -> Result<Vec<Ipv4Addr>, String> {
    value
        .split(',')
        .map(|a| {
            a.parse()
                .map_err(|_| format!("{a:?} is not an IPv4 address"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_banger_command_line_is_parsed() {
        let line = "console=ttyS0 root=/dev/vda rw banger.ip=172.16.0.2/24 banger.gw=172.16.0.1 \
                    banger.hostname=dev-box banger.dns=172.16.0.1 banger.time=1700000000 quiet\n";
        let parsed = parse(line);
        assert_eq!(parsed.warnings, Vec::<String>::new());
        let s = parsed.settings;
        assert_eq!(s.ip, Ipv4Cidr::new(Ipv4Addr::new(172, 16, 0, 2), 24));
        assert_eq!(s.gateway, Some(Ipv4Addr::new(172, 16, 0, 1)));
        assert_eq!(s.hostname.as_ref().map(Hostname::as_str), Some("dev-box"));
        assert_eq!(s.dns, vec![Ipv4Addr::new(172, 16, 0, 1)]);
        assert_eq!(s.time, Some(1_700_000_000));
    }

    #[test]
    fn settings_render_as_the_daemon_writes_them() {
        let s = BootSettings {
            ip: Ipv4Cidr::new(Ipv4Addr::new(172, 16, 0, 2), 24),
            gateway: Some(Ipv4Addr::new(172, 16, 0, 1)),
            hostname: Some("dev-box".parse().unwrap()),
            dns: vec![Ipv4Addr::new(172, 16, 0, 1)],
            time: Some(1_700_000_000),
        };
        assert_eq!(
            s.to_string(),
            "banger.ip=172.16.0.2/24 banger.gw=172.16.0.1 banger.hostname=dev-box \
             banger.dns=172.16.0.1 banger.time=1700000000"
        );
        assert_eq!(BootSettings::default().to_string(), "");
    }

    mod round_trip {
        use super::*;
        use proptest::prelude::*;

        fn settings() -> impl Strategy<Value = BootSettings> {
            let ip = proptest::option::of((any::<u32>(), 0u8..=32));
            let hostname = proptest::option::of("[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?");
            (
                ip,
                proptest::option::of(any::<u32>()),
                hostname,
                proptest::collection::vec(any::<u32>(), 0..4),
                proptest::option::of(any::<u64>()),
            )
                .prop_map(|(ip, gw, hostname, dns, time)| BootSettings {
                    ip: ip.and_then(|(a, p)| Ipv4Cidr::new(Ipv4Addr::from(a), p)),
                    gateway: gw.map(Ipv4Addr::from),
                    hostname: hostname.map(|h| h.parse().unwrap()),
                    dns: dns.into_iter().map(Ipv4Addr::from).collect(),
                    time,
                })
        }

        proptest! {
            /// What the daemon renders, the agent reads back unchanged and without a warning,
            /// wherever in the command line it stands.
            #[test]
            fn parse_reads_back_what_display_wrote(
                s in settings(),
                // Words of the kernel's and the init's own, never `banger.*`.
                before in "( k[a-z_.]{0,11}(=[a-z0-9/]{0,8})?){0,3}",
            ) {
                let line = format!("console=ttyS0{before} {s} quiet\n");
                let parsed = parse(&line);
                prop_assert_eq!(parsed.warnings, Vec::<String>::new());
                prop_assert_eq!(parsed.settings, s);
            }
        }
    }

    #[test]
    fn a_command_line_without_banger_settings_changes_nothing() {
        let parsed = parse("BOOT_IMAGE=/vmlinuz root=UUID=abc ro quiet");
        assert_eq!(parsed, Parsed::default());
    }

    #[test]
    fn bad_values_are_warnings_and_do_not_affect_the_others() {
        let parsed = parse(
            "banger.ip=172.16.0.2 banger.gw=nope banger.hostname=-bad banger.time=soon \
             banger.color=red banger.dns=10.0.0.1",
        );
        assert_eq!(parsed.settings.ip, None);
        assert_eq!(parsed.settings.gateway, None);
        assert_eq!(parsed.settings.hostname, None);
        assert_eq!(parsed.settings.time, None);
        assert_eq!(parsed.settings.dns, vec![Ipv4Addr::new(10, 0, 0, 1)]);
        assert_eq!(parsed.warnings.len(), 5, "{:?}", parsed.warnings);
        assert!(parsed.warnings[0].contains("banger.ip=172.16.0.2"));
        assert!(parsed.warnings[4].contains("unknown setting"));
    }

    #[test]
    fn prefixes_outside_0_to_32_are_rejected() {
        assert!("10.0.0.1/33".parse::<Ipv4Cidr>().is_err());
        assert!("10.0.0.1/x".parse::<Ipv4Cidr>().is_err());
        assert!("10.0.0.1/0".parse::<Ipv4Cidr>().is_ok());
    }

    #[test]
    fn netmask_follows_the_prefix() {
        let mask = |p| Ipv4Cidr::new(Ipv4Addr::UNSPECIFIED, p).unwrap().netmask();
        assert_eq!(mask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(mask(30), Ipv4Addr::new(255, 255, 255, 252));
        assert_eq!(mask(32), Ipv4Addr::BROADCAST);
        assert_eq!(mask(0), Ipv4Addr::UNSPECIFIED);
    }

    #[test]
    fn several_name_servers_and_repeated_keys() {
        let parsed = parse("banger.dns=1.1.1.1,9.9.9.9 banger.hostname=a banger.hostname=b");
        assert_eq!(
            parsed.settings.dns,
            vec![Ipv4Addr::new(1, 1, 1, 1), Ipv4Addr::new(9, 9, 9, 9)]
        );
        assert_eq!(parsed.settings.hostname.unwrap().as_str(), "b");
    }

    #[test]
    fn root_settings_follow_the_kernels_rules() {
        let (spec, warnings) = parse_root(
            "console=ttyS0 reboot=k panic=1 root=/dev/vda rw rootfstype=ext4 net.ifnames=0",
        );
        assert_eq!(warnings, Vec::<String>::new());
        assert_eq!(
            spec,
            RootSpec {
                device: Some(PathBuf::from("/dev/vda")),
                fstype: "ext4".into(),
                flags: None,
                read_only: false,
            }
        );
        // Without rw the kernel mounts read-only; the last of ro/rw wins.
        let (spec, _) =
            parse_root("root=/dev/vdb1 rw ro rootfstype=xfs,ext4 rootflags=noatime,data=ordered");
        assert!(spec.read_only);
        assert_eq!(spec.fstype, "xfs");
        assert_eq!(spec.flags.as_deref(), Some("noatime,data=ordered"));
        assert_eq!(spec.device.as_deref(), Some(Path::new("/dev/vdb1")));
        let (spec, _) = parse_root("quiet");
        assert_eq!(
            (spec.device, spec.fstype.as_str(), spec.read_only),
            (None, "ext4", true)
        );
    }

    #[test]
    fn root_devices_outside_dev_or_needing_udev_are_warnings() {
        for (line, why) in [
            ("root=UUID=1234-abcd", "needs udev"),
            ("root=PARTUUID=00-01", "needs udev"),
            ("root=/dev/../etc/x", "not a device path"),
            ("root=vda", "not a device path"),
            ("root=/tmp/disk", "not a device path"),
            ("rootfstype=ext4;rm", "not a file system type"),
        ] {
            let (spec, warnings) = parse_root(line);
            assert_eq!(spec.device, None, "{line}");
            assert_eq!(warnings.len(), 1, "{line}: {warnings:?}");
            assert!(warnings[0].contains(why), "{line}: {warnings:?}");
        }
        // A later valid root= wins over an earlier bad one, and the reverse.
        assert!(parse_root("root=UUID=x root=/dev/vda").0.device.is_some());
        assert!(parse_root("root=/dev/vda root=UUID=x").0.device.is_none());
    }

    #[test]
    fn host_names_are_single_safe_labels() {
        for bad in ["", "a.b", "a b", "x\n", "-a", "a-", &"a".repeat(64), "ü"] {
            assert!(bad.parse::<Hostname>().is_err(), "{bad:?} accepted");
        }
        for good in ["a", "dev-1", "A9", &"a".repeat(63)] {
            assert!(good.parse::<Hostname>().is_ok(), "{good:?} rejected");
        }
    }
}
